//! What the engine counts and times, through the [`metrics`] facade.
//!
//! The engine records into whatever recorder the process installed (`butler server` installs a
//! Prometheus one); with none installed every call is a no-op, so libraries, tests and the
//! short-lived commands pay nothing. The numbers are this process's: a fleet's totals are the
//! sum over its processes, and what the store knows (runs by status, workers) is measured from
//! the store by whoever exports it.
//!
//! Labels are bounded sets on purpose (an attempt's outcome, a call's name): per-task or
//! per-run labels would make one time series per task, which a metrics store cannot hold for
//! runs in the hundreds of thousands. Per-workflow breakdowns come from the store instead.

use std::future::Future;
use std::time::{Duration, Instant};

use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};

use crate::executor::Outcome;
use crate::model::RunStatus;

/// Counter: task attempts that ended, by `outcome` (see [`OUTCOMES`]).
pub const TASK_ATTEMPTS: &str = "butler_task_attempts_total";
/// Histogram: how long attempts ran, in seconds, by `outcome`, for the attempts a worker of
/// this process ran to an end.
pub const TASK_ATTEMPT_DURATION: &str = "butler_task_attempt_duration_seconds";
/// Counter: tasks put back for another attempt, by the `outcome` of the attempt that ended.
pub const TASK_RETRIES: &str = "butler_task_retries_total";
/// Counter: runs this process's scheduler saw finish, by `status`.
pub const RUNS_FINISHED: &str = "butler_runs_finished_total";
/// Counter: runs ended because they ran past their workflow's `timeout`.
pub const RUN_TIMEOUTS: &str = "butler_run_timeouts_total";
/// Histogram: how long the engine's store calls took, in seconds, by `op`.
pub const STORE_CALL_DURATION: &str = "butler_store_call_duration_seconds";
/// Histogram: change sets per group commit (how many state changes one transaction carried).
pub const STORE_BATCH_SIZE: &str = "butler_store_batch_size";
/// Histogram: how long the engine's queue calls took, in seconds, by `op`.
pub const QUEUE_CALL_DURATION: &str = "butler_queue_call_duration_seconds";
/// Counter: write transactions this process committed to the store's database, each one
/// durable commit (an fsync with `full` durability); counted by the store, right after the
/// commit and before its callers hear of it: group commits (with SQLite, the queue's writes
/// share them) and the store's other transactions, such as launches, but not single-statement
/// writes such as heartbeats.
pub const STORE_COMMITS: &str = "butler_store_commits_total";
/// Histogram: how long each transaction of the SQLite store's writer thread took, in seconds,
/// from its `BEGIN` to its `COMMIT` (with the rest run again when a piece of it failed). The
/// writer runs one at a time, so the rate of the sum is the share of time it was busy: near 1,
/// the store is what limits the engine.
pub const STORE_TRANSACTION_DURATION: &str = "butler_store_transaction_duration_seconds";

/// Every value of the `outcome` label of [`TASK_ATTEMPTS`] and [`TASK_RETRIES`]:
/// - `succeeded`: exit code 0;
/// - `failed`: another exit code, or killed by a signal it did not expect;
/// - `failed_to_start`: the command could not be rendered or started;
/// - `timed_out`: killed on reaching the task's `timeout`;
/// - `cancelled`: stopped because the task moved on while it ran (its run was cancelled or
///   timed out, or its lease was taken back);
/// - `lost`: its worker stopped renewing the lease or its process died; counted by the
///   scheduler that takes the task back;
/// - `interrupted`: its worker was stopped and gave the task back.
pub const OUTCOMES: [&str; 7] = [
    "succeeded",
    "failed",
    "failed_to_start",
    "timed_out",
    "cancelled",
    "lost",
    "interrupted",
];

/// The `op` label values of [`STORE_CALL_DURATION`].
pub const STORE_OPS: [&str; 3] = ["apply", "list_tasks", "list_events"];
/// The `op` label values of [`QUEUE_CALL_DURATION`]. A dequeue is not timed: it waits for
/// messages, so its duration says how idle the workers are, not how fast the queue is.
pub const QUEUE_OPS: [&str; 2] = ["enqueue", "ack"];

/// Bucket bounds (seconds) fit for task attempts: from a `true` to a multi-hour job.
pub const ATTEMPT_BUCKETS: [f64; 16] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
    7200.0,
];
/// Bucket bounds (seconds) fit for store and queue calls.
pub const CALL_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bucket bounds for [`STORE_BATCH_SIZE`].
pub const BATCH_BUCKETS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
];

/// Describes every engine metric to the installed recorder (its help text and unit) and
/// registers each counter at zero for every label value, so the series exist, and rates and
/// alerts work, from the first scrape on. Call once after installing a recorder.
pub fn describe() {
    describe_counter!(
        TASK_ATTEMPTS,
        Unit::Count,
        "Task attempts that ended, by outcome (succeeded, failed, failed_to_start, timed_out, \
         cancelled, lost, interrupted)."
    );
    describe_histogram!(
        TASK_ATTEMPT_DURATION,
        Unit::Seconds,
        "How long the attempts this process ran took, by outcome."
    );
    describe_counter!(
        TASK_RETRIES,
        Unit::Count,
        "Tasks put back for another attempt, by the outcome of the attempt that ended."
    );
    describe_counter!(
        RUNS_FINISHED,
        Unit::Count,
        "Runs this process's scheduler saw finish, by status (completed, error, cancelled)."
    );
    describe_counter!(
        RUN_TIMEOUTS,
        Unit::Count,
        "Runs ended in error because they ran past their workflow's timeout."
    );
    describe_histogram!(
        STORE_CALL_DURATION,
        Unit::Seconds,
        "How long the engine's store calls took, by op (apply is one group commit)."
    );
    describe_histogram!(
        STORE_BATCH_SIZE,
        Unit::Count,
        "State changes (change sets) carried by one group commit."
    );
    describe_histogram!(
        QUEUE_CALL_DURATION,
        Unit::Seconds,
        "How long the engine's queue calls took, by op."
    );
    describe_histogram!(
        STORE_TRANSACTION_DURATION,
        Unit::Seconds,
        "How long each transaction of the SQLite store's writer thread took; the rate of the \
         sum is the share of time the writer was busy."
    );
    describe_counter!(
        STORE_COMMITS,
        Unit::Count,
        "Write transactions this process committed to the store's database: group commits \
         and launches, not single-statement writes such as heartbeats."
    );
    for outcome in OUTCOMES {
        counter!(TASK_ATTEMPTS, "outcome" => outcome).absolute(0);
        counter!(TASK_RETRIES, "outcome" => outcome).absolute(0);
    }
    for status in RunStatus::ALL.into_iter().filter(|s| s.is_finished()) {
        counter!(RUNS_FINISHED, "status" => status.as_str()).absolute(0);
    }
    counter!(RUN_TIMEOUTS).absolute(0);
    counter!(STORE_COMMITS).absolute(0);
}

/// The `outcome` label of an attempt that ran to an end.
pub(crate) fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        _ if outcome.succeeded() => "succeeded",
        Outcome::Exited { .. } | Outcome::Signalled { .. } => "failed",
        Outcome::FailedToStart { .. } => "failed_to_start",
        Outcome::TimedOut => "timed_out",
        Outcome::Cancelled => "cancelled",
    }
}

/// Counts an attempt that ended with `outcome`; `ran` is how long it ran when this process
/// ran it; `retried` whether its task was put back for another attempt.
pub(crate) fn attempt_ended(outcome: &'static str, ran: Option<Duration>, retried: bool) {
    counter!(TASK_ATTEMPTS, "outcome" => outcome).increment(1);
    if let Some(ran) = ran {
        histogram!(TASK_ATTEMPT_DURATION, "outcome" => outcome).record(ran.as_secs_f64());
    }
    if retried {
        counter!(TASK_RETRIES, "outcome" => outcome).increment(1);
    }
}

/// Counts a run that finished with `status`, and whether it ran past its timeout.
pub(crate) fn run_finished(status: RunStatus, timed_out: bool) {
    counter!(RUNS_FINISHED, "status" => status.as_str()).increment(1);
    if timed_out {
        counter!(RUN_TIMEOUTS).increment(1);
    }
}

/// Counts the change sets of one group commit.
pub(crate) fn batch(sets: usize) {
    histogram!(STORE_BATCH_SIZE).record(sets as f64);
}

/// Awaits `call`, a store call named `op`, recording how long it took.
pub(crate) async fn store_call<T>(op: &'static str, call: impl Future<Output = T>) -> T {
    timed(STORE_CALL_DURATION, op, call).await
}

/// Awaits `call`, a queue call named `op`, recording how long it took.
pub(crate) async fn queue_call<T>(op: &'static str, call: impl Future<Output = T>) -> T {
    timed(QUEUE_CALL_DURATION, op, call).await
}

async fn timed<T>(metric: &'static str, op: &'static str, call: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let answer = call.await;
    histogram!(metric, "op" => op).record(started.elapsed().as_secs_f64());
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_a_label_in_the_documented_set() {
        let outcomes = [
            Outcome::Exited { code: 0 },
            Outcome::Exited { code: 3 },
            Outcome::Signalled { signal: 9 },
            Outcome::TimedOut,
            Outcome::Cancelled,
            Outcome::FailedToStart {
                reason: "no such file".to_owned(),
            },
        ];
        let labels: Vec<&str> = outcomes.iter().map(outcome_label).collect();
        assert_eq!(
            labels,
            [
                "succeeded",
                "failed",
                "failed",
                "timed_out",
                "cancelled",
                "failed_to_start"
            ]
        );
        assert!(labels.iter().all(|label| OUTCOMES.contains(label)));
    }

    #[test]
    fn buckets_rise_so_a_recorder_accepts_them() {
        for buckets in [&ATTEMPT_BUCKETS[..], &CALL_BUCKETS, &BATCH_BUCKETS] {
            assert!(
                buckets.windows(2).all(|pair| pair[0] < pair[1]),
                "{buckets:?}"
            );
        }
    }
}
