//! Group commit: many callers' requests served by one call of a batch operation.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::{Error, Result};

type Reply<R> = oneshot::Sender<Result<Vec<R>, Arc<Error>>>;
type BatchFn<T, R> =
    Arc<dyn Fn(Vec<T>) -> Pin<Box<dyn Future<Output = Result<Vec<R>>> + Send>> + Send + Sync>;

/// When a call waits for more items before it starts: for at most `at_most`, and only while
/// `busy` says that nothing is waiting on its answer but more of the same work.
#[derive(Clone)]
pub struct Linger {
    /// The longest a call waits for more items (tokio's timer rounds it up to the next
    /// millisecond).
    pub at_most: Duration,
    /// Whether a call may wait now.
    pub busy: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for Linger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linger")
            .field("at_most", &self.at_most)
            .finish_non_exhaustive()
    }
}

/// Gathers the items that callers submit while batches are in flight and hands them to the
/// next call of the batch operation together, so one transaction (one fsync) serves them all.
///
/// Up to `in_flight` calls run at once, so the store has the next batch as soon as it is done
/// with the last, rather than after a round trip through this task; calls may finish in any
/// order, so items whose order matters must be submitted one after the other's answer (every
/// caller of the engine waits for its answer before its next change).
///
/// The operation must return one result per item, in order.
///
/// With a [`Linger`], a call that finds the operation free waits a moment for more items while
/// the linger's `busy` holds: under a steady trickle, items that arrive one at a time would
/// otherwise each get a call of their own.
pub struct Batcher<T, R> {
    tx: mpsc::UnboundedSender<(Vec<T>, Reply<R>)>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<T, R> std::fmt::Debug for Batcher<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the batching task on the current runtime; it ends when every handle is dropped.
    /// At most `max_items` items go into one call, and at most `in_flight` calls run at once.
    pub fn spawn<F, Fut>(max_items: usize, in_flight: usize, operation: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<R>>> + Send + 'static,
    {
        Self::spawn_lingering(max_items, in_flight, None, operation)
    }

    /// As [`Batcher::spawn`], with calls that wait for more items as `linger` allows.
    pub fn spawn_lingering<F, Fut>(
        max_items: usize,
        in_flight: usize,
        linger: Option<Linger>,
        operation: F,
    ) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<R>>> + Send + 'static,
    {
        let operation: BatchFn<T, R> = Arc::new(move |items| Box::pin(operation(items)));
        let (tx, mut rx) = mpsc::unbounded_channel::<(Vec<T>, Reply<R>)>();
        let calls = Arc::new(Semaphore::new(in_flight.max(1)));
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Waiting for a free call first lets what arrives meanwhile join this one.
                let Ok(call) = calls.clone().acquire_owned().await else {
                    return;
                };
                let mut requests = vec![first];
                let mut count = requests[0].0.len();
                while count < max_items {
                    match rx.try_recv() {
                        Ok(next) => {
                            count += next.0.len();
                            requests.push(next);
                        }
                        Err(_) => break,
                    }
                }
                if let Some(linger) = linger.as_ref().filter(|l| (l.busy)()) {
                    let deadline = tokio::time::Instant::now() + linger.at_most;
                    while count < max_items {
                        match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(Some(next)) => {
                                count += next.0.len();
                                requests.push(next);
                            }
                            Ok(None) | Err(_) => break,
                        }
                    }
                }
                let mut sizes = Vec::with_capacity(requests.len());
                let mut items = Vec::with_capacity(count);
                let mut replies = Vec::with_capacity(requests.len());
                for (batch, reply) in requests {
                    sizes.push(batch.len());
                    items.extend(batch);
                    replies.push(reply);
                }
                let operation = operation.clone();
                tokio::spawn(async move {
                    let _call = call;
                    match operation(items).await {
                        Ok(results) => {
                            let mut results = results.into_iter();
                            for (size, reply) in sizes.into_iter().zip(replies) {
                                let _ = reply.send(Ok(results.by_ref().take(size).collect()));
                            }
                        }
                        Err(err) => {
                            let err = Arc::new(err);
                            for reply in replies {
                                let _ = reply.send(Err(err.clone()));
                            }
                        }
                    }
                });
            }
        });
        Batcher { tx }
    }

    /// Submits `items` and waits for their results, in order.
    pub async fn submit(&self, items: Vec<T>) -> Result<Vec<R>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        let stopped = || Error::Conflict("the engine is shutting down".to_owned());
        self.tx.send((items, reply)).map_err(|_| stopped())?;
        match answer.await.map_err(|_| stopped())? {
            Ok(results) => Ok(results),
            Err(err) => Err(Error::backend(
                "a batched operation failed",
                err.to_string(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn concurrent_submissions_share_calls_and_get_their_own_results() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let batcher = Batcher::spawn(1000, 1, move |items: Vec<u32>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Ok(items.into_iter().map(|i| i * 2).collect())
            }
        });
        let handles: Vec<_> = (0..50u32)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.submit(vec![i, i + 100]).await.unwrap() })
            })
            .collect();
        for (i, handle) in handles.into_iter().enumerate() {
            let i = i as u32;
            assert_eq!(handle.await.unwrap(), vec![i * 2, (i + 100) * 2]);
        }
        assert!(calls.load(Ordering::SeqCst) < 50, "no batching happened");
    }

    /// A batcher whose operation counts its calls and answers at once.
    fn counting(busy: bool) -> (Batcher<u32, u32>, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let linger = Linger {
            at_most: Duration::from_millis(50),
            busy: Arc::new(move || busy),
        };
        let batcher = Batcher::spawn_lingering(1000, 2, Some(linger), move |items: Vec<u32>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok(items) }
        });
        (batcher, calls)
    }

    /// Submits ten items 2 ms apart, each waiting for its answer only after the last is sent.
    async fn trickle(batcher: &Batcher<u32, u32>) -> Vec<u32> {
        let mut pending = Vec::new();
        for i in 0..10u32 {
            let b = batcher.clone();
            pending.push(tokio::spawn(
                async move { b.submit(vec![i]).await.unwrap() },
            ));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut answers = Vec::new();
        for handle in pending {
            answers.extend(handle.await.unwrap());
        }
        answers
    }

    #[tokio::test]
    async fn while_busy_a_trickle_of_items_shares_calls() {
        let (batcher, calls) = counting(true);
        assert_eq!(trickle(&batcher).await, (0..10).collect::<Vec<_>>());
        assert!(
            calls.load(Ordering::SeqCst) <= 3,
            "items 2 ms apart join a call that lingers 50 ms: {} calls",
            calls.load(Ordering::SeqCst)
        );
    }

    #[tokio::test]
    async fn when_not_busy_each_item_goes_at_once() {
        let (batcher, calls) = counting(false);
        let begin = std::time::Instant::now();
        batcher.submit(vec![7]).await.unwrap();
        assert!(
            begin.elapsed() < Duration::from_millis(40),
            "a lone item does not wait for the linger"
        );
        assert_eq!(trickle(&batcher).await, (0..10).collect::<Vec<_>>());
        assert_eq!(calls.load(Ordering::SeqCst), 11, "one call per item");
    }
}
