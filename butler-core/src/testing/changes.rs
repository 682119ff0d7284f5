//! Builders of changes and task rows for the tests of a store's `apply`.

use chrono::{DateTime, Utc};

use crate::change::{Change, LeaseChange, RunChange, TaskChange, TaskExpect};
use crate::model::{Id, RunStatus, TaskInstance, TaskState};

/// `ms` milliseconds after a fixed instant: whole milliseconds, as stores keep times.
pub fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_700_000_000_000 + ms).unwrap_or_default()
}

/// Moves `from` to `new`, by `test`.
pub fn task_change(from: &TaskInstance, new: &TaskInstance) -> Change {
    Change::Task(TaskChange {
        expect: TaskExpect::of(from),
        new: new.clone(),
        by: "test".into(),
        reason: format!("to {}", new.state),
    })
}

/// Moves run `run_id` from `expect` to `status`, by `test`, with no times.
pub fn run_change(run_id: Id, expect: RunStatus, status: RunStatus) -> RunChange {
    RunChange {
        run_id,
        expect,
        status,
        error: None,
        started_at: None,
        ended_at: None,
        by: "test".into(),
        reason: format!("to {status}"),
    }
}

/// Renews the lease of `task`'s attempt `token` until `until`.
pub fn lease(task: &TaskInstance, token: i64, until: DateTime<Utc>) -> Change {
    Change::Lease(LeaseChange {
        run_id: task.run_id,
        task_id: task.task_id.clone(),
        token,
        until,
    })
}

/// `task` queued for its next try.
pub fn queued(task: &TaskInstance) -> TaskInstance {
    TaskInstance {
        state: TaskState::Queued,
        try_number: task.try_number + 1,
        queued_at: Some(at(0)),
        ..task.clone()
    }
}

/// `task` running as attempt `token` of worker `host/1`.
pub fn running(task: &TaskInstance, token: i64) -> TaskInstance {
    TaskInstance {
        state: TaskState::Running,
        token: Some(token),
        lease_until: Some(at(60_000)),
        worker: Some("host/1".into()),
        started_at: Some(at(1)),
        ..task.clone()
    }
}
