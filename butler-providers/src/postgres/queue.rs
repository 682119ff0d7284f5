//! PostgreSQL queue.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use butler_core::queue::{
    DeadLetter, Delivery, DeliveryTag, NewMessage, Queue, QueueDepth, validate_queue_name,
};
use butler_core::{Error, Result};
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::{PgPool, PgRow};
use tokio::sync::Notify;

use super::listen::{Heard, Listening};

/// SQL: the timestamp `$at` as RFC 3339 text in UTC with milliseconds, as history lines start.
macro_rules! utc_text {
    ($at:literal) => {
        concat!(
            "to_char(",
            $at,
            r#" AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"#
        )
    };
}

/// SQL: a timestamp as whole microseconds since the epoch.
macro_rules! micros {
    ($at:literal) => {
        concat!("(EXTRACT(EPOCH FROM ", $at, ") * 1000000)::int8")
    };
}

/// SQL: a `$micros` parameter (bigint) as an interval.
macro_rules! span {
    ($micros:literal) => {
        concat!("(", $micros, "::float8 * interval '1 microsecond')")
    };
}

/// SQL: the history entries (zero or one) recording the end of row `m`'s lease, when it has one.
macro_rules! expiry_entry {
    () => {
        concat!(
            "CASE WHEN m.leased_until IS NOT NULL THEN ARRAY[",
            utc_text!("m.leased_until"),
            " || ' lease expired (delivery ' || m.deliveries || ')'] ELSE '{}'::text[] END"
        )
    };
}

/// SQL: the notification channel of the schema first on the search path. A channel name is at
/// most 63 bytes; longer schema names are replaced by their MD5.
macro_rules! channel {
    () => {
        "(CASE WHEN octet_length(current_schema()) <= 50 \
              THEN 'butler_queue_' || current_schema() \
              ELSE 'butler_queue_' || md5(current_schema()) END)"
    };
}

/// SQL: the tags in `$1` (ids) and `$2` (tokens) as rows `t(id, token)`.
macro_rules! tags {
    () => {
        "unnest($1::int8[], $2::int8[]) AS t(id, token)"
    };
}

/// SQL: row `m` is still held by its tag row `t`.
macro_rules! held {
    () => {
        "m.id = t.id AND m.token = t.token AND m.leased_until IS NOT NULL"
    };
}

/// Enqueues one batch and notifies listeners of the schema, in one statement.
const ENQUEUE: &str = concat!(
    "WITH added AS (
         INSERT INTO queue_messages
             (queue, payload, priority, visible_at, max_deliveries, enqueued_at)
         SELECT $1, t.payload, t.priority, now() + ",
    span!("t.delay"),
    ", t.max_deliveries, now()
         FROM unnest($2::bytea[], $3::int4[], $4::int8[], $5::int8[])
              WITH ORDINALITY AS t(payload, priority, delay, max_deliveries, n)
         ORDER BY t.n
         RETURNING id
     ),
     woken AS MATERIALIZED (SELECT pg_notify(",
    channel!(),
    ", $1))
     SELECT added.id FROM added CROSS JOIN woken"
);

/// Moves the visible exhausted messages of `$1` to the dead letters, then leases up to `$2` of
/// the visible others for `$3` microseconds (`$4` names the lease in the history), in one
/// statement. Rows another dequeue is working on are skipped, not waited for.
const CLAIM: &str = concat!(
    "WITH exhausted AS (
         SELECT id FROM queue_messages
         WHERE queue = $1 AND visible_at <= now() AND deliveries >= max_deliveries
         FOR UPDATE SKIP LOCKED
     ),
     buried AS (
         DELETE FROM queue_messages m USING exhausted e
         WHERE m.id = e.id
         RETURNING m.id, m.queue, m.payload, m.deliveries, m.enqueued_at,
                   m.history || ",
    expiry_entry!(),
    " || (",
    utc_text!("now()"),
    " || ' dead-lettered after ' || m.deliveries || ' deliveries (max_deliveries '
                                || m.max_deliveries || ')') AS history
     ),
     dead AS (
         INSERT INTO queue_dead (id, queue, payload, deliveries, enqueued_at, history, dead_at)
         SELECT id, queue, payload, deliveries, enqueued_at, history, now() FROM buried
     ),
     due AS (
         SELECT id, visible_at FROM queue_messages
         WHERE queue = $1 AND visible_at <= now() AND deliveries < max_deliveries
         ORDER BY priority DESC, visible_at, id
         LIMIT $2
         FOR UPDATE SKIP LOCKED
     ),
     claimed AS (
         UPDATE queue_messages m
         SET deliveries = m.deliveries + 1,
             token = m.token + 1,
             leased_until = now() + ",
    span!("$3"),
    ",
             visible_at = now() + ",
    span!("$3"),
    ",
             history = m.history || ",
    expiry_entry!(),
    " || (",
    utc_text!("now()"),
    " || ' delivered (delivery ' || (m.deliveries + 1) || ', lease ' || $4 || ')')
         FROM due
         WHERE m.id = due.id
         RETURNING m.id, m.token, m.payload, m.deliveries, ",
    micros!("m.enqueued_at"),
    " AS enqueued_us, m.priority, due.visible_at AS was_visible_at
     )
     SELECT id, token, payload, deliveries, enqueued_us FROM claimed
     ORDER BY priority DESC, was_visible_at, id"
);

/// Seconds from now until the next message of `$1` becomes visible (negative when one is).
const NEXT_DUE: &str = "SELECT EXTRACT(EPOCH FROM min(visible_at) - now())::float8
                        FROM queue_messages WHERE queue = $1";

const ACK: &str = concat!(
    "DELETE FROM queue_messages m USING ",
    tags!(),
    " WHERE ",
    held!(),
    " RETURNING m.id, m.token"
);

/// Releases the held messages, visible again `$3` microseconds from now (`$4` ends the history
/// entry), and notifies listeners of the schema.
const NACK: &str = concat!(
    "WITH released AS (
         UPDATE queue_messages m
         SET leased_until = NULL,
             visible_at = now() + ",
    span!("$3"),
    ",
             history = m.history || (",
    utc_text!("now()"),
    " || $4)
         FROM ",
    tags!(),
    " WHERE ",
    held!(),
    " RETURNING m.id, m.token, m.queue
     ),
     woken AS MATERIALIZED (
         SELECT pg_notify(",
    channel!(),
    ", q.queue) FROM (SELECT DISTINCT queue FROM released) q
     )
     SELECT released.id, released.token, released.queue, (SELECT count(*) FROM woken) AS woken
     FROM released"
);

const EXTEND: &str = concat!(
    "UPDATE queue_messages m SET leased_until = now() + ",
    span!("$3"),
    ", visible_at = now() + ",
    span!("$3"),
    " FROM ",
    tags!(),
    " WHERE ",
    held!(),
    " RETURNING m.id, m.token"
);

const DEPTH: &str = "SELECT count(*) FILTER (WHERE visible_at <= now()) AS ready,
            count(*) FILTER (WHERE visible_at > now() AND leased_until IS NULL) AS delayed,
            count(*) FILTER (WHERE visible_at > now() AND leased_until IS NOT NULL) AS leased,
            EXTRACT(EPOCH FROM now() - min(visible_at) FILTER (WHERE visible_at <= now()))::float8
                AS oldest_secs,
            (SELECT count(*) FROM queue_dead WHERE queue = $1) AS dead
     FROM queue_messages WHERE queue = $1";

const DEAD_LETTERS: &str = concat!(
    "SELECT id, payload, deliveries, history, ",
    micros!("dead_at"),
    " AS dead_us FROM queue_dead WHERE queue = $1 ORDER BY dead_at, id LIMIT $2"
);

/// Longest lease, delay or nack delay stored; longer ones are cut to this (about 100 years).
const MAX_SPAN: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// How long a waiting dequeue pauses when a message is visible but another consumer is taking it.
const BUSY_PAUSE: Duration = Duration::from_millis(10);

/// A [`Queue`] in PostgreSQL tables, shared by every process and machine using the database.
///
/// A dequeue is one statement that leases rows with `FOR UPDATE SKIP LOCKED`, so consumers never
/// wait on each other and a message is leased to one consumer at a time; ack, nack and extend
/// are one statement each for a whole batch of tags. Times (visibility, leases, history) are the
/// database server's clock, so consumers on machines with skewed clocks still agree.
///
/// Wake-ups reach every process: each enqueue and nack sends a notification on a channel named
/// after the schema (`butler_queue_<schema>`), and a waiting [`Queue::dequeue`] listens on it
/// through one connection per `PgQueue`: shared by clones, opened on the first wait with the
/// pool's connection options and `application_name` [`PgQueue::LISTENER_APPLICATION_NAME`], and
/// closed when the last clone is dropped or the pool is closed. A waiting dequeue also wakes when
/// its next delayed message or expired lease is due, and looks again every
/// [`PgQueue::POLL_INTERVAL`] in case a notification was lost while the listener reconnected.
///
/// The tables come from the `0002_queue` migration in the pool's search path schema.
#[derive(Debug, Clone)]
pub struct PgQueue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    wakers: Arc<Wakers>,
    /// The listener task, started by the first waiting dequeue.
    listener: tokio::sync::Mutex<Option<Listening>>,
}

/// The wake-ups of waiting dequeues in this process, by queue name.
#[derive(Debug, Default)]
struct Wakers(Mutex<HashMap<String, Arc<Notify>>>);

impl Wakers {
    fn get(&self, queue: &str) -> Arc<Notify> {
        let mut wakers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(notify) = wakers.get(queue) {
            return Arc::clone(notify);
        }
        let notify = Arc::new(Notify::new());
        wakers.insert(queue.to_owned(), Arc::clone(&notify));
        notify
    }

    fn wake(&self, queue: &str) {
        let wakers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(notify) = wakers.get(queue) {
            notify.notify_waiters();
        }
    }

    fn wake_all(&self) {
        let wakers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for notify in wakers.values() {
            notify.notify_waiters();
        }
    }
}

impl PgQueue {
    /// How often a waiting [`Queue::dequeue`] looks again with no notification and nothing due.
    pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

    /// The `application_name` of the listener's connection, which tells it apart in
    /// `pg_stat_activity`.
    pub const LISTENER_APPLICATION_NAME: &str = "butler queue listener";

    /// A queue over `pool`, whose connections' search path starts with the schema holding
    /// Butler's PostgreSQL migrations.
    pub fn new(pool: PgPool) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                wakers: Arc::default(),
                listener: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// The pool this queue runs its statements on.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The notification channel of this queue's schema, where enqueues and nacks announce the
    /// queue name they changed.
    pub async fn channel(&self) -> Result<String> {
        sqlx::query_scalar(concat!("SELECT ", channel!()))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(db_error("read the queue's notification channel".to_owned()))
    }

    /// Starts the listener unless it runs. After this returns `Ok`, a notification sent by any
    /// process wakes the waiters of its queue.
    async fn ensure_listening(&self) -> Result<()> {
        let mut slot = self.inner.listener.lock().await;
        if slot.as_ref().is_some_and(Listening::is_running) {
            return Ok(());
        }
        let channel = self.channel().await?;
        let wakers = Arc::clone(&self.inner.wakers);
        let listening = Listening::start(
            &self.inner.pool,
            &channel,
            Self::LISTENER_APPLICATION_NAME,
            "queue notifications",
            move |heard| match heard {
                Heard::Notification(queue) => wakers.wake(queue),
                // Whatever was sent meanwhile is lost, so every waiter looks again.
                Heard::Gap => wakers.wake_all(),
            },
        )
        .await?;
        *slot = Some(listening);
        Ok(())
    }

    /// One dequeue attempt: dead-letters the visible exhausted messages, then leases up to `max`.
    async fn claim(&self, queue: &str, max: usize, lease: Duration) -> Result<Vec<Delivery>> {
        let rows = sqlx::query(CLAIM)
            .bind(queue)
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .bind(micros(lease))
            .bind(format!("{lease:?}"))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(db_error(format!("dequeue from queue {queue:?}")))?;
        rows.iter()
            .map(delivery)
            .collect::<Result<_, _>>()
            .map_err(db_error(format!(
                "read the messages dequeued from {queue:?}"
            )))
    }

    /// How long until a message of `queue` becomes visible (zero when one is), or `None` when
    /// the queue has no messages.
    async fn next_due(&self, queue: &str) -> Result<Option<Duration>> {
        let secs: Option<f64> = sqlx::query_scalar(NEXT_DUE)
            .bind(queue)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(db_error(format!("look for messages in queue {queue:?}")))?;
        Ok(secs.map(seconds))
    }

    /// Runs `sql` (a statement over the tags `$1`, `$2` returning `id, token` and maybe `queue`
    /// of the rows it changed, with `$3` bound to `span` and `$4` to `note` when given) and
    /// answers per tag whether it changed that tag's message, with the queues of the changed
    /// messages.
    async fn held(
        &self,
        action: &str,
        tags: &[DeliveryTag],
        repeated: Repeated,
        sql: &'static str,
        span: Option<Duration>,
        note: Option<String>,
    ) -> Result<(Vec<bool>, HashSet<String>)> {
        let mut queues = HashSet::new();
        if tags.is_empty() {
            return Ok((Vec::new(), queues));
        }
        // A token beyond i64 was never issued; leaving it out answers `false` for it.
        let (ids, tokens): (Vec<i64>, Vec<i64>) = tags
            .iter()
            .filter_map(|tag| Some((tag.message_id, i64::try_from(tag.token).ok()?)))
            .unzip();
        let mut query = sqlx::query(sql).bind(ids).bind(tokens);
        if let Some(span) = span {
            query = query.bind(micros(span));
        }
        if let Some(note) = note {
            query = query.bind(note);
        }
        let rows = query
            .fetch_all(&self.inner.pool)
            .await
            .map_err(db_error(format!("{action} {} message(s)", tags.len())))?;
        let mut changed: HashSet<(i64, i64)> = HashSet::with_capacity(rows.len());
        for row in &rows {
            if let (Ok(id), Ok(token)) = (row.try_get("id"), row.try_get("token")) {
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

fn delivery(row: &PgRow) -> Result<Delivery, sqlx::Error> {
    Ok(Delivery {
        tag: DeliveryTag {
            message_id: row.try_get("id")?,
            token: u64::try_from(row.try_get::<i64, _>("token")?).unwrap_or(0),
        },
        payload: row.try_get("payload")?,
        deliveries: count(row.try_get("deliveries")?),
        enqueued_at: time(row.try_get("enqueued_us")?),
    })
}

fn count(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn time(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or(DateTime::UNIX_EPOCH)
}

/// `d`, at most [`MAX_SPAN`], in whole microseconds.
fn micros(d: Duration) -> i64 {
    i64::try_from(d.min(MAX_SPAN).as_micros()).unwrap_or(i64::MAX)
}

/// `secs` as a duration; zero when negative or not a number.
fn seconds(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::ZERO)
}

/// Maps a database failure while doing `action` to Butler's error: a lost or refused connection,
/// a server shutting down or out of resources, a deadlock or a serialization failure are worth
/// retrying; anything else is a backend failure.
fn db_error(action: String) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| {
        let code = match &e {
            sqlx::Error::Database(db) => db.code().map(|code| code.into_owned()),
            _ => None,
        };
        let retryable = match code.as_deref() {
            Some(code) => {
                ["08", "53", "57"]
                    .iter()
                    .any(|class| code.starts_with(class))
                    || matches!(code, "40001" | "40P01" | "55P03")
            }
            None => matches!(
                e,
                sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::Tls(_)
            ),
        };
        if retryable {
            Error::unavailable(
                format!(
                    "could not {action}: the PostgreSQL server is unreachable, busy or shutting \
                     down; retry, and check the server if this persists"
                ),
                e,
            )
        } else if code.as_deref() == Some("42P01") {
            Error::backend(
                format!(
                    "could not {action}: the queue tables are missing from the schema on the \
                     search path; open the database through Butler's PostgreSQL store, which \
                     applies its migrations"
                ),
                e,
            )
        } else {
            Error::backend(format!("could not {action} in the PostgreSQL queue"), e)
        }
    }
}

#[async_trait]
impl Queue for PgQueue {
    async fn enqueue(&self, queue: &str, messages: Vec<NewMessage>) -> Result<Vec<i64>> {
        validate_queue_name(queue)?;
        for (index, message) in messages.iter().enumerate() {
            message.validate(queue, index)?;
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let payloads: Vec<&[u8]> = messages.iter().map(|m| m.payload.as_slice()).collect();
        let priorities: Vec<i32> = messages.iter().map(|m| m.priority).collect();
        let delays: Vec<i64> = messages.iter().map(|m| micros(m.delay)).collect();
        let max_deliveries: Vec<i64> = messages
            .iter()
            .map(|m| i64::from(m.max_deliveries))
            .collect();
        let mut ids: Vec<i64> = sqlx::query_scalar(ENQUEUE)
            .bind(queue)
            .bind(payloads)
            .bind(priorities)
            .bind(delays)
            .bind(max_deliveries)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(db_error(format!(
                "enqueue {} message(s) to queue {queue:?}",
                messages.len()
            )))?;
        // Ids are drawn in the order of the rows inserted, but RETURNING may list them in any.
        ids.sort_unstable();
        self.inner.wakers.wake(queue);
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
        let notify = self.inner.wakers.get(queue);
        if !wait.is_zero()
            && let Err(error) = self.ensure_listening().await
        {
            tracing::warn!(
                %error,
                "waiting dequeues from queue {queue:?} poll every {:?} instead of listening",
                Self::POLL_INTERVAL
            );
        }
        loop {
            // Registered before looking, so a wake-up between the look and the wait still counts.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let out = self.claim(queue, max, lease).await?;
            let now = tokio::time::Instant::now();
            if !out.is_empty() || deadline.is_some_and(|d| now >= d) {
                return Ok(out);
            }
            let mut until = now + Self::POLL_INTERVAL;
            if let Some(due) = self.next_due(queue).await? {
                until = until.min(now + due.max(BUSY_PAUSE));
            }
            if let Some(deadline) = deadline {
                until = until.min(deadline);
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<Vec<bool>> {
        let (answers, _) = self
            .held("ack", tags, Repeated::LeaseGone, ACK, None, None)
            .await?;
        Ok(answers)
    }

    async fn nack(&self, tags: &[DeliveryTag], delay: Duration) -> Result<Vec<bool>> {
        let note = format!(" nacked (visible again in {delay:?})");
        let (answers, queues) = self
            .held(
                "nack",
                tags,
                Repeated::LeaseGone,
                NACK,
                Some(delay),
                Some(note),
            )
            .await?;
        // Waiters of this process wake without waiting for the notification's round trip.
        for queue in queues {
            self.inner.wakers.wake(&queue);
        }
        Ok(answers)
    }

    async fn extend(&self, tags: &[DeliveryTag], lease: Duration) -> Result<Vec<bool>> {
        let (answers, _) = self
            .held(
                "extend the lease of",
                tags,
                Repeated::SameAnswer,
                EXTEND,
                Some(lease),
                None,
            )
            .await?;
        Ok(answers)
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth> {
        validate_queue_name(queue)?;
        let action = || format!("count the messages of queue {queue:?}");
        let row = sqlx::query(DEPTH)
            .bind(queue)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(db_error(action()))?;
        let read = |row: &PgRow| -> Result<QueueDepth, sqlx::Error> {
            let n = |column: &str| -> Result<u64, sqlx::Error> {
                Ok(u64::try_from(row.try_get::<i64, _>(column)?).unwrap_or(0))
            };
            let oldest: Option<f64> = row.try_get("oldest_secs")?;
            Ok(QueueDepth {
                ready: n("ready")?,
                delayed: n("delayed")?,
                leased: n("leased")?,
                dead: n("dead")?,
                oldest_ready_age: oldest.map(seconds),
            })
        };
        read(&row).map_err(db_error(action()))
    }

    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        validate_queue_name(queue)?;
        let action = || format!("list the dead letters of queue {queue:?}");
        let rows = sqlx::query(DEAD_LETTERS)
            .bind(queue)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(db_error(action()))?;
        rows.iter()
            .map(|row| -> Result<DeadLetter, sqlx::Error> {
                Ok(DeadLetter {
                    message_id: row.try_get("id")?,
                    payload: row.try_get("payload")?,
                    deliveries: count(row.try_get("deliveries")?),
                    history: row.try_get("history")?,
                    dead_at: time(row.try_get("dead_us")?),
                })
            })
            .collect::<Result<_, _>>()
            .map_err(db_error(action()))
    }
}
