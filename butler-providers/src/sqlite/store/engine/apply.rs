//! [`butler_core::RunStore::apply`]: the rows the changes name are read, the sets are decided
//! in memory, and what applied is written, each row by its primary key with a statement
//! prepared once per connection.
//!
//! It runs on the writer's thread (see `sqlite/writer.rs`) inside the write transaction that
//! thread holds, so the rows read stay as read until they are written, and a call of a thousand
//! sets is one handoff to that thread and back, like a call of one.
//!
//! The writer's connection fires no triggers, so this keeps `run_counts` itself: one statement
//! per workflow, analysis and status whose count the call changed, where the trigger that other
//! connections fire (migration 0008) runs three statements for every run that changes status,
//! a third of the cost of writing the run.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use butler_core::change::ChangeSet;
use butler_core::change::decide::{NewEvent, Rows, TaskWrite};
use butler_core::model::{Id, RunStatus, TaskState};
use butler_core::{Error, Result};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension};
use rustc_hash::FxHashMap;

use super::super::{Context, Decoded};

/// The expectation columns of task (`?1`, `?2`).
const READ_TASK: &str = "SELECT state, try_number, token FROM tasks \
                         WHERE run_id = ?1 AND task_id = ?2";

/// The status, workflow and analysis of run `?1`.
const READ_RUN: &str = "SELECT status, workflow_id, analysis_id FROM runs WHERE id = ?1";

/// Adds `?4` (negative to take away) to the runs counted for workflow `?1`, analysis `?2` and
/// status `?3`. (An upsert would not do: SQLite checks `n >= 0` on the row to insert before it
/// finds the row to update.)
const ADD_TO_COUNT: &str = "UPDATE run_counts SET n = n + ?4 \
                            WHERE workflow_id = ?1 AND analysis_id = ?2 AND status = ?3";

/// The count `?4` of runs of workflow `?1`, analysis `?2` and status `?3`, counted first.
const INSERT_COUNT: &str =
    "INSERT INTO run_counts (workflow_id, analysis_id, status, n) VALUES (?1, ?2, ?3, ?4)";

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
///
/// `OR FAIL`: a constraint that fails leaves what the statement wrote so far instead of undoing
/// it (the writer rolls the whole transaction back on any error), so SQLite keeps no statement
/// journal, a copy of every page the statement and its run-count trigger change, which was the
/// largest part of the update (migration 0008).
const WRITE_RUN: &str = "UPDATE OR FAIL runs SET status = ?2, error = ?3, \
                         started_at = CASE WHEN ?4 THEN started_at ELSE ?5 END, \
                         ended_at = ?6 WHERE id = ?1";

/// Events per `INSERT`, most first: a call's events go in as few statements as these sizes add
/// up to, each statement prepared once per connection. `events` has `AUTOINCREMENT`, for which
/// SQLite reads and writes the table's sequence once per statement, not once per row.
const EVENT_BATCHES: [usize; 6] = [32, 16, 8, 4, 2, 1];

/// [`insert_events`] for each size of [`EVENT_BATCHES`].
static WRITE_EVENTS: LazyLock<[String; EVENT_BATCHES.len()]> =
    LazyLock::new(|| EVENT_BATCHES.map(insert_events));

/// An `INSERT` of `rows` events, each as eight parameters: time, then the fields of
/// [`NewEvent`] in order. The rows go in in the order listed, so their ids follow it.
///
/// `OR FAIL`, as in [`WRITE_RUN`]: a statement of many rows that could abort half way makes
/// SQLite copy every page it changes to a statement journal first; this transaction is rolled
/// back whole on any error instead.
fn insert_events(rows: usize) -> String {
    let row = "(?, ?, ?, ?, ?, ?, ?, ?)";
    format!(
        "INSERT OR FAIL INTO events \
         (at, run_id, task_id, try_number, from_state, to_state, by_whom, reason) VALUES {}",
        vec![row; rows].join(", ")
    )
}

/// Applies `sets` on `conn`, inside a write transaction its caller commits, logging events at
/// `at` (milliseconds).
pub(super) fn apply(
    conn: &Connection,
    sets: &[ChangeSet],
    at: i64,
    cx: Context<'_>,
) -> Result<Vec<bool>> {
    let (mut rows, counted) = read(conn, sets, cx)?;
    let (applied, events) = rows.decide(sets);
    write(conn, &rows, &events, at, cx)?;
    count(conn, &rows, &counted, cx)?;
    Ok(applied)
}

/// Where a run is counted in `run_counts` as read: its workflow, analysis and status.
type Counted = FxHashMap<Id, (Id, Id, RunStatus)>;

/// Reads every task and run that the changes of `sets` name, each by its primary key; answers
/// them with where each run read is counted.
fn read<'a>(
    conn: &Connection,
    sets: &'a [ChangeSet],
    cx: Context<'_>,
) -> Result<(Rows<'a>, Counted)> {
    let (task_keys, run_keys) = Rows::keys(sets);
    let mut rows = Rows::default();
    let mut counted = Counted::with_capacity_and_hasher(run_keys.len(), Default::default());
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
        let (state, try_number) =
            (|| -> Decoded<(TaskState, u32)> { Ok((state.parse()?, u32::try_from(try_number)?)) })(
            )
            .map_err(|e| cx.corrupt("a task", e))?;
        rows.insert_task(run_id, task_id.to_owned(), state, try_number, token);
    }
    let mut read_run = conn.prepare_cached(READ_RUN).map_err(|e| cx.fail(&e))?;
    for run_id in run_keys {
        let found: Option<(String, Id, Id)> = read_run
            .query_row([run_id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .optional()
            .map_err(|e| cx.fail(&e))?;
        if let Some((status, workflow_id, analysis_id)) = found {
            let status = status
                .parse::<RunStatus>()
                .map_err(|e| cx.corrupt("a run", e.into()))?;
            rows.insert_run(run_id, status);
            counted.insert(run_id, (workflow_id, analysis_id, status));
        }
    }
    Ok((rows, counted))
}

/// Moves each run whose status the applied sets changed from its count as read to the count of
/// its new status, with one statement per count that changed.
fn count(conn: &Connection, rows: &Rows<'_>, counted: &Counted, cx: Context<'_>) -> Result<()> {
    let mut changes: BTreeMap<(Id, Id, &str), i64> = BTreeMap::new();
    for (id, write) in rows.run_writes() {
        let Some(&(workflow_id, analysis_id, was)) = counted.get(&id) else {
            continue;
        };
        if write.status != was {
            *changes
                .entry((workflow_id, analysis_id, was.as_str()))
                .or_default() -= 1;
            *changes
                .entry((workflow_id, analysis_id, write.status.as_str()))
                .or_default() += 1;
        }
    }
    for ((workflow_id, analysis_id, status), n) in changes {
        if n == 0 {
            continue;
        }
        let key = (workflow_id, analysis_id, status, n);
        let added = conn
            .prepare_cached(ADD_TO_COUNT)
            .and_then(|mut statement| statement.execute(key))
            .map_err(|e| cx.fail(&e))?;
        // Runs leaving a count that has no row were not counted (the row was deleted by hand):
        // nothing to take away, as the trigger does.
        if added == 0 && n > 0 {
            conn.prepare_cached(INSERT_COUNT)
                .and_then(|mut statement| statement.execute(key))
                .map_err(|e| cx.fail(&e))?;
        }
    }
    Ok(())
}

/// Writes the rows that the applied sets changed and their `events`, each row by its primary
/// key; does nothing when no set changed anything.
fn write(
    conn: &Connection,
    rows: &Rows<'_>,
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
    for (run_id, task_id, write) in rows.task_writes() {
        let changed = match write {
            TaskWrite::Row { new, lease_until } => {
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
            TaskWrite::Lease(until) => {
                let statement = match &mut lease_statement {
                    Some(statement) => statement,
                    None => lease_statement
                        .insert(conn.prepare_cached(WRITE_LEASE).map_err(|e| cx.fail(&e))?),
                };
                statement.execute((run_id, task_id, until.timestamp_millis()))
            }
        }
        .map_err(|e| cx.fail(&e))?;
        one(changed, format!("task {task_id:?} of run {run_id}"))?;
    }
    let mut run_statement = None;
    for (id, write) in rows.run_writes() {
        let statement = match &mut run_statement {
            Some(statement) => statement,
            None => run_statement.insert(conn.prepare_cached(WRITE_RUN).map_err(|e| cx.fail(&e))?),
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
    write_events(conn, events, at, cx)
}

/// Inserts `events` at `at`, in their order, with as few statements as [`EVENT_BATCHES`] allow.
fn write_events(
    conn: &Connection,
    events: &[NewEvent<'_>],
    at: i64,
    cx: Context<'_>,
) -> Result<()> {
    let mut rest = events;
    for (size, sql) in EVENT_BATCHES.iter().zip(WRITE_EVENTS.iter()) {
        if rest.len() < *size {
            continue;
        }
        let mut statement = conn.prepare_cached(sql).map_err(|e| cx.fail(&e))?;
        while rest.len() >= *size {
            let (batch, after) = rest.split_at(*size);
            rest = after;
            let mut index = 0;
            for e in batch {
                let values: [&dyn rusqlite::ToSql; 8] = [
                    &at,
                    &e.run_id,
                    &e.task_id,
                    &e.try_number,
                    &e.from_state,
                    &e.to_state,
                    &e.by_whom,
                    &e.reason,
                ];
                for value in values {
                    index += 1;
                    statement
                        .raw_bind_parameter(index, value)
                        .map_err(|e| cx.fail(&e))?;
                }
            }
            statement.raw_execute().map_err(|e| cx.fail(&e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use butler_core::testing::changes::{at, lease, queued, run_change, running, task_change};
    use std::sync::Arc;

    use butler_core::RunStore;
    use butler_core::change::{Change, RunChange};
    use butler_core::definition::{Definition, Format};
    use butler_core::model::{Id, TaskInstance};
    use butler_core::tracker::{RunSource, Tracker};
    use serde_json::json;

    use super::*;
    use crate::sqlite::SqliteStore;

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

    #[tokio::test]
    async fn a_call_logs_its_events_in_the_order_of_its_changes() {
        // 71 events: statements of 32, 32, 4, 2 and 1 rows.
        let (store, tasks) = launched(71).await;
        let before = store.last_event_id().await.expect("last");
        let sets = tasks
            .iter()
            .rev()
            .map(|t| vec![task_change(t, &queued(t))])
            .collect();
        let applied = store.apply(sets).await.expect("apply");
        assert_eq!(applied, vec![true; 71]);
        let events = store
            .list_events(&butler_core::model::EventFilter {
                not_by_suffix: None,
                run_id: None,
                after: before,
                limit: 100,
            })
            .await
            .expect("events");
        let logged: Vec<(Id, &str, &str)> = events
            .iter()
            .map(|e| (e.run_id, e.from.as_str(), e.to.as_str()))
            .collect();
        let expected: Vec<(Id, &str, &str)> = tasks
            .iter()
            .rev()
            .map(|t| (t.run_id, "pending", "queued"))
            .collect();
        assert_eq!(logged, expected);
        assert!(events.windows(2).all(|w| w[0].id < w[1].id));
    }

    #[tokio::test]
    async fn runs_leaving_a_count_deleted_by_hand_still_move_and_are_counted_where_they_go() {
        let (store, tasks) = launched(3).await;
        sqlx::query("DELETE FROM run_counts")
            .execute(store.pool())
            .await
            .expect("delete the counts");
        let take = |task: &TaskInstance| {
            vec![Change::Run(run_change(
                task.run_id,
                RunStatus::Ready,
                RunStatus::Scheduled,
            ))]
        };
        let applied = store
            .apply(tasks.iter().take(2).map(take).collect())
            .await
            .expect("apply");
        assert_eq!(applied, [true, true]);
        let counts = store
            .count_runs(&butler_core::model::RunFilter::default())
            .await
            .expect("count");
        assert_eq!(
            counts.into_iter().collect::<Vec<_>>(),
            [(RunStatus::Scheduled, 2)],
            "the ready run left uncounted stays so; the moved ones are counted"
        );
    }
}
