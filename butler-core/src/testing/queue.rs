//! Conformance suite for queues.
//!
//! Every [`Queue`] backend runs [`run_all`] (or each behaviour on its own). Each behaviour uses
//! its own queue name with a random suffix, so the suite can share a backend with other tests
//! and run again on a store that outlives it. Leases are short (a few hundred milliseconds), so
//! the whole suite takes a few seconds.
//!
//! The functions panic on the first broken promise, naming it.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use tokio::time::{Instant, sleep};
use uuid::Uuid;

use crate::error::Error;
use crate::queue::{Delivery, DeliveryTag, NewMessage, Queue};

/// A lease no test outlives.
const LONG: Duration = Duration::from_secs(60);
/// A lease tests wait out.
const SHORT: Duration = Duration::from_millis(200);
/// Comfortably past [`SHORT`].
const PAST_SHORT: Duration = Duration::from_millis(300);

/// Runs every behaviour below against `queue`.
pub async fn run_all(queue: &dyn Queue) {
    fifo_among_equal_priority(queue).await;
    a_large_batch_keeps_its_order(queue).await;
    higher_priority_first(queue).await;
    delay_hides_until_due(queue).await;
    dequeue_returns_at_most_max(queue).await;
    lease_hides_and_expiry_redelivers(queue).await;
    stale_tag_changes_nothing(queue).await;
    extend_keeps_message_hidden(queue).await;
    nack_returns_message_after_delay(queue).await;
    dead_letter_after_max_deliveries(queue).await;
    depth_counts_each_state(queue).await;
    wait_wakes_on_enqueue(queue).await;
    wait_returns_empty_after_timeout(queue).await;
    queues_are_isolated(queue).await;
    invalid_input_is_rejected(queue).await;
    concurrent_consumers_get_each_message_once(queue).await;
}

fn unique(behaviour: &str) -> String {
    format!("conformance-{behaviour}-{}", Uuid::new_v4().simple())
}

fn messages<const N: usize>(payloads: [&str; N]) -> Vec<NewMessage> {
    payloads.into_iter().map(NewMessage::new).collect()
}

fn payloads(deliveries: &[Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
        .collect()
}

async fn enqueue(queue: &dyn Queue, name: &str, batch: Vec<NewMessage>) -> Vec<i64> {
    let n = batch.len();
    let ids = queue
        .enqueue(name, batch)
        .await
        .unwrap_or_else(|e| panic!("enqueue to {name}: {e}"));
    assert_eq!(ids.len(), n, "enqueue returns one id per message");
    ids
}

async fn take(queue: &dyn Queue, name: &str, max: usize, lease: Duration) -> Vec<Delivery> {
    queue
        .dequeue(name, max, lease, Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("dequeue from {name}: {e}"))
}

async fn take_one(queue: &dyn Queue, name: &str, lease: Duration) -> Delivery {
    let mut got = take(queue, name, 1, lease).await;
    assert_eq!(got.len(), 1, "a visible message is delivered");
    got.remove(0)
}

/// A batch far larger than any a backend sends in one piece still comes out in its order.
pub async fn a_large_batch_keeps_its_order(queue: &dyn Queue) {
    let name = unique("large-batch");
    let sent: Vec<String> = (0..500).map(|i| format!("m{i}")).collect();
    let batch = sent.iter().map(|p| NewMessage::new(p.as_str())).collect();
    let ids = enqueue(queue, &name, batch).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    while got.len() < sent.len() {
        assert!(
            Instant::now() < deadline,
            "only {} of {} messages were delivered",
            got.len(),
            sent.len()
        );
        let more = queue
            .dequeue(&name, sent.len() - got.len(), LONG, Duration::from_secs(1))
            .await
            .unwrap_or_else(|e| panic!("dequeue from {name}: {e}"));
        got.extend(more);
    }
    let got_ids: Vec<i64> = got.iter().map(|d| d.tag.message_id).collect();
    assert_eq!(got_ids, ids, "a large batch is delivered in enqueue order");
    assert_eq!(payloads(&got), sent);
}

/// Messages of equal priority come out in enqueue order, with ids increasing, payloads unchanged
/// (binary included) and `deliveries` 1.
pub async fn fifo_among_equal_priority(queue: &dyn Queue) {
    let name = unique("fifo");
    let before = Utc::now().timestamp_millis();
    let binary = vec![0u8, 255, 10, 0, 7];
    let mut first = messages(["a", "b", "c", "d"]);
    first.push(NewMessage::new(binary.clone()));
    let mut ids = enqueue(queue, &name, first).await;
    ids.extend(enqueue(queue, &name, messages(["f", "g"])).await);
    let after = Utc::now().timestamp_millis();
    assert!(ids[0] > 0, "ids are positive");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");

    let mut got = Vec::new();
    for _ in 0..ids.len() {
        got.push(take_one(queue, &name, LONG).await);
    }
    let got_ids: Vec<i64> = got.iter().map(|d| d.tag.message_id).collect();
    assert_eq!(got_ids, ids, "equal priority is delivered in enqueue order");
    assert_eq!(
        got[4].payload, binary,
        "binary payloads come back unchanged"
    );
    assert_eq!(payloads(&got[5..]), ["f", "g"]);
    for d in &got {
        assert_eq!(d.deliveries, 1, "a first delivery counts 1");
        let at = d.enqueued_at.timestamp_millis();
        assert!(
            before <= at && at <= after,
            "enqueued_at is the enqueue time"
        );
    }
    assert!(
        take(queue, &name, 10, LONG).await.is_empty(),
        "all were leased"
    );
}

/// Higher priorities come out first; equal ones in enqueue order, also within one batch.
pub async fn higher_priority_first(queue: &dyn Queue) {
    let name = unique("priority");
    let batch = [
        ("zero", 0),
        ("five-a", 5),
        ("minus", -1),
        ("five-b", 5),
        ("ten", 10),
    ]
    .into_iter()
    .map(|(p, prio)| NewMessage::new(p).with_priority(prio))
    .collect();
    enqueue(queue, &name, batch).await;
    let got = take(queue, &name, 10, LONG).await;
    assert_eq!(
        payloads(&got),
        ["ten", "five-a", "five-b", "zero", "minus"],
        "one dequeue returns its messages in delivery order"
    );

    enqueue(queue, &name, messages(["low"])).await;
    enqueue(
        queue,
        &name,
        vec![NewMessage::new("urgent").with_priority(1)],
    )
    .await;
    let got = take(queue, &name, 1, LONG).await;
    assert_eq!(
        payloads(&got),
        ["urgent"],
        "a later, higher priority overtakes"
    );
}

/// A delayed message stays hidden, even from a dequeue that could take it, until it is due.
pub async fn delay_hides_until_due(queue: &dyn Queue) {
    let name = unique("delay");
    let delayed = NewMessage::new("later").with_delay(SHORT).with_priority(10);
    enqueue(queue, &name, vec![delayed, NewMessage::new("now")]).await;
    assert_eq!(payloads(&take(queue, &name, 10, LONG).await), ["now"]);
    let depth = queue.depth(&name).await.expect("depth");
    assert_eq!(
        (depth.ready, depth.delayed),
        (0, 1),
        "a delayed message counts as delayed"
    );
    sleep(PAST_SHORT).await;
    assert_eq!(
        payloads(&take(queue, &name, 10, LONG).await),
        ["later"],
        "a due message is delivered"
    );
}

/// One dequeue returns at most `max` messages, and `max` 0 returns none.
pub async fn dequeue_returns_at_most_max(queue: &dyn Queue) {
    let name = unique("max");
    enqueue(queue, &name, messages(["1", "2", "3", "4", "5"])).await;
    assert!(
        take(queue, &name, 0, LONG).await.is_empty(),
        "max 0 takes none"
    );
    assert_eq!(
        payloads(&take(queue, &name, 3, LONG).await),
        ["1", "2", "3"]
    );
    assert_eq!(payloads(&take(queue, &name, 10, LONG).await), ["4", "5"]);
    assert!(take(queue, &name, 10, LONG).await.is_empty());
}

/// A delivered message is hidden for its lease; when the lease expires it is delivered again,
/// counting a second delivery, with a new token.
pub async fn lease_hides_and_expiry_redelivers(queue: &dyn Queue) {
    let name = unique("lease");
    let ids = enqueue(queue, &name, messages(["job"])).await;
    let first = take_one(queue, &name, SHORT).await;
    assert_eq!(first.tag.message_id, ids[0]);
    assert!(
        take(queue, &name, 10, SHORT).await.is_empty(),
        "a leased message is hidden"
    );
    sleep(PAST_SHORT).await;
    let second = take_one(queue, &name, LONG).await;
    assert_eq!(second.tag.message_id, ids[0], "the same message comes back");
    assert_eq!(second.deliveries, 2, "the redelivery counts");
    assert_ne!(
        second.tag.token, first.tag.token,
        "each delivery has a new token"
    );
    assert_eq!(second.payload, b"job");
    assert_eq!(queue.ack(&[second.tag]).await.expect("ack"), [true]);
}

/// A tag from an earlier delivery can no longer ack, nack or extend, and changes nothing; a
/// message is acked only once.
pub async fn stale_tag_changes_nothing(queue: &dyn Queue) {
    let name = unique("stale");
    enqueue(queue, &name, messages(["job"])).await;
    let old = take_one(queue, &name, SHORT).await.tag;
    sleep(PAST_SHORT).await;
    let current = take_one(queue, &name, LONG).await.tag;

    assert_eq!(queue.ack(&[old]).await.expect("ack"), [false], "stale ack");
    assert_eq!(
        queue.nack(&[old], Duration::ZERO).await.expect("nack"),
        [false],
        "stale nack"
    );
    assert_eq!(
        queue.extend(&[old], LONG).await.expect("extend"),
        [false],
        "stale extend"
    );
    let unknown = DeliveryTag {
        message_id: i64::MAX,
        token: 1,
    };
    assert_eq!(queue.ack(&[unknown]).await.expect("ack"), [false]);
    let depth = queue.depth(&name).await.expect("depth");
    assert_eq!(
        (depth.ready, depth.leased),
        (0, 1),
        "stale tags left the current lease alone"
    );
    assert!(
        take(queue, &name, 10, LONG).await.is_empty(),
        "still leased"
    );

    assert_eq!(
        queue.ack(&[current, old, current]).await.expect("ack"),
        [true, false, false],
        "one answer per tag; a message is acked once"
    );
    assert_eq!(queue.ack(&[current]).await.expect("ack"), [false]);
    assert_eq!(
        queue.nack(&[current], Duration::ZERO).await.expect("nack"),
        [false]
    );
    assert_eq!(
        queue.extend(&[current], LONG).await.expect("extend"),
        [false]
    );
    assert!(queue.ack(&[]).await.expect("empty ack").is_empty());
    let depth = queue.depth(&name).await.expect("depth");
    assert_eq!(
        (depth.ready, depth.leased, depth.delayed, depth.dead),
        (0, 0, 0, 0)
    );
}

/// Extending a lease keeps the message hidden past the end of the original lease.
pub async fn extend_keeps_message_hidden(queue: &dyn Queue) {
    let name = unique("extend");
    enqueue(queue, &name, messages(["job"])).await;
    let tag = take_one(queue, &name, SHORT).await.tag;
    sleep(Duration::from_millis(100)).await;
    assert_eq!(
        queue
            .extend(&[tag], Duration::from_millis(800))
            .await
            .expect("extend"),
        [true]
    );
    sleep(PAST_SHORT).await;
    assert!(
        take(queue, &name, 10, LONG).await.is_empty(),
        "an extended lease outlives the original one"
    );
    assert_eq!(queue.depth(&name).await.expect("depth").leased, 1);
    assert_eq!(
        queue.ack(&[tag]).await.expect("ack"),
        [true],
        "the extended delivery still holds the message"
    );
}

/// A nacked message comes back after the nack's delay (at once for no delay), and the nacked
/// delivery no longer holds it.
pub async fn nack_returns_message_after_delay(queue: &dyn Queue) {
    let name = unique("nack");
    enqueue(queue, &name, messages(["job"])).await;
    let first = take_one(queue, &name, LONG).await.tag;
    assert_eq!(queue.nack(&[first], SHORT).await.expect("nack"), [true]);
    assert!(
        take(queue, &name, 10, LONG).await.is_empty(),
        "hidden during the delay"
    );
    let depth = queue.depth(&name).await.expect("depth");
    assert_eq!(
        (depth.delayed, depth.leased),
        (1, 0),
        "a nacked message waits as delayed"
    );
    assert_eq!(
        queue.ack(&[first]).await.expect("ack"),
        [false],
        "nack released it"
    );

    sleep(PAST_SHORT).await;
    let second = take_one(queue, &name, LONG).await;
    assert_eq!(second.deliveries, 2);
    assert_eq!(
        queue
            .nack(&[second.tag], Duration::ZERO)
            .await
            .expect("nack"),
        [true]
    );
    let third = take_one(queue, &name, LONG).await;
    assert_eq!(
        third.deliveries, 3,
        "a nack without delay makes it visible at once"
    );
    assert_eq!(queue.ack(&[third.tag]).await.expect("ack"), [true]);
}

/// A message delivered `max_deliveries` times is moved to the dead letters, with a history line
/// for every delivery, nack and lease expiry, instead of being delivered again.
pub async fn dead_letter_after_max_deliveries(queue: &dyn Queue) {
    let name = unique("dead");
    let start = Utc::now().timestamp_millis();
    let poison = NewMessage::new("poison")
        .with_priority(1)
        .with_max_deliveries(2);
    let ids = enqueue(queue, &name, vec![poison, NewMessage::new("fine")]).await;
    for n in 1..=2 {
        let d = take_one(queue, &name, LONG).await;
        assert_eq!((d.tag.message_id, d.deliveries), (ids[0], n));
        assert_eq!(
            queue.nack(&[d.tag], Duration::ZERO).await.expect("nack"),
            [true]
        );
    }
    let next = take(queue, &name, 1, LONG).await;
    assert_eq!(
        payloads(&next),
        ["fine"],
        "the exhausted message is not delivered again"
    );
    let dead = queue.dead_letters(&name, 10).await.expect("dead letters");
    assert_eq!(dead.len(), 1);
    let letter = &dead[0];
    assert_eq!((letter.message_id, letter.deliveries), (ids[0], 2));
    assert_eq!(letter.payload, b"poison");
    assert!(letter.dead_at.timestamp_millis() >= start);
    let kinds: Vec<&str> = letter
        .history
        .iter()
        .map(|line| {
            assert!(
                line.starts_with("20"),
                "history lines start with the time: {line}"
            );
            ["delivered", "nacked", "dead-lettered"]
                .into_iter()
                .find(|k| line.contains(k))
                .unwrap_or_else(|| panic!("unexpected history line {line}"))
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "delivered",
            "nacked",
            "delivered",
            "nacked",
            "dead-lettered"
        ],
        "history: {:?}",
        letter.history
    );

    let expiring = NewMessage::new("expiring").with_max_deliveries(1);
    let ids = enqueue(queue, &name, vec![expiring]).await;
    take_one(queue, &name, Duration::from_millis(100)).await;
    sleep(Duration::from_millis(200)).await;
    assert!(
        take(queue, &name, 10, LONG).await.is_empty(),
        "dead-lettered, not delivered"
    );
    let dead = queue.dead_letters(&name, 10).await.expect("dead letters");
    assert_eq!(
        dead.len(),
        2,
        "dead letters are kept in the order they died"
    );
    assert_eq!(dead[1].message_id, ids[0]);
    assert!(
        dead[1]
            .history
            .iter()
            .any(|line| line.contains("lease expired")),
        "an expired lease is in the history: {:?}",
        dead[1].history
    );
    assert_eq!(
        queue
            .dead_letters(&name, 1)
            .await
            .expect("dead letters")
            .len(),
        1
    );
    assert_eq!(queue.depth(&name).await.expect("depth").dead, 2);
}

/// Depth counts ready, delayed, leased and dead messages and the oldest ready message's age.
pub async fn depth_counts_each_state(queue: &dyn Queue) {
    let name = unique("depth");
    let empty = queue.depth(&name).await.expect("depth");
    assert_eq!(
        (empty.ready, empty.delayed, empty.leased, empty.dead),
        (0, 0, 0, 0)
    );
    assert_eq!(empty.oldest_ready_age, None);

    let doomed = NewMessage::new("doomed")
        .with_priority(10)
        .with_max_deliveries(1);
    enqueue(queue, &name, vec![doomed]).await;
    let tag = take_one(queue, &name, LONG).await.tag;
    assert_eq!(
        queue.nack(&[tag], Duration::ZERO).await.expect("nack"),
        [true]
    );
    let batch = vec![
        NewMessage::new("leased"),
        NewMessage::new("ready"),
        NewMessage::new("delayed").with_delay(Duration::from_secs(3600)),
    ];
    enqueue(queue, &name, batch).await;
    let got = take(queue, &name, 1, LONG).await;
    assert_eq!(
        payloads(&got),
        ["leased"],
        "the exhausted message went to the dead letters"
    );
    sleep(Duration::from_millis(100)).await;
    let depth = queue.depth(&name).await.expect("depth");
    assert_eq!(
        (depth.ready, depth.delayed, depth.leased, depth.dead),
        (1, 1, 1, 1),
        "{depth:?}"
    );
    let age = depth.oldest_ready_age.expect("a message is ready");
    assert!(
        age >= Duration::from_millis(90) && age < Duration::from_secs(30),
        "the ready message waited about 100 ms, not {age:?}"
    );
}

/// A dequeue waiting on an empty queue returns soon after another task enqueues, or after a
/// delayed message becomes due.
pub async fn wait_wakes_on_enqueue(queue: &dyn Queue) {
    let name = unique("wake");
    let waiting = queue.dequeue(&name, 10, LONG, Duration::from_secs(10));
    let producing = async {
        sleep(Duration::from_millis(150)).await;
        enqueue(queue, &name, messages(["wake"])).await;
        Instant::now()
    };
    let (got, enqueued) = tokio::join!(waiting, producing);
    let latency = enqueued.elapsed();
    assert_eq!(payloads(&got.expect("dequeue")), ["wake"]);
    assert!(
        latency < Duration::from_millis(200),
        "the waiting dequeue returned {latency:?} after the enqueue"
    );

    let delayed = NewMessage::new("due").with_delay(SHORT);
    enqueue(queue, &name, vec![delayed]).await;
    let start = Instant::now();
    let got = queue
        .dequeue(&name, 10, LONG, Duration::from_secs(10))
        .await
        .expect("dequeue");
    let waited = start.elapsed();
    assert_eq!(payloads(&got), ["due"]);
    assert!(
        waited < SHORT + Duration::from_millis(200),
        "a message due during the wait was returned after {waited:?}"
    );
}

/// A dequeue waiting on an empty queue returns nothing once its wait is over.
pub async fn wait_returns_empty_after_timeout(queue: &dyn Queue) {
    let name = unique("timeout");
    let wait = Duration::from_millis(300);
    let start = Instant::now();
    let got = queue.dequeue(&name, 10, LONG, wait).await.expect("dequeue");
    let waited = start.elapsed();
    assert!(got.is_empty());
    assert!(
        waited >= wait - Duration::from_millis(10) && waited < Duration::from_secs(3),
        "waited {waited:?} for a wait of {wait:?}"
    );
}

/// Messages of one queue name are never seen through another.
pub async fn queues_are_isolated(queue: &dyn Queue) {
    let a = unique("isolated-a");
    let b = unique("isolated-b");
    enqueue(queue, &a, messages(["for-a"])).await;
    assert!(take(queue, &b, 10, LONG).await.is_empty());
    assert_eq!(queue.depth(&b).await.expect("depth").ready, 0);
    assert_eq!(queue.depth(&a).await.expect("depth").ready, 1);
    assert_eq!(payloads(&take(queue, &a, 10, LONG).await), ["for-a"]);
}

/// The empty queue name is rejected by every method that takes one, and a batch with an invalid
/// message stores nothing.
pub async fn invalid_input_is_rejected(queue: &dyn Queue) {
    let is_invalid = |r: Result<(), Error>, what: &str| {
        assert!(
            matches!(r, Err(Error::InvalidInput(_))),
            "{what} with an empty queue name: {r:?}"
        );
    };
    is_invalid(
        queue.enqueue("", messages(["x"])).await.map(drop),
        "enqueue",
    );
    let dequeued = queue.dequeue("", 1, LONG, Duration::ZERO).await;
    is_invalid(dequeued.map(drop), "dequeue");
    is_invalid(queue.depth("").await.map(drop), "depth");
    is_invalid(queue.dead_letters("", 1).await.map(drop), "dead_letters");

    let name = unique("invalid");
    let batch = vec![
        NewMessage::new("ok"),
        NewMessage::new("bad").with_max_deliveries(0),
    ];
    let err = queue
        .enqueue(&name, batch)
        .await
        .expect_err("max_deliveries 0");
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert_eq!(
        queue.depth(&name).await.expect("depth").ready,
        0,
        "a rejected batch stores nothing"
    );
    assert!(
        queue
            .enqueue(&name, Vec::new())
            .await
            .expect("empty batch")
            .is_empty()
    );
}

/// Consumers dequeuing side by side receive every message exactly once while leases hold.
pub async fn concurrent_consumers_get_each_message_once(queue: &dyn Queue) {
    let name = unique("concurrent");
    let batch = (0..300).map(|i| NewMessage::new(format!("m{i}"))).collect();
    let ids = enqueue(queue, &name, batch).await;
    let consume = |max: usize| {
        let name = name.clone();
        async move {
            let mut got = Vec::new();
            loop {
                let batch = take(queue, &name, max, LONG).await;
                if batch.is_empty() {
                    return got;
                }
                got.extend(batch.into_iter().map(|d| d.tag.message_id));
                tokio::task::yield_now().await;
            }
        }
    };
    let (a, b, c, d) = tokio::join!(consume(1), consume(7), consume(16), consume(3));
    let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
    for id in a.into_iter().chain(b).chain(c).chain(d) {
        *seen.entry(id).or_default() += 1;
    }
    assert_eq!(seen.len(), ids.len(), "every message was delivered");
    assert!(
        seen.values().all(|&n| n == 1),
        "no message was delivered twice"
    );
}
