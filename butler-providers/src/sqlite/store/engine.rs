//! The engine's tables: task instances, compare-and-set change batches and the event log.

use std::collections::HashSet;

use butler_core::change::{Change, ChangeSet, LeaseChange, RunChange, TaskChange};
use butler_core::model::{Event, EventFilter, Id, RunStatus, TaskInstance, TaskState};
use butler_core::{Error, Result};
use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use super::{Decoded, SqliteStore, from_ms, now_ms, opt_from_ms};

/// The columns of `tasks` in the order [`task_from_row`] reads them.
const TASK_COLUMNS: &str = "run_id, task_id, state, try_number, failures, token, lease_until, \
                            worker, queued_at, first_started_at, started_at, ended_at, \
                            next_try_at, exit_code, error";

/// The columns of `events` in the order [`event_from_row`] reads them.
const EVENT_COLUMNS: &str =
    "id, at, run_id, task_id, try_number, from_state, to_state, by_whom, reason";

/// A task change: the whole row, if the task is still as expected.
const UPDATE_TASK: &str = "UPDATE tasks SET state = ?, try_number = ?, failures = ?, token = ?, \
                           lease_until = ?, worker = ?, queued_at = ?, first_started_at = ?, \
                           started_at = ?, ended_at = ?, next_try_at = ?, exit_code = ?, error = ? \
                           WHERE run_id = ? AND task_id = ? AND state = ? AND try_number = ? \
                           AND token IS ?";

/// A run change to any status but `ready`.
const UPDATE_RUN: &str = "UPDATE runs SET status = ?, error = ?, \
                          started_at = coalesce(?, started_at), ended_at = ? \
                          WHERE id = ? AND status = ?";

/// A run change back to `ready`, which starts the run afresh.
const RESET_RUN: &str = "UPDATE runs SET status = 'ready', error = NULL, started_at = NULL, \
                         ended_at = NULL WHERE id = ? AND status = ?";

/// A lease change.
const EXTEND_LEASE: &str = "UPDATE tasks SET lease_until = ? \
                            WHERE run_id = ? AND task_id = ? AND state = 'running' AND token = ?";

/// The events of one `apply`, from a JSON array of `[run_id, task_id, try_number, from, to,
/// by, reason]` arrays: one statement whatever their number, so it is prepared once.
const INSERT_EVENTS: &str = "INSERT INTO events \
                             (at, run_id, task_id, try_number, from_state, to_state, by_whom, reason) \
                             SELECT ?, e.value ->> 0, e.value ->> 1, e.value ->> 2, e.value ->> 3, \
                             e.value ->> 4, e.value ->> 5, e.value ->> 6 \
                             FROM json_each(?) AS e ORDER BY e.key";

/// The tasks of a launch: every task of a JSON array of ids for each run id from the first to
/// the last.
const INSERT_TASKS: &str = "WITH RECURSIVE ids (id) AS \
                            (SELECT ? UNION ALL SELECT id + 1 FROM ids WHERE id < ?) \
                            INSERT INTO tasks (run_id, task_id, position) \
                            SELECT ids.id, t.value, t.key FROM ids, json_each(?) AS t";

/// Savepoint around a set of several changes, so that a refused change undoes the set's others.
const SAVEPOINT: &str = "SAVEPOINT change_set";
const RELEASE: &str = "RELEASE change_set";
const ROLLBACK: &str = "ROLLBACK TO change_set";

/// One event to log: `(run_id, task_id, try_number, from, to, by, reason)`.
type NewEvent<'a> = (
    Id,
    Option<&'a str>,
    Option<u32>,
    &'static str,
    &'static str,
    &'a str,
    &'a str,
);

impl SqliteStore {
    /// [`butler_core::RunStore::apply`]: every set in one `BEGIN IMMEDIATE` transaction.
    pub(super) async fn apply_sets(&self, sets: Vec<ChangeSet>) -> Result<Vec<bool>> {
        if sets.is_empty() {
            return Ok(Vec::new());
        }
        let changes: usize = sets.iter().map(Vec::len).sum();
        let doing = format!("apply {changes} change(s) in {} set(s)", sets.len());
        let at = now_ms();
        let mut tx = self.begin_write(&doing).await?;
        let mut applied = Vec::with_capacity(sets.len());
        let mut events = Vec::with_capacity(changes);
        for set in &sets {
            let ok = apply_set(&mut tx, set, &mut events)
                .await
                .map_err(|e| self.fail(&doing, e))?;
            applied.push(ok);
        }
        if !events.is_empty() {
            let json = serde_json::to_string(&events)
                .map_err(|e| Error::backend(format!("cannot {doing}: bad event"), e))?;
            sqlx::query(INSERT_EVENTS)
                .bind(at)
                .bind(json)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.fail(&doing, e))?;
        }
        self.commit(tx, &doing).await?;
        Ok(applied)
    }

    /// [`butler_core::RunStore::list_tasks`].
    pub(super) async fn select_tasks(&self, run_ids: &[Id]) -> Result<Vec<TaskInstance>> {
        if run_ids.is_empty() {
            return Ok(Vec::new());
        }
        // The ids go in as one JSON array: one prepared statement for any number of runs, and
        // no limit on bound values.
        let json = serde_json::to_string(run_ids)
            .map_err(|e| Error::backend("cannot list tasks: bad run ids", e))?;
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks \
             WHERE run_id IN (SELECT value FROM json_each(?)) ORDER BY run_id, position"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(json)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.fail(&format!("list the tasks of {} run(s)", run_ids.len()), e))?;
        self.tasks_from_rows(&rows)
    }

    /// [`butler_core::RunStore::expired_leases`].
    pub(super) async fn select_expired(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<TaskInstance>> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE state = 'running' AND lease_until < ? \
             ORDER BY lease_until LIMIT ?"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now.timestamp_millis())
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.fail("look for expired task leases", e))?;
        self.tasks_from_rows(&rows)
    }

    /// [`butler_core::RunStore::list_events`].
    pub(super) async fn select_events(&self, filter: &EventFilter) -> Result<Vec<Event>> {
        let limit = i64::from(filter.limit);
        let query = match filter.run_id {
            Some(run_id) => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE run_id = ? AND id > ? \
                 ORDER BY id LIMIT ?"
            )))
            .bind(run_id),
            None => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE id > ? ORDER BY id LIMIT ?"
            ))),
        };
        let rows = query
            .bind(filter.after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.fail("list events", e))?;
        rows.iter()
            .map(event_from_row)
            .collect::<Decoded<_>>()
            .map_err(|e| self.corrupt("an event", e))
    }

    /// [`butler_core::RunStore::last_event_id`].
    pub(super) async fn select_last_event_id(&self) -> Result<Id> {
        sqlx::query_scalar::<_, Id>("SELECT coalesce(max(id), 0) FROM events")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.fail("read the last event id", e))
    }

    fn tasks_from_rows(&self, rows: &[SqliteRow]) -> Result<Vec<TaskInstance>> {
        rows.iter()
            .map(task_from_row)
            .collect::<Decoded<_>>()
            .map_err(|e| self.corrupt("a task", e))
    }
}

/// Fails with `InvalidInput` when a launch names a task twice: each run has one task per id.
pub(super) fn check_task_ids(task_ids: &[String]) -> Result<()> {
    let mut seen = HashSet::new();
    match task_ids.iter().find(|id| !seen.insert(id.as_str())) {
        Some(id) => Err(Error::InvalidInput(format!(
            "the launch names task {id:?} twice; each task of a workflow needs its own id, so \
             fix the workflow definition"
        ))),
        None => Ok(()),
    }
}

/// Creates the `pending` tasks of the runs `first_id..first_id + runs`, one per task id.
pub(super) async fn insert_tasks(
    conn: &mut SqliteConnection,
    first_id: Id,
    runs: usize,
    task_ids: &[String],
) -> std::result::Result<(), sqlx::Error> {
    let Some(last_offset) = runs.checked_sub(1) else {
        return Ok(());
    };
    if task_ids.is_empty() {
        return Ok(());
    }
    let last_id = first_id.saturating_add(Id::try_from(last_offset).unwrap_or(Id::MAX));
    let json = serde_json::to_string(task_ids).map_err(|e| sqlx::Error::Encode(e.into()))?;
    sqlx::query(INSERT_TASKS)
        .bind(first_id)
        .bind(last_id)
        .bind(json)
        .execute(conn)
        .await?;
    Ok(())
}

/// Applies one set, all or none, noting the events of its changes if it applied.
async fn apply_set<'a>(
    conn: &mut SqliteConnection,
    set: &'a [Change],
    events: &mut Vec<NewEvent<'a>>,
) -> std::result::Result<bool, sqlx::Error> {
    match set {
        [] => Ok(true),
        // A refused single change wrote nothing, so it needs no savepoint: the common case
        // costs one statement.
        [change] => {
            let ok = apply_change(conn, change).await?;
            if ok {
                events.extend(event_of(change));
            }
            Ok(ok)
        }
        _ => {
            sqlx::query(SAVEPOINT).execute(&mut *conn).await?;
            let mark = events.len();
            for change in set {
                if !apply_change(conn, change).await? {
                    sqlx::query(ROLLBACK).execute(&mut *conn).await?;
                    sqlx::query(RELEASE).execute(&mut *conn).await?;
                    events.truncate(mark);
                    return Ok(false);
                }
                events.extend(event_of(change));
            }
            sqlx::query(RELEASE).execute(&mut *conn).await?;
            Ok(true)
        }
    }
}

/// Applies one change if its compare-and-set holds; the answer says whether it did.
async fn apply_change(
    conn: &mut SqliteConnection,
    change: &Change,
) -> std::result::Result<bool, sqlx::Error> {
    let done = match change {
        Change::Task(TaskChange { expect, new, .. }) => {
            let ms = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_millis());
            sqlx::query(UPDATE_TASK)
                .bind(new.state.as_str())
                .bind(i64::from(new.try_number))
                .bind(i64::from(new.failures))
                .bind(new.token)
                .bind(ms(new.lease_until))
                .bind(new.worker.as_deref())
                .bind(ms(new.queued_at))
                .bind(ms(new.first_started_at))
                .bind(ms(new.started_at))
                .bind(ms(new.ended_at))
                .bind(ms(new.next_try_at))
                .bind(new.exit_code)
                .bind(new.error.as_deref())
                .bind(new.run_id)
                .bind(new.task_id.as_str())
                .bind(expect.state.as_str())
                .bind(i64::from(expect.try_number))
                .bind(expect.token)
                .execute(conn)
                .await?
        }
        Change::Run(change) if change.status == RunStatus::Ready => {
            sqlx::query(RESET_RUN)
                .bind(change.run_id)
                .bind(change.expect.as_str())
                .execute(conn)
                .await?
        }
        Change::Run(change) => {
            sqlx::query(UPDATE_RUN)
                .bind(change.status.as_str())
                .bind(change.error.as_deref())
                .bind(change.started_at.map(|t| t.timestamp_millis()))
                .bind(change.ended_at.map(|t| t.timestamp_millis()))
                .bind(change.run_id)
                .bind(change.expect.as_str())
                .execute(conn)
                .await?
        }
        Change::Lease(LeaseChange {
            run_id,
            task_id,
            token,
            until,
        }) => {
            sqlx::query(EXTEND_LEASE)
                .bind(until.timestamp_millis())
                .bind(*run_id)
                .bind(task_id.as_str())
                .bind(*token)
                .execute(conn)
                .await?
        }
    };
    Ok(done.rows_affected() == 1)
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

/// Reads a row selected with [`TASK_COLUMNS`].
fn task_from_row(row: &SqliteRow) -> Decoded<TaskInstance> {
    let count =
        |index: usize| -> Decoded<u32> { Ok(u32::try_from(row.try_get::<i64, _>(index)?)?) };
    Ok(TaskInstance {
        run_id: row.try_get(0)?,
        task_id: row.try_get(1)?,
        state: row.try_get::<&str, _>(2)?.parse::<TaskState>()?,
        try_number: count(3)?,
        failures: count(4)?,
        token: row.try_get(5)?,
        lease_until: opt_from_ms(row.try_get(6)?)?,
        worker: row.try_get(7)?,
        queued_at: opt_from_ms(row.try_get(8)?)?,
        first_started_at: opt_from_ms(row.try_get(9)?)?,
        started_at: opt_from_ms(row.try_get(10)?)?,
        ended_at: opt_from_ms(row.try_get(11)?)?,
        next_try_at: opt_from_ms(row.try_get(12)?)?,
        exit_code: row.try_get(13)?,
        error: row.try_get(14)?,
    })
}

/// Reads a row selected with [`EVENT_COLUMNS`].
fn event_from_row(row: &SqliteRow) -> Decoded<Event> {
    let try_number = row
        .try_get::<Option<i64>, _>(4)?
        .map(u32::try_from)
        .transpose()?;
    Ok(Event {
        id: row.try_get(0)?,
        at: from_ms(row.try_get(1)?)?,
        run_id: row.try_get(2)?,
        task_id: row.try_get(3)?,
        try_number,
        from: row.try_get(5)?,
        to: row.try_get(6)?,
        by: row.try_get(7)?,
        reason: row.try_get(8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_task_ids_names_the_repeated_task() {
        assert!(check_task_ids(&["a".into(), "b".into()]).is_ok());
        let err = check_task_ids(&["a".into(), "b".into(), "a".into()])
            .expect_err("a repeated id")
            .to_string();
        assert!(err.contains("\"a\" twice"), "{err}");
    }

    #[test]
    fn lease_changes_log_no_event() {
        let lease = Change::Lease(LeaseChange {
            run_id: 1,
            task_id: "a".into(),
            token: 1,
            until: Utc::now(),
        });
        assert_eq!(event_of(&lease), None);
    }
}
