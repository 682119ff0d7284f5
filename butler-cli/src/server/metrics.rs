//! `/metrics` in Prometheus' text format (version 0.0.4): what this process's engine counted
//! (task attempts by outcome, retries, runs finished, store and queue call latencies; see
//! [`butler_core::engine::metrics`]) followed by what the store and the queue say at the time
//! of the scrape (runs by status, tasks of unfinished runs by state, queue depths, workers and
//! their heartbeats, the scheduler's lease, free disk space in `BUTLER_HOME`).
//!
//! The engine records through the `metrics` facade into the Prometheus recorder installed by
//! [`routes`]. The store's values are read ahead of the scrapes, once per [`SNAPSHOT_TTL`]
//! and written here directly, so a value that is gone from the store (a worker removed from
//! the list) is gone from the next scrape too, rather than lingering as a stale series.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::routing::get;
use butler_core::engine::{self, SCHEDULER_ROLE, metrics as names};
use butler_core::model::{RunFilter, RunStatus, TaskState};
use chrono::Utc;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::AppState;

/// The content type of Prometheus' text format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// How often recorded histogram samples are folded into their buckets between scrapes, so
/// they do not pile up in memory when nothing scrapes.
const UPKEEP: Duration = Duration::from_secs(5);
/// How long the store's numbers are reused by later scrapes.
pub const SNAPSHOT_TTL: Duration = Duration::from_secs(1);

/// The `/metrics` route; installs this process's metrics recorder on first use, so build the
/// router before starting the engine whose numbers it is to export.
pub fn routes() -> Router<AppState> {
    recorder();
    let cache = Arc::new(SnapshotCache::default());
    Router::new().route(
        "/metrics",
        get(move |State(state): State<AppState>| async move {
            let page = render(&state, &cache).await;
            ([(header::CONTENT_TYPE, CONTENT_TYPE)], page)
        }),
    )
}

/// The whole `/metrics` page: the engine's numbers as of now, the store's as of at most
/// [`SNAPSHOT_TTL`] ago.
async fn render(state: &AppState, cache: &SnapshotCache) -> String {
    let mut page = recorder().render();
    cache.get(state).await.write(&mut page);
    page
}

/// The store's numbers, read ahead of the scrapes that want them.
///
/// `/metrics` needs no token, and reading the store's numbers costs a few index scans (tens of
/// milliseconds with ten thousand active runs, as many as the tasks of those runs): the first
/// scrape starts a reader that reads them every [`SNAPSHOT_TTL`] for as long as scrapes keep
/// coming (until none came for [`IDLE_AFTER`]), and a scrape answers with the last reading at
/// once. So a scrape costs microseconds whatever the store's size, the numbers are at most
/// [`SNAPSHOT_TTL`] plus one reading old (`butler_metrics_age_seconds` says by how much), and
/// the store is read once per [`SNAPSHOT_TTL`] whatever the rate of requests.
#[derive(Default)]
struct SnapshotCache {
    latest: std::sync::Mutex<Option<tokio::sync::watch::Receiver<Option<Arc<Snapshot>>>>>,
    /// When the last scrape came, for the reader to know when to stop.
    last_scrape: Arc<std::sync::Mutex<Option<Instant>>>,
}

/// How long the reader keeps reading after the last scrape.
const IDLE_AFTER: Duration = Duration::from_secs(60);

impl SnapshotCache {
    async fn get(&self, state: &AppState) -> Arc<Snapshot> {
        *lock(&self.last_scrape) = Some(Instant::now());
        let mut latest = {
            let mut slot = lock(&self.latest);
            match slot.as_ref() {
                // A reader that has stopped dropped its sender: start another.
                Some(latest) if latest.has_changed().is_ok() => latest.clone(),
                _ => {
                    let started = self.start_reader(state.clone());
                    *slot = Some(started.clone());
                    started
                }
            }
        };
        // Wait for a reading no older than two periods: the first one, or one past a store
        // that took longer than a period to answer.
        let fresh = |s: &Option<Arc<Snapshot>>| {
            s.as_ref()
                .is_some_and(|s| s.taken.elapsed() < 2 * SNAPSHOT_TTL + s.took)
        };
        let waited = latest.wait_for(fresh).await.ok().and_then(|s| s.clone());
        match waited {
            Some(snapshot) => snapshot,
            // The reader stopped between the check and the wait (the idle timeout just
            // passed): read once here.
            None => Arc::new(collect(state, Instant::now()).await),
        }
    }

    /// Starts the reader; it stops when no scrape came for [`IDLE_AFTER`].
    fn start_reader(&self, state: AppState) -> tokio::sync::watch::Receiver<Option<Arc<Snapshot>>> {
        let (sender, receiver) = tokio::sync::watch::channel(None);
        let last_scrape = Arc::clone(&self.last_scrape);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SNAPSHOT_TTL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let idle = lock(&last_scrape).is_none_or(|at| at.elapsed() > IDLE_AFTER);
                if idle {
                    break;
                }
                let snapshot = collect(&state, Instant::now()).await;
                sender.send_replace(Some(Arc::new(snapshot)));
            }
        });
        receiver
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// This process's recorder: installed globally the first time, so that the engine records
/// into it. If another recorder was installed first (only possible in an embedding program),
/// the engine's numbers go there and this page shows the scrape-time values alone.
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let buckets = [
            (names::TASK_ATTEMPT_DURATION, &names::ATTEMPT_BUCKETS[..]),
            (names::STORE_CALL_DURATION, &names::CALL_BUCKETS[..]),
            (names::STORE_TRANSACTION_DURATION, &names::CALL_BUCKETS[..]),
            (names::QUEUE_CALL_DURATION, &names::CALL_BUCKETS[..]),
            (names::STORE_BATCH_SIZE, &names::BATCH_BUCKETS[..]),
        ];
        let mut builder = PrometheusBuilder::new();
        for (name, bounds) in buckets {
            builder = match builder.set_buckets_for_metric(Matcher::Full(name.to_owned()), bounds) {
                Ok(builder) => builder,
                // Only empty bounds are refused, and the engine's are not empty.
                Err(err) => {
                    tracing::warn!(error = %err, metric = name, "histogram buckets refused");
                    PrometheusBuilder::new()
                }
            };
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        match metrics::set_global_recorder(recorder) {
            Ok(()) => names::describe(),
            Err(err) => tracing::warn!(
                error = %err,
                "another metrics recorder is installed; /metrics shows the store's numbers only"
            ),
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let upkeep = handle.clone();
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(UPKEEP);
                loop {
                    tick.tick().await;
                    upkeep.run_upkeep();
                }
            });
        }
        handle
    })
}

/// What the store and the queue said at one scrape; `None` where they did not answer.
struct Snapshot {
    runs: Option<Vec<(RunStatus, u64)>>,
    tasks: Option<Vec<(TaskState, u64)>>,
    queues: Vec<(String, butler_core::queue::QueueDepth)>,
    queue_up: bool,
    workers: Option<Vec<WorkerLine>>,
    lost_after: Duration,
    scheduler_leads: Option<bool>,
    disk: Option<(u64, u64)>,
    /// When the reading began.
    taken: Instant,
    /// How long reading the store and the queue took.
    took: Duration,
}

struct WorkerLine {
    name: String,
    host: String,
    heartbeat_age: f64,
    slots: u32,
    running: u32,
    lost: bool,
}

/// Asks the store and the queue, all at once; `started` is when the scrape began.
async fn collect(state: &AppState, started: Instant) -> Snapshot {
    let python_queue = engine::python_queue(&state.queue_name);
    let all_runs = RunFilter::default();
    let (runs, tasks, depth, python_depth, workers, leader) = tokio::join!(
        state.store.count_runs(&all_runs),
        state.store.count_active_tasks(),
        state.queue.depth(&state.queue_name),
        state.queue.depth(&python_queue),
        state.store.list_workers(),
        state.store.leader(SCHEDULER_ROLE),
    );
    let now = Utc::now();
    let warn = |what: &str, err: &butler_core::Error| {
        tracing::warn!(error = %err, "/metrics could not read {what}");
    };
    let runs = runs
        .map(|counts| {
            RunStatus::ALL
                .iter()
                .map(|status| (*status, counts.get(status).copied().unwrap_or(0)))
                .collect()
        })
        .map_err(|err| warn("the runs", &err))
        .ok();
    let tasks = tasks
        .map(|counts| {
            TaskState::ALL
                .iter()
                .map(|state| (*state, counts.get(state).copied().unwrap_or(0)))
                .collect()
        })
        .map_err(|err| warn("the tasks", &err))
        .ok();
    let queue_up = depth.is_ok();
    let mut queues = Vec::new();
    match depth {
        Ok(depth) => queues.push((state.queue_name.clone(), depth)),
        Err(err) => warn("the queue's depth", &err),
    }
    if let Ok(depth) = python_depth {
        queues.push((python_queue, depth));
    }
    let workers = workers
        .map(|workers| {
            workers
                .into_iter()
                .map(|worker| WorkerLine {
                    lost: worker.is_lost(now, state.lost_after),
                    heartbeat_age: seconds_since(worker.heartbeat_at, now),
                    name: worker.name,
                    host: worker.host,
                    slots: worker.slots,
                    running: worker.running,
                })
                .collect()
        })
        .map_err(|err| warn("the workers", &err))
        .ok();
    let scheduler_leads = leader
        .map(|lease| lease.is_some_and(|lease| lease.is_held(now)))
        .map_err(|err| warn("the scheduler's lease", &err))
        .ok();
    Snapshot {
        runs,
        tasks,
        queues,
        queue_up,
        workers,
        lost_after: state.lost_after,
        scheduler_leads,
        disk: disk_space(&state.home),
        taken: started,
        took: started.elapsed(),
    }
}

fn seconds_since(at: chrono::DateTime<Utc>, now: chrono::DateTime<Utc>) -> f64 {
    now.signed_duration_since(at)
        .to_std()
        .unwrap_or_default()
        .as_secs_f64()
}

/// Free (for unprivileged users) and total bytes of the file system holding `home`.
fn disk_space(home: &Path) -> Option<(u64, u64)> {
    let stats = nix::sys::statvfs::statvfs(home).ok()?;
    let fragment = stats.fragment_size();
    Some((
        stats.blocks_available().saturating_mul(fragment),
        stats.blocks().saturating_mul(fragment),
    ))
}

impl Snapshot {
    fn write(&self, page: &mut String) {
        let mut out = Page(page);
        out.family(
            "butler_build_info",
            "gauge",
            "Always 1; the version label is this server's Butler version.",
        );
        out.sample("butler_build_info", &[("version", engine::VERSION)], 1.0);
        out.family(
            "butler_store_up",
            "gauge",
            "1 if the run store answered this scrape's queries, else 0.",
        );
        let store_up = self.runs.is_some() && self.tasks.is_some() && self.workers.is_some();
        out.sample("butler_store_up", &[], flag(store_up));
        out.family(
            "butler_queue_up",
            "gauge",
            "1 if the task queue answered this scrape, else 0.",
        );
        out.sample("butler_queue_up", &[], flag(self.queue_up));
        if let Some(runs) = &self.runs {
            out.family("butler_runs", "gauge", "Runs in the store, by status.");
            for (status, count) in runs {
                out.sample("butler_runs", &[("status", status.as_str())], *count as f64);
            }
        }
        if let Some(tasks) = &self.tasks {
            out.family(
                "butler_active_run_tasks",
                "gauge",
                "Tasks of unfinished runs (ready, scheduled, in progress), by state.",
            );
            for (state, count) in tasks {
                out.sample(
                    "butler_active_run_tasks",
                    &[("state", state.as_str())],
                    *count as f64,
                );
            }
        }
        if !self.queues.is_empty() {
            out.family(
                "butler_queue_messages",
                "gauge",
                "Messages in a task queue, by state (ready, delayed, leased, dead).",
            );
            for (queue, depth) in &self.queues {
                for (state, count) in [
                    ("ready", depth.ready),
                    ("delayed", depth.delayed),
                    ("leased", depth.leased),
                    ("dead", depth.dead),
                ] {
                    out.sample(
                        "butler_queue_messages",
                        &[("queue", queue), ("state", state)],
                        count as f64,
                    );
                }
            }
            out.family(
                "butler_queue_oldest_ready_age_seconds",
                "gauge",
                "How long the longest-waiting ready message of a queue has waited; 0 when none \
                 is ready. Growing means the workers do not keep up.",
            );
            for (queue, depth) in &self.queues {
                let age = depth.oldest_ready_age.unwrap_or_default();
                out.sample(
                    "butler_queue_oldest_ready_age_seconds",
                    &[("queue", queue)],
                    age.as_secs_f64(),
                );
            }
        }
        if let Some(workers) = &self.workers {
            let lost = workers.iter().filter(|w| w.lost).count();
            out.family(
                "butler_workers",
                "gauge",
                "Workers in the store's list, by state: alive, or lost once silent for \
                 butler_worker_lost_after_seconds.",
            );
            out.sample(
                "butler_workers",
                &[("state", "alive")],
                (workers.len() - lost) as f64,
            );
            out.sample("butler_workers", &[("state", "lost")], lost as f64);
            out.family(
                "butler_worker_lost_after_seconds",
                "gauge",
                "How long a worker may stay silent before it is called lost.",
            );
            out.sample(
                "butler_worker_lost_after_seconds",
                &[],
                self.lost_after.as_secs_f64(),
            );
            for (name, help, value) in [
                (
                    "butler_worker_heartbeat_age_seconds",
                    "Seconds since each listed worker last reported itself.",
                    (|w: &WorkerLine| w.heartbeat_age) as fn(&WorkerLine) -> f64,
                ),
                (
                    "butler_worker_slots",
                    "Attempts each worker may run at once.",
                    |w| f64::from(w.slots),
                ),
                (
                    "butler_worker_slots_busy",
                    "Attempts each worker was running at its last heartbeat.",
                    |w| f64::from(w.running),
                ),
            ] {
                out.family(name, "gauge", help);
                for worker in workers {
                    out.sample(
                        name,
                        &[("worker", &worker.name), ("host", &worker.host)],
                        value(worker),
                    );
                }
            }
        }
        if let Some(leads) = self.scheduler_leads {
            out.family(
                "butler_scheduler_leader",
                "gauge",
                "1 if a scheduler holds the scheduler's lease (some process drives runs), \
                 else 0.",
            );
            out.sample("butler_scheduler_leader", &[], flag(leads));
        }
        if let Some((free, size)) = self.disk {
            out.family(
                "butler_home_disk_free_bytes",
                "gauge",
                "Bytes free to Butler on the file system of BUTLER_HOME (attempt logs and the \
                 embedded store live there).",
            );
            out.sample("butler_home_disk_free_bytes", &[], free as f64);
            out.family(
                "butler_home_disk_size_bytes",
                "gauge",
                "Size in bytes of the file system of BUTLER_HOME.",
            );
            out.sample("butler_home_disk_size_bytes", &[], size as f64);
        }
        out.family(
            "butler_metrics_collect_seconds",
            "gauge",
            "How long the last reading of the store and the queue took.",
        );
        out.sample(
            "butler_metrics_collect_seconds",
            &[],
            self.took.as_secs_f64(),
        );
        out.family(
            "butler_metrics_age_seconds",
            "gauge",
            "How long ago the store's and the queue's numbers on this page were read.",
        );
        out.sample(
            "butler_metrics_age_seconds",
            &[],
            self.taken.elapsed().as_secs_f64(),
        );
    }
}

fn flag(on: bool) -> f64 {
    if on { 1.0 } else { 0.0 }
}

/// Writes metric families in the text format.
struct Page<'a>(&'a mut String);

impl Page<'_> {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        if !self.0.is_empty() && !self.0.ends_with("\n\n") {
            self.0.push('\n');
        }
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{label}=\"{}\"", escape_label(value));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_help_and_type_and_labels_are_escaped() {
        let mut text = String::new();
        let mut page = Page(&mut text);
        page.family("butler_x", "gauge", "A thing.\nOn two lines.");
        page.sample("butler_x", &[("worker", "gpu \"1\"\\a")], 2.5);
        page.sample("butler_x", &[], 0.0);
        assert_eq!(
            text,
            "# HELP butler_x A thing.\\nOn two lines.\n# TYPE butler_x gauge\n\
             butler_x{worker=\"gpu \\\"1\\\"\\\\a\"} 2.5\nbutler_x 0\n"
        );
    }

    #[test]
    fn disk_space_of_an_existing_directory_is_known() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (free, size) = disk_space(dir.path()).expect("statvfs works on a directory");
        assert!(size > 0 && free <= size, "free {free} of {size}");
        assert_eq!(disk_space(&dir.path().join("missing")), None);
    }
}
