//! In-memory run store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::change::{Change, ChangeSet, LeaseChange, RunChange, TaskChange};
use crate::config::{self, Config};
use crate::error::{Error, Kind, Result};
use crate::model::{
    Analysis, AnalysisRun, ApiToken, ConfigOwner, Event, EventFilter, Id, NewAnalysis, NewRuns,
    NewToken, NewWorkflow, RoleLease, RunFilter, RunStatus, TaskInstance, TaskState, WorkerInfo,
    Workflow,
};
use crate::store::{ReadyRunsBell, RunStore};

/// A [`RunStore`] that keeps everything in process memory, for tests and embedding.
///
/// It honours the whole [`RunStore`] contract within one process; its data is gone when it is
/// dropped.
#[derive(Debug, Default)]
pub struct MemoryRunStore {
    inner: Mutex<Inner>,
    ready: ReadyRunsBell,
}

#[derive(Debug, Default)]
struct Inner {
    configs: HashMap<Uuid, Config>,
    /// Workflow `id` is at index `id - 1`.
    workflows: Vec<Workflow>,
    analyses: Vec<Analysis>,
    runs: Vec<AnalysisRun>,
    /// The tasks of run `id` at index `id - 1`, in definition order.
    tasks: Vec<Vec<TaskInstance>>,
    /// Event `id` is at index `id - 1`.
    events: Vec<Event>,
    /// `(workflow, analysis) → run config sha256 → first run with it`: the duplicate index.
    launched: HashMap<(Id, Id), HashMap<String, Id>>,
    /// Workers by name.
    workers: BTreeMap<String, WorkerInfo>,
    /// Role leases by role.
    leases: HashMap<String, RoleLease>,
    /// API tokens by name, with the hash of their secret.
    tokens: BTreeMap<String, (String, ApiToken)>,
}

impl MemoryRunStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave a half-applied write: every write checks first and
        // mutates last, so the data behind a poisoned lock is still whole.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Position of `id` in a vector whose element `id` is at `id - 1`.
fn index_of(id: Id, len: usize) -> Option<usize> {
    let index = usize::try_from(id).ok()?.checked_sub(1)?;
    (index < len).then_some(index)
}

fn next_id(len: usize) -> Id {
    Id::try_from(len).map_or(Id::MAX, |n| n + 1)
}

impl Inner {
    fn workflow(&self, id: Id) -> Result<&Workflow> {
        index_of(id, self.workflows.len())
            .map(|i| &self.workflows[i])
            .ok_or_else(|| Error::not_found(Kind::Workflow, id))
    }

    fn analysis(&self, id: Id) -> Result<&Analysis> {
        index_of(id, self.analyses.len())
            .map(|i| &self.analyses[i])
            .ok_or_else(|| Error::not_found(Kind::Analysis, id))
    }

    fn require_config(&self, id: Uuid) -> Result<()> {
        if self.configs.contains_key(&id) {
            Ok(())
        } else {
            Err(Error::not_found(Kind::Config, id))
        }
    }

    /// Stores `config` unless a config with its id is already stored; stored configs never change.
    fn store_config(&mut self, config: Config) {
        self.configs.entry(config.id).or_insert(config);
    }

    /// Where the task is: the index of its run and its index among the run's tasks.
    fn task_index(&self, run_id: Id, task_id: &str) -> Option<(usize, usize)> {
        let run = index_of(run_id, self.tasks.len())?;
        let task = self.tasks[run].iter().position(|t| t.task_id == task_id)?;
        Some((run, task))
    }

    /// Applies one set: every change or none.
    ///
    /// Changes are applied in order, each seeing the ones before it (a set may move a task
    /// twice), and undone in reverse if a later one fails its compare-and-set.
    fn apply_set(&mut self, set: ChangeSet, at: DateTime<Utc>) -> bool {
        let events = self.events.len();
        let mut undo = Vec::new();
        for change in set {
            if !self.apply_change(change, at, &mut undo) {
                for step in undo.into_iter().rev() {
                    match step {
                        Undo::Task(run, task, old) => self.tasks[run][task] = old,
                        Undo::Run(run, old) => self.runs[run] = old,
                    }
                }
                self.events.truncate(events);
                return false;
            }
        }
        true
    }

    /// Applies one change if its compare-and-set holds, noting how to undo it.
    fn apply_change(&mut self, change: Change, at: DateTime<Utc>, undo: &mut Vec<Undo>) -> bool {
        match change {
            Change::Task(change) => self.apply_task(change, at, undo),
            Change::Run(change) => self.apply_run(change, at, undo),
            Change::Lease(change) => self.apply_lease(change, undo),
        }
    }

    fn apply_task(&mut self, change: TaskChange, at: DateTime<Utc>, undo: &mut Vec<Undo>) -> bool {
        let TaskChange {
            expect,
            new,
            by,
            reason,
        } = change;
        let Some((run, index)) = self.task_index(new.run_id, &new.task_id) else {
            return false;
        };
        let task = &mut self.tasks[run][index];
        if task.state != expect.state
            || task.try_number != expect.try_number
            || task.token != expect.token
        {
            return false;
        }
        let event = Event {
            id: next_id(self.events.len()),
            at,
            run_id: new.run_id,
            task_id: Some(new.task_id.clone()),
            try_number: Some(new.try_number),
            from: expect.state.as_str().to_owned(),
            to: new.state.as_str().to_owned(),
            by,
            reason,
        };
        undo.push(Undo::Task(run, index, std::mem::replace(task, new)));
        self.events.push(event);
        true
    }

    fn apply_run(&mut self, change: RunChange, at: DateTime<Utc>, undo: &mut Vec<Undo>) -> bool {
        let Some(index) = index_of(change.run_id, self.runs.len()) else {
            return false;
        };
        let run = &mut self.runs[index];
        if run.status != change.expect {
            return false;
        }
        undo.push(Undo::Run(index, run.clone()));
        run.status = change.status;
        if change.status == RunStatus::Ready {
            run.error = None;
            run.started_at = None;
            run.ended_at = None;
        } else {
            run.error = change.error;
            run.started_at = change.started_at.or(run.started_at);
            run.ended_at = change.ended_at;
        }
        self.events.push(Event {
            id: next_id(self.events.len()),
            at,
            run_id: change.run_id,
            task_id: None,
            try_number: None,
            from: change.expect.as_str().to_owned(),
            to: change.status.as_str().to_owned(),
            by: change.by,
            reason: change.reason,
        });
        true
    }

    fn apply_lease(&mut self, change: LeaseChange, undo: &mut Vec<Undo>) -> bool {
        let Some((run, index)) = self.task_index(change.run_id, &change.task_id) else {
            return false;
        };
        let task = &mut self.tasks[run][index];
        if task.state != TaskState::Running || task.token != Some(change.token) {
            return false;
        }
        undo.push(Undo::Task(run, index, task.clone()));
        task.lease_until = Some(change.until);
        true
    }
}

/// What a change replaced, to put back when a later change of its set fails.
enum Undo {
    /// The task at `(run index, task index)` was this.
    Task(usize, usize, TaskInstance),
    /// The run at this index was this.
    Run(usize, AnalysisRun),
}

#[async_trait]
impl RunStore for MemoryRunStore {
    async fn create_workflow(&self, new: NewWorkflow) -> Result<Workflow> {
        let mut inner = self.lock();
        if let Some(existing) = inner
            .workflows
            .iter()
            .find(|w| w.name == new.name && w.version == new.version)
        {
            return Err(Error::AlreadyExists(format!(
                "workflow {} version {} already exists (id {}); choose another version",
                new.name, new.version, existing.id
            )));
        }
        let workflow = Workflow {
            id: next_id(inner.workflows.len()),
            name: new.name,
            version: new.version,
            definition: new.definition,
            config_id: new.config.id,
            created_at: Utc::now(),
        };
        inner.store_config(new.config);
        inner.workflows.push(workflow.clone());
        Ok(workflow)
    }

    async fn get_workflow(&self, id: Id) -> Result<Workflow> {
        self.lock().workflow(id).cloned()
    }

    async fn list_workflows(&self) -> Result<Vec<Workflow>> {
        Ok(self.lock().workflows.clone())
    }

    async fn create_analysis(&self, new: NewAnalysis) -> Result<Analysis> {
        let mut inner = self.lock();
        let analysis = Analysis {
            id: next_id(inner.analyses.len()),
            name: new.name,
            start_date: new.start_date,
            config_id: new.config.id,
            created_at: Utc::now(),
        };
        inner.store_config(new.config);
        inner.analyses.push(analysis.clone());
        Ok(analysis)
    }

    async fn get_analysis(&self, id: Id) -> Result<Analysis> {
        self.lock().analysis(id).cloned()
    }

    async fn list_analyses(&self) -> Result<Vec<Analysis>> {
        Ok(self.lock().analyses.clone())
    }

    async fn set_config(&self, owner: ConfigOwner, config: Config) -> Result<()> {
        let mut inner = self.lock();
        let config_id = config.id;
        match owner {
            ConfigOwner::Workflow(id) => {
                let index = index_of(id, inner.workflows.len())
                    .ok_or_else(|| Error::not_found(Kind::Workflow, id))?;
                inner.store_config(config);
                inner.workflows[index].config_id = config_id;
            }
            ConfigOwner::Analysis(id) => {
                let index = index_of(id, inner.analyses.len())
                    .ok_or_else(|| Error::not_found(Kind::Analysis, id))?;
                inner.store_config(config);
                inner.analyses[index].config_id = config_id;
            }
        }
        Ok(())
    }

    async fn get_config(&self, id: Uuid) -> Result<Config> {
        self.lock()
            .configs
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::not_found(Kind::Config, id))
    }

    async fn get_configs(&self, ids: &[Uuid]) -> Result<Vec<Config>> {
        let inner = self.lock();
        Ok(ids
            .iter()
            .filter_map(|id| inner.configs.get(id).cloned())
            .collect())
    }

    async fn create_runs(&self, launch: NewRuns) -> Result<Vec<AnalysisRun>> {
        check_task_ids(&launch.task_ids)?;
        let mut inner = self.lock();
        inner.workflow(launch.workflow_id)?;
        inner.analysis(launch.analysis_id)?;
        inner.require_config(launch.workflow_config_id)?;
        inner.require_config(launch.analysis_config_id)?;

        let key = (launch.workflow_id, launch.analysis_id);
        if !launch.allow_duplicates {
            let launched = inner.launched.get(&key);
            let sources = launch
                .runs
                .iter()
                .enumerate()
                .map(|(i, run)| (source_label(run.source_file.as_deref(), i), run));
            let mut existing = Vec::new();
            let mut in_batch = Vec::new();
            let mut first_in_batch: HashMap<&str, String> = HashMap::new();
            for (source, run) in sources {
                let sha = run.run_config.sha256.as_str();
                if let Some(&run_id) = launched.and_then(|l| l.get(sha)) {
                    existing.push((source, run_id));
                } else if let Some(first) = first_in_batch.get(sha) {
                    in_batch.push((source, first.clone()));
                } else {
                    first_in_batch.insert(sha, source);
                }
            }
            if !existing.is_empty() {
                return Err(Error::duplicate_runs(&existing));
            }
            if !in_batch.is_empty() {
                return Err(duplicates_in_launch(&in_batch));
            }
        }

        let now = Utc::now();
        let mut created = Vec::with_capacity(launch.runs.len());
        for run in launch.runs {
            let id = next_id(inner.runs.len());
            let effective = Config::new(config::effective_for_run(run.merged_config, id));
            let record = AnalysisRun {
                id,
                workflow_id: launch.workflow_id,
                analysis_id: launch.analysis_id,
                status: RunStatus::Ready,
                workflow_config_id: launch.workflow_config_id,
                analysis_config_id: launch.analysis_config_id,
                run_config_id: run.run_config.id,
                effective_config_id: effective.id,
                source_file: run.source_file,
                error: None,
                created_at: now,
                started_at: None,
                ended_at: None,
            };
            inner
                .launched
                .entry(key)
                .or_default()
                .entry(run.run_config.sha256.clone())
                .or_insert(id);
            inner.store_config(run.run_config);
            inner.store_config(effective);
            inner.runs.push(record.clone());
            let tasks = launch
                .task_ids
                .iter()
                .map(|task_id| TaskInstance::pending(id, task_id.as_str()))
                .collect();
            inner.tasks.push(tasks);
            created.push(record);
        }
        drop(inner);
        self.ready.ring();
        Ok(created)
    }

    async fn get_run(&self, id: Id) -> Result<AnalysisRun> {
        let inner = self.lock();
        index_of(id, inner.runs.len())
            .map(|i| inner.runs[i].clone())
            .ok_or_else(|| Error::not_found(Kind::Run, id))
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<AnalysisRun>> {
        let inner = self.lock();
        let limit = filter
            .limit
            .map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
        let matches = |run: &&AnalysisRun| {
            filter.workflow_id.is_none_or(|w| run.workflow_id == w)
                && filter.analysis_id.is_none_or(|a| run.analysis_id == a)
                && filter.status.is_none_or(|s| run.status == s)
        };
        // Run `id` is at index `id - 1`, so keyset paging starts right beside `after_id`.
        let runs: Vec<AnalysisRun> = if filter.newest_first {
            let end = filter
                .after_id
                .map_or(inner.runs.len(), |after| {
                    usize::try_from(after.max(1) - 1).unwrap_or(usize::MAX)
                })
                .min(inner.runs.len());
            inner.runs[..end]
                .iter()
                .rev()
                .filter(matches)
                .take(limit)
                .cloned()
                .collect()
        } else {
            let start = filter
                .after_id
                .map_or(0, |after| {
                    usize::try_from(after.max(0)).unwrap_or(usize::MAX)
                })
                .min(inner.runs.len());
            inner.runs[start..]
                .iter()
                .filter(matches)
                .take(limit)
                .cloned()
                .collect()
        };
        Ok(runs)
    }

    async fn count_runs(&self, filter: &RunFilter) -> Result<BTreeMap<RunStatus, u64>> {
        let inner = self.lock();
        if let Some(id) = filter.workflow_id {
            inner.workflow(id)?;
        }
        if let Some(id) = filter.analysis_id {
            inner.analysis(id)?;
        }
        let mut counts = BTreeMap::new();
        for run in inner.runs.iter().filter(|run| {
            filter.workflow_id.is_none_or(|w| run.workflow_id == w)
                && filter.analysis_id.is_none_or(|a| run.analysis_id == a)
        }) {
            *counts.entry(run.status).or_insert(0) += 1;
        }
        Ok(counts)
    }

    async fn count_active_tasks(&self) -> Result<BTreeMap<TaskState, u64>> {
        let inner = self.lock();
        let mut counts = BTreeMap::new();
        for (run, tasks) in inner.runs.iter().zip(&inner.tasks) {
            if run.status.is_finished() {
                continue;
            }
            for task in tasks {
                *counts.entry(task.state).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    async fn apply(&self, sets: Vec<ChangeSet>) -> Result<Vec<bool>> {
        let readies = ReadyRunsBell::readies_runs(&sets);
        let mut inner = self.lock();
        let at = Utc::now();
        let applied = sets
            .into_iter()
            .map(|set| inner.apply_set(set, at))
            .collect();
        drop(inner);
        if readies {
            self.ready.ring();
        }
        Ok(applied)
    }

    async fn list_tasks(&self, run_ids: &[Id]) -> Result<Vec<TaskInstance>> {
        let mut ids = run_ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let inner = self.lock();
        Ok(ids
            .into_iter()
            .filter_map(|id| index_of(id, inner.tasks.len()))
            .flat_map(|index| inner.tasks[index].iter().cloned())
            .collect())
    }

    async fn expired_leases(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<TaskInstance>> {
        let inner = self.lock();
        let mut expired: Vec<(DateTime<Utc>, &TaskInstance)> = inner
            .tasks
            .iter()
            .flatten()
            .filter(|task| task.state == TaskState::Running)
            .filter_map(|task| {
                task.lease_until
                    .filter(|until| *until < now)
                    .map(|u| (u, task))
            })
            .collect();
        // Stable: tasks with the same lease end stay in run and definition order.
        expired.sort_by_key(|(until, _)| *until);
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        Ok(expired
            .into_iter()
            .take(limit)
            .map(|(_, task)| task.clone())
            .collect())
    }

    async fn list_events(&self, filter: &EventFilter) -> Result<Vec<Event>> {
        let inner = self.lock();
        // Event `id` is at index `id - 1`, so the events after `after` start at index `after`.
        let start = usize::try_from(filter.after.max(0))
            .unwrap_or(usize::MAX)
            .min(inner.events.len());
        let limit = usize::try_from(filter.limit).unwrap_or(usize::MAX);
        Ok(inner.events[start..]
            .iter()
            .filter(|event| filter.run_id.is_none_or(|run| event.run_id == run))
            .filter(|event| {
                filter
                    .not_by_suffix
                    .as_deref()
                    .is_none_or(|suffix| !event.by.ends_with(suffix))
            })
            .take(limit)
            .cloned()
            .collect())
    }

    async fn last_event_id(&self) -> Result<Id> {
        Ok(Id::try_from(self.lock().events.len()).unwrap_or(Id::MAX))
    }

    /// Every change is applied under one lock.
    fn events_visible_in_id_order(&self) -> bool {
        true
    }

    fn ready_runs_signal(&self) -> Option<tokio::sync::watch::Receiver<()>> {
        Some(self.ready.subscribe())
    }

    async fn heartbeat_worker(&self, worker: &WorkerInfo) -> Result<()> {
        self.lock()
            .workers
            .insert(worker.name.clone(), worker.clone());
        Ok(())
    }

    async fn forget_worker(&self, name: &str) -> Result<()> {
        self.lock().workers.remove(name);
        Ok(())
    }

    async fn list_workers(&self) -> Result<Vec<WorkerInfo>> {
        Ok(self.lock().workers.values().cloned().collect())
    }

    async fn try_lead(&self, role: &str, holder: &str, ttl: Duration) -> Result<bool> {
        let now = Utc::now();
        let until = chrono::Duration::from_std(ttl)
            .ok()
            .and_then(|ttl| now.checked_add_signed(ttl))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let mut inner = self.lock();
        match inner.leases.get_mut(role) {
            Some(lease) if lease.holder == holder => lease.until = until,
            Some(lease) if lease.is_held(now) => return Ok(false),
            _ => {
                inner.leases.insert(
                    role.to_owned(),
                    RoleLease {
                        role: role.to_owned(),
                        holder: holder.to_owned(),
                        since: now,
                        until,
                    },
                );
            }
        }
        Ok(true)
    }

    async fn resign(&self, role: &str, holder: &str) -> Result<()> {
        let now = Utc::now();
        if let Some(lease) = self.lock().leases.get_mut(role)
            && lease.holder == holder
            && lease.is_held(now)
        {
            lease.until = now;
        }
        Ok(())
    }

    async fn leader(&self, role: &str) -> Result<Option<RoleLease>> {
        Ok(self.lock().leases.get(role).cloned())
    }

    async fn create_token(&self, token: NewToken) -> Result<ApiToken> {
        let mut inner = self.lock();
        if inner.tokens.contains_key(&token.name) {
            return Err(Error::token_exists(&token.name));
        }
        let stored = ApiToken {
            name: token.name.clone(),
            read_only: token.read_only,
            created_at: Utc::now(),
        };
        inner
            .tokens
            .insert(token.name, (token.hash, stored.clone()));
        Ok(stored)
    }

    async fn find_token(&self, hash: &str) -> Result<Option<ApiToken>> {
        Ok(self
            .lock()
            .tokens
            .values()
            .find(|(stored, _)| stored == hash)
            .map(|(_, token)| token.clone()))
    }

    async fn list_tokens(&self) -> Result<Vec<ApiToken>> {
        Ok(self
            .lock()
            .tokens
            .values()
            .map(|(_, t)| t.clone())
            .collect())
    }

    async fn delete_token(&self, name: &str) -> Result<()> {
        self.lock()
            .tokens
            .remove(name)
            .map(drop)
            .ok_or_else(|| Error::not_found(Kind::Token, name))
    }
}

/// Fails with `InvalidInput` when a launch names a task twice: each run has one task per id.
fn check_task_ids(task_ids: &[String]) -> Result<()> {
    let mut seen = HashSet::new();
    match task_ids.iter().find(|id| !seen.insert(id.as_str())) {
        Some(id) => Err(Error::InvalidInput(format!(
            "the launch names task {id:?} twice; each task of a workflow needs its own id, so \
             fix the workflow definition"
        ))),
        None => Ok(()),
    }
}

/// How a run of a launch is named in messages: its file, or its position in the launch.
fn source_label(source_file: Option<&str>, index: usize) -> String {
    source_file.map_or_else(|| format!("run config #{}", index + 1), str::to_owned)
}

/// The [`Error::Conflict`] of a launch that holds the same run config twice.
fn duplicates_in_launch(pairs: &[(String, String)]) -> Error {
    let lines: Vec<String> = pairs
        .iter()
        .take(20)
        .map(|(source, first)| format!("  {source} has the same run config as {first}"))
        .collect();
    let more = pairs
        .len()
        .checked_sub(20)
        .filter(|&n| n > 0)
        .map(|n| format!("\n  … and {n} more"))
        .unwrap_or_default();
    Error::Conflict(format!(
        "{} run config(s) of this launch repeat an earlier one of the same launch; no run was \
         created:\n{}{more}\nRemove the repeated files, or pass --allow-duplicates to launch them \
         all.",
        pairs.len(),
        lines.join("\n")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "testing")]
    #[tokio::test]
    async fn passes_the_store_conformance_suite() {
        crate::testing::store::run_all(&MemoryRunStore::new()).await;
    }

    #[tokio::test]
    async fn a_new_store_has_no_events() {
        let store = MemoryRunStore::new();
        assert_eq!(store.last_event_id().await.expect("last"), 0);
        let filter = EventFilter {
            not_by_suffix: None,
            run_id: None,
            after: 0,
            limit: 10,
        };
        assert!(store.list_events(&filter).await.expect("list").is_empty());
        assert!(store.list_tasks(&[1, 2]).await.expect("tasks").is_empty());
    }

    #[test]
    fn check_task_ids_names_the_repeated_task() {
        assert!(check_task_ids(&["a".into(), "b".into()]).is_ok());
        let err = check_task_ids(&["a".into(), "b".into(), "a".into()])
            .expect_err("a repeated id")
            .to_string();
        assert!(err.contains("\"a\" twice"), "{err}");
    }

    #[test]
    fn index_of_rejects_ids_outside_the_vector() {
        assert_eq!(index_of(1, 3), Some(0));
        assert_eq!(index_of(3, 3), Some(2));
        assert_eq!(index_of(4, 3), None);
        assert_eq!(index_of(0, 3), None);
        assert_eq!(index_of(-5, 3), None);
    }

    #[test]
    fn duplicates_in_launch_names_both_sources() {
        let err = duplicates_in_launch(&[("b.json".into(), "a.json".into())]).to_string();
        assert!(
            err.contains("b.json has the same run config as a.json"),
            "{err}"
        );
        assert!(err.contains("--allow-duplicates"), "{err}");
    }
}
