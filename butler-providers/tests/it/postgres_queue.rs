//! The PostgreSQL queue against the queue conformance suite, plus what only a shared server
//! shows: several pools (as several processes would) sharing the tables, wake-ups across pools
//! through notifications, and messages surviving a reconnect.
//!
//! Each test works in its own schema, created and migrated here and dropped at its end.

use std::collections::BTreeMap;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use butler_core::queue::{Delivery, DeliveryTag, NewMessage, Queue};
use butler_core::testing::queue as suite;
use butler_providers::postgres::PgQueue;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokio::time::{Instant, sleep};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

const LONG: Duration = Duration::from_secs(60);

/// A schema of its own for one test on the server at `url`.
#[derive(Debug, Clone)]
struct TestSchema {
    url: String,
    name: String,
}

impl TestSchema {
    /// A pool whose connections use this schema, with the migrations applied.
    async fn pool(&self) -> PgPool {
        let options = PgConnectOptions::from_str(&self.url)
            .expect("BUTLER_TEST_POSTGRES_URL is a PostgreSQL URL")
            .options([("search_path", self.name.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(6)
            .connect_with(options)
            .await
            .expect("the PostgreSQL pool opens");
        MIGRATOR.run(&pool).await.expect("the migrations apply");
        pool
    }

    async fn admin(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.url)
            .await
            .expect("the PostgreSQL server accepts connections")
    }
}

/// Runs `body` in a new schema on the test server, then drops the schema, also when `body`
/// panics. Returns at once (after saying so) when no server is configured.
async fn in_schema<F, Fut>(test: &str, body: F)
where
    F: FnOnce(TestSchema) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(url) = crate::service_url("BUTLER_TEST_POSTGRES_URL", test) else {
        return;
    };
    let schema = TestSchema {
        url,
        name: format!("butler_test_{}", uuid::Uuid::new_v4().simple()),
    };
    let admin = schema.admin().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA \"{}\"",
        schema.name
    )))
    .execute(&admin)
    .await
    .expect("the test schema is created");
    let outcome = tokio::spawn(body(schema.clone())).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{}\" CASCADE",
        schema.name
    )))
    .execute(&admin)
    .await
    .expect("the test schema is dropped");
    admin.close().await;
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}

fn tags(deliveries: &[Delivery]) -> Vec<DeliveryTag> {
    deliveries.iter().map(|d| d.tag).collect()
}

#[tokio::test]
async fn postgres_queue_passes_the_conformance_suite() {
    in_schema(
        "postgres_queue_passes_the_conformance_suite",
        |schema| async move {
            let queue = PgQueue::new(schema.pool().await);
            suite::run_all(&queue).await;
        },
    )
    .await;
}

#[tokio::test]
async fn postgres_queues_on_two_pools_never_deliver_a_leased_message_twice() {
    in_schema(
        "postgres_queues_on_two_pools_never_deliver_a_leased_message_twice",
        |schema| async move {
            let a = PgQueue::new(schema.pool().await);
            let b = PgQueue::new(schema.pool().await);
            let mut ids = Vec::new();
            for round in 0..10 {
                let producer = if round % 2 == 0 { &a } else { &b };
                let batch = (0..100)
                    .map(|i| NewMessage::new(format!("m{round}-{i}")))
                    .collect();
                ids.extend(producer.enqueue("jobs", batch).await.unwrap());
            }
            assert_eq!(ids.len(), 1000);

            let consumers = [(&a, 1), (&b, 7), (&a, 16), (&b, 32)].map(|(queue, max)| {
                let queue = queue.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    loop {
                        let batch = queue
                            .dequeue("jobs", max, LONG, Duration::ZERO)
                            .await
                            .unwrap();
                        if batch.is_empty() {
                            return got;
                        }
                        let acked = queue.ack(&tags(&batch)).await.unwrap();
                        assert!(acked.iter().all(|&ok| ok), "a fresh lease acks: {acked:?}");
                        got.extend(batch.iter().map(|d| d.tag.message_id));
                    }
                })
            });
            let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
            let mut busy = 0;
            for consumer in consumers {
                let got = consumer.await.expect("a consumer finishes");
                busy += usize::from(!got.is_empty());
                for id in got {
                    *seen.entry(id).or_default() += 1;
                }
            }
            assert_eq!(seen.len(), 1000, "every message was delivered");
            assert!(
                seen.values().all(|&n| n == 1),
                "no message was delivered twice"
            );
            assert!(
                busy >= 2,
                "the consumers shared the work ({busy} of 4 got messages)"
            );
            let depth = a.depth("jobs").await.unwrap();
            assert_eq!((depth.ready, depth.leased, depth.delayed), (0, 0, 0));
        },
    )
    .await;
}

#[tokio::test]
async fn postgres_waiting_dequeue_wakes_when_another_pool_enqueues() {
    in_schema(
        "postgres_waiting_dequeue_wakes_when_another_pool_enqueues",
        |schema| async move {
            let waiter = PgQueue::new(schema.pool().await);
            let producer = PgQueue::new(schema.pool().await);
            assert_eq!(
                waiter.channel().await.unwrap(),
                format!("butler_queue_{}", schema.name),
                "the channel is named after the schema, so other schemas do not wake this one"
            );
            for round in 0..3 {
                let waiting = waiter.dequeue("jobs", 10, LONG, Duration::from_secs(10));
                let producing = async {
                    // Longer than the listener takes to start, far shorter than the poll interval.
                    sleep(Duration::from_millis(300)).await;
                    producer
                        .enqueue("jobs", vec![NewMessage::new(format!("wake {round}"))])
                        .await
                        .unwrap();
                    Instant::now()
                };
                let (got, enqueued) = tokio::join!(waiting, producing);
                let latency = enqueued.elapsed();
                let got = got.unwrap();
                assert_eq!(got.len(), 1);
                assert_eq!(got[0].payload, format!("wake {round}").into_bytes());
                assert!(
                    latency < Duration::from_millis(200),
                    "round {round}: the dequeue waiting on another pool returned {latency:?} after \
                     the enqueue (polling alone takes up to {:?})",
                    PgQueue::POLL_INTERVAL
                );
            }
        },
    )
    .await;
}

#[tokio::test]
async fn postgres_waiting_dequeue_wakes_when_another_pool_nacks() {
    in_schema(
        "postgres_waiting_dequeue_wakes_when_another_pool_nacks",
        |schema| async move {
            let waiter = PgQueue::new(schema.pool().await);
            let other = PgQueue::new(schema.pool().await);
            other
                .enqueue("jobs", vec![NewMessage::new("job")])
                .await
                .unwrap();
            let held = other
                .dequeue("jobs", 1, LONG, Duration::ZERO)
                .await
                .unwrap();
            let waiting = waiter.dequeue("jobs", 10, LONG, Duration::from_secs(10));
            let nacking = async {
                sleep(Duration::from_millis(300)).await;
                assert_eq!(
                    other.nack(&tags(&held), Duration::ZERO).await.unwrap(),
                    [true]
                );
                Instant::now()
            };
            let (got, nacked) = tokio::join!(waiting, nacking);
            let latency = nacked.elapsed();
            let got = got.unwrap();
            assert_eq!((got.len(), got[0].deliveries), (1, 2));
            assert!(
                latency < Duration::from_millis(200),
                "the waiting dequeue returned {latency:?} after another pool's nack"
            );
        },
    )
    .await;
}

#[tokio::test]
async fn postgres_listener_recovers_after_its_connection_is_killed() {
    in_schema(
        "postgres_listener_recovers_after_its_connection_is_killed",
        listener_recovers_after_its_connection_is_killed,
    )
    .await;
}

async fn listener_recovers_after_its_connection_is_killed(schema: TestSchema) {
    let waiter = PgQueue::new(schema.pool().await);
    let producer = PgQueue::new(schema.pool().await);
    // A short wait starts the listener.
    assert!(
        waiter
            .dequeue("jobs", 1, LONG, Duration::from_millis(50))
            .await
            .unwrap()
            .is_empty()
    );
    let channel = waiter.channel().await.unwrap();
    let admin = schema.admin().await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = $1 AND query LIKE '%' || $2 || '%'",
    )
    .bind(PgQueue::LISTENER_APPLICATION_NAME)
    .bind(&channel)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(
        killed,
        [true],
        "one listener connection listens on {channel}"
    );

    sleep(Duration::from_millis(500)).await;
    let waiting = waiter.dequeue("jobs", 1, LONG, Duration::from_secs(10));
    let producing = async {
        sleep(Duration::from_millis(300)).await;
        producer
            .enqueue("jobs", vec![NewMessage::new("after")])
            .await
            .unwrap();
        Instant::now()
    };
    let (got, enqueued) = tokio::join!(waiting, producing);
    let latency = enqueued.elapsed();
    assert_eq!(got.unwrap().len(), 1);
    assert!(
        latency < Duration::from_millis(200),
        "after the listener's connection was killed, a waiting dequeue returned {latency:?} \
         after another pool's enqueue"
    );
    let relisteners: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE application_name = $1 AND query LIKE '%' || $2 || '%'",
    )
    .bind(PgQueue::LISTENER_APPLICATION_NAME)
    .bind(&channel)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(relisteners, 1, "the listener reconnected");
    admin.close().await;
}

#[tokio::test]
async fn postgres_listener_closes_with_its_pool() {
    in_schema(
        "postgres_listener_closes_with_its_pool",
        |schema| async move {
            let pool = schema.pool().await;
            let queue = PgQueue::new(pool.clone());
            assert!(
                queue
                    .dequeue("jobs", 1, LONG, Duration::from_millis(50))
                    .await
                    .unwrap()
                    .is_empty()
            );
            let channel = queue.channel().await.unwrap();
            let admin = schema.admin().await;
            let listeners = || async {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = $1 AND query LIKE '%' || $2 || '%'",
                )
                .bind(PgQueue::LISTENER_APPLICATION_NAME)
                .bind(&channel)
                .fetch_one(&admin)
                .await
                .unwrap()
            };
            assert_eq!(listeners().await, 1);
            tokio::time::timeout(Duration::from_secs(10), pool.close())
                .await
                .expect("closing the pool is not held up by the listener");
            let start = Instant::now();
            while listeners().await > 0 {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "the listener's connection closes with the pool"
                );
                sleep(Duration::from_millis(50)).await;
            }
            admin.close().await;
        },
    )
    .await;
}

#[tokio::test]
async fn postgres_messages_and_leases_survive_reconnecting() {
    in_schema(
        "postgres_messages_and_leases_survive_reconnecting",
        |schema| async move {
            let pool = schema.pool().await;
            let queue = PgQueue::new(pool.clone());
            let batch = vec![
                NewMessage::new("leased"),
                NewMessage::new(vec![0u8, 1, 2]).with_priority(-1),
                NewMessage::new("delayed").with_delay(Duration::from_secs(3600)),
            ];
            let ids = queue.enqueue("jobs", batch).await.unwrap();
            let leased = queue
                .dequeue("jobs", 1, LONG, Duration::ZERO)
                .await
                .unwrap();
            assert_eq!(leased[0].tag.message_id, ids[0]);
            pool.close().await;
            drop(queue);

            let queue = PgQueue::new(schema.pool().await);
            let depth = queue.depth("jobs").await.unwrap();
            assert_eq!(
                (depth.ready, depth.leased, depth.delayed),
                (1, 1, 1),
                "every message is still there, in the same state: {depth:?}"
            );
            let got = queue
                .dequeue("jobs", 10, LONG, Duration::ZERO)
                .await
                .unwrap();
            assert_eq!(got.len(), 1, "the lease still hides the first message");
            assert_eq!(
                (got[0].tag.message_id, got[0].payload.as_slice()),
                (ids[1], &[0u8, 1, 2][..])
            );
            assert_eq!(
                queue.ack(&[leased[0].tag, got[0].tag]).await.unwrap(),
                [true, true],
                "a tag from before the reconnect still holds its message"
            );
            let depth = queue.depth("jobs").await.unwrap();
            assert_eq!((depth.ready, depth.leased, depth.delayed), (0, 0, 1));
        },
    )
    .await;
}

/// Throughput of a loop that enqueues, dequeues and acks 100 messages at a time. A measurement,
/// not a check: run it with `cargo test --release -p butler-providers --features postgres
/// --test it postgres_queue_batch_throughput -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement; run it by name with --ignored"]
async fn postgres_queue_batch_throughput() {
    in_schema("postgres_queue_batch_throughput", queue_batch_throughput).await;
}

async fn queue_batch_throughput(schema: TestSchema) {
    let queue = PgQueue::new(schema.pool().await);
    const BATCH: usize = 100;
    const ROUNDS: usize = 200;
    let start = Instant::now();
    for round in 0..ROUNDS {
        let batch = (0..BATCH)
            .map(|i| NewMessage::new(format!("m{round}-{i}")))
            .collect();
        queue.enqueue("bench", batch).await.unwrap();
        let got = queue
            .dequeue("bench", BATCH, LONG, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(got.len(), BATCH);
        let acked = queue.ack(&tags(&got)).await.unwrap();
        assert!(acked.iter().all(|&ok| ok));
    }
    let elapsed = start.elapsed();
    let messages = BATCH * ROUNDS;
    println!(
        "postgres queue: {messages} messages enqueued, dequeued and acked {BATCH} at a time \
         in {elapsed:?}: {:.0} messages/s",
        messages as f64 / elapsed.as_secs_f64()
    );
}
