use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Id;

/// One entry of the event log: a state change of a run or of one of its tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the log; increases with every event.
    pub id: Id,
    /// When the change was committed.
    pub at: DateTime<Utc>,
    /// The run concerned.
    pub run_id: Id,
    /// The task concerned; `None` for a change of the run's own status.
    pub task_id: Option<String>,
    /// The task's attempt number, for task changes.
    pub try_number: Option<u32>,
    /// The state before.
    pub from: String,
    /// The state after.
    pub to: String,
    /// Who made the change: `scheduler`, `worker HOST/PID`, `cli`.
    pub by: String,
    /// Why.
    pub reason: String,
}

/// Which events [`crate::RunStore::list_events`] returns, ordered by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFilter {
    /// Leave out events whose `by` ends with this: a process skips its own changes by its name.
    pub not_by_suffix: Option<String>,
    /// Only events of this run.
    pub run_id: Option<Id>,
    /// Only events with an id greater than this.
    pub after: Id,
    /// At most this many.
    pub limit: u32,
}
