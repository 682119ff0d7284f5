use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Id;
use crate::error::{Error, Result};

/// The state of one task of a run.
///
/// `pending → queued → running → succeeded | failed | up_for_retry | upstream_failed | skipped |
/// timed_out | cancelled`; `up_for_retry` goes back to `queued` when its retry is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for the tasks it needs.
    Pending,
    /// Handed to the queue; a worker will start it.
    Queued,
    /// A worker holds the attempt's lease and runs it.
    Running,
    /// The last attempt succeeded.
    Succeeded,
    /// Failed for good.
    Failed,
    /// The last attempt failed; the next one is due at `next_try_at`.
    UpForRetry,
    /// A task it needs failed, so it will not run.
    UpstreamFailed,
    /// Not run, by decision.
    Skipped,
    /// The last attempt ran past its timeout and no retry is left.
    TimedOut,
    /// Cancelled by a user or by the run's timeout.
    Cancelled,
}

impl TaskState {
    /// Every state, in lifecycle order.
    pub const ALL: [TaskState; 10] = [
        TaskState::Pending,
        TaskState::Queued,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::UpForRetry,
        TaskState::UpstreamFailed,
        TaskState::Skipped,
        TaskState::TimedOut,
        TaskState::Cancelled,
    ];

    /// The state as stored and printed (`up_for_retry`).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::UpForRetry => "up_for_retry",
            TaskState::UpstreamFailed => "upstream_failed",
            TaskState::Skipped => "skipped",
            TaskState::TimedOut => "timed_out",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// Whether the task will not change again unless its run is reset.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded
                | TaskState::Failed
                | TaskState::UpstreamFailed
                | TaskState::Skipped
                | TaskState::TimedOut
                | TaskState::Cancelled
        )
    }

    /// Whether the task finished without success (its downstream tasks will not run).
    pub fn is_failure(self) -> bool {
        self.is_finished() && !matches!(self, TaskState::Succeeded | TaskState::Skipped)
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        TaskState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                let all: Vec<&str> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
                Error::InvalidInput(format!(
                    "unknown task state {s:?}; use one of: {}",
                    all.join(", ")
                ))
            })
    }
}

/// One task of one run, as the store tracks it.
///
/// A task is executed in attempts numbered from 1 (`try_number`); the attempt that runs holds a
/// lease until `lease_until` and a fencing `token`, and only the holder of the current token may
/// record the attempt's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInstance {
    /// The run it belongs to.
    pub run_id: Id,
    /// The task's id in the workflow definition.
    pub task_id: String,
    /// Current state.
    pub state: TaskState,
    /// Number of the current or last attempt; 0 before the first.
    pub try_number: u32,
    /// Attempts that failed through the task's own fault (counted against `retries`).
    pub failures: u32,
    /// Fencing token of the running attempt.
    pub token: Option<i64>,
    /// The running attempt's lease ends then unless the worker heartbeats.
    pub lease_until: Option<DateTime<Utc>>,
    /// The worker that runs or ran the current attempt.
    pub worker: Option<String>,
    /// When the task was last queued.
    pub queued_at: Option<DateTime<Utc>>,
    /// When the first attempt started (the clock of `retry_for`).
    pub first_started_at: Option<DateTime<Utc>>,
    /// When the current or last attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the last attempt ended.
    pub ended_at: Option<DateTime<Utc>>,
    /// When an `up_for_retry` task's next attempt is due.
    pub next_try_at: Option<DateTime<Utc>>,
    /// Exit code of the last attempt, when it exited.
    pub exit_code: Option<i32>,
    /// Why the last attempt failed.
    pub error: Option<String>,
}

impl TaskInstance {
    /// The task's latest attempt that started, 0 if none did: a queued task's try number is
    /// that of the attempt it waits to start. Its log is the one to show.
    pub fn last_started_try(&self) -> u32 {
        if self.state == TaskState::Queued {
            self.try_number.saturating_sub(1)
        } else {
            self.try_number
        }
    }

    /// A task that has not been queued yet.
    pub fn pending(run_id: Id, task_id: impl Into<String>) -> Self {
        TaskInstance {
            run_id,
            task_id: task_id.into(),
            state: TaskState::Pending,
            try_number: 0,
            failures: 0,
            token: None,
            lease_until: None,
            worker: None,
            queued_at: None,
            first_started_at: None,
            started_at: None,
            ended_at: None,
            next_try_at: None,
            exit_code: None,
            error: None,
        }
    }
}
