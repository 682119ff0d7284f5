//! Compare-and-set changes: the only way run and task states move.

pub mod decide;

use chrono::{DateTime, Utc};

use crate::model::{Id, RunStatus, TaskInstance, TaskState};

/// What a [`TaskChange`] expects the stored task to be; if it is not, the change is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskExpect {
    /// The state the task must be in.
    pub state: TaskState,
    /// The attempt number it must be at.
    pub try_number: u32,
    /// The fencing token of the running attempt, when the change comes from its holder.
    pub token: Option<i64>,
}

impl TaskExpect {
    /// What `task` is now: a change built from a task read from the store expects exactly it.
    pub fn of(task: &TaskInstance) -> Self {
        TaskExpect {
            state: task.state,
            try_number: task.try_number,
            token: task.token,
        }
    }
}

/// Replace a task's row with `new` if it is still as `expect` says; logs an event.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskChange {
    /// The task's current row as the author last saw it.
    pub expect: TaskExpect,
    /// The whole new row (`run_id` and `task_id` name the task).
    pub new: TaskInstance,
    /// Who makes the change, for the event log.
    pub by: String,
    /// Why, for the event log.
    pub reason: String,
}

/// Move a run from status `expect` to `status`; logs an event.
#[derive(Debug, Clone, PartialEq)]
pub struct RunChange {
    /// The run.
    pub run_id: Id,
    /// The status it must be in.
    pub expect: RunStatus,
    /// The new status.
    pub status: RunStatus,
    /// Why it ended in `error`, kept on the run; cleared otherwise.
    pub error: Option<String>,
    /// Sets the run's start time when `Some`.
    pub started_at: Option<DateTime<Utc>>,
    /// The run's end time: set for a run that finishes, `None` for one that does not.
    pub ended_at: Option<DateTime<Utc>>,
    /// Who makes the change.
    pub by: String,
    /// Why.
    pub reason: String,
}

/// Extend the lease of a running attempt held with `token`; no event is logged.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseChange {
    /// The run.
    pub run_id: Id,
    /// The task.
    pub task_id: String,
    /// The attempt's fencing token.
    pub token: i64,
    /// The new end of the lease.
    pub until: DateTime<Utc>,
}

/// One compare-and-set.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A task's state.
    Task(TaskChange),
    /// A run's status.
    Run(RunChange),
    /// A running attempt's lease.
    Lease(LeaseChange),
}

/// Changes applied together or not at all.
pub type ChangeSet = Vec<Change>;
