//! The engine's tables: task instances, compare-and-set change batches and the event log.

mod apply;

use std::collections::HashSet;

use butler_core::change::ChangeSet;
use butler_core::model::{Event, EventFilter, Id, TaskInstance, TaskState};
use butler_core::{Error, Result};
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use super::{Decoded, PgStore, from_ms, now_ms, opt_from_ms};

/// The columns of `tasks` in the order [`task_from_row`] reads them.
const TASK_COLUMNS: &str = "run_id, task_id, state, try_number, failures, token, lease_until, \
                            worker, queued_at, first_started_at, started_at, ended_at, \
                            next_try_at, exit_code, error";

/// The tasks of a launch: every task id of the array `$3`, at its place in it, for each run id
/// from `$1` to `$2`.
const INSERT_TASKS: &str = "INSERT INTO tasks (run_id, task_id, position) \
                            SELECT r.id, t.task_id, (t.n - 1)::integer \
                            FROM generate_series($1::bigint, $2::bigint) AS r (id) \
                            CROSS JOIN unnest($3::text[]) WITH ORDINALITY AS t (task_id, n)";

/// Events after `$1`, leaving out those whose author ends with `$2` when it is not NULL, at
/// most `$3`, in the columns [`event_from_row`] reads.
const SELECT_EVENTS: &str = "SELECT id, at, run_id, task_id, try_number, from_state, to_state, \
                             by_whom, reason FROM events WHERE id > $1 \
                             AND ($2::text IS NULL OR right(by_whom, length($2)) <> $2) \
                             ORDER BY id LIMIT $3";

/// [`SELECT_EVENTS`] of run `$4` alone.
const SELECT_RUN_EVENTS: &str = "SELECT id, at, run_id, task_id, try_number, from_state, \
                                 to_state, by_whom, reason FROM events WHERE id > $1 \
                                 AND ($2::text IS NULL OR right(by_whom, length($2)) <> $2) \
                                 AND run_id = $4 ORDER BY id LIMIT $3";

impl PgStore {
    /// [`butler_core::RunStore::apply`]: every set in one transaction of two statements,
    /// however many sets there are; with `announce` (the sets put a run back to `ready`), a
    /// notification to other processes' schedulers goes with the commit.
    pub(super) async fn apply_sets(
        &self,
        sets: Vec<ChangeSet>,
        announce: bool,
    ) -> Result<Vec<bool>> {
        let changes: usize = sets.iter().map(Vec::len).sum();
        if changes == 0 {
            // Empty sets apply, and change nothing.
            return Ok(vec![true; sets.len()]);
        }
        let doing = format!("apply {changes} change(s) in {} set(s)", sets.len());
        let at = now_ms();
        let mut tx = self.begin(&doing).await?;
        let applied = apply::apply(self, &mut tx, &sets, at, &doing).await?;
        if announce {
            super::announce_ready_runs(&mut tx)
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
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE run_id = ANY($1) ORDER BY run_id, position"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(run_ids)
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
            "SELECT {TASK_COLUMNS} FROM tasks WHERE state = 'running' AND lease_until < $1 \
             ORDER BY lease_until LIMIT $2"
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
        let query = match filter.run_id {
            Some(_) => sqlx::query(SELECT_RUN_EVENTS),
            None => sqlx::query(SELECT_EVENTS),
        }
        .bind(filter.after)
        .bind(filter.not_by_suffix.as_deref())
        .bind(i64::from(filter.limit));
        let query = match filter.run_id {
            Some(run_id) => query.bind(run_id),
            None => query,
        };
        let rows = query
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
        sqlx::query_scalar::<_, Id>("SELECT coalesce(max(id), 0)::bigint FROM events")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.fail("read the last event id", e))
    }

    fn tasks_from_rows(&self, rows: &[PgRow]) -> Result<Vec<TaskInstance>> {
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

/// Creates the `pending` tasks of the runs `first_id..first_id + runs`, one per task id, in
/// one statement.
pub(super) async fn insert_tasks(
    conn: &mut PgConnection,
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
    sqlx::query(INSERT_TASKS)
        .bind(first_id)
        .bind(last_id)
        .bind(task_ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Reads a row selected with [`TASK_COLUMNS`].
fn task_from_row(row: &PgRow) -> Decoded<TaskInstance> {
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

/// Reads a row selected by [`SELECT_EVENTS`].
fn event_from_row(row: &PgRow) -> Decoded<Event> {
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
}
