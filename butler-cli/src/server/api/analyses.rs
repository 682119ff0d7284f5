//! `/api/analyses`: list, show and create analyses.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::LOCATION;
use axum::response::IntoResponse;
use butler_core::model::{self, parse_date};
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::ErrorBody;
use super::extract::{Body, PathParams, path_id};
use crate::server::ApiError;
use crate::server::auth::CanWrite;
use crate::server::state::AppState;

/// An analysis: a study or a batch of work with its own config layer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Analysis {
    /// Its id.
    #[schema(example = 1)]
    pub id: i64,
    /// Its name; several analyses may share one.
    #[schema(example = "hello")]
    pub name: String,
    /// Its start date, `YYYY-MM-DD`.
    pub start_date: NaiveDate,
    /// The id of its current config layer.
    pub config_id: Uuid,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

impl From<model::Analysis> for Analysis {
    fn from(analysis: model::Analysis) -> Self {
        Analysis {
            id: analysis.id,
            name: analysis.name,
            start_date: analysis.start_date,
            config_id: analysis.config_id,
            created_at: analysis.created_at,
        }
    }
}

/// An analysis to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAnalysis {
    /// Its name.
    #[schema(example = "hello")]
    pub name: String,
    /// Its start date, `YYYY-MM-DD` (or `MM-DD-YYYY`); today (UTC) when left out.
    #[schema(example = "2024-05-02")]
    pub date: Option<String>,
    /// Its config layer: a JSON object, between the workflow's and the run's.
    #[schema(value_type = Object)]
    pub config: Value,
}

/// Every analysis, oldest first.
#[utoipa::path(
    get,
    path = "/analyses",
    operation_id = "list_analyses",
    tag = "analyses",
    responses(
        (status = 200, description = "Every analysis, by id", body = [Analysis]),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<Analysis>>, ApiError> {
    let analyses = state.store.list_analyses().await?;
    Ok(Json(analyses.into_iter().map(Analysis::from).collect()))
}

/// One analysis.
#[utoipa::path(
    get,
    path = "/analyses/{id}",
    operation_id = "get_analysis",
    tag = "analyses",
    params(("id" = i64, Path, description = "The analysis's id")),
    responses(
        (status = 200, description = "The analysis", body = Analysis),
        (status = 400, description = "The id is not a number", body = ErrorBody),
        (status = 404, description = "No such analysis", body = ErrorBody),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<Analysis>, ApiError> {
    let id = path_id("analysis", &id)?;
    Ok(Json(state.store.get_analysis(id).await?.into()))
}

/// Creates an analysis.
#[utoipa::path(
    post,
    path = "/analyses",
    operation_id = "create_analysis",
    tag = "analyses",
    request_body = NewAnalysis,
    responses(
        (status = 201, description = "Created", body = Analysis,
            headers(("Location" = String, description = "/api/analyses/ID"))),
        (status = 400, description = "A bad field, named in the message", body = ErrorBody),
        (status = 403, description = "The token may only read", body = ErrorBody),
    ),
)]
pub async fn create(
    _: CanWrite,
    State(state): State<AppState>,
    Body(new): Body<NewAnalysis>,
) -> Result<impl IntoResponse, ApiError> {
    let start_date = match new.date.as_deref() {
        Some(text) => parse_date(text)?,
        None => Utc::now().date_naive(),
    };
    let analysis = state
        .tracker
        .create_analysis(&new.name, start_date, new.config)
        .await?;
    let location = format!("/api/analyses/{}", analysis.id);
    Ok((
        StatusCode::CREATED,
        [(LOCATION, location)],
        Json(Analysis::from(analysis)),
    ))
}
