//! The worker: takes task messages from the queue, starts the attempts it can claim, keeps their
//! leases alive, and records each outcome with the attempt's fencing token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use super::batch::Batcher;
use super::plan::TaskMessage;
use super::{EngineOptions, Stats, retry};
use crate::change::{Change, ChangeSet, LeaseChange, TaskChange, TaskExpect};
use crate::definition::Renderer;

/// Workflows a worker has seen, with their compiled templates.
type WorkflowCache = HashMap<Id, (Arc<Workflow>, Arc<Renderer>)>;
use crate::error::{Error, Result};
use crate::executor::{Attempt, DynExecutor, Finished, Outcome, attempt_dir};
use crate::model::{Id, TaskInstance, TaskState, Workflow};
use crate::queue::{Delivery, DeliveryTag, DynQueue};
use crate::store::DynRunStore;

/// How a worker's changes are signed in the event log, before the process name.
pub(crate) const BY_PREFIX: &str = "worker ";

/// Attempts a worker takes at once when they are short: enough to fill a group commit.
const MAX_PREFETCH_PER_SLOT: usize = 64;
/// Effective configs a worker keeps, so the tasks of one run read it once.
const CONFIG_CACHE: usize = 4096;
/// Prefetch aims to keep one batch of attempts under this long.
const PREFETCH_HORIZON: Duration = Duration::from_millis(20);

/// An attempt this worker won, with what it needs to run it.
struct Claimed {
    task: TaskInstance,
    workflow: Id,
    config: uuid::Uuid,
    tag: DeliveryTag,
}

pub(crate) struct Worker {
    pub store: Arc<DynRunStore>,
    pub queue: Arc<DynQueue>,
    pub executor: Arc<DynExecutor>,
    pub commits: Batcher<ChangeSet, bool>,
    pub acks: Batcher<DeliveryTag, bool>,
    pub options: EngineOptions,
    pub stats: Arc<Stats>,
    pub name: String,
    workflows: Mutex<WorkflowCache>,
    configs: Mutex<HashMap<uuid::Uuid, Arc<serde_json::Value>>>,
    /// Mean attempt duration in microseconds, smoothed.
    mean_micros: AtomicU64,
}

impl Worker {
    pub fn new(
        store: Arc<DynRunStore>,
        queue: Arc<DynQueue>,
        executor: Arc<DynExecutor>,
        commits: Batcher<ChangeSet, bool>,
        acks: Batcher<DeliveryTag, bool>,
        options: EngineOptions,
        stats: Arc<Stats>,
    ) -> Self {
        let name = format!("{BY_PREFIX}{}", options.signature());
        Worker {
            store,
            queue,
            executor,
            commits,
            acks,
            options,
            stats,
            name,
            workflows: Mutex::new(HashMap::new()),
            configs: Mutex::new(HashMap::new()),
            mean_micros: AtomicU64::new(PREFETCH_HORIZON.as_micros() as u64),
        }
    }

    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<()> {
        let slots = Arc::new(Semaphore::new(self.options.slots));
        loop {
            if slots.available_permits() == 0 {
                tokio::select! {
                    permit = slots.clone().acquire_owned() => drop(permit),
                    _ = shutdown.cancelled() => return Ok(()),
                }
                continue;
            }
            let want = slots.available_permits() * self.prefetch_per_slot();
            let deliveries = tokio::select! {
                got = self.queue.dequeue(
                    &self.options.queue,
                    want,
                    self.options.lease,
                    Duration::from_secs(1),
                ) => got,
                _ = shutdown.cancelled() => return Ok(()),
            };
            match deliveries {
                Ok(deliveries) if deliveries.is_empty() => {}
                Ok(deliveries) => self.clone().start(deliveries, &slots, &shutdown).await?,
                Err(err) if err.is_retryable() => {
                    warn!(error = %err, "queue unavailable; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    fn prefetch_per_slot(&self) -> usize {
        let mean = self.mean_micros.load(Ordering::Relaxed).max(1);
        ((PREFETCH_HORIZON.as_micros() as u64 / mean) as usize).clamp(1, MAX_PREFETCH_PER_SLOT)
    }

    /// Claims the delivered attempts in one commit and starts those it won.
    async fn start(
        self: Arc<Self>,
        deliveries: Vec<Delivery>,
        slots: &Arc<Semaphore>,
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
        let tasks: HashMap<(Id, String), TaskInstance> = self
            .store
            .list_tasks(&run_ids)
            .await?
            .into_iter()
            .map(|t| ((t.run_id, t.task_id.clone()), t))
            .collect();

        let now = Utc::now();
        let lease_until = now + self.options.lease;
        let mut claims = Vec::new();
        let mut sets = Vec::new();
        for (message, tag) in messages {
            let current = tasks.get(&(message.run, message.task.clone()));
            match current {
                Some(task)
                    if task.state == TaskState::Queued && task.try_number == message.try_number =>
                {
                    let new = TaskInstance {
                        state: TaskState::Running,
                        token: Some(new_token()),
                        lease_until: Some(lease_until),
                        worker: Some(self.options.name.clone()),
                        first_started_at: task.first_started_at.or(Some(now)),
                        started_at: Some(now),
                        ended_at: None,
                        exit_code: None,
                        error: None,
                        ..task.clone()
                    };
                    sets.push(vec![Change::Task(TaskChange {
                        expect: TaskExpect::of(task),
                        new: new.clone(),
                        by: self.name.clone(),
                        reason: format!("attempt {} started", new.try_number),
                    })]);
                    claims.push((new, message.workflow, message.config, tag));
                }
                // The task moved on (a duplicate message, a cancelled run): nothing to do.
                _ => stale.push(tag),
            }
        }
        let won = self.commits.submit(sets).await?;
        self.prefetch_configs(claims.iter().map(|(_, _, config, _)| *config))
            .await?;
        for ((task, workflow, config, tag), ok) in claims.into_iter().zip(won) {
            if !ok {
                stale.push(tag);
                continue;
            }
            let permit = tokio::select! {
                permit = slots.clone().acquire_owned() => permit.map_err(|e| Error::backend("worker slots closed", e))?,
                _ = shutdown.cancelled() => return Ok(()),
            };
            let worker = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let attempt = Claimed {
                    task,
                    workflow,
                    config,
                    tag,
                };
                if let Err(err) = worker.attempt(attempt, permit, shutdown).await {
                    warn!(error = %err, "attempt could not be recorded; its lease will expire");
                }
            });
        }
        if !stale.is_empty() {
            self.acks.submit(stale).await?;
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

    /// Runs one claimed attempt to its end in the slot `permit` holds, frees the slot, and
    /// records the outcome (the slot does not wait for the commit: recording many outcomes
    /// together is what makes group commit pay).
    async fn attempt(
        self: Arc<Self>,
        claimed: Claimed,
        permit: OwnedSemaphorePermit,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let Claimed {
            task,
            workflow,
            config,
            tag,
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

        let cancel = CancellationToken::new();
        let lost = CancellationToken::new();
        let heartbeat =
            tokio::spawn(
                self.clone()
                    .heartbeat(&task, token, tag, cancel.clone(), lost.clone()),
            );
        let started = Instant::now();
        let execution = async {
            match renderer.render(&config) {
                Err(err) => Finished {
                    outcome: Outcome::FailedToStart {
                        reason: err.to_string(),
                    },
                    log_path: Default::default(),
                    duration: Duration::ZERO,
                },
                Ok(rendered) => {
                    let rendered = rendered.into_iter().find(|r| r.id == task.task_id);
                    let (command, env) = rendered.map(|r| (r.command, r.env)).unwrap_or_default();
                    let attempt = Attempt {
                        run_id,
                        task_id: task.task_id.clone(),
                        try_number: task.try_number,
                        command,
                        env,
                        workdir: attempt_dir(
                            &self.options.home,
                            run_id,
                            &task.task_id,
                            task.try_number,
                        ),
                        config: (*config).clone(),
                        timeout: def.timeout,
                    };
                    match self.executor.execute(attempt, cancel.clone()).await {
                        Ok(finished) => finished,
                        Err(err) => Finished {
                            outcome: Outcome::FailedToStart {
                                reason: err.to_string(),
                            },
                            log_path: Default::default(),
                            duration: Duration::ZERO,
                        },
                    }
                }
            }
        };
        let finished = tokio::select! {
            finished = execution => Some(finished),
            _ = shutdown.cancelled() => None,
        };
        heartbeat.abort();
        drop(permit);
        let Some(finished) = finished else {
            // Shutting down: kill the attempt and give the task back at once rather than at the
            // end of its lease. If the process ends first, the lease still brings it back.
            cancel.cancel();
            let new = retry::after_lost_lease(&task, Utc::now());
            self.commits
                .submit(vec![vec![Change::Task(TaskChange {
                    expect: TaskExpect::of(&task),
                    new,
                    by: self.name.clone(),
                    reason: "the worker stopped; the attempt is given back".to_owned(),
                })]])
                .await?;
            return Ok(());
        };
        self.observe(started.elapsed());
        if lost.is_cancelled() {
            info!(run = run_id, task = %task.task_id, "attempt stopped: the task is no longer this worker's");
            self.acks.submit(vec![tag]).await?;
            return Ok(());
        }
        let new = retry::after_attempt(&def, &task, &finished.outcome, Utc::now());
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
        }
        self.acks.submit(vec![tag]).await?;
        Ok(())
    }

    /// Renews the attempt's lease in the store and the queue until cancelled; when the store
    /// refuses (the run was cancelled, or the lease was lost), cancels the attempt.
    fn heartbeat(
        self: Arc<Self>,
        task: &TaskInstance,
        token: i64,
        tag: DeliveryTag,
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
                    Ok(ok) if ok.first() == Some(&true) => {
                        let _ = self.queue.extend(&[tag], self.options.lease).await;
                    }
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
        let old = self.mean_micros.load(Ordering::Relaxed);
        self.mean_micros
            .store((old * 7 + sample) / 8, Ordering::Relaxed);
    }
}

fn new_token() -> i64 {
    (Uuid::new_v4().as_u64_pair().0 >> 1) as i64
}
