//! The scheduler: takes ready runs, queues the tasks whose needs succeeded, finishes runs.
//!
//! It keeps only the list of active runs in memory; every decision is made from the tasks as
//! stored ([`plan_run`]), so a scheduler that restarts after a crash carries on exactly where the
//! last one stopped.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::batch::Batcher;
use super::metrics;
use super::plan::{Plan, QueuedTask, TaskMessage, plan_run, run_deadline, started_change};
use super::worker::{ClaimedTask, Worker};
use super::{EngineOptions, RunFinished, SCHEDULER_ROLE, python_queue, retry, worker_is_gone};
use crate::change::{Change, ChangeSet, RunChange, TaskChange, TaskExpect};
use crate::error::Result;
use crate::follow::LogCursor;
use crate::model::{
    AnalysisRun, EventFilter, Id, RunFilter, RunStatus, TaskInstance, TaskState, Workflow,
};
use crate::queue::{DynQueue, NewMessage};
use crate::store::DynRunStore;

const EVENT_PAGE: u32 = 10_000;
const CLAIM_PAGE: usize = 1_000;
/// The first page of ready runs a claim reads: small, so the first commit (and the workers'
/// first tasks) come soon; each next page is four times larger, up to [`CLAIM_PAGE`].
const FIRST_CLAIM_PAGE: usize = 64;
/// How often to look for active runs that no live scheduler drives, and to plan every active
/// run again from the store.
const ADOPT_EVERY: chrono::Duration = chrono::Duration::seconds(30);
/// How often to look whether workers of other processes take from this scheduler's queue.
const WORKERS_EVERY: Duration = Duration::from_secs(2);
/// The most runs whose tasks the scheduler keeps in memory ([`Scheduler::known`]).
const KNOWN_RUNS: usize = 20_000;

/// What one change set of [`Scheduler::advance`] does.
enum Step {
    /// Takes back an attempt whose worker process is gone, with this set; whether its task is
    /// retried.
    Orphan(ChangeSet, bool),
    /// Carries a run's plan, made from these tasks; whether the run was past its deadline when
    /// planned.
    Plan(Plan, Vec<TaskInstance>, bool),
}

/// Whether `set` puts a task back for another attempt.
fn retries(set: &ChangeSet) -> bool {
    set.iter().any(
        |change| matches!(change, Change::Task(task) if task.new.state == TaskState::UpForRetry),
    )
}

/// Puts `row` in place of the task of the same id among `tasks`.
fn replace_row(tasks: &mut [TaskInstance], row: &TaskInstance) {
    if let Some(task) = tasks.iter_mut().find(|t| t.task_id == row.task_id) {
        *task = row.clone();
    }
}

/// Waits until `signal` changes; forever when there is none, or it ended.
async fn ready_runs_changed(signal: &mut Option<watch::Receiver<()>>) {
    let ended = match signal.as_mut() {
        Some(receiver) => receiver.changed().await.is_err(),
        None => true,
    };
    if ended {
        *signal = None;
        std::future::pending::<()>().await;
    }
}

/// Why [`Scheduler::drive`] returned.
enum Ended {
    Shutdown,
    /// Another scheduler leads now.
    SteppedDown,
}

pub(crate) struct Scheduler {
    pub store: Arc<DynRunStore>,
    pub queue: Arc<DynQueue>,
    pub commits: Batcher<ChangeSet, bool>,
    /// Task rows this process's workers committed.
    pub touched: mpsc::UnboundedReceiver<Vec<TaskInstance>>,
    pub finished: broadcast::Sender<RunFinished>,
    /// The worker slots of this process, if it has any: tasks are handed to them directly.
    local: Option<Arc<Worker>>,
    /// Whether no worker of another process takes from the queue (as of the last look), so
    /// this process's slots may take every task.
    alone: bool,
    /// When to look at the worker list again.
    next_workers_check: Instant,
    pub options: EngineOptions,
    pub name: String,
    /// How this scheduler holds the scheduler's lease.
    holder: String,
    /// Whether it holds the lease (as of its last try).
    leading: bool,
    /// When the lease it last took or renewed ends, at the latest.
    lease_ends: Instant,
    /// When a follower next looks for a leader.
    next_turn_check: Instant,
    workflows: HashMap<Id, Arc<Workflow>>,
    active: HashMap<Id, AnalysisRun>,
    /// The tasks of some active runs as this process last committed or read them, so that a
    /// run this process alone moves is planned without reading the store. A run leaves it when
    /// another process changes it (its event is read), when a plan meets a conflict, and at
    /// every reconciliation; a plan from a row that is no longer current fails its
    /// compare-and-set and reads the store next time.
    known: HashMap<Id, Vec<TaskInstance>>,
    /// Runs a task of which this process's workers started, to plan at the next poll: a run
    /// whose tasks end within a poll goes from `scheduled` to its end in one change, and one
    /// whose tasks take longer shows `in-progress` within a poll.
    started: HashSet<Id>,
    per_workflow: HashMap<Id, usize>,
    unsent: Vec<QueuedTask>,
    /// Where it is in the event log; set anew each time it starts to drive.
    log: LogCursor,
    /// Changes when runs became `ready` through this process's store, to take them at once
    /// rather than at the next poll ([`crate::RunStore::ready_runs_signal`]).
    ready_runs: Option<watch::Receiver<()>>,
}

impl Scheduler {
    pub fn new(
        store: Arc<DynRunStore>,
        queue: Arc<DynQueue>,
        commits: Batcher<ChangeSet, bool>,
        touched: mpsc::UnboundedReceiver<Vec<TaskInstance>>,
        finished: broadcast::Sender<RunFinished>,
        local: Option<Arc<Worker>>,
        options: EngineOptions,
    ) -> Self {
        let name = format!("scheduler {}", options.signature());
        let holder = options.holder();
        Scheduler {
            store,
            queue,
            commits,
            touched,
            finished,
            local,
            alone: false,
            next_workers_check: Instant::now(),
            options,
            name,
            holder,
            leading: false,
            lease_ends: Instant::now(),
            next_turn_check: Instant::now(),
            workflows: HashMap::new(),
            active: HashMap::new(),
            known: HashMap::new(),
            started: HashSet::new(),
            per_workflow: HashMap::new(),
            unsent: Vec::new(),
            log: LogCursor::new(0, false),
            ready_runs: None,
        }
    }

    /// Schedules while this scheduler's turn lasts (see [`super`]'s docs on processes) until
    /// shutdown, standing by otherwise; resigns the lease when it ends.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        let result = self.take_turns(&shutdown).await;
        if self.leading {
            // A standby takes over at once rather than when the lease ends.
            match self.store.resign(SCHEDULER_ROLE, &self.holder).await {
                Ok(()) => info!(holder = %self.holder, "resigned the scheduler lease"),
                Err(err) => warn!(
                    error = %err,
                    "could not resign the scheduler lease; a standby takes over when it ends"
                ),
            }
        }
        result
    }

    async fn take_turns(&mut self, shutdown: &CancellationToken) -> Result<()> {
        loop {
            if !self.stand_by(shutdown).await? {
                return Ok(());
            }
            match self.drive(shutdown).await {
                Ok(Ended::Shutdown) => return Ok(()),
                Ok(Ended::SteppedDown) => self.forget_runs(),
                // The store or the queue is away (a restart, a network cut): drive again from
                // what the store says once it answers, as a restarted scheduler would.
                Err(err) if err.is_retryable() => {
                    warn!(error = %err, "scheduling stopped: the store or the queue does not answer; trying again");
                    self.forget_runs();
                    tokio::select! {
                        () = tokio::time::sleep(self.standby_pause()) => {}
                        () = shutdown.cancelled() => return Ok(()),
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Whether this scheduler only follows (it has `only_runs`): it never takes the lease.
    fn follows(&self) -> bool {
        self.options.only_runs.is_some()
    }

    /// How long a standby waits between two looks at the lease.
    fn standby_pause(&self) -> Duration {
        (self.options.leader_ttl / 3).max(Duration::from_millis(1))
    }

    /// Waits until this scheduler's turn comes; `false` if shutdown came first.
    async fn stand_by(&mut self, shutdown: &CancellationToken) -> Result<bool> {
        let mut said = false;
        loop {
            match self.check_turn().await {
                Ok(true) => return Ok(true),
                Ok(false) if !said => {
                    info!(
                        scheduler = %self.name,
                        "another scheduler leads; standing by"
                    );
                    said = true;
                }
                Ok(false) => {}
                Err(err) if err.is_retryable() => {
                    warn!(error = %err, "cannot tell which scheduler leads; trying again");
                }
                Err(err) => return Err(err),
            }
            let wake = tokio::time::sleep(self.standby_pause());
            tokio::pin!(wake);
            let mut open = true;
            loop {
                tokio::select! {
                    // The workers' notices are for the scheduler that leads, which reads the
                    // same changes from the event log.
                    runs = self.touched.recv(), if open => open = runs.is_some(),
                    _ = &mut wake => break,
                    _ = shutdown.cancelled() => return Ok(false),
                }
            }
        }
    }

    /// Whether this scheduler may drive runs now: a leader takes or renews the lease (and
    /// takes it at once from a holder that was a process of this host and is gone); a
    /// follower checks that no scheduler leads.
    async fn check_turn(&mut self) -> Result<bool> {
        let role = SCHEDULER_ROLE;
        if self.follows() {
            let now = Utc::now();
            return Ok(match self.store.leader(role).await? {
                Some(lease) => !lease.is_held(now) || worker_is_gone(Some(&lease.holder)),
                None => true,
            });
        }
        let ttl = self.options.leader_ttl;
        let asked = Instant::now();
        let mut won = self.store.try_lead(role, &self.holder, ttl).await?;
        if !won
            && let Some(lease) = self.store.leader(role).await?
            && lease.holder != self.holder
            && lease.is_held(Utc::now())
            && worker_is_gone(Some(&lease.holder))
        {
            warn!(previous = %lease.holder, "the leading scheduler's process is gone; taking over");
            self.store.resign(role, &lease.holder).await?;
            won = self.store.try_lead(role, &self.holder, ttl).await?;
        }
        if won && !self.leading {
            info!(holder = %self.holder, "took the scheduler lease; scheduling");
        }
        self.leading = won;
        if won {
            self.lease_ends = asked + ttl;
        }
        Ok(won)
    }

    /// Checks, at every poll, that this scheduler's turn goes on: a leader renews its lease; a
    /// follower looks for a leader as often as a standby would.
    async fn keep_turn(&mut self) -> Result<bool> {
        let now = Instant::now();
        if self.follows() && now < self.next_turn_check {
            return Ok(true);
        }
        self.next_turn_check = now + self.standby_pause();
        match self.check_turn().await {
            Ok(true) => Ok(true),
            Ok(false) => {
                warn!(
                    scheduler = %self.name,
                    "another scheduler leads now; this one stands by"
                );
                Ok(false)
            }
            // Every change is a compare-and-set, so going on for the rest of a lease that may
            // have been lost is safe; going on past it would only repeat the leader's work.
            Err(err) if err.is_retryable() => {
                warn!(error = %err, "cannot renew the scheduler lease; trying again");
                Ok(self.follows() || Instant::now() < self.lease_ends)
            }
            Err(err) => Err(err),
        }
    }

    /// Drops what this scheduler knew of its runs: the one that leads now drives them.
    fn forget_runs(&mut self) {
        self.active.clear();
        self.known.clear();
        self.started.clear();
        self.per_workflow.clear();
        self.unsent.clear();
    }

    /// Drives the runs until shutdown or until the turn ends.
    async fn drive(&mut self, shutdown: &CancellationToken) -> Result<Ended> {
        let last = self.store.last_event_id().await?;
        self.log = LogCursor::new(last, self.store.events_visible_in_id_order());
        // Subscribed before the first look at the ready runs, so no launch falls between.
        self.ready_runs = self.store.ready_runs_signal();
        let mut claim_now = false;
        let mut dirty = self.adopt().await?;
        let mut next_poll = Utc::now();
        let mut next_reap = Utc::now();
        let mut next_adopt = Utc::now() + ADOPT_EVERY;
        loop {
            let now = Utc::now();
            while let Ok(rows) = self.touched.try_recv() {
                self.note(rows, &mut dirty);
            }
            if claim_now && now < next_poll {
                claim_now = false;
                self.claim_ready().await?;
            }
            if now >= next_poll {
                claim_now = false;
                if !self.keep_turn().await? {
                    return Ok(Ended::SteppedDown);
                }
                // Other processes' changes, new runs, and runs past their deadline.
                self.look_for_workers().await;
                self.read_events(&mut dirty).await?;
                self.claim_ready().await?;
                self.past_deadline(now, &mut dirty);
                dirty.extend(self.started.drain());
                next_poll = now + self.options.poll;
            }
            if now >= next_reap {
                self.reap(&mut dirty).await?;
                next_reap = now + self.options.lease / 2;
            }
            if now >= next_adopt {
                dirty.extend(self.adopt().await?);
                // Reconciliation: plan every active run from the store now and then, so a change
                // whose event this scheduler never read (a store may make event ids visible out
                // of order) still moves its run on.
                dirty.extend(self.active.keys().copied());
                self.known.clear();
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
                rows = self.touched.recv() => {
                    if let Some(rows) = rows {
                        self.note(rows, &mut dirty);
                    }
                }
                () = ready_runs_changed(&mut self.ready_runs) => claim_now = true,
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
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
                    self.unsent.push(QueuedTask {
                        message: TaskMessage {
                            run: task.run_id,
                            task: task.task_id.clone(),
                            try_number: task.try_number,
                            workflow: run.workflow_id,
                            config: run.effective_config_id,
                            delay: Duration::ZERO,
                            python,
                        },
                        row: task,
                    });
                }
            }
        }
        Ok(dirty)
    }

    /// Marks the runs other processes changed as dirty (this process's own changes arrive on
    /// `touched`).
    async fn read_events(&mut self, dirty: &mut HashSet<Id>) -> Result<()> {
        // The log's end, read first, moves the cursor past this process's own events too,
        // which the read leaves out: otherwise a scheduler that alone writes the log would read
        // all it ever wrote again at every poll.
        let end = self.store.last_event_id().await?;
        let mut handled = Vec::new();
        let mut after = self.log.start();
        loop {
            let filter = EventFilter {
                run_id: None,
                not_by_suffix: Some(format!(" {}", self.options.signature())),
                after,
                limit: EVENT_PAGE,
            };
            let events =
                metrics::store_call("list_events", self.store.list_events(&filter)).await?;
            let full = events.len() == EVENT_PAGE as usize;
            for event in events {
                after = event.id;
                if !self.log.is_new(event.id) {
                    continue;
                }
                handled.push(event.id);
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
                    self.known.remove(&event.run_id);
                    dirty.insert(event.run_id);
                }
            }
            if !full {
                break;
            }
        }
        // The log comes in id order: the last id read is where the read ended, unless the
        // log's end (this process's own events, left out) lies beyond it.
        self.log.finish(end.max(after), handled);
        Ok(())
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
        self.known.remove(&id);
        let run = self.active.remove(&id)?;
        if let Some(count) = self.per_workflow.get_mut(&run.workflow_id) {
            *count = count.saturating_sub(1);
        }
        Some(run)
    }

    /// Moves ready runs to `scheduled`, within `max_active_runs` of each workflow and the
    /// scheduler's own limit, each in one commit with its first plan.
    async fn claim_ready(&mut self) -> Result<()> {
        if self.room_for_runs() == 0 {
            return Ok(());
        }
        let mut limit = FIRST_CLAIM_PAGE;
        let mut next = self.ready_page(None, limit).await?;
        // A next page is read only while room is left after this one.
        while let Some((page, mut tasks)) = next.take() {
            let room = self.room_for_runs();
            let after_id = page.last().map(|run| run.id);
            let full = page.len() == limit;
            limit = (limit * 4).min(CLAIM_PAGE);
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
            let now = Utc::now();
            let mut plans = Vec::with_capacity(claimed.len());
            for run in &claimed {
                let scheduled = AnalysisRun {
                    status: RunStatus::Scheduled,
                    ..run.clone()
                };
                let definition = &self.workflows[&run.workflow_id].definition;
                let run_tasks = tasks.remove(&run.id).unwrap_or_default();
                let plan = plan_run(definition, &scheduled, &run_tasks, now, &self.name);
                plans.push((plan, run_tasks));
            }
            let to_claim = plans.iter_mut().map(|(plan, _)| Some(plan));
            let (reserved, claims) = self.claim_for_slots(to_claim, now);
            let mut sets = Vec::with_capacity(claimed.len());
            for (run, (plan, _)) in claimed.iter().zip(&plans) {
                let mut set = vec![Change::Run(RunChange {
                    run_id: run.id,
                    expect: RunStatus::Ready,
                    status: RunStatus::Scheduled,
                    error: None,
                    started_at: None,
                    ended_at: None,
                    by: self.name.clone(),
                    reason: "taken by the scheduler".to_owned(),
                })];
                set.extend(plan.changes.iter().cloned());
                sets.push(set);
            }
            // The next page is read while this one commits.
            let read_next = async {
                if full && claimed.len() < room {
                    self.ready_page(after_id, limit).await
                } else {
                    Ok(None)
                }
            };
            let (applied, upcoming) =
                tokio::join!(self.commit_claiming(sets, reserved, claims), read_next);
            let applied = applied?;
            next = upcoming?;
            for ((mut run, (plan, run_tasks)), ok) in claimed.into_iter().zip(plans).zip(applied) {
                if !ok {
                    // Taken by another scheduler, or changed meanwhile: seen at the next poll.
                    continue;
                }
                let id = run.id;
                run.status = RunStatus::Scheduled;
                self.track(run).await?;
                self.committed(id, plan, run_tasks, false);
            }
            // The workers start on this page while the next is claimed.
            self.send_unsent().await;
        }
        Ok(())
    }

    /// How many more runs the scheduler may take.
    fn room_for_runs(&self) -> usize {
        self.options
            .max_active_runs
            .saturating_sub(self.active.len())
    }

    /// The next page of at most `limit` ready runs after run `after_id`, with their tasks as
    /// stored; `None` when there are none.
    async fn ready_page(
        &self,
        after_id: Option<Id>,
        limit: usize,
    ) -> Result<Option<(Vec<AnalysisRun>, HashMap<Id, Vec<TaskInstance>>)>> {
        let page = self
            .store
            .list_runs(&RunFilter {
                status: Some(RunStatus::Ready),
                after_id,
                limit: Some(limit as u32),
                ..RunFilter::default()
            })
            .await?;
        if page.is_empty() {
            return Ok(None);
        }
        let ids: Vec<Id> = page.iter().map(|run| run.id).collect();
        let tasks = self.read_tasks(&ids).await?;
        Ok(Some((page, tasks)))
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
            let workers: BTreeSet<&str> = expired
                .iter()
                .map(|task| task.worker.as_deref().unwrap_or("unknown"))
                .collect();
            warn!(
                count = sets.len(),
                workers = ?workers,
                "putting back tasks whose worker lost its lease"
            );
            let retried: Vec<bool> = sets.iter().map(retries).collect();
            let applied = self.commits.submit(sets).await?;
            for (retried, ok) in retried.into_iter().zip(applied) {
                if ok {
                    metrics::attempt_ended("lost", None, retried);
                }
            }
        }
        for task in expired {
            self.known.remove(&task.run_id);
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
        let unknown: Vec<Id> = ids
            .iter()
            .copied()
            .filter(|id| !self.known.contains_key(id))
            .collect();
        let mut tasks = self.read_tasks(&unknown).await?;
        for &id in &ids {
            if let Some(known) = self.known.remove(&id) {
                tasks.insert(id, known);
            }
        }
        let mut plans = Vec::new();
        for id in ids {
            let run = &self.active[&id];
            let run_tasks = tasks.remove(&id).unwrap_or_default();
            if !matches!(run.status, RunStatus::Scheduled | RunStatus::InProgress) {
                // Cancelled or reset by a user: no longer the scheduler's.
                let status = run.status;
                self.untrack(id);
                if status.is_finished() {
                    info!(run = id, %status, "run finished (cancelled, or by another process)");
                    metrics::run_finished(status, false);
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
                // One entry per set, so that each set's answer lines up with its entry.
                for orphan in orphans {
                    let retried = retries(&orphan);
                    plans.push((id, Step::Orphan(orphan, retried)));
                }
                continue;
            }
            let workflow = &self.workflows[&run.workflow_id];
            let plan = plan_run(&workflow.definition, run, &run_tasks, now, &self.name);
            if plan.changes.is_empty() {
                self.learn(id, run_tasks);
            } else {
                let timed_out = run_deadline(&workflow.definition, run).is_some_and(|d| d <= now);
                plans.push((id, Step::Plan(plan, run_tasks, timed_out)));
            }
        }
        let to_claim = plans.iter_mut().map(|(_, step)| match step {
            Step::Plan(plan, ..) => Some(plan),
            Step::Orphan(..) => None,
        });
        let (reserved, claims) = self.claim_for_slots(to_claim, now);
        let sets = plans
            .iter()
            .map(|(_, step)| match step {
                Step::Plan(plan, ..) => plan.changes.clone(),
                Step::Orphan(set, _) => set.clone(),
            })
            .collect();
        let applied = self.commit_claiming(sets, reserved, claims).await?;
        let mut again = HashSet::new();
        for ((id, step), ok) in plans.into_iter().zip(applied) {
            let (plan, run_tasks, timed_out) = match step {
                Step::Plan(plan, run_tasks, timed_out) => (plan, run_tasks, timed_out),
                Step::Orphan(_, retried) => {
                    if ok {
                        metrics::attempt_ended("lost", None, retried);
                    }
                    again.insert(id);
                    continue;
                }
            };
            if !ok {
                debug!(run = id, "plan met a concurrent change; planning again");
                again.insert(id);
                continue;
            }
            self.committed(id, plan, run_tasks, timed_out);
        }
        Ok(again)
    }

    /// Follows run `id`'s `plan`, made from `tasks`, once committed: the run's new status, its
    /// tasks now, the tasks to send, and the run's end.
    fn committed(&mut self, id: Id, plan: Plan, mut tasks: Vec<TaskInstance>, timed_out: bool) {
        for change in &plan.changes {
            match change {
                Change::Run(change) => {
                    if let Some(run) = self.active.get_mut(&id) {
                        run.status = change.status;
                        if change.started_at.is_some() {
                            run.started_at = change.started_at;
                        }
                    }
                }
                Change::Task(change) => replace_row(&mut tasks, &change.new),
                Change::Lease(_) => {}
            }
        }
        self.learn(id, tasks);
        self.unsent.extend(plan.enqueue);
        if let Some(status) = plan.finishes {
            self.untrack(id);
            info!(run = id, %status, "run finished");
            metrics::run_finished(status, timed_out);
            let _ = self.finished.send(RunFinished { run_id: id, status });
        }
    }

    /// Claims for this process's slots, in the plans that queue them, the tasks the slots would
    /// take now (see [`Worker::reserve`]): such a task is queued and claimed in one commit, its
    /// row written once, and it starts without a commit of its own. `plans` has one entry per
    /// set to commit, `None` for a set that is no plan. Answers the room reserved and each
    /// set's claims, in order, for [`Scheduler::commit_claiming`].
    fn claim_for_slots<'p>(
        &self,
        plans: impl Iterator<Item = Option<&'p mut Plan>>,
        now: DateTime<Utc>,
    ) -> (usize, Vec<Vec<ClaimedTask>>) {
        let mut plans: Vec<Option<&mut Plan>> = plans.collect();
        let mut claims: Vec<Vec<ClaimedTask>> = plans.iter().map(|_| Vec::new()).collect();
        let Some(local) = &self.local else {
            return (0, claims);
        };
        // A retry's backoff is the queue's delay, and Python tasks go to their own workers.
        let startable = |m: &QueuedTask| m.message.delay.is_zero() && !m.message.python;
        let wanted = plans
            .iter()
            .flatten()
            .map(|p| p.enqueue.iter().filter(|m| startable(m)).count())
            .sum();
        if wanted == 0 {
            return (0, claims);
        }
        let reserved = local.reserve(wanted);
        let mut left = reserved;
        for (plan, claims) in plans.iter_mut().zip(&mut claims) {
            let Some(plan) = plan else { continue };
            if left == 0 {
                break;
            }
            let mut rest = Vec::with_capacity(plan.enqueue.len());
            for queued in std::mem::take(&mut plan.enqueue) {
                let claim = (left > 0 && startable(&queued))
                    .then(|| local.claim(&queued.message, &queued.row, now))
                    .flatten();
                match claim {
                    Some((change, claimed)) => {
                        left -= 1;
                        plan.changes.push(change);
                        claims.push(claimed);
                    }
                    None => rest.push(queued),
                }
            }
            plan.enqueue = rest;
            // The run's first task starts with this commit, and so does the run.
            if !claims.is_empty()
                && let Some(run_id) = plan.unstarted.take()
            {
                plan.changes.push(started_change(run_id, now, &self.name));
            }
        }
        (reserved, claims)
    }

    /// Commits `sets`, the claims of each made by [`Scheduler::claim_for_slots`] under
    /// `reserved`, and hands the claims of the sets that applied to the slots.
    async fn commit_claiming(
        &self,
        sets: Vec<ChangeSet>,
        reserved: usize,
        claims: Vec<Vec<ClaimedTask>>,
    ) -> Result<Vec<bool>> {
        let applied = self.commits.submit(sets).await;
        let Some(local) = &self.local else {
            return applied;
        };
        let won = match &applied {
            Ok(applied) => claims
                .into_iter()
                .zip(applied)
                .filter(|(_, ok)| **ok)
                .flat_map(|(claims, _)| claims)
                .collect(),
            Err(_) => Vec::new(),
        };
        local.settle(reserved, won);
        applied
    }

    /// The tasks of runs `ids` as stored, by run, read in pages.
    async fn read_tasks(&self, ids: &[Id]) -> Result<HashMap<Id, Vec<TaskInstance>>> {
        let mut tasks: HashMap<Id, Vec<TaskInstance>> = HashMap::new();
        for chunk in ids.chunks(CLAIM_PAGE) {
            for task in metrics::store_call("list_tasks", self.store.list_tasks(chunk)).await? {
                tasks.entry(task.run_id).or_default().push(task);
            }
        }
        Ok(tasks)
    }

    /// Keeps `tasks` as run `id`'s tasks now, room permitting.
    fn learn(&mut self, id: Id, tasks: Vec<TaskInstance>) {
        if self.active.contains_key(&id)
            && (self.known.len() < KNOWN_RUNS || self.known.contains_key(&id))
        {
            self.known.insert(id, tasks);
        }
    }

    /// Takes in the task rows this process's workers committed: their runs are to be planned,
    /// at once for a task that ended, at the next poll for one that started.
    fn note(&mut self, rows: Vec<TaskInstance>, dirty: &mut HashSet<Id>) {
        for row in rows {
            if !self.active.contains_key(&row.run_id) {
                continue;
            }
            if row.state == TaskState::Running {
                self.started.insert(row.run_id);
            } else {
                dirty.insert(row.run_id);
            }
            if let Some(tasks) = self.known.get_mut(&row.run_id) {
                replace_row(tasks, &row);
            }
        }
    }

    /// Looks, now and then, whether workers of other processes take from this scheduler's
    /// queue; while none does, this process's slots take every task.
    async fn look_for_workers(&mut self) {
        if self.local.is_none() || Instant::now() < self.next_workers_check {
            return;
        }
        self.next_workers_check = Instant::now() + WORKERS_EVERY;
        let workers = match self.store.list_workers().await {
            Ok(workers) => workers,
            // Keep the last answer; the next look may succeed.
            Err(err) => {
                debug!(error = %err, "could not read the worker list");
                return;
            }
        };
        let now = Utc::now();
        let lost_after = self.options.worker_heartbeat * super::LOST_AFTER_HEARTBEATS;
        let (host, pid) = (super::host_name(), std::process::id());
        self.alone = !workers.iter().any(|w| {
            w.queue == self.options.queue
                && (w.host != host || w.pid != pid)
                && !w.is_lost(now, lost_after)
        });
    }

    /// Enqueues the messages of committed plans; on failure keeps them for the next pass (the
    /// tasks are queued in the store either way).
    async fn send_unsent(&mut self) {
        if self.unsent.is_empty() {
            return;
        }
        let (python, mut commands): (Vec<QueuedTask>, Vec<QueuedTask>) =
            std::mem::take(&mut self.unsent)
                .into_iter()
                .partition(|m| m.message.python);
        if let Some(local) = &self.local {
            // A retry's backoff is the queue's delay; everything else may go straight to a slot.
            let (now, later): (Vec<QueuedTask>, Vec<QueuedTask>) = commands
                .into_iter()
                .partition(|m| m.message.delay.is_zero());
            commands = local.hand_over(now, self.alone);
            commands.extend(later);
        }
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
                    let payload = serde_json::to_vec(&m.message).unwrap_or_default();
                    NewMessage::new(payload).with_delay(m.message.delay)
                })
                .collect();
            let enqueue = self.queue.enqueue(&queue, messages);
            if let Err(err) = metrics::queue_call("enqueue", enqueue).await {
                warn!(error = %err, queue = %queue, "could not enqueue tasks; will try again");
                self.unsent.extend(batch);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_trait::async_trait;
    use serde_json::json;

    use super::super::{Engine, EngineOptions, SCHEDULER_ROLE, worker_is_gone};
    use super::*;
    use crate::definition::{Definition, Format};
    use crate::executor::{Attempt, CancellationToken, Executor, Finished, Outcome};
    use crate::memory::{MemoryQueue, MemoryRunStore};
    use crate::model::{EventFilter, Id, RunStatus};
    use crate::store::RunStore;
    use crate::tracker::{RunSource, Tracker};
    use std::sync::Arc;

    /// Every attempt succeeds at once.
    #[derive(Debug)]
    struct Succeeds;

    #[async_trait]
    impl Executor for Succeeds {
        async fn execute(&self, attempt: Attempt, _: CancellationToken) -> crate::Result<Finished> {
            Ok(Finished {
                outcome: Outcome::Exited { code: 0 },
                log_path: attempt.workdir,
                duration: Duration::ZERO,
            })
        }
    }

    /// One store and queue shared by several engines, as several processes would share them.
    struct World {
        store: Arc<MemoryRunStore>,
        queue: Arc<MemoryQueue>,
        tracker: Tracker,
        workflow: Id,
        analysis: Id,
        launched: usize,
    }

    impl World {
        async fn new() -> World {
            let store = Arc::new(MemoryRunStore::new());
            let tracker = Tracker::new(store.clone());
            let definition = Definition::parse(
                "[[tasks]]\nid = \"a\"\nrun = \"true\"\n[[tasks]]\nid = \"b\"\nrun = \"true\"\n\
                 needs = [\"a\"]\n",
                Format::Toml,
                "test.toml",
            )
            .expect("a valid definition");
            let workflow = tracker
                .create_workflow("w", "1", json!({}), definition)
                .await
                .expect("workflow");
            let analysis = tracker
                .create_analysis("a", chrono::Utc::now().date_naive(), json!({}))
                .await
                .expect("analysis");
            World {
                store,
                queue: Arc::new(MemoryQueue::new()),
                tracker,
                workflow: workflow.id,
                analysis: analysis.id,
                launched: 0,
            }
        }

        async fn launch(&mut self, count: usize) -> Vec<Id> {
            let sources = (0..count)
                .map(|i| RunSource {
                    source: None,
                    config: json!({ "i": self.launched + i }),
                })
                .collect();
            self.launched += count;
            self.tracker
                .launch(self.workflow, self.analysis, sources, false)
                .await
                .expect("launch")
                .into_iter()
                .map(|run| run.id)
                .collect()
        }

        fn start(&self, options: EngineOptions) -> Engine {
            Engine::start(
                self.store.clone(),
                self.queue.clone(),
                Arc::new(Succeeds),
                options,
            )
        }

        /// Who moved each run to `scheduled`.
        async fn taken_by(&self, runs: &[Id]) -> Vec<String> {
            let mut by = Vec::new();
            for &run in runs {
                let events = self
                    .store
                    .list_events(&EventFilter {
                        not_by_suffix: None,
                        run_id: Some(run),
                        after: 0,
                        limit: 1000,
                    })
                    .await
                    .expect("events");
                let taken = events
                    .into_iter()
                    .find(|e| e.task_id.is_none() && e.to == "scheduled")
                    .unwrap_or_else(|| panic!("run {run} was never scheduled"));
                by.push(taken.by);
            }
            by
        }

        /// The holder of the scheduler's lease while it is in force.
        async fn leader(&self) -> Option<String> {
            self.store
                .leader(SCHEDULER_ROLE)
                .await
                .expect("leader")
                .filter(|lease| lease.is_held(chrono::Utc::now()))
                .map(|lease| lease.holder)
        }
    }

    fn options(slots: usize) -> EngineOptions {
        let mut options = EngineOptions::new(std::env::temp_dir(), slots);
        options.poll = Duration::from_millis(20);
        options.leader_ttl = Duration::from_millis(600);
        options
    }

    async fn finish(engine: &mut Engine, runs: &[Id]) {
        let done = tokio::time::timeout(Duration::from_secs(20), engine.wait_for(runs, |_| {}))
            .await
            .expect("the runs finish in time")
            .expect("the engine runs");
        assert!(
            done.iter().all(|run| run.status == RunStatus::Completed),
            "{done:?}"
        );
    }

    async fn until_leader(world: &World, what: &str, check: impl Fn(Option<&str>) -> bool) {
        for _ in 0..500 {
            if check(world.leader().await.as_deref()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "gave up waiting for {what}; leader: {:?}",
            world.leader().await
        );
    }

    #[test]
    fn a_holder_is_gone_when_its_process_on_this_host_is() {
        let host = super::super::host_name();
        let me = std::process::id();
        // Above any pid_max, so no such process exists.
        let dead = 4_000_000_000u32;
        assert!(!worker_is_gone(Some(&format!("{host}/{me} #3"))));
        assert!(worker_is_gone(Some(&format!("{host}/{dead} #1"))));
        assert!(worker_is_gone(Some(&format!("{host}/{dead}"))));
        assert!(!worker_is_gone(Some(&format!("elsewhere/{dead} #1"))));
        assert!(!worker_is_gone(Some("w1 #1")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_scheduler_leads_and_a_standby_takes_over_when_it_stops() {
        let mut world = World::new().await;
        let first = world.start(options(1));
        until_leader(&world, "the first scheduler to lead", |l| l.is_some()).await;
        let first_holder = world.leader().await.expect("a leader");
        let mut second = world.start(options(1));

        let runs = world.launch(6).await;
        finish(&mut second, &runs).await;
        let expected = format!("scheduler {first_holder}");
        assert!(
            world.taken_by(&runs).await.iter().all(|by| *by == expected),
            "only the leader schedules: {:?}, leader {first_holder}",
            world.taken_by(&runs).await
        );
        assert_eq!(world.leader().await, Some(first_holder.clone()));

        // Stopping resigns, so the standby takes over without waiting for the lease to end.
        first.stop().await.expect("the first engine stops");
        until_leader(&world, "the standby to take over", |l| {
            l.is_some_and(|l| l != first_holder)
        })
        .await;
        let second_holder = world.leader().await.expect("a leader");
        let more = world.launch(3).await;
        finish(&mut second, &more).await;
        let expected = format!("scheduler {second_holder}");
        assert!(
            world.taken_by(&more).await.iter().all(|by| *by == expected),
            "the new leader schedules: {:?}",
            world.taken_by(&more).await
        );
        second.stop().await.expect("the second engine stops");
        assert_eq!(world.leader().await, None, "a stopped leader resigns");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_standby_takes_over_when_the_leaders_lease_ends() {
        let mut world = World::new().await;
        // A leader that stops renewing: the role is held, by a holder no engine runs as.
        assert!(
            world
                .store
                .try_lead(SCHEDULER_ROLE, "far-away/1 #1", Duration::from_millis(500))
                .await
                .expect("try_lead")
        );
        let mut engine = world.start(options(1));
        let runs = world.launch(2).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            world.store.get_run(runs[0]).await.expect("run").status == RunStatus::Ready,
            "nothing is scheduled while another holds the lease"
        );
        finish(&mut engine, &runs).await;
        let holder = world.leader().await.expect("the standby leads");
        assert_ne!(holder, "far-away/1 #1");
        engine.stop().await.expect("stops");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_embedded_engine_follows_the_leader_and_its_runs_still_finish() {
        let mut world = World::new().await;
        // A scheduler with no worker: the embedded engine's workers run every attempt.
        let leader = world.start(options(0));
        until_leader(&world, "the scheduler to lead", |l| l.is_some()).await;
        let leader_holder = world.leader().await.expect("a leader");

        let runs = world.launch(4).await;
        let mut embedded_options = options(2);
        embedded_options.only_runs = Some(Arc::new(runs.iter().copied().collect()));
        let mut embedded = world.start(embedded_options);
        finish(&mut embedded, &runs).await;
        let expected = format!("scheduler {leader_holder}");
        assert!(
            world.taken_by(&runs).await.iter().all(|by| *by == expected),
            "the embedded scheduler stands by while the leader schedules: {:?}",
            world.taken_by(&runs).await
        );
        assert_eq!(
            world.leader().await,
            Some(leader_holder.clone()),
            "an embedded engine never takes the lease"
        );
        embedded.stop().await.expect("stops");

        // With no scheduler leading, an embedded engine drives its own runs, and only those.
        leader.stop().await.expect("stops");
        let others = world.launch(2).await;
        let mine = world.launch(2).await;
        let mut embedded_options = options(2);
        embedded_options.only_runs = Some(Arc::new(mine.iter().copied().collect()));
        let mut embedded = world.start(embedded_options);
        finish(&mut embedded, &mine).await;
        assert_eq!(world.leader().await, None, "the follower took no lease");
        for run in &others {
            assert_eq!(
                world.store.get_run(*run).await.expect("run").status,
                RunStatus::Ready,
                "runs of others are left to them"
            );
        }
        embedded.stop().await.expect("stops");
    }

    #[tokio::test]
    async fn reading_the_event_log_moves_past_this_processs_own_events() {
        let mut world = World::new().await;
        let runs = world.launch(3).await;
        let mut options = options(0);
        options.instance = 7;
        let started_at = world.store.last_event_id().await.expect("last event");
        // This process's workers queue the first task of each run.
        let own = format!("worker {}", options.signature());
        let sets = world
            .store
            .list_tasks(&runs)
            .await
            .expect("tasks")
            .into_iter()
            .filter(|task| task.task_id == "a")
            .map(|task| {
                vec![Change::Task(TaskChange {
                    expect: TaskExpect::of(&task),
                    new: TaskInstance {
                        state: TaskState::Queued,
                        ..task
                    },
                    by: own.clone(),
                    reason: "queued here".to_owned(),
                })]
            })
            .collect();
        let applied = world.store.apply(sets).await.expect("apply");
        assert_eq!(applied, [true, true, true]);
        let end = world.store.last_event_id().await.expect("last event");
        assert!(end > started_at);

        let commits = Batcher::spawn(16, 1, |sets: Vec<ChangeSet>| async move {
            Ok(vec![false; sets.len()])
        });
        let (_touched_tx, touched) = mpsc::unbounded_channel();
        let (finished, _) = broadcast::channel(16);
        let store: Arc<DynRunStore> = world.store.clone();
        let queue: Arc<DynQueue> = world.queue.clone();
        let mut scheduler = Scheduler::new(store, queue, commits, touched, finished, None, options);
        scheduler.log = LogCursor::new(started_at, world.store.events_visible_in_id_order());
        let mut dirty = HashSet::new();
        scheduler.read_events(&mut dirty).await.expect("read");
        assert!(dirty.is_empty(), "its own changes are not news: {dirty:?}");
        assert_eq!(
            scheduler.log.start(),
            end,
            "the next reads start after its own events, not again before them"
        );
    }
}
