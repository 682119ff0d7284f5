//! How a store decides one call of [`RunStore::apply`](crate::RunStore::apply): it reads the
//! rows the changes name (see [`Rows::keys`]) into [`Rows`] inside its write transaction,
//! [`Rows::decide`]s the sets in memory, one after another, and writes what
//! [`Rows::task_writes`] and [`Rows::run_writes`] list and the events `decide` returned. So
//! every store applies the same compare-and-set rules, and writes each row once per call
//! however many of its sets changed it.

use rustc_hash::{FxHashMap, FxHashSet};

use chrono::{DateTime, Utc};

use super::{Change, ChangeSet, LeaseChange, RunChange, TaskChange};
use crate::model::{Id, RunStatus, TaskInstance, TaskState};

/// One event to log, as the changes' authors wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewEvent<'a> {
    /// The run.
    pub run_id: Id,
    /// The task, for a task's change.
    pub task_id: Option<&'a str>,
    /// The task's try, for a task's change.
    pub try_number: Option<u32>,
    /// The state before.
    pub from_state: &'static str,
    /// The state after.
    pub to_state: &'static str,
    /// Who made the change.
    pub by_whom: &'a str,
    /// Why.
    pub reason: &'a str,
}

/// What the sets applied so far in this call write to one task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TaskWrite<'a> {
    /// The row of the last task change, with the lease end of any later lease change.
    Row {
        /// The task's new row.
        new: &'a TaskInstance,
        /// Its lease end, which a later lease change of the call may have moved.
        lease_until: Option<DateTime<Utc>>,
    },
    /// Only lease changes: the last one's end.
    Lease(DateTime<Utc>),
}

/// A task as the sets applied so far in this call leave it.
#[derive(Debug, Clone, PartialEq)]
struct TaskNow<'a> {
    state: TaskState,
    try_number: u32,
    token: Option<i64>,
    write: Option<TaskWrite<'a>>,
}

/// What the sets applied so far in this call write to one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunWrite<'a> {
    /// The new status.
    pub status: RunStatus,
    /// The new error, if any.
    pub error: Option<&'a str>,
    /// `None` keeps the stored start time; `Some` replaces it, with nothing after a reset.
    pub started_at: Option<Option<DateTime<Utc>>>,
    /// The new end time.
    pub ended_at: Option<DateTime<Utc>>,
}

/// A run as the sets applied so far in this call leave it.
#[derive(Debug, Clone, PartialEq)]
struct RunNow<'a> {
    status: RunStatus,
    write: Option<RunWrite<'a>>,
}

/// How to put back a row that a refused set's earlier change moved.
enum Undo<'a> {
    Task(Id, &'a str, TaskNow<'a>),
    Run(Id, RunNow<'a>),
}

/// The rows that the changes of one call name, found in the store; a change naming a row
/// absent here is refused.
#[derive(Debug, Default)]
pub struct Rows<'a> {
    tasks: FxHashMap<Id, FxHashMap<String, TaskNow<'a>>>,
    runs: FxHashMap<Id, RunNow<'a>>,
}

impl<'a> Rows<'a> {
    /// The tasks (run, task) and the runs that the changes of `sets` name, each once, in the
    /// order first named: the rows to read.
    pub fn keys(sets: &'a [ChangeSet]) -> (Vec<(Id, &'a str)>, Vec<Id>) {
        let mut tasks = Vec::new();
        let mut seen_tasks = FxHashSet::default();
        let mut runs = Vec::new();
        let mut seen_runs = FxHashSet::default();
        for change in sets.iter().flatten() {
            let task = match change {
                Change::Task(TaskChange { new, .. }) => (new.run_id, new.task_id.as_str()),
                Change::Lease(LeaseChange {
                    run_id, task_id, ..
                }) => (*run_id, task_id.as_str()),
                Change::Run(RunChange { run_id, .. }) => {
                    if seen_runs.insert(*run_id) {
                        runs.push(*run_id);
                    }
                    continue;
                }
            };
            if seen_tasks.insert(task) {
                tasks.push(task);
            }
        }
        (tasks, runs)
    }

    /// Adds a task as stored: its state, try and fencing token.
    pub fn insert_task(
        &mut self,
        run_id: Id,
        task_id: String,
        state: TaskState,
        try_number: u32,
        token: Option<i64>,
    ) {
        self.tasks.entry(run_id).or_default().insert(
            task_id,
            TaskNow {
                state,
                try_number,
                token,
                write: None,
            },
        );
    }

    /// Adds a run as stored: its status.
    pub fn insert_run(&mut self, run_id: Id, status: RunStatus) {
        self.runs.insert(
            run_id,
            RunNow {
                status,
                write: None,
            },
        );
    }

    /// The tasks the applied sets changed, with what to write to each.
    pub fn task_writes(&self) -> impl Iterator<Item = (Id, &str, TaskWrite<'a>)> + '_ {
        self.tasks.iter().flat_map(|(run_id, tasks)| {
            tasks
                .iter()
                .filter_map(move |(task_id, task)| Some((*run_id, task_id.as_str(), task.write?)))
        })
    }

    /// The runs the applied sets changed, with what to write to each.
    pub fn run_writes(&self) -> impl Iterator<Item = (Id, RunWrite<'a>)> + '_ {
        self.runs
            .iter()
            .filter_map(|(id, run)| Some((*id, run.write?)))
    }

    /// Walks `sets` in order, applying each set whose every change holds against the rows as
    /// the earlier sets left them; answers which sets applied and the events they log, in order.
    pub fn decide(&mut self, sets: &'a [ChangeSet]) -> (Vec<bool>, Vec<NewEvent<'a>>) {
        let mut applied = Vec::with_capacity(sets.len());
        let mut events = Vec::new();
        let mut undo = Vec::new();
        for set in sets {
            let mark = events.len();
            undo.clear();
            let mut ok = true;
            for change in set {
                if !self.apply_change(change, &mut undo) {
                    ok = false;
                    break;
                }
                events.extend(event_of(change));
            }
            if !ok {
                for step in undo.drain(..).rev() {
                    self.restore(step);
                }
                events.truncate(mark);
            }
            applied.push(ok);
        }
        (applied, events)
    }

    /// Applies one change to the rows if its compare-and-set holds, noting how to undo it.
    fn apply_change(&mut self, change: &'a Change, undo: &mut Vec<Undo<'a>>) -> bool {
        match change {
            Change::Task(TaskChange { expect, new, .. }) => {
                let Some(task) = self.task_mut(new.run_id, &new.task_id) else {
                    return false;
                };
                if task.state != expect.state
                    || task.try_number != expect.try_number
                    || task.token != expect.token
                {
                    return false;
                }
                undo.push(Undo::Task(new.run_id, &new.task_id, task.clone()));
                *task = TaskNow {
                    state: new.state,
                    try_number: new.try_number,
                    token: new.token,
                    write: Some(TaskWrite::Row {
                        new,
                        lease_until: new.lease_until,
                    }),
                };
                true
            }
            Change::Lease(LeaseChange {
                run_id,
                task_id,
                token,
                until,
            }) => {
                let Some(task) = self.task_mut(*run_id, task_id) else {
                    return false;
                };
                if task.state != TaskState::Running || task.token != Some(*token) {
                    return false;
                }
                undo.push(Undo::Task(*run_id, task_id, task.clone()));
                task.write = Some(match task.write {
                    Some(TaskWrite::Row { new, .. }) => TaskWrite::Row {
                        new,
                        lease_until: Some(*until),
                    },
                    _ => TaskWrite::Lease(*until),
                });
                true
            }
            Change::Run(change) => {
                let Some(run) = self.runs.get_mut(&change.run_id) else {
                    return false;
                };
                if run.status != change.expect {
                    return false;
                }
                undo.push(Undo::Run(change.run_id, run.clone()));
                let write = if change.status == RunStatus::Ready {
                    // Back to `ready` starts the run afresh.
                    RunWrite {
                        status: RunStatus::Ready,
                        error: None,
                        started_at: Some(None),
                        ended_at: None,
                    }
                } else {
                    RunWrite {
                        status: change.status,
                        error: change.error.as_deref(),
                        // No start time keeps the one the earlier changes left.
                        started_at: match change.started_at {
                            Some(at) => Some(Some(at)),
                            None => run.write.and_then(|w| w.started_at),
                        },
                        ended_at: change.ended_at,
                    }
                };
                *run = RunNow {
                    status: change.status,
                    write: Some(write),
                };
                true
            }
        }
    }

    fn restore(&mut self, step: Undo<'a>) {
        match step {
            Undo::Task(run_id, task_id, old) => {
                if let Some(task) = self.task_mut(run_id, task_id) {
                    *task = old;
                }
            }
            Undo::Run(run_id, old) => {
                self.runs.insert(run_id, old);
            }
        }
    }

    fn task_mut(&mut self, run_id: Id, task_id: &str) -> Option<&mut TaskNow<'a>> {
        self.tasks.get_mut(&run_id)?.get_mut(task_id)
    }
}

/// The event an applied change logs; lease changes log none.
fn event_of(change: &Change) -> Option<NewEvent<'_>> {
    match change {
        Change::Task(TaskChange {
            expect,
            new,
            by,
            reason,
        }) => Some(NewEvent {
            run_id: new.run_id,
            task_id: Some(new.task_id.as_str()),
            try_number: Some(new.try_number),
            from_state: expect.state.as_str(),
            to_state: new.state.as_str(),
            by_whom: by,
            reason,
        }),
        Change::Run(RunChange {
            run_id,
            expect,
            status,
            by,
            reason,
            ..
        }) => Some(NewEvent {
            run_id: *run_id,
            task_id: None,
            try_number: None,
            from_state: expect.as_str(),
            to_state: status.as_str(),
            by_whom: by,
            reason,
        }),
        Change::Lease(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::changes::{at, lease, queued, run_change, running, task_change};

    fn rows(tasks: &[&TaskInstance], runs: &[(Id, RunStatus)]) -> Rows<'static> {
        let mut rows = Rows::default();
        for task in tasks {
            rows.insert_task(
                task.run_id,
                task.task_id.clone(),
                task.state,
                task.try_number,
                task.token,
            );
        }
        for (id, status) in runs {
            rows.insert_run(*id, *status);
        }
        rows
    }

    fn transitions(events: &[NewEvent<'_>]) -> Vec<(Id, Option<String>, String)> {
        events
            .iter()
            .map(|e| {
                (
                    e.run_id,
                    e.task_id.map(str::to_owned),
                    format!("{}>{}", e.from_state, e.to_state),
                )
            })
            .collect()
    }

    #[test]
    fn a_later_set_sees_what_an_earlier_set_of_the_call_did() {
        let pending = TaskInstance::pending(1, "a");
        let queued = queued(&pending);
        let running = running(&queued, 7);
        let sets = vec![
            vec![task_change(&pending, &queued)],
            // A second author who read the same pending row is too late.
            vec![task_change(&pending, &queued)],
            vec![task_change(&queued, &running)],
        ];
        let mut rows = rows(&[&pending], &[]);
        let (applied, events) = rows.decide(&sets);
        assert_eq!(applied, [true, false, true]);
        assert_eq!(
            transitions(&events),
            [
                (1, Some("a".into()), "pending>queued".into()),
                (1, Some("a".into()), "queued>running".into())
            ]
        );
        let task = &rows.tasks[&1]["a"];
        assert_eq!(
            (task.state, task.try_number, task.token),
            (TaskState::Running, 1, Some(7))
        );
        assert_eq!(
            task.write,
            Some(TaskWrite::Row {
                new: &running,
                lease_until: running.lease_until
            }),
            "only the last row of the task is written"
        );
    }

    #[test]
    fn a_refused_set_undoes_its_earlier_changes_and_logs_nothing() {
        let a = TaskInstance::pending(1, "a");
        let b = TaskInstance::pending(1, "b");
        let stale_b = queued(&b);
        let sets = vec![
            vec![
                task_change(&a, &queued(&a)),
                Change::Run(run_change(1, RunStatus::Ready, RunStatus::Scheduled)),
                task_change(&stale_b, &running(&stale_b, 3)),
            ],
            // The refused set left `a` pending and the run ready.
            vec![Change::Run(run_change(
                1,
                RunStatus::Ready,
                RunStatus::Cancelled,
            ))],
        ];
        let mut rows = rows(&[&a, &b], &[(1, RunStatus::Ready)]);
        let (applied, events) = rows.decide(&sets);
        assert_eq!(applied, [false, true]);
        assert_eq!(
            transitions(&events),
            [(1, None, "ready>cancelled".into())],
            "only the applied set logs"
        );
        let a_now = &rows.tasks[&1]["a"];
        assert_eq!((a_now.state, a_now.write), (TaskState::Pending, None));
        assert_eq!(rows.runs[&1].status, RunStatus::Cancelled);
    }

    #[test]
    fn changes_naming_rows_not_found_are_refused() {
        let a = TaskInstance::pending(1, "a");
        let ghost = TaskInstance::pending(1, "ghost");
        let sets = vec![
            vec![task_change(&ghost, &queued(&ghost))],
            vec![Change::Run(run_change(
                9,
                RunStatus::Ready,
                RunStatus::Scheduled,
            ))],
            vec![lease(&ghost, 1, at(5))],
            vec![],
        ];
        let mut rows = rows(&[&a], &[(1, RunStatus::Ready)]);
        let (applied, events) = rows.decide(&sets);
        assert_eq!(applied, [false, false, false, true]);
        assert!(events.is_empty());
    }

    #[test]
    fn leases_need_the_running_holder_and_ride_on_a_row_written_in_the_call() {
        let queued = queued(&TaskInstance::pending(1, "a"));
        let other = running(&TaskInstance::pending(2, "b"), 4);
        let running = running(&queued, 7);
        let sets = vec![
            // Not running yet.
            vec![lease(&queued, 7, at(10))],
            vec![task_change(&queued, &running)],
            vec![lease(&running, 7, at(20))],
            // Not the holder.
            vec![lease(&running, 8, at(30))],
            vec![lease(&other, 4, at(40))],
            vec![lease(&other, 4, at(50))],
        ];
        let mut rows = rows(&[&queued, &other], &[]);
        let (applied, events) = rows.decide(&sets);
        assert_eq!(applied, [false, true, true, false, true, true]);
        assert_eq!(events.len(), 1, "lease changes log no event");
        assert_eq!(
            rows.tasks[&1]["a"].write,
            Some(TaskWrite::Row {
                new: &running,
                lease_until: Some(at(20))
            }),
            "the lease extended after the attempt started is written with its row"
        );
        assert_eq!(
            rows.tasks[&2]["b"].write,
            Some(TaskWrite::Lease(at(50))),
            "a lease alone writes only the last lease end"
        );
    }

    #[test]
    fn run_changes_in_one_call_add_up_as_if_applied_one_by_one() {
        let start = RunChange {
            started_at: Some(at(1)),
            ..run_change(1, RunStatus::Scheduled, RunStatus::InProgress)
        };
        let fail = RunChange {
            error: Some("task a failed".into()),
            ended_at: Some(at(2)),
            ..run_change(1, RunStatus::InProgress, RunStatus::Error)
        };
        let sets = vec![
            vec![Change::Run(run_change(
                1,
                RunStatus::Ready,
                RunStatus::Scheduled,
            ))],
            vec![Change::Run(start)],
            vec![Change::Run(fail)],
            vec![Change::Run(run_change(
                2,
                RunStatus::Scheduled,
                RunStatus::InProgress,
            ))],
            vec![Change::Run(run_change(
                3,
                RunStatus::Error,
                RunStatus::Ready,
            ))],
            vec![Change::Run(run_change(
                3,
                RunStatus::Ready,
                RunStatus::Scheduled,
            ))],
        ];
        let mut rows = rows(
            &[],
            &[
                (1, RunStatus::Ready),
                (2, RunStatus::Scheduled),
                (3, RunStatus::Error),
            ],
        );
        let (applied, events) = rows.decide(&sets);
        assert_eq!(applied, [true; 6]);
        assert_eq!(events.len(), 6);
        assert_eq!(
            rows.runs[&1].write,
            Some(RunWrite {
                status: RunStatus::Error,
                error: Some("task a failed"),
                started_at: Some(Some(at(1))),
                ended_at: Some(at(2)),
            }),
            "the start time of an earlier change is kept by a later one without one"
        );
        assert_eq!(
            rows.runs[&2].write.map(|w| w.started_at),
            Some(None),
            "no start time keeps the stored one"
        );
        assert_eq!(
            rows.runs[&3].write.map(|w| w.started_at),
            Some(Some(None)),
            "a reset clears the start time, and a later change without one keeps it cleared"
        );
    }
}
