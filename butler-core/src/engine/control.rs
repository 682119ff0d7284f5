//! What users do to runs: reset them to run again, cancel them.

use chrono::Utc;

use crate::change::{Change, ChangeSet, RunChange, TaskChange, TaskExpect};
use crate::error::{Error, Result};
use crate::model::{AnalysisRun, RunStatus, TaskInstance, TaskState};

/// Which tasks a reset runs again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetScope {
    /// Tasks that did not succeed (failed, timed out, cancelled, upstream failed).
    Failed,
    /// Every task.
    All,
}

/// The changes that put finished run `run` back to `ready`, its chosen tasks back to `pending`
/// with a fresh retry budget. Attempt numbers keep counting, so earlier logs stay apart.
pub fn reset(
    run: &AnalysisRun,
    tasks: &[TaskInstance],
    scope: ResetScope,
    by: &str,
) -> Result<ChangeSet> {
    if !run.status.is_finished() {
        return Err(Error::Conflict(format!(
            "run {} is {}; only a finished run can be reset (cancel it first with `butler \
             cancel-run -r {}`)",
            run.id, run.status, run.id
        )));
    }
    let reason = match scope {
        ResetScope::Failed => "reset of the tasks that did not succeed",
        ResetScope::All => "reset of every task",
    };
    let mut changes: ChangeSet = tasks
        .iter()
        .filter(|t| match scope {
            ResetScope::All => t.state != TaskState::Pending,
            ResetScope::Failed => t.state.is_finished() && t.state != TaskState::Succeeded,
        })
        .map(|t| {
            Change::Task(TaskChange {
                expect: TaskExpect::of(t),
                new: TaskInstance {
                    state: TaskState::Pending,
                    failures: 0,
                    token: None,
                    lease_until: None,
                    next_try_at: None,
                    error: None,
                    ..t.clone()
                },
                by: by.to_owned(),
                reason: reason.to_owned(),
            })
        })
        .collect();
    changes.push(Change::Run(RunChange {
        run_id: run.id,
        expect: run.status,
        status: RunStatus::Ready,
        error: None,
        started_at: None,
        ended_at: None,
        by: by.to_owned(),
        reason: reason.to_owned(),
    }));
    Ok(changes)
}

/// The changes that cancel unfinished run `run`: every unfinished task becomes `cancelled`
/// (a running attempt's worker sees its lease refused and kills the command) and the run ends
/// `cancelled`.
pub fn cancel(run: &AnalysisRun, tasks: &[TaskInstance], by: &str) -> Result<ChangeSet> {
    if run.status.is_finished() {
        return Err(Error::Conflict(format!(
            "run {} is already {}; nothing to cancel",
            run.id, run.status
        )));
    }
    let now = Utc::now();
    let mut changes: ChangeSet = tasks
        .iter()
        .filter(|t| !t.state.is_finished())
        .map(|t| {
            Change::Task(TaskChange {
                expect: TaskExpect::of(t),
                new: TaskInstance {
                    state: TaskState::Cancelled,
                    token: None,
                    lease_until: None,
                    next_try_at: None,
                    ended_at: Some(now),
                    error: Some("cancelled by a user".to_owned()),
                    ..t.clone()
                },
                by: by.to_owned(),
                reason: "run cancelled".to_owned(),
            })
        })
        .collect();
    changes.push(Change::Run(RunChange {
        run_id: run.id,
        expect: run.status,
        status: RunStatus::Cancelled,
        error: None,
        started_at: None,
        ended_at: Some(now),
        by: by.to_owned(),
        reason: "cancelled by a user".to_owned(),
    }));
    Ok(changes)
}
