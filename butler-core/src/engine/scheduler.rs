//! The scheduler: takes ready runs, queues the tasks whose needs succeeded, finishes runs.
//!
//! It keeps only the list of active runs in memory; every decision is made from the tasks as
//! stored ([`plan_run`]), so a scheduler that restarts after a crash carries on exactly where the
//! last one stopped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::batch::Batcher;
use super::plan::{TaskMessage, plan_run, run_deadline};
use super::{EngineOptions, RunFinished, python_queue, retry, worker_is_gone};
use crate::change::{Change, ChangeSet, RunChange, TaskChange, TaskExpect};
use crate::error::Result;
use crate::model::{AnalysisRun, EventFilter, Id, RunFilter, RunStatus, TaskState, Workflow};
use crate::queue::{DynQueue, NewMessage};
use crate::store::DynRunStore;

const EVENT_PAGE: u32 = 10_000;
const CLAIM_PAGE: usize = 1_000;
/// How often to look for active runs that no live scheduler drives.
const ADOPT_EVERY: chrono::Duration = chrono::Duration::seconds(30);

pub(crate) struct Scheduler {
    pub store: Arc<DynRunStore>,
    pub queue: Arc<DynQueue>,
    pub commits: Batcher<ChangeSet, bool>,
    /// Runs whose tasks this process's workers changed.
    pub touched: mpsc::UnboundedReceiver<Vec<Id>>,
    pub finished: broadcast::Sender<RunFinished>,
    pub options: EngineOptions,
    pub name: String,
    workflows: HashMap<Id, Arc<Workflow>>,
    active: HashMap<Id, AnalysisRun>,
    per_workflow: HashMap<Id, usize>,
    unsent: Vec<TaskMessage>,
    cursor: Id,
}

impl Scheduler {
    pub fn new(
        store: Arc<DynRunStore>,
        queue: Arc<DynQueue>,
        commits: Batcher<ChangeSet, bool>,
        touched: mpsc::UnboundedReceiver<Vec<Id>>,
        finished: broadcast::Sender<RunFinished>,
        options: EngineOptions,
    ) -> Self {
        let name = format!("scheduler {}", options.signature());
        Scheduler {
            store,
            queue,
            commits,
            touched,
            finished,
            options,
            name,
            workflows: HashMap::new(),
            active: HashMap::new(),
            per_workflow: HashMap::new(),
            unsent: Vec::new(),
            cursor: 0,
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        self.cursor = self.store.last_event_id().await?;
        let mut dirty = self.adopt().await?;
        let mut next_poll = Utc::now();
        let mut next_reap = Utc::now();
        let mut next_adopt = Utc::now() + ADOPT_EVERY;
        loop {
            let now = Utc::now();
            while let Ok(runs) = self.touched.try_recv() {
                dirty.extend(runs.into_iter().filter(|id| self.active.contains_key(id)));
            }
            if now >= next_poll {
                // Other processes' changes, new runs, and runs past their deadline.
                self.read_events(&mut dirty).await?;
                self.claim_ready(&mut dirty).await?;
                self.past_deadline(now, &mut dirty);
                next_poll = now + self.options.poll;
            }
            if now >= next_reap {
                self.reap(&mut dirty).await?;
                next_reap = now + self.options.lease / 2;
            }
            if now >= next_adopt {
                dirty.extend(self.adopt().await?);
                next_adopt = now + ADOPT_EVERY;
            }
            let next_deadline = next_poll.min(next_reap).min(next_adopt);
            if !dirty.is_empty() {
                dirty = self.advance(dirty).await?;
            }
            self.send_unsent().await;
            if !dirty.is_empty() {
                continue;
            }
            let pause = (next_deadline - Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_millis(1));
            tokio::select! {
                runs = self.touched.recv() => {
                    dirty.extend(runs.into_iter().flatten().filter(|id| self.active.contains_key(id)));
                }
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Marks the runs past their run-level timeout.
    fn past_deadline(&self, now: DateTime<Utc>, dirty: &mut HashSet<Id>) {
        for run in self.active.values() {
            let deadline = self
                .workflows
                .get(&run.workflow_id)
                .and_then(|w| run_deadline(&w.definition, run));
            if deadline.is_some_and(|d| d <= now) {
                dirty.insert(run.id);
            }
        }
    }

    /// Takes over the active runs no scheduler of this process tracks: at start, those a
    /// previous scheduler left behind; later, those of a scheduler that died (several
    /// schedulers on one store are safe: every change is a compare-and-set). Re-sends their
    /// queued tasks, whose messages may have been lost (duplicates are harmless: a worker starts
    /// an attempt only if the task is still queued at that try).
    async fn adopt(&mut self) -> Result<HashSet<Id>> {
        let mut dirty = HashSet::new();
        for status in [RunStatus::Scheduled, RunStatus::InProgress] {
            let filter = RunFilter {
                status: Some(status),
                ..RunFilter::default()
            };
            for run in self.store.list_runs(&filter).await? {
                if self.active.contains_key(&run.id) || !self.wanted(run.id) {
                    continue;
                }
                dirty.insert(run.id);
                self.track(run).await?;
            }
        }
        let ids: Vec<Id> = dirty.iter().copied().collect();
        for chunk in ids.chunks(CLAIM_PAGE) {
            for task in self.store.list_tasks(chunk).await? {
                if task.state == TaskState::Queued
                    && let Some(run) = self.active.get(&task.run_id)
                {
                    let python = self.workflows.get(&run.workflow_id).is_some_and(|w| {
                        w.definition
                            .task(&task.task_id)
                            .is_some_and(|t| t.python.is_some())
                    });
                    self.unsent.push(TaskMessage {
                        run: task.run_id,
                        task: task.task_id,
                        try_number: task.try_number,
                        workflow: run.workflow_id,
                        config: run.effective_config_id,
                        delay: Duration::ZERO,
                        python,
                    });
                }
            }
        }
        Ok(dirty)
    }

    /// Marks the runs other processes changed as dirty (this process's own changes arrive on
    /// `touched`).
    async fn read_events(&mut self, dirty: &mut HashSet<Id>) -> Result<()> {
        loop {
            let events = self
                .store
                .list_events(&EventFilter {
                    run_id: None,
                    not_by_suffix: Some(format!(" {}", self.options.signature())),
                    after: self.cursor,
                    limit: EVENT_PAGE,
                })
                .await?;
            let full = events.len() == EVENT_PAGE as usize;
            for event in events {
                self.cursor = event.id;
                if event.by == self.name {
                    continue;
                }
                if event.task_id.is_none() {
                    // A user cancelled or reset the run.
                    if let Some(run) = self.active.get_mut(&event.run_id)
                        && let Ok(status) = event.to.parse::<RunStatus>()
                    {
                        run.status = status;
                    }
                }
                if self.active.contains_key(&event.run_id) {
                    dirty.insert(event.run_id);
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Whether this scheduler is to drive run `id`.
    fn wanted(&self, id: Id) -> bool {
        self.options
            .only_runs
            .as_ref()
            .is_none_or(|only| only.contains(&id))
    }

    async fn workflow(&mut self, id: Id) -> Result<Arc<Workflow>> {
        if let Some(workflow) = self.workflows.get(&id) {
            return Ok(workflow.clone());
        }
        let workflow = Arc::new(self.store.get_workflow(id).await?);
        self.workflows.insert(id, workflow.clone());
        Ok(workflow)
    }

    async fn track(&mut self, run: AnalysisRun) -> Result<()> {
        self.workflow(run.workflow_id).await?;
        *self.per_workflow.entry(run.workflow_id).or_default() += 1;
        self.active.insert(run.id, run);
        Ok(())
    }

    fn untrack(&mut self, id: Id) -> Option<AnalysisRun> {
        let run = self.active.remove(&id)?;
        if let Some(count) = self.per_workflow.get_mut(&run.workflow_id) {
            *count = count.saturating_sub(1);
        }
        Some(run)
    }

    /// Moves ready runs to `scheduled`, within `max_active_runs` of each workflow and the
    /// scheduler's own limit.
    async fn claim_ready(&mut self, dirty: &mut HashSet<Id>) -> Result<()> {
        let mut after_id = None;
        loop {
            let room = self
                .options
                .max_active_runs
                .saturating_sub(self.active.len());
            if room == 0 {
                return Ok(());
            }
            let page = self
                .store
                .list_runs(&RunFilter {
                    status: Some(RunStatus::Ready),
                    after_id,
                    limit: Some(CLAIM_PAGE as u32),
                    ..RunFilter::default()
                })
                .await?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            after_id = Some(last.id);
            let full = page.len() == CLAIM_PAGE;
            let mut claimed = Vec::new();
            let mut planned: HashMap<Id, usize> = HashMap::new();
            for run in page {
                if claimed.len() >= room {
                    break;
                }
                if !self.wanted(run.id) {
                    continue;
                }
                let workflow = self.workflow(run.workflow_id).await?;
                let taken = self
                    .per_workflow
                    .get(&run.workflow_id)
                    .copied()
                    .unwrap_or(0)
                    + planned.get(&run.workflow_id).copied().unwrap_or(0);
                if workflow
                    .definition
                    .max_active_runs
                    .is_some_and(|max| taken >= max as usize)
                {
                    continue;
                }
                *planned.entry(run.workflow_id).or_default() += 1;
                claimed.push(run);
            }
            let sets: Vec<ChangeSet> = claimed
                .iter()
                .map(|run| {
                    vec![Change::Run(RunChange {
                        run_id: run.id,
                        expect: RunStatus::Ready,
                        status: RunStatus::Scheduled,
                        error: None,
                        started_at: None,
                        ended_at: None,
                        by: self.name.clone(),
                        reason: "taken by the scheduler".to_owned(),
                    })]
                })
                .collect();
            let applied = self.commits.submit(sets).await?;
            for (mut run, ok) in claimed.into_iter().zip(applied) {
                if ok {
                    run.status = RunStatus::Scheduled;
                    dirty.insert(run.id);
                    self.track(run).await?;
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Puts back the tasks whose worker stopped renewing its lease, or died on this host.
    async fn reap(&mut self, dirty: &mut HashSet<Id>) -> Result<()> {
        let now = Utc::now();
        let expired = self.store.expired_leases(now, CLAIM_PAGE as u32).await?;
        let sets: Vec<ChangeSet> = expired
            .iter()
            .map(|task| self.lost(task, now, "its lease expired"))
            .collect();
        if !sets.is_empty() {
            warn!(
                count = sets.len(),
                "putting back tasks whose worker lost its lease"
            );
            self.commits.submit(sets).await?;
        }
        for task in expired {
            dirty.insert(task.run_id);
        }
        Ok(())
    }

    fn lost(&self, task: &crate::model::TaskInstance, now: DateTime<Utc>, why: &str) -> ChangeSet {
        let new = retry::after_lost_lease(task, now);
        let reason = format!("{why}: {}", new.error.as_deref().unwrap_or("worker lost"));
        vec![Change::Task(TaskChange {
            expect: TaskExpect::of(task),
            new,
            by: self.name.clone(),
            reason,
        })]
    }

    /// Plans and commits the dirty runs; returns the runs whose plan met a conflict.
    async fn advance(&mut self, dirty: HashSet<Id>) -> Result<HashSet<Id>> {
        let now = Utc::now();
        let ids: Vec<Id> = dirty
            .into_iter()
            .filter(|id| self.active.contains_key(id))
            .collect();
        let mut tasks: HashMap<Id, Vec<crate::model::TaskInstance>> = HashMap::new();
        for chunk in ids.chunks(CLAIM_PAGE) {
            for task in self.store.list_tasks(chunk).await? {
                tasks.entry(task.run_id).or_default().push(task);
            }
        }
        let mut plans = Vec::new();
        let mut sets = Vec::new();
        for id in ids {
            let run = &self.active[&id];
            let run_tasks = tasks.remove(&id).unwrap_or_default();
            if !matches!(run.status, RunStatus::Scheduled | RunStatus::InProgress) {
                // Cancelled or reset by a user: no longer the scheduler's.
                let status = run.status;
                self.untrack(id);
                if status.is_finished() {
                    let _ = self.finished.send(RunFinished { run_id: id, status });
                }
                continue;
            }
            // A worker on this host that died holds its lease until it expires; take it back now.
            let orphans: Vec<ChangeSet> = run_tasks
                .iter()
                .filter(|t| t.state == TaskState::Running && worker_is_gone(t.worker.as_deref()))
                .map(|t| self.lost(t, now, "its worker process is gone"))
                .collect();
            if !orphans.is_empty() {
                plans.push((id, None));
                sets.extend(orphans);
                continue;
            }
            let workflow = &self.workflows[&run.workflow_id];
            let plan = plan_run(&workflow.definition, run, &run_tasks, now, &self.name);
            if !plan.changes.is_empty() {
                sets.push(plan.changes.clone());
                plans.push((id, Some(plan)));
            }
        }
        let applied = self.commits.submit(sets).await?;
        let mut again = HashSet::new();
        for ((id, plan), ok) in plans.into_iter().zip(applied) {
            let Some(plan) = plan else {
                again.insert(id);
                continue;
            };
            if !ok {
                debug!(run = id, "plan met a concurrent change; planning again");
                again.insert(id);
                continue;
            }
            for change in &plan.changes {
                if let (Change::Run(change), Some(run)) = (change, self.active.get_mut(&id)) {
                    run.status = change.status;
                    if change.started_at.is_some() {
                        run.started_at = change.started_at;
                    }
                }
            }
            self.unsent.extend(plan.enqueue);
            if let Some(status) = plan.finishes {
                self.untrack(id);
                let _ = self.finished.send(RunFinished { run_id: id, status });
            }
        }
        Ok(again)
    }

    /// Enqueues the messages of committed plans; on failure keeps them for the next pass (the
    /// tasks are queued in the store either way).
    async fn send_unsent(&mut self) {
        if self.unsent.is_empty() {
            return;
        }
        let (python, commands): (Vec<TaskMessage>, Vec<TaskMessage>) =
            std::mem::take(&mut self.unsent)
                .into_iter()
                .partition(|m| m.python);
        for (queue, batch) in [
            (self.options.queue.clone(), commands),
            (python_queue(&self.options.queue), python),
        ] {
            if batch.is_empty() {
                continue;
            }
            let messages: Vec<NewMessage> = batch
                .iter()
                .map(|m| {
                    let payload = serde_json::to_vec(m).unwrap_or_default();
                    NewMessage::new(payload).with_delay(m.delay)
                })
                .collect();
            if let Err(err) = self.queue.enqueue(&queue, messages).await {
                warn!(error = %err, queue = %queue, "could not enqueue tasks; will try again");
                self.unsent.extend(batch);
            }
        }
    }
}
