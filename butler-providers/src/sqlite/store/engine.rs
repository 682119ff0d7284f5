//! The engine's tables: task instances, compare-and-set change batches and the event log.

mod apply;

use std::collections::HashSet;

use butler_core::change::ChangeSet;
use butler_core::model::{Event, EventFilter, Id, TaskInstance, TaskState};
use butler_core::{Error, Result};
use chrono::{DateTime, Utc};
use sqlx::SqliteConnection;

use super::{
    Context, Decoded, SqliteStore, decode_all, describe, from_ms, now_ms, opt_from_ms, text,
};

/// The columns of `tasks` in the order [`task_from_row`] reads them.
const TASK_COLUMNS: &str = "run_id, task_id, state, try_number, failures, token, lease_until, \
                            worker, queued_at, first_started_at, started_at, ended_at, \
                            next_try_at, exit_code, error";

/// The index of `position` when it is selected after [`TASK_COLUMNS`].
const TASK_POSITION: usize = 15;

/// The columns of `events` in the order [`event_from_row`] reads them.
const EVENT_COLUMNS: &str =
    "id, at, run_id, task_id, try_number, from_state, to_state, by_whom, reason";

/// The tasks of a launch: every task of a JSON array of ids for each run id from the first to
/// the last.
const INSERT_TASKS: &str = "WITH RECURSIVE ids (id) AS \
                            (SELECT ? UNION ALL SELECT id + 1 FROM ids WHERE id < ?) \
                            INSERT INTO tasks (run_id, task_id, position) \
                            SELECT ids.id, t.value, t.key FROM ids, json_each(?) AS t";

impl SqliteStore {
    /// [`butler_core::RunStore::apply`]: every set in one call to the writer's thread, in its
    /// write transaction, with a few statements however many sets there are.
    pub(super) async fn apply_sets(&self, sets: Vec<ChangeSet>) -> Result<Vec<bool>> {
        let changes: usize = sets.iter().map(Vec::len).sum();
        if changes == 0 {
            // Empty sets apply, and change nothing.
            return Ok(vec![true; sets.len()]);
        }
        let doing = format!("apply {changes} change(s) in {} set(s)", sets.len());
        let location = describe(&self.config);
        self.writer
            .run(doing.clone(), move |conn| {
                let cx = Context {
                    location: &location,
                    doing: &doing,
                };
                apply::apply(conn, &sets, now_ms(), cx)
            })
            .await
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
        let doing = format!("list the tasks of {} run(s)", run_ids.len());
        self.read(doing, move |conn, cx| {
            // Ordered by run alone, the rows come in primary-key order without a sort; ordering
            // each run's tasks by position in SQL costs SQLite a temporary B-tree per run, about
            // as much again as reading the rows.
            let sql = format!(
                "SELECT {TASK_COLUMNS}, position FROM tasks \
                 WHERE run_id IN (SELECT value FROM json_each(?)) ORDER BY run_id"
            );
            let mut statement = conn.prepare_cached(&sql).map_err(|e| cx.fail(&e))?;
            let rows = statement.query([json]).map_err(|e| cx.fail(&e))?;
            let mut placed = decode_all(rows, cx, "a task", |row| {
                Ok((task_from_row(row)?, row.get::<_, i64>(TASK_POSITION)?))
            })?;
            placed.sort_by_key(|(task, position)| (task.run_id, *position));
            Ok(placed.into_iter().map(|(task, _)| task).collect())
        })
        .await
    }

    /// [`butler_core::RunStore::expired_leases`].
    pub(super) async fn select_expired(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<TaskInstance>> {
        let doing = "look for expired task leases".to_owned();
        self.read(doing, move |conn, cx| {
            let sql = format!(
                "SELECT {TASK_COLUMNS} FROM tasks WHERE state = 'running' AND lease_until < ? \
                 ORDER BY lease_until LIMIT ?"
            );
            let mut statement = conn.prepare_cached(&sql).map_err(|e| cx.fail(&e))?;
            let rows = statement
                .query((now.timestamp_millis(), i64::from(limit)))
                .map_err(|e| cx.fail(&e))?;
            decode_all(rows, cx, "a task", task_from_row)
        })
        .await
    }

    /// [`butler_core::RunStore::list_events`].
    pub(super) async fn select_events(&self, filter: &EventFilter) -> Result<Vec<Event>> {
        let EventFilter {
            after,
            limit,
            run_id,
            ..
        } = *filter;
        let not_by_suffix = filter.not_by_suffix.clone();
        self.read("list events".to_owned(), move |conn, cx| {
            // `?2 IS NULL OR …` keeps one statement, cached, for both forms of the filter.
            let not_by = "(?2 IS NULL OR substr(by_whom, -length(?2)) IS NOT ?2)";
            let sql = match run_id {
                Some(_) => format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE id > ?1 AND {not_by} \
                     AND run_id = ?4 ORDER BY id LIMIT ?3"
                ),
                None => format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE id > ?1 AND {not_by} \
                     ORDER BY id LIMIT ?3"
                ),
            };
            let mut statement = conn.prepare_cached(&sql).map_err(|e| cx.fail(&e))?;
            let limit = i64::from(limit);
            let rows = match run_id {
                Some(run_id) => statement.query((after, &not_by_suffix, limit, run_id)),
                None => statement.query((after, &not_by_suffix, limit)),
            }
            .map_err(|e| cx.fail(&e))?;
            decode_all(rows, cx, "an event", event_from_row)
        })
        .await
    }

    /// [`butler_core::RunStore::last_event_id`].
    pub(super) async fn select_last_event_id(&self) -> Result<Id> {
        self.read("read the last event id".to_owned(), |conn, cx| {
            conn.prepare_cached("SELECT coalesce(max(id), 0) FROM events")
                .and_then(|mut statement| statement.query_row([], |row| row.get(0)))
                .map_err(|e| cx.fail(&e))
        })
        .await
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

/// Reads a row selected with [`TASK_COLUMNS`].
fn task_from_row(row: &rusqlite::Row<'_>) -> Decoded<TaskInstance> {
    let count = |index: usize| -> Decoded<u32> { Ok(u32::try_from(row.get::<_, i64>(index)?)?) };
    Ok(TaskInstance {
        run_id: row.get(0)?,
        task_id: row.get(1)?,
        state: text(row, 2)?.parse::<TaskState>()?,
        try_number: count(3)?,
        failures: count(4)?,
        token: row.get(5)?,
        lease_until: opt_from_ms(row.get(6)?)?,
        worker: row.get(7)?,
        queued_at: opt_from_ms(row.get(8)?)?,
        first_started_at: opt_from_ms(row.get(9)?)?,
        started_at: opt_from_ms(row.get(10)?)?,
        ended_at: opt_from_ms(row.get(11)?)?,
        next_try_at: opt_from_ms(row.get(12)?)?,
        exit_code: row.get(13)?,
        error: row.get(14)?,
    })
}

/// Reads a row selected with [`EVENT_COLUMNS`].
fn event_from_row(row: &rusqlite::Row<'_>) -> Decoded<Event> {
    let try_number = row
        .get::<_, Option<i64>>(4)?
        .map(u32::try_from)
        .transpose()?;
    Ok(Event {
        id: row.get(0)?,
        at: from_ms(row.get(1)?)?,
        run_id: row.get(2)?,
        task_id: row.get(3)?,
        try_number,
        from: row.get(5)?,
        to: row.get(6)?,
        by: row.get(7)?,
        reason: row.get(8)?,
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
