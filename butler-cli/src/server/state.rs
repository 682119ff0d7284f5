//! What every handler shares: the store, the queue and the tracker.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use butler_core::DynRunStore;
use butler_core::engine::{EngineOptions, LOST_AFTER_HEARTBEATS, python_queue};
use butler_core::model::WorkerInfo;
use butler_core::queue::DynQueue;
use butler_core::tracker::Tracker;
use butler_providers::connect::Backends;

use super::auth::Auth;

/// The server's shared state; cloning is cheap.
#[derive(Clone)]
pub struct AppState {
    /// The run store.
    pub store: Arc<DynRunStore>,
    /// The task queue.
    pub queue: Arc<DynQueue>,
    /// The name of the queue task attempts go through.
    pub queue_name: String,
    /// Core operations on the store.
    pub tracker: Tracker,
    /// `BUTLER_HOME`: attempt directories and their logs.
    pub home: PathBuf,
    /// Whether requests need a token.
    pub auth: Auth,
    /// How long a worker may stay silent before it is called lost.
    pub lost_after: Duration,
}

impl AppState {
    /// State over opened backends.
    pub fn new(backends: &Backends, queue_name: String, home: PathBuf, auth: Auth) -> Self {
        AppState {
            store: backends.store.clone(),
            queue: backends.queue.clone(),
            queue_name,
            tracker: Tracker::new(backends.store.clone()),
            lost_after: EngineOptions::new(home.clone(), 0).worker_heartbeat
                * LOST_AFTER_HEARTBEATS,
            home,
            auth,
        }
    }

    /// The state with workers called lost after `lost_after` of silence instead of the
    /// default three heartbeats of five seconds (`Settings::lost_after`).
    pub fn with_lost_after(mut self, lost_after: Duration) -> Self {
        self.lost_after = lost_after;
        self
    }

    /// The task queues to show: the engine's command queue, its Python queue, then every other
    /// queue one of `workers` takes from, sorted.
    pub fn queue_names(&self, workers: &[WorkerInfo]) -> Vec<String> {
        let mut names = vec![self.queue_name.clone(), python_queue(&self.queue_name)];
        let mut others: Vec<String> = workers
            .iter()
            .map(|worker| worker.queue.clone())
            .filter(|queue| !names.contains(queue))
            .collect();
        others.sort_unstable();
        others.dedup();
        names.extend(others);
        names
    }

    /// Whether the store and the queue answer; the error says which does not.
    pub async fn check_ready(&self) -> Result<(), String> {
        self.store
            .last_event_id()
            .await
            .map_err(|e| format!("the store does not answer: {e}"))?;
        self.queue
            .depth(&self.queue_name)
            .await
            .map_err(|e| format!("the queue does not answer: {e}"))?;
        Ok(())
    }
}
