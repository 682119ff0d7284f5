//! How many times the store committed, read from the engine's `butler_store_commits_total`
//! counter through the `metrics` facade.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use butler_core::engine::metrics::STORE_COMMITS;
use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};

/// The store commits of this process, from the first [`record`] on.
#[derive(Debug, Default)]
pub struct Commits(AtomicU64);

impl Commits {
    /// The commits counted so far.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl CounterFn for Commits {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, _: u64) {}
}

/// A recorder that counts the store's commits and drops every other metric.
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

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
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
}
