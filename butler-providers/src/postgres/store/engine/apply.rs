//! [`butler_core::RunStore::apply`] in two statements, whatever the number of change sets: one
//! reads and locks the rows the changes name, the sets are decided in memory, and one writes
//! what applied.
//!
//! The read locks each row with `FOR NO KEY UPDATE`, tasks then runs, each in key order, so the
//! rows stay as read until the transaction ends and two calls touching the same rows wait for
//! each other instead of deadlocking. `NO KEY` leaves the key-share locks that inserting an
//! event (a foreign key to its run) takes free to proceed.

use butler_core::change::ChangeSet;
use butler_core::change::decide::{NewEvent, Rows, RunWrite, TaskWrite};
use butler_core::model::{Id, RunStatus, TaskInstance, TaskState};
use butler_core::{Error, Result};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::QueryScalar;
use sqlx::{PgConnection, Postgres, Row};

use super::super::{Decoded, PgStore};

/// The expectation columns of the tasks named by the arrays `$1` (run ids) and `$2` (task
/// ids), then the status of the runs named by `$3`, in the same columns with a NULL task id.
/// The keys are read through functions that tell the planner to expect a few rows (migration
/// 0010), so that it looks the rows up by key instead of scanning the tables.
const READ: &str = "WITH t AS MATERIALIZED (\
                    SELECT t.run_id, t.task_id, t.state, t.try_number, t.token \
                    FROM tasks AS t JOIN task_keys($1::bigint[], $2::text[]) AS k \
                    ON t.run_id = k.run_id AND t.task_id = k.task_id \
                    ORDER BY t.run_id, t.task_id FOR NO KEY UPDATE OF t), \
                    r AS MATERIALIZED (\
                    SELECT runs.id, runs.status FROM runs JOIN run_keys($3::bigint[]) AS k \
                    ON runs.id = k.id ORDER BY runs.id FOR NO KEY UPDATE OF runs) \
                    SELECT run_id, task_id, state, try_number, token FROM t \
                    UNION ALL \
                    SELECT id, NULL::text, status, NULL::bigint, NULL::bigint FROM r";

/// Every write of one call in one statement, its parameters arrays of one column each: whole
/// task rows (`$1`–`$15`, the columns of [`TaskRows`]), lease ends alone (`$16`–`$18`, of
/// [`Leases`]), run statuses (`$19`–`$24`, of [`RunRows`]), then the time of the events
/// (`$25`) and the events (`$26`–`$32`, of [`Events`]), inserted in the order given so that
/// their ids follow the order of the changes. Answers the number of rows written.
///
/// A task is in at most one of the first two groups, so no row is written twice. The rows are
/// read through functions that tell the planner to expect a few rows (migration 0010), so that
/// it looks them up by key instead of scanning the tables.
const WRITE: &str = "WITH task_rows AS (\
                     UPDATE tasks SET state = n.state, try_number = n.try_number, \
                     failures = n.failures, token = n.token, lease_until = n.lease_until, \
                     worker = n.worker, queued_at = n.queued_at, \
                     first_started_at = n.first_started_at, started_at = n.started_at, \
                     ended_at = n.ended_at, next_try_at = n.next_try_at, \
                     exit_code = n.exit_code, error = n.error \
                     FROM change_task_rows($1::bigint[], $2::text[], $3::text[], \
                     $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::text[], \
                     $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[], \
                     $14::integer[], $15::text[]) AS n \
                     WHERE tasks.run_id = n.run_id AND tasks.task_id = n.task_id RETURNING 1), \
                     leases AS (\
                     UPDATE tasks SET lease_until = n.lease_until \
                     FROM change_task_leases($16::bigint[], $17::text[], $18::bigint[]) AS n \
                     WHERE tasks.run_id = n.run_id AND tasks.task_id = n.task_id RETURNING 1), \
                     run_rows AS (\
                     UPDATE runs SET status = n.status, error = n.error, \
                     started_at = CASE WHEN n.keep_started THEN runs.started_at \
                     ELSE n.started_at END, ended_at = n.ended_at \
                     FROM change_run_rows($19::bigint[], $20::text[], $21::text[], \
                     $22::boolean[], $23::bigint[], $24::bigint[]) AS n \
                     WHERE runs.id = n.id RETURNING 1), \
                     logged AS (\
                     INSERT INTO events \
                     (at, run_id, task_id, try_number, from_state, to_state, by_whom, reason) \
                     SELECT $25, e.run_id, e.task_id, e.try_number, e.from_state, e.to_state, \
                     e.by_whom, e.reason \
                     FROM unnest($26::bigint[], $27::text[], $28::bigint[], $29::text[], \
                     $30::text[], $31::text[], $32::text[]) WITH ORDINALITY AS e (run_id, \
                     task_id, try_number, from_state, to_state, by_whom, reason, seq) \
                     ORDER BY e.seq RETURNING 1) \
                     SELECT (SELECT count(*) FROM task_rows) + (SELECT count(*) FROM leases) \
                     + (SELECT count(*) FROM run_rows) + (SELECT count(*) FROM logged)";

/// Tasks' whole new rows, one vector per column, times in milliseconds.
#[derive(Debug, Default)]
struct TaskRows<'a> {
    run_id: Vec<Id>,
    task_id: Vec<&'a str>,
    state: Vec<&'static str>,
    try_number: Vec<i64>,
    failures: Vec<i64>,
    token: Vec<Option<i64>>,
    lease_until: Vec<Option<i64>>,
    worker: Vec<Option<&'a str>>,
    queued_at: Vec<Option<i64>>,
    first_started_at: Vec<Option<i64>>,
    started_at: Vec<Option<i64>>,
    ended_at: Vec<Option<i64>>,
    next_try_at: Vec<Option<i64>>,
    exit_code: Vec<Option<i32>>,
    error: Vec<Option<&'a str>>,
}

impl<'a> TaskRows<'a> {
    fn push(
        &mut self,
        run_id: Id,
        task_id: &'a str,
        new: &'a TaskInstance,
        lease_until: Option<DateTime<Utc>>,
    ) {
        self.run_id.push(run_id);
        self.task_id.push(task_id);
        self.state.push(new.state.as_str());
        self.try_number.push(new.try_number.into());
        self.failures.push(new.failures.into());
        self.token.push(new.token);
        self.lease_until.push(ms(lease_until));
        self.worker.push(new.worker.as_deref());
        self.queued_at.push(ms(new.queued_at));
        self.first_started_at.push(ms(new.first_started_at));
        self.started_at.push(ms(new.started_at));
        self.ended_at.push(ms(new.ended_at));
        self.next_try_at.push(ms(new.next_try_at));
        self.exit_code.push(new.exit_code);
        self.error.push(new.error.as_deref());
    }

    /// Binds `$1`–`$15` of [`WRITE`].
    fn bind(self, query: WriteQuery<'a>) -> WriteQuery<'a> {
        query
            .bind(self.run_id)
            .bind(self.task_id)
            .bind(self.state)
            .bind(self.try_number)
            .bind(self.failures)
            .bind(self.token)
            .bind(self.lease_until)
            .bind(self.worker)
            .bind(self.queued_at)
            .bind(self.first_started_at)
            .bind(self.started_at)
            .bind(self.ended_at)
            .bind(self.next_try_at)
            .bind(self.exit_code)
            .bind(self.error)
    }
}

/// Lease ends alone, in milliseconds, one vector per column.
#[derive(Debug, Default)]
struct Leases<'a> {
    run_id: Vec<Id>,
    task_id: Vec<&'a str>,
    lease_until: Vec<i64>,
}

impl<'a> Leases<'a> {
    fn push(&mut self, run_id: Id, task_id: &'a str, until: DateTime<Utc>) {
        self.run_id.push(run_id);
        self.task_id.push(task_id);
        self.lease_until.push(until.timestamp_millis());
    }

    /// Binds `$16`–`$18` of [`WRITE`].
    fn bind(self, query: WriteQuery<'a>) -> WriteQuery<'a> {
        query
            .bind(self.run_id)
            .bind(self.task_id)
            .bind(self.lease_until)
    }
}

/// Runs' new statuses, one vector per column: whether the stored start time stays, the start
/// time otherwise and the end time, in milliseconds.
#[derive(Debug, Default)]
struct RunRows<'a> {
    id: Vec<Id>,
    status: Vec<&'static str>,
    error: Vec<Option<&'a str>>,
    keep_started: Vec<bool>,
    started_at: Vec<Option<i64>>,
    ended_at: Vec<Option<i64>>,
}

impl<'a> RunRows<'a> {
    fn push(&mut self, id: Id, write: RunWrite<'a>) {
        self.id.push(id);
        self.status.push(write.status.as_str());
        self.error.push(write.error);
        self.keep_started.push(write.started_at.is_none());
        self.started_at.push(ms(write.started_at.flatten()));
        self.ended_at.push(ms(write.ended_at));
    }

    /// Binds `$19`–`$24` of [`WRITE`].
    fn bind(self, query: WriteQuery<'a>) -> WriteQuery<'a> {
        query
            .bind(self.id)
            .bind(self.status)
            .bind(self.error)
            .bind(self.keep_started)
            .bind(self.started_at)
            .bind(self.ended_at)
    }
}

/// [`NewEvent`]s in order, one vector per column.
#[derive(Debug, Default)]
struct Events<'a> {
    run_id: Vec<Id>,
    task_id: Vec<Option<&'a str>>,
    try_number: Vec<Option<i64>>,
    from_state: Vec<&'static str>,
    to_state: Vec<&'static str>,
    by_whom: Vec<&'a str>,
    reason: Vec<&'a str>,
}

impl<'a> Events<'a> {
    fn push(&mut self, e: &NewEvent<'a>) {
        self.run_id.push(e.run_id);
        self.task_id.push(e.task_id);
        self.try_number.push(e.try_number.map(i64::from));
        self.from_state.push(e.from_state);
        self.to_state.push(e.to_state);
        self.by_whom.push(e.by_whom);
        self.reason.push(e.reason);
    }

    /// Binds `$26`–`$32` of [`WRITE`].
    fn bind(self, query: WriteQuery<'a>) -> WriteQuery<'a> {
        query
            .bind(self.run_id)
            .bind(self.task_id)
            .bind(self.try_number)
            .bind(self.from_state)
            .bind(self.to_state)
            .bind(self.by_whom)
            .bind(self.reason)
    }
}

/// [`WRITE`] with the parameters bound so far.
type WriteQuery<'q> = QueryScalar<'q, Postgres, i64, PgArguments>;

/// A time in milliseconds.
fn ms(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(|t| t.timestamp_millis())
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
    let mut rows = TaskRows::default();
    let mut leases = Leases::default();
    for (run_id, task_id, write) in decided.task_writes() {
        match write {
            TaskWrite::Row { new, lease_until } => rows.push(run_id, task_id, new, lease_until),
            TaskWrite::Lease(until) => leases.push(run_id, task_id, until),
        }
    }
    let mut runs = RunRows::default();
    for (id, write) in decided.run_writes() {
        runs.push(id, write);
    }
    let mut logged = Events::default();
    for event in events {
        logged.push(event);
    }
    let counts = (
        rows.run_id.len(),
        leases.run_id.len(),
        runs.id.len(),
        logged.run_id.len(),
    );
    let expected = counts.0 + counts.1 + counts.2 + counts.3;
    if expected == 0 {
        return Ok(());
    }
    // In the order of the statement's parameters.
    let query = rows.bind(sqlx::query_scalar(WRITE));
    let query = leases.bind(query);
    let query = runs.bind(query).bind(at);
    let written: i64 = logged
        .bind(query)
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
            counts.0, counts.1, counts.2, counts.3
        ),
    ))
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
