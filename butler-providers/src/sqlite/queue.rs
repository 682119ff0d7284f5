//! SQLite queue.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use butler_core::queue::{
    DeadLetter, Delivery, DeliveryTag, NewMessage, Queue, QueueDepth, history_line,
    validate_queue_name,
};
use butler_core::{Error, Result};
use chrono::{DateTime, Utc};
use sqlx::sqlite::{Sqlite, SqlitePool, SqliteRow};
use sqlx::{QueryBuilder, Row};
use tokio::sync::Notify;

/// Messages per `INSERT` statement of a batch enqueue (6 bound values each).
const ROWS_PER_INSERT: usize = 128;

/// SQL: the `history` text recording the end of the row's lease, when it has one.
macro_rules! expiry_line {
    () => {
        "CASE WHEN leased_until IS NOT NULL \
         THEN strftime('%Y-%m-%dT%H:%M:%fZ', leased_until / 1000.0, 'unixepoch') \
              || ' lease expired (delivery ' || deliveries || ')' || char(10) \
         ELSE '' END"
    };
}

/// SQL: the rows still held by the tags in `?1`, a JSON array of `[id, token]` pairs.
macro_rules! held_by_tags {
    () => {
        "leased_until IS NOT NULL \
         AND (id, token) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?1))"
    };
}

/// A [`Queue`] in the embedded SQLite database, in the same file as the run store.
///
/// Messages survive restarts, and several processes may share the file: each delivery is one
/// `BEGIN IMMEDIATE` transaction, so a message is leased to one consumer at a time. Clones share
/// their wakeups: a waiting [`Queue::dequeue`] wakes at once when a clone enqueues or nacks into
/// its queue, and looks for messages from other processes every [`SqliteQueue::POLL_INTERVAL`].
///
/// The pool should be in WAL mode with a busy timeout, as the run store opens it; the tables come
/// from the `0002_queue` migration.
#[derive(Debug, Clone)]
pub struct SqliteQueue {
    pool: SqlitePool,
    wakers: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
}

impl SqliteQueue {
    /// How often a waiting [`Queue::dequeue`] looks for messages enqueued by other processes.
    pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

    /// A queue over `pool`, whose database has Butler's SQLite migrations applied.
    pub fn new(pool: SqlitePool) -> Self {
        Self {
            pool,
            wakers: Arc::default(),
        }
    }

    /// The wakeup shared by waiters on `queue` in this process.
    fn waker(&self, queue: &str) -> Arc<Notify> {
        let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(notify) = wakers.get(queue) {
            return Arc::clone(notify);
        }
        let notify = Arc::new(Notify::new());
        wakers.insert(queue.to_owned(), Arc::clone(&notify));
        notify
    }

    fn wake(&self, queue: &str) {
        let wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(notify) = wakers.get(queue) {
            notify.notify_waiters();
        }
    }

    /// One dequeue attempt: dead-letters the visible exhausted messages, then leases up to `max`.
    async fn try_dequeue(&self, queue: &str, max: usize, lease: Duration) -> Result<Vec<Delivery>> {
        let action = || format!("dequeue from queue {queue:?}");
        let now = Utc::now();
        let now_ms = now.timestamp_millis();
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_error(action()))?;

        let dead_line = history_line(now, "dead-lettered after ");
        let moved = sqlx::query(concat!(
            "INSERT INTO queue_dead (id, queue, payload, deliveries, enqueued_at, history, dead_at)
             SELECT id, queue, payload, deliveries, enqueued_at,
                    history || ",
            expiry_line!(),
            " || ?3 || deliveries || ' deliveries (max_deliveries ' || max_deliveries || ')'
                      || char(10),
                    ?2
             FROM queue_messages
             WHERE queue = ?1 AND visible_at <= ?2 AND deliveries >= max_deliveries",
        ))
        .bind(queue)
        .bind(now_ms)
        .bind(dead_line)
        .execute(&mut *tx)
        .await
        .map_err(db_error(action()))?;
        if moved.rows_affected() > 0 {
            sqlx::query(
                "DELETE FROM queue_messages
                 WHERE queue = ?1 AND visible_at <= ?2 AND deliveries >= max_deliveries",
            )
            .bind(queue)
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(db_error(action()))?;
        }

        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM queue_messages
             WHERE queue = ?1 AND visible_at <= ?2
             ORDER BY priority DESC, visible_at, id
             LIMIT ?3",
        )
        .bind(queue)
        .bind(now_ms)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error(action()))?;
        if ids.is_empty() {
            tx.commit().await.map_err(db_error(action()))?;
            return Ok(Vec::new());
        }

        let until = now_ms.saturating_add(millis(lease));
        let rows = sqlx::query(concat!(
            "UPDATE queue_messages
             SET deliveries = deliveries + 1,
                 token = token + 1,
                 leased_until = ?1,
                 visible_at = ?1,
                 history = history || ",
            expiry_line!(),
            " || ?2 || (deliveries + 1) || ', lease ' || ?3 || ')' || char(10)
             WHERE id IN (SELECT value FROM json_each(?4))
             RETURNING id, token, payload, deliveries, enqueued_at",
        ))
        .bind(until)
        .bind(history_line(now, "delivered (delivery "))
        .bind(format!("{lease:?}"))
        .bind(json_ids(&ids))
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error(action()))?;
        tx.commit().await.map_err(db_error(action()))?;

        let position: HashMap<i64, usize> =
            ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let mut out = rows
            .iter()
            .map(delivery)
            .collect::<Result<Vec<Delivery>, sqlx::Error>>()
            .map_err(db_error(action()))?;
        out.sort_by_key(|d| position.get(&d.tag.message_id).copied());
        Ok(out)
    }

    /// Whether `queue` has a visible message, read without taking the write lock.
    async fn any_visible(&self, queue: &str) -> Result<bool> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM queue_messages WHERE queue = ?1 AND visible_at <= ?2)",
        )
        .bind(queue)
        .bind(Utc::now().timestamp_millis())
        .fetch_one(&self.pool)
        .await
        .map_err(db_error(format!("look for messages in queue {queue:?}")))
    }

    /// Runs `sql` (a statement over the rows `held_by_tags!`, returning `id, token` and maybe
    /// `queue`) and answers per tag whether it changed that tag's message, with the queues of
    /// the changed messages.
    async fn held(
        &self,
        action: &str,
        tags: &[DeliveryTag],
        repeated: Repeated,
        sql: &'static str,
        bind: impl FnOnce(
            sqlx::query::Query<'_, Sqlite, sqlx::sqlite::SqliteArguments>,
        ) -> sqlx::query::Query<'_, Sqlite, sqlx::sqlite::SqliteArguments>,
    ) -> Result<(Vec<bool>, HashSet<String>)> {
        let mut queues = HashSet::new();
        if tags.is_empty() {
            return Ok((Vec::new(), queues));
        }
        let mut json = String::from("[");
        for tag in tags {
            // A token beyond i64 was never issued; leaving it out answers `false` for it.
            if let Ok(token) = i64::try_from(tag.token) {
                if json.len() > 1 {
                    json.push(',');
                }
                let _ = write!(json, "[{},{token}]", tag.message_id);
            }
        }
        json.push(']');
        let rows = bind(sqlx::query(sql).bind(json))
            .fetch_all(&self.pool)
            .await
            .map_err(db_error(format!("{action} {} message(s)", tags.len())))?;
        let mut changed: HashSet<(i64, i64)> = HashSet::with_capacity(rows.len());
        for row in &rows {
            let pair = (row.try_get("id"), row.try_get("token"));
            if let (Ok(id), Ok(token)) = pair {
                changed.insert((id, token));
            }
            if let Ok(queue) = row.try_get::<String, _>("queue") {
                queues.insert(queue);
            }
        }
        let answers = tags
            .iter()
            .map(|tag| {
                i64::try_from(tag.token).is_ok_and(|token| {
                    let key = (tag.message_id, token);
                    match repeated {
                        Repeated::LeaseGone => changed.remove(&key),
                        Repeated::SameAnswer => changed.contains(&key),
                    }
                })
            })
            .collect();
        Ok((answers, queues))
    }
}

/// What a tag given again in the same ack, nack or extend answers.
#[derive(Debug, Clone, Copy)]
enum Repeated {
    /// `false`: its first occurrence ended the lease (ack, nack).
    LeaseGone,
    /// What its first occurrence answered: the lease still holds (extend).
    SameAnswer,
}

/// Inserts `messages` (at most [`ROWS_PER_INSERT`]) with one statement; their ids, in order.
async fn insert<'e>(
    executor: impl sqlx::Executor<'e, Database = Sqlite>,
    queue: &str,
    messages: &[NewMessage],
    now_ms: i64,
) -> Result<Vec<i64>, sqlx::Error> {
    let mut insert = QueryBuilder::<Sqlite>::new(
        "INSERT INTO queue_messages \
         (queue, payload, priority, visible_at, max_deliveries, enqueued_at) ",
    );
    insert.push_values(messages, |mut row, message| {
        row.push_bind(queue)
            .push_bind(message.payload.as_slice())
            .push_bind(message.priority)
            .push_bind(now_ms.saturating_add(millis(message.delay)))
            .push_bind(i64::from(message.max_deliveries))
            .push_bind(now_ms);
    });
    insert.push(" RETURNING id");
    let mut ids: Vec<i64> = insert.build_query_scalar().fetch_all(executor).await?;
    // Rows are numbered in VALUES order, but RETURNING may list them in any order.
    ids.sort_unstable();
    Ok(ids)
}

fn json_ids(ids: &[i64]) -> String {
    let mut json = String::with_capacity(ids.len() * 8 + 2);
    json.push('[');
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        let _ = write!(json, "{id}");
    }
    json.push(']');
    json
}

fn delivery(row: &SqliteRow) -> Result<Delivery, sqlx::Error> {
    Ok(Delivery {
        tag: DeliveryTag {
            message_id: row.try_get("id")?,
            token: u64::try_from(row.try_get::<i64, _>("token")?).unwrap_or(0),
        },
        payload: row.try_get("payload")?,
        deliveries: count(row.try_get("deliveries")?),
        enqueued_at: time(row.try_get("enqueued_at")?),
    })
}

fn count(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::UNIX_EPOCH)
}

/// `d` in whole milliseconds, saturating.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Maps a database failure while doing `action` to Butler's error: a busy or locked database
/// and an unreachable pool are worth retrying, anything else is a backend failure.
fn db_error(action: String) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| {
        let busy = match &e {
            sqlx::Error::Database(db) => db
                .code()
                .and_then(|code| code.parse::<i32>().ok())
                .is_some_and(|code| matches!(code & 0xff, 5 | 6)),
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
            _ => false,
        };
        if busy {
            Error::unavailable(
                format!(
                    "could not {action}: the SQLite database is busy or unreachable; retry, or \
                     raise the busy timeout if this persists"
                ),
                e,
            )
        } else {
            Error::backend(format!("could not {action} in the SQLite queue"), e)
        }
    }
}

#[async_trait]
impl Queue for SqliteQueue {
    async fn enqueue(&self, queue: &str, messages: Vec<NewMessage>) -> Result<Vec<i64>> {
        validate_queue_name(queue)?;
        for (index, message) in messages.iter().enumerate() {
            message.validate(queue, index)?;
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let action = || format!("enqueue {} message(s) to queue {queue:?}", messages.len());
        let now_ms = Utc::now().timestamp_millis();
        let ids = if messages.len() <= ROWS_PER_INSERT {
            // One statement is atomic on its own.
            insert(&self.pool, queue, &messages, now_ms)
                .await
                .map_err(db_error(action()))?
        } else {
            let mut tx = self
                .pool
                .begin_with("BEGIN IMMEDIATE")
                .await
                .map_err(db_error(action()))?;
            let mut ids = Vec::with_capacity(messages.len());
            for chunk in messages.chunks(ROWS_PER_INSERT) {
                let chunk_ids = insert(&mut *tx, queue, chunk, now_ms)
                    .await
                    .map_err(db_error(action()))?;
                ids.extend(chunk_ids);
            }
            tx.commit().await.map_err(db_error(action()))?;
            ids
        };
        self.wake(queue);
        Ok(ids)
    }

    async fn dequeue(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>> {
        validate_queue_name(queue)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = tokio::time::Instant::now().checked_add(wait);
        let notify = self.waker(queue);
        let mut first = true;
        loop {
            // Registered before looking, so an enqueue between the look and the wait still wakes us.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Later looks read before they write, so idle waiters do not take the write lock.
            let out = if first || self.any_visible(queue).await? {
                self.try_dequeue(queue, max, lease).await?
            } else {
                Vec::new()
            };
            first = false;
            let now = tokio::time::Instant::now();
            if !out.is_empty() || deadline.is_some_and(|d| now >= d) {
                return Ok(out);
            }
            let poll = now + Self::POLL_INTERVAL;
            let until = deadline.map_or(poll, |d| d.min(poll));
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<Vec<bool>> {
        const SQL: &str = concat!(
            "DELETE FROM queue_messages WHERE ",
            held_by_tags!(),
            " RETURNING id, token"
        );
        Ok(self
            .held("ack", tags, Repeated::LeaseGone, SQL, |q| q)
            .await?
            .0)
    }

    async fn nack(&self, tags: &[DeliveryTag], delay: Duration) -> Result<Vec<bool>> {
        const SQL: &str = concat!(
            "UPDATE queue_messages \
             SET leased_until = NULL, visible_at = ?2, history = history || ?3 WHERE ",
            held_by_tags!(),
            " RETURNING id, token, queue"
        );
        let now = Utc::now();
        let at = now.timestamp_millis().saturating_add(millis(delay));
        let line = history_line(now, &format!("nacked (visible again in {delay:?})")) + "\n";
        let (answers, queues) = self
            .held("nack", tags, Repeated::LeaseGone, SQL, |q| {
                q.bind(at).bind(line)
            })
            .await?;
        for queue in queues {
            self.wake(&queue);
        }
        Ok(answers)
    }

    async fn extend(&self, tags: &[DeliveryTag], lease: Duration) -> Result<Vec<bool>> {
        const SQL: &str = concat!(
            "UPDATE queue_messages SET leased_until = ?2, visible_at = ?2 WHERE ",
            held_by_tags!(),
            " RETURNING id, token"
        );
        let until = Utc::now().timestamp_millis().saturating_add(millis(lease));
        let (answers, _) = self
            .held(
                "extend the lease of",
                tags,
                Repeated::SameAnswer,
                SQL,
                |q| q.bind(until),
            )
            .await?;
        Ok(answers)
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth> {
        validate_queue_name(queue)?;
        let now_ms = Utc::now().timestamp_millis();
        let row = sqlx::query(
            "SELECT
                 COALESCE(SUM(visible_at <= ?2), 0) AS ready,
                 COALESCE(SUM(visible_at > ?2 AND leased_until IS NULL), 0) AS delayed,
                 COALESCE(SUM(visible_at > ?2 AND leased_until IS NOT NULL), 0) AS leased,
                 MIN(CASE WHEN visible_at <= ?2 THEN visible_at END) AS oldest,
                 (SELECT COUNT(*) FROM queue_dead WHERE queue = ?1) AS dead
             FROM queue_messages WHERE queue = ?1",
        )
        .bind(queue)
        .bind(now_ms)
        .fetch_one(&self.pool)
        .await
        .map_err(db_error(format!("count the messages of queue {queue:?}")))?;
        let read = |row: &SqliteRow| -> Result<QueueDepth, sqlx::Error> {
            let n = |column: &str| -> Result<u64, sqlx::Error> {
                Ok(u64::try_from(row.try_get::<i64, _>(column)?).unwrap_or(0))
            };
            let oldest: Option<i64> = row.try_get("oldest")?;
            Ok(QueueDepth {
                ready: n("ready")?,
                delayed: n("delayed")?,
                leased: n("leased")?,
                dead: n("dead")?,
                oldest_ready_age: oldest.map(|at| {
                    Duration::from_millis(now_ms.saturating_sub(at).max(0).unsigned_abs())
                }),
            })
        };
        read(&row).map_err(db_error(format!("count the messages of queue {queue:?}")))
    }

    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        validate_queue_name(queue)?;
        let action = || format!("list the dead letters of queue {queue:?}");
        let rows = sqlx::query(
            "SELECT id, payload, deliveries, history, dead_at FROM queue_dead
             WHERE queue = ?1 ORDER BY dead_at, id LIMIT ?2",
        )
        .bind(queue)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error(action()))?;
        rows.iter()
            .map(|row| -> Result<DeadLetter, sqlx::Error> {
                let history: String = row.try_get("history")?;
                Ok(DeadLetter {
                    message_id: row.try_get("id")?,
                    payload: row.try_get("payload")?,
                    deliveries: count(row.try_get("deliveries")?),
                    history: history
                        .lines()
                        .filter(|line| !line.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    dead_at: time(row.try_get("dead_at")?),
                })
            })
            .collect::<Result<_, _>>()
            .map_err(db_error(action()))
    }
}
