//! The analysis tracker: the operations every frontend offers, on top of a
//! [`RunStore`](crate::RunStore).

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::NaiveDate;
use serde_json::Value;

use crate::change::ChangeSet;
use crate::config::{self, Config, Provenance};
use crate::definition::{Definition, RenderedTask};
use crate::engine::control::{self, ResetScope};
use crate::error::{Error, Result};
use crate::model::{
    Analysis, AnalysisRun, ConfigOwner, Event, EventFilter, Id, NewAnalysis, NewRun, NewRuns,
    NewWorkflow, RunFilter, RunStatus, TaskInstance, Workflow,
};

/// Who users' changes are by, in the event log.
const USER: &str = "cli";
use crate::store::DynRunStore;

/// One run config to launch, with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSource {
    /// The file it was read from, if any; named in errors and stored with the run.
    pub source: Option<String>,
    /// The run's config layer.
    pub config: Value,
}

/// Butler's analysis tracker: registers workflows and analyses, launches runs and explains their
/// configs. Frontends call this; it holds every rule they share.
#[derive(Debug, Clone)]
pub struct Tracker {
    store: Arc<DynRunStore>,
}

impl Tracker {
    /// A tracker over `store`.
    pub fn new(store: Arc<DynRunStore>) -> Self {
        Tracker { store }
    }

    /// The store behind the tracker, for reads that need no rule.
    pub fn store(&self) -> &Arc<DynRunStore> {
        &self.store
    }

    /// Registers workflow `name` `version` with its config layer and a validated definition.
    pub async fn create_workflow(
        &self,
        name: &str,
        version: &str,
        config: Value,
        definition: Definition,
    ) -> Result<Workflow> {
        require_text(name, "workflow name", "-n NAME")?;
        require_text(version, "workflow version", "-v VERSION")?;
        config::require_object(&config, "workflow config")?;
        // Compiling every template now rejects a broken definition before anything is stored.
        definition.renderer()?;
        self.store
            .create_workflow(NewWorkflow {
                name: name.to_owned(),
                version: version.to_owned(),
                definition,
                config: Config::new(config),
            })
            .await
    }

    /// Creates analysis `name` starting on `start_date` with its config layer.
    pub async fn create_analysis(
        &self,
        name: &str,
        start_date: NaiveDate,
        config: Value,
    ) -> Result<Analysis> {
        require_text(name, "analysis name", "-n NAME")?;
        config::require_object(&config, "analysis config")?;
        self.store
            .create_analysis(NewAnalysis {
                name: name.to_owned(),
                start_date,
                config: Config::new(config),
            })
            .await
    }

    /// Replaces the config layer of a workflow or an analysis for runs launched from now on.
    pub async fn update_config(&self, owner: ConfigOwner, data: Value) -> Result<Config> {
        let what = match owner {
            ConfigOwner::Workflow(_) => "workflow config",
            ConfigOwner::Analysis(_) => "analysis config",
        };
        config::require_object(&data, what)?;
        let config = Config::new(data);
        self.store.set_config(owner, config.clone()).await?;
        Ok(config)
    }

    /// Launches `workflow_id` for `analysis_id`: one run in state `ready` per run config, all or
    /// none.
    ///
    /// Every run's effective config is merged and every task template rendered against it before
    /// anything is stored, so a config that lacks a key a template needs fails the launch now,
    /// naming the run config, the task and the key.
    pub async fn launch(
        &self,
        workflow_id: Id,
        analysis_id: Id,
        runs: Vec<RunSource>,
        allow_duplicates: bool,
    ) -> Result<Vec<AnalysisRun>> {
        if runs.is_empty() {
            return Err(Error::InvalidInput(
                "nothing to launch: no run configs were given; pass a directory of *.json \
                 files or a JSON file"
                    .into(),
            ));
        }
        let workflow = self.store.get_workflow(workflow_id).await?;
        let analysis = self.store.get_analysis(analysis_id).await?;
        let workflow_config = self.store.get_config(workflow.config_id).await?;
        let analysis_config = self.store.get_config(analysis.config_id).await?;
        let renderer = workflow.definition.renderer()?;

        let mut new_runs = Vec::with_capacity(runs.len());
        for (index, run) in runs.into_iter().enumerate() {
            let source = run
                .source
                .clone()
                .unwrap_or_else(|| format!("run config #{}", index + 1));
            config::require_object(&run.config, &source)?;
            let merged =
                config::merge(&[&workflow_config.data, &analysis_config.data, &run.config]);
            // The real id is not known yet; any id renders the same way for validation.
            renderer
                .render(&config::effective_for_run(merged.clone(), 0))
                .map_err(|e| Error::InvalidInput(format!("{source}: {e}")))?;
            new_runs.push(NewRun {
                run_config: Config::new(run.config),
                merged_config: merged,
                source_file: run.source,
            });
        }
        self.store
            .create_runs(NewRuns {
                workflow_id,
                analysis_id,
                workflow_config_id: workflow_config.id,
                analysis_config_id: analysis_config.id,
                runs: new_runs,
                task_ids: workflow
                    .definition
                    .tasks
                    .iter()
                    .map(|t| t.id.clone())
                    .collect(),
                allow_duplicates,
            })
            .await
    }

    /// The effective config run `run_id` was launched with.
    pub async fn effective_config(&self, run_id: Id) -> Result<Config> {
        let run = self.store.get_run(run_id).await?;
        self.store.get_config(run.effective_config_id).await
    }

    /// For every key of run `run_id`'s effective config, the layer that set it.
    pub async fn explain(&self, run_id: Id) -> Result<Vec<Provenance>> {
        let run = self.store.get_run(run_id).await?;
        let workflow = self.store.get_config(run.workflow_config_id).await?;
        let analysis = self.store.get_config(run.analysis_config_id).await?;
        let own = self.store.get_config(run.run_config_id).await?;
        let effective = self.store.get_config(run.effective_config_id).await?;
        Ok(config::explain(
            &workflow.data,
            &analysis.data,
            &own.data,
            &effective.data,
        ))
    }

    /// The tasks of run `run_id` as its attempts run them: each task's templates rendered
    /// against the run's effective config, in definition order; only task `task` when given.
    pub async fn commands(&self, run_id: Id, task: Option<&str>) -> Result<Vec<RenderedTask>> {
        let run = self.store.get_run(run_id).await?;
        let workflow = self.store.get_workflow(run.workflow_id).await?;
        let effective = self.store.get_config(run.effective_config_id).await?;
        let renderer = workflow.definition.renderer()?;
        match task {
            None => renderer.render(&effective.data),
            Some(task) => match renderer.render_task(task, &effective.data)? {
                Some(rendered) => Ok(vec![rendered]),
                None => Err(Error::not_found(
                    crate::Kind::Task,
                    format!("{task} of run {run_id}"),
                )),
            },
        }
    }

    /// Run `run_id` with its tasks in definition order.
    pub async fn run_with_tasks(&self, run_id: Id) -> Result<(AnalysisRun, Vec<TaskInstance>)> {
        let run = self.store.get_run(run_id).await?;
        let tasks = self.store.list_tasks(&[run_id]).await?;
        Ok((run, tasks))
    }

    /// Every event of run `run_id`, oldest first.
    pub async fn events(&self, run_id: Id) -> Result<Vec<Event>> {
        self.store.get_run(run_id).await?;
        let mut events = Vec::new();
        loop {
            let page = self
                .store
                .list_events(&EventFilter {
                    not_by_suffix: None,
                    run_id: Some(run_id),
                    after: events.last().map_or(0, |e: &Event| e.id),
                    limit: 10_000,
                })
                .await?;
            let done = page.len() < 10_000;
            events.extend(page);
            if done {
                return Ok(events);
            }
        }
    }

    /// Puts finished run `run_id` back to `ready` so the scheduler runs it again: the tasks
    /// that did not succeed, or with [`ResetScope::All`] every task.
    pub async fn reset_run(&self, run_id: Id, scope: ResetScope) -> Result<()> {
        self.reset_run_by(run_id, scope, USER).await
    }

    /// Cancels unfinished run `run_id`: its waiting tasks will not start and its running
    /// attempts are killed at their next heartbeat.
    pub async fn cancel_run(&self, run_id: Id) -> Result<()> {
        self.cancel_run_by(run_id, USER).await
    }

    /// [`Tracker::reset_run`] recorded in the event log as made by `by` (e.g. `api`).
    pub async fn reset_run_by(&self, run_id: Id, scope: ResetScope, by: &str) -> Result<()> {
        self.change_run(run_id, |run, tasks| control::reset(run, tasks, scope, by))
            .await
    }

    /// [`Tracker::cancel_run`] recorded in the event log as made by `by` (e.g. `api`).
    pub async fn cancel_run_by(&self, run_id: Id, by: &str) -> Result<()> {
        self.change_run(run_id, |run, tasks| control::cancel(run, tasks, by))
            .await
    }

    /// Applies the changes `build` makes from the run as stored, again if the engine moved the
    /// run in between.
    async fn change_run(
        &self,
        run_id: Id,
        build: impl Fn(&AnalysisRun, &[TaskInstance]) -> Result<ChangeSet>,
    ) -> Result<()> {
        for _ in 0..20 {
            let (run, tasks) = self.run_with_tasks(run_id).await?;
            let changes = build(&run, &tasks)?;
            if self.store.apply(vec![changes]).await?.first() == Some(&true) {
                return Ok(());
            }
        }
        Err(Error::Conflict(format!(
            "run {run_id} kept changing while it was being updated; try again"
        )))
    }

    /// How many runs of analysis `analysis_id` are in each state; every state is present.
    pub async fn run_counts(&self, analysis_id: Id) -> Result<BTreeMap<RunStatus, u64>> {
        self.count_runs(None, Some(analysis_id)).await
    }

    /// How many runs of workflow `workflow_id` and analysis `analysis_id` (each optional; all
    /// runs when neither is given) are in each state; every state is present. A workflow or
    /// analysis that does not exist is [`Error::NotFound`].
    pub async fn count_runs(
        &self,
        workflow_id: Option<Id>,
        analysis_id: Option<Id>,
    ) -> Result<BTreeMap<RunStatus, u64>> {
        let filter = RunFilter {
            workflow_id,
            analysis_id,
            ..RunFilter::default()
        };
        let mut counts = self.store.count_runs(&filter).await?;
        for status in RunStatus::ALL {
            counts.entry(status).or_insert(0);
        }
        Ok(counts)
    }
}

fn require_text(value: &str, what: &str, flag: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(Error::InvalidInput(format!(
            "the {what} is empty; give one with {flag}"
        )));
    }
    Ok(())
}
