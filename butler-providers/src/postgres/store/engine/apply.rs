//! [`butler_core::RunStore::apply`] in two statements, whatever the number of change sets: one
//! reads and locks the rows the changes name, the sets are decided in memory, and one writes
//! what applied.
//!
//! The read locks each row with `FOR NO KEY UPDATE`, tasks then runs, each in key order, so the
//! rows stay as read until the transaction ends and two calls touching the same rows wait for
//! each other instead of deadlocking. `NO KEY` leaves the key-share locks that inserting an
//! event (a foreign key to its run) takes free to proceed.

use butler_core::change::ChangeSet;
use butler_core::change::decide::{NewEvent, Rows, TaskWrite};
use butler_core::model::{Id, RunStatus, TaskState};
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
/// A task is in at most one of the first two arrays, so no row is written twice. The arrays are
/// read through functions that tell the planner to expect a few rows (migration 0008), so that
/// it looks the rows up by key instead of scanning the tables.
const WRITE: &str = "WITH task_rows AS (\
                     UPDATE tasks SET state = n.state, try_number = n.try_number, \
                     failures = n.failures, token = n.token, lease_until = n.lease_until, \
                     worker = n.worker, queued_at = n.queued_at, \
                     first_started_at = n.first_started_at, started_at = n.started_at, \
                     ended_at = n.ended_at, next_try_at = n.next_try_at, \
                     exit_code = n.exit_code, error = n.error \
                     FROM change_task_rows($1::json) AS n \
                     WHERE tasks.run_id = n.run_id AND tasks.task_id = n.task_id RETURNING 1), \
                     leases AS (\
                     UPDATE tasks SET lease_until = n.lease_until \
                     FROM change_task_leases($2::json) AS n \
                     WHERE tasks.run_id = n.run_id AND tasks.task_id = n.task_id RETURNING 1), \
                     run_rows AS (\
                     UPDATE runs SET status = n.status, error = n.error, \
                     started_at = CASE WHEN n.keep_started THEN runs.started_at \
                     ELSE n.started_at END, ended_at = n.ended_at \
                     FROM change_run_rows($3::json) AS n \
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

/// Applies `sets` on `conn`, inside a transaction the caller commits, logging events at `at`
/// (milliseconds); `doing` names the call in errors.
pub(super) async fn apply(
    store: &PgStore,
    conn: &mut PgConnection,
    sets: &[ChangeSet],
    at: i64,
    doing: &str,
) -> Result<Vec<bool>> {
    let mut rows = read(store, conn, sets, doing).await?;
    let (applied, events) = rows.decide(sets);
    write(store, conn, &rows, &events, at, doing).await?;
    Ok(applied)
}

/// Reads and locks every task and run that the changes of `sets` name, in one statement.
async fn read<'a>(
    store: &PgStore,
    conn: &mut PgConnection,
    sets: &'a [ChangeSet],
    doing: &str,
) -> Result<Rows<'a>> {
    let (tasks, run_ids) = Rows::keys(sets);
    let (task_runs, task_ids): (Vec<Id>, Vec<&str>) = tasks.into_iter().unzip();
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
            Found::Task(run_id, task_id, state, try_number, token) => {
                rows.insert_task(run_id, task_id, state, try_number, token);
            }
            Found::Run(run_id, status) => rows.insert_run(run_id, status),
        }
    }
    Ok(rows)
}

/// Writes the rows that the applied sets changed and their `events`, in one statement; does
/// nothing when no set changed anything.
async fn write(
    store: &PgStore,
    conn: &mut PgConnection,
    decided: &Rows<'_>,
    events: &[NewEvent<'_>],
    at: i64,
    doing: &str,
) -> Result<()> {
    let ms = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_millis());
    let mut rows = Vec::new();
    let mut leases = Vec::new();
    for (run_id, task_id, write) in decided.task_writes() {
        match write {
            TaskWrite::Row { new, lease_until } => rows.push(NewRow {
                run_id,
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
            TaskWrite::Lease(until) => leases.push(NewLease {
                run_id,
                task_id,
                lease_until: until.timestamp_millis(),
            }),
        }
    }
    let runs: Vec<NewRun<'_>> = decided
        .run_writes()
        .map(|(id, write)| NewRun {
            id,
            status: write.status.as_str(),
            error: write.error,
            keep_started: write.started_at.is_none(),
            started_at: ms(write.started_at.flatten()),
            ended_at: ms(write.ended_at),
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

/// The JSON text bound for one of the arrays above.
fn encode<T: Serialize + ?Sized>(value: &T, doing: &str) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|e| Error::backend(format!("cannot {doing}: a change cannot be encoded"), e))
}

/// A row of [`READ`].
enum Found {
    /// A task: its run, id, state, try and fencing token.
    Task(Id, String, TaskState, u32, Option<i64>),
    /// A run: its id and status.
    Run(Id, RunStatus),
}

/// Reads a row of [`READ`]: a task's, or a run's when the task id is NULL.
fn found_row(row: &PgRow) -> Decoded<Found> {
    let id: Id = row.try_get(0)?;
    let state: &str = row.try_get(2)?;
    Ok(match row.try_get::<Option<String>, _>(1)? {
        Some(task_id) => Found::Task(
            id,
            task_id,
            state.parse()?,
            u32::try_from(row.try_get::<i64, _>(3)?)?,
            row.try_get(4)?,
        ),
        None => Found::Run(id, state.parse()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Task rows, leases and runs are read by the functions of migration 0008, events by
        // the statement itself.
        let functions = include_str!("../../../../migrations/postgres/0008_change_rows.sql");
        for column in [
            "run_id bigint",
            "lease_until bigint",
            "exit_code integer",
            "keep_started boolean",
        ] {
            assert!(functions.contains(column), "{column}");
        }
        assert!(WRITE.contains("seq bigint"));
    }
}
