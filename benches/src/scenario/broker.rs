//! The physical limit of a RabbitMQ queue: what the broker itself does per message.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use lapin::message::DeliveryResult;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::Notify;

use super::secs;

/// How the probe's queue and messages are laid out on the broker.
#[derive(Debug, Clone, Copy)]
pub enum Layout {
    /// A plain durable queue and bare persistent messages: the least the broker can do.
    Plain,
    /// As Butler's RabbitMQ queue lays out a task: a queue with one priority level per Butler
    /// priority, each message at Butler's priority 0 (the broker's middle level) with the two
    /// headers a new message carries.
    Butler,
}

impl Layout {
    fn queue_arguments(self) -> FieldTable {
        let mut arguments = FieldTable::default();
        if let Layout::Butler = self {
            let priorities = butler_providers::amqp::AmqpQueue::PRIORITIES;
            let highest = priorities.end() - priorities.start();
            arguments.insert("x-max-priority".into(), AMQPValue::LongInt(highest));
        }
        arguments
    }

    fn properties(self, n: usize) -> BasicProperties {
        let persistent = BasicProperties::default().with_delivery_mode(2);
        match self {
            Layout::Plain => persistent,
            Layout::Butler => {
                let middle = -butler_providers::amqp::AmqpQueue::PRIORITIES.start();
                let mut headers = FieldTable::default();
                let id = i64::try_from(n).unwrap_or(i64::MAX);
                headers.insert("butler-id".into(), AMQPValue::LongLongInt(id));
                headers.insert(
                    "butler-enqueued-at".into(),
                    AMQPValue::LongLongInt(chrono::Utc::now().timestamp_millis()),
                );
                persistent
                    .with_priority(u8::try_from(middle).unwrap_or(0))
                    .with_headers(headers)
            }
        }
    }
}

/// Messages per second through one durable queue of the broker at `url`, each persistent,
/// published with a publisher confirm, consumed (prefetch 1,000) and acked: with
/// [`Layout::Plain`], the least a durable queue asks of the broker per task. `queue` names the
/// scratch queue, deleted afterwards.
pub async fn messages_per_second(
    url: &str,
    queue: &str,
    count: usize,
    layout: Layout,
) -> anyhow::Result<f64> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let publish = connection.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let consume = connection.create_channel().await?;
    consume.basic_qos(1_000, BasicQosOptions::default()).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    publish
        .queue_declare(queue.into(), durable, layout.queue_arguments())
        .await?;

    let received = Arc::new(AtomicUsize::new(0));
    let all_in = Arc::new(Notify::new());
    let consumer = consume
        .basic_consume(
            queue.into(),
            "butler-bench-probe".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    {
        let (received, all_in) = (received.clone(), all_in.clone());
        consumer.set_delegate(move |delivery: DeliveryResult| {
            let (received, all_in) = (received.clone(), all_in.clone());
            async move {
                if let Ok(Some(delivery)) = delivery {
                    let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                    if received.fetch_add(1, Ordering::SeqCst) + 1 == count {
                        all_in.notify_one();
                    }
                }
            }
        });
    }

    let begin = Instant::now();
    let done = all_in.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    // In rounds of 1,000 confirmed publishes, as a scheduler enqueues a commit's tasks.
    let mut sent = 0;
    while sent < count {
        let round = (count - sent).min(1_000);
        let mut confirms = Vec::with_capacity(round);
        for n in sent..sent + round {
            let payload = format!("{{\"run\":{n},\"task\":\"noop\",\"try\":1}}");
            confirms.push(
                publish
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        payload.as_bytes(),
                        layout.properties(n),
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            anyhow::ensure!(confirm.await?.is_ack(), "the broker refused a message");
        }
        sent += round;
    }
    tokio::time::timeout(std::time::Duration::from_secs(120), done).await?;
    let rate = count as f64 / secs(begin);
    publish
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    connection.close(200, "done".into()).await?;
    Ok(rate)
}
