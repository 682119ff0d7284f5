//! Group commit: many callers' requests served by one call of a batch operation.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::{Error, Result};

type Reply<R> = oneshot::Sender<Result<Vec<R>, Arc<Error>>>;
type BatchFn<T, R> =
    Arc<dyn Fn(Vec<T>) -> Pin<Box<dyn Future<Output = Result<Vec<R>>> + Send>> + Send + Sync>;

/// Gathers the items that callers submit while batches are in flight and hands them to the
/// next call of the batch operation together, so one transaction (one fsync) serves them all.
///
/// Up to `in_flight` calls run at once, so the store has the next batch as soon as it is done
/// with the last, rather than after a round trip through this task; calls may finish in any
/// order, so items whose order matters must be submitted one after the other's answer (every
/// caller of the engine waits for its answer before its next change).
///
/// The operation must return one result per item, in order.
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
}
