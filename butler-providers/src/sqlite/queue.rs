//! SQLite queue.
//!
//! Enqueue, dequeue, ack, nack and extend run on the database's writer thread (see
//! `sqlite/writer.rs`): each call is one closure there, its statements prepared once and run
//! without a handoff per statement, and calls that arrive together share one commit. Reads that
//! take no lock (the idle poll, depth, dead letters) stay on the pool.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use butler_core::queue::{
    DeadLetter, Delivery, DeliveryTag, NewMessage, Queue, QueueDepth, history_line,
    validate_queue_name,
};
use butler_core::{Error, Result};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension};
use sqlx::Row;
use sqlx::sqlite::{SqlitePool, SqliteRow};
use tokio::sync::{Notify, OnceCell};

use super::writer::{Writer, sqlite_error};

/// SQL: the `history` text recording the end of the row's lease, when it has one.
macro_rules! expiry_line {
    () => {
        "CASE WHEN leased_until IS NOT NULL \
         THEN strftime('%Y-%m-%dT%H:%M:%fZ', leased_until / 1000.0, 'unixepoch') \
              || ' lease expired (delivery ' || deliveries || ')' || char(10) \
         ELSE '' END"
    };
}

/// One message, at `?2`..`?6` of queue `?1`.
const INSERT: &str = "INSERT INTO queue_messages \
                      (queue, payload, priority, visible_at, max_deliveries, enqueued_at) \
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// Whether queue `?1` has visible messages at time `?2` that used up their deliveries.
const EXHAUSTED: &str = "SELECT EXISTS (SELECT 1 FROM queue_messages \
                         WHERE queue = ?1 AND visible_at <= ?2 \
                         AND deliveries >= max_deliveries)";

/// Moves the visible messages of queue `?1` at time `?2` that used up their deliveries to the
/// dead letters, with `?3` (the start of a history line) before the count.
const BURY: &str = concat!(
    "INSERT INTO queue_dead (id, queue, payload, deliveries, enqueued_at, history, dead_at)
     SELECT id, queue, payload, deliveries, enqueued_at,
            history || ",
    expiry_line!(),
    " || ?3 || deliveries || ' deliveries (max_deliveries ' || max_deliveries || ')'
              || char(10),
            ?2
     FROM queue_messages
     WHERE queue = ?1 AND visible_at <= ?2 AND deliveries >= max_deliveries"
);

/// Removes what [`BURY`] copied.
const UNBURY: &str = "DELETE FROM queue_messages \
                      WHERE queue = ?1 AND visible_at <= ?2 AND deliveries >= max_deliveries";

/// The next `?3` visible messages of queue `?1` at time `?2`, in delivery order.
const NEXT: &str = "SELECT id FROM queue_messages \
                    WHERE queue = ?1 AND visible_at <= ?2 \
                    ORDER BY priority DESC, visible_at, id LIMIT ?3";

/// Leases message `?4` until `?1`, with `?2` and `?3` the parts of its history line.
const LEASE: &str = concat!(
    "UPDATE queue_messages
     SET deliveries = deliveries + 1,
         token = token + 1,
         leased_until = ?1,
         visible_at = ?1,
         history = history || ",
    expiry_line!(),
    " || ?2 || (deliveries + 1) || ', lease ' || ?3 || ')' || char(10)
     WHERE id = ?4
     RETURNING token, payload, deliveries, enqueued_at"
);

/// Acks delivery `?2` of message `?1`.
const ACK: &str = "DELETE FROM queue_messages \
                   WHERE id = ?1 AND token = ?2 AND leased_until IS NOT NULL";

/// Nacks delivery `?2` of message `?1`: visible again at `?3`, with history line `?4`.
const NACK: &str = "UPDATE queue_messages \
                    SET leased_until = NULL, visible_at = ?3, history = history || ?4 \
                    WHERE id = ?1 AND token = ?2 AND leased_until IS NOT NULL \
                    RETURNING queue";

/// Extends the lease of delivery `?2` of message `?1` to `?3`.
const EXTEND: &str = "UPDATE queue_messages SET leased_until = ?3, visible_at = ?3 \
                      WHERE id = ?1 AND token = ?2 AND leased_until IS NOT NULL";

/// A [`Queue`] in the embedded SQLite database, in the same file as the run store.
///
/// Messages survive restarts, and several processes may share the file: each delivery is made
/// in a `BEGIN IMMEDIATE` transaction, so a message is leased to one consumer at a time. Clones
/// share their wakeups: a waiting [`Queue::dequeue`] wakes at once when a clone enqueues or nacks
/// into its queue, and looks for messages from other processes every
/// [`SqliteQueue::POLL_INTERVAL`].
///
/// The pool should be in WAL mode with a busy timeout, as the run store opens it; the tables come
/// from the `0002_queue` migration. Writes go through one connection per file and process, with
/// the pool's `synchronous` and busy timeout, shared with a [`super::SqliteStore`] on the same
/// file.
#[derive(Debug, Clone)]
pub struct SqliteQueue {
    pool: SqlitePool,
    writer: Arc<OnceCell<Arc<Writer>>>,
    wakers: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
}

impl SqliteQueue {
    /// How often a waiting [`Queue::dequeue`] looks for messages enqueued by other processes.
    pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

    /// A queue over `pool`, whose database has Butler's SQLite migrations applied.
    pub fn new(pool: SqlitePool) -> Self {
        Self {
            pool,
            writer: Arc::default(),
            wakers: Arc::default(),
        }
    }

    /// The waiting wakeup shared by waiters on `queue` in this process.
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

    /// Runs `work` on the writer of the pool's database, found or opened on first use.
    async fn write<T, F>(&self, doing: String, work: F) -> Result<T>
    where
        F: Fn(&Connection) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let writer = self
            .writer
            .get_or_try_init(|| Writer::shared(&self.pool, false, "the SQLite queue's database"))
            .await?;
        let location = Arc::clone(writer.location());
        writer
            .run(doing.clone(), move |conn| {
                work(conn).map_err(|e| sqlite_error(&location, &doing, &e))
            })
            .await
    }

    /// One dequeue attempt: dead-letters the visible exhausted messages, then leases up to `max`.
    async fn try_dequeue(&self, queue: &str, max: usize, lease: Duration) -> Result<Vec<Delivery>> {
        let doing = format!("dequeue from queue {queue:?}");
        let queue = queue.to_owned();
        self.write(doing, move |conn| {
            let now = Utc::now();
            let now_ms = now.timestamp_millis();
            // Looked for first: the move is a statement that SQLite journals even when it
            // finds nothing.
            let exhausted: bool = conn
                .prepare_cached(EXHAUSTED)?
                .query_row((&queue, now_ms), |row| row.get(0))?;
            if exhausted {
                conn.prepare_cached(BURY)?.execute((
                    &queue,
                    now_ms,
                    history_line(now, "dead-lettered after "),
                ))?;
                conn.prepare_cached(UNBURY)?.execute((&queue, now_ms))?;
            }
            let ids = conn
                .prepare_cached(NEXT)?
                .query_map(
                    (&queue, now_ms, i64::try_from(max).unwrap_or(i64::MAX)),
                    |row| row.get::<_, i64>(0),
                )?
                .collect::<rusqlite::Result<Vec<i64>>>()?;
            let until = now_ms.saturating_add(millis(lease));
            let line = history_line(now, "delivered (delivery ");
            let lease = format!("{lease:?}");
            let mut statement = conn.prepare_cached(LEASE)?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                out.push(statement.query_row((until, &line, &lease, id), |row| {
                    Ok(Delivery {
                        tag: DeliveryTag {
                            message_id: id,
                            token: u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
                        },
                        payload: row.get(1)?,
                        deliveries: count(row.get(2)?),
                        enqueued_at: time(row.get(3)?),
                    })
                })?);
            }
            Ok(out)
        })
        .await
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

    /// Runs `sql` (one of [`ACK`], [`NACK`] and [`EXTEND`], with `?1` the message and `?2`
    /// the token, then `extra`) once per tag, and answers per tag whether it changed the
    /// tag's message, with the queues that `sql` returned.
    async fn held(
        &self,
        action: &str,
        tags: &[DeliveryTag],
        sql: &'static str,
        extra: Extra,
    ) -> Result<(Vec<bool>, HashSet<String>)> {
        if tags.is_empty() {
            return Ok((Vec::new(), HashSet::new()));
        }
        let tags = tags.to_vec();
        self.write(format!("{action} {} message(s)", tags.len()), move |conn| {
            let mut statement = conn.prepare_cached(sql)?;
            let mut queues = HashSet::new();
            let mut answers = Vec::with_capacity(tags.len());
            for tag in &tags {
                // A token beyond i64 was never issued.
                let Ok(token) = i64::try_from(tag.token) else {
                    answers.push(false);
                    continue;
                };
                let changed = match &extra {
                    Extra::None => statement.execute((tag.message_id, token))? > 0,
                    Extra::Until(until) => statement.execute((tag.message_id, token, until))? > 0,
                    Extra::Nack(at, line) => {
                        let queue: Option<String> = statement
                            .query_row((tag.message_id, token, at, line), |row| row.get(0))
                            .optional()?;
                        queue.map(|q| queues.insert(q)).is_some()
                    }
                };
                answers.push(changed);
            }
            Ok((answers, queues))
        })
        .await
    }
}

/// The parameters of [`SqliteQueue::held`]'s statement after the message and the token.
#[derive(Debug)]
enum Extra {
    /// None ([`ACK`]).
    None,
    /// The lease's new end ([`EXTEND`]).
    Until(i64),
    /// When the message is visible again and the history line ([`NACK`]).
    Nack(i64, String),
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
        let doing = format!("enqueue {} message(s) to queue {queue:?}", messages.len());
        let name = queue.to_owned();
        let ids = self
            .write(doing, move |conn| {
                let now_ms = Utc::now().timestamp_millis();
                let mut statement = conn.prepare_cached(INSERT)?;
                let mut ids = Vec::with_capacity(messages.len());
                for message in &messages {
                    statement.execute((
                        &name,
                        &message.payload,
                        message.priority,
                        now_ms.saturating_add(millis(message.delay)),
                        i64::from(message.max_deliveries),
                        now_ms,
                    ))?;
                    ids.push(conn.last_insert_rowid());
                }
                Ok(ids)
            })
            .await?;
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
        Ok(self.held("ack", tags, ACK, Extra::None).await?.0)
    }

    async fn nack(&self, tags: &[DeliveryTag], delay: Duration) -> Result<Vec<bool>> {
        let now = Utc::now();
        let at = now.timestamp_millis().saturating_add(millis(delay));
        let line = history_line(now, &format!("nacked (visible again in {delay:?})")) + "\n";
        let (answers, queues) = self.held("nack", tags, NACK, Extra::Nack(at, line)).await?;
        for queue in queues {
            self.wake(&queue);
        }
        Ok(answers)
    }

    async fn extend(&self, tags: &[DeliveryTag], lease: Duration) -> Result<Vec<bool>> {
        let until = Utc::now().timestamp_millis().saturating_add(millis(lease));
        let (answers, _) = self
            .held("extend the lease of", tags, EXTEND, Extra::Until(until))
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
