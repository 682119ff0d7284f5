//! How many times the store committed, and how long the SQLite writer's transactions took,
//! read from the engine's `butler_store_commits_total` and
//! `butler_store_transaction_duration_seconds` through the `metrics` facade.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use std::time::Duration;

use butler_core::engine::metrics::{STORE_COMMITS, STORE_TRANSACTION_DURATION};
use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

/// The store commits of this process, and the time its SQLite writer spent in transactions,
/// from the first [`record`] on.
#[derive(Debug, Default)]
pub struct Commits {
    count: AtomicU64,
    writer_busy_ns: Arc<BusyTime>,
}

impl Commits {
    /// The commits counted so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The time the SQLite writer spent in transactions so far.
    pub fn writer_busy(&self) -> Duration {
        Duration::from_nanos(self.writer_busy_ns.0.load(Ordering::Relaxed))
    }
}

impl CounterFn for Commits {
    fn increment(&self, value: u64) {
        self.count.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, _: u64) {}
}

/// Nanoseconds summed from a histogram of seconds.
#[derive(Debug, Default)]
struct BusyTime(AtomicU64);

impl HistogramFn for BusyTime {
    fn record(&self, seconds: f64) {
        self.0
            .fetch_add((seconds * 1e9).round() as u64, Ordering::Relaxed);
    }
}

/// A recorder that counts the store's commits and sums its writer's transactions, and drops
/// every other metric.
struct CommitRecorder(Arc<Commits>);

impl Recorder for CommitRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() == STORE_COMMITS {
            Counter::from_arc(self.0.clone())
        } else {
            Counter::noop()
        }
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        if key.name() == STORE_TRANSACTION_DURATION {
            Histogram::from_arc(self.0.writer_busy_ns.clone())
        } else {
            Histogram::noop()
        }
    }
}

/// Starts counting the store's commits in this process (once; later calls answer the same
/// count).
pub fn record() -> anyhow::Result<Arc<Commits>> {
    static COMMITS: OnceLock<Result<Arc<Commits>, String>> = OnceLock::new();
    COMMITS
        .get_or_init(|| {
            let commits = Arc::<Commits>::default();
            metrics::set_global_recorder(CommitRecorder(commits.clone()))
                .map(|()| commits)
                .map_err(|e| format!("cannot count the store's commits: {e}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_store_commits_are_counted() {
        let commits = record().expect("the first recorder of this test process");
        let before = commits.count();
        metrics::counter!(STORE_COMMITS).increment(1);
        metrics::counter!("another_counter").increment(1);
        metrics::counter!(STORE_COMMITS).increment(2);
        assert_eq!(commits.count() - before, 3);
    }

    #[test]
    fn the_writers_transactions_are_summed() {
        let commits = record().expect("the first recorder of this test process");
        let before = commits.writer_busy();
        metrics::histogram!(STORE_TRANSACTION_DURATION).record(Duration::from_millis(3));
        metrics::histogram!("another_histogram").record(Duration::from_secs(1));
        metrics::histogram!(STORE_TRANSACTION_DURATION).record(Duration::from_millis(2));
        assert_eq!(commits.writer_busy() - before, Duration::from_millis(5));
    }
}
