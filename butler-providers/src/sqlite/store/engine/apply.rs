//! [`butler_core::RunStore::apply`]: the rows the changes name are read, the sets are decided
//! in memory, and what applied is written, each row by its primary key with a statement
//! prepared once per connection.
//!
//! It runs on the writer's thread (see `sqlite/writer.rs`) inside the write transaction that
//! thread holds, so the rows read stay as read until they are written, and a call of a thousand
//! sets is one handoff to that thread and back, like a call of one.

use std::collections::{HashMap, HashSet};

use butler_core::change::{Change, ChangeSet, LeaseChange, RunChange, TaskChange};
use butler_core::model::{Id, RunStatus, TaskInstance, TaskState};
use butler_core::{BoxError, Error, Result};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension};

use super::super::Decoded;
use crate::sqlite::writer::sqlite_error;

/// The expectation columns of task (`?1`, `?2`).
const READ_TASK: &str = "SELECT state, try_number, token FROM tasks \
                         WHERE run_id = ?1 AND task_id = ?2";

/// The status of run `?1`.
const READ_RUN: &str = "SELECT status FROM runs WHERE id = ?1";

/// A task's whole row: task (`?1`, `?2`), then its columns in the order of [`NewRow`].
const WRITE_ROW: &str = "UPDATE tasks SET state = ?3, try_number = ?4, failures = ?5, \
                         token = ?6, lease_until = ?7, worker = ?8, queued_at = ?9, \
                         first_started_at = ?10, started_at = ?11, ended_at = ?12, \
                         next_try_at = ?13, exit_code = ?14, error = ?15 \
                         WHERE run_id = ?1 AND task_id = ?2";

/// The lease end `?3` alone of task (`?1`, `?2`).
const WRITE_LEASE: &str = "UPDATE tasks SET lease_until = ?3 WHERE run_id = ?1 AND task_id = ?2";

/// Run `?1`'s status `?2` and error `?3`; its start time becomes `?5` unless `?4` keeps the
/// stored one; its end time becomes `?6`.
const WRITE_RUN: &str = "UPDATE runs SET status = ?2, error = ?3, \
                         started_at = CASE WHEN ?4 THEN started_at ELSE ?5 END, \
                         ended_at = ?6 WHERE id = ?1";

/// One event at time `?1`, the rest in the order of [`NewEvent`]. Events are inserted in the
/// order of the changes, so their ids follow it.
const WRITE_EVENT: &str = "INSERT INTO events \
                           (at, run_id, task_id, try_number, from_state, to_state, by_whom, \
                           reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

/// One event to log: `[run_id, task_id, try_number, from, to, by, reason]`.
type NewEvent<'a> = (
    Id,
    Option<&'a str>,
    Option<u32>,
    &'static str,
    &'static str,
    &'a str,
    &'a str,
);

/// What the sets applied so far in this call write to one task.
#[derive(Debug, Clone, Copy, PartialEq)]
enum TaskWrite<'a> {
    /// The row of the last task change, with the lease end of any later lease change.
    Row {
        new: &'a TaskInstance,
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
struct RunWrite<'a> {
    status: RunStatus,
    error: Option<&'a str>,
    /// `None` keeps the stored start time; `Some` replaces it, with nothing after a reset.
    started_at: Option<Option<DateTime<Utc>>>,
    ended_at: Option<DateTime<Utc>>,
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
struct Rows<'a> {
    tasks: HashMap<Id, HashMap<String, TaskNow<'a>>>,
    runs: HashMap<Id, RunNow<'a>>,
}

/// Where a call runs and what it does, for its errors.
#[derive(Debug, Clone, Copy)]
pub(super) struct Context<'c> {
    /// The database, as named in messages.
    pub location: &'c str,
    /// The call, as named in messages.
    pub doing: &'c str,
}

impl Context<'_> {
    fn fail(&self, err: &rusqlite::Error) -> Error {
        sqlite_error(self.location, self.doing, err)
    }

    fn corrupt(&self, what: &str, source: BoxError) -> Error {
        Error::backend(
            format!(
                "{what} in {} cannot be read; the database may have been changed by hand or \
                 by a newer butler",
                self.location
            ),
            source,
        )
    }
}

/// Applies `sets` on `conn`, inside a write transaction its caller commits, logging events at
/// `at` (milliseconds).
pub(super) fn apply(
    conn: &Connection,
    sets: &[ChangeSet],
    at: i64,
    cx: Context<'_>,
) -> Result<Vec<bool>> {
    let mut rows = Rows::read(conn, sets, cx)?;
    let (applied, events) = rows.decide(sets);
    rows.write(conn, &events, at, cx)?;
    Ok(applied)
}

impl<'a> Rows<'a> {
    /// Reads every task and run that the changes of `sets` name, in one statement.
    fn read(conn: &Connection, sets: &'a [ChangeSet], cx: Context<'_>) -> Result<Rows<'a>> {
        let mut task_keys = Vec::new();
        let mut seen_tasks = HashSet::new();
        let mut run_keys = Vec::new();
        let mut seen_runs = HashSet::new();
        for change in sets.iter().flatten() {
            let task = match change {
                Change::Task(TaskChange { new, .. }) => (new.run_id, new.task_id.as_str()),
                Change::Lease(LeaseChange {
                    run_id, task_id, ..
                }) => (*run_id, task_id.as_str()),
                Change::Run(RunChange { run_id, .. }) => {
                    if seen_runs.insert(*run_id) {
                        run_keys.push(*run_id);
                    }
                    continue;
                }
            };
            if seen_tasks.insert(task) {
                task_keys.push(task);
            }
        }

        let mut rows = Rows::default();
        let mut read_task = conn.prepare_cached(READ_TASK).map_err(|e| cx.fail(&e))?;
        for (run_id, task_id) in task_keys {
            let found: Option<(String, i64, Option<i64>)> = read_task
                .query_row((run_id, task_id), |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .optional()
                .map_err(|e| cx.fail(&e))?;
            let Some((state, try_number, token)) = found else {
                continue;
            };
            let task = (|| -> Decoded<TaskNow<'a>> {
                Ok(TaskNow {
                    state: state.parse()?,
                    try_number: u32::try_from(try_number)?,
                    token,
                    write: None,
                })
            })()
            .map_err(|e| cx.corrupt("a task", e))?;
            rows.tasks
                .entry(run_id)
                .or_default()
                .insert(task_id.to_owned(), task);
        }
        let mut read_run = conn.prepare_cached(READ_RUN).map_err(|e| cx.fail(&e))?;
        for run_id in run_keys {
            let found: Option<String> = read_run
                .query_row([run_id], |row| row.get(0))
                .optional()
                .map_err(|e| cx.fail(&e))?;
            if let Some(status) = found {
                let status = status
                    .parse::<RunStatus>()
                    .map_err(|e| cx.corrupt("a run", e.into()))?;
                rows.runs.insert(
                    run_id,
                    RunNow {
                        status,
                        write: None,
                    },
                );
            }
        }
        Ok(rows)
    }

    /// Walks `sets` in order, applying each set whose every change holds against the rows as
    /// the earlier sets left them; answers which sets applied and the events they log, in order.
    fn decide(&mut self, sets: &'a [ChangeSet]) -> (Vec<bool>, Vec<NewEvent<'a>>) {
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

    /// Writes the rows that the applied sets changed and their `events`, each row by its
    /// primary key; does nothing when no set changed anything.
    fn write(
        &self,
        conn: &Connection,
        events: &[NewEvent<'_>],
        at: i64,
        cx: Context<'_>,
    ) -> Result<()> {
        let ms = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_millis());
        // Each row written was read in this transaction, which holds the write lock, so a row
        // not found means the database does not behave as this code assumes; the error makes
        // the writer roll this call's writes back.
        let one = |changed: usize, what: String| -> Result<()> {
            if changed == 1 {
                return Ok(());
            }
            Err(Error::backend(
                format!("cannot {}: the transaction was rolled back", cx.doing),
                format!("{what} was read but not written; report this as a bug in butler"),
            ))
        };
        let mut row_statement = None;
        let mut lease_statement = None;
        for (run_id, tasks) in &self.tasks {
            for (task_id, task) in tasks {
                let changed = match task.write {
                    Some(TaskWrite::Row { new, lease_until }) => {
                        let statement = match &mut row_statement {
                            Some(statement) => statement,
                            None => row_statement
                                .insert(conn.prepare_cached(WRITE_ROW).map_err(|e| cx.fail(&e))?),
                        };
                        statement.execute(rusqlite::params![
                            run_id,
                            task_id,
                            new.state.as_str(),
                            new.try_number,
                            new.failures,
                            new.token,
                            ms(lease_until),
                            new.worker.as_deref(),
                            ms(new.queued_at),
                            ms(new.first_started_at),
                            ms(new.started_at),
                            ms(new.ended_at),
                            ms(new.next_try_at),
                            new.exit_code,
                            new.error.as_deref(),
                        ])
                    }
                    Some(TaskWrite::Lease(until)) => {
                        let statement = match &mut lease_statement {
                            Some(statement) => statement,
                            None => lease_statement
                                .insert(conn.prepare_cached(WRITE_LEASE).map_err(|e| cx.fail(&e))?),
                        };
                        statement.execute((run_id, task_id, until.timestamp_millis()))
                    }
                    None => continue,
                }
                .map_err(|e| cx.fail(&e))?;
                one(changed, format!("task {task_id:?} of run {run_id}"))?;
            }
        }
        let mut run_statement = None;
        for (id, run) in &self.runs {
            let Some(write) = run.write else {
                continue;
            };
            let statement = match &mut run_statement {
                Some(statement) => statement,
                None => {
                    run_statement.insert(conn.prepare_cached(WRITE_RUN).map_err(|e| cx.fail(&e))?)
                }
            };
            let changed = statement
                .execute((
                    id,
                    write.status.as_str(),
                    write.error,
                    write.started_at.is_none(),
                    ms(write.started_at.flatten()),
                    ms(write.ended_at),
                ))
                .map_err(|e| cx.fail(&e))?;
            one(changed, format!("run {id}"))?;
        }
        if !events.is_empty() {
            let mut statement = conn.prepare_cached(WRITE_EVENT).map_err(|e| cx.fail(&e))?;
            for (run_id, task_id, try_number, from, to, by, reason) in events {
                statement
                    .execute((at, run_id, task_id, try_number, from, to, by, reason))
                    .map_err(|e| cx.fail(&e))?;
            }
        }
        Ok(())
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
        }) => Some((
            new.run_id,
            Some(new.task_id.as_str()),
            Some(new.try_number),
            expect.state.as_str(),
            new.state.as_str(),
            by.as_str(),
            reason.as_str(),
        )),
        Change::Run(RunChange {
            run_id,
            expect,
            status,
            by,
            reason,
            ..
        }) => Some((
            *run_id,
            None,
            None,
            expect.as_str(),
            status.as_str(),
            by.as_str(),
            reason.as_str(),
        )),
        Change::Lease(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use butler_core::RunStore;
    use butler_core::change::TaskExpect;
    use butler_core::definition::{Definition, Format};
    use butler_core::tracker::{RunSource, Tracker};
    use serde_json::json;

    use super::*;
    use crate::sqlite::SqliteStore;

    /// Times the store keeps exactly: whole milliseconds.
    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_700_000_000_000 + ms).expect("in range")
    }

    fn rows(tasks: &[&TaskInstance], runs: &[(Id, RunStatus)]) -> Rows<'static> {
        let mut rows = Rows::default();
        for task in tasks {
            rows.tasks.entry(task.run_id).or_default().insert(
                task.task_id.clone(),
                TaskNow {
                    state: task.state,
                    try_number: task.try_number,
                    token: task.token,
                    write: None,
                },
            );
        }
        for (id, status) in runs {
            rows.runs.insert(
                *id,
                RunNow {
                    status: *status,
                    write: None,
                },
            );
        }
        rows
    }

    fn task_change(from: &TaskInstance, new: &TaskInstance) -> Change {
        Change::Task(TaskChange {
            expect: TaskExpect::of(from),
            new: new.clone(),
            by: "test".into(),
            reason: format!("to {}", new.state),
        })
    }

    fn run_change(run_id: Id, expect: RunStatus, status: RunStatus) -> RunChange {
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

    fn lease(task: &TaskInstance, token: i64, until: DateTime<Utc>) -> Change {
        Change::Lease(LeaseChange {
            run_id: task.run_id,
            task_id: task.task_id.clone(),
            token,
            until,
        })
    }

    fn queued(task: &TaskInstance) -> TaskInstance {
        TaskInstance {
            state: TaskState::Queued,
            try_number: task.try_number + 1,
            queued_at: Some(at(0)),
            ..task.clone()
        }
    }

    fn running(task: &TaskInstance, token: i64) -> TaskInstance {
        TaskInstance {
            state: TaskState::Running,
            token: Some(token),
            lease_until: Some(at(60_000)),
            worker: Some("host/1".into()),
            started_at: Some(at(1)),
            ..task.clone()
        }
    }

    fn transitions(events: &[NewEvent<'_>]) -> Vec<(Id, Option<String>, String)> {
        events
            .iter()
            .map(|e| (e.0, e.1.map(str::to_owned), format!("{}>{}", e.3, e.4)))
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

    /// A store with `runs` one-task runs, and their tasks.
    async fn launched(runs: usize) -> (SqliteStore, Vec<TaskInstance>) {
        let store = SqliteStore::connect("sqlite::memory:").await.expect("open");
        let tracker = Tracker::new(Arc::new(store.clone()));
        let definition = Definition::parse(
            "[[tasks]]\nid = \"a\"\nrun = \"true\"\n",
            Format::Toml,
            "t.toml",
        )
        .expect("definition");
        let workflow = tracker
            .create_workflow("w", "1", json!({}), definition)
            .await
            .expect("workflow");
        let analysis = tracker
            .create_analysis("an", at(0).date_naive(), json!({}))
            .await
            .expect("analysis");
        let sources = (0..runs)
            .map(|n| RunSource {
                source: None,
                config: json!({ "n": n }),
            })
            .collect();
        let runs = tracker
            .launch(workflow.id, analysis.id, sources, false)
            .await
            .expect("launch");
        let ids: Vec<Id> = runs.iter().map(|r| r.id).collect();
        let tasks = store.list_tasks(&ids).await.expect("tasks");
        (store, tasks)
    }

    #[tokio::test]
    async fn one_call_stores_what_its_sets_did_one_after_another() {
        let (store, tasks) = launched(2).await;
        let (first, second) = (&tasks[0], &tasks[1]);
        let queued = queued(first);
        let running = running(&queued, 7);
        let start = RunChange {
            started_at: Some(at(1)),
            ..run_change(first.run_id, RunStatus::Scheduled, RunStatus::InProgress)
        };
        let applied = store
            .apply(vec![
                vec![
                    task_change(first, &queued),
                    Change::Run(run_change(
                        first.run_id,
                        RunStatus::Ready,
                        RunStatus::Scheduled,
                    )),
                ],
                vec![task_change(first, &queued)],
                vec![task_change(&queued, &running), Change::Run(start)],
                vec![lease(&running, 7, at(90_000))],
                // Refused as a whole: the second task is not queued.
                vec![lease(&running, 7, at(99_000)), task_change(&queued, second)],
                vec![lease(second, 1, at(5))],
            ])
            .await
            .expect("apply");
        assert_eq!(applied, [true, false, true, true, false, false]);
        let now = store
            .list_tasks(&[first.run_id, second.run_id])
            .await
            .expect("tasks");
        assert_eq!(
            now,
            [
                TaskInstance {
                    lease_until: Some(at(90_000)),
                    ..running.clone()
                },
                second.clone()
            ]
        );
        let run = store.get_run(first.run_id).await.expect("run");
        assert_eq!(
            (run.status, run.started_at),
            (RunStatus::InProgress, Some(at(1)))
        );
        let events = store
            .list_events(&butler_core::model::EventFilter {
                not_by_suffix: None,
                run_id: None,
                after: 0,
                limit: 10,
            })
            .await
            .expect("events");
        assert_eq!(
            events
                .iter()
                .map(|e| format!("{}>{}", e.from, e.to))
                .collect::<Vec<_>>(),
            [
                "pending>queued",
                "ready>scheduled",
                "queued>running",
                "scheduled>in-progress"
            ],
            "one event per applied change, in the order of the sets"
        );

        // A run that failed, reset and scheduled again in one call starts afresh.
        let fail = RunChange {
            error: Some("a failed".into()),
            ended_at: Some(at(3)),
            ..run_change(first.run_id, RunStatus::InProgress, RunStatus::Error)
        };
        let applied = store
            .apply(vec![
                vec![Change::Run(fail)],
                vec![Change::Run(run_change(
                    first.run_id,
                    RunStatus::Error,
                    RunStatus::Ready,
                ))],
                vec![Change::Run(run_change(
                    first.run_id,
                    RunStatus::Ready,
                    RunStatus::Scheduled,
                ))],
            ])
            .await
            .expect("apply");
        assert_eq!(applied, [true; 3]);
        let run = store.get_run(first.run_id).await.expect("run");
        assert_eq!(
            (run.status, run.error, run.started_at, run.ended_at),
            (RunStatus::Scheduled, None, None, None)
        );
    }
}
