//! The worker: takes task messages from the queue, starts the attempts it can claim, keeps their
//! leases alive, and records each outcome with the attempt's fencing token.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use super::batch::Batcher;
use super::handoff::Handoff;
use super::metrics;
use super::plan::{QueuedTask, TaskMessage};
use super::{
    CALLS_IN_FLIGHT, EngineOptions, LOST_AFTER_HEARTBEATS, Stats, VERSION, host_name, retry,
    worker_is_gone,
};
use crate::change::{Change, ChangeSet, LeaseChange, TaskChange, TaskExpect};
use crate::definition::Renderer;

/// Workflows a worker has seen, with their compiled templates.
type WorkflowCache = HashMap<Id, (Arc<Workflow>, Arc<Renderer>)>;
use crate::error::{Error, Result};
use crate::executor::{Attempt, DynExecutor, Finished, Outcome, attempt_dir};
use crate::model::{Id, TaskInstance, TaskState, WorkerInfo, Workflow};
use crate::queue::{Delivery, DeliveryTag, DynQueue};
use crate::store::DynRunStore;

/// How a worker's changes are signed in the event log, before the process name.
pub(crate) const BY_PREFIX: &str = "worker ";

/// The worker names the engines of this process have listed, so that two of them (a Python
/// client's command and Python workers) do not overwrite each other's entry.
static LISTED_NAMES: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// A name in [`LISTED_NAMES`], given back when dropped.
struct ListedName(String);

impl ListedName {
    /// `name`, or `name #instance` if another engine of this process lists `name`.
    fn claim(name: &str, instance: u64) -> ListedName {
        let mut names = lock_names();
        let chosen = if names.contains(name) {
            format!("{name} #{instance}")
        } else {
            name.to_owned()
        };
        names.insert(chosen.clone());
        ListedName(chosen)
    }
}

impl Drop for ListedName {
    fn drop(&mut self) {
        lock_names().remove(&self.0);
    }
}

fn lock_names() -> std::sync::MutexGuard<'static, BTreeSet<String>> {
    LISTED_NAMES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Attempts a worker takes at once when they are short: enough to fill a group commit, and to
/// keep the store's writer busy while the claims, the results and the plans of the attempts
/// before them are committed (256 left SQLite's writer idle a third of the time).
const MAX_PREFETCH_PER_SLOT: usize = 1024;
/// Effective configs a worker keeps, so the tasks of one run read it once.
const CONFIG_CACHE: usize = 4096;
/// Prefetch aims to keep one batch of attempts under this long.
const PREFETCH_HORIZON: Duration = Duration::from_millis(20);

/// A task claimed for this worker and committed, waiting to be started: the task as claimed,
/// its run's workflow and effective config.
#[derive(Debug)]
pub(crate) struct ClaimedTask {
    task: TaskInstance,
    workflow: Id,
    config: uuid::Uuid,
}

/// The renewal of a claimed attempt's lease, from its claim (so that it does not lapse while
/// the attempt waits for a slot) to its end; stops when dropped.
struct Renewal {
    task: tokio::task::JoinHandle<()>,
    /// Fired when the attempt is to stop: cancelled, or its lease lost.
    cancel: CancellationToken,
    /// Fired when the store refused a renewal: the task is no longer this worker's.
    lost: CancellationToken,
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) struct Worker {
    pub store: Arc<DynRunStore>,
    pub queue: Arc<DynQueue>,
    pub executor: Arc<DynExecutor>,
    pub commits: Batcher<ChangeSet, bool>,
    pub acks: Batcher<DeliveryTag, bool>,
    /// Tasks this process's scheduler hands over without the queue ([`Worker::hand_over`]).
    handoff: Handoff,
    pub options: EngineOptions,
    pub stats: Arc<Stats>,
    pub name: String,
    workflows: Mutex<WorkflowCache>,
    configs: Mutex<HashMap<uuid::Uuid, Arc<serde_json::Value>>>,
    /// The worker slots; a permit is held while an attempt runs.
    slots: Arc<Semaphore>,
    /// Attempts claimed and waiting for a slot, and how long attempts take.
    backlog: Arc<Backlog>,
    /// Wakes the taking loop when a slot frees or a waiting attempt takes one.
    moved: Notify,
    /// Room the scheduler of this process took ([`Worker::reserve`]) for claims it is
    /// committing.
    reserved: AtomicUsize,
}

impl Worker {
    pub fn new(
        store: Arc<DynRunStore>,
        queue: Arc<DynQueue>,
        executor: Arc<DynExecutor>,
        commits: Batcher<ChangeSet, bool>,
        options: EngineOptions,
        stats: Arc<Stats>,
        backlog: Arc<Backlog>,
    ) -> Self {
        let ack_queue = queue.clone();
        let acks = Batcher::spawn(4096, CALLS_IN_FLIGHT, move |tags: Vec<_>| {
            let queue = ack_queue.clone();
            async move { metrics::queue_call("ack", queue.ack(&tags)).await }
        });
        let name = format!("{BY_PREFIX}{}", options.signature());
        let slots = Arc::new(Semaphore::new(options.slots));
        Worker {
            store,
            queue,
            executor,
            commits,
            acks,
            handoff: Handoff::default(),
            options,
            stats,
            name,
            workflows: Mutex::new(HashMap::new()),
            configs: Mutex::new(HashMap::new()),
            slots,
            backlog,
            moved: Notify::new(),
            reserved: AtomicUsize::new(0),
        }
    }

    /// Records this worker in the store's worker list now and every
    /// [`EngineOptions::worker_heartbeat`] until shutdown, then removes it.
    ///
    /// Fails at once if another live process already lists a worker of this name.
    pub async fn announce(self: Arc<Self>, shutdown: CancellationToken) -> Result<()> {
        let listed = ListedName::claim(&self.options.name, self.options.instance);
        let name = listed.0.clone();
        let host = host_name();
        let pid = std::process::id();
        self.check_name_is_free(&name, &host, pid).await?;
        let started_at = Utc::now();
        let slots = u32::try_from(self.options.slots).unwrap_or(u32::MAX);
        loop {
            let in_use =
                self.options.slots - self.slots.available_permits().min(self.options.slots);
            let info = WorkerInfo {
                name: name.clone(),
                host: host.clone(),
                pid,
                queue: self.options.queue.clone(),
                slots,
                running: u32::try_from(in_use).unwrap_or(u32::MAX),
                version: VERSION.to_owned(),
                started_at,
                heartbeat_at: Utc::now(),
            };
            // A worker that cannot report itself can still run tasks: say so, and try again.
            if let Err(err) = self.store.heartbeat_worker(&info).await {
                warn!(error = %err, worker = %name, "could not record the worker's heartbeat");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.options.worker_heartbeat) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        if let Err(err) = self.store.forget_worker(&name).await {
            warn!(error = %err, worker = %name, "could not remove the stopped worker from the list");
        }
        drop(listed);
        Ok(())
    }

    /// Fails with [`Error::Conflict`] if a live worker of another process is listed as `name`.
    async fn check_name_is_free(&self, name: &str, host: &str, pid: u32) -> Result<()> {
        let workers = match self.store.list_workers().await {
            Ok(workers) => workers,
            Err(err) if err.is_retryable() => {
                warn!(error = %err, "could not read the worker list to check this worker's name");
                return Ok(());
            }
            Err(err) => return Err(err),
        };
        let now = Utc::now();
        let lost_after = self.options.worker_heartbeat * LOST_AFTER_HEARTBEATS;
        let taken = workers.into_iter().find(|other| {
            other.name == name
                && (other.host != host || other.pid != pid)
                && !other.is_lost(now, lost_after)
                && !worker_is_gone(Some(&format!("{}/{}", other.host, other.pid)))
        });
        match taken {
            Some(other) => Err(Error::Conflict(format!(
                "a worker named {name:?} is already running on {} (pid {}, last heartbeat at \
                 {}); give this worker another name (`butler worker --name`), or stop that one \
                 first",
                other.host,
                other.pid,
                other.heartbeat_at.format("%Y-%m-%d %H:%M:%S UTC")
            ))),
            None => Ok(()),
        }
    }

    /// Takes attempts from the queue and starts them until shutdown.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<()> {
        loop {
            // Registered before looking, so that a change after the look still wakes it.
            let moved = self.moved.notified();
            let Some(want) = self.want(self.handoff.len()) else {
                tokio::select! {
                    () = moved => {}
                    () = shutdown.cancelled() => return Ok(()),
                }
                continue;
            };
            let deliveries = tokio::select! {
                got = self.queue.dequeue(
                    &self.options.queue,
                    want,
                    self.options.lease,
                    Duration::from_secs(1),
                ) => got,
                () = shutdown.cancelled() => return Ok(()),
            };
            match deliveries {
                Ok(deliveries) if deliveries.is_empty() => {}
                Ok(deliveries) => match self.clone().start_delivered(deliveries, &shutdown).await {
                    Ok(()) => {}
                    // The messages come back when their leases end.
                    Err(err) if err.is_retryable() => {
                        warn!(error = %err, "store unavailable; retrying in 1 s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(err) => return Err(err),
                },
                Err(err) if err.is_retryable() => {
                    warn!(error = %err, "queue unavailable; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Takes the tasks this process's scheduler hands over and starts them until shutdown.
    pub async fn run_handed(self: Arc<Self>, shutdown: CancellationToken) -> Result<()> {
        loop {
            let moved = self.moved.notified();
            let claimed = self.handoff.take_claimed();
            if !claimed.is_empty() {
                let count = claimed.len();
                if let Err(err) = self.clone().launch(claimed, &shutdown).await {
                    if !err.is_retryable() {
                        return Err(err);
                    }
                    // Not started later: by then their leases may have ended and the tasks
                    // gone to another worker. The leases bring them back.
                    warn!(
                        error = %err,
                        tasks = count,
                        "store unavailable; claimed tasks go back when their leases end"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = shutdown.cancelled() => return Ok(()),
                    }
                }
                continue;
            }
            if self.handoff.len() == 0 {
                tokio::select! {
                    () = self.handoff.arrived() => {}
                    () = shutdown.cancelled() => return Ok(()),
                }
                continue;
            }
            let Some(want) = self.want(0) else {
                tokio::select! {
                    () = moved => {}
                    // Claimed tasks start whatever the room.
                    () = self.handoff.arrived() => {}
                    () = shutdown.cancelled() => return Ok(()),
                }
                continue;
            };
            let handed = self.handoff.take(want);
            if let Err(err) = self.clone().start_handed(handed.clone(), &shutdown).await {
                if !err.is_retryable() {
                    return Err(err);
                }
                // Nothing else would send them again while this process lives.
                warn!(error = %err, "store unavailable; retrying in 1 s");
                self.handoff.push(handed);
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }

    /// How many attempts to take now, if any, with `pending` more already on their way: enough
    /// for the free slots and, while attempts are short, for [`PREFETCH_HORIZON`] of work per
    /// slot beyond them, less those claimed and waiting for a slot or reserved by the scheduler
    /// ([`Worker::reserve`]). Taking the next ones while the last ones run keeps the slots busy
    /// across the queue's and the store's round trips; waiting until half the backlog has
    /// started keeps those takes few and large.
    fn want(&self, pending: usize) -> Option<usize> {
        let free = self.slots.available_permits();
        let ahead = self.options.slots * self.prefetch_per_slot();
        let target = free + ahead;
        let waiting = self.backlog.waiting.load(Ordering::Acquire)
            + self.reserved.load(Ordering::Acquire)
            + pending;
        let refill = waiting == 0 || waiting <= ahead / 2;
        (refill && target > waiting).then(|| target - waiting)
    }

    /// Attempts per slot to claim ahead of the free slots: [`PREFETCH_HORIZON`] of them at
    /// their mean duration, none when one takes longer (a claimed attempt's lease runs while
    /// it waits for a slot, before its heartbeat starts).
    fn prefetch_per_slot(&self) -> usize {
        let mean = match self.backlog.mean_micros.load(Ordering::Relaxed) {
            // None has ended yet: one per slot ahead until the first does.
            0 => PREFETCH_HORIZON.as_micros() as u64,
            mean => mean,
        };
        ((PREFETCH_HORIZON.as_micros() as u64 / mean) as usize).min(MAX_PREFETCH_PER_SLOT)
    }

    /// Takes over the tasks this process's slots would take from the queue now, or all of them
    /// when no other worker takes from the queue (`alone`); gives back the rest, for the queue.
    pub fn hand_over(&self, mut tasks: Vec<QueuedTask>, alone: bool) -> Vec<QueuedTask> {
        let room = if alone { tasks.len() } else { self.room() };
        let rest = tasks.split_off(room.min(tasks.len()));
        self.handoff.push(tasks);
        rest
    }

    /// Attempts the slots would take now beyond those claimed, handed over or reserved: the
    /// free slots, and the attempts to claim ahead of them.
    fn room(&self) -> usize {
        let target = self.slots.available_permits() + self.options.slots * self.prefetch_per_slot();
        target.saturating_sub(
            self.backlog.waiting.load(Ordering::Acquire)
                + self.reserved.load(Ordering::Acquire)
                + self.handoff.len(),
        )
    }

    /// Reserves room for up to `wanted` of the tasks the scheduler is about to queue, for it
    /// to claim them for these slots in the same commit ([`Worker::claim`]); answers how many
    /// it may claim. [`Worker::settle`] gives the reservation back.
    pub fn reserve(&self, wanted: usize) -> usize {
        let granted = self.room().min(wanted);
        self.reserved.fetch_add(granted, Ordering::AcqRel);
        granted
    }

    /// Ends a reservation of `reserved`, handing over `won`, the tasks claimed under it whose
    /// commit succeeded, to start.
    pub fn settle(&self, reserved: usize, won: Vec<ClaimedTask>) {
        self.handoff.push_claimed(won);
        self.reserved.fetch_sub(reserved, Ordering::AcqRel);
    }

    /// The change that claims `task` for this worker at `now`, signed by it, if the task is
    /// still queued at `message`'s try; with the task as claimed, to start once committed.
    pub fn claim(
        &self,
        message: &TaskMessage,
        task: &TaskInstance,
        now: chrono::DateTime<Utc>,
    ) -> Option<(Change, ClaimedTask)> {
        if task.state != TaskState::Queued || task.try_number != message.try_number {
            // The task moved on (a duplicate message, a cancelled run): nothing to do.
            return None;
        }
        let new = TaskInstance {
            state: TaskState::Running,
            token: Some(new_token()),
            lease_until: Some(now + self.options.lease),
            worker: Some(self.options.name.clone()),
            first_started_at: task.first_started_at.or(Some(now)),
            started_at: Some(now),
            ended_at: None,
            exit_code: None,
            error: None,
            ..task.clone()
        };
        let change = Change::Task(TaskChange {
            expect: TaskExpect::of(task),
            new: new.clone(),
            by: self.name.clone(),
            reason: format!("attempt {} started", new.try_number),
        });
        let claimed = ClaimedTask {
            task: new,
            workflow: message.workflow,
            config: message.config,
        };
        Some((change, claimed))
    }

    /// Claims the attempts the queue delivered, with the tasks as stored.
    async fn start_delivered(
        self: Arc<Self>,
        deliveries: Vec<Delivery>,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let mut messages = Vec::with_capacity(deliveries.len());
        let mut stale = Vec::new();
        for delivery in deliveries {
            match serde_json::from_slice::<TaskMessage>(&delivery.payload) {
                Ok(message) => messages.push((message, delivery.tag)),
                Err(err) => {
                    warn!(error = %err, "dropping a message that is not a task");
                    stale.push(delivery.tag);
                }
            }
        }
        let mut run_ids: Vec<Id> = messages.iter().map(|(m, _)| m.run).collect();
        run_ids.sort_unstable();
        run_ids.dedup();
        let mut tasks: HashMap<(Id, String), TaskInstance> =
            metrics::store_call("list_tasks", self.store.list_tasks(&run_ids))
                .await?
                .into_iter()
                .map(|t| ((t.run_id, t.task_id.clone()), t))
                .collect();
        let mut found = Vec::with_capacity(messages.len());
        for (message, tag) in messages {
            match tasks.remove(&(message.run, message.task.clone())) {
                Some(task) => found.push((message, task, Some(tag))),
                None => stale.push(tag),
            }
        }
        if !stale.is_empty() {
            self.acks.submit(stale).await?;
        }
        self.start(found, shutdown).await
    }

    /// Claims the attempts handed over, with the tasks as the scheduler committed them.
    async fn start_handed(
        self: Arc<Self>,
        handed: Vec<QueuedTask>,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let found = handed
            .into_iter()
            .map(|h| (h.message, h.row, None))
            .collect();
        self.start(found, shutdown).await
    }

    /// Claims the attempts in one commit, each if its task is still queued at the message's
    /// try, and starts those it won. The deliveries are acked once the claims are committed,
    /// won or not: from then on the store's lease, not the queue's, brings a task back if this
    /// worker dies, so a long task holds no queue delivery while it runs.
    async fn start(
        self: Arc<Self>,
        found: Vec<(TaskMessage, TaskInstance, Option<DeliveryTag>)>,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let now = Utc::now();
        let mut claims = Vec::new();
        let mut sets = Vec::new();
        let mut tags = Vec::new();
        for (message, task, tag) in found {
            tags.extend(tag);
            if let Some((change, claimed)) = self.claim(&message, &task, now) {
                sets.push(vec![change]);
                claims.push(claimed);
            }
        }
        let won = self.commits.submit(sets).await?;
        if !tags.is_empty() {
            // The attempts need not wait for it: an ack that fails costs only a stale delivery
            // later, which the next claim drops.
            let acks = self.acks.clone();
            tokio::spawn(async move {
                if let Err(err) = acks.submit(tags).await {
                    warn!(error = %err, "could not ack claimed deliveries; they come back stale");
                }
            });
        }
        let won = claims
            .into_iter()
            .zip(won)
            .filter_map(|(claimed, ok)| ok.then_some(claimed))
            .collect();
        self.launch(won, shutdown).await
    }

    /// Starts the attempts of tasks claimed and committed for this worker: each waits for its
    /// slot on its own, its lease renewed from now on. Fails, starting none, if their configs
    /// cannot be read.
    async fn launch(
        self: Arc<Self>,
        claimed: Vec<ClaimedTask>,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        self.prefetch_configs(claimed.iter().map(|c| c.config))
            .await?;
        for claimed in claimed {
            // The attempt waits for its slot on its own, so that the next attempts are taken
            // meanwhile; the semaphore hands slots out in the order asked. Its lease is renewed
            // from now on, however long it waits.
            let renewal = self.clone().renew(&claimed.task);
            self.backlog.waiting.fetch_add(1, Ordering::AcqRel);
            let worker = self.clone();
            let slots = self.slots.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let permit = tokio::select! {
                    permit = slots.acquire_owned() => permit.ok(),
                    () = shutdown.cancelled() => None,
                };
                worker.backlog.waiting.fetch_sub(1, Ordering::AcqRel);
                worker.moved.notify_waiters();
                // Closed slots or a shutdown: the lease brings the task back.
                let Some(permit) = permit else { return };
                if let Err(err) = worker.attempt(claimed, renewal, permit, shutdown).await {
                    warn!(error = %err, "attempt could not be recorded; its lease will expire");
                }
            });
        }
        Ok(())
    }

    async fn workflow(&self, id: Id) -> Result<(Arc<Workflow>, Arc<Renderer>)> {
        if let Some(found) = self.lock_workflows().get(&id) {
            return Ok(found.clone());
        }
        let workflow = Arc::new(self.store.get_workflow(id).await?);
        let renderer = Arc::new(workflow.definition.renderer()?);
        let entry = (workflow, renderer);
        self.lock_workflows().insert(id, entry.clone());
        Ok(entry)
    }

    /// Reads the effective configs of a batch of attempts in one go.
    async fn prefetch_configs(&self, ids: impl Iterator<Item = uuid::Uuid>) -> Result<()> {
        let missing: Vec<uuid::Uuid> = {
            let configs = self.lock_configs();
            ids.filter(|id| !configs.contains_key(id)).collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let found = self.store.get_configs(&missing).await?;
        let mut configs = self.lock_configs();
        if configs.len() + found.len() > CONFIG_CACHE {
            configs.clear();
        }
        for config in found {
            configs.insert(config.id, Arc::new(config.data));
        }
        Ok(())
    }

    /// The effective config `id`, read once for all the tasks of its run.
    async fn config(&self, id: uuid::Uuid) -> Result<Arc<serde_json::Value>> {
        if let Some(found) = self.lock_configs().get(&id) {
            return Ok(found.clone());
        }
        let config = Arc::new(self.store.get_config(id).await?.data);
        let mut configs = self.lock_configs();
        if configs.len() >= CONFIG_CACHE {
            configs.clear();
        }
        configs.insert(id, config.clone());
        Ok(config)
    }

    fn lock_configs(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<uuid::Uuid, Arc<serde_json::Value>>> {
        self.configs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_workflows(&self) -> std::sync::MutexGuard<'_, WorkflowCache> {
        self.workflows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs one claimed attempt, its lease kept by `renewal`, to its end in the slot `permit`
    /// holds, frees the slot, and records the outcome (the slot does not wait for the commit:
    /// recording many outcomes together is what makes group commit pay).
    async fn attempt(
        self: Arc<Self>,
        claimed: ClaimedTask,
        renewal: Renewal,
        permit: OwnedSemaphorePermit,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let ClaimedTask {
            task,
            workflow,
            config,
        } = claimed;
        let token = task.token.unwrap_or_default();
        let run_id = task.run_id;
        let (workflow, renderer) = self.workflow(workflow).await?;
        let def = workflow
            .definition
            .task(&task.task_id)
            .cloned()
            .ok_or_else(|| {
                Error::not_found(
                    crate::Kind::Task,
                    format!("{} of run {run_id}", task.task_id),
                )
            })?;
        let config = self.config(config).await?;

        let cancel = renewal.cancel.clone();
        let lost = renewal.lost.clone();
        let started = Instant::now();
        let execution = async {
            let failed_to_start = |reason: String| Finished {
                outcome: Outcome::FailedToStart { reason },
                log_path: Default::default(),
                duration: Duration::ZERO,
            };
            let rendered = match renderer.render_task(&task.task_id, &config) {
                Ok(Some(rendered)) => rendered,
                Ok(None) => {
                    return failed_to_start(format!(
                        "task `{}` has no templates in the definition of workflow {}",
                        task.task_id, workflow.id
                    ));
                }
                Err(err) => return failed_to_start(err.to_string()),
            };
            let attempt = Attempt {
                run_id,
                task_id: task.task_id.clone(),
                try_number: task.try_number,
                command: rendered.command,
                env: rendered.env,
                workdir: attempt_dir(&self.options.home, run_id, &task.task_id, task.try_number),
                config: config.clone(),
                timeout: def.timeout,
            };
            self.executor
                .execute(attempt, cancel.clone())
                .await
                .unwrap_or_else(|err| failed_to_start(err.to_string()))
        };
        let finished = tokio::select! {
            finished = execution => Some(finished),
            _ = shutdown.cancelled() => None,
        };
        drop(renewal);
        drop(permit);
        self.moved.notify_waiters();
        let Some(finished) = finished else {
            // Shutting down: kill the attempt and give the task back at once rather than at the
            // end of its lease. If the process ends first, the lease still brings it back.
            cancel.cancel();
            let new = retry::after_lost_lease(&task, Utc::now());
            let retried = new.state == TaskState::UpForRetry;
            let given_back = self
                .commits
                .submit(vec![vec![Change::Task(TaskChange {
                    expect: TaskExpect::of(&task),
                    new,
                    by: self.name.clone(),
                    reason: "the worker stopped; the attempt is given back".to_owned(),
                })]])
                .await?;
            if given_back.first() == Some(&true) {
                metrics::attempt_ended("interrupted", None, retried);
            }
            return Ok(());
        };
        let took = started.elapsed();
        self.observe(took);
        if lost.is_cancelled() {
            info!(run = run_id, task = %task.task_id, "attempt stopped: the task is no longer this worker's");
            metrics::attempt_ended("cancelled", Some(took), false);
            return Ok(());
        }
        let new = retry::after_attempt(&def, &task, &finished.outcome, Utc::now());
        let retried = new.state == TaskState::UpForRetry;
        let reason = match new.state {
            TaskState::Succeeded => format!("attempt {} succeeded", task.try_number),
            _ => format!(
                "attempt {} ended: {}",
                task.try_number,
                finished.outcome.describe()
            ),
        };
        let recorded = self
            .commits
            .submit(vec![vec![Change::Task(TaskChange {
                expect: TaskExpect {
                    state: TaskState::Running,
                    try_number: task.try_number,
                    token: Some(token),
                },
                new,
                by: self.name.clone(),
                reason,
            })]])
            .await?;
        if recorded.first() != Some(&true) {
            warn!(
                run = run_id,
                task = %task.task_id,
                try_number = task.try_number,
                "result refused: the attempt's lease was lost and the task moved on"
            );
        } else {
            self.stats.tasks_finished.fetch_add(1, Ordering::Relaxed);
            let outcome = metrics::outcome_label(&finished.outcome);
            metrics::attempt_ended(outcome, Some(took), retried);
        }
        Ok(())
    }

    /// Starts renewing the lease of the attempt claimed for `task`.
    fn renew(self: Arc<Self>, task: &TaskInstance) -> Renewal {
        let cancel = CancellationToken::new();
        let lost = CancellationToken::new();
        let token = task.token.unwrap_or_default();
        let renewing = self.heartbeat(task, token, cancel.clone(), lost.clone());
        Renewal {
            task: tokio::spawn(renewing),
            cancel,
            lost,
        }
    }

    /// Renews the attempt's lease in the store until cancelled; when the store
    /// refuses (the run was cancelled, or the lease was lost), cancels the attempt.
    fn heartbeat(
        self: Arc<Self>,
        task: &TaskInstance,
        token: i64,
        cancel: CancellationToken,
        lost: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let interval = self.options.heartbeat();
        let run_id = task.run_id;
        let task_id = task.task_id.clone();
        async move {
            loop {
                tokio::time::sleep(interval).await;
                let change = Change::Lease(LeaseChange {
                    run_id,
                    task_id: task_id.clone(),
                    token,
                    until: Utc::now() + self.options.lease,
                });
                match self.commits.submit(vec![vec![change]]).await {
                    Ok(ok) if ok.first() == Some(&true) => {}
                    Ok(_) => {
                        lost.cancel();
                        cancel.cancel();
                    }
                    Err(err) => warn!(error = %err, "heartbeat failed; will try again"),
                }
            }
        }
    }

    fn observe(&self, took: Duration) {
        let sample = took.as_micros() as u64;
        let mean = &self.backlog.mean_micros;
        let new = match mean.load(Ordering::Relaxed) {
            0 => sample,
            old => (old * 7 + sample) / 8,
        };
        mean.store(new.max(1), Ordering::Relaxed);
    }
}

/// The attempts a worker has claimed that wait for a slot, and how long attempts take: how
/// much work its slots have ahead of them. Shared with the engine's group commit, which may
/// hold a commit back for more changes while the slots are busy for longer anyway.
#[derive(Debug)]
pub(crate) struct Backlog {
    waiting: AtomicUsize,
    /// Mean attempt duration in microseconds, smoothed; 0 until an attempt has ended.
    mean_micros: AtomicU64,
    slots: usize,
}

impl Backlog {
    pub fn new(slots: usize) -> Self {
        Backlog {
            waiting: AtomicUsize::new(0),
            mean_micros: AtomicU64::new(0),
            slots,
        }
    }

    /// How long the attempts waiting for a slot keep every slot busy, at their mean duration
    /// (zero until an attempt has ended).
    pub fn ahead(&self) -> Duration {
        let waiting = self.waiting.load(Ordering::Acquire) as u64;
        let mean = self.mean_micros.load(Ordering::Relaxed);
        Duration::from_micros(waiting * mean / self.slots.max(1) as u64)
    }
}

fn new_token() -> i64 {
    (Uuid::new_v4().as_u64_pair().0 >> 1) as i64
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use chrono::Utc;

    use super::super::{DEFAULT_TASK_QUEUE, Engine, EngineOptions, VERSION, host_name};
    use crate::error::Error;
    use crate::executor::{Attempt, CancellationToken, Executor, Finished, Outcome};
    use crate::memory::{MemoryQueue, MemoryRunStore};
    use crate::model::WorkerInfo;
    use crate::store::RunStore;
    use crate::testing::launch::launch_runs;

    /// Attempts take a while, so a heartbeat sees them running.
    #[derive(Debug)]
    struct Slow;

    #[async_trait]
    impl Executor for Slow {
        async fn execute(&self, attempt: Attempt, _: CancellationToken) -> crate::Result<Finished> {
            tokio::time::sleep(Duration::from_millis(800)).await;
            Ok(Finished {
                outcome: Outcome::Exited { code: 0 },
                log_path: attempt.workdir,
                duration: Duration::ZERO,
            })
        }
    }

    fn options(name: Option<&str>, slots: usize) -> EngineOptions {
        let mut options = EngineOptions::new(std::env::temp_dir(), slots);
        if let Some(name) = name {
            options.name = name.to_owned();
        }
        options.schedule = false;
        options.poll = Duration::from_millis(20);
        options.worker_heartbeat = Duration::from_millis(50);
        options
    }

    fn start(store: &Arc<MemoryRunStore>, options: EngineOptions) -> Engine {
        Engine::start(
            store.clone(),
            Arc::new(MemoryQueue::new()),
            Arc::new(Slow),
            options,
        )
    }

    /// Launches `count` runs of a one-task workflow into `store`; their ids.
    async fn launch_one_task_runs(
        store: &Arc<MemoryRunStore>,
        count: usize,
    ) -> Vec<crate::model::Id> {
        launch_runs(store.clone(), "[[tasks]]\nid = \"a\"\nrun = \"x\"\n", count).await
    }

    async fn until_listed(
        store: &MemoryRunStore,
        what: &str,
        check: impl Fn(&[WorkerInfo]) -> bool,
    ) -> Vec<WorkerInfo> {
        for _ in 0..500 {
            let workers = store.list_workers().await.expect("list_workers");
            if check(&workers) {
                return workers;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "gave up waiting for {what}: {:?}",
            store.list_workers().await
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn workers_list_themselves_while_they_run_and_leave_when_stopped() {
        let store = Arc::new(MemoryRunStore::new());
        let named = start(&store, options(Some("w-named"), 2));
        // A second engine of the process with the same name does not overwrite the first.
        let twin = start(&store, options(Some("w-twin"), 1));
        let other_twin = start(&store, options(Some("w-twin"), 1));
        let workers = until_listed(&store, "three workers", |w| w.len() == 3).await;
        let named_info = workers
            .iter()
            .find(|w| w.name == "w-named")
            .unwrap_or_else(|| panic!("w-named is listed: {workers:?}"));
        assert_eq!(named_info.host, host_name());
        assert_eq!(named_info.pid, std::process::id());
        assert_eq!(named_info.queue, DEFAULT_TASK_QUEUE);
        assert_eq!(named_info.slots, 2);
        assert_eq!(named_info.running, 0);
        assert_eq!(named_info.version, VERSION);
        let twins: Vec<&str> = workers
            .iter()
            .map(|w| w.name.as_str())
            .filter(|name| name.starts_with("w-twin"))
            .collect();
        assert!(
            twins.len() == 2 && twins.contains(&"w-twin") && twins[1].starts_with("w-twin #"),
            "the twin is listed apart: {workers:?}"
        );
        assert_eq!(
            EngineOptions::new(std::env::temp_dir(), 1).name,
            format!("{}/{}", host_name(), std::process::id()),
            "the default name is HOST/PID"
        );

        // Heartbeats go on.
        let first_beat = named_info.heartbeat_at;
        until_listed(&store, "a later heartbeat", |w| {
            w.iter()
                .any(|w| w.name == "w-named" && w.heartbeat_at > first_beat)
        })
        .await;

        for engine in [named, twin, other_twin] {
            engine.stop().await.expect("stops");
        }
        assert!(
            store.list_workers().await.expect("list").is_empty(),
            "stopped workers leave the list"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_heartbeat_counts_the_slots_in_use() {
        let store = Arc::new(MemoryRunStore::new());
        let runs = launch_one_task_runs(&store, 1).await;
        let mut options = options(Some("busy"), 3);
        options.schedule = true;
        let mut engine = start(&store, options);
        until_listed(&store, "one slot in use", |w| {
            w.iter().any(|w| w.name == "busy" && w.running == 1)
        })
        .await;
        engine
            .wait_for(&runs, |_| {})
            .await
            .expect("the run finishes");
        until_listed(&store, "no slot in use", |w| {
            w.iter().any(|w| w.name == "busy" && w.running == 0)
        })
        .await;
        engine.stop().await.expect("stops");
    }

    /// An attempt claimed ahead of a free slot keeps its lease while it waits, however long
    /// the attempt before it runs: it runs once, on its first try, rather than being taken back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_attempt_waiting_for_a_slot_keeps_its_lease() {
        let store = Arc::new(MemoryRunStore::new());
        let runs = launch_one_task_runs(&store, 2).await;
        // One slot, attempts of 800 ms, leases of 300 ms: the second attempt is claimed while
        // the first runs, and waits for the slot more than twice its lease.
        let mut options = options(Some("one-slot"), 1);
        options.schedule = true;
        options.lease = Duration::from_millis(300);
        let mut engine = start(&store, options);
        let finished = engine
            .wait_for(&runs, |_| {})
            .await
            .expect("the runs finish");
        engine.stop().await.expect("stops");
        assert!(
            finished
                .iter()
                .all(|f| f.status == crate::model::RunStatus::Completed),
            "{finished:?}"
        );
        for task in store.list_tasks(&runs).await.expect("tasks") {
            assert_eq!(
                (task.state, task.try_number),
                (crate::model::TaskState::Succeeded, 1),
                "run {}: one attempt, never taken back",
                task.run_id
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_name_a_live_worker_elsewhere_uses_is_refused() {
        let store = Arc::new(MemoryRunStore::new());
        let now = Utc::now();
        let elsewhere = |name: &str, heartbeat_at| WorkerInfo {
            name: name.to_owned(),
            host: "elsewhere".to_owned(),
            pid: 1,
            queue: DEFAULT_TASK_QUEUE.to_owned(),
            slots: 1,
            running: 0,
            version: VERSION.to_owned(),
            started_at: now,
            heartbeat_at,
        };
        store
            .heartbeat_worker(&elsewhere("taken", now))
            .await
            .expect("heartbeat");
        store
            .heartbeat_worker(&elsewhere("silent", now - chrono::Duration::hours(1)))
            .await
            .expect("heartbeat");

        let mut refused = start(&store, options(Some("taken"), 1));
        let err = refused
            .run_until(std::future::pending())
            .await
            .expect_err("the engine fails");
        let message = err.to_string();
        assert!(matches!(err, Error::Conflict(_)), "{err:?}");
        assert!(
            message.contains("\"taken\"") && message.contains("elsewhere"),
            "{message}"
        );

        // A worker that stopped reporting long ago gives its name up.
        let reused = start(&store, options(Some("silent"), 1));
        until_listed(&store, "the name taken over", |w| {
            w.iter()
                .any(|w| w.name == "silent" && w.host == host_name())
        })
        .await;
        reused.stop().await.expect("stops");
    }
}
