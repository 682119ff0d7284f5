//! The [`Queue`] trait: at-least-once delivery of work with leases.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::{Error, Result};

/// A queue shared across tasks and threads.
pub type DynQueue = dyn Queue;

/// Deliveries allowed by [`NewMessage::new`] before a message is dead-lettered.
pub const DEFAULT_MAX_DELIVERIES: u32 = 5;

/// Longest accepted queue name, in bytes.
pub const MAX_QUEUE_NAME_LEN: usize = 255;

/// A message to enqueue: its payload and how it is to be delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// The bytes handed to the consumer, unchanged.
    pub payload: Vec<u8>,
    /// Higher priorities are delivered first.
    pub priority: i32,
    /// The message is invisible until this long after it was enqueued.
    pub delay: Duration,
    /// After this many deliveries without an ack, the next would-be delivery moves the message
    /// to the dead-letter list instead. At least 1.
    pub max_deliveries: u32,
}

impl NewMessage {
    /// A message with priority 0, no delay and [`DEFAULT_MAX_DELIVERIES`].
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Self {
            payload: payload.into(),
            priority: 0,
            delay: Duration::ZERO,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
        }
    }

    /// The same message with `priority` (higher first).
    #[must_use]
    pub fn with_priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// The same message, invisible until `delay` after it is enqueued.
    #[must_use]
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// The same message, dead-lettered instead of being delivered a `max_deliveries + 1`-th time.
    #[must_use]
    pub fn with_max_deliveries(mut self, max_deliveries: u32) -> Self {
        self.max_deliveries = max_deliveries;
        self
    }

    /// Checks what every backend rejects: `max_deliveries` of 0.
    ///
    /// `index` is the message's position in its batch, named in the error.
    pub fn validate(&self, queue: &str, index: usize) -> Result<()> {
        if self.max_deliveries == 0 {
            return Err(Error::InvalidInput(format!(
                "message {index} of the batch for queue {queue:?} has max_deliveries 0, so it \
                 could never be delivered; use at least 1 (the default is \
                 {DEFAULT_MAX_DELIVERIES}). Nothing was enqueued."
            )));
        }
        Ok(())
    }
}

/// Proof of one delivery, presented to [`Queue::ack`], [`Queue::nack`] and [`Queue::extend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryTag {
    /// The message, as returned by [`Queue::enqueue`].
    pub message_id: i64,
    /// Fencing token, new on every delivery of the message: a tag from an earlier delivery no
    /// longer matches.
    pub token: u64,
}

/// A message handed to a consumer, leased to it until it acks, nacks or the lease runs out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// What to present to ack, nack or extend this delivery.
    pub tag: DeliveryTag,
    /// The payload as enqueued.
    pub payload: Vec<u8>,
    /// How many times the message has been delivered, this delivery included (1 on the first).
    pub deliveries: u32,
    /// When the message was enqueued.
    pub enqueued_at: DateTime<Utc>,
}

/// How many messages of one queue are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Visible now: the next dequeue may deliver them. Includes messages whose lease expired.
    pub ready: u64,
    /// Not yet visible: enqueued with a delay or nacked with one.
    pub delayed: u64,
    /// Delivered, with a lease that has not expired.
    pub leased: u64,
    /// On the dead-letter list.
    pub dead: u64,
    /// How long the longest-waiting ready message has been visible; `None` when nothing is
    /// ready. A growing value means consumers do not keep up.
    pub oldest_ready_age: Option<Duration>,
}

/// A message that was delivered `max_deliveries` times without an ack, kept for inspection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message's id.
    pub message_id: i64,
    /// The payload as enqueued.
    pub payload: Vec<u8>,
    /// How many times it was delivered.
    pub deliveries: u32,
    /// One line per event, oldest first, each starting with its RFC 3339 time: every delivery,
    /// nack and lease expiry, then the move to the dead-letter list.
    pub history: Vec<String>,
    /// When it was moved to the dead-letter list.
    pub dead_at: DateTime<Utc>,
}

/// Named queues of messages with at-least-once delivery and leases.
///
/// # Contract
///
/// Every implementation guarantees:
///
/// - **Atomic batches.** [`Queue::enqueue`] stores every message of the batch or none.
/// - **Order.** [`Queue::dequeue`] delivers visible messages by highest priority first, then
///   earliest visible-at (enqueue time plus delay, or the end of the last lease or nack delay),
///   then lowest id. Ids are positive and increase in enqueue order.
/// - **Leases.** A delivered message is invisible to every consumer, in this process or any other
///   sharing the backend, until its lease ends. When the lease expires without an ack it becomes
///   visible again, and its next delivery counts as another one (at least once, never lost).
/// - **Fencing.** Each delivery carries a new [`DeliveryTag::token`]. [`Queue::ack`],
///   [`Queue::nack`] and [`Queue::extend`] act only on a message still held by that delivery: a
///   tag whose message was acked, nacked or redelivered since answers `false` and changes
///   nothing. A tag whose lease expired but whose message was not yet redelivered still holds it.
/// - **Dead letters.** A message delivered `max_deliveries` times is not delivered again: when it
///   next becomes visible, the following dequeue moves it to the dead-letter list with its
///   history. Until then [`Queue::depth`] counts it where its visibility puts it.
/// - **Isolation.** Messages of one queue name are never delivered from another. The empty name
///   is rejected with [`Error::InvalidInput`].
///
/// Callers may assume a message is delivered at least once, not exactly once: consumers must be
/// idempotent, and the run store, not the queue, is the truth about a task's state.
#[async_trait]
pub trait Queue: Send + Sync + Debug + 'static {
    /// Stores `messages` in `queue`, all or none, and returns their ids in the same order.
    async fn enqueue(&self, queue: &str, messages: Vec<NewMessage>) -> Result<Vec<i64>>;

    /// Up to `max` visible messages, highest priority first, then oldest; each leased for `lease`.
    ///
    /// When none is visible, waits up to `wait` for a first one, then returns what it found
    /// (possibly nothing). A message enqueued or nacked through the same queue value (or a clone)
    /// wakes the wait at once; messages from other processes are noticed by polling, at an
    /// interval each implementation documents. `max` of 0 returns nothing at once.
    async fn dequeue(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>>;

    /// Removes the delivered messages for good. One answer per tag, in order: `false` when the
    /// lease was lost (the message was redelivered, nacked or already acked) and nothing changed.
    async fn ack(&self, tags: &[DeliveryTag]) -> Result<Vec<bool>>;

    /// Gives the messages back, visible again after `delay`; the delivery still counts. One answer
    /// per tag, as for [`Queue::ack`].
    async fn nack(&self, tags: &[DeliveryTag], delay: Duration) -> Result<Vec<bool>>;

    /// Heartbeat: each held message's lease now ends `lease` from now. One answer per tag, as
    /// for [`Queue::ack`].
    async fn extend(&self, tags: &[DeliveryTag], lease: Duration) -> Result<Vec<bool>>;

    /// How many messages of `queue` are in each state.
    async fn depth(&self, queue: &str) -> Result<QueueDepth>;

    /// The oldest `limit` dead letters of `queue`, in the order they were moved there.
    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>>;
}

/// Checks a queue name the way every backend does: non-empty, at most [`MAX_QUEUE_NAME_LEN`]
/// bytes, no control characters.
pub fn validate_queue_name(queue: &str) -> Result<()> {
    if queue.is_empty() {
        return Err(Error::InvalidInput(
            "the queue name is empty; name the queue, e.g. \"tasks\"".to_owned(),
        ));
    }
    if queue.len() > MAX_QUEUE_NAME_LEN {
        return Err(Error::InvalidInput(format!(
            "the queue name {:?}… is {} bytes long; use at most {MAX_QUEUE_NAME_LEN}",
            queue.chars().take(40).collect::<String>(),
            queue.len()
        )));
    }
    if queue.chars().any(char::is_control) {
        return Err(Error::InvalidInput(format!(
            "the queue name {queue:?} contains a control character; use printable characters \
             only"
        )));
    }
    Ok(())
}

/// One history line: the time as RFC 3339 with milliseconds, then what happened.
///
/// Backends write history in this form so dead letters read the same everywhere.
pub fn history_line(at: DateTime<Utc>, event: &str) -> String {
    format!(
        "{} {event}",
        at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_set_each_field() {
        let m = NewMessage::new(b"x".to_vec())
            .with_priority(3)
            .with_delay(Duration::from_secs(2))
            .with_max_deliveries(7);
        assert_eq!(m.payload, b"x");
        assert_eq!(m.priority, 3);
        assert_eq!(m.delay, Duration::from_secs(2));
        assert_eq!(m.max_deliveries, 7);
        let d = NewMessage::new("y");
        assert_eq!(
            (d.priority, d.delay, d.max_deliveries),
            (0, Duration::ZERO, 5)
        );
    }

    #[test]
    fn zero_max_deliveries_is_rejected_with_its_position() {
        let err = NewMessage::new("x")
            .with_max_deliveries(0)
            .validate("jobs", 3)
            .unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)));
        assert!(err.to_string().contains("message 3"), "{err}");
    }

    #[test]
    fn queue_names_are_checked() {
        assert!(validate_queue_name("jobs").is_ok());
        assert!(matches!(
            validate_queue_name(""),
            Err(Error::InvalidInput(_))
        ));
        assert!(validate_queue_name(&"q".repeat(256)).is_err());
        assert!(validate_queue_name("a\nb").is_err());
    }

    #[test]
    fn history_lines_start_with_the_time() {
        let at = DateTime::from_timestamp_millis(1_700_000_000_123).unwrap();
        assert_eq!(
            history_line(at, "delivered"),
            "2023-11-14T22:13:20.123Z delivered"
        );
    }
}
