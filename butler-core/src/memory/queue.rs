//! In-memory queue.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use crate::error::Result;
use crate::queue::{
    DeadLetter, Delivery, DeliveryTag, NewMessage, Queue, QueueDepth, history_line,
    validate_queue_name,
};

/// A [`Queue`] that keeps its messages in process memory, for tests and embedding.
///
/// It honours the whole [`Queue`] contract within one process; its messages are gone when the
/// last clone is dropped. Clones share the same queues. A waiting [`Queue::dequeue`] wakes as soon
/// as a message is enqueued or nacked, and when a delayed or leased message becomes visible; it
/// never polls.
#[derive(Debug, Default, Clone)]
pub struct MemoryQueue {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    last_id: i64,
    last_token: u64,
    messages: HashMap<i64, Message>,
    queues: HashMap<Arc<str>, Lane>,
}

/// One named queue.
#[derive(Debug, Default)]
struct Lane {
    /// Visible messages in delivery order.
    ready: BTreeSet<ReadyKey>,
    /// Messages not yet visible (delayed, nacked with a delay, or leased), by the time they will be.
    pending: BTreeSet<(i64, i64)>,
    dead: Vec<DeadLetter>,
    notify: Arc<Notify>,
}

/// Delivery order: highest priority, then earliest visible-at, then lowest id.
type ReadyKey = (Reverse<i32>, i64, i64);

#[derive(Debug)]
struct Message {
    queue: Arc<str>,
    payload: Vec<u8>,
    priority: i32,
    /// Milliseconds since the epoch; while leased, the end of the lease.
    visible_at: i64,
    deliveries: u32,
    max_deliveries: u32,
    token: u64,
    /// Held by the delivery with `token` (the lease may have expired without a redelivery).
    leased: bool,
    in_ready: bool,
    enqueued_at: DateTime<Utc>,
    history: Vec<String>,
}

/// What [`MemoryQueue::with_held`] does with a message after changing it.
#[derive(Debug, PartialEq, Eq)]
enum Keep {
    Keep,
    Drop,
}

impl Message {
    fn ready_key(&self, id: i64) -> ReadyKey {
        (Reverse(self.priority), self.visible_at, id)
    }
}

impl MemoryQueue {
    /// A queue store with no messages.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every method checks before it mutates and nothing in between can panic on input, so
        // the state behind a poisoned lock is still whole.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One dequeue attempt; also returns when the next hidden message becomes visible.
    fn try_dequeue(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
    ) -> (Vec<Delivery>, Option<i64>) {
        let now = Utc::now();
        let now_ms = now.timestamp_millis();
        let mut guard = self.lock();
        let state = &mut *guard;
        let (_, lane) = lane_entry(&mut state.queues, queue);
        promote(lane, &mut state.messages, now, now_ms);
        let until = now_ms.saturating_add(millis(lease));
        let mut out = Vec::new();
        while out.len() < max {
            let Some(key) = lane.ready.pop_first() else {
                break;
            };
            let id = key.2;
            let Some(msg) = state.messages.get_mut(&id) else {
                continue;
            };
            if msg.leased {
                let expired = DateTime::from_timestamp_millis(msg.visible_at).unwrap_or(now);
                let line = format!("lease expired (delivery {})", msg.deliveries);
                msg.history.push(history_line(expired, &line));
            }
            state.last_token += 1;
            msg.token = state.last_token;
            msg.deliveries = msg.deliveries.saturating_add(1);
            msg.leased = true;
            msg.in_ready = false;
            msg.visible_at = until;
            let line = format!("delivered (delivery {}, lease {lease:?})", msg.deliveries);
            msg.history.push(history_line(now, &line));
            lane.pending.insert((until, id));
            out.push(Delivery {
                tag: DeliveryTag {
                    message_id: id,
                    token: msg.token,
                },
                payload: msg.payload.clone(),
                deliveries: msg.deliveries,
                enqueued_at: msg.enqueued_at,
            });
        }
        let next = lane.pending.first().map(|&(at, _)| at);
        (out, next)
    }

    /// Applies `change` to every message still held by its tag, and drops the message when
    /// `change` says so; answers per tag.
    fn with_held(
        &self,
        tags: &[DeliveryTag],
        mut change: impl FnMut(&mut Lane, i64, &mut Message) -> Keep,
    ) -> Vec<bool> {
        let mut guard = self.lock();
        let state = &mut *guard;
        tags.iter()
            .map(|tag| {
                let Some(msg) = state.messages.get_mut(&tag.message_id) else {
                    return false;
                };
                if !msg.leased || msg.token != tag.token {
                    return false;
                }
                let Some(lane) = state.queues.get_mut(&msg.queue) else {
                    return false;
                };
                unlink(lane, tag.message_id, msg);
                if change(lane, tag.message_id, msg) == Keep::Drop {
                    state.messages.remove(&tag.message_id);
                }
                true
            })
            .collect()
    }
}

/// The lane named `queue`, created when missing, with its shared name.
fn lane_entry<'a>(
    queues: &'a mut HashMap<Arc<str>, Lane>,
    queue: &str,
) -> (Arc<str>, &'a mut Lane) {
    let name = queues
        .get_key_value(queue)
        .map_or_else(|| Arc::from(queue), |(name, _)| Arc::clone(name));
    let lane = queues.entry(Arc::clone(&name)).or_default();
    (name, lane)
}

/// Removes the message's key from whichever set holds it.
fn unlink(lane: &mut Lane, id: i64, msg: &Message) {
    if msg.in_ready {
        lane.ready.remove(&msg.ready_key(id));
    } else {
        lane.pending.remove(&(msg.visible_at, id));
    }
}

/// Moves every hidden message that is visible by `now_ms` to the ready set, or to the dead
/// letters when it has used up its deliveries.
fn promote(lane: &mut Lane, messages: &mut HashMap<i64, Message>, now: DateTime<Utc>, now_ms: i64) {
    while let Some(&(at, id)) = lane.pending.first() {
        if at > now_ms {
            break;
        }
        lane.pending.pop_first();
        let Some(msg) = messages.get_mut(&id) else {
            continue;
        };
        if msg.deliveries < msg.max_deliveries {
            msg.in_ready = true;
            lane.ready.insert(msg.ready_key(id));
            continue;
        }
        let Some(mut msg) = messages.remove(&id) else {
            continue;
        };
        if msg.leased {
            let expired = DateTime::from_timestamp_millis(msg.visible_at).unwrap_or(now);
            let line = format!("lease expired (delivery {})", msg.deliveries);
            msg.history.push(history_line(expired, &line));
        }
        let line = format!(
            "dead-lettered after {} deliveries (max_deliveries {})",
            msg.deliveries, msg.max_deliveries
        );
        msg.history.push(history_line(now, &line));
        lane.dead.push(DeadLetter {
            message_id: id,
            payload: msg.payload,
            deliveries: msg.deliveries,
            history: msg.history,
            dead_at: now,
        });
    }
}

/// `d` in whole milliseconds, saturating.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn enqueue(&self, queue: &str, messages: Vec<NewMessage>) -> Result<Vec<i64>> {
        validate_queue_name(queue)?;
        for (index, message) in messages.iter().enumerate() {
            message.validate(queue, index)?;
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let now = Utc::now();
        let now_ms = now.timestamp_millis();
        let mut guard = self.lock();
        let state = &mut *guard;
        let (name, lane) = lane_entry(&mut state.queues, queue);
        let mut ids = Vec::with_capacity(messages.len());
        for message in messages {
            state.last_id += 1;
            let id = state.last_id;
            let visible_at = now_ms.saturating_add(millis(message.delay));
            let msg = Message {
                queue: Arc::clone(&name),
                payload: message.payload,
                priority: message.priority,
                visible_at,
                deliveries: 0,
                max_deliveries: message.max_deliveries,
                token: 0,
                leased: false,
                in_ready: visible_at <= now_ms,
                enqueued_at: now,
                history: Vec::new(),
            };
            if msg.in_ready {
                lane.ready.insert(msg.ready_key(id));
            } else {
                lane.pending.insert((visible_at, id));
            }
            state.messages.insert(id, msg);
            ids.push(id);
        }
        lane.notify.notify_waiters();
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
        let start = tokio::time::Instant::now();
        let deadline = start.checked_add(wait);
        loop {
            let notify = {
                let mut guard = self.lock();
                Arc::clone(&lane_entry(&mut guard.queues, queue).1.notify)
            };
            // Registered before looking, so an enqueue between the look and the wait still wakes us.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (out, next_visible) = self.try_dequeue(queue, max, lease);
            let now = tokio::time::Instant::now();
            if !out.is_empty() || deadline.is_some_and(|d| now >= d) {
                return Ok(out);
            }
            let mut until = deadline;
            if let Some(at) = next_visible {
                let in_ms = at.saturating_sub(Utc::now().timestamp_millis()).max(0);
                let wake = now + Duration::from_millis(in_ms.unsigned_abs() + 1);
                until = Some(until.map_or(wake, |d| d.min(wake)));
            }
            match until {
                Some(until) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(until) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<Vec<bool>> {
        Ok(self.with_held(tags, |_, _, _| Keep::Drop))
    }

    async fn nack(&self, tags: &[DeliveryTag], delay: Duration) -> Result<Vec<bool>> {
        let now = Utc::now();
        let at = now.timestamp_millis().saturating_add(millis(delay));
        let line = history_line(
            now,
            &format!(
                "nacked (visible again in {})",
                humantime::format_duration(delay)
            ),
        );
        let mut lanes = Vec::new();
        let answers = self.with_held(tags, |lane, id, msg| {
            msg.leased = false;
            msg.in_ready = false;
            msg.visible_at = at;
            msg.history.push(line.clone());
            lane.pending.insert((at, id));
            lanes.push(Arc::clone(&lane.notify));
            Keep::Keep
        });
        for notify in lanes {
            notify.notify_waiters();
        }
        Ok(answers)
    }

    async fn extend(&self, tags: &[DeliveryTag], lease: Duration) -> Result<Vec<bool>> {
        let until = Utc::now().timestamp_millis().saturating_add(millis(lease));
        Ok(self.with_held(tags, |lane, id, msg| {
            msg.in_ready = false;
            msg.visible_at = until;
            lane.pending.insert((until, id));
            Keep::Keep
        }))
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth> {
        validate_queue_name(queue)?;
        let now_ms = Utc::now().timestamp_millis();
        let state = self.lock();
        let Some(lane) = state.queues.get(queue) else {
            return Ok(QueueDepth::default());
        };
        let mut depth = QueueDepth {
            ready: lane.ready.len() as u64,
            dead: lane.dead.len() as u64,
            ..QueueDepth::default()
        };
        let mut oldest = lane.ready.iter().map(|&(_, at, _)| at).min();
        for &(at, id) in &lane.pending {
            if at <= now_ms {
                depth.ready += 1;
                oldest = Some(oldest.map_or(at, |o| o.min(at)));
            } else if state.messages.get(&id).is_some_and(|m| m.leased) {
                depth.leased += 1;
            } else {
                depth.delayed += 1;
            }
        }
        depth.oldest_ready_age =
            oldest.map(|at| Duration::from_millis(now_ms.saturating_sub(at).max(0).unsigned_abs()));
        Ok(depth)
    }

    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        validate_queue_name(queue)?;
        let state = self.lock();
        Ok(state
            .queues
            .get(queue)
            .map(|lane| lane.dead.iter().take(limit).cloned().collect())
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "testing")]
    #[tokio::test]
    async fn passes_the_queue_conformance_suite() {
        crate::testing::queue::run_all(&MemoryQueue::new()).await;
    }

    #[tokio::test]
    async fn a_hundred_thousand_messages_round_trip_in_batches() {
        let queue = MemoryQueue::new();
        let lease = Duration::from_secs(60);
        let start = std::time::Instant::now();
        let mut acked = 0usize;
        for _ in 0..1000 {
            let batch = (0..100)
                .map(|i: u32| NewMessage::new(i.to_le_bytes()))
                .collect();
            queue.enqueue("bulk", batch).await.unwrap();
            let got = queue
                .dequeue("bulk", 100, lease, Duration::ZERO)
                .await
                .unwrap();
            let tags: Vec<DeliveryTag> = got.iter().map(|d| d.tag).collect();
            acked += queue
                .ack(&tags)
                .await
                .unwrap()
                .into_iter()
                .filter(|&ok| ok)
                .count();
        }
        let elapsed = start.elapsed();
        assert_eq!(acked, 100_000);
        let depth = queue.depth("bulk").await.unwrap();
        assert_eq!((depth.ready, depth.leased, depth.delayed), (0, 0, 0));
        assert!(queue.lock().messages.is_empty(), "acked messages are freed");
        println!(
            "memory queue: {:.0} messages/s",
            100_000.0 / elapsed.as_secs_f64()
        );
    }
}
