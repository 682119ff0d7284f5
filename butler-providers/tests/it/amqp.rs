//! RabbitMQ queue: the conformance suite under a name prefix of its own, then what only a shared
//! broker promises. Tests read the broker's URL from `BUTLER_TEST_AMQP_URL`; each uses a fresh
//! prefix and deletes its queues at its end.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use butler_core::Error;
use butler_core::queue::{NewMessage, Queue};
use butler_core::testing::queue::run_all;
use butler_providers::amqp::{AmqpConfig, AmqpQueue};
use uuid::Uuid;

/// A lease no test outlives.
const LONG: Duration = Duration::from_secs(60);

/// A name prefix of its own on the test broker.
struct Prefix {
    config: AmqpConfig,
}

impl Prefix {
    /// A fresh prefix, or `None` (after saying why) when no broker is configured.
    fn new(test: &str) -> Option<Prefix> {
        let url = crate::service_url("BUTLER_TEST_AMQP_URL", test)?;
        let mut config = AmqpConfig::from_url(url.trim())
            .unwrap_or_else(|e| panic!("{test}: BUTLER_TEST_AMQP_URL: {e}"));
        config.prefix = format!("test-{}", Uuid::new_v4().simple());
        Some(Prefix { config })
    }

    /// A queue value with its own connection under this prefix.
    async fn open(&self) -> AmqpQueue {
        AmqpQueue::open(self.config.clone())
            .await
            .unwrap_or_else(|e| panic!("connecting to the test broker: {e}"))
    }
}

/// Deletes every queue `queue` declared, then closes it.
async fn clean_up(queue: &AmqpQueue) {
    for name in queue.queues() {
        queue
            .delete_queue(&name)
            .await
            .unwrap_or_else(|e| panic!("deleting queue {name}: {e}"));
    }
    queue.close().await.expect("close");
}

fn payloads(deliveries: &[butler_core::queue::Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
        .collect()
}

#[tokio::test]
async fn conformance_suite_passes() {
    let Some(prefix) = Prefix::new("conformance_suite_passes") else {
        return;
    };
    let queue = prefix.open().await;
    run_all(&queue).await;
    let used = queue.queues();
    assert!(used.len() >= 15, "the suite's queues are known: {used:?}");
    clean_up(&queue).await;
    let depth = prefix.open().await.depth(&used[0]).await.expect("depth");
    assert_eq!(
        (depth.ready, depth.delayed, depth.dead),
        (0, 0, 0),
        "deleted queues are gone"
    );
}

#[tokio::test]
async fn messages_survive_reconnecting() {
    let Some(prefix) = Prefix::new("messages_survive_reconnecting") else {
        return;
    };
    let first = prefix.open().await;
    let batch = vec![
        NewMessage::new("low"),
        NewMessage::new("high").with_priority(3),
        NewMessage::new("later").with_delay(Duration::from_secs(2)),
        NewMessage::new("background").with_priority(-5),
    ];
    let ids = first.enqueue("jobs", batch).await.expect("enqueue");
    let high = first
        .dequeue("jobs", 1, LONG, Duration::ZERO)
        .await
        .expect("dequeue");
    assert_eq!(payloads(&high), ["high"]);
    first.ack(&[high[0].tag]).await.expect("ack");
    first.close().await.expect("close");

    let second = prefix.open().await;
    let depth = second.depth("jobs").await.expect("depth");
    assert_eq!((depth.ready, depth.delayed, depth.leased), (2, 1, 0));
    let got = second
        .dequeue("jobs", 10, LONG, Duration::ZERO)
        .await
        .expect("dequeue");
    assert_eq!(payloads(&got), ["low", "background"], "ready messages kept");
    assert_eq!(got[0].tag.message_id, ids[0]);
    let later = second
        .dequeue("jobs", 10, LONG, Duration::from_secs(5))
        .await
        .expect("dequeue");
    assert_eq!(
        payloads(&later),
        ["later"],
        "a delayed message kept its delay"
    );
    let tags: Vec<_> = got.iter().chain(&later).map(|d| d.tag).collect();
    assert_eq!(second.ack(&tags).await.expect("ack"), [true, true, true]);
    assert_eq!(
        second.depth("jobs").await.expect("depth"),
        Default::default()
    );
    clean_up(&second).await;
    clean_up(&first).await;
}

#[tokio::test]
async fn a_dead_consumers_leases_go_to_another() {
    let Some(prefix) = Prefix::new("a_dead_consumers_leases_go_to_another") else {
        return;
    };
    let survivor = prefix.open().await;
    let dying = prefix.open().await;
    let batch = vec![
        NewMessage::new("retry"),
        NewMessage::new("poison").with_max_deliveries(1),
    ];
    let ids = dying.enqueue("work", batch).await.expect("enqueue");
    let held = dying
        .dequeue("work", 10, Duration::from_secs(1), Duration::ZERO)
        .await
        .expect("dequeue");
    assert_eq!(payloads(&held), ["retry", "poison"]);
    let stale = held[0].tag;
    assert!(
        survivor
            .dequeue("work", 10, LONG, Duration::ZERO)
            .await
            .expect("dequeue")
            .is_empty(),
        "leased messages are hidden from other consumers"
    );

    // The process dies: its connection closes without a word about its leases, and the broker
    // puts them back at once.
    let start = Instant::now();
    drop(dying);

    let back = survivor
        .dequeue("work", 10, LONG, Duration::from_secs(10))
        .await
        .expect("dequeue");
    let waited = start.elapsed();
    assert_eq!(
        payloads(&back),
        ["retry"],
        "the exhausted one is not delivered"
    );
    assert_eq!(back[0].tag.message_id, ids[0]);
    assert_eq!(back[0].deliveries, 2, "the dead consumer's delivery counts");
    assert!(
        waited < Duration::from_secs(5),
        "back once the broker saw the connection close, not {waited:?} later"
    );
    assert_eq!(survivor.ack(&[stale]).await.expect("ack"), [false]);
    assert_eq!(survivor.ack(&[back[0].tag]).await.expect("ack"), [true]);

    // The broker moves the exhausted message to the dead letters on its own time, which
    // takes longer on a busy machine.
    let mut dead = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while dead.is_empty() && Instant::now() < deadline {
        dead = survivor
            .dead_letters("work", 10)
            .await
            .expect("dead letters");
        if dead.is_empty() {
            // On a busy broker the exhausted message may come back after the one above; a
            // dequeue that meets it moves it to the dead letters instead of delivering it.
            let late = survivor
                .dequeue("work", 10, LONG, Duration::ZERO)
                .await
                .expect("dequeue");
            assert!(
                late.is_empty(),
                "the exhausted one is never delivered: {late:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].message_id, dead[0].deliveries), (ids[1], 1));
    assert!(
        dead[0]
            .history
            .iter()
            .any(|line| line.contains("lease expired") && line.contains("connection")),
        "{:?}",
        dead[0].history
    );
    clean_up(&survivor).await;
}

#[tokio::test]
async fn two_processes_never_share_a_lease() {
    let Some(prefix) = Prefix::new("two_processes_never_share_a_lease") else {
        return;
    };
    let a = prefix.open().await;
    let b = prefix.open().await;
    let batch = (0..200).map(|i| NewMessage::new(format!("m{i}"))).collect();
    let ids = a.enqueue("shared", batch).await.expect("enqueue");
    let consume = |queue: AmqpQueue, max: usize| async move {
        let mut got = Vec::new();
        loop {
            let batch = queue
                .dequeue("shared", max, LONG, Duration::ZERO)
                .await
                .expect("dequeue");
            if batch.is_empty() {
                return got;
            }
            got.extend(batch.into_iter().map(|d| d.tag.message_id));
        }
    };
    let (from_a, from_b) = tokio::join!(consume(a.clone(), 7), consume(b.clone(), 13));
    assert!(!from_a.is_empty() && !from_b.is_empty(), "both took some");
    let seen: BTreeSet<i64> = from_a.iter().chain(&from_b).copied().collect();
    assert_eq!(seen.len(), from_a.len() + from_b.len(), "none twice");
    assert_eq!(seen, ids.iter().copied().collect(), "every one delivered");

    let ids = a
        .enqueue("short", vec![NewMessage::new("job")])
        .await
        .expect("enqueue");
    let first = a
        .dequeue("short", 1, Duration::from_millis(300), Duration::ZERO)
        .await
        .expect("dequeue");
    let start = Instant::now();
    let second = b
        .dequeue("short", 1, LONG, Duration::from_secs(5))
        .await
        .expect("dequeue");
    assert!(
        start.elapsed() >= Duration::from_millis(200),
        "waited for the lease"
    );
    assert_eq!(second[0].tag.message_id, ids[0]);
    assert_eq!(second[0].deliveries, 2);
    assert_eq!(a.ack(&[first[0].tag]).await.expect("ack"), [false]);
    assert_eq!(
        a.ack(&[second[0].tag]).await.expect("ack"),
        [false],
        "a tag is answered by the process holding it"
    );
    assert_eq!(b.ack(&[second[0].tag]).await.expect("ack"), [true]);
    clean_up(&a).await;
    clean_up(&b).await;
}

#[tokio::test]
async fn bad_input_and_unreachable_brokers_are_reported() {
    let err = AmqpQueue::connect("amqp://guest:secret@127.0.0.1:1/%2f")
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.is_retryable(), "{err}");
    assert!(!err.to_string().contains("secret"), "{err}");
    let err = AmqpQueue::connect("amqp://127.0.0.1/%2f?prefix=amq.x")
        .await
        .expect_err("reserved prefix");
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");

    let Some(prefix) = Prefix::new("bad_input_and_unreachable_brokers_are_reported") else {
        return;
    };
    let queue = prefix.open().await;
    let long = "q".repeat(240);
    let err = queue
        .enqueue(&long, vec![NewMessage::new("x")])
        .await
        .expect_err("too long with the prefix");
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    let err = queue
        .enqueue(
            "jobs",
            vec![
                NewMessage::new("ok"),
                NewMessage::new("far").with_delay(AmqpQueue::MAX_DELAY * 2),
            ],
        )
        .await
        .expect_err("delay too long");
    assert!(err.to_string().contains("message 1"), "{err}");
    assert_eq!(queue.depth("jobs").await.expect("depth").ready, 0);
    clean_up(&queue).await;
}

#[tokio::test]
async fn what_a_process_received_but_did_not_take_goes_to_others_uncounted() {
    let Some(prefix) =
        Prefix::new("what_a_process_received_but_did_not_take_goes_to_others_uncounted")
    else {
        return;
    };
    let idle = prefix.open().await;
    let busy = prefix.open().await;
    let batch = (0..5).map(|i| NewMessage::new(format!("m{i}"))).collect();
    let ids = idle.enqueue("jobs", batch).await.expect("enqueue");
    let first = idle
        .dequeue("jobs", 1, LONG, Duration::ZERO)
        .await
        .expect("dequeue");
    assert_eq!(payloads(&first), ["m0"]);
    // The broker pushed the other four to `idle`, which stops dequeuing: within a couple of
    // seconds it gives them back, and another process gets them as first deliveries.
    let start = Instant::now();
    let mut rest = Vec::new();
    while rest.len() < 4 && start.elapsed() < Duration::from_secs(10) {
        rest.extend(
            busy.dequeue("jobs", 10, LONG, Duration::from_secs(1))
                .await
                .expect("dequeue"),
        );
    }
    assert_eq!(payloads(&rest), ["m1", "m2", "m3", "m4"]);
    assert!(rest.iter().all(|d| d.deliveries == 1), "{rest:?}");
    assert_eq!(
        rest.iter().map(|d| d.tag.message_id).collect::<Vec<_>>(),
        ids[1..]
    );
    assert_eq!(idle.ack(&[first[0].tag]).await.expect("ack"), [true]);

    // Closing gives back what was received and not taken, uncounted, at once.
    idle.enqueue(
        "more",
        (0..3).map(|i| NewMessage::new(format!("n{i}"))).collect(),
    )
    .await
    .expect("enqueue");
    let one = idle
        .dequeue("more", 1, LONG, Duration::ZERO)
        .await
        .expect("dequeue");
    assert_eq!(idle.ack(&[one[0].tag]).await.expect("ack"), [true]);
    idle.close().await.expect("close");
    let others = busy
        .dequeue("more", 10, LONG, Duration::ZERO)
        .await
        .expect("dequeue");
    assert_eq!(payloads(&others), ["n1", "n2"]);
    assert!(others.iter().all(|d| d.deliveries == 1), "{others:?}");
    clean_up(&busy).await;
}
