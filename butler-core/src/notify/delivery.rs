//! Delivery: one task per notifier, fed through a bounded channel, retrying with backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Alert, DynNotifier};

/// How alerts are delivered to each notifier.
#[derive(Debug, Clone)]
pub struct DeliveryOptions {
    /// Alerts waiting for one notifier; more are dropped (and logged) rather than waited for.
    pub capacity: usize,
    /// Attempts per alert, the first included.
    pub attempts: u32,
    /// Delay before the first retry; it doubles for each later one.
    pub first_delay: Duration,
    /// Upper bound of the delay between attempts.
    pub max_delay: Duration,
    /// An attempt still unanswered after this long counts as failed (and may be retried).
    pub attempt_timeout: Duration,
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        DeliveryOptions {
            capacity: 256,
            attempts: 6,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            attempt_timeout: Duration::from_secs(30),
        }
    }
}

impl DeliveryOptions {
    /// The delay before retry number `retry` (1 for the first): `first_delay` doubled for every
    /// retry after the first, capped at `max_delay`, then scaled by a random factor in
    /// `[0.5, 1.0]` so that alerts failing together are not retried together.
    pub fn backoff(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(30);
        let delay = self
            .first_delay
            .saturating_mul(1 << doublings)
            .min(self.max_delay.max(self.first_delay));
        delay.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

/// What became of the alerts given to one notifier.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    /// Alerts the notifier accepted.
    pub delivered: AtomicU64,
    /// Alerts given up on: a permanent error, or every attempt failed.
    pub failed: AtomicU64,
    /// Alerts dropped because the notifier's channel was full or closed.
    pub dropped: AtomicU64,
    /// Attempts that failed (each retry follows one).
    pub failed_attempts: AtomicU64,
}

impl DeliveryStats {
    /// `(delivered, failed, dropped)` now.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.delivered.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
}

/// The sending end of one notifier's delivery task.
#[derive(Debug, Clone)]
pub struct Outbox {
    name: String,
    tx: mpsc::Sender<Arc<Alert>>,
    stats: Arc<DeliveryStats>,
}

impl Outbox {
    /// Starts the delivery task of `notifier` (called `name` in logs). It ends when every
    /// `Outbox` of it is dropped and the alerts already given are delivered or given up, or at
    /// once when `abort` is cancelled.
    pub fn spawn(
        name: &str,
        notifier: Arc<DynNotifier>,
        options: DeliveryOptions,
        abort: CancellationToken,
    ) -> (Outbox, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Arc<Alert>>(options.capacity.max(1));
        let stats = Arc::new(DeliveryStats::default());
        let outbox = Outbox {
            name: name.to_owned(),
            tx,
            stats: stats.clone(),
        };
        let name = name.to_owned();
        let task = tokio::spawn(async move {
            loop {
                let alert = tokio::select! {
                    alert = rx.recv() => match alert {
                        Some(alert) => alert,
                        None => return,
                    },
                    _ = abort.cancelled() => return,
                };
                deliver(&name, notifier.as_ref(), &alert, &options, &stats, &abort).await;
            }
        });
        (outbox, task)
    }

    /// The notifier's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What became of the alerts given so far.
    pub fn stats(&self) -> &Arc<DeliveryStats> {
        &self.stats
    }

    /// Queues `alert` for delivery without waiting: `false` (after a warning) when the
    /// notifier's channel is full or its task has ended, and the alert is dropped.
    pub fn offer(&self, alert: Arc<Alert>) -> bool {
        match self.tx.try_send(alert) {
            Ok(()) => true,
            Err(err) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                let (why, alert) = match err {
                    mpsc::error::TrySendError::Full(alert) => (
                        "its delivery queue is full (the destination is slow or down)",
                        alert,
                    ),
                    mpsc::error::TrySendError::Closed(alert) => {
                        ("its delivery task has stopped", alert)
                    }
                };
                warn!(
                    notifier = %self.name,
                    kind = %alert.kind,
                    title = %alert.title,
                    "alert dropped: {why}"
                );
                false
            }
        }
    }
}

/// Tries `alert` until it is delivered, fails for good, or runs out of attempts.
async fn deliver(
    name: &str,
    notifier: &DynNotifier,
    alert: &Alert,
    options: &DeliveryOptions,
    stats: &DeliveryStats,
    abort: &CancellationToken,
) {
    let attempts = options.attempts.max(1);
    for attempt in 1..=attempts {
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(options.attempt_timeout, notifier.send(alert)) => outcome,
            _ = abort.cancelled() => return,
        };
        let (error, retryable) = match outcome {
            Ok(Ok(())) => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                debug!(notifier = %name, kind = %alert.kind, attempt, "alert delivered");
                return;
            }
            Ok(Err(err)) => {
                let retryable = err.is_retryable();
                (err.to_string(), retryable)
            }
            Err(_) => (
                format!(
                    "no answer within {}",
                    humantime::format_duration(options.attempt_timeout)
                ),
                true,
            ),
        };
        stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
        if !retryable || attempt == attempts {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            warn!(
                notifier = %name,
                kind = %alert.kind,
                title = %alert.title,
                attempts = attempt,
                error = %error,
                "alert not delivered; giving up"
            );
            return;
        }
        let delay = options.backoff(attempt);
        warn!(
            notifier = %name,
            kind = %alert.kind,
            attempt,
            error = %error,
            retry_in = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
            "alert delivery failed; retrying"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = abort.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use chrono::Utc;

    use super::*;
    use crate::error::{Error, Result};
    use crate::notify::Notifier;

    /// Answers each attempt with the next scripted result; `None` never answers.
    #[derive(Debug)]
    struct Scripted {
        script: Mutex<Vec<Option<Result<()>>>>,
        attempts: AtomicU64,
    }

    impl Scripted {
        fn new(mut script: Vec<Option<Result<()>>>) -> Arc<Scripted> {
            script.reverse();
            Arc::new(Scripted {
                script: Mutex::new(script),
                attempts: AtomicU64::new(0),
            })
        }
    }

    #[async_trait]
    impl Notifier for Scripted {
        async fn send(&self, _: &Alert) -> Result<()> {
            self.attempts.fetch_add(1, Ordering::Relaxed);
            let next = self.script.lock().unwrap().pop().unwrap_or(Some(Ok(())));
            match next {
                Some(result) => result,
                None => std::future::pending().await,
            }
        }
    }

    fn busy() -> Result<()> {
        Err(Error::unavailable("POST hook", "503 Service Unavailable"))
    }

    fn fast() -> DeliveryOptions {
        DeliveryOptions {
            capacity: 2,
            attempts: 4,
            first_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
            attempt_timeout: Duration::from_millis(200),
        }
    }

    fn alert() -> Arc<Alert> {
        Arc::new(Alert::report(Utc::now(), Utc::now(), Vec::new()))
    }

    async fn settle(outbox: Outbox, task: JoinHandle<()>) -> (u64, u64, u64) {
        let stats = outbox.stats().clone();
        drop(outbox);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the delivery task ends once its outboxes are gone")
            .unwrap();
        stats.snapshot()
    }

    #[tokio::test]
    async fn retryable_failures_are_retried_and_permanent_ones_are_not() {
        let notifier = Scripted::new(vec![Some(busy()), None, Some(Ok(()))]);
        let (outbox, task) =
            Outbox::spawn("hook", notifier.clone(), fast(), CancellationToken::new());
        assert!(outbox.offer(alert()));
        // A 503, then no answer (timed out), then delivered.
        assert_eq!(settle(outbox, task).await, (1, 0, 0));
        assert_eq!(notifier.attempts.load(Ordering::Relaxed), 3);

        let notifier = Scripted::new(
            vec![Err(Error::InvalidInput("404".into()))]
                .into_iter()
                .map(Some)
                .collect(),
        );
        let (outbox, task) =
            Outbox::spawn("hook", notifier.clone(), fast(), CancellationToken::new());
        outbox.offer(alert());
        assert_eq!(settle(outbox, task).await, (0, 1, 0));
        assert_eq!(notifier.attempts.load(Ordering::Relaxed), 1);

        let notifier = Scripted::new((0..10).map(|_| Some(busy())).collect());
        let (outbox, task) =
            Outbox::spawn("hook", notifier.clone(), fast(), CancellationToken::new());
        outbox.offer(alert());
        assert_eq!(settle(outbox, task).await, (0, 1, 0));
        assert_eq!(notifier.attempts.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn a_full_channel_drops_instead_of_waiting() {
        let notifier = Scripted::new((0..10).map(|_| None).collect());
        let mut options = fast();
        options.attempt_timeout = Duration::from_secs(3600);
        let abort = CancellationToken::new();
        let (outbox, task) = Outbox::spawn("stuck", notifier.clone(), options, abort.clone());
        let started = std::time::Instant::now();
        let accepted = (0..10).filter(|_| outbox.offer(alert())).count();
        assert!(started.elapsed() < Duration::from_secs(1));
        // One in the hands of the stuck notifier (at most), two in the channel.
        assert!((2..=3).contains(&accepted), "{accepted}");
        assert_eq!(outbox.stats().snapshot().2, 10 - accepted as u64);
        abort.cancel();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("abort ends the task at once")
            .unwrap();
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let options = DeliveryOptions {
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
            ..DeliveryOptions::default()
        };
        let first = options.backoff(1);
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
        let third = options.backoff(3);
        assert!(third >= Duration::from_secs(2) && third <= Duration::from_secs(4));
        assert!(options.backoff(40) <= Duration::from_secs(10));
        assert!(options.backoff(40) >= Duration::from_secs(5));
    }
}
