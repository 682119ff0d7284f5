//! The watcher: reads the store beside the scheduler and decides which alerts to send.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Alert, DeliveryOptions, DeliveryStats, DynNotifier, Outbox, Routes, WorkflowCounts};
use crate::engine::{EngineOptions, LOST_AFTER_HEARTBEATS, SCHEDULER_ROLE, process_name};
use crate::error::Result;
use crate::follow::LogCursor;
use crate::model::{AnalysisRun, EventFilter, Id, RunFilter, RunStatus, Workflow};
use crate::store::DynRunStore;

const EVENT_PAGE: u32 = 10_000;
const RUN_PAGE: u32 = 10_000;
/// Runs whose ids are at most this far apart are read in one range.
const RUN_GAP: Id = 1_000;
/// How long [`WatcherHandle::stop`] lets queued alerts go out before abandoning them.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How a [`Watcher`] runs.
#[derive(Debug, Clone)]
pub struct WatcherOptions {
    /// How often it reads the event log for failed and finished runs.
    pub poll: Duration,
    /// How often it looks for overdue runs and lost workers.
    pub check_every: Duration,
    /// A worker silent this long is lost.
    pub lost_after: Duration,
    /// Send only while a scheduler of this process (`HOST/PID`, as
    /// [`process_name`] gives it) holds the scheduler's lease, so that of several schedulers
    /// sharing a store only the leader sends; `None` sends always.
    pub leader: Option<String>,
    /// How alerts are delivered.
    pub delivery: DeliveryOptions,
}

impl WatcherOptions {
    /// Options for a watcher in this process, calling a worker lost after `lost_after`.
    pub fn new(lost_after: Duration) -> Self {
        WatcherOptions {
            poll: Duration::from_secs(2),
            check_every: Duration::from_secs(15),
            lost_after,
            leader: Some(process_name()),
            delivery: DeliveryOptions::default(),
        }
    }

    /// Options for a watcher beside the engine run with `engine`: a worker is lost after
    /// [`LOST_AFTER_HEARTBEATS`] of its heartbeats.
    pub fn for_engine(engine: &EngineOptions) -> Self {
        WatcherOptions::new(engine.worker_heartbeat * LOST_AFTER_HEARTBEATS)
    }
}

/// An alert and the notifiers it goes to.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatch {
    /// The alert.
    pub alert: Alert,
    /// The names of the notifiers to deliver it to.
    pub to: Vec<String>,
}

/// Watches the store and decides which alerts to send.
///
/// Each alert is decided once: a failed run once per failure (a run reset and failing again
/// is a new failure), an overdue run once per start, a lost worker once per silence. Only what
/// happens while the watcher watches is alerted: a new watcher (after a restart) starts at the
/// newest event and leaves alone runs that were already overdue and workers already lost, so
/// it never repeats an alert its predecessor sent; the price is that what happened while no
/// watcher ran is not alerted.
///
/// [`Watcher::check`] makes the decisions (tests call it with a chosen time);
/// [`Watcher::start`] runs it on the current tokio runtime and delivers.
#[derive(Debug)]
pub struct Watcher {
    store: Arc<DynRunStore>,
    routes: Routes,
    options: WatcherOptions,
    /// When it began watching.
    started: DateTime<Utc>,
    /// Where it is in the event log.
    log: LogCursor,
    workflows: HashMap<Id, Arc<Workflow>>,
    analyses: HashMap<Id, String>,
    /// Runs decided overdue, with the start they were overdue from.
    overdue: HashMap<Id, DateTime<Utc>>,
    /// Workers decided lost, with the heartbeat they were lost after.
    lost: HashMap<String, DateTime<Utc>>,
    next_check: DateTime<Utc>,
    report_since: DateTime<Utc>,
    /// Runs completed and failed since `report_since`, per workflow.
    finished: HashMap<Id, (u64, u64)>,
    /// Alerts decided but not handed out yet (a later step of their check failed).
    pending: Vec<Dispatch>,
}

impl Watcher {
    /// A watcher of `store` that sends along `routes`, starting at the store's newest event.
    pub async fn new(
        store: Arc<DynRunStore>,
        routes: Routes,
        options: WatcherOptions,
    ) -> Result<Watcher> {
        let log = LogCursor::new(
            store.last_event_id().await?,
            store.events_visible_in_id_order(),
        );
        let now = Utc::now();
        Ok(Watcher {
            store,
            routes,
            options,
            started: now,
            log,
            workflows: HashMap::new(),
            analyses: HashMap::new(),
            overdue: HashMap::new(),
            lost: HashMap::new(),
            next_check: now,
            report_since: now,
            finished: HashMap::new(),
            pending: Vec::new(),
        })
    }

    /// When it began watching.
    pub fn started(&self) -> DateTime<Utc> {
        self.started
    }

    /// The alerts due at `now`, each decided once: runs that failed since the last check,
    /// runs overdue and workers lost (every [`WatcherOptions::check_every`]), and the report
    /// when its period has passed. Alerts no notifier is routed to are left out.
    ///
    /// On an error, what the failed step would have decided is left undecided, so the next
    /// check decides it again, and what the steps before it decided is kept for the next check
    /// to return.
    pub async fn check(&mut self, now: DateTime<Utc>) -> Result<Vec<Dispatch>> {
        let mut out = std::mem::take(&mut self.pending);
        let result = self.decide(now, &mut out).await;
        match result {
            Ok(()) => Ok(out),
            Err(err) => {
                self.pending = out;
                Err(err)
            }
        }
    }

    async fn decide(&mut self, now: DateTime<Utc>, out: &mut Vec<Dispatch>) -> Result<()> {
        self.read_events(now, out).await?;
        if now >= self.next_check {
            self.find_overdue(now, out).await?;
            self.find_lost(now, out).await?;
            self.next_check = later(now, self.options.check_every);
        }
        if !self.routes.report.is_empty()
            && now >= later(self.report_since, self.routes.report_every)
        {
            let report = self.report(now).await?;
            out.push(Dispatch {
                alert: report,
                to: self.routes.report.clone(),
            });
        }
        Ok(())
    }

    /// Run failures since the last read, and the runs finished for the report.
    async fn read_events(&mut self, now: DateTime<Utc>, out: &mut Vec<Dispatch>) -> Result<()> {
        let mut after = self.log.start();
        let mut fresh = Vec::new();
        loop {
            let events = self
                .store
                .list_events(&EventFilter {
                    not_by_suffix: None,
                    run_id: None,
                    after,
                    limit: EVENT_PAGE,
                })
                .await?;
            let full = events.len() == EVENT_PAGE as usize;
            for event in events {
                after = event.id;
                if self.log.is_new(event.id) {
                    fresh.push(event);
                }
            }
            if !full {
                break;
            }
        }

        let reporting = !self.routes.report.is_empty();
        let mut failed = Vec::new();
        let mut completed = Vec::new();
        for event in fresh.iter().filter(|e| e.task_id.is_none()) {
            match event.to.parse::<RunStatus>() {
                Ok(RunStatus::Error) => failed.push(event),
                Ok(RunStatus::Completed) if reporting => completed.push(event.run_id),
                _ => {}
            }
        }
        let wanted: BTreeSet<Id> = failed
            .iter()
            .map(|e| e.run_id)
            .chain(completed.iter().copied())
            .collect();
        let runs = self.runs_by_id(&wanted).await?;
        let mut alerts = Vec::new();
        for event in &failed {
            let Some(run) = runs.get(&event.run_id) else {
                continue;
            };
            let workflow = self.workflow(run.workflow_id).await?;
            let to = workflow
                .definition
                .notify
                .as_ref()
                .and_then(|n| n.on_failure.clone())
                .unwrap_or_else(|| self.routes.on_failure.clone());
            if to.is_empty() {
                continue;
            }
            let analysis = self.analysis(run.analysis_id).await?;
            // The run may have been reset since; the event keeps the reason it failed with.
            let reason = match (&run.error, run.status) {
                (Some(error), RunStatus::Error) => error.clone(),
                _ => event.reason.clone(),
            };
            let alert = Alert::run_failed(
                run,
                &workflow,
                &analysis,
                &reason,
                now,
                self.routes.dashboard_url.as_deref(),
            );
            alerts.push(Dispatch { alert, to });
        }

        // Everything read; from here on nothing can fail, so the decisions are kept.
        out.extend(alerts);
        if reporting {
            for event in &failed {
                if let Some(run) = runs.get(&event.run_id) {
                    self.finished.entry(run.workflow_id).or_default().1 += 1;
                }
            }
            for id in &completed {
                if let Some(run) = runs.get(id) {
                    self.finished.entry(run.workflow_id).or_default().0 += 1;
                }
            }
        }
        // The log comes in id order: the last id read is where the read ended.
        self.log.finish(after, fresh.iter().map(|e| e.id));
        Ok(())
    }

    /// Runs in progress past their workflow's `expected_duration`.
    async fn find_overdue(&mut self, now: DateTime<Utc>, out: &mut Vec<Dispatch>) -> Result<()> {
        let mut watched = Vec::new();
        for workflow in self.store.list_workflows().await? {
            let workflow = Arc::new(workflow);
            self.workflows.insert(workflow.id, workflow.clone());
            let Some(expected) = workflow.definition.expected_duration else {
                continue;
            };
            let to = workflow
                .definition
                .notify
                .as_ref()
                .and_then(|n| n.on_overdue.clone())
                .unwrap_or_else(|| self.routes.on_overdue.clone());
            if !to.is_empty() {
                watched.push((workflow, expected, to));
            }
        }
        let mut running = HashSet::new();
        let mut decided = Vec::new();
        let mut alerts = Vec::new();
        for (workflow, expected, to) in watched {
            let runs = self
                .all_runs(RunFilter {
                    workflow_id: Some(workflow.id),
                    status: Some(RunStatus::InProgress),
                    ..RunFilter::default()
                })
                .await?;
            for run in runs {
                running.insert(run.id);
                let Some(started) = run.started_at else {
                    continue;
                };
                let due = later(started, expected);
                if due > now || self.overdue.get(&run.id) == Some(&started) {
                    continue;
                }
                decided.push((run.id, started));
                if due <= self.started {
                    // Overdue before this watcher began: its predecessor's to tell.
                    continue;
                }
                let analysis = self.analysis(run.analysis_id).await?;
                let running_for = (now - started).to_std().unwrap_or_default();
                let alert = Alert::run_overdue(
                    &run,
                    &workflow,
                    &analysis,
                    running_for,
                    expected,
                    now,
                    self.routes.dashboard_url.as_deref(),
                );
                alerts.push(Dispatch {
                    alert,
                    to: to.clone(),
                });
            }
        }
        out.extend(alerts);
        self.overdue.extend(decided);
        self.overdue.retain(|id, _| running.contains(id));
        Ok(())
    }

    /// Workers whose heartbeats stopped.
    async fn find_lost(&mut self, now: DateTime<Utc>, out: &mut Vec<Dispatch>) -> Result<()> {
        let workers = self.store.list_workers().await?;
        let lost_after = self.options.lost_after;
        let listed: HashSet<&str> = workers.iter().map(|w| w.name.as_str()).collect();
        self.lost.retain(|name, _| listed.contains(name.as_str()));
        for worker in &workers {
            if !worker.is_lost(now, lost_after) {
                // Alive (again): a later silence is a new loss.
                self.lost.remove(&worker.name);
                continue;
            }
            if self.lost.get(&worker.name) == Some(&worker.heartbeat_at) {
                continue;
            }
            self.lost.insert(worker.name.clone(), worker.heartbeat_at);
            let lost_at = later(worker.heartbeat_at, lost_after);
            if lost_at <= self.started || self.routes.on_worker_lost.is_empty() {
                continue;
            }
            out.push(Dispatch {
                alert: Alert::worker_lost(worker, lost_after, now),
                to: self.routes.on_worker_lost.clone(),
            });
        }
        Ok(())
    }

    /// The report of the period ending `now`; starts the next period.
    async fn report(&mut self, now: DateTime<Utc>) -> Result<Alert> {
        let mut running: HashMap<Id, u64> = HashMap::new();
        for status in [RunStatus::Scheduled, RunStatus::InProgress] {
            let runs = self
                .all_runs(RunFilter {
                    status: Some(status),
                    ..RunFilter::default()
                })
                .await?;
            for run in runs {
                *running.entry(run.workflow_id).or_default() += 1;
            }
        }
        let ids: BTreeSet<Id> = running
            .keys()
            .chain(self.finished.keys())
            .copied()
            .collect();
        let mut counts = Vec::new();
        for id in ids {
            let workflow = self.workflow(id).await?;
            let (completed, failed) = self.finished.get(&id).copied().unwrap_or_default();
            counts.push(WorkflowCounts {
                workflow: workflow.name.clone(),
                version: workflow.version.clone(),
                completed,
                failed,
                running: running.get(&id).copied().unwrap_or_default(),
            });
        }
        let alert = Alert::report(self.report_since, now, counts);
        self.finished.clear();
        self.report_since = now;
        Ok(alert)
    }

    async fn workflow(&mut self, id: Id) -> Result<Arc<Workflow>> {
        if let Some(workflow) = self.workflows.get(&id) {
            return Ok(workflow.clone());
        }
        let workflow = Arc::new(self.store.get_workflow(id).await?);
        self.workflows.insert(id, workflow.clone());
        Ok(workflow)
    }

    async fn analysis(&mut self, id: Id) -> Result<String> {
        if let Some(name) = self.analyses.get(&id) {
            return Ok(name.clone());
        }
        let name = self.store.get_analysis(id).await?.name;
        self.analyses.insert(id, name.clone());
        Ok(name)
    }

    /// Every run matching `filter`, read in pages.
    async fn all_runs(&self, mut filter: RunFilter) -> Result<Vec<AnalysisRun>> {
        let mut all = Vec::new();
        filter.limit = Some(RUN_PAGE);
        loop {
            let page = self.store.list_runs(&filter).await?;
            let full = page.len() == RUN_PAGE as usize;
            filter.after_id = page.last().map(|run| run.id).or(filter.after_id);
            all.extend(page);
            if !full {
                return Ok(all);
            }
        }
    }

    /// The runs with these ids (those that exist), read a range of ids at a time: the runs
    /// that finish together were mostly launched together.
    async fn runs_by_id(&self, ids: &BTreeSet<Id>) -> Result<HashMap<Id, AnalysisRun>> {
        let ids: Vec<Id> = ids.iter().copied().collect();
        let mut found = HashMap::new();
        let mut first = 0;
        while first < ids.len() {
            let mut last = first;
            while last + 1 < ids.len() && ids[last + 1] - ids[last] <= RUN_GAP {
                last += 1;
            }
            let cluster = &ids[first..=last];
            let end = ids[last];
            let mut after = ids[first] - 1;
            while after < end {
                let span = u32::try_from(end - after).unwrap_or(RUN_PAGE).min(RUN_PAGE);
                let page = self
                    .store
                    .list_runs(&RunFilter {
                        after_id: Some(after),
                        limit: Some(span),
                        ..RunFilter::default()
                    })
                    .await?;
                let Some(last_run) = page.last() else {
                    break;
                };
                after = last_run.id;
                for run in page {
                    if cluster.binary_search(&run.id).is_ok() {
                        found.insert(run.id, run);
                    }
                }
            }
            first = last + 1;
        }
        Ok(found)
    }

    /// Whether this process may send: its scheduler holds the scheduler's lease (or the
    /// options ask for no such check).
    async fn leads(&self, now: DateTime<Utc>) -> bool {
        let Some(process) = &self.options.leader else {
            return true;
        };
        match self.store.leader(SCHEDULER_ROLE).await {
            Ok(Some(lease)) => {
                let holder = lease
                    .holder
                    .rsplit_once(" #")
                    .map_or(lease.holder.as_str(), |(process, _)| process);
                lease.is_held(now) && holder == process
            }
            Ok(None) => false,
            Err(err) => {
                warn!(error = %err, "cannot tell which scheduler leads; holding alerts back");
                false
            }
        }
    }

    /// Starts watching on the current tokio runtime, delivering to `notifiers` (by name) with
    /// one delivery task each.
    pub fn start(self, notifiers: BTreeMap<String, Arc<DynNotifier>>) -> WatcherHandle {
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        let mut outboxes = BTreeMap::new();
        let mut deliveries = Vec::new();
        let mut stats = BTreeMap::new();
        for (name, notifier) in notifiers {
            let (outbox, task) = Outbox::spawn(
                &name,
                notifier,
                self.options.delivery.clone(),
                abort.clone(),
            );
            stats.insert(name.clone(), outbox.stats().clone());
            outboxes.insert(name, outbox);
            deliveries.push(task);
        }
        let task = tokio::spawn(self.run(outboxes, stop.clone()));
        WatcherHandle {
            stop,
            abort,
            task,
            deliveries,
            stats,
        }
    }

    async fn run(mut self, outboxes: BTreeMap<String, Outbox>, stop: CancellationToken) {
        let mut warned: HashSet<String> = HashSet::new();
        match self.store.list_workflows().await {
            Ok(workflows) => {
                for workflow in workflows {
                    for (key, name) in workflow.definition.notify.iter().flat_map(|n| n.names()) {
                        if !outboxes.contains_key(name) {
                            warn_undeclared(
                                &mut warned,
                                &workflow.name,
                                &workflow.version,
                                key,
                                name,
                            );
                        }
                    }
                }
            }
            Err(err) => warn!(error = %err, "cannot list the workflows to check their notifiers"),
        }
        info!(
            notifiers = %outboxes.keys().cloned().collect::<Vec<_>>().join(", "),
            "watching runs and workers for alerts"
        );
        let mut failing = false;
        loop {
            let now = Utc::now();
            match self.check(now).await {
                Ok(dispatches) => {
                    if failing {
                        info!("the alert watcher reads the store again");
                        failing = false;
                    }
                    if !dispatches.is_empty() {
                        if self.leads(now).await {
                            for dispatch in dispatches {
                                send(dispatch, &outboxes, &mut warned);
                            }
                        } else {
                            debug!(
                                alerts = dispatches.len(),
                                "another process's scheduler leads; it sends these alerts"
                            );
                        }
                    }
                }
                Err(err) => {
                    if !failing {
                        warn!(error = %err, "the alert watcher cannot read the store; trying again");
                    }
                    failing = true;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.options.poll) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Hands `dispatch` to its notifiers' outboxes, never waiting.
fn send(dispatch: Dispatch, outboxes: &BTreeMap<String, Outbox>, warned: &mut HashSet<String>) {
    let alert = Arc::new(dispatch.alert);
    for name in dispatch.to {
        match outboxes.get(&name) {
            Some(outbox) => {
                outbox.offer(alert.clone());
            }
            None => warn_undeclared(
                warned,
                alert.workflow.as_deref().unwrap_or("?"),
                alert.workflow_version.as_deref().unwrap_or("?"),
                "notify",
                &name,
            ),
        }
    }
}

fn warn_undeclared(
    warned: &mut HashSet<String>,
    workflow: &str,
    version: &str,
    key: &str,
    name: &str,
) {
    if warned.insert(format!("{workflow}\0{version}\0{name}")) {
        warn!(
            workflow = %format!("{workflow} {version}"),
            notifier = %name,
            "workflow {workflow} {version} names notifier `{name}` in `[notify] {key}`, which the \
             notify config does not declare, so its alerts do not go there; add a \
             [notifiers.{name}] table to the notify config"
        );
    }
}

/// A running [`Watcher`] and its delivery tasks.
#[derive(Debug)]
pub struct WatcherHandle {
    stop: CancellationToken,
    abort: CancellationToken,
    task: JoinHandle<()>,
    deliveries: Vec<JoinHandle<()>>,
    stats: BTreeMap<String, Arc<DeliveryStats>>,
}

impl WatcherHandle {
    /// What became of the alerts given to the notifier called `name`.
    pub fn stats(&self, name: &str) -> Option<&Arc<DeliveryStats>> {
        self.stats.get(name)
    }

    /// Stops watching; alerts already queued get a few seconds to go out, then are abandoned.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(err) = self.task.await {
            warn!(error = %err, "the alert watcher ended abnormally");
        }
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        for mut task in self.deliveries {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                self.abort.cancel();
                let _ = task.await;
            }
        }
    }
}

/// `duration` after `at`, or the end of time when that is past it.
fn later(at: DateTime<Utc>, duration: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(duration)
        .ok()
        .and_then(|duration| at.checked_add_signed(duration))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests;
