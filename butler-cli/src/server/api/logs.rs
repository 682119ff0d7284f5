//! `/api/runs/{id}/logs/{task}`: a task attempt's output, a chunk at a time.

use std::io::{ErrorKind, SeekFrom};

use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use butler_core::executor::log_file;
use butler_core::model::TaskState;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use utoipa::IntoParams;

use super::ErrorBody;
use super::extract::{Params, PathParams, optional_number, path_id};
use crate::server::ApiError;
use crate::server::state::AppState;

/// The most bytes one request answers with; the client asks again from the new offset.
pub const MAX_CHUNK: u64 = 1024 * 1024;

/// The attempt the answer is from.
const TRY_HEADER: &str = "x-butler-try";
/// The log's size in bytes when it was read.
const SIZE_HEADER: &str = "x-butler-log-size";
/// Whether the attempt has finished, so the log will not grow.
const DONE_HEADER: &str = "x-butler-log-done";
/// The offset to ask for next: the request's offset plus the bytes answered.
const NEXT_HEADER: &str = "x-butler-log-next-offset";

/// The query of a log request.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// The attempt, from 1; the task's latest attempt that started when left out.
    #[serde(rename = "try")]
    #[param(rename = "try", value_type = Option<u32>, minimum = 1)]
    try_number: Option<String>,
    /// The byte to start from; 0 when left out. An offset at or past the end answers an
    /// empty body.
    #[param(value_type = Option<u64>, minimum = 0)]
    offset: Option<String>,
}

/// An attempt's output from byte `offset`, at most 1 MiB per request: while
/// `offset + bytes received` is below `X-Butler-Log-Size`, ask again from there
/// (`X-Butler-Log-Next-Offset`). Once `X-Butler-Log-Done` is `true` the log will not grow.
#[utoipa::path(
    get,
    path = "/runs/{id}/logs/{task}",
    operation_id = "get_task_log",
    tag = "logs",
    params(
        ("id" = i64, Path, description = "The run's id"),
        ("task" = String, Path, description = "The task's id in the workflow definition"),
        LogQuery,
    ),
    responses(
        (status = 200, description = "The log's bytes from the offset, at most 1 MiB",
            body = String, content_type = "text/plain",
            headers(
                ("X-Butler-Try" = u32, description = "The attempt the log is of"),
                ("X-Butler-Log-Size" = u64, description = "The log's size in bytes when it was read"),
                ("X-Butler-Log-Done" = bool, description = "`true` once the attempt has finished, so the log will not grow"),
                ("X-Butler-Log-Next-Offset" = u64, description = "The offset to ask for next"),
            )),
        (status = 400, description = "A bad parameter, named in the message", body = ErrorBody),
        (status = 404, description = "No such run, task or attempt, or the attempt has no log yet", body = ErrorBody),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    PathParams((run, task)): PathParams<(String, String)>,
    Params(query): Params<LogQuery>,
) -> Result<Response, ApiError> {
    let run_id = path_id("run", &run)?;
    let asked_try = optional_number("try", query.try_number.as_deref(), 1)?;
    let offset = optional_number("offset", query.offset.as_deref(), 0)?.unwrap_or(0);
    // State first, output second: whatever an attempt wrote before it was seen finished is
    // in its log by the time the log is read, so `done` never cuts the end off.
    let (run, tasks) = state.tracker.run_with_tasks(run_id).await?;
    let Some(task) = tasks.iter().find(|t| t.task_id == task) else {
        let names: Vec<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
        return Err(not_found(format!(
            "run {} has no task {task:?}; its tasks are: {}",
            run.id,
            names.join(", ")
        )));
    };
    let try_number = match asked_try {
        Some(asked) => match u32::try_from(asked) {
            Ok(asked) if asked <= task.try_number => asked,
            _ => {
                let has = match task.try_number {
                    0 => "has not started yet".to_owned(),
                    1 => "has had one attempt, try=1".to_owned(),
                    last => format!("has had attempts 1 to {last}"),
                };
                return Err(not_found(format!(
                    "task {:?} of run {} has no attempt {asked}: it {has}",
                    task.task_id, run.id
                )));
            }
        },
        None => match task.last_started_try() {
            0 => {
                return Err(not_found(format!(
                    "task {:?} of run {} has not started yet (it is {}); its log appears once \
                     it runs",
                    task.task_id, run.id, task.state
                )));
            }
            last => last,
        },
    };
    let done = try_number < task.try_number || task.state != TaskState::Running;
    let path = log_file(&state.home, run.id, &task.task_id, try_number);
    let unreadable = |error: std::io::Error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot read the log {}: {error}", path.display()),
        )
    };
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(error) if error.kind() == ErrorKind::NotFound => {
            return Err(not_found(format!(
                "task {:?} try {try_number} of run {} has no log yet: it has not started its \
                 command, it failed before starting it (see /api/runs/{}), or it ran on a worker \
                 with another BUTLER_HOME",
                task.task_id, run.id, run.id
            )));
        }
        Err(error) => return Err(unreadable(error)),
    };
    let size = file.metadata().await.map_err(unreadable)?.len();
    let start = offset.min(size);
    let length = (size - start).min(MAX_CHUNK);
    let mut bytes = Vec::with_capacity(usize::try_from(length).unwrap_or_default());
    if length > 0 {
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(unreadable)?;
        file.take(length)
            .read_to_end(&mut bytes)
            .await
            .map_err(unreadable)?;
    }
    let next = start + bytes.len() as u64;
    let headers = [
        (
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        ),
        (CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (
            HeaderName::from_static(TRY_HEADER),
            HeaderValue::from(try_number),
        ),
        (
            HeaderName::from_static(SIZE_HEADER),
            HeaderValue::from(size),
        ),
        (
            HeaderName::from_static(DONE_HEADER),
            HeaderValue::from_static(if done { "true" } else { "false" }),
        ),
        (
            HeaderName::from_static(NEXT_HEADER),
            HeaderValue::from(next),
        ),
    ];
    Ok((headers, bytes).into_response())
}

fn not_found(message: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
}
