//! The engine: a scheduler and workers that execute runs as DAGs of tasks, durably.
//!
//! Every state lives in the [`RunStore`](crate::RunStore) before it is acted on; the
//! [`Queue`](crate::queue::Queue) only carries hints of what to start. State changes from the
//! scheduler and from every worker slot of a process go through one group-commit
//! [`Batcher`], so one transaction serves many tasks.
//!
//! # Processes
//!
//! Any number of processes may share a store: `butler server` (a scheduler and workers),
//! `butler scheduler`, `butler worker`, and the engines embedded in `launch-workflow --wait`
//! and Python's `Client.wait`.
//!
//! - **One scheduler leads.** A scheduler drives runs only while it holds the store's
//!   [`SCHEDULER_ROLE`] lease ([`RunStore::try_lead`](crate::RunStore::try_lead)), which it
//!   renews at every poll; the others stand by, trying every third of
//!   [`EngineOptions::leader_ttl`], and one takes over when the lease ends: when the leader
//!   resigns ([`Engine::stop`]), stops renewing, or is a process of this host that no longer
//!   exists (then at once).
//! - **Embedded schedulers follow.** An engine with [`EngineOptions::only_runs`] never takes
//!   the lease: it drives its own runs only while no scheduler leads, and otherwise leaves them
//!   to the leader while its workers execute them. So a `--wait` never keeps a server from
//!   scheduling, and two `--wait`s never wait for each other.
//! - **Workers report themselves.** Every engine with worker slots records itself
//!   ([`WorkerInfo`](crate::model::WorkerInfo)) every [`EngineOptions::worker_heartbeat`], and
//!   removes itself when it stops; one silent for [`LOST_AFTER_HEARTBEATS`] heartbeats is lost,
//!   and the attempts it was running come back when their leases expire.

mod batch;
pub mod control;
mod handoff;
pub mod metrics;
pub mod plan;
pub mod retry;
mod scheduler;
#[cfg(test)]
mod tests;
mod worker;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use batch::{Batcher, Linger};

use crate::change::{Change, ChangeSet};
use crate::error::{Error, Result};
use crate::executor::DynExecutor;
use crate::model::{Id, RunFilter, RunStatus, TaskInstance};
use crate::queue::DynQueue;
use crate::store::DynRunStore;

/// The queue that carries task attempts unless configured otherwise.
pub const DEFAULT_TASK_QUEUE: &str = "butler.tasks";

/// Group commits (and groups of acks) an engine has in flight at once: while the store runs
/// one, the next gathers, and reaches the store as soon as it is free.
const CALLS_IN_FLIGHT: usize = 2;

/// How long a group commit may wait for more changes, while the worker's slots have at least
/// [`LINGER_WHILE_AHEAD`] of claimed attempts to run: under a steady trickle of short attempts
/// (a result every few hundred microseconds), each result would otherwise be a commit of its
/// own, and each commit a plan of its own. Held back then, a result delays no start: the slots
/// are busy with the attempts claimed before, which the tasks it makes ready would queue behind.
const LINGER: Duration = Duration::from_millis(1);
/// See [`LINGER`]: several times the linger, with tokio's timer rounding it up to 2 ms.
const LINGER_WHILE_AHEAD: Duration = Duration::from_millis(5);

/// The role whose lease makes a scheduler the one that drives runs.
pub const SCHEDULER_ROLE: &str = "scheduler";

/// A worker whose heartbeats stopped for this many intervals is lost.
pub const LOST_AFTER_HEARTBEATS: u32 = 3;

/// The Butler version a worker reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The queue of the Python tasks of workflows whose command tasks go to `queue`: Python
/// workers take from it, command workers never do.
pub fn python_queue(queue: &str) -> String {
    format!("{queue}.python")
}

/// How an engine runs.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// `BUTLER_HOME`: attempt directories and logs go under `runs/` in it.
    pub home: PathBuf,
    /// This process's name in the event log, in task leases and in the worker list, `HOST/PID`
    /// by default. A second engine with worker slots in one process is listed as
    /// `NAME #INSTANCE`.
    pub name: String,
    /// Attempts that run at once in this process; 0 runs no worker.
    pub slots: usize,
    /// Whether this process schedules; it drives runs only while it leads (see the module
    /// docs).
    pub schedule: bool,
    /// The queue of command tasks; Python tasks go to [`python_queue`] of it. A worker takes
    /// from exactly this queue (a Python worker is given the Python queue).
    pub queue: String,
    /// A running attempt whose worker does not renew its lease for this long is put back.
    pub lease: Duration,
    /// How often to look for work started by other processes (new runs, their workers' results).
    pub poll: Duration,
    /// The most runs the scheduler keeps in flight.
    pub max_active_runs: usize,
    /// How often a worker records itself in the store's worker list (`butler list-workers`);
    /// one silent for [`LOST_AFTER_HEARTBEATS`] of these is lost.
    pub worker_heartbeat: Duration,
    /// How long the scheduler's lease lasts unless renewed: how soon a standby scheduler takes
    /// over from one that stopped without resigning.
    pub leader_ttl: Duration,
    /// Which engine of the process this is (set by [`Engine::start`]), so that two engines of
    /// one process tell their changes apart.
    instance: u64,
    /// Schedule only these runs (a `launch-workflow --wait` runs its own runs and leaves the
    /// rest to others); `None` schedules every run. An engine with `only_runs` follows: it
    /// never takes the scheduler's lease, and schedules these runs only while no scheduler
    /// leads.
    pub only_runs: Option<Arc<HashSet<Id>>>,
}

impl EngineOptions {
    /// Options for a process with `slots` worker slots that also schedules.
    pub fn new(home: PathBuf, slots: usize) -> Self {
        EngineOptions {
            home,
            name: process_name(),
            slots,
            schedule: true,
            queue: DEFAULT_TASK_QUEUE.to_owned(),
            lease: Duration::from_secs(30),
            poll: Duration::from_millis(200),
            max_active_runs: 100_000,
            worker_heartbeat: Duration::from_secs(5),
            leader_ttl: Duration::from_secs(10),
            only_runs: None,
            instance: 0,
        }
    }

    /// How this engine signs its changes in the event log, after `scheduler` or `worker`.
    fn signature(&self) -> String {
        format!("{} #{}", self.name, self.instance)
    }

    /// How this engine's scheduler holds the [`SCHEDULER_ROLE`] lease: this process's
    /// `HOST/PID` (so that a standby on the same host sees when it is gone) and the instance.
    fn holder(&self) -> String {
        format!("{} #{}", process_name(), self.instance)
    }

    /// How often a running attempt renews its lease, which is also how soon a cancel reaches it.
    fn heartbeat(&self) -> Duration {
        (self.lease / 3).min(Duration::from_secs(1))
    }
}

/// Counters a frontend shows while it waits.
#[derive(Debug, Default)]
pub struct Stats {
    /// Attempts whose outcome this process recorded.
    pub tasks_finished: AtomicU64,
}

/// A run the scheduler of this process saw finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunFinished {
    /// The run.
    pub run_id: Id,
    /// How it ended.
    pub status: RunStatus,
}

/// A running engine: its scheduler and worker slots run on the current tokio runtime until
/// [`Engine::stop`].
#[derive(Debug)]
pub struct Engine {
    store: Arc<DynRunStore>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<Result<()>>>,
    finished: broadcast::Sender<RunFinished>,
    stats: Arc<Stats>,
}

impl Engine {
    /// Starts a scheduler (if `options.schedule`) and `options.slots` worker slots.
    pub fn start(
        store: Arc<DynRunStore>,
        queue: Arc<DynQueue>,
        executor: Arc<DynExecutor>,
        mut options: EngineOptions,
    ) -> Self {
        static INSTANCES: AtomicU64 = AtomicU64::new(0);
        options.instance = INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let (touched_tx, touched) = mpsc::unbounded_channel();
        let commit_store = store.clone();
        let backlog = Arc::new(worker::Backlog::new(options.slots));
        let ahead = backlog.clone();
        let linger = Linger {
            at_most: LINGER,
            busy: Arc::new(move || ahead.ahead() >= LINGER_WHILE_AHEAD),
        };
        let commits: Batcher<ChangeSet, bool> =
            Batcher::spawn_lingering(4096, CALLS_IN_FLIGHT, Some(linger), move |sets| {
                let store = commit_store.clone();
                let touched_tx = touched_tx.clone();
                async move {
                    let by_workers: Vec<Vec<TaskInstance>> = sets.iter().map(worker_rows).collect();
                    metrics::batch(sets.len());
                    let applied = metrics::store_call("apply", store.apply(sets)).await?;
                    let rows: Vec<TaskInstance> = by_workers
                        .into_iter()
                        .zip(&applied)
                        .filter(|(_, ok)| **ok)
                        .flat_map(|(rows, _)| rows)
                        .collect();
                    if !rows.is_empty() {
                        // The scheduler may have stopped; then nobody needs to know.
                        let _ = touched_tx.send(rows);
                    }
                    Ok(applied)
                }
            });
        let (finished, _) = broadcast::channel(65_536);
        let stats = Arc::new(Stats::default());
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let worker = (options.slots > 0).then(|| {
            Arc::new(worker::Worker::new(
                store.clone(),
                queue.clone(),
                executor,
                commits.clone(),
                options.clone(),
                stats.clone(),
                backlog,
            ))
        });
        if options.schedule {
            let scheduler = scheduler::Scheduler::new(
                store.clone(),
                queue,
                commits,
                touched,
                finished.clone(),
                worker.clone(),
                options,
            );
            tasks.push(tokio::spawn(scheduler.run(shutdown.clone())));
        }
        if let Some(worker) = worker {
            tasks.push(tokio::spawn(worker.clone().announce(shutdown.clone())));
            tasks.push(tokio::spawn(worker.clone().run_handed(shutdown.clone())));
            tasks.push(tokio::spawn(worker.run(shutdown.clone())));
        }
        Engine {
            store,
            shutdown,
            tasks,
            finished,
            stats,
        }
    }

    /// Counters of this engine.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Waits until every run in `runs` has finished (by this engine or any other), calling
    /// `progress` with the runs finished so far whenever one finishes. Returns each run's end.
    ///
    /// Fails if the engine itself fails.
    pub async fn wait_for(
        &mut self,
        runs: &[Id],
        mut progress: impl FnMut(&[RunFinished]),
    ) -> Result<Vec<RunFinished>> {
        let mut events = self.finished.subscribe();
        let mut waiting: HashSet<Id> = runs.iter().copied().collect();
        let mut done = Vec::with_capacity(runs.len());
        self.collect_finished(&mut waiting, &mut done).await?;
        progress(&done);
        // The first look was the one just above: the next comes a period later.
        let every = Duration::from_secs(2);
        let mut check = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut seen_at_check = done.len();
        while !waiting.is_empty() {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(event) => {
                        if waiting.remove(&event.run_id) {
                            done.push(event);
                            progress(&done);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.collect_finished(&mut waiting, &mut done).await?;
                        progress(&done);
                    }
                    Err(broadcast::error::RecvError::Closed) => {}
                },
                // Runs finished by another process's scheduler are seen in the store; while this
                // process's scheduler keeps finishing runs, there is no need to look.
                _ = check.tick() => {
                    if done.len() == seen_at_check {
                        self.collect_finished(&mut waiting, &mut done).await?;
                        progress(&done);
                    }
                    seen_at_check = done.len();
                }
                failed = wait_any(&mut self.tasks) => return Err(failed),
            }
        }
        Ok(done)
    }

    /// Moves the runs of `waiting` that the store shows finished to `done`.
    async fn collect_finished(
        &self,
        waiting: &mut HashSet<Id>,
        done: &mut Vec<RunFinished>,
    ) -> Result<()> {
        let (Some(&first), Some(&last)) = (waiting.iter().min(), waiting.iter().max()) else {
            return Ok(());
        };
        // Only finished runs are read, by status over the id range in pages: runs still to
        // do are most of the range when a wait begins, and reading each of them would hold up
        // the scheduler's first reads on the same store.
        for status in RunStatus::ALL.into_iter().filter(|s| s.is_finished()) {
            let mut after_id = Some(first - 1);
            while let Some(after) = after_id.filter(|after| *after < last) {
                let page = self
                    .store
                    .list_runs(&RunFilter {
                        status: Some(status),
                        after_id: Some(after),
                        limit: Some(10_000),
                        ..RunFilter::default()
                    })
                    .await?;
                after_id = page.last().map(|run| run.id);
                for run in page {
                    if waiting.remove(&run.id) {
                        done.push(RunFinished {
                            run_id: run.id,
                            status: run.status,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs until the process is asked to stop or a part of the engine fails.
    pub async fn run_until(&mut self, stop: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::select! {
            _ = stop => Ok(()),
            failed = wait_any(&mut self.tasks) => Err(failed),
        }
    }

    /// Stops the scheduler and the workers: the scheduler resigns its lease, so a standby takes
    /// over at once, and the workers leave the worker list. Attempts still running are killed
    /// and given back (if the process ends first, their leases bring them back).
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        for task in self.tasks {
            match task.await {
                Ok(result) => result?,
                Err(err) => return Err(Error::backend("an engine task panicked", err)),
            }
        }
        Ok(())
    }
}

/// Resolves when one of `tasks` ends (engine tasks end only on shutdown or failure), and
/// removes it so that [`Engine::stop`] does not wait for it again.
async fn wait_any(tasks: &mut Vec<JoinHandle<Result<()>>>) -> Error {
    if tasks.is_empty() {
        return std::future::pending().await;
    }
    let (result, index, _) = futures_select_all(tasks).await;
    tasks.swap_remove(index);
    match result {
        Ok(Ok(())) => Error::Conflict("the engine stopped".to_owned()),
        Ok(Err(err)) => err,
        Err(err) => Error::backend("an engine task panicked", err),
    }
}

async fn futures_select_all(
    tasks: &mut [JoinHandle<Result<()>>],
) -> (
    std::result::Result<Result<()>, tokio::task::JoinError>,
    usize,
    (),
) {
    std::future::poll_fn(|cx| {
        for (i, task) in tasks.iter_mut().enumerate() {
            if let std::task::Poll::Ready(result) = std::pin::Pin::new(task).poll(cx) {
                return std::task::Poll::Ready((result, i, ()));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// The task rows a worker's change set writes (none for lease renewals and for the
/// scheduler's sets).
fn worker_rows(set: &ChangeSet) -> Vec<TaskInstance> {
    set.iter()
        .filter_map(|change| match change {
            Change::Task(task) if task.by.starts_with(worker::BY_PREFIX) => Some(task.new.clone()),
            _ => None,
        })
        .collect()
}

/// `HOST/PID` of this process.
pub fn process_name() -> String {
    format!("{}/{}", host_name(), std::process::id())
}

/// This host's name, as workers report it.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Whether `worker` (`HOST/PID`, optionally followed by ` #INSTANCE`) is a process of this
/// host that no longer exists.
pub(crate) fn worker_is_gone(worker: Option<&str>) -> bool {
    let process = worker.map(|w| w.split_once(" #").map_or(w, |(process, _)| process));
    let Some((host, pid)) = process.and_then(|w| w.rsplit_once('/')) else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    cfg!(target_os = "linux")
        && host == host_name()
        && pid != std::process::id()
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}
