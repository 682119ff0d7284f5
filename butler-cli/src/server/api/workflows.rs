//! `/api/workflows`: list, show and register workflows.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::LOCATION;
use axum::response::IntoResponse;
use butler_core::definition::{Definition, Format};
use butler_core::model;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::ErrorBody;
use super::extract::{Body, PathParams, path_id};
use crate::server::ApiError;
use crate::server::auth::CanWrite;
use crate::server::state::AppState;

/// A registered workflow.
#[derive(Debug, Serialize, ToSchema)]
pub struct Workflow {
    /// Its id.
    #[schema(example = 1)]
    pub id: i64,
    /// Its name; unique together with `version`.
    #[schema(example = "test")]
    pub name: String,
    /// Its version.
    #[schema(example = "1.0")]
    pub version: String,
    /// The validated definition: `tasks` (each with `id`, `run`, `needs`, `timeout`,
    /// `retries` …) and the run-level settings, durations written like `"5m"`.
    #[schema(value_type = Object)]
    pub definition: Definition,
    /// The id of its current config layer.
    pub config_id: Uuid,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
}

impl From<model::Workflow> for Workflow {
    fn from(workflow: model::Workflow) -> Self {
        Workflow {
            id: workflow.id,
            name: workflow.name,
            version: workflow.version,
            definition: workflow.definition,
            config_id: workflow.config_id,
            created_at: workflow.created_at,
        }
    }
}

/// The syntax of a definition's text.
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DefinitionFormat {
    /// TOML, the usual form.
    #[default]
    Toml,
    /// JSON with the same shape.
    Json,
}

/// A workflow to register.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWorkflow {
    /// Its name.
    #[schema(example = "test")]
    pub name: String,
    /// Its version; a name and version pair is registered once.
    #[schema(example = "1.0")]
    pub version: String,
    /// Its config layer: a JSON object, the lowest layer of every run's effective config.
    #[schema(value_type = Object)]
    pub config: Value,
    /// The definition's text, as it would be written in a file.
    #[schema(example = "[[tasks]]\nid = \"say\"\nrun = \"echo '{{ config.test_message }}'\"\n")]
    pub definition: String,
    /// The syntax of `definition`; `toml` when left out.
    #[serde(default)]
    pub format: DefinitionFormat,
}

/// Every workflow, oldest first.
#[utoipa::path(
    get,
    path = "/workflows",
    operation_id = "list_workflows",
    tag = "workflows",
    responses(
        (status = 200, description = "Every workflow, by id", body = [Workflow]),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<Workflow>>, ApiError> {
    let workflows = state.store.list_workflows().await?;
    Ok(Json(workflows.into_iter().map(Workflow::from).collect()))
}

/// One workflow.
#[utoipa::path(
    get,
    path = "/workflows/{id}",
    operation_id = "get_workflow",
    tag = "workflows",
    params(("id" = i64, Path, description = "The workflow's id")),
    responses(
        (status = 200, description = "The workflow", body = Workflow),
        (status = 400, description = "The id is not a number", body = ErrorBody),
        (status = 404, description = "No such workflow", body = ErrorBody),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<Workflow>, ApiError> {
    let id = path_id("workflow", &id)?;
    Ok(Json(state.store.get_workflow(id).await?.into()))
}

/// Registers a workflow from its name, version, config and definition text. The definition is
/// validated in full (cycles, unknown needs, templates …) and nothing is stored if it is wrong.
#[utoipa::path(
    post,
    path = "/workflows",
    operation_id = "create_workflow",
    tag = "workflows",
    request_body = NewWorkflow,
    responses(
        (status = 201, description = "Registered", body = Workflow,
            headers(("Location" = String, description = "/api/workflows/ID"))),
        (status = 400, description = "A bad field or definition, named in the message", body = ErrorBody),
        (status = 403, description = "The token may only read", body = ErrorBody),
        (status = 409, description = "This name and version exist already", body = ErrorBody),
    ),
)]
pub async fn create(
    _: CanWrite,
    State(state): State<AppState>,
    Body(new): Body<NewWorkflow>,
) -> Result<impl IntoResponse, ApiError> {
    let format = match new.format {
        DefinitionFormat::Toml => Format::Toml,
        DefinitionFormat::Json => Format::Json,
    };
    let definition = Definition::parse(&new.definition, format, "definition")?;
    let workflow = state
        .tracker
        .create_workflow(&new.name, &new.version, new.config, definition)
        .await?;
    let location = format!("/api/workflows/{}", workflow.id);
    Ok((
        StatusCode::CREATED,
        [(LOCATION, location)],
        Json(Workflow::from(workflow)),
    ))
}
