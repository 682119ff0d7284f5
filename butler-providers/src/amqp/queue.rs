//! RabbitMQ queue.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use butler_core::queue::{
    DEFAULT_MAX_DELIVERIES, DeadLetter, Delivery, DeliveryTag, NewMessage, Queue, QueueDepth,
    history_line, validate_queue_name,
};
use butler_core::{Error, Result};
use chrono::{DateTime, Utc};
use lapin::message::{Delivery as AmqpDelivery, DeliveryResult};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use lapin::{
    Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind,
    ExchangeKind, PublisherConfirm,
};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

use super::config::AmqpConfig;

/// Butler priorities that keep their order in RabbitMQ; see [`AmqpQueue::PRIORITIES`].
const PRIORITIES: RangeInclusive<i32> = -10..=10;
/// The main queue's `x-max-priority`: one broker level per priority in [`PRIORITIES`].
const MAX_BROKER_PRIORITY: i32 = 20;
/// The delay chain counts in steps of this many milliseconds.
const DELAY_UNIT_MS: u64 = 10;
/// Hops of the delay chain: hop `b` holds a message for `DELAY_UNIT_MS << b`.
const DELAY_HOPS: u32 = 28;
/// After a consumer's connection closes, its leased messages go back to their queue after their
/// lease, but at most this long.
const HELD_RETURN_CAP: Duration = Duration::from_secs(300);
/// An unused held queue (its process gone and its messages returned) is deleted after this.
const HELD_EXPIRES: Duration = Duration::from_secs(600);
/// How long a dequeue waits for the broker to hand back the messages it moved to its held queue.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest suffix added to `{prefix}.{queue}` (`.delay.route28`), for the name length check.
const LONGEST_SUFFIX: usize = ".delay.route28".len();
/// RabbitMQ's limit on queue and exchange names, in bytes.
const MAX_NAME_LEN: usize = 255;

const H_ID: &str = "butler-id";
const H_QUEUE: &str = "butler-queue";
const H_DELIVERIES: &str = "butler-deliveries";
const H_MAX: &str = "butler-max-deliveries";
const H_ENQUEUED: &str = "butler-enqueued-at";
const H_VISIBLE: &str = "butler-visible-at";
const H_PRIORITY: &str = "butler-priority";
const H_HISTORY: &str = "butler-history";
const H_TOKEN: &str = "butler-token";
const H_DEAD_AT: &str = "butler-dead-at";

/// A [`Queue`] on RabbitMQ (AMQP 0-9-1), for many processes on many machines.
///
/// # Layout on the broker
///
/// For Butler queue `q` and [`AmqpConfig::prefix`] `p`:
///
/// - `p.q`: a durable classic queue with `x-max-priority` 20 holding the ready messages, each
///   persistent and carrying Butler's headers (id, deliveries, max_deliveries, enqueue time,
///   history). Butler priorities −10..=10 map to broker priorities 0..=20 in order; priorities
///   outside that range count as the nearest end of it ([`AmqpQueue::PRIORITIES`]).
/// - `p.q.dead`: a durable queue of dead letters, oldest first.
/// - `p.q.delay.0` … `p.q.delay.27` with exchanges `p.q.delay.route0` … `route28`, made on the
///   first delayed message: a delay is written in binary in units of 10 ms, and the message waits
///   in hop queue `b` (its `x-message-ttl` is 10 ms × 2^b) for each set bit `b`, moved on by
///   dead-lettering through topic exchanges that read the bits from its routing key, and finally
///   into `p.q`. So any delay up to [`AmqpQueue::MAX_DELAY`] takes at most 28 fixed queues, and
///   [`Queue::depth`] counts every delayed message, whichever process delayed it. Delays are
///   rounded up to the next 10 ms.
/// - `p.held.{instance}`: one durable queue per opened [`AmqpQueue`] (its clones share it),
///   made by its first dequeue, consumed by it alone, holding its leased messages; deleted when
///   the value is closed or dropped holding no lease, otherwise by the broker 10 minutes after
///   its connection closed. A value that never dequeues makes none.
///   Open one value per process and clone it. `p.return` is the headers exchange through which
///   held messages go back to `p.q`.
///
/// # Delivery
///
/// A dequeue takes messages with `basic.get` (highest priority first, then oldest), and for each
/// publishes, with a publisher confirm, a copy whose delivery count is one higher to its held
/// queue, then acks the original. The copy is what the consumer leases: the count is on the
/// broker before the consumer sees the message, so a consumer that dies mid-task still used up
/// a delivery. `ack` acks the copy; `nack` republishes it (through the delay chain for a delay)
/// and acks it; `extend` moves the lease's deadline. A background task rejects the copies whose
/// lease ran out, and RabbitMQ dead-letters them through `p.return` to the tail of `p.q`. When a
/// process dies, its channel closes and the copies return to `p.q` once their lease (at most
/// 5 minutes) has passed. A message delivered `max_deliveries` times is moved to `p.q.dead` by
/// the next dequeue that takes it.
///
/// # Differences from the contract
///
/// - **Batches** are validated before anything is sent, so bad input stores nothing, but a
///   broker failure in the middle of a batch may store part of it; the error says how much.
/// - **Duplicates.** A connection lost between a dequeue's copy and its ack of the original
///   leaves both, so the message may be delivered twice (at least once, as promised).
/// - **Leases** are enforced by the process holding them: a tag whose lease expired answers
///   `false` as soon as the message is given back, even before it is delivered again. Tags are
///   answered only by the [`AmqpQueue`] (or a clone) that delivered them, and only while its
///   connection lasts: when it fails, the next call reconnects and the old tags answer `false`.
/// - [`QueueDepth::leased`] counts this process's leases only; `oldest_ready_age` is the age of
///   the next message a dequeue would take.
/// - **Waiting.** A waiting dequeue wakes at once for messages enqueued or nacked through this
///   value or a clone, and looks for others (one `basic.get`) every [`AmqpConfig::poll_ms`]
///   (50 ms by default).
/// - [`Queue::dead_letters`] reads the dead letters by taking and returning them, so a
///   concurrent call in another process may see fewer.
/// - Ids are the enqueue time in microseconds times 256 plus a per-process number: increasing
///   within a process, and across processes as far as their clocks agree.
#[derive(Clone)]
pub struct AmqpQueue {
    inner: Arc<Inner>,
}

struct Inner {
    config: AmqpConfig,
    /// Names the held queue of this value and its clones.
    instance: String,
    id_salt: i64,
    last_id: AtomicI64,
    token_base: u64,
    tokens: AtomicU64,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    /// Butler queues declared through this value, for [`AmqpQueue::queues`].
    known: Mutex<BTreeSet<String>>,
}

/// One connection and what lives on it; replaced whole when the connection fails.
struct Session {
    connection: Connection,
    /// Publishes, with publisher confirms.
    publish: Slot,
    /// Takes messages from main queues; they are acked moments later.
    get: Slot,
    /// Declares queues, exchanges and bindings.
    admin: Slot,
    /// The held queue and its consumer, made by the first dequeue: a process that only
    /// enqueues or reads depths leaves nothing on the broker.
    held: tokio::sync::OnceCell<Held>,
    leases: Mutex<HashMap<u64, Lease>>,
    lease_changed: Arc<Notify>,
    declared: Mutex<HashSet<String>>,
    delays_declared: Mutex<HashSet<String>>,
}

/// A channel opened on first use and again after the broker closed it.
struct Slot {
    confirm: bool,
    channel: tokio::sync::Mutex<Option<Channel>>,
}

/// This process's held queue, consumed on its own channel; the leases are deliveries on it.
struct Held {
    _channel: Channel,
    _consumer: lapin::Consumer,
    handoff: Arc<Handoff>,
}

/// Passes each message a dequeue moved to the held queue from the consumer to that dequeue.
#[derive(Default)]
struct Handoff {
    waiting: Mutex<HashMap<u64, oneshot::Sender<Acker>>>,
    broken: AtomicBool,
}

/// A delivery held by this process.
struct Lease {
    meta: Meta,
    payload: Vec<u8>,
    acker: Acker,
    until: Instant,
}

/// Butler's headers on a message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    id: i64,
    queue: String,
    deliveries: u32,
    max_deliveries: u32,
    enqueued_at: i64,
    visible_at: i64,
    priority: i32,
    history: Vec<String>,
    dead_at: Option<i64>,
}

impl AmqpQueue {
    /// Butler priorities delivered in order; a priority outside the range counts as its nearest
    /// end (so 50 and 10 are delivered first-come among themselves).
    pub const PRIORITIES: RangeInclusive<i32> = PRIORITIES;

    /// The longest delay of an enqueue or nack, about 31 days.
    pub const MAX_DELAY: Duration = Duration::from_millis(((1 << DELAY_HOPS) - 1) * DELAY_UNIT_MS);

    /// Connects to the broker at `url` (see [`AmqpConfig::from_url`]).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(AmqpConfig::from_url(url)?).await
    }

    /// Connects with `config`: opens the connection. Nothing is declared until a queue is used;
    /// the held queue is made by the first dequeue.
    pub async fn open(config: AmqpConfig) -> Result<Self> {
        config.validate()?;
        let uuid = Uuid::new_v4();
        let random = uuid.as_u128();
        let inner = Arc::new(Inner {
            config,
            instance: uuid.simple().to_string(),
            id_salt: (random & 0xff) as i64,
            last_id: AtomicI64::new(0),
            token_base: ((random >> 8) as u64 & 0xff_ffff) << 40,
            tokens: AtomicU64::new(0),
            session: tokio::sync::Mutex::new(None),
            wakers: Mutex::default(),
            known: Mutex::default(),
        });
        inner.session().await?;
        Ok(AmqpQueue { inner })
    }

    /// The settings this queue was opened with.
    pub fn config(&self) -> &AmqpConfig {
        &self.inner.config
    }

    /// The Butler queues this value (or a clone) has declared on the broker since it connected.
    pub fn queues(&self) -> Vec<String> {
        lock(&self.inner.known).iter().cloned().collect()
    }

    /// The broker's name of the queue holding this value's leased messages (see the layout
    /// above); it exists on the broker only once this value or a clone has dequeued.
    pub fn held_queue(&self) -> String {
        self.inner.held_queue()
    }

    /// Deletes `queue` from the broker: its ready, delayed and dead messages, its queues and its
    /// exchanges. Messages this process holds for it are dropped when their lease ends.
    pub async fn delete_queue(&self, queue: &str) -> Result<()> {
        self.inner.check_name(queue)?;
        let session = self.inner.session().await?;
        let names = self.inner.names(queue);
        let channel = session.admin.channel(&session.connection).await?;
        let action = || format!("delete queue {queue:?}");
        let mut queues = vec![names.main.clone(), names.dead.clone()];
        queues.extend((0..DELAY_HOPS).map(|b| names.hop(b)));
        for name in queues {
            channel
                .queue_delete(short(&name)?, QueueDeleteOptions::default())
                .await
                .map_err(amqp_error(action()))?;
        }
        for b in 0..=DELAY_HOPS {
            channel
                .exchange_delete(short(&names.route(b))?, ExchangeDeleteOptions::default())
                .await
                .map_err(amqp_error(action()))?;
        }
        lock(&session.declared).remove(queue);
        lock(&session.delays_declared).remove(queue);
        lock(&self.inner.known).remove(queue);
        Ok(())
    }

    /// Closes the connection. Messages still leased return to their queues once their lease
    /// ends, as when the process dies; with none, this value's held queue is deleted. A later
    /// call on this value (or a clone) connects again. Dropping the last clone also closes the
    /// connection, leaving the leases to run out the same way.
    pub async fn close(&self) -> Result<()> {
        let Some(session) = self.inner.session.lock().await.take() else {
            return Ok(());
        };
        session.shut(self.inner.held_queue()).await
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The client keeps a connection open while any of its channels lives, and its own
        // bookkeeping holds them all: without this, a dropped queue would keep its leases.
        if let Some(session) = self.session.get_mut().take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let held = self.held_queue();
            runtime.spawn(async move {
                let _ = session.shut(held).await;
            });
        }
    }
}

impl fmt::Debug for AmqpQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpQueue")
            .field("config", &self.inner.config)
            .field("instance", &self.inner.instance)
            .finish_non_exhaustive()
    }
}

/// The broker names of one Butler queue.
struct Names {
    main: String,
    dead: String,
    delay_base: String,
}

impl Names {
    fn hop(&self, bit: u32) -> String {
        format!("{}.{bit}", self.delay_base)
    }

    /// The exchange a message reaches after hop `bit`, which routes it by bit `bit - 1`; route 0
    /// leads to the main queue and route [`DELAY_HOPS`] is where delayed messages start.
    fn route(&self, bit: u32) -> String {
        format!("{}.route{bit}", self.delay_base)
    }
}

impl Inner {
    fn names(&self, queue: &str) -> Names {
        let main = format!("{}.{queue}", self.config.prefix);
        Names {
            dead: format!("{main}.dead"),
            delay_base: format!("{main}.delay"),
            main,
        }
    }

    fn held_queue(&self) -> String {
        format!("{}.held.{}", self.config.prefix, self.instance)
    }

    fn return_exchange(&self) -> String {
        format!("{}.return", self.config.prefix)
    }

    /// Checks `queue` as every backend does, and that its broker names fit RabbitMQ's limit.
    fn check_name(&self, queue: &str) -> Result<()> {
        validate_queue_name(queue)?;
        let room = MAX_NAME_LEN - self.config.prefix.len() - 1 - LONGEST_SUFFIX;
        if queue.len() > room {
            return Err(Error::InvalidInput(format!(
                "the queue name {:?}… is {} bytes long, but with the prefix {:?} RabbitMQ \
                 allows at most {room}; use a shorter queue name or prefix",
                queue.chars().take(40).collect::<String>(),
                queue.len(),
                self.config.prefix
            )));
        }
        Ok(())
    }

    fn next_id(&self) -> i64 {
        let now = Utc::now().timestamp_micros().saturating_mul(256) + self.id_salt;
        let previous = self
            .last_id
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or(now);
        now.max(previous + 1)
    }

    fn next_token(&self) -> u64 {
        let n = self.tokens.fetch_add(1, Ordering::Relaxed) + 1;
        self.token_base | (n & ((1 << 40) - 1))
    }

    fn waker(&self, queue: &str) -> Arc<Notify> {
        let mut wakers = lock(&self.wakers);
        Arc::clone(wakers.entry(queue.to_owned()).or_default())
    }

    fn wake(&self, queue: &str) {
        if let Some(notify) = lock(&self.wakers).get(queue) {
            notify.notify_waiters();
        }
    }

    /// The live session, connecting first when there is none or it failed.
    async fn session(self: &Arc<Self>) -> Result<Arc<Session>> {
        let mut current = self.session.lock().await;
        if let Some(session) = current.as_ref()
            && session.alive()
        {
            return Ok(Arc::clone(session));
        }
        let session = Arc::new(Session::open(self).await?);
        tokio::spawn(reap(
            Arc::downgrade(&session),
            Arc::clone(&session.lease_changed),
            Arc::downgrade(self),
        ));
        *current = Some(Arc::clone(&session));
        Ok(session)
    }

    /// The live session if there is one; leases of a failed one are gone.
    async fn current_session(&self) -> Option<Arc<Session>> {
        let current = self.session.lock().await;
        current.as_ref().filter(|s| s.alive()).map(Arc::clone)
    }

    /// Declares `queue`'s main and dead-letter queues and its route back from held queues.
    async fn ensure_queue(&self, session: &Session, queue: &str) -> Result<()> {
        if lock(&session.declared).contains(queue) {
            return Ok(());
        }
        let names = self.names(queue);
        let action = || format!("declare queue {queue:?}");
        let channel = session.admin.channel(&session.connection).await?;
        declare_return_exchange(&channel, &self.return_exchange()).await?;
        let mut priority = FieldTable::default();
        priority.insert(
            "x-max-priority".into(),
            AMQPValue::LongInt(MAX_BROKER_PRIORITY),
        );
        channel
            .queue_declare(short(&names.main)?, durable_queue(), priority)
            .await
            .map_err(amqp_error(action()))?;
        channel
            .queue_declare(short(&names.dead)?, durable_queue(), FieldTable::default())
            .await
            .map_err(amqp_error(action()))?;
        let mut matching = FieldTable::default();
        matching.insert("x-match".into(), AMQPValue::LongString("all".into()));
        matching.insert(H_QUEUE.into(), AMQPValue::LongString(queue.into()));
        channel
            .queue_bind(
                short(&names.main)?,
                short(&self.return_exchange())?,
                ShortString::default(),
                QueueBindOptions::default(),
                matching,
            )
            .await
            .map_err(amqp_error(action()))?;
        lock(&session.declared).insert(queue.to_owned());
        lock(&self.known).insert(queue.to_owned());
        Ok(())
    }

    /// Declares `queue`'s delay chain: its hop queues, its route exchanges and their bindings.
    async fn ensure_delays(&self, session: &Session, queue: &str) -> Result<()> {
        if lock(&session.delays_declared).contains(queue) {
            return Ok(());
        }
        let names = self.names(queue);
        let action = || format!("declare the delay queues of queue {queue:?}");
        let channel = session.admin.channel(&session.connection).await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        for b in 0..=DELAY_HOPS {
            channel
                .exchange_declare(
                    short(&names.route(b))?,
                    ExchangeKind::Topic,
                    durable,
                    FieldTable::default(),
                )
                .await
                .map_err(amqp_error(action()))?;
        }
        for b in 0..DELAY_HOPS {
            let mut args = FieldTable::default();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt((DELAY_UNIT_MS << b) as i64),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(names.route(b).into()),
            );
            channel
                .queue_declare(short(&names.hop(b))?, durable_queue(), args)
                .await
                .map_err(amqp_error(action()))?;
        }
        for b in 1..=DELAY_HOPS {
            let bit = b - 1;
            channel
                .queue_bind(
                    short(&names.hop(bit))?,
                    short(&names.route(b))?,
                    bit_pattern(bit, '1').into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(amqp_error(action()))?;
            channel
                .exchange_bind(
                    short(&names.route(bit))?,
                    short(&names.route(b))?,
                    bit_pattern(bit, '0').into(),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(amqp_error(action()))?;
        }
        channel
            .queue_bind(
                short(&names.main)?,
                short(&names.route(0))?,
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp_error(action()))?;
        lock(&session.delays_declared).insert(queue.to_owned());
        Ok(())
    }

    /// Publishes `payload` with `meta` to where it becomes visible after `delay`: the main
    /// queue, or the start of the delay chain.
    async fn publish_visible(
        &self,
        channel: &Channel,
        meta: &Meta,
        payload: &[u8],
        delay: Duration,
    ) -> Result<PublisherConfirm> {
        let names = self.names(&meta.queue);
        let units = delay_units(delay);
        let (exchange, routing_key) = if units == 0 {
            (String::new(), names.main)
        } else {
            (names.route(DELAY_HOPS), delay_key(units))
        };
        channel
            .basic_publish(
                short(&exchange)?,
                short(&routing_key)?,
                mandatory(),
                payload,
                meta.properties(None),
            )
            .await
            .map_err(amqp_error(format!(
                "publish a message to queue {:?}",
                meta.queue
            )))
    }

    /// Takes up to `max` messages of `queue`, dead-lettering the exhausted ones, and leases the
    /// others for `lease`.
    async fn take(
        &self,
        session: &Session,
        queue: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Delivery>> {
        let names = self.names(queue);
        let main = short(&names.main)?;
        let dead = short(&names.dead)?;
        let held = short(&self.held_queue())?;
        let held_prefix = format!("{}.held.", self.config.prefix);
        let handoff = &session.held(self).await?.handoff;
        let get = session.get.channel(&session.connection).await?;
        let publish = session.publish.channel(&session.connection).await?;
        let action = || format!("dequeue from queue {queue:?}");
        let expiration: ShortString = lease
            .clamp(Duration::from_secs(1), HELD_RETURN_CAP)
            .as_millis()
            .to_string()
            .into();
        let mut out = Vec::new();
        let mut failure = None;
        // One message first: a look into an empty queue, the common case of a waiting dequeue,
        // then costs one request, and the broker's count of what is left sizes the next round.
        let mut want = 1;
        while out.len() < max && failure.is_none() {
            let (got, left) = match get_many(&get, &main, want).await {
                Ok(got) => got,
                Err(e) => {
                    if is_not_found(&e) {
                        lock(&session.declared).remove(queue);
                    }
                    failure = Some(amqp_error(action())(e));
                    break;
                }
            };
            if got.is_empty() {
                break;
            }
            let now = Utc::now();
            let mut steps = Vec::with_capacity(got.len());
            for message in got {
                let mut meta = Meta::read(message.properties.headers().as_ref())
                    .unwrap_or_else(|| self.adopt(queue, &message, now));
                if let Some((died, reason)) = held_death(&message.properties, &held_prefix) {
                    // The broker keeps whole seconds; the lease cannot have ended before the
                    // last event the history knows of.
                    let at = last_event(&meta.history).map_or(died, |last| last.max(died));
                    let why = if reason == "expired" {
                        "; its consumer's connection had closed"
                    } else {
                        ""
                    };
                    meta.history.push(history_line(
                        at,
                        &format!("lease expired (delivery {}{why})", meta.deliveries),
                    ));
                    meta.visible_at = meta.visible_at.max(at.timestamp_millis());
                }
                let step = if meta.deliveries >= meta.max_deliveries {
                    meta.history.push(history_line(
                        now,
                        &format!(
                            "dead-lettered after {} deliveries (max_deliveries {})",
                            meta.deliveries, meta.max_deliveries
                        ),
                    ));
                    meta.dead_at = Some(now.timestamp_millis());
                    let confirm = publish
                        .basic_publish(
                            ShortString::default(),
                            dead.clone(),
                            mandatory(),
                            &message.data,
                            meta.properties(None),
                        )
                        .await;
                    Step {
                        original: message.acker,
                        confirm,
                        lease: None,
                    }
                } else {
                    let token = self.next_token();
                    meta.deliveries += 1;
                    meta.history.push(history_line(
                        now,
                        &format!("delivered (delivery {}, lease {lease:?})", meta.deliveries),
                    ));
                    let (sender, receiver) = oneshot::channel();
                    lock(&handoff.waiting).insert(token, sender);
                    let confirm = publish
                        .basic_publish(
                            ShortString::default(),
                            held.clone(),
                            mandatory(),
                            &message.data,
                            meta.properties(Some(token))
                                .with_expiration(expiration.clone()),
                        )
                        .await;
                    Step {
                        original: message.acker,
                        confirm,
                        lease: Some((token, receiver, meta, message.data)),
                    }
                };
                steps.push(step);
            }

            let mut pending = Vec::new();
            let mut originals = Vec::with_capacity(pending.capacity());
            for step in steps {
                let stored = match step.confirm {
                    Ok(confirm) => confirmed(confirm, "move a message of queue", queue).await,
                    Err(e) => Err(amqp_error(action())(e)),
                };
                match stored {
                    Ok(()) => {
                        originals.push(step.original);
                        pending.extend(step.lease);
                    }
                    Err(e) => {
                        if let Some((token, ..)) = step.lease {
                            lock(&handoff.waiting).remove(&token);
                        }
                        let requeue = BasicRejectOptions { requeue: true };
                        let _ = step.original.reject(requeue).await;
                        failure.get_or_insert(e);
                    }
                }
            }

            // The copies are safe on the broker; without these acks the originals would come
            // back as duplicates when this connection closes. Acks have no reply to wait for.
            tokio::spawn(async move {
                for original in originals {
                    let _ = original.ack(BasicAckOptions::default()).await;
                }
            });
            let deadline = Instant::now() + HANDOFF_TIMEOUT;
            let mut added = false;
            for (token, receiver, meta, payload) in pending {
                match tokio::time::timeout_at(deadline, receiver).await {
                    Ok(Ok(acker)) => {
                        out.push(Delivery {
                            tag: DeliveryTag {
                                message_id: meta.id,
                                token,
                            },
                            payload: payload.clone(),
                            deliveries: meta.deliveries,
                            enqueued_at: time(meta.enqueued_at),
                        });
                        let until = far(lease);
                        lock(&session.leases).insert(
                            token,
                            Lease {
                                meta,
                                payload,
                                acker,
                                until,
                            },
                        );
                        added = true;
                    }
                    _ => {
                        // When it arrives, the consumer finds no one waiting and gives it back.
                        lock(&handoff.waiting).remove(&token);
                        tracing::warn!(
                            queue,
                            message_id = meta.id,
                            "a dequeued message did not come back from the held queue in time; \
                             it returns to its queue"
                        );
                    }
                }
            }
            if added {
                session.lease_changed.notify_one();
            }
            if left == 0 {
                break;
            }
            want = (max.saturating_sub(out.len()))
                .min(usize::from(self.config.prefetch))
                .min(usize::try_from(left).unwrap_or(usize::MAX));
        }
        match failure {
            Some(e) if out.is_empty() => Err(e),
            Some(e) => {
                tracing::warn!(queue, error = %e, "dequeue stopped early");
                Ok(out)
            }
            None => Ok(out),
        }
    }

    /// Butler's headers for a message published to `queue` by something other than Butler.
    fn adopt(&self, queue: &str, message: &AmqpDelivery, now: DateTime<Utc>) -> Meta {
        let at = message
            .properties
            .timestamp()
            .and_then(|secs| i64::try_from(secs).ok())
            .map_or(now.timestamp_millis(), |secs| secs.saturating_mul(1000));
        Meta {
            id: self.next_id(),
            queue: queue.to_owned(),
            deliveries: 0,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            enqueued_at: at,
            visible_at: at,
            priority: message
                .properties
                .priority()
                .map_or(0, |p| i32::from(p) - MAX_BROKER_PRIORITY / 2),
            history: vec![history_line(now, "received without Butler's headers")],
            dead_at: None,
        }
    }

    /// Gives back the leases of deliveries no caller received.
    async fn release(&self, session: &Session, deliveries: &[Delivery]) {
        for delivery in deliveries {
            let lease = lock(&session.leases).remove(&delivery.tag.token);
            if let Some(lease) = lease {
                let _ = lease
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await;
                self.wake(&lease.meta.queue);
            }
        }
    }

    async fn nack_held(
        &self,
        session: &Session,
        tags: &[DeliveryTag],
        delay: Duration,
    ) -> Result<Vec<bool>> {
        let queues: HashSet<String> = {
            let leases = lock(&session.leases);
            tags.iter()
                .filter_map(|t| leases.get(&t.token).map(|l| l.meta.queue.clone()))
                .collect()
        };
        if delay_units(delay) > 0 {
            for queue in &queues {
                self.ensure_delays(session, queue).await?;
            }
        }
        let publish = session.publish.channel(&session.connection).await?;
        let now = Utc::now();
        let line = history_line(now, &format!("nacked (visible again in {delay:?})"));
        let visible_at = now.timestamp_millis().saturating_add(millis(delay));
        let mut answers = vec![false; tags.len()];
        let mut sent = Vec::new();
        for (i, tag) in tags.iter().enumerate() {
            let Some(lease) = take_lease(session, *tag) else {
                continue;
            };
            let mut meta = lease.meta.clone();
            meta.history.push(line.clone());
            meta.visible_at = visible_at;
            let confirm = self
                .publish_visible(&publish, &meta, &lease.payload, delay)
                .await;
            sent.push((i, lease, confirm));
        }
        let mut failure = None;
        for (i, lease, confirm) in sent {
            let stored = match confirm {
                Ok(confirm) => {
                    confirmed(confirm, "nack a message of queue", &lease.meta.queue).await
                }
                Err(e) => Err(e),
            };
            match stored {
                Ok(()) => {
                    answers[i] = lease
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .unwrap_or(false);
                }
                Err(e) => {
                    // Still held: the caller may retry, or the lease runs out.
                    lock(&session.leases).insert(tags[i].token, lease);
                    failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if delay_units(delay) == 0 {
            for queue in &queues {
                self.wake(queue);
            }
        }
        Ok(answers)
    }

    /// Counts `queue`'s messages on a channel of its own, which a missing queue closes.
    async fn count(&self, session: &Session, queue: &str) -> Result<QueueDepth> {
        let names = self.names(queue);
        let leased = lock(&session.leases)
            .values()
            .filter(|l| l.meta.queue == queue)
            .count() as u64;
        let mut probe = Probe::open(&session.connection, queue).await?;
        let result = async {
            let Some(ready) = probe.count(&names.main).await? else {
                return Ok(QueueDepth {
                    leased,
                    ..QueueDepth::default()
                });
            };
            let dead = probe.count(&names.dead).await?.unwrap_or(0);
            // The chain is declared whole, so without its first hop there is none.
            let mut delayed = probe.count(&names.hop(0)).await?;
            if let Some(sum) = delayed.as_mut() {
                for b in 1..DELAY_HOPS {
                    *sum += probe.count(&names.hop(b)).await?.unwrap_or(0);
                }
            }
            let delayed = delayed.unwrap_or(0);
            let oldest_ready_age = if ready > 0 {
                probe.head_age(&names.main, &self.held_queue()).await?
            } else {
                None
            };
            Ok(QueueDepth {
                ready,
                delayed,
                leased,
                dead,
                oldest_ready_age,
            })
        }
        .await;
        probe.close().await;
        result
    }

    async fn read_dead(
        &self,
        session: &Session,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        let names = self.names(queue);
        let action = || format!("list the dead letters of queue {queue:?}");
        let channel = session
            .connection
            .create_channel()
            .await
            .map_err(amqp_error(action()))?;
        let dead = short(&names.dead)?;
        let mut out = Vec::new();
        let mut failure = None;
        while out.len() < limit {
            match channel
                .basic_get(dead.clone(), BasicGetOptions { no_ack: false })
                .await
            {
                Ok(Some(message)) => {
                    let headers = message.delivery.properties.headers().as_ref();
                    let meta = Meta::read(headers)
                        .unwrap_or_else(|| self.adopt(queue, &message.delivery, Utc::now()));
                    out.push(DeadLetter {
                        message_id: meta.id,
                        payload: message.delivery.data,
                        deliveries: meta.deliveries,
                        dead_at: time(meta.dead_at.unwrap_or(meta.visible_at)),
                        history: meta.history,
                    });
                }
                Ok(None) => break,
                Err(e) if is_not_found(&e) => {
                    out.clear();
                    break;
                }
                Err(e) => {
                    failure = Some(amqp_error(action())(e));
                    break;
                }
            }
        }
        // Closing the channel puts every message it took back where it was.
        let _ = channel.close(200, "OK".into()).await;
        match failure {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

/// One message taken by a dequeue, and where it went.
struct Step {
    original: Acker,
    confirm: lapin::Result<PublisherConfirm>,
    lease: Option<(u64, oneshot::Receiver<Acker>, Meta, Vec<u8>)>,
}

impl Session {
    async fn open(inner: &Inner) -> Result<Session> {
        let config = &inner.config;
        let shown = config.redacted_url();
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("butler {} {}", config.prefix, inner.instance).into());
        let connection = Connection::connect(&config.url, properties)
            .await
            .map_err(|e| {
                Error::unavailable(
                    format!(
                        "could not connect to RabbitMQ at {shown}; check that the broker runs \
                         and the URL, user and password are right"
                    ),
                    e,
                )
            })?;
        Ok(Session {
            connection,
            publish: Slot::new(true),
            get: Slot::new(false),
            admin: Slot::new(false),
            held: tokio::sync::OnceCell::new(),
            leases: Mutex::default(),
            lease_changed: Arc::new(Notify::new()),
            declared: Mutex::default(),
            delays_declared: Mutex::default(),
        })
    }

    /// The held queue of `inner`, declared and consumed on first use.
    async fn held(&self, inner: &Inner) -> Result<&Held> {
        self.held
            .get_or_try_init(|| async {
                let channel = self.admin.channel(&self.connection).await?;
                let returns = inner.return_exchange();
                declare_return_exchange(&channel, &returns).await?;
                let held = inner.held_queue();
                let mut args = FieldTable::default();
                args.insert(
                    "x-dead-letter-exchange".into(),
                    AMQPValue::LongString(returns.into()),
                );
                args.insert(
                    "x-expires".into(),
                    AMQPValue::LongLongInt(HELD_EXPIRES.as_millis() as i64),
                );
                channel
                    .queue_declare(short(&held)?, durable_queue(), args)
                    .await
                    .map_err(amqp_error(format!("declare the held queue {held:?}")))?;

                let hold = self
                    .connection
                    .create_channel()
                    .await
                    .map_err(amqp_error("open a channel"))?;
                let consumer = hold
                    .basic_consume(
                        short(&held)?,
                        "butler-held".into(),
                        BasicConsumeOptions {
                            exclusive: true,
                            ..BasicConsumeOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(amqp_error(format!("consume the held queue {held:?}")))?;
                let handoff = Arc::new(Handoff::default());
                let delegate = Arc::clone(&handoff);
                consumer.set_delegate(move |delivery: DeliveryResult| {
                    let handoff = Arc::clone(&delegate);
                    async move { handoff.deliver(delivery).await }
                });
                Ok(Held {
                    _channel: hold,
                    _consumer: consumer,
                    handoff,
                })
            })
            .await
    }

    /// Deletes the held queue `held`, if this session made it and holds no lease, then closes
    /// the connection.
    async fn shut(&self, held: String) -> Result<()> {
        if self.held.initialized()
            && lock(&self.leases).is_empty()
            && let Ok(channel) = self.admin.channel(&self.connection).await
            && let Ok(name) = short(&held)
        {
            let options = QueueDeleteOptions {
                if_empty: true,
                ..QueueDeleteOptions::default()
            };
            // A held queue left behind expires on its own; this only tidies up sooner.
            let _ = channel.queue_delete(name, options).await;
        }
        self.connection
            .close(200, "OK".into())
            .await
            .map_err(amqp_error("close the connection"))
    }

    fn alive(&self) -> bool {
        self.connection.status().connected()
            && !self
                .held
                .get()
                .is_some_and(|held| held.handoff.broken.load(Ordering::SeqCst))
    }
}

impl Slot {
    fn new(confirm: bool) -> Self {
        Slot {
            confirm,
            channel: tokio::sync::Mutex::new(None),
        }
    }

    async fn channel(&self, connection: &Connection) -> Result<Channel> {
        let mut slot = self.channel.lock().await;
        if let Some(channel) = slot.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let channel = connection
            .create_channel()
            .await
            .map_err(amqp_error("open a channel"))?;
        if self.confirm {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(amqp_error("turn on publisher confirms"))?;
        }
        *slot = Some(channel.clone());
        Ok(channel)
    }
}

impl Handoff {
    async fn deliver(&self, delivery: DeliveryResult) {
        match delivery {
            Ok(Some(delivery)) => {
                let token = delivery
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| int(h, H_TOKEN))
                    .map(|t| t as u64);
                let waiting = token.and_then(|t| lock(&self.waiting).remove(&t));
                let unclaimed = match waiting {
                    Some(sender) => sender.send(delivery.acker).err(),
                    None => Some(delivery.acker),
                };
                if let Some(acker) = unclaimed {
                    // Nobody holds it (a failed dequeue, or an earlier connection's lease):
                    // back to its queue through the return exchange.
                    let _ = acker.reject(BasicRejectOptions { requeue: false }).await;
                }
            }
            Ok(None) | Err(_) => self.broken.store(true, Ordering::SeqCst),
        }
    }
}

/// A channel for passive declares and peeks, opened again after a missing queue closes it.
struct Probe<'a> {
    connection: &'a Connection,
    channel: Channel,
    action: String,
}

impl<'a> Probe<'a> {
    async fn open(connection: &'a Connection, queue: &str) -> Result<Probe<'a>> {
        let action = format!("count the messages of queue {queue:?}");
        let channel = connection
            .create_channel()
            .await
            .map_err(amqp_error(&action))?;
        Ok(Probe {
            connection,
            channel,
            action,
        })
    }

    /// The ready messages of queue `name`; `None` when it does not exist.
    async fn count(&mut self, name: &str) -> Result<Option<u64>> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match self
            .channel
            .queue_declare(short(name)?, passive, FieldTable::default())
            .await
        {
            Ok(queue) => Ok(Some(u64::from(queue.message_count()))),
            Err(e) if is_not_found(&e) => {
                self.channel = self
                    .connection
                    .create_channel()
                    .await
                    .map_err(amqp_error(&self.action))?;
                Ok(None)
            }
            Err(e) => Err(amqp_error(&self.action)(e)),
        }
    }

    /// How long the head of queue `name` has been visible, read by taking it and putting it back.
    async fn head_age(&mut self, name: &str, held_queue: &str) -> Result<Option<Duration>> {
        let got = self
            .channel
            .basic_get(short(name)?, BasicGetOptions { no_ack: false })
            .await;
        let message = match got {
            Ok(Some(message)) => message.delivery,
            Ok(None) => return Ok(None),
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(amqp_error(&self.action)(e)),
        };
        let held_prefix = held_queue
            .rsplit_once('.')
            .map_or(held_queue, |(prefix, _)| prefix);
        let headers = message.properties.headers().as_ref();
        let mut visible_at = headers.and_then(|h| int(h, H_VISIBLE));
        if let Some((at, _)) = held_death(&message.properties, &format!("{held_prefix}.")) {
            visible_at = Some(visible_at.unwrap_or(0).max(at.timestamp_millis()));
        }
        let visible_at = visible_at.or_else(|| {
            message
                .properties
                .timestamp()
                .and_then(|secs| i64::try_from(secs).ok())
                .map(|secs| secs.saturating_mul(1000))
        });
        let _ = message
            .acker
            .reject(BasicRejectOptions { requeue: true })
            .await;
        Ok(visible_at.map(|at| {
            let age = Utc::now().timestamp_millis().saturating_sub(at).max(0);
            Duration::from_millis(age.unsigned_abs())
        }))
    }

    async fn close(self) {
        let _ = self.channel.close(200, "OK".into()).await;
    }
}

/// Up to `want` messages of `queue` in queue order, asked for with pipelined `basic.get`s, and
/// how many the broker said were left; on a failure the ones taken go back.
async fn get_many(
    channel: &Channel,
    queue: &ShortString,
    want: usize,
) -> lapin::Result<(Vec<AmqpDelivery>, u32)> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..want {
        let channel = channel.clone();
        let queue = queue.clone();
        tasks.spawn(async move {
            channel
                .basic_get(queue, BasicGetOptions { no_ack: false })
                .await
        });
    }
    let mut got = Vec::with_capacity(want);
    let mut left = u32::MAX;
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(Some(message))) => {
                left = left.min(message.message_count);
                got.push(message.delivery);
            }
            Ok(Ok(None)) => left = 0,
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(e) => {
                failure.get_or_insert(lapin::Error::from(std::io::Error::other(e)));
            }
        }
    }
    if let Some(e) = failure {
        for message in got {
            let _ = message
                .acker
                .reject(BasicRejectOptions { requeue: true })
                .await;
        }
        return Err(e);
    }
    // Delivery tags count up in the order the broker handed the messages out.
    got.sort_by_key(|m| m.delivery_tag);
    if got.is_empty() {
        left = 0;
    }
    Ok((got, left))
}

/// Expires the leases of `session` as their deadlines pass, until the session is gone.
async fn reap(session: Weak<Session>, changed: Arc<Notify>, inner: Weak<Inner>) {
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let Some(live) = session.upgrade() else {
            return;
        };
        let now = Instant::now();
        let (expired, next) = {
            let mut leases = lock(&live.leases);
            let tokens: Vec<u64> = leases
                .iter()
                .filter(|(_, l)| l.until <= now)
                .map(|(t, _)| *t)
                .collect();
            let expired: Vec<Lease> = tokens.iter().filter_map(|t| leases.remove(t)).collect();
            let next = leases.values().map(|l| l.until).min();
            (expired, next)
        };
        drop(live);
        for lease in expired {
            // Dead-lettered through the return exchange to the tail of its queue.
            let _ = lease
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await;
            if let Some(inner) = inner.upgrade() {
                inner.wake(&lease.meta.queue);
            }
        }
        // Wakes at least every second to notice a dropped session.
        let until = next.map_or(now + Duration::from_secs(1), |n| {
            n.min(now + Duration::from_secs(1))
        });
        tokio::select! {
            () = &mut notified => {}
            () = tokio::time::sleep_until(until) => {}
        }
    }
}

fn take_lease(session: &Session, tag: DeliveryTag) -> Option<Lease> {
    let mut leases = lock(&session.leases);
    match leases.get(&tag.token) {
        Some(lease) if lease.meta.id == tag.message_id => leases.remove(&tag.token),
        _ => None,
    }
}

#[async_trait]
impl Queue for AmqpQueue {
    async fn enqueue(&self, queue: &str, messages: Vec<NewMessage>) -> Result<Vec<i64>> {
        self.inner.check_name(queue)?;
        for (index, message) in messages.iter().enumerate() {
            message.validate(queue, index)?;
            check_delay(
                message.delay,
                &format!("message {index} of the batch"),
                queue,
            )?;
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let inner = Arc::clone(&self.inner);
        let queue = queue.to_owned();
        detached(async move {
            let session = inner.session().await?;
            inner.ensure_queue(&session, &queue).await?;
            if messages.iter().any(|m| delay_units(m.delay) > 0) {
                inner.ensure_delays(&session, &queue).await?;
            }
            let publish = session.publish.channel(&session.connection).await?;
            let now = Utc::now().timestamp_millis();
            let mut ids = Vec::with_capacity(messages.len());
            let mut confirms = Vec::with_capacity(messages.len());
            for message in &messages {
                let meta = Meta {
                    id: inner.next_id(),
                    queue: queue.clone(),
                    deliveries: 0,
                    max_deliveries: message.max_deliveries,
                    enqueued_at: now,
                    visible_at: now.saturating_add(millis(message.delay)),
                    priority: message.priority,
                    history: Vec::new(),
                    dead_at: None,
                };
                ids.push(meta.id);
                confirms.push(
                    inner
                        .publish_visible(&publish, &meta, &message.payload, message.delay)
                        .await,
                );
            }
            let total = confirms.len();
            let mut failed = 0;
            let mut first = None;
            for confirm in confirms {
                let stored = match confirm {
                    Ok(confirm) => confirmed(confirm, "enqueue a message to queue", &queue).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = stored {
                    failed += 1;
                    if first.is_none() {
                        if let Error::Unavailable { .. } = e {
                            lock(&session.declared).remove(&queue);
                        }
                        first = Some(e);
                    }
                }
            }
            if let Some(e) = first {
                let message = format!(
                    "{failed} of the {total} messages enqueued to queue {queue:?} were not \
                     stored, and the other {} were; enqueue the batch again if duplicates are \
                     harmless",
                    total - failed
                );
                return Err(match e {
                    Error::Backend { source, .. } => Error::Backend { message, source },
                    Error::Unavailable { source, .. } => Error::Unavailable { message, source },
                    other => other,
                });
            }
            inner.wake(&queue);
            Ok(ids)
        })
        .await
    }

    async fn dequeue(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>> {
        self.inner.check_name(queue)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now().checked_add(wait);
        let notify = self.inner.waker(queue);
        let poll = self.inner.config.poll_interval();
        loop {
            // Registered before looking, so an enqueue between the look and the wait still wakes.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let (sender, receiver) = oneshot::channel::<Result<(Arc<Session>, Vec<Delivery>)>>();
            let inner = Arc::clone(&self.inner);
            let name = queue.to_owned();
            tokio::spawn(async move {
                let result = async {
                    let session = inner.session().await?;
                    inner.ensure_queue(&session, &name).await?;
                    let out = inner.take(&session, &name, max, lease).await?;
                    Ok((session, out))
                }
                .await;
                if let Err(Ok((session, out))) = sender.send(result) {
                    // The caller stopped waiting: give the messages back at once.
                    inner.release(&session, &out).await;
                }
            });
            let (_, out) = receiver.await.map_err(|e| {
                Error::backend(format!("the dequeue from queue {queue:?} stopped"), e)
            })??;

            let now = Instant::now();
            if !out.is_empty() || deadline.is_some_and(|d| now >= d) {
                return Ok(out);
            }
            let next = now + poll;
            let until = deadline.map_or(next, |d| d.min(next));
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<Vec<bool>> {
        if tags.is_empty() {
            return Ok(Vec::new());
        }
        let Some(session) = self.inner.current_session().await else {
            return Ok(vec![false; tags.len()]);
        };
        let tags = tags.to_vec();
        detached(async move {
            let mut answers = Vec::with_capacity(tags.len());
            for tag in tags {
                let answer = match take_lease(&session, tag) {
                    Some(lease) => lease
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(amqp_error("ack a message"))?,
                    None => false,
                };
                answers.push(answer);
            }
            Ok(answers)
        })
        .await
    }

    async fn nack(&self, tags: &[DeliveryTag], delay: Duration) -> Result<Vec<bool>> {
        if tags.is_empty() {
            return Ok(Vec::new());
        }
        check_delay(delay, "the nack", "of these tags")?;
        let Some(session) = self.inner.current_session().await else {
            return Ok(vec![false; tags.len()]);
        };
        let inner = Arc::clone(&self.inner);
        let tags = tags.to_vec();
        detached(async move { inner.nack_held(&session, &tags, delay).await }).await
    }

    async fn extend(&self, tags: &[DeliveryTag], lease: Duration) -> Result<Vec<bool>> {
        if tags.is_empty() {
            return Ok(Vec::new());
        }
        let Some(session) = self.inner.current_session().await else {
            return Ok(vec![false; tags.len()]);
        };
        let until = far(lease);
        let mut leases = lock(&session.leases);
        let answers = tags
            .iter()
            .map(|tag| match leases.get_mut(&tag.token) {
                Some(held) if held.meta.id == tag.message_id => {
                    held.until = until;
                    true
                }
                _ => false,
            })
            .collect();
        drop(leases);
        session.lease_changed.notify_one();
        Ok(answers)
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth> {
        self.inner.check_name(queue)?;
        let session = self.inner.session().await?;
        self.inner.count(&session, queue).await
    }

    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        self.inner.check_name(queue)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let session = self.inner.session().await?;
        self.inner.read_dead(&session, queue, limit).await
    }
}

/// Runs `work` as its own task, so it finishes even if the caller stops waiting for it.
async fn detached<T: Send + 'static>(
    work: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(work)
        .await
        .map_err(|e| Error::backend("a RabbitMQ queue operation stopped", e))?
}

impl Meta {
    fn read(headers: Option<&FieldTable>) -> Option<Meta> {
        let h = headers?;
        let count = |key| int(h, key).and_then(|n| u32::try_from(n).ok());
        Some(Meta {
            id: int(h, H_ID)?,
            queue: string(h, H_QUEUE)?,
            deliveries: count(H_DELIVERIES)?,
            max_deliveries: count(H_MAX)?,
            enqueued_at: int(h, H_ENQUEUED)?,
            visible_at: int(h, H_VISIBLE).or_else(|| int(h, H_ENQUEUED))?,
            priority: int(h, H_PRIORITY)
                .and_then(|p| i32::try_from(p).ok())
                .unwrap_or(0),
            history: match h.inner().get(H_HISTORY) {
                Some(AMQPValue::FieldArray(lines)) => {
                    lines.as_slice().iter().filter_map(text).collect()
                }
                _ => Vec::new(),
            },
            dead_at: int(h, H_DEAD_AT),
        })
    }

    fn headers(&self, token: Option<u64>) -> FieldTable {
        let mut h = FieldTable::default();
        h.insert(H_ID.into(), AMQPValue::LongLongInt(self.id));
        h.insert(
            H_QUEUE.into(),
            AMQPValue::LongString(self.queue.as_str().into()),
        );
        h.insert(
            H_DELIVERIES.into(),
            AMQPValue::LongLongInt(i64::from(self.deliveries)),
        );
        h.insert(
            H_MAX.into(),
            AMQPValue::LongLongInt(i64::from(self.max_deliveries)),
        );
        h.insert(H_ENQUEUED.into(), AMQPValue::LongLongInt(self.enqueued_at));
        h.insert(H_VISIBLE.into(), AMQPValue::LongLongInt(self.visible_at));
        h.insert(H_PRIORITY.into(), AMQPValue::LongInt(self.priority));
        let lines: Vec<AMQPValue> = self
            .history
            .iter()
            .map(|line| AMQPValue::LongString(line.as_str().into()))
            .collect();
        h.insert(
            H_HISTORY.into(),
            AMQPValue::FieldArray(FieldArray::from(lines)),
        );
        if let Some(at) = self.dead_at {
            h.insert(H_DEAD_AT.into(), AMQPValue::LongLongInt(at));
        }
        if let Some(token) = token {
            h.insert(H_TOKEN.into(), AMQPValue::LongLongInt(token as i64));
        }
        h
    }

    fn properties(&self, token: Option<u64>) -> BasicProperties {
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority(broker_priority(self.priority))
            .with_message_id(self.id.to_string().into())
            .with_timestamp(u64::try_from(self.enqueued_at / 1000).unwrap_or(0))
            .with_headers(self.headers(token))
    }
}

/// The broker priority of Butler priority `priority`, clamped to [`PRIORITIES`].
fn broker_priority(priority: i32) -> u8 {
    let shifted = priority.clamp(*PRIORITIES.start(), *PRIORITIES.end()) - PRIORITIES.start();
    u8::try_from(shifted).unwrap_or(0)
}

/// `delay` in delay-chain units, rounded up.
fn delay_units(delay: Duration) -> u64 {
    let unit = u128::from(DELAY_UNIT_MS) * 1_000_000;
    u64::try_from(delay.as_nanos().div_ceil(unit)).unwrap_or(u64::MAX)
}

fn check_delay(delay: Duration, what: &str, queue: &str) -> Result<()> {
    if delay > AmqpQueue::MAX_DELAY {
        return Err(Error::InvalidInput(format!(
            "{what} for queue {queue:?} has a delay of {delay:?}, but RabbitMQ queues delay by \
             at most {:?} (about 31 days); use a shorter delay, or schedule the work instead. \
             Nothing was changed.",
            AmqpQueue::MAX_DELAY
        )));
    }
    Ok(())
}

/// The routing key of a message delayed `units`: its bits, highest first, as topic words.
fn delay_key(units: u64) -> String {
    (0..DELAY_HOPS)
        .rev()
        .map(|b| if units >> b & 1 == 1 { "1" } else { "0" })
        .collect::<Vec<_>>()
        .join(".")
}

/// The binding key matching routing keys whose bit `bit` is `value`.
fn bit_pattern(bit: u32, value: char) -> String {
    (0..DELAY_HOPS)
        .rev()
        .map(|b| {
            if b == bit {
                value.to_string()
            } else {
                "*".to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The time of the last line of `history`.
fn last_event(history: &[String]) -> Option<DateTime<Utc>> {
    let line = history.last()?;
    let stamp = line
        .split_once(' ')
        .map_or(line.as_str(), |(stamp, _)| stamp);
    DateTime::parse_from_rfc3339(stamp)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// When a lease of `lease` from now ends; far in the future when that overflows.
fn far(lease: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(lease)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// When the message's last lease was ended by RabbitMQ dead-lettering it out of a held queue,
/// and why (`rejected` by its holder, or `expired` after its holder's connection closed).
fn held_death(properties: &BasicProperties, held_prefix: &str) -> Option<(DateTime<Utc>, String)> {
    let headers = properties.headers().as_ref()?;
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return None;
    };
    deaths.as_slice().iter().find_map(|death| {
        let AMQPValue::FieldTable(death) = death else {
            return None;
        };
        let queue = string(death, "queue")?;
        if !queue.starts_with(held_prefix) {
            return None;
        }
        let at = match death.inner().get("time") {
            Some(AMQPValue::Timestamp(secs)) => i64::try_from(*secs)
                .ok()
                .and_then(|s| DateTime::from_timestamp(s, 0)),
            _ => None,
        }
        .unwrap_or_else(Utc::now);
        Some((at, string(death, "reason").unwrap_or_default()))
    })
}

async fn declare_return_exchange(channel: &Channel, name: &str) -> Result<()> {
    // Deleted by the broker when its last binding goes, with the last of the prefix's queues.
    let options = ExchangeDeclareOptions {
        durable: true,
        auto_delete: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            short(name)?,
            ExchangeKind::Headers,
            options,
            FieldTable::default(),
        )
        .await
        .map_err(amqp_error(format!("declare the exchange {name:?}")))
}

/// Waits for the broker to confirm a publish, failing when it refused it or had no queue for it.
async fn confirmed(confirm: PublisherConfirm, what: &str, queue: &str) -> Result<()> {
    match confirm.await {
        Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Ok(()),
        Ok(Confirmation::Ack(Some(returned))) => Err(Error::unavailable(
            format!(
                "could not {what} {queue:?}: RabbitMQ had no queue for it (it may have been \
                 deleted); retry, and Butler declares it again"
            ),
            format!("returned: {} {}", returned.reply_code, returned.reply_text),
        )),
        Ok(Confirmation::Nack(_)) => Err(Error::unavailable(
            format!("could not {what} {queue:?}: RabbitMQ refused to store it; retry"),
            "publisher confirm was a nack",
        )),
        Err(e) => Err(amqp_error(format!("{what} {queue:?}"))(e)),
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn mandatory() -> BasicPublishOptions {
    BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    }
}

/// `name` as an AMQP short string; names are checked to fit before they are built.
fn short(name: &str) -> Result<ShortString> {
    ShortString::try_new(name).map_err(|_| {
        Error::InvalidInput(format!(
            "the RabbitMQ name {:?}… is longer than {MAX_NAME_LEN} bytes; use a shorter queue \
             name or prefix",
            name.chars().take(40).collect::<String>()
        ))
    })
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Maps a client failure while doing `action` to Butler's error: refusals that a retry cannot
/// fix are backend failures naming the fix; lost connections and channels are worth retrying.
fn amqp_error(action: impl fmt::Display) -> impl FnOnce(lapin::Error) -> Error {
    move |e| {
        let soft = match e.kind() {
            ErrorKind::ProtocolError(amqp) => match amqp.kind() {
                AMQPErrorKind::Soft(soft) => Some(soft.clone()),
                AMQPErrorKind::Hard(_) => None,
            },
            _ => None,
        };
        match soft {
            Some(AMQPSoftError::PRECONDITIONFAILED) => Error::backend(
                format!(
                    "could not {action} in RabbitMQ: a queue or exchange of that name exists \
                     with other settings; delete it, or use another prefix"
                ),
                e,
            ),
            Some(AMQPSoftError::ACCESSREFUSED) => Error::backend(
                format!(
                    "could not {action} in RabbitMQ: access refused; give the user configure, \
                     write and read permissions on the names starting with the prefix"
                ),
                e,
            ),
            _ => Error::unavailable(
                format!(
                    "could not {action} in RabbitMQ: the broker closed the channel or the \
                     connection failed; retry (Butler reconnects on the next call)"
                ),
                e,
            ),
        }
    }
}

fn int(table: &FieldTable, key: &str) -> Option<i64> {
    match table.inner().get(key)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

fn string(table: &FieldTable, key: &str) -> Option<String> {
    table.inner().get(key).and_then(text)
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::UNIX_EPOCH)
}

/// `d` in whole milliseconds, saturating.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_keep_their_order_within_the_range() {
        assert_eq!(broker_priority(-10), 0);
        assert_eq!(broker_priority(-1), 9);
        assert_eq!(broker_priority(0), 10);
        assert_eq!(broker_priority(10), 20);
        assert_eq!(broker_priority(i32::MAX), 20);
        assert_eq!(broker_priority(i32::MIN), 0);
        assert!(broker_priority(1) > broker_priority(0));
    }

    #[test]
    fn delays_become_bits_of_the_routing_key() {
        assert_eq!(delay_units(Duration::ZERO), 0);
        assert_eq!(delay_units(Duration::from_nanos(1)), 1);
        assert_eq!(delay_units(Duration::from_millis(200)), 20);
        assert_eq!(delay_units(Duration::from_millis(201)), 21);
        let key = delay_key(20);
        assert_eq!(key.split('.').count(), DELAY_HOPS as usize);
        assert!(key.ends_with("1.0.1.0.0"), "{key}");
        assert_eq!(delay_units(AmqpQueue::MAX_DELAY), (1 << DELAY_HOPS) - 1);
        assert!(check_delay(AmqpQueue::MAX_DELAY, "m", "q").is_ok());
        assert!(check_delay(AmqpQueue::MAX_DELAY + Duration::from_millis(1), "m", "q").is_err());
    }

    #[test]
    fn bit_patterns_match_one_word() {
        let one = bit_pattern(0, '1');
        assert!(one.ends_with(".*.1"), "{one}");
        let top = bit_pattern(DELAY_HOPS - 1, '0');
        assert!(top.starts_with("0.*"), "{top}");
        assert_eq!(top.split('.').count(), DELAY_HOPS as usize);
    }

    #[test]
    fn the_last_event_is_read_from_the_history() {
        assert_eq!(last_event(&[]), None);
        let at = DateTime::from_timestamp_millis(1_700_000_000_123).unwrap();
        let history = vec![
            "garbage".to_owned(),
            history_line(at, "delivered (delivery 1)"),
        ];
        assert_eq!(last_event(&history), Some(at));
        assert_eq!(last_event(&history[..1]), None);
    }

    #[test]
    fn headers_round_trip() {
        let meta = Meta {
            id: 42,
            queue: "jobs".into(),
            deliveries: 3,
            max_deliveries: 5,
            enqueued_at: 1_700_000_000_000,
            visible_at: 1_700_000_000_500,
            priority: -3,
            history: vec!["a".into(), "b".into()],
            dead_at: Some(1_700_000_001_000),
        };
        let headers = meta.headers(Some(7));
        assert_eq!(Meta::read(Some(&headers)), Some(meta.clone()));
        assert_eq!(int(&headers, H_TOKEN), Some(7));
        assert_eq!(Meta::read(None), None);
        assert_eq!(Meta::read(Some(&FieldTable::default())), None);
        let properties = meta.properties(None);
        assert_eq!(*properties.priority(), Some(7));
        assert_eq!(*properties.delivery_mode(), Some(2));
    }
}
