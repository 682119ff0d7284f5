//! [`butler_core::RunStore::apply`] in two statements, whatever the number of change sets: one
//! reads and locks the rows the changes name, the sets are decided in memory, and one writes
//! what applied.
//!
//! The read locks each row with `FOR NO KEY UPDATE`, tasks then runs, each in key order, so the
//! rows stay as read until the transaction ends and two calls touching the same rows wait for
//! each other instead of deadlocking. `NO KEY` leaves the key-share locks that inserting an
//! event (a foreign key to its run) takes free to proceed.

use std::collections::{HashMap, HashSet};

use butler_core::change::{Change, ChangeSet, LeaseChange, RunChange, TaskChange};
use butler_core::model::{Id, RunStatus, TaskInstance, TaskState};
use butler_core::{Error, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use super::super::{Decoded, PgStore};

/// The expectation columns of the tasks named by the arrays `$1` (run ids) and `$2` (task
/// ids), then the status of the runs named by `$3`, in the same columns with a NULL task id.
const READ: &str = "WITH t AS MATERIALIZED (\
                    SELECT t.run_id, t.task_id, t.state, t.try_number, t.token \
                    FROM tasks AS t JOIN unnest($1::bigint[], $2::text[]) AS k (run_id, task_id) \
                    ON t.run_id = k.run_id AND t.task_id = k.task_id \
                    ORDER BY t.run_id, t.task_id FOR NO KEY UPDATE OF t), \
                    r AS MATERIALIZED (\
                    SELECT id, status FROM runs WHERE id = ANY($3) \
                    ORDER BY id FOR NO KEY UPDATE) \
                    SELECT run_id, task_id, state, try_number, token FROM t \
                    UNION ALL \
                    SELECT id, NULL::text, status, NULL::bigint, NULL::bigint FROM r";

/// Every write of one call in one statement, its parameters JSON arrays: whole task rows
/// (`$1`, of [`NewRow`]s), lease ends alone (`$2`, of [`NewLease`]s), run statuses (`$3`, of
/// [`NewRun`]s), then the time of the events (`$4`) and the events (`$5`, of [`NewEvent`]s),
/// inserted in `seq` order so that their ids follow the order of the changes. Answers the
/// number of rows written.
///
/// A task is in at most one of the first two arrays, so no row is written twice.
const WRITE: &str = "WITH task_rows AS (\
                     UPDATE tasks SET state = n.state, try_number = n.try_number, \
                     failures = n.failures, token = n.token, lease_until = n.lease_until, \
                     worker = n.worker, queued_at = n.queued_at, \
                     first_started_at = n.first_started_at, started_at = n.started_at, \
                     ended_at = n.ended_at, next_try_at = n.next_try_at, \
                     exit_code = n.exit_code, error = n.error \
                     FROM json_to_recordset($1::json) AS n (run_id bigint, task_id text, \
                     state text, try_number bigint, failures bigint, token bigint, \
                     lease_until bigint, worker text, queued_at bigint, \
                     first_started_at bigint, started_at bigint, ended_at bigint, \
                     next_try_at bigint, exit_code integer, error text) \
                     WHERE tasks.run_id = n.run_id AND tasks.task_id = n.task_id RETURNING 1), \
                     leases AS (\
                     UPDATE tasks SET lease_until = n.lease_until \
                     FROM json_to_recordset($2::json) AS n (run_id bigint, task_id text, \
                     lease_until bigint) \
                     WHERE tasks.run_id = n.run_id AND tasks.task_id = n.task_id RETURNING 1), \
                     run_rows AS (\
                     UPDATE runs SET status = n.status, error = n.error, \
                     started_at = CASE WHEN n.keep_started THEN runs.started_at \
                     ELSE n.started_at END, ended_at = n.ended_at \
                     FROM json_to_recordset($3::json) AS n (id bigint, status text, error text, \
                     keep_started boolean, started_at bigint, ended_at bigint) \
                     WHERE runs.id = n.id RETURNING 1), \
                     logged AS (\
                     INSERT INTO events \
                     (at, run_id, task_id, try_number, from_state, to_state, by_whom, reason) \
                     SELECT $4, e.run_id, e.task_id, e.try_number, e.from_state, e.to_state, \
                     e.by_whom, e.reason \
                     FROM json_to_recordset($5::json) AS e (seq bigint, run_id bigint, \
                     task_id text, try_number bigint, from_state text, to_state text, \
                     by_whom text, reason text) ORDER BY e.seq RETURNING 1) \
                     SELECT (SELECT count(*) FROM task_rows) + (SELECT count(*) FROM leases) \
                     + (SELECT count(*) FROM run_rows) + (SELECT count(*) FROM logged)";

/// One event to log, as the changes' authors wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NewEvent<'a> {
    run_id: Id,
    task_id: Option<&'a str>,
    try_number: Option<u32>,
    from_state: &'static str,
    to_state: &'static str,
    by_whom: &'a str,
    reason: &'a str,
}

/// A [`NewEvent`] with its place in the call, as the write statement reads it.
#[derive(Debug, Serialize)]
struct LoggedEvent<'a> {
    seq: usize,
    run_id: Id,
    task_id: Option<&'a str>,
    try_number: Option<u32>,
    from_state: &'static str,
    to_state: &'static str,
    by_whom: &'a str,
    reason: &'a str,
}

/// A task's whole new row, times in milliseconds, as the write statement reads it.
#[derive(Debug, Serialize)]
struct NewRow<'a> {
    run_id: Id,
    task_id: &'a str,
    state: &'static str,
    try_number: u32,
    failures: u32,
    token: Option<i64>,
    lease_until: Option<i64>,
    worker: Option<&'a str>,
    queued_at: Option<i64>,
    first_started_at: Option<i64>,
    started_at: Option<i64>,
    ended_at: Option<i64>,
    next_try_at: Option<i64>,
    exit_code: Option<i32>,
    error: Option<&'a str>,
}

/// A lease end alone, in milliseconds.
#[derive(Debug, Serialize)]
struct NewLease<'a> {
    run_id: Id,
    task_id: &'a str,
    lease_until: i64,
}

/// A run's new status: whether the stored start time stays, the start time otherwise and the
/// end time, in milliseconds.
#[derive(Debug, Serialize)]
struct NewRun<'a> {
    id: Id,
    status: &'static str,
    error: Option<&'a str>,
    keep_started: bool,
    started_at: Option<i64>,
    ended_at: Option<i64>,
}

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

/// Applies `sets` on `conn`, inside a transaction the caller commits, logging events at `at`
/// (milliseconds); `doing` names the call in errors.
pub(super) async fn apply(
    store: &PgStore,
    conn: &mut PgConnection,
    sets: &[ChangeSet],
    at: i64,
    doing: &str,
) -> Result<Vec<bool>> {
    let mut rows = Rows::read(store, conn, sets, doing).await?;
    let (applied, events) = rows.decide(sets);
    rows.write(store, conn, &events, at, doing).await?;
    Ok(applied)
}

impl<'a> Rows<'a> {
    /// Reads and locks every task and run that the changes of `sets` name, in one statement.
    async fn read(
        store: &PgStore,
        conn: &mut PgConnection,
        sets: &'a [ChangeSet],
        doing: &str,
    ) -> Result<Rows<'a>> {
        let mut task_runs = Vec::new();
        let mut task_ids = Vec::new();
        let mut seen_tasks = HashSet::new();
        let mut run_ids = Vec::new();
        let mut seen_runs = HashSet::new();
        for change in sets.iter().flatten() {
            let task = match change {
                Change::Task(TaskChange { new, .. }) => (new.run_id, new.task_id.as_str()),
                Change::Lease(LeaseChange {
                    run_id, task_id, ..
                }) => (*run_id, task_id.as_str()),
                Change::Run(RunChange { run_id, .. }) => {
                    if seen_runs.insert(*run_id) {
                        run_ids.push(*run_id);
                    }
                    continue;
                }
            };
            if seen_tasks.insert(task) {
                task_runs.push(task.0);
                task_ids.push(task.1);
            }
        }

        let found = sqlx::query(READ)
            .bind(task_runs)
            .bind(task_ids)
            .bind(run_ids)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| store.fail(doing, e))?;
        let mut rows = Rows::default();
        for row in &found {
            match found_row(row).map_err(|e| store.corrupt("a task or run", e))? {
                Found::Task(run_id, task_id, task) => {
                    rows.tasks.entry(run_id).or_default().insert(task_id, task);
                }
                Found::Run(run_id, run) => {
                    rows.runs.insert(run_id, run);
                }
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

    /// Writes the rows that the applied sets changed and their `events`, in one statement;
    /// does nothing when no set changed anything.
    async fn write(
        &self,
        store: &PgStore,
        conn: &mut PgConnection,
        events: &[NewEvent<'_>],
        at: i64,
        doing: &str,
    ) -> Result<()> {
        let ms = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_millis());
        let mut rows = Vec::new();
        let mut leases = Vec::new();
        for (run_id, tasks) in &self.tasks {
            for (task_id, task) in tasks {
                match task.write {
                    Some(TaskWrite::Row { new, lease_until }) => rows.push(NewRow {
                        run_id: *run_id,
                        task_id,
                        state: new.state.as_str(),
                        try_number: new.try_number,
                        failures: new.failures,
                        token: new.token,
                        lease_until: ms(lease_until),
                        worker: new.worker.as_deref(),
                        queued_at: ms(new.queued_at),
                        first_started_at: ms(new.first_started_at),
                        started_at: ms(new.started_at),
                        ended_at: ms(new.ended_at),
                        next_try_at: ms(new.next_try_at),
                        exit_code: new.exit_code,
                        error: new.error.as_deref(),
                    }),
                    Some(TaskWrite::Lease(until)) => leases.push(NewLease {
                        run_id: *run_id,
                        task_id,
                        lease_until: until.timestamp_millis(),
                    }),
                    None => {}
                }
            }
        }
        let runs: Vec<NewRun<'_>> = self
            .runs
            .iter()
            .filter_map(|(id, run)| {
                let write = run.write?;
                Some(NewRun {
                    id: *id,
                    status: write.status.as_str(),
                    error: write.error,
                    keep_started: write.started_at.is_none(),
                    started_at: ms(write.started_at.flatten()),
                    ended_at: ms(write.ended_at),
                })
            })
            .collect();
        let logged: Vec<LoggedEvent<'_>> = events
            .iter()
            .enumerate()
            .map(|(seq, e)| LoggedEvent {
                seq,
                run_id: e.run_id,
                task_id: e.task_id,
                try_number: e.try_number,
                from_state: e.from_state,
                to_state: e.to_state,
                by_whom: e.by_whom,
                reason: e.reason,
            })
            .collect();
        let expected = rows.len() + leases.len() + runs.len() + logged.len();
        if expected == 0 {
            return Ok(());
        }
        let written: i64 = sqlx::query_scalar(WRITE)
            .bind(encode(&rows, doing)?)
            .bind(encode(&leases, doing)?)
            .bind(encode(&runs, doing)?)
            .bind(at)
            .bind(encode(&logged, doing)?)
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| store.fail(doing, e))?;
        // Each row written was read and locked in this transaction, so a shortfall means the
        // database does not behave as this code assumes; the caller's transaction is dropped,
        // so nothing is committed.
        if u64::try_from(written).ok() == u64::try_from(expected).ok() {
            return Ok(());
        }
        Err(Error::backend(
            format!("cannot {doing}: the transaction was rolled back"),
            format!(
                "{} task row(s), {} lease(s), {} run(s) and {} event(s) were to be written, \
                 but {written} row(s) were; report this as a bug in butler",
                rows.len(),
                leases.len(),
                runs.len(),
                logged.len()
            ),
        ))
    }
}

/// The JSON text bound for one of the arrays above.
fn encode<T: Serialize + ?Sized>(value: &T, doing: &str) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|e| Error::backend(format!("cannot {doing}: a change cannot be encoded"), e))
}

/// A row of [`READ`].
enum Found<'a> {
    Task(Id, String, TaskNow<'a>),
    Run(Id, RunNow<'a>),
}

/// Reads a row of [`READ`]: a task's, or a run's when the task id is NULL.
fn found_row<'a>(row: &PgRow) -> Decoded<Found<'a>> {
    let id: Id = row.try_get(0)?;
    let state: &str = row.try_get(2)?;
    Ok(match row.try_get::<Option<String>, _>(1)? {
        Some(task_id) => Found::Task(
            id,
            task_id,
            TaskNow {
                state: state.parse()?,
                try_number: u32::try_from(row.try_get::<i64, _>(3)?)?,
                token: row.try_get(4)?,
                write: None,
            },
        ),
        None => Found::Run(
            id,
            RunNow {
                status: state.parse()?,
                write: None,
            },
        ),
    })
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
    use butler_core::change::TaskExpect;

    use super::*;

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

    #[test]
    fn rows_are_encoded_with_the_names_the_write_statement_reads() {
        let json = encode(
            &[NewLease {
                run_id: 3,
                task_id: "a",
                lease_until: 5,
            }],
            "test",
        )
        .expect("encode");
        assert_eq!(json, r#"[{"run_id":3,"task_id":"a","lease_until":5}]"#);
        for column in [
            "run_id bigint",
            "lease_until bigint",
            "keep_started boolean",
            "seq bigint",
        ] {
            assert!(WRITE.contains(column), "{column}");
        }
    }
}
