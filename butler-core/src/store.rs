//! The [`RunStore`] trait: Butler's durable tracker.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::watch;
use uuid::Uuid;

use crate::change::ChangeSet;
use crate::config::Config;
use crate::error::Result;
use crate::model::{
    Analysis, AnalysisRun, ApiToken, ConfigOwner, Event, EventFilter, Id, NewAnalysis, NewRuns,
    NewToken, NewWorkflow, RoleLease, RunFilter, RunStatus, TaskInstance, TaskState, WorkerInfo,
    Workflow,
};

/// A run store shared across tasks and threads.
pub type DynRunStore = dyn RunStore;

/// The durable tracker of workflows, analyses, configs and analysis runs.
///
/// # Contract
///
/// Every implementation guarantees:
///
/// - **Atomic writes.** Each method that writes either applies all of its change or none of it;
///   [`RunStore::create_runs`] creates every run of the launch or none.
/// - **Identity.** `(name, version)` of a workflow is unique: a second
///   [`RunStore::create_workflow`] with the same pair fails with
///   [`Error::AlreadyExists`](crate::Error::AlreadyExists) and stores nothing.
/// - **Referential integrity.** A run names an existing workflow and analysis; a write that
///   names a missing one fails with [`Error::NotFound`](crate::Error::NotFound).
/// - **Immutable configs.** A stored [`Config`] never changes; updating a workflow's or an
///   analysis's config stores a new config and points the owner at it, so runs launched earlier
///   keep the layers they were launched with.
/// - **Ids** of workflows, analyses and runs are positive and increase in creation order.
/// - **Reads see every committed write**, including those of other processes sharing the store.
/// - **Workers are unique by name.** [`RunStore::heartbeat_worker`] inserts or replaces the
///   worker of that name, whole; [`RunStore::list_workers`] lists every recorded worker, alive
///   or not, until [`RunStore::forget_worker`] removes it.
/// - **A role has at most one holder at a time.** [`RunStore::try_lead`] is one
///   compare-and-set: of any number of callers racing for a free or expired role, across
///   processes and hosts, exactly one wins it, and nobody takes a role whose lease is in
///   force from its holder. Lease ends are measured on one clock per store (the database's,
///   or the process's for an embedded store), so holders on hosts with skewed clocks still
///   take turns.
#[async_trait]
pub trait RunStore: Send + Sync + Debug + 'static {
    /// Registers a workflow and its config layer.
    async fn create_workflow(&self, new: NewWorkflow) -> Result<Workflow>;

    /// The workflow with this id.
    async fn get_workflow(&self, id: Id) -> Result<Workflow>;

    /// Every workflow, ordered by id.
    async fn list_workflows(&self) -> Result<Vec<Workflow>>;

    /// Creates an analysis and its config layer.
    async fn create_analysis(&self, new: NewAnalysis) -> Result<Analysis>;

    /// The analysis with this id.
    async fn get_analysis(&self, id: Id) -> Result<Analysis>;

    /// Every analysis, ordered by id.
    async fn list_analyses(&self) -> Result<Vec<Analysis>>;

    /// Stores `config` and makes it the owner's config layer for runs launched from now on.
    async fn set_config(&self, owner: ConfigOwner, config: Config) -> Result<()>;

    /// The stored config with this id.
    async fn get_config(&self, id: Uuid) -> Result<Config>;

    /// The stored configs with these ids, in any order; ids not stored are left out. One read
    /// for a batch of attempts.
    async fn get_configs(&self, ids: &[Uuid]) -> Result<Vec<Config>>;

    /// Creates the runs of one launch in state `ready`, in order, all or none, each with one
    /// `pending` task per id of `task_ids` (in that order).
    ///
    /// Each run's effective config is its `merged_config` with the new run's id injected by
    /// [`crate::config::effective_for_run`]. Unless `allow_duplicates` is set, a run whose run
    /// config has the sha256 of a run config already launched for the same workflow and analysis
    /// (or of an earlier run in the same batch) fails the whole launch with
    /// [`Error::Conflict`](crate::Error::Conflict) built by
    /// [`Error::duplicate_runs`](crate::Error::duplicate_runs).
    async fn create_runs(&self, runs: NewRuns) -> Result<Vec<AnalysisRun>>;

    /// The run with this id.
    async fn get_run(&self, id: Id) -> Result<AnalysisRun>;

    /// The runs matching `filter`, ordered by id (descending with `newest_first`).
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<AnalysisRun>>;

    /// How many runs of the filter's workflow and analysis (all runs when neither is given)
    /// are in each state; states with no run are absent. The filter's other fields are
    /// ignored. A workflow or analysis that does not exist is
    /// [`Error::NotFound`](crate::Error::NotFound).
    async fn count_runs(&self, filter: &RunFilter) -> Result<BTreeMap<RunStatus, u64>>;

    /// How many tasks of unfinished runs (ready, scheduled or in progress) are in each state;
    /// states with no task are absent. Cheap with many finished runs in the store.
    async fn count_active_tasks(&self) -> Result<BTreeMap<TaskState, u64>>;

    /// Applies change sets in one transaction (group commit): each set is applied entirely if
    /// every compare-and-set in it holds, or not at all; the answer says which sets applied.
    ///
    /// A [`Change::Task`](crate::change::Change::Task) replaces the task's row if its state, attempt number and token are
    /// still those of `expect`; a [`Change::Run`](crate::change::Change::Run) moves the run if its status is still `expect`
    /// (a `None` `started_at` keeps the stored one; moving to `ready` clears `started_at`,
    /// `ended_at` and `error`); a [`Change::Lease`](crate::change::Change::Lease) sets `lease_until` if the task is `running`
    /// with that token. Task and run changes append one [`Event`] each (from → to, by, reason);
    /// lease changes append none. Only sets that applied leave events.
    async fn apply(&self, sets: Vec<ChangeSet>) -> Result<Vec<bool>>;

    /// The tasks of these runs, each run's tasks in definition order, runs in id order.
    async fn list_tasks(&self, run_ids: &[Id]) -> Result<Vec<TaskInstance>>;

    /// Running tasks whose lease ended before `now`, oldest lease first.
    async fn expired_leases(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<TaskInstance>>;

    /// The events matching `filter`, in id order.
    async fn list_events(&self, filter: &EventFilter) -> Result<Vec<Event>>;

    /// The id of the newest event, 0 when there is none.
    async fn last_event_id(&self) -> Result<Id>;

    /// Whether events become visible in id order: once a reader has seen an event, no event
    /// with a smaller id appears later. True where writes commit one at a time (SQLite, the
    /// memory store); a reader following the log by id then needs no look-back over recent
    /// ids. The default, false, is always safe.
    fn events_visible_in_id_order(&self) -> bool {
        false
    }

    /// A signal that changes after runs became `ready` through this store value or its clones
    /// (a launch, a reset) and, where the store can tell, through other processes, so that a
    /// scheduler takes them at once instead of at its next poll. It may also change when no
    /// run became ready, which costs the scheduler one look. `None`, the default, where the
    /// store gives no such signal.
    fn ready_runs_signal(&self) -> Option<watch::Receiver<()>> {
        None
    }

    /// Records `worker` under its name: inserts it, or replaces every field of the worker
    /// recorded under that name.
    async fn heartbeat_worker(&self, worker: &WorkerInfo) -> Result<()>;

    /// Removes the worker recorded under `name` (one that stopped); a name not recorded is not
    /// an error.
    async fn forget_worker(&self, name: &str) -> Result<()>;

    /// Every recorded worker, ordered by name.
    async fn list_workers(&self) -> Result<Vec<WorkerInfo>>;

    /// Takes or renews the lease of `role` for `ttl` from now, if the role is free, its lease
    /// has ended, or `holder` already holds it; answers whether `holder` holds it now.
    ///
    /// A renewal keeps the lease's `since`; a takeover starts a new one. The check and the
    /// write are one atomic step (see the contract above).
    async fn try_lead(&self, role: &str, holder: &str, ttl: Duration) -> Result<bool>;

    /// Ends `holder`'s lease of `role` now, so another holder may take it at once; does
    /// nothing if `holder` does not hold it. The ended lease stays readable through
    /// [`RunStore::leader`].
    async fn resign(&self, role: &str, holder: &str) -> Result<()>;

    /// The lease of `role`, in force or ended; `None` if the role was never taken.
    async fn leader(&self, role: &str) -> Result<Option<RoleLease>>;

    /// Stores an API token; a token of the same name is
    /// [`Error::AlreadyExists`](crate::Error::AlreadyExists).
    async fn create_token(&self, token: NewToken) -> Result<ApiToken>;

    /// The token whose secret hashes to `hash` ([`hash_token`](crate::model::hash_token)),
    /// if any.
    async fn find_token(&self, hash: &str) -> Result<Option<ApiToken>>;

    /// Every token, ordered by name.
    async fn list_tokens(&self) -> Result<Vec<ApiToken>>;

    /// Deletes the token of that name, so its secret stops working at once; a missing name is
    /// [`Error::NotFound`](crate::Error::NotFound).
    async fn delete_token(&self, name: &str) -> Result<()>;
}

/// What a store rings when runs became `ready`, for [`RunStore::ready_runs_signal`].
#[derive(Debug)]
pub struct ReadyRunsBell(watch::Sender<()>);

impl Default for ReadyRunsBell {
    fn default() -> Self {
        Self(watch::channel(()).0)
    }
}

impl ReadyRunsBell {
    /// Tells every subscriber that runs became `ready`.
    pub fn ring(&self) {
        self.0.send_replace(());
    }

    /// Whether one of `sets` moves a run back to `ready`, as a reset does: a store that
    /// applied them rings (a set whose compare-and-set failed makes at most one needless ring).
    pub fn readies_runs(sets: &[ChangeSet]) -> bool {
        sets.iter().flatten().any(|change| {
            matches!(change, crate::change::Change::Run(run) if run.status == RunStatus::Ready)
        })
    }

    /// A receiver that sees the rings from now on.
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.0.subscribe()
    }
}
