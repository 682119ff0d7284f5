//! `/api/runs` and `/api/launch`: launch runs, page through them, count them, and show, reset
//! or cancel one with its tasks, events and config.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use butler_core::config::Layer;
use butler_core::engine::control::ResetScope;
use butler_core::model::{self, AnalysisRun, EventFilter, Id, RunFilter, RunStatus, TaskState};
use butler_core::tracker::RunSource;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::{IntoParams, PartialSchema, ToSchema};
use uuid::Uuid;

use super::ErrorBody;
use super::extract::{
    Body, OptionalBody, Params, PathParams, id_param, newest_first_param, number_param,
    optional_number, path_id, status_param,
};
use crate::server::ApiError;
use crate::server::auth::CanWrite;
use crate::server::state::AppState;

/// Runs per page when `limit` is not given.
const DEFAULT_LIMIT: u64 = 50;
/// The most runs one page may hold.
const MAX_LIMIT: u64 = 1000;
/// Who resets and cancels through the API, in the event log.
const BY: &str = "api";
/// Events per answer when `limit` is not given.
const DEFAULT_EVENTS: u64 = 1000;
/// The most events one answer may hold.
const MAX_EVENTS: u64 = 10_000;

/// An analysis run: one run of a workflow for an analysis (one sample, one article).
#[derive(Debug, Serialize, ToSchema)]
pub struct Run {
    /// Its id; ids increase in launch order.
    #[schema(example = 42)]
    pub id: i64,
    /// The workflow it runs.
    pub workflow_id: i64,
    /// The analysis it belongs to.
    pub analysis_id: i64,
    /// Its state.
    #[schema(schema_with = run_status_schema)]
    pub status: RunStatus,
    /// The workflow's config layer at launch.
    pub workflow_config_id: Uuid,
    /// The analysis's config layer at launch.
    pub analysis_config_id: Uuid,
    /// The run's own config layer.
    pub run_config_id: Uuid,
    /// The effective config it executes with (see `/api/runs/{id}/config`).
    pub effective_config_id: Uuid,
    /// The file its run config was read from, when launched from files.
    pub source_file: Option<String>,
    /// Why it ended in `error`, when it did.
    pub error: Option<String>,
    /// When it was launched.
    pub created_at: DateTime<Utc>,
    /// When its first task started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub ended_at: Option<DateTime<Utc>>,
}

impl From<AnalysisRun> for Run {
    fn from(run: AnalysisRun) -> Self {
        Run {
            id: run.id,
            workflow_id: run.workflow_id,
            analysis_id: run.analysis_id,
            status: run.status,
            workflow_config_id: run.workflow_config_id,
            analysis_config_id: run.analysis_config_id,
            run_config_id: run.run_config_id,
            effective_config_id: run.effective_config_id,
            source_file: run.source_file,
            error: run.error,
            created_at: run.created_at,
            started_at: run.started_at,
            ended_at: run.ended_at,
        }
    }
}

/// One task of a run.
#[derive(Debug, Serialize, ToSchema)]
pub struct Task {
    /// The run it belongs to.
    pub run_id: i64,
    /// Its id in the workflow definition.
    #[schema(example = "align")]
    pub task_id: String,
    /// Its state.
    #[schema(schema_with = task_state_schema)]
    pub state: TaskState,
    /// The number of its current or last attempt; 0 before the first.
    pub try_number: u32,
    /// The latest attempt that started, 0 if none did: the attempt whose log to show.
    pub last_started_try: u32,
    /// Attempts that failed through the task's own fault.
    pub failures: u32,
    /// The worker that runs or ran the current attempt.
    pub worker: Option<String>,
    /// When it was last queued.
    pub queued_at: Option<DateTime<Utc>>,
    /// When its first attempt started.
    pub first_started_at: Option<DateTime<Utc>>,
    /// When its current or last attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When its last attempt ended.
    pub ended_at: Option<DateTime<Utc>>,
    /// When a retry is due (`up_for_retry`).
    pub next_try_at: Option<DateTime<Utc>>,
    /// When the running attempt's lease ends unless its worker reports.
    pub lease_until: Option<DateTime<Utc>>,
    /// The exit code of the last attempt.
    pub exit_code: Option<i32>,
    /// Why the last attempt failed.
    pub error: Option<String>,
}

impl From<model::TaskInstance> for Task {
    fn from(task: model::TaskInstance) -> Self {
        Task {
            last_started_try: task.last_started_try(),
            run_id: task.run_id,
            task_id: task.task_id,
            state: task.state,
            try_number: task.try_number,
            failures: task.failures,
            worker: task.worker,
            queued_at: task.queued_at,
            first_started_at: task.first_started_at,
            started_at: task.started_at,
            ended_at: task.ended_at,
            next_try_at: task.next_try_at,
            lease_until: task.lease_until,
            exit_code: task.exit_code,
            error: task.error,
        }
    }
}

/// One entry of a run's event log: a change of the run's status or of a task's state.
#[derive(Debug, Serialize, ToSchema)]
pub struct Event {
    /// Its position in the log; pass the last one as `after` for the next page.
    pub id: i64,
    /// When the change was committed.
    pub at: DateTime<Utc>,
    /// The run concerned.
    pub run_id: i64,
    /// The task concerned; null for a change of the run's own status.
    pub task_id: Option<String>,
    /// The task's attempt, for task changes.
    pub try_number: Option<u32>,
    /// The state before.
    pub from: String,
    /// The state after.
    pub to: String,
    /// Who made the change: `scheduler`, `worker HOST/PID`, `cli`.
    pub by: String,
    /// Why.
    pub reason: String,
}

impl From<model::Event> for Event {
    fn from(event: model::Event) -> Self {
        Event {
            id: event.id,
            at: event.at,
            run_id: event.run_id,
            task_id: event.task_id,
            try_number: event.try_number,
            from: event.from,
            to: event.to,
            by: event.by,
            reason: event.reason,
        }
    }
}

/// One page of runs.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunPage {
    /// The runs, in the order asked for.
    pub runs: Vec<Run>,
    /// The `after` of the next page; null on the last page.
    pub next: Option<i64>,
}

/// A run with its tasks.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunDetail {
    /// The run.
    pub run: Run,
    /// Its tasks, in definition order.
    pub tasks: Vec<Task>,
}

/// How many runs are in each state, and in all; every state is present.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct RunCounts(Map<String, Value>);

impl PartialSchema for RunCounts {
    fn schema() -> RefOr<Schema> {
        let names = RunStatus::ALL.iter().map(|s| s.as_str()).chain(["total"]);
        let mut object = ObjectBuilder::new().description(Some(
            "How many runs are in each state (every state is present), and `total`",
        ));
        for name in names {
            object = object
                .property(
                    name,
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(0)),
                )
                .required(name);
        }
        Schema::Object(object.build()).into()
    }
}

impl ToSchema for RunCounts {}

/// The effective config of a run, with the layer that set each key.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunConfig {
    /// The stored config's id.
    pub id: Uuid,
    /// Hex sha256 of its canonical form.
    pub sha256: String,
    /// The effective config: workflow < analysis < run, merged, with `analysis_run_id`.
    #[schema(value_type = Object)]
    pub data: Value,
    /// Every leaf of `data`, in its key order, with the layer that set it.
    pub provenance: Vec<ConfigKey>,
}

/// Where one leaf of an effective config comes from.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigKey {
    /// The keys leading to the leaf, joined with `.`.
    #[schema(example = "tools.bwa.threads")]
    pub key: String,
    /// The layer that set it: `workflow`, `analysis`, `run`, or `butler` for `analysis_run_id`.
    #[schema(value_type = String, example = "analysis")]
    pub layer: Layer,
    /// Its value.
    #[schema(value_type = Object)]
    pub value: Value,
}

/// Runs to launch.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LaunchRequest {
    /// The workflow to run.
    pub workflow: i64,
    /// The analysis the runs belong to.
    pub analysis: i64,
    /// One run config (a JSON object) per run, in launch order.
    #[schema(value_type = Vec<Object>)]
    pub runs: Vec<Value>,
    /// Launch run configs already launched for this workflow and analysis again.
    #[serde(default)]
    pub allow_duplicates: bool,
}

/// The runs a launch created.
#[derive(Debug, Serialize, ToSchema)]
pub struct Launched {
    /// The new runs, in launch order, all `ready`.
    pub runs: Vec<Run>,
}

/// What a reset runs again.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    /// Every task, not only those that did not succeed.
    #[serde(default)]
    pub all: bool,
}

/// The query of `GET /api/runs`; an empty value counts as absent.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RunsQuery {
    /// Only runs of this workflow.
    #[param(value_type = Option<i64>)]
    workflow: Option<String>,
    /// Only runs of this analysis.
    #[param(value_type = Option<i64>)]
    analysis: Option<String>,
    /// Only runs in this state.
    #[param(schema_with = run_status_schema, required = false)]
    status: Option<String>,
    /// The `next` of the previous page: only runs after this id in the listing order.
    #[param(value_type = Option<i64>)]
    after: Option<String>,
    /// Runs per page, 1 to 1000; 50 when left out.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// `newest` (the default) or `oldest` first.
    #[param(schema_with = order_schema, required = false)]
    order: Option<String>,
}

/// The query of `GET /api/runs/counts`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CountsQuery {
    /// Only runs of this workflow.
    #[param(value_type = Option<i64>)]
    workflow: Option<String>,
    /// Only runs of this analysis.
    #[param(value_type = Option<i64>)]
    analysis: Option<String>,
}

/// The query of `GET /api/runs/{id}/events`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only events with a greater id: the id of the last event already seen.
    #[param(value_type = Option<i64>)]
    after: Option<String>,
    /// Events per answer, 1 to 10000; 1000 when left out.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 10000)]
    limit: Option<String>,
}

fn run_status_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .description(Some("A run's state"))
        .schema_type(Type::String)
        .enum_values(Some(RunStatus::ALL.iter().map(|s| s.as_str())))
}

fn task_state_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .description(Some("A task's state"))
        .schema_type(Type::String)
        .enum_values(Some(TaskState::ALL.iter().map(|s| s.as_str())))
}

fn order_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .description(Some("`newest` (the default) or `oldest` first"))
        .schema_type(Type::String)
        .enum_values(Some(["newest", "oldest"]))
        .default(Some(Value::from("newest")))
}

/// A page of runs, newest first unless `order=oldest`. Walk every page by passing each
/// answer's `next` as `after` until `next` is null.
#[utoipa::path(
    get,
    path = "/runs",
    operation_id = "list_runs",
    tag = "runs",
    params(RunsQuery),
    responses(
        (status = 200, description = "One page of runs", body = RunPage),
        (status = 400, description = "A bad parameter, named in the message", body = ErrorBody),
        (status = 404, description = "The workflow or analysis does not exist", body = ErrorBody),
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    Params(query): Params<RunsQuery>,
) -> Result<Json<RunPage>, ApiError> {
    let workflow_id = id_param("workflow", "a workflow", query.workflow.as_deref())?;
    let analysis_id = id_param("analysis", "an analysis", query.analysis.as_deref())?;
    let status = status_param(query.status.as_deref())?;
    let after_id = id_param("after", "a run", query.after.as_deref())?;
    let limit = number_param(
        "limit",
        query.limit.as_deref(),
        (1, MAX_LIMIT),
        DEFAULT_LIMIT,
    )?;
    let newest_first = newest_first_param(query.order.as_deref())?;
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    // One run more than the page tells whether another page follows.
    let filter = RunFilter {
        workflow_id,
        analysis_id,
        status,
        after_id,
        limit: u32::try_from(limit + 1).ok(),
        newest_first,
    };
    let mut runs = state.store.list_runs(&filter).await?;
    let next = if runs.len() > limit {
        runs.truncate(limit);
        runs.last().map(|run| run.id)
    } else {
        None
    };
    if runs.is_empty() {
        // No run: say so if the filter names something that does not exist.
        if let Some(id) = workflow_id {
            state.store.get_workflow(id).await?;
        }
        if let Some(id) = analysis_id {
            state.store.get_analysis(id).await?;
        }
    }
    Ok(Json(RunPage {
        runs: runs.into_iter().map(Run::from).collect(),
        next,
    }))
}

/// How many runs (of a workflow, of an analysis, or all) are in each state.
#[utoipa::path(
    get,
    path = "/runs/counts",
    operation_id = "count_runs",
    tag = "runs",
    params(CountsQuery),
    responses(
        (status = 200, description = "Runs per state and in all", body = RunCounts,
            example = json!({"ready": 0, "scheduled": 0, "in-progress": 1, "completed": 40,
                             "error": 2, "cancelled": 0, "total": 43})),
        (status = 400, description = "A bad parameter, named in the message", body = ErrorBody),
        (status = 404, description = "The workflow or analysis does not exist", body = ErrorBody),
    ),
)]
pub async fn counts(
    State(state): State<AppState>,
    Params(query): Params<CountsQuery>,
) -> Result<Json<RunCounts>, ApiError> {
    let workflow_id = id_param("workflow", "a workflow", query.workflow.as_deref())?;
    let analysis_id = id_param("analysis", "an analysis", query.analysis.as_deref())?;
    let counts = state.tracker.count_runs(workflow_id, analysis_id).await?;
    let mut map = Map::new();
    let mut total = 0;
    for (status, count) in counts {
        total += count;
        map.insert(status.as_str().to_owned(), Value::from(count));
    }
    map.insert("total".to_owned(), Value::from(total));
    Ok(Json(RunCounts(map)))
}

/// Launches a workflow for an analysis: one run per run config, all or none. Every run's
/// effective config is merged and every task template rendered before anything is stored, so
/// a config missing a key a template needs fails the launch, naming the run config, the task
/// and the key. A running server schedules and executes the new runs.
#[utoipa::path(
    post,
    path = "/launch",
    operation_id = "launch",
    tag = "runs",
    request_body = LaunchRequest,
    responses(
        (status = 201, description = "The runs were created", body = Launched),
        (status = 400, description = "A bad field or run config, named in the message", body = ErrorBody),
        (status = 403, description = "The token may only read", body = ErrorBody),
        (status = 404, description = "The workflow or analysis does not exist", body = ErrorBody),
        (status = 409, description = "Run configs already launched; nothing was created", body = ErrorBody),
        (status = 413, description = "The body is over 64 MiB: launch in batches", body = ErrorBody),
    ),
)]
pub async fn launch(
    _: CanWrite,
    State(state): State<AppState>,
    Body(request): Body<LaunchRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let sources = request
        .runs
        .into_iter()
        .map(|config| RunSource {
            source: None,
            config,
        })
        .collect();
    let launched = state
        .tracker
        .launch(
            request.workflow,
            request.analysis,
            sources,
            request.allow_duplicates,
        )
        .await
        .map_err(|error| {
            let duplicates = matches!(error, butler_core::Error::Conflict(_));
            let mut answer = ApiError::from(error);
            if duplicates {
                answer
                    .message
                    .push_str("\nIn the API, send \"allow_duplicates\": true.");
            }
            answer
        })?;
    let runs = launched.into_iter().map(Run::from).collect();
    Ok((StatusCode::CREATED, Json(Launched { runs })))
}

/// One run with its tasks.
#[utoipa::path(
    get,
    path = "/runs/{id}",
    operation_id = "get_run",
    tag = "runs",
    params(("id" = i64, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run and its tasks", body = RunDetail),
        (status = 404, description = "No such run", body = ErrorBody),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<RunDetail>, ApiError> {
    let id = path_id("run", &id)?;
    let (run, tasks) = state.tracker.run_with_tasks(id).await?;
    Ok(Json(RunDetail {
        run: run.into(),
        tasks: tasks.into_iter().map(Task::from).collect(),
    }))
}

/// A run's event log, oldest first, a page at a time: pass the last id seen as `after`.
#[utoipa::path(
    get,
    path = "/runs/{id}/events",
    operation_id = "list_run_events",
    tag = "runs",
    params(("id" = i64, Path, description = "The run's id"), EventsQuery),
    responses(
        (status = 200, description = "Events of the run, by id", body = [Event]),
        (status = 400, description = "A bad parameter, named in the message", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
    ),
)]
pub async fn events(
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
    Params(query): Params<EventsQuery>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let id = path_id("run", &id)?;
    let after = optional_number("after", query.after.as_deref(), 0)?.unwrap_or(0);
    let limit = number_param(
        "limit",
        query.limit.as_deref(),
        (1, MAX_EVENTS),
        DEFAULT_EVENTS,
    )?;
    state.store.get_run(id).await?;
    let events = state
        .store
        .list_events(&EventFilter {
            not_by_suffix: None,
            run_id: Some(id),
            after: Id::try_from(after).unwrap_or(Id::MAX),
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
        })
        .await?;
    Ok(Json(events.into_iter().map(Event::from).collect()))
}

/// The effective config a run executes with, stored at launch, with the layer that set each
/// key.
#[utoipa::path(
    get,
    path = "/runs/{id}/config",
    operation_id = "get_run_config",
    tag = "runs",
    params(("id" = i64, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The effective config and its provenance", body = RunConfig),
        (status = 404, description = "No such run", body = ErrorBody),
    ),
)]
pub async fn config(
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<RunConfig>, ApiError> {
    let id = path_id("run", &id)?;
    let config = state.tracker.effective_config(id).await?;
    let provenance = state.tracker.explain(id).await?;
    Ok(Json(RunConfig {
        id: config.id,
        sha256: config.sha256,
        data: config.data,
        provenance: provenance
            .into_iter()
            .map(|p| ConfigKey {
                key: p.path,
                layer: p.layer,
                value: p.value,
            })
            .collect(),
    }))
}

/// One task's command and extra environment, rendered with its run's effective config.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskCommand {
    /// The task's id.
    pub task: String,
    /// The shell command its attempts run (for a Python task, its `module:function`).
    pub command: String,
    /// The variables its attempts get besides Butler's own.
    pub env: BTreeMap<String, String>,
}

/// The commands a run's tasks run: each task's templates rendered with the run's effective
/// config, in definition order.
#[utoipa::path(
    get,
    path = "/runs/{id}/commands",
    operation_id = "get_run_commands",
    tag = "runs",
    params(("id" = i64, Path, description = "The run's id")),
    responses(
        (status = 200, description = "Each task's command and environment", body = Vec<TaskCommand>),
        (status = 404, description = "No such run", body = ErrorBody),
    ),
)]
pub async fn commands(
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<Vec<TaskCommand>>, ApiError> {
    let id = path_id("run", &id)?;
    let tasks = state.tracker.commands(id, None).await?;
    Ok(Json(
        tasks
            .into_iter()
            .map(|t| TaskCommand {
                task: t.id,
                command: t.command,
                env: t.env,
            })
            .collect(),
    ))
}

/// Puts a finished run back to `ready`, so the scheduler runs again the tasks that did not
/// succeed (or every task with `"all": true`). The body may be left out.
#[utoipa::path(
    post,
    path = "/runs/{id}/reset",
    operation_id = "reset_run",
    tag = "runs",
    params(("id" = i64, Path, description = "The run's id")),
    request_body(content = Option<ResetRequest>, description = "Optional; `{\"all\": false}` when left out"),
    responses(
        (status = 200, description = "The run, now `ready`", body = Run),
        (status = 403, description = "The token may only read", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 409, description = "The run has not finished", body = ErrorBody),
    ),
)]
pub async fn reset(
    _: CanWrite,
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
    OptionalBody(request): OptionalBody<ResetRequest>,
) -> Result<Json<Run>, ApiError> {
    let id = path_id("run", &id)?;
    let scope = if request.all {
        ResetScope::All
    } else {
        ResetScope::Failed
    };
    state.tracker.reset_run_by(id, scope, BY).await?;
    Ok(Json(state.store.get_run(id).await?.into()))
}

/// Cancels an unfinished run: its waiting tasks will not start and its running attempts are
/// killed by their workers.
#[utoipa::path(
    post,
    path = "/runs/{id}/cancel",
    operation_id = "cancel_run",
    tag = "runs",
    params(("id" = i64, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run, now `cancelled`", body = Run),
        (status = 403, description = "The token may only read", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 409, description = "The run has finished already", body = ErrorBody),
    ),
)]
pub async fn cancel(
    _: CanWrite,
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<Run>, ApiError> {
    let id = path_id("run", &id)?;
    state.tracker.cancel_run_by(id, BY).await?;
    Ok(Json(state.store.get_run(id).await?.into()))
}
