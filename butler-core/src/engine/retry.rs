//! What happens to a task after an attempt: success, a retry later, or failure for good.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;

use crate::definition::TaskDef;
use crate::executor::Outcome;
use crate::model::{TaskInstance, TaskState};

/// Delay before the first retry when the definition sets no `retry_delay`.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(10);
/// Upper bound of the backoff when the definition sets no `max_retry_delay`.
pub const DEFAULT_MAX_RETRY_DELAY: Duration = Duration::from_secs(600);
/// How many attempts may be lost with their worker before the task fails anyway.
pub const MAX_LOST_ATTEMPTS: u32 = 5;

/// The task's row after the running attempt ended with `outcome` at `now`.
///
/// Success ends the task. A cancel ends it as cancelled. Any other failure counts against the
/// task: an exit code listed in `permanent_exit_codes` fails it at once; otherwise it is retried
/// while `retries` are left or, with `retry_for`, while the next attempt would start within that
/// long of the first; else it ends `failed` (or `timed_out` when the last attempt ran too long).
pub fn after_attempt(
    def: &TaskDef,
    task: &TaskInstance,
    outcome: &Outcome,
    now: DateTime<Utc>,
) -> TaskInstance {
    let mut next = finished_attempt(task, now);
    next.exit_code = outcome.exit_code();
    match outcome {
        _ if outcome.succeeded() => {
            next.state = TaskState::Succeeded;
            next.error = None;
        }
        Outcome::Cancelled => {
            next.state = TaskState::Cancelled;
            next.error = Some(outcome.describe());
        }
        _ => {
            next.failures += 1;
            next.error = Some(outcome.describe());
            let permanent = outcome
                .exit_code()
                .is_some_and(|code| def.permanent_exit_codes.contains(&code));
            let delay = backoff(def, next.failures);
            if !permanent && may_retry(def, &next, now, delay) {
                next.state = TaskState::UpForRetry;
                next.next_try_at = Some(now + delay);
            } else if matches!(outcome, Outcome::TimedOut) {
                next.state = TaskState::TimedOut;
            } else {
                next.state = TaskState::Failed;
            }
        }
    }
    next
}

/// The task's row after its running attempt's lease expired: the worker was lost, which is not
/// the task's fault, so it is retried at once without counting against `retries`, up to
/// [`MAX_LOST_ATTEMPTS`] lost attempts.
pub fn after_lost_lease(task: &TaskInstance, now: DateTime<Utc>) -> TaskInstance {
    let mut next = finished_attempt(task, now);
    let lost = task.try_number.saturating_sub(task.failures);
    let who = task.worker.as_deref().unwrap_or("its worker");
    if lost >= MAX_LOST_ATTEMPTS {
        next.state = TaskState::Failed;
        next.error = Some(format!(
            "lost {lost} attempts with their workers (last: {who}); check the workers' health"
        ));
    } else {
        next.state = TaskState::UpForRetry;
        next.next_try_at = Some(now);
        next.error = Some(format!("lease expired: lost contact with {who}"));
    }
    next
}

fn finished_attempt(task: &TaskInstance, now: DateTime<Utc>) -> TaskInstance {
    TaskInstance {
        token: None,
        lease_until: None,
        ended_at: Some(now),
        next_try_at: None,
        exit_code: None,
        ..task.clone()
    }
}

fn may_retry(def: &TaskDef, task: &TaskInstance, now: DateTime<Utc>, delay: Duration) -> bool {
    if task.failures <= def.retries {
        return true;
    }
    match (def.retry_for, task.first_started_at) {
        (Some(window), Some(first)) => now + delay < first + window,
        _ => false,
    }
}

/// Delay before retry number `failures`: `retry_delay` doubled for every failure after the
/// first, capped at `max_retry_delay`, then scaled by a random factor in `[0.5, 1.0]` so that
/// tasks failing together do not retry together.
pub fn backoff(def: &TaskDef, failures: u32) -> Duration {
    let base = def.retry_delay.unwrap_or(DEFAULT_RETRY_DELAY);
    let cap = def
        .max_retry_delay
        .unwrap_or(DEFAULT_MAX_RETRY_DELAY)
        .max(base);
    let doublings = failures.saturating_sub(1).min(30);
    let delay = base.saturating_mul(1 << doublings).min(cap);
    delay.mul_f64(rand::rng().random_range(0.5..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::{Definition, Format};

    fn def(extra: &str) -> TaskDef {
        let text = format!("[[tasks]]\nid = \"t\"\nrun = \"true\"\n{extra}");
        Definition::parse(&text, Format::Toml, "test.toml")
            .unwrap()
            .tasks
            .remove(0)
    }

    fn running(try_number: u32, failures: u32) -> TaskInstance {
        let now = Utc::now();
        TaskInstance {
            state: TaskState::Running,
            try_number,
            failures,
            token: Some(7),
            lease_until: Some(now),
            first_started_at: Some(now),
            started_at: Some(now),
            ..TaskInstance::pending(1, "t")
        }
    }

    #[test]
    fn success_ends_the_task_and_clears_the_lease() {
        let next = after_attempt(
            &def(""),
            &running(1, 0),
            &Outcome::Exited { code: 0 },
            Utc::now(),
        );
        assert_eq!(next.state, TaskState::Succeeded);
        assert_eq!(
            (next.token, next.lease_until, next.exit_code),
            (None, None, Some(0))
        );
    }

    #[test]
    fn failures_retry_until_retries_are_used_up() {
        let d = def("retries = 2\nretry_delay = \"1s\"");
        let fail = Outcome::Exited { code: 1 };
        let now = Utc::now();
        let first = after_attempt(&d, &running(1, 0), &fail, now);
        assert_eq!(first.state, TaskState::UpForRetry);
        let due = first.next_try_at.unwrap() - now;
        assert!(due >= chrono::Duration::milliseconds(500) && due <= chrono::Duration::seconds(1));
        let second = after_attempt(&d, &running(2, 1), &fail, now);
        assert_eq!(second.state, TaskState::UpForRetry);
        let third = after_attempt(&d, &running(3, 2), &fail, now);
        assert_eq!(third.state, TaskState::Failed);
        assert_eq!(third.error.as_deref(), Some("exit code 1"));
    }

    #[test]
    fn permanent_exit_codes_fail_at_once() {
        let d = def("retries = 5\npermanent_exit_codes = [3]");
        let next = after_attempt(&d, &running(1, 0), &Outcome::Exited { code: 3 }, Utc::now());
        assert_eq!(next.state, TaskState::Failed);
        let other = after_attempt(&d, &running(1, 0), &Outcome::Exited { code: 4 }, Utc::now());
        assert_eq!(other.state, TaskState::UpForRetry);
    }

    #[test]
    fn timeouts_without_retries_end_timed_out() {
        let next = after_attempt(&def(""), &running(1, 0), &Outcome::TimedOut, Utc::now());
        assert_eq!(next.state, TaskState::TimedOut);
    }

    #[test]
    fn cancel_is_never_retried() {
        let next = after_attempt(
            &def("retries = 3"),
            &running(1, 0),
            &Outcome::Cancelled,
            Utc::now(),
        );
        assert_eq!(next.state, TaskState::Cancelled);
    }

    #[test]
    fn retry_for_keeps_retrying_within_the_window_only() {
        let d = def("retry_for = \"5m\"\nretry_delay = \"1s\"");
        let mut task = running(4, 3);
        let now = Utc::now();
        task.first_started_at = Some(now - chrono::Duration::minutes(2));
        let inside = after_attempt(&d, &task, &Outcome::Exited { code: 1 }, now);
        assert_eq!(inside.state, TaskState::UpForRetry);
        task.first_started_at = Some(now - chrono::Duration::minutes(6));
        let outside = after_attempt(&d, &task, &Outcome::Exited { code: 1 }, now);
        assert_eq!(outside.state, TaskState::Failed);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let d = def("retry_delay = \"1s\"\nmax_retry_delay = \"5s\"");
        assert!(backoff(&d, 1) <= Duration::from_secs(1));
        let third = backoff(&d, 3);
        assert!(third >= Duration::from_secs(2) && third <= Duration::from_secs(4));
        assert!(backoff(&d, 20) <= Duration::from_secs(5));
    }

    #[test]
    fn lost_leases_retry_at_once_but_not_forever() {
        let now = Utc::now();
        let next = after_lost_lease(&running(1, 0), now);
        assert_eq!((next.state, next.failures), (TaskState::UpForRetry, 0));
        assert_eq!(next.next_try_at, Some(now));
        let given_up = after_lost_lease(&running(MAX_LOST_ATTEMPTS, 0), now);
        assert_eq!(given_up.state, TaskState::Failed);
    }
}
