//! The [`RunStore`] trait: Butler's durable tracker.

use std::collections::BTreeMap;
use std::fmt::Debug;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::change::ChangeSet;
use crate::config::Config;
use crate::error::Result;
use crate::model::{
    Analysis, AnalysisRun, ConfigOwner, Event, EventFilter, Id, NewAnalysis, NewRuns, NewWorkflow,
    RunFilter, RunStatus, TaskInstance, Workflow,
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

    /// The runs matching `filter`, ordered by id.
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<AnalysisRun>>;

    /// How many runs of the analysis are in each state; states with no run are absent.
    async fn count_runs(&self, analysis_id: Id) -> Result<BTreeMap<RunStatus, u64>>;

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
}
