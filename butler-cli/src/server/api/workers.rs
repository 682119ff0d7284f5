//! `/api/workers` and `/api/queues`: who executes tasks, and what waits for them.

use axum::Json;
use axum::extract::State;
use butler_core::model::WorkerInfo;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::ErrorBody;
use crate::server::ApiError;
use crate::server::state::AppState;

/// A worker process as it last reported itself.
#[derive(Debug, Serialize, ToSchema)]
pub struct Worker {
    /// Unique among the store's workers: `HOST/PID`, or the name it was given.
    pub name: String,
    /// The host it runs on.
    pub host: String,
    /// Its process id on that host.
    pub pid: u32,
    /// The queue it takes task attempts from.
    pub queue: String,
    /// Attempts it runs at once.
    pub slots: u32,
    /// Slots in use at its last heartbeat.
    pub running: u32,
    /// The Butler version it runs.
    pub version: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub heartbeat_at: DateTime<Utc>,
    /// `alive`, or `lost` once its heartbeats stopped (its tasks come back when their leases
    /// end).
    pub state: WorkerState,
}

/// Whether a worker still reports.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// It reported recently.
    Alive,
    /// Its heartbeats stopped.
    Lost,
}

impl Worker {
    fn new(worker: WorkerInfo, now: DateTime<Utc>, state: &AppState) -> Self {
        let worker_state = if worker.is_lost(now, state.lost_after) {
            WorkerState::Lost
        } else {
            WorkerState::Alive
        };
        Worker {
            name: worker.name,
            host: worker.host,
            pid: worker.pid,
            queue: worker.queue,
            slots: worker.slots,
            running: worker.running,
            version: worker.version,
            started_at: worker.started_at,
            heartbeat_at: worker.heartbeat_at,
            state: worker_state,
        }
    }
}

/// How many messages of one task queue are in each state.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Queue)]
pub struct QueueInfo {
    /// The queue's name.
    #[schema(example = "butler.tasks")]
    pub name: String,
    /// Visible now: the next worker to ask takes them.
    pub ready: u64,
    /// Waiting for a delay (a retry's backoff) to pass.
    pub delayed: u64,
    /// Held by a worker under a lease.
    pub leased: u64,
    /// Moved to the dead-letter list after too many deliveries.
    pub dead: u64,
    /// How long the longest-waiting ready message has waited, in seconds; null when none is
    /// ready. A growing value means the workers do not keep up.
    pub oldest_ready_age_seconds: Option<f64>,
}

/// Every worker recorded in the store, alive or lost, by name.
#[utoipa::path(
    get,
    path = "/workers",
    operation_id = "list_workers",
    tag = "workers",
    responses(
        (status = 200, description = "The workers, by name", body = [Worker]),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<Worker>>, ApiError> {
    let now = Utc::now();
    let workers = state.store.list_workers().await?;
    Ok(Json(
        workers
            .into_iter()
            .map(|worker| Worker::new(worker, now, &state))
            .collect(),
    ))
}

/// The task queues: the server's command queue, its Python queue, and any other queue a
/// worker takes from.
#[utoipa::path(
    get,
    path = "/queues",
    operation_id = "list_queues",
    tag = "workers",
    responses(
        (status = 200, description = "The depth of every task queue", body = [QueueInfo]),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
)]
pub async fn queues(State(state): State<AppState>) -> Result<Json<Vec<QueueInfo>>, ApiError> {
    let names = state.queue_names(&state.store.list_workers().await?);
    let mut answer = Vec::with_capacity(names.len());
    for name in names {
        let depth = state.queue.depth(&name).await?;
        answer.push(QueueInfo {
            ready: depth.ready,
            delayed: depth.delayed,
            leased: depth.leased,
            dead: depth.dead,
            oldest_ready_age_seconds: depth.oldest_ready_age.map(|age| age.as_secs_f64()),
            name,
        });
    }
    Ok(Json(answer))
}
