//! The queues against the queue conformance suite, plus what only a database file shows:
//! messages surviving a reopen, and several pools (as several processes would) sharing one file.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use butler_core::memory::MemoryQueue;
use butler_core::queue::{DeliveryTag, NewMessage, Queue};
use butler_core::testing::queue as suite;
use butler_providers::sqlite::SqliteQueue;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::util::TempDb;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// A pool on the database file at `path`, in WAL mode with `synchronous=NORMAL`, migrated.
async fn open_pool(path: &Path) -> SqlitePool {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("the SQLite pool opens");
    MIGRATOR.run(&pool).await.expect("the migrations apply");
    pool
}

fn tags(deliveries: &[butler_core::queue::Delivery]) -> Vec<DeliveryTag> {
    deliveries.iter().map(|d| d.tag).collect()
}

#[tokio::test]
async fn memory_queue_passes_the_conformance_suite() {
    suite::run_all(&MemoryQueue::new()).await;
}

#[tokio::test]
async fn sqlite_queue_passes_the_conformance_suite() {
    let db = TempDb::new();
    let queue = SqliteQueue::new(open_pool(&db.path).await);
    suite::run_all(&queue).await;
}

#[tokio::test]
async fn sqlite_queue_works_in_the_run_store_database() {
    let db = TempDb::new();
    let store = db.open().await;
    let queue = SqliteQueue::new(store.pool().clone());
    suite::dead_letter_after_max_deliveries(&queue).await;
    suite::stale_tag_changes_nothing(&queue).await;
    suite::wait_wakes_on_enqueue(&queue).await;
}

#[tokio::test]
async fn sqlite_messages_and_leases_survive_reopening_the_file() {
    let db = TempDb::new();
    let pool = open_pool(&db.path).await;
    let queue = SqliteQueue::new(pool.clone());
    let batch = vec![
        NewMessage::new("leased"),
        NewMessage::new(vec![0u8, 1, 2]).with_priority(-1),
        NewMessage::new("delayed").with_delay(Duration::from_secs(3600)),
    ];
    let ids = queue.enqueue("jobs", batch).await.unwrap();
    let leased = queue
        .dequeue("jobs", 1, Duration::from_secs(60), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(leased[0].tag.message_id, ids[0]);
    pool.close().await;
    drop(queue);

    let queue = SqliteQueue::new(open_pool(&db.path).await);
    let depth = queue.depth("jobs").await.unwrap();
    assert_eq!((depth.ready, depth.delayed, depth.leased), (1, 1, 1));
    let got = queue
        .dequeue("jobs", 10, Duration::from_secs(60), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        got.len(),
        1,
        "the lease and the delay hold across the reopen"
    );
    assert_eq!(got[0].tag.message_id, ids[1]);
    assert_eq!(got[0].payload, [0, 1, 2]);
    assert_eq!(got[0].deliveries, 1);
    assert_eq!(
        queue.ack(&[leased[0].tag, got[0].tag]).await.unwrap(),
        [true, true],
        "a delivery made before the reopen still holds its message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_on_one_file_never_deliver_a_leased_message_twice() {
    let db = TempDb::new();
    let first = SqliteQueue::new(open_pool(&db.path).await);
    let second = SqliteQueue::new(open_pool(&db.path).await);
    let mut ids = Vec::new();
    for chunk in 0..10 {
        let batch = (0..100)
            .map(|i| NewMessage::new(format!("m{}", chunk * 100 + i)))
            .collect();
        ids.extend(first.enqueue("shared", batch).await.unwrap());
    }

    let mut consumers = Vec::new();
    for (n, queue) in [&first, &second, &first, &second].into_iter().enumerate() {
        let queue = queue.clone();
        consumers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let got = queue
                    .dequeue("shared", 1 + n * 5, Duration::from_secs(60), Duration::ZERO)
                    .await
                    .unwrap();
                if got.is_empty() {
                    return seen;
                }
                // Ack every other batch, so deletes race with the other pool's leases too.
                if seen.len() % 2 == 0 {
                    let acked = queue.ack(&tags(&got)).await.unwrap();
                    assert!(acked.iter().all(|&ok| ok), "a fresh lease acks");
                }
                seen.extend(got.iter().map(|d| d.tag.message_id));
            }
        }));
    }
    let mut count: BTreeMap<i64, usize> = BTreeMap::new();
    let mut per_consumer = Vec::new();
    for consumer in consumers {
        let seen = consumer.await.unwrap();
        per_consumer.push(seen.len());
        for id in seen {
            *count.entry(id).or_default() += 1;
        }
    }
    assert_eq!(count.len(), ids.len(), "every message was delivered");
    let twice: Vec<_> = count.iter().filter(|&(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert!(
        per_consumer.iter().filter(|&&n| n > 0).count() >= 2,
        "both pools took part: {per_consumer:?}"
    );
}

#[tokio::test]
async fn waiting_dequeue_notices_another_pools_enqueue_by_polling() {
    let db = TempDb::new();
    let producer = SqliteQueue::new(open_pool(&db.path).await);
    let consumer = SqliteQueue::new(open_pool(&db.path).await);
    let waiting = consumer.dequeue(
        "remote",
        1,
        Duration::from_secs(60),
        Duration::from_secs(10),
    );
    let producing = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        producer
            .enqueue("remote", vec![NewMessage::new("hello")])
            .await
            .unwrap();
        Instant::now()
    };
    let (got, enqueued) = tokio::join!(waiting, producing);
    let latency = enqueued.elapsed();
    assert_eq!(got.unwrap()[0].payload, b"hello");
    assert!(
        latency < SqliteQueue::POLL_INTERVAL + Duration::from_millis(150),
        "noticed {latency:?} after the other pool's enqueue"
    );
}

/// Correctness of the batch loop at volume, with its rate printed (`--nocapture`); the figure
/// that matters is a release build's.
#[tokio::test]
async fn sqlite_batch_loop_moves_ten_thousand_messages() {
    let db = TempDb::new();
    let queue = SqliteQueue::new(open_pool(&db.path).await);
    let start = Instant::now();
    let mut acked = 0;
    for _ in 0..100 {
        let batch = (0..100u32)
            .map(|i| NewMessage::new(i.to_le_bytes()))
            .collect();
        queue.enqueue("bulk", batch).await.unwrap();
        let got = queue
            .dequeue("bulk", 100, Duration::from_secs(60), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(got.len(), 100);
        acked += queue
            .ack(&tags(&got))
            .await
            .unwrap()
            .into_iter()
            .filter(|&ok| ok)
            .count();
    }
    let elapsed = start.elapsed();
    assert_eq!(acked, 10_000);
    let depth = queue.depth("bulk").await.unwrap();
    assert_eq!(
        (depth.ready, depth.leased, depth.delayed, depth.dead),
        (0, 0, 0, 0)
    );
    println!(
        "sqlite queue batch loop: {:.0} messages/s",
        10_000.0 / elapsed.as_secs_f64()
    );
}
