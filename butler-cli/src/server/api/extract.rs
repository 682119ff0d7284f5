//! Extractors that answer bad input in the API's error shape, and the checks of query
//! parameters every endpoint shares.

use std::str::FromStr;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, OriginalUri, Path, Query, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use butler_core::model::{Id, RunStatus};
use serde::de::DeserializeOwned;

use crate::server::ApiError;

/// The query string parsed into `T`; a malformed one or an unknown parameter is a 400
/// `invalid_input` naming it.
#[derive(Debug)]
pub struct Params<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Params(value)),
            Err(rejection) => {
                // Nested routes see their path without `/api`; name the one the client sent.
                let path = match parts.extensions.get::<OriginalUri>() {
                    Some(OriginalUri(uri)) => uri.path(),
                    None => parts.uri.path(),
                };
                Err(query_error(&rejection, path))
            }
        }
    }
}

fn query_error(rejection: &QueryRejection, path: &str) -> ApiError {
    let detail = cause(rejection).replace("unknown field", "unknown query parameter");
    ApiError::invalid(format!(
        "bad query string: {detail}; /openapi.json lists the parameters of {path}"
    ))
}

/// Path parameters parsed into `T`; an id that is not a number is a 400 `invalid_input`.
#[derive(Debug)]
pub struct PathParams<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(PathParams(value)),
            Err(rejection) => Err(path_error(&rejection)),
        }
    }
}

fn path_error(rejection: &PathRejection) -> ApiError {
    ApiError::invalid(format!(
        "bad path: {}; /openapi.json lists the API's paths",
        rejection.body_text()
    ))
}

/// An id from the path: a positive whole number.
pub fn path_id(what: &str, text: &str) -> Result<Id, ApiError> {
    match text.trim().parse::<Id>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(ApiError::invalid(format!(
            "a {what} id is a positive whole number such as 42; got {text:?}"
        ))),
    }
}

/// A JSON request body parsed into `T`. A body that is not JSON, does not fit `T`, or is sent
/// with another content type is answered in the API's error shape.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_json_body(request, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid(
                "the request has no body; send a JSON object as described in /openapi.json",
            ));
        }
        parse_json(&bytes).map(Body)
    }
}

/// A JSON request body parsed into `T`, or `T::default()` when the request has no body.
#[derive(Debug)]
pub struct OptionalBody<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_json_body(request, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalBody(T::default()));
        }
        parse_json(&bytes).map(OptionalBody)
    }
}

/// The body's bytes, refusing a content type other than JSON (so a cross-site HTML form
/// cannot post to the API) and a body over the route's size limit.
async fn read_json_body<S: Send + Sync>(request: Request, state: &S) -> Result<Bytes, ApiError> {
    let json_type = is_json(request.headers());
    let bytes = Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!(
                        "the request body is too large ({}): a request may send 2 MiB, a \
                         launch 64 MiB; launch the runs in several batches",
                        cause(&rejection)
                    ),
                )
            } else {
                ApiError::invalid(format!(
                    "cannot read the request body: {}",
                    cause(&rejection)
                ))
            }
        })?;
    match json_type {
        Some(true) => Ok(bytes),
        None if bytes.iter().all(u8::is_ascii_whitespace) => Ok(bytes),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the request body must be JSON sent with `Content-Type: application/json` (with \
             curl: -H 'Content-Type: application/json')",
        )),
    }
}

/// Whether the content type is JSON; `None` when there is none.
fn is_json(headers: &HeaderMap) -> Option<bool> {
    let value = headers.get(CONTENT_TYPE)?;
    let Ok(value) = value.to_str() else {
        return Some(false);
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let essence = essence.to_ascii_lowercase();
    Some(essence == "application/json" || essence.ends_with("+json"))
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    Json::<T>::from_bytes(bytes)
        .map(|Json(value)| value)
        .map_err(|rejection| match rejection {
            JsonRejection::JsonSyntaxError(_) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!(
                    "the request body is not valid JSON: {}; send one JSON object",
                    cause(&rejection)
                ),
            ),
            _ => ApiError::invalid(format!(
                "the request body does not fit: {}; /openapi.json describes its fields",
                cause(&rejection)
            )),
        })
}

/// The innermost description of a rejection: what serde or the parser said, without axum's
/// generic prefix.
fn cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

/// A query parameter's value, with an empty value (`?workflow=`) taken as absent.
fn present(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|v| !v.is_empty())
}

/// An id parameter: a positive whole number.
pub fn id_param(name: &str, what: &str, value: Option<&str>) -> Result<Option<Id>, ApiError> {
    let Some(text) = present(value) else {
        return Ok(None);
    };
    match text.parse::<Id>() {
        Ok(id) if id > 0 => Ok(Some(id)),
        _ => Err(ApiError::invalid(format!(
            "{name} must be {what} id, a positive whole number; got {text:?}"
        ))),
    }
}

/// A count parameter between `min` and `max`, `default` when absent.
pub fn number_param(
    name: &str,
    value: Option<&str>,
    (min, max): (u64, u64),
    default: u64,
) -> Result<u64, ApiError> {
    let Some(text) = present(value) else {
        return Ok(default);
    };
    match text.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(_) => Err(ApiError::invalid(format!(
            "{name} must be between {min} and {max}; got {text}"
        ))),
        Err(_) => Err(ApiError::invalid(format!(
            "{name} must be a whole number between {min} and {max}; got {text:?}"
        ))),
    }
}

/// An optional count parameter of at least `min`.
pub fn optional_number(name: &str, value: Option<&str>, min: u64) -> Result<Option<u64>, ApiError> {
    let Some(text) = present(value) else {
        return Ok(None);
    };
    match text.parse::<u64>() {
        Ok(n) if n >= min => Ok(Some(n)),
        _ => Err(ApiError::invalid(format!(
            "{name} must be a whole number of at least {min}; got {text:?}"
        ))),
    }
}

/// A run status parameter.
pub fn status_param(value: Option<&str>) -> Result<Option<RunStatus>, ApiError> {
    let Some(text) = present(value) else {
        return Ok(None);
    };
    RunStatus::from_str(text).map(Some).map_err(|_| {
        let all: Vec<&str> = RunStatus::ALL.iter().map(|s| s.as_str()).collect();
        ApiError::invalid(format!(
            "status must be one of {}; got {text:?}",
            all.join(", ")
        ))
    })
}

/// `order=newest|oldest`: whether the newest come first (the default).
pub fn newest_first_param(value: Option<&str>) -> Result<bool, ApiError> {
    match present(value) {
        None | Some("newest") => Ok(true),
        Some("oldest") => Ok(false),
        Some(other) => Err(ApiError::invalid(format!(
            "order must be newest or oldest; got {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_name_themselves_the_problem_and_the_fix() {
        let err = number_param("limit", Some("5000"), (1, 1000), 50).unwrap_err();
        assert_eq!(err.message, "limit must be between 1 and 1000; got 5000");
        let err = number_param("limit", Some("ten"), (1, 1000), 50).unwrap_err();
        assert!(err.message.contains("whole number") && err.message.contains("\"ten\""));
        assert_eq!(number_param("limit", Some(""), (1, 1000), 50).unwrap(), 50);
        let err = status_param(Some("done")).unwrap_err();
        assert!(
            err.message.contains("\"done\"") && err.message.contains("in-progress, completed"),
            "{}",
            err.message
        );
        assert_eq!(status_param(Some("error")).unwrap(), Some(RunStatus::Error));
        assert!(id_param("workflow", "a workflow", Some("0")).is_err());
        assert_eq!(
            id_param("workflow", "a workflow", Some(" 7 ")).unwrap(),
            Some(7)
        );
        assert!(newest_first_param(None).unwrap());
        assert!(!newest_first_param(Some("oldest")).unwrap());
        assert!(newest_first_param(Some("asc")).is_err());
    }

    #[test]
    fn json_content_types_are_recognised() {
        let mut headers = HeaderMap::new();
        assert_eq!(is_json(&headers), None);
        headers.insert(
            CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert_eq!(is_json(&headers), Some(true));
        headers.insert(
            CONTENT_TYPE,
            "application/merge-patch+json".parse().unwrap(),
        );
        assert_eq!(is_json(&headers), Some(true));
        headers.insert(
            CONTENT_TYPE,
            "application/x-www-form-urlencoded".parse().unwrap(),
        );
        assert_eq!(is_json(&headers), Some(false));
    }
}
