//! RabbitMQ queue.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use butler_core::queue::{
    DEFAULT_MAX_DELIVERIES, DeadLetter, Delivery, DeliveryTag, NewMessage, Queue, QueueDepth,
    history_line, validate_queue_name,
};
use butler_core::{Error, Result};
use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions, ExchangeBindOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use lapin::{
    Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ErrorKind, ExchangeKind, PublisherConfirm,
};
use tokio::sync::Notify;
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
/// A process that has not dequeued from a queue for this long stops consuming it and gives the
/// messages it received but handed to no caller back to the queue, for other processes.
const IDLE_AFTER: Duration = Duration::from_secs(1);
/// How long a dequeue that does not wait waits at most for ready messages the broker is about
/// to push.
const PUSH_PATIENCE: Duration = Duration::from_millis(100);
/// How often the background task of a connection looks for idle queues and a closed value.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// The longest suffix added to `{prefix}.{queue}` (`.delay.route28`), for the name length check.
const LONGEST_SUFFIX: usize = ".delay.route28".len();
/// RabbitMQ's limit on queue and exchange names, in bytes.
const MAX_NAME_LEN: usize = 255;

const H_ID: &str = "butler-id";
const H_DELIVERIES: &str = "butler-deliveries";
const H_MAX: &str = "butler-max-deliveries";
const H_ENQUEUED: &str = "butler-enqueued-at";
const H_VISIBLE: &str = "butler-visible-at";
const H_PRIORITY: &str = "butler-priority";
const H_HISTORY: &str = "butler-history";
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
///
/// Nothing is made per process.
///
/// # Delivery
///
/// The first dequeue of a queue starts a consumer on `p.q` on a channel of its own, whose
/// prefetch limit is kept at the leases the process holds plus [`AmqpConfig::prefetch`]: the
/// broker pushes messages to the process as they become ready, and they wait there until a
/// dequeue takes them, highest priority first, then in the order they came.
/// A message a dequeue takes is leased and stays unacknowledged on the broker: `ack` acks it;
/// `nack` publishes it again (with a publisher confirm, one more delivery counted in its
/// headers, through the delay chain for a delay) and then acks it; the end of its lease does
/// the same as a nack without delay, with `lease expired` in its history; `extend` moves the
/// lease's deadline. When a process dies, the broker puts the messages it held back in the
/// queue at once, marked redelivered; the dequeue that meets such a message counts the lost
/// delivery by publishing it again with the count raised and `lease expired` in its history,
/// and delivers that copy. A message delivered `max_deliveries` times is moved to `p.q.dead` by
/// the dequeue that meets it next.
///
/// A process that has not dequeued from a queue for a second cancels its consumer and gives
/// back the messages it received but handed to no caller (published again unchanged, then
/// acked), so a worker busy with long tasks does not sit on work that another could do.
/// [`AmqpQueue::close`] gives back those of every queue.
///
/// # Differences from the contract
///
/// - **Batches** are validated before anything is sent, so bad input stores nothing, but a
///   broker failure in the middle of a batch may store part of it; the error says how much.
/// - **Duplicates.** A connection lost between publishing a message again (nack, end of a lease,
///   give-back, a lost delivery counted) and acking the original leaves both, so the message may
///   be delivered twice (at least once, as promised).
/// - **Prefetch.** Besides its leases, a process receives up to `prefetch` messages of a queue
///   ahead of its dequeues (up to twice that between two adjustments of the channel's limit);
///   another process cannot take them until it gives them back. Messages waiting in a process
///   when it dies count as delivered once.
/// - **Order.** A message published again (nack, end of a lease, give-back) goes to the back of
///   its priority. A dequeue that waits takes what has reached its process, so a message pushed
///   before a higher-priority one was enqueued may come first; a dequeue that does not wait first
///   asks the broker to finish pushing what is ready, and waits up to 100 ms for ready messages
///   it has room for.
/// - **Leases** are enforced by the process holding them: a tag whose lease expired answers
///   `false` as soon as the message is given back, even before it is delivered again. Tags are
///   answered only by the [`AmqpQueue`] (or a clone) that delivered them, and only while its
///   connection lasts: when it fails, the next call reconnects and the old tags answer `false`.
///   When a process dies, its messages return as soon as the broker sees its connection close,
///   not when their leases end.
/// - [`QueueDepth::ready`] is the broker's count plus the messages waiting in this process;
///   [`QueueDepth::leased`] counts this process's leases only. `oldest_ready_age` is the age of
///   the oldest message waiting in this process or, when none waits here but the broker holds
///   some, the age of the last message this process received (an upper bound while the queue
///   is first-in first-out); `None` when this process does not consume the queue.
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
    /// Names this value and its clones in the broker's connection list.
    instance: String,
    id_salt: i64,
    last_id: AtomicI64,
    token_base: u64,
    tokens: AtomicU64,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    /// Butler queues declared through this value, for [`AmqpQueue::queues`].
    known: Mutex<BTreeSet<String>>,
}

/// One connection and what lives on it; replaced whole when the connection fails.
struct Session {
    connection: Connection,
    prefix: String,
    /// Publishes, with publisher confirms.
    publish: Slot,
    /// Declares queues, exchanges and bindings.
    admin: Slot,
    /// The consumer of each queue dequeued from, by Butler queue name.
    feeds: tokio::sync::Mutex<HashMap<String, Arc<Feed>>>,
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

/// One queue's consumer, on a channel of its own: the messages it received, waiting for a
/// dequeue, and those leased from it are unacknowledged deliveries on that channel.
struct Feed {
    channel: Channel,
    /// Held while the consumer is started or cancelled.
    switch: tokio::sync::Mutex<()>,
    state: Mutex<FeedState>,
    /// Woken when a dequeue moves received messages into [`FeedState::waiting`].
    arrived: Notify,
}

#[derive(Default)]
struct FeedState {
    /// The consumer and its tag, while the queue is consumed.
    consumer: Option<(ShortString, Consumer)>,
    /// Received and not yet taken, by broker priority (highest first), then arrival.
    waiting: BTreeMap<(u8, u64), AmqpDelivery>,
    arrivals: u64,
    /// Dequeues of this queue in progress.
    takers: usize,
    /// When the last dequeue of this queue ended.
    last_take: Option<Instant>,
    /// When the last message received had become visible, in milliseconds since the epoch.
    newest_visible_at: Option<i64>,
    /// The channel's prefetch: the leases held plus between one and two times
    /// [`AmqpConfig::prefetch`] of messages to receive ahead.
    limit: u16,
}

/// A delivery held by this process.
struct Lease {
    meta: Meta,
    payload: Vec<u8>,
    acker: Acker,
    until: Instant,
}

/// A received message that goes back to the broker instead of to a caller: published to the
/// broker queue `to`, then acked.
struct Return {
    acker: Acker,
    to: String,
    queue: String,
    payload: Vec<u8>,
    properties: BasicProperties,
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

    /// Connects with `config`: opens the connection. Nothing is declared until a queue is used.
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

    /// Deletes `queue` from the broker: its ready, delayed and dead messages, its queues and its
    /// exchanges. Messages this process holds of it are dropped.
    pub async fn delete_queue(&self, queue: &str) -> Result<()> {
        self.inner.check_name(queue)?;
        let session = self.inner.session().await?;
        if let Some(feed) = session.feeds.lock().await.remove(queue) {
            // Its deliveries go with the queue.
            let _ = feed.channel.close(200, "OK".into()).await;
        }
        let names = names(&self.inner.config.prefix, queue);
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

    /// Gives back the messages this value received but handed to no caller, then closes the
    /// connection. Messages still leased return to their queues, counted as delivered, as when
    /// the process dies. A later call on this value (or a clone) connects again. Dropping the
    /// last clone does the same as closing.
    pub async fn close(&self) -> Result<()> {
        let Some(session) = self.inner.session.lock().await.take() else {
            return Ok(());
        };
        session.shut().await
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The client keeps a connection open while any of its channels lives, and its own
        // bookkeeping holds them all: without this, a dropped queue would keep its messages.
        if let Some(session) = self.session.get_mut().take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = session.shut().await;
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

/// The broker names of Butler queue `queue` under `prefix`.
fn names(prefix: &str, queue: &str) -> Names {
    let main = format!("{prefix}.{queue}");
    Names {
        dead: format!("{main}.dead"),
        delay_base: format!("{main}.delay"),
        main,
    }
}

impl Inner {
    fn names(&self, queue: &str) -> Names {
        names(&self.config.prefix, queue)
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

    /// The live session, connecting first when there is none or it failed.
    async fn session(self: &Arc<Self>) -> Result<Arc<Session>> {
        let mut current = self.session.lock().await;
        if let Some(session) = current.as_ref()
            && session.alive()
        {
            return Ok(Arc::clone(session));
        }
        let session = Arc::new(Session::open(self).await?);
        tokio::spawn(sweep(
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

    /// Declares `queue`'s main and dead-letter queues.
    async fn ensure_queue(&self, session: &Session, queue: &str) -> Result<()> {
        if lock(&session.declared).contains(queue) {
            return Ok(());
        }
        let names = self.names(queue);
        let action = || format!("declare queue {queue:?}");
        let channel = session.admin.channel(&session.connection).await?;
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
    ///
    /// The future ends when lapin's I/O thread has written the message, a round trip between
    /// threads: the publishes of a batch are awaited together (`join_all`, which starts them in
    /// order), so that the thread writes them in one go.
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
                meta.properties(),
            )
            .await
            .map_err(amqp_error(format!(
                "publish a message to queue {:?}",
                meta.queue
            )))
    }

    /// Up to `max` messages of `queue` leased for `lease`, waiting until `deadline` (`None`:
    /// for ever) for the first.
    async fn take(
        &self,
        session: &Arc<Session>,
        queue: &str,
        max: usize,
        lease: Duration,
        deadline: Option<Instant>,
    ) -> Result<Vec<Delivery>> {
        self.ensure_queue(session, queue).await?;
        let feed = session.feed(&self.config, queue).await?;
        let _taker = feed.enter();
        let main = self.names(queue).main;
        let held = lock(&session.leases)
            .values()
            .filter(|l| l.meta.queue == queue)
            .count();
        feed.fit(held, self.config.prefetch).await?;
        feed.consume(session, queue, &main).await?;
        // A dequeue that does not wait takes what is ready now, not only what has arrived.
        let now_only = deadline.is_some_and(|d| d <= Instant::now());
        let mut ready_there = if now_only {
            feed.settle_pushes(&main).await?
        } else {
            0
        };
        let patience = Instant::now() + PUSH_PATIENCE;
        loop {
            // Registered before looking, so that a message moved in meanwhile still wakes it.
            let arrived = feed.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();

            match feed.pick(max, |delivery| self.classify(queue, delivery)) {
                Picked::Returns(returns) => {
                    // Published in a task of its own: dropping this dequeue cannot strand them.
                    let session = Arc::clone(session);
                    detached(async move { session.give_back(returns).await }).await?;
                    if now_only {
                        // Their acks made room for what the broker had held back.
                        ready_there = feed.settle_pushes(&main).await?;
                    }
                    continue;
                }
                Picked::Ready(ready) if !ready.is_empty() => {
                    return Ok(self.lease(session, ready, lease));
                }
                Picked::Ready(_) => {}
            }
            if now_only {
                // The broker applies a changed prefetch limit a moment after it confirms it:
                // messages it holds ready while this process has room are on their way.
                let room = usize::from(lock(&feed.state).limit) > held;
                if ready_there > 0 && room && Instant::now() < patience {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    ready_there = feed.settle_pushes(&main).await?;
                    continue;
                }
                return Ok(Vec::new());
            }
            if deadline.is_some_and(|d| d <= Instant::now()) {
                return Ok(Vec::new());
            }
            let consumer = lock(&feed.state)
                .consumer
                .as_ref()
                .map(|(_, consumer)| consumer.clone());
            let Some(mut consumer) = consumer else {
                // The broker cancelled it (its queue was deleted): start another.
                feed.consume(session, queue, &main).await?;
                continue;
            };
            let until = deadline.unwrap_or_else(|| far(Duration::MAX));
            tokio::select! {
                received = consumer.next() => feed.receive(received),
                () = &mut arrived => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Sorts out a received message: delivered as it is, or returned to the broker first because
    /// it lost a delivery to a closed connection (counted now) or was delivered `max_deliveries`
    /// times (moved to the dead letters).
    fn classify(&self, queue: &str, delivery: AmqpDelivery) -> Sorted {
        let now = Utc::now();
        let mut meta = Meta::read(&delivery.properties, queue)
            .unwrap_or_else(|| self.adopt(queue, &delivery, now));
        if delivery.redelivered {
            meta.count_lost(now);
        }
        let exhausted = meta.deliveries >= meta.max_deliveries;
        if !(delivery.redelivered || exhausted) {
            return Sorted::Ready(delivery, meta);
        }
        let names = self.names(queue);
        let to = if exhausted {
            meta.history.push(history_line(
                now,
                &format!(
                    "dead-lettered after {} deliveries (max_deliveries {})",
                    meta.deliveries, meta.max_deliveries
                ),
            ));
            meta.dead_at = Some(now.timestamp_millis());
            names.dead
        } else {
            names.main
        };
        Sorted::Return(Return {
            acker: delivery.acker,
            to,
            queue: queue.to_owned(),
            payload: delivery.data,
            properties: meta.properties(),
        })
    }

    /// Leases `ready` for `lease`.
    fn lease(
        &self,
        session: &Session,
        ready: Vec<(AmqpDelivery, Meta)>,
        lease: Duration,
    ) -> Vec<Delivery> {
        let now = Utc::now();
        let until = far(lease);
        let mut leases = lock(&session.leases);
        let out = ready
            .into_iter()
            .map(|(delivery, mut meta)| {
                let token = self.next_token();
                meta.deliveries += 1;
                meta.history.push(history_line(
                    now,
                    &format!("delivered (delivery {}, lease {lease:?})", meta.deliveries),
                ));
                let out = Delivery {
                    tag: DeliveryTag {
                        message_id: meta.id,
                        token,
                    },
                    payload: delivery.data.clone(),
                    deliveries: meta.deliveries,
                    enqueued_at: time(meta.enqueued_at),
                };
                let held = Lease {
                    meta,
                    payload: delivery.data,
                    acker: delivery.acker,
                    until,
                };
                leases.insert(token, held);
                out
            })
            .collect();
        drop(leases);
        session.lease_changed.notify_one();
        out
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

    async fn nack_held(
        &self,
        session: &Session,
        tags: &[DeliveryTag],
        delay: Duration,
    ) -> Result<Vec<bool>> {
        if delay_units(delay) > 0 {
            let queues: HashSet<String> = {
                let leases = lock(&session.leases);
                tags.iter()
                    .filter_map(|t| leases.get(&t.token).map(|l| l.meta.queue.clone()))
                    .collect()
            };
            for queue in &queues {
                self.ensure_delays(session, queue).await?;
            }
        }
        let publish = session.publish.channel(&session.connection).await?;
        let now = Utc::now();
        let line = history_line(now, &format!("nacked (visible again in {delay:?})"));
        let visible_at = now.timestamp_millis().saturating_add(millis(delay));
        let mut answers = vec![false; tags.len()];
        let mut held = Vec::new();
        for (i, tag) in tags.iter().enumerate() {
            let Some(lease) = take_lease(session, *tag) else {
                continue;
            };
            let mut meta = lease.meta.clone();
            meta.history.push(line.clone());
            meta.visible_at = visible_at;
            held.push((i, lease, meta));
        }
        let confirms =
            join_all(held.iter().map(|(_, lease, meta)| {
                self.publish_visible(&publish, meta, &lease.payload, delay)
            }))
            .await;
        let sent = held
            .into_iter()
            .zip(confirms)
            .map(|((i, lease, _), confirm)| (i, lease, confirm));
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
        match failure {
            Some(e) => Err(e),
            None => Ok(answers),
        }
    }

    /// Counts `queue`'s messages on a channel of its own, which a missing queue closes.
    async fn count(&self, session: &Session, queue: &str) -> Result<QueueDepth> {
        let names = self.names(queue);
        let leased = lock(&session.leases)
            .values()
            .filter(|l| l.meta.queue == queue)
            .count() as u64;
        let (waiting, oldest, newest) = match session.feeds.lock().await.get(queue) {
            Some(feed) => feed.waiting_ages(),
            None => (0, None, None),
        };
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
            let visible_at = oldest.or(if ready > 0 { newest } else { None });
            Ok(QueueDepth {
                ready: ready + waiting,
                delayed: delayed.unwrap_or(0),
                leased,
                dead,
                oldest_ready_age: visible_at.map(age),
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
                    let meta = Meta::read(&message.delivery.properties, queue)
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

/// A received message, sorted out by [`Inner::classify`].
enum Sorted {
    Ready(AmqpDelivery, Meta),
    Return(Return),
}

/// What a dequeue found among the received messages.
enum Picked {
    /// Messages to lease, in delivery order.
    Ready(Vec<(AmqpDelivery, Meta)>),
    /// Messages to publish again before anything is delivered; the others were left waiting.
    Returns(Vec<Return>),
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
            prefix: config.prefix.clone(),
            publish: Slot::new(true),
            admin: Slot::new(false),
            feeds: tokio::sync::Mutex::default(),
            leases: Mutex::default(),
            lease_changed: Arc::new(Notify::new()),
            declared: Mutex::default(),
            delays_declared: Mutex::default(),
        })
    }

    /// The feed of `queue`, opening its channel on first use and after the broker closed it
    /// (whose deliveries are then gone back to the queue).
    async fn feed(&self, config: &AmqpConfig, queue: &str) -> Result<Arc<Feed>> {
        let mut feeds = self.feeds.lock().await;
        if let Some(feed) = feeds.get(queue)
            && feed.channel.status().connected()
        {
            return Ok(Arc::clone(feed));
        }
        let action = || format!("consume queue {queue:?}");
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(amqp_error(action()))?;
        channel
            .basic_qos(config.prefetch, BasicQosOptions { global: true })
            .await
            .map_err(amqp_error(action()))?;
        let feed = Arc::new(Feed {
            channel,
            switch: tokio::sync::Mutex::new(()),
            state: Mutex::new(FeedState {
                limit: config.prefetch,
                ..FeedState::default()
            }),
            arrived: Notify::new(),
        });
        feeds.insert(queue.to_owned(), Arc::clone(&feed));
        Ok(feed)
    }

    /// Publishes each message to its broker queue, then acks the delivery it came from; one that
    /// could not be published is put back in its queue as it was.
    async fn give_back(&self, returns: Vec<Return>) -> Result<()> {
        if returns.is_empty() {
            return Ok(());
        }
        let publish = self.publish.channel(&self.connection).await?;
        let mut sent = Vec::with_capacity(returns.len());
        for back in returns {
            let confirm = match short(&back.to) {
                Ok(to) => publish
                    .basic_publish(
                        ShortString::default(),
                        to,
                        mandatory(),
                        &back.payload,
                        back.properties.clone(),
                    )
                    .await
                    .map_err(amqp_error(format!(
                        "move a message of queue {:?}",
                        back.queue
                    ))),
                Err(e) => Err(e),
            };
            sent.push((back, confirm));
        }
        let mut failure = None;
        let mut moved = Vec::with_capacity(sent.len());
        for (back, confirm) in sent {
            let stored = match confirm {
                Ok(confirm) => confirmed(confirm, "move a message of queue", &back.queue).await,
                Err(e) => Err(e),
            };
            match stored {
                Ok(()) => moved.push(back.acker),
                Err(e) => {
                    let _ = back
                        .acker
                        .reject(BasicRejectOptions { requeue: true })
                        .await;
                    failure.get_or_insert(e);
                }
            }
        }
        // Acks have no reply to wait for: they only need to be sent.
        join_all(moved.iter().map(|a| a.ack(BasicAckOptions::default()))).await;
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Stops consuming `queue` and gives back what its feed received but handed to no caller:
    /// when `idle_only`, only if no dequeue of it ran for [`IDLE_AFTER`].
    async fn stop_consuming(&self, queue: &str, feed: &Feed, idle_only: bool) -> Result<()> {
        let _switch = feed.switch.lock().await;
        let consumer = {
            let mut state = lock(&feed.state);
            let idle =
                state.takers == 0 && state.last_take.is_none_or(|at| at.elapsed() >= IDLE_AFTER);
            if (idle_only && !idle) || (state.consumer.is_none() && state.waiting.is_empty()) {
                return Ok(());
            }
            state.newest_visible_at = None;
            state.consumer.take()
        };
        if let Some((tag, mut consumer)) = consumer {
            feed.channel
                .basic_cancel(tag, BasicCancelOptions::default())
                .await
                .map_err(amqp_error(format!("stop consuming queue {queue:?}")))?;
            // What the broker pushed before it confirmed the cancel is in the consumer by now.
            let mut state = lock(&feed.state);
            while let Some(Some(Ok(delivery))) = consumer.next().now_or_never() {
                state.push(delivery);
            }
        }
        let waiting = std::mem::take(&mut lock(&feed.state).waiting);
        let names = names(&self.prefix, queue);
        let returns = waiting
            .into_values()
            .map(|delivery| {
                // Given back as received, save that a lost delivery is counted now.
                let properties = match Meta::read(&delivery.properties, queue) {
                    Some(mut meta) if delivery.redelivered => {
                        meta.count_lost(Utc::now());
                        meta.properties()
                    }
                    _ => delivery.properties,
                };
                Return {
                    acker: delivery.acker,
                    to: names.main.clone(),
                    queue: queue.to_owned(),
                    payload: delivery.data,
                    properties,
                }
            })
            .collect();
        self.give_back(returns).await
    }

    /// [`Session::stop_consuming`] for every queue this session consumes.
    async fn stop_all(&self, idle_only: bool) {
        let feeds: Vec<(String, Arc<Feed>)> = self
            .feeds
            .lock()
            .await
            .iter()
            .map(|(queue, feed)| (queue.clone(), Arc::clone(feed)))
            .collect();
        for (queue, feed) in feeds {
            if let Err(e) = self.stop_consuming(&queue, &feed, idle_only).await {
                tracing::warn!(queue, error = %e, "could not give back the waiting messages");
            }
        }
    }

    /// Gives back every queue's waiting messages, then closes the connection.
    async fn shut(&self) -> Result<()> {
        self.stop_all(false).await;
        self.connection
            .close(200, "OK".into())
            .await
            .map_err(amqp_error("close the connection"))
    }

    fn alive(&self) -> bool {
        self.connection.status().connected()
    }
}

impl Feed {
    /// Counts a dequeue in until the guard is dropped.
    fn enter(self: &Arc<Self>) -> Taker {
        lock(&self.state).takers += 1;
        Taker(Arc::clone(self))
    }

    /// Starts consuming broker queue `main` unless this feed already does.
    async fn consume(&self, session: &Session, queue: &str, main: &str) -> Result<()> {
        if lock(&self.state).consumer.is_some() {
            return Ok(());
        }
        let _switch = self.switch.lock().await;
        if lock(&self.state).consumer.is_some() {
            return Ok(());
        }
        let tag = ShortString::from(format!("butler-{}", Uuid::new_v4().simple()));
        let consumer = self
            .channel
            .basic_consume(
                short(main)?,
                tag.clone(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                if is_not_found(&e) {
                    lock(&session.declared).remove(queue);
                }
                amqp_error(format!("consume queue {queue:?}"))(e)
            })?;
        lock(&self.state).consumer = Some((tag, consumer));
        Ok(())
    }

    /// Sets the channel's prefetch so that the `held` leases do not count against `ahead`, the
    /// messages to receive ahead of dequeues; changed only when it is off by more than `ahead`,
    /// which saves most dequeues the round trip.
    async fn fit(&self, held: usize, ahead: u16) -> Result<()> {
        let low = held.saturating_add(usize::from(ahead));
        let high = low.saturating_add(usize::from(ahead));
        let current = usize::from(lock(&self.state).limit);
        if (low..=high).contains(&current) || current == usize::from(u16::MAX) && low >= current {
            return Ok(());
        }
        let limit = u16::try_from(low).unwrap_or(u16::MAX);
        self.channel
            .basic_qos(limit, BasicQosOptions { global: true })
            .await
            .map_err(amqp_error("set the prefetch"))?;
        lock(&self.state).limit = limit;
        Ok(())
    }

    /// Waits until the messages the broker has pushed to this feed so far have arrived (the
    /// broker answers a question about the queue on this channel only after them); how many
    /// ready messages the broker still holds.
    async fn settle_pushes(&self, main: &str) -> Result<u32> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let queue = self
            .channel
            .queue_declare(short(main)?, passive, FieldTable::default())
            .await
            .map_err(amqp_error(format!("look into queue {main:?}")))?;
        Ok(queue.message_count())
    }

    /// Files what a dequeue's wait on the consumer received.
    fn receive(&self, received: Option<lapin::Result<AmqpDelivery>>) {
        let mut state = lock(&self.state);
        match received {
            Some(Ok(delivery)) => state.push(delivery),
            Some(Err(e)) => state.lose_consumer(Some(&e)),
            None => state.lose_consumer(None),
        }
        drop(state);
        self.arrived.notify_waiters();
    }

    /// Takes up to `max` received messages in delivery order, or the ones among them that must
    /// go back to the broker first.
    fn pick(&self, max: usize, mut classify: impl FnMut(AmqpDelivery) -> Sorted) -> Picked {
        let mut state = lock(&self.state);
        state.drain();
        let mut ready = Vec::new();
        let mut returns = Vec::new();
        while ready.len() < max {
            let Some((key, delivery)) = state.waiting.pop_first() else {
                break;
            };
            match classify(delivery) {
                Sorted::Ready(delivery, meta) => ready.push((key, delivery, meta)),
                Sorted::Return(back) => returns.push(back),
            }
        }
        if returns.is_empty() {
            return Picked::Ready(ready.into_iter().map(|(_, d, m)| (d, m)).collect());
        }
        for (key, delivery, _) in ready {
            state.waiting.insert(key, delivery);
        }
        Picked::Returns(returns)
    }

    /// How many received messages wait here, and when the oldest of them and the newest
    /// received became visible.
    fn waiting_ages(&self) -> (u64, Option<i64>, Option<i64>) {
        let mut state = lock(&self.state);
        state.drain();
        let oldest = state
            .waiting
            .values()
            .filter_map(|d| d.properties.headers().as_ref().and_then(visible_at))
            .min();
        (state.waiting.len() as u64, oldest, state.newest_visible_at)
    }
}

/// A dequeue in progress, counted by its feed.
struct Taker(Arc<Feed>);

impl Drop for Taker {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.takers -= 1;
        state.last_take = Some(Instant::now());
    }
}

impl FeedState {
    fn push(&mut self, delivery: AmqpDelivery) {
        if let Some(at) = delivery.properties.headers().as_ref().and_then(visible_at) {
            self.newest_visible_at = Some(at);
        }
        let priority = delivery.properties.priority().unwrap_or(0);
        self.arrivals += 1;
        self.waiting
            .insert((u8::MAX - priority, self.arrivals), delivery);
    }

    /// Forgets a consumer the broker cancelled, or whose channel closed with `error`: the next
    /// dequeue starts another. The error is logged here, since the RabbitMQ client's own log
    /// of channel closes is off by default (it also reports the closes Butler expects).
    fn lose_consumer(&mut self, error: Option<&lapin::Error>) {
        if let (Some((_, consumer)), Some(error)) = (&self.consumer, error) {
            tracing::warn!(
                queue = %consumer.queue(),
                %error,
                "RabbitMQ ended the consumer of a queue; the next dequeue starts another"
            );
        }
        self.consumer = None;
    }

    /// Moves what the consumer has received into `waiting`, without waiting for more.
    fn drain(&mut self) {
        let Some((_, consumer)) = self.consumer.as_mut() else {
            return;
        };
        let mut received = Vec::new();
        let mut ended = None;
        loop {
            match consumer.next().now_or_never() {
                Some(Some(Ok(delivery))) => received.push(delivery),
                Some(Some(Err(e))) => {
                    ended = Some(Some(e));
                    break;
                }
                Some(None) => {
                    ended = Some(None);
                    break;
                }
                None => break,
            }
        }
        if let Some(error) = ended {
            self.lose_consumer(error.as_ref());
        }
        for delivery in received {
            self.push(delivery);
        }
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

/// A channel for passive declares, opened again after a missing queue closes it.
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

    async fn close(self) {
        let _ = self.channel.close(200, "OK".into()).await;
    }
}

/// Until the session is gone: publishes again the messages whose lease ran out, and gives
/// back what idle queues' feeds received.
async fn sweep(session: Weak<Session>, changed: Arc<Notify>, inner: Weak<Inner>) {
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (Some(live), Some(owner)) = (session.upgrade(), inner.upgrade()) else {
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
        if !expired.is_empty() {
            let wall = Utc::now();
            let returns = expired
                .into_iter()
                .map(|lease| {
                    let mut meta = lease.meta;
                    meta.history.push(history_line(
                        wall,
                        &format!("lease expired (delivery {})", meta.deliveries),
                    ));
                    meta.visible_at = wall.timestamp_millis();
                    Return {
                        acker: lease.acker,
                        to: owner.names(&meta.queue).main,
                        queue: meta.queue.clone(),
                        payload: lease.payload,
                        properties: meta.properties(),
                    }
                })
                .collect();
            if let Err(e) = live.give_back(returns).await {
                tracing::warn!(error = %e, "could not return messages whose lease expired");
            }
        }
        live.stop_all(true).await;
        drop((live, owner));
        let until = next.map_or(now + SWEEP_EVERY, |n| n.min(now + SWEEP_EVERY));
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
            let metas: Vec<Meta> = messages
                .iter()
                .map(|message| Meta {
                    id: inner.next_id(),
                    queue: queue.clone(),
                    deliveries: 0,
                    max_deliveries: message.max_deliveries,
                    enqueued_at: now,
                    visible_at: now.saturating_add(millis(message.delay)),
                    priority: message.priority,
                    history: Vec::new(),
                    dead_at: None,
                })
                .collect();
            let ids = metas.iter().map(|meta| meta.id).collect();
            let sent = metas.iter().zip(&messages).map(|(meta, message)| {
                inner.publish_visible(&publish, meta, &message.payload, message.delay)
            });
            let stored = join_all(join_all(sent).await.into_iter().map(|confirm| async {
                confirmed(confirm?, "enqueue a message to queue", &queue).await
            }))
            .await;
            let total = stored.len();
            let mut failed = 0;
            let mut first = None;
            for stored in stored {
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
        let session = self.inner.session().await?;
        self.inner.take(&session, queue, max, lease, deadline).await
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<Vec<bool>> {
        if tags.is_empty() {
            return Ok(Vec::new());
        }
        let Some(session) = self.inner.current_session().await else {
            return Ok(vec![false; tags.len()]);
        };
        let held: Vec<Option<Lease>> = tags.iter().map(|t| take_lease(&session, *t)).collect();
        let acks = held.iter().map(|lease| async move {
            match lease {
                Some(lease) => lease.acker.ack(BasicAckOptions::default()).await,
                None => Ok(false),
            }
        });
        join_all(acks)
            .await
            .into_iter()
            .map(|acked| acked.map_err(amqp_error("ack a message")))
            .collect()
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

/// When a message with these headers became visible, in milliseconds since the epoch.
fn visible_at(headers: &FieldTable) -> Option<i64> {
    int(headers, H_VISIBLE).or_else(|| int(headers, H_ENQUEUED))
}

/// How long ago `at` (milliseconds since the epoch) was; zero for a time not yet come.
fn age(at: i64) -> Duration {
    let ms = Utc::now().timestamp_millis().saturating_sub(at).max(0);
    Duration::from_millis(ms.unsigned_abs())
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
    /// Butler's headers of a message found in (or moved out of) Butler queue `queue`; `None`
    /// for a message Butler did not publish.
    fn read(properties: &BasicProperties, queue: &str) -> Option<Meta> {
        let h = properties.headers().as_ref()?;
        let count = |key| int(h, key).and_then(|n| u32::try_from(n).ok());
        let enqueued_at = int(h, H_ENQUEUED)?;
        Some(Meta {
            id: int(h, H_ID)?,
            queue: queue.to_owned(),
            deliveries: count(H_DELIVERIES).unwrap_or(0),
            max_deliveries: count(H_MAX).unwrap_or(DEFAULT_MAX_DELIVERIES),
            enqueued_at,
            visible_at: int(h, H_VISIBLE).unwrap_or(enqueued_at),
            priority: int(h, H_PRIORITY)
                .and_then(|p| i32::try_from(p).ok())
                .or_else(|| {
                    properties
                        .priority()
                        .map(|p| i32::from(p) + PRIORITIES.start())
                })
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

    /// Counts the delivery a message lost when its consumer's connection closed before it was
    /// acked (the broker put it back marked redelivered).
    fn count_lost(&mut self, now: DateTime<Utc>) {
        self.deliveries += 1;
        self.history.push(history_line(
            now,
            &format!(
                "lease expired (delivery {}; its consumer's connection closed)",
                self.deliveries
            ),
        ));
        self.visible_at = now.timestamp_millis();
    }

    /// The headers of the message: only what differs from a new message's defaults, since the
    /// broker's work per message grows with its size.
    fn headers(&self) -> FieldTable {
        let mut h = FieldTable::default();
        h.insert(H_ID.into(), AMQPValue::LongLongInt(self.id));
        h.insert(H_ENQUEUED.into(), AMQPValue::LongLongInt(self.enqueued_at));
        if self.deliveries > 0 {
            h.insert(
                H_DELIVERIES.into(),
                AMQPValue::LongLongInt(i64::from(self.deliveries)),
            );
        }
        if self.max_deliveries != DEFAULT_MAX_DELIVERIES {
            h.insert(
                H_MAX.into(),
                AMQPValue::LongLongInt(i64::from(self.max_deliveries)),
            );
        }
        if self.visible_at != self.enqueued_at {
            h.insert(H_VISIBLE.into(), AMQPValue::LongLongInt(self.visible_at));
        }
        if !PRIORITIES.contains(&self.priority) {
            h.insert(H_PRIORITY.into(), AMQPValue::LongInt(self.priority));
        }
        if !self.history.is_empty() {
            let lines: Vec<AMQPValue> = self
                .history
                .iter()
                .map(|line| AMQPValue::LongString(line.as_str().into()))
                .collect();
            h.insert(
                H_HISTORY.into(),
                AMQPValue::FieldArray(FieldArray::from(lines)),
            );
        }
        if let Some(at) = self.dead_at {
            h.insert(H_DEAD_AT.into(), AMQPValue::LongLongInt(at));
        }
        h
    }

    fn properties(&self) -> BasicProperties {
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority(broker_priority(self.priority))
            .with_timestamp(u64::try_from(self.enqueued_at / 1000).unwrap_or(0))
            .with_headers(self.headers())
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

/// When a lease of `lease` from now ends; far in the future when that overflows.
fn far(lease: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(lease)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
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
        let properties = meta.properties();
        assert_eq!(Meta::read(&properties, "jobs"), Some(meta.clone()));
        assert_eq!(*properties.priority(), Some(7));
        assert_eq!(*properties.delivery_mode(), Some(2));
        assert_eq!(Meta::read(&BasicProperties::default(), "jobs"), None);
        let empty = BasicProperties::default().with_headers(FieldTable::default());
        assert_eq!(Meta::read(&empty, "jobs"), None);

        // A new message carries its id and enqueue time only; the rest are defaults.
        let new = Meta {
            deliveries: 0,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            visible_at: meta.enqueued_at,
            priority: 4,
            history: Vec::new(),
            dead_at: None,
            ..meta.clone()
        };
        let properties = new.properties();
        let headers = properties.headers().as_ref().expect("headers");
        assert_eq!(headers.inner().len(), 2, "{headers:?}");
        assert_eq!(Meta::read(&properties, "jobs"), Some(new.clone()));
        let far = Meta {
            priority: 50,
            ..new
        };
        assert_eq!(Meta::read(&far.properties(), "jobs"), Some(far));
    }
}
