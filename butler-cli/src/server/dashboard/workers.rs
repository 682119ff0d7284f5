//! `/workers`: the scheduler, the workers with their slots and heartbeats, the tasks in
//! flight, and the depth of every task queue.

use axum::Extension;
use axum::extract::State;
use axum::response::Response;
use butler_core::engine::SCHEDULER_ROLE;
use chrono::Utc;
use serde::Serialize;

use super::format::{Time, age};
use super::{Chrome, Nav, PageError};
use crate::output;
use crate::server::auth::Access;
use crate::server::state::AppState;

#[derive(Debug, Serialize)]
struct WorkerRow {
    name: String,
    host: String,
    pid: u32,
    queue: String,
    slots: u32,
    running: u32,
    /// Share of the slots in use, 0–100, for the bar.
    busy: u32,
    version: String,
    started: Time,
    heartbeat: Time,
    heartbeat_age: String,
    lost: bool,
}

#[derive(Debug, Serialize)]
struct QueueRow {
    name: String,
    ready: u64,
    delayed: u64,
    leased: u64,
    dead: u64,
    oldest: Option<String>,
}

#[derive(Debug, Serialize)]
struct Scheduler {
    holder: String,
    since: Time,
    held: bool,
    until: Time,
}

#[derive(Debug, Serialize)]
struct WorkersPage {
    scheduler: Option<Scheduler>,
    workers: Vec<WorkerRow>,
    alive: usize,
    slots: u32,
    running: u32,
    lost_after: String,
    tasks: Vec<(&'static str, u64)>,
    queues: Vec<QueueRow>,
}

/// `GET /workers`.
pub async fn page(State(state): State<AppState>, access: Option<Extension<Access>>) -> Response {
    let chrome = Chrome::new(&state, access.map(|a| a.0), Nav::Workers);
    chrome.respond("workers.html", load(&state).await)
}

async fn load(state: &AppState) -> Result<WorkersPage, PageError> {
    let now = Utc::now();
    let workers = state.store.list_workers().await?;
    let scheduler = state
        .store
        .leader(SCHEDULER_ROLE)
        .await?
        .map(|lease| Scheduler {
            held: lease.is_held(now),
            holder: lease.holder,
            since: Time::new(lease.since),
            until: Time::new(lease.until),
        });

    let names = state.queue_names(&workers);
    let mut queues = Vec::with_capacity(names.len());
    for name in names {
        let depth = state.queue.depth(&name).await?;
        queues.push(QueueRow {
            name,
            ready: depth.ready,
            delayed: depth.delayed,
            leased: depth.leased,
            dead: depth.dead,
            oldest: depth.oldest_ready_age.map(output::duration),
        });
    }

    let rows: Vec<WorkerRow> = workers
        .into_iter()
        .map(|w| WorkerRow {
            lost: w.is_lost(now, state.lost_after),
            busy: (w.running * 100).checked_div(w.slots).unwrap_or(0).min(100),
            heartbeat_age: age(w.heartbeat_at, now),
            heartbeat: Time::new(w.heartbeat_at),
            started: Time::new(w.started_at),
            name: w.name,
            host: w.host,
            pid: w.pid,
            queue: w.queue,
            slots: w.slots,
            running: w.running,
            version: w.version,
        })
        .collect();
    let alive: Vec<&WorkerRow> = rows.iter().filter(|w| !w.lost).collect();
    let tasks = state
        .store
        .count_active_tasks()
        .await?
        .into_iter()
        .map(|(task_state, n)| (task_state.as_str(), n))
        .collect();
    Ok(WorkersPage {
        scheduler,
        alive: alive.len(),
        slots: alive.iter().map(|w| w.slots).sum(),
        running: alive.iter().map(|w| w.running).sum(),
        workers: rows,
        lost_after: output::duration(state.lost_after),
        tasks,
        queues,
    })
}
