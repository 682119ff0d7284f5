//! The JSON API under `/api/` and its OpenAPI document at `/openapi.json`.
//!
//! Handlers map HTTP to core calls: every rule lives in `butler-core` (the tracker, the store,
//! the definition parser). The document is generated from the handlers' `#[utoipa::path]`
//! attributes and the response types, so it cannot drift from the routes.

mod analyses;
mod extract;
mod logs;
mod runs;
mod workers;
mod workflows;

use std::sync::LazyLock;

use axum::extract::{DefaultBodyLimit, OriginalUri};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::openapi::OpenApi as Document;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use super::ApiError;
use super::auth::TOKEN_COOKIE;
use super::state::AppState;

/// The largest launch request body: 64 MiB, about 200,000 small run configs.
const LAUNCH_BODY_LIMIT: usize = 64 * 1024 * 1024;

/// The API's routes, relative to `/api` (the server nests them there, behind its token
/// check). Unknown paths and methods are answered in the API's error shape.
pub fn routes() -> Router<AppState> {
    let (router, _) = api_router().split_for_parts();
    router
        .method_not_allowed_fallback(wrong_method)
        .fallback(no_route)
}

/// The OpenAPI 3.1 document of the API, built once.
pub fn openapi() -> &'static Document {
    static DOCUMENT: LazyLock<Document> = LazyLock::new(|| {
        let (_, document) = OpenApiRouter::<AppState>::with_openapi(ApiDoc::openapi())
            .nest("/api", api_router())
            .routes(routes!(openapi_json))
            .split_for_parts();
        document
    });
    &DOCUMENT
}

/// Every route with its documentation.
fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(workflows::list, workflows::create))
        .routes(routes!(workflows::get))
        .routes(routes!(analyses::list, analyses::create))
        .routes(routes!(analyses::get))
        .routes(routes!(runs::list))
        .routes(routes!(runs::counts))
        .routes(routes!(runs::launch).layer(DefaultBodyLimit::max(LAUNCH_BODY_LIMIT)))
        .routes(routes!(runs::get))
        .routes(routes!(runs::events))
        .routes(routes!(runs::config))
        .routes(routes!(runs::commands))
        .routes(routes!(runs::reset))
        .routes(routes!(runs::cancel))
        .routes(routes!(logs::get))
        .routes(routes!(workers::list))
        .routes(routes!(workers::queues))
}

/// The OpenAPI document of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "meta",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of the API", body = Object),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
)]
pub async fn openapi_json() -> Json<&'static Document> {
    Json(openapi())
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A stable code for programs: `invalid_input`, `invalid_json`, `not_found`, `conflict`,
    /// `already_exists`, `unauthorized`, `read_only_token`, `unsupported_media_type`,
    /// `payload_too_large`, `method_not_allowed`, `unavailable`, `internal`.
    #[schema(example = "not_found")]
    pub error: String,
    /// What went wrong, with which input, and what to do.
    #[schema(example = "run 42 not found; list them with `butler list-runs`")]
    pub message: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Butler",
        description = "The HTTP API of `butler server`: workflows, analyses, runs, their tasks, \
                       events, configs and logs, workers and queues. Every request needs an API \
                       token (`butler token create --name NAME`) sent as `Authorization: Bearer \
                       SECRET`, unless the server runs with `--no-auth`. Errors are \
                       `{\"error\": CODE, \"message\": TEXT}`.",
    ),
    modifiers(&Security),
    components(schemas(ErrorBody)),
    tags(
        (name = "workflows", description = "Registered workflows"),
        (name = "analyses", description = "Analyses"),
        (name = "runs", description = "Launching runs, listing, inspecting, resetting and cancelling them"),
        (name = "logs", description = "Task attempt logs"),
        (name = "workers", description = "Workers and task queues"),
        (name = "meta", description = "This document"),
    ),
)]
struct ApiDoc;

/// Declares the two ways to present a token and requires one of them everywhere.
struct Security;

impl Modify for Security {
    fn modify(&self, document: &mut Document) {
        let components = document.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A secret from `butler token create --name NAME` (add --read-only for \
                         a token that may only read)",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                TOKEN_COOKIE,
                "The same secret in the cookie the dashboard's login page sets",
            ))),
        );
        document.security = Some(vec![
            utoipa::openapi::security::SecurityRequirement::new("bearer", Vec::<String>::new()),
            utoipa::openapi::security::SecurityRequirement::new("cookie", Vec::<String>::new()),
        ]);
    }
}

async fn no_route(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "there is no API route {method} {}; /openapi.json lists them",
            uri.path()
        ),
    )
}

async fn wrong_method(method: Method, OriginalUri(uri): OriginalUri) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} does not answer {method}; /openapi.json lists the methods of every route",
            uri.path()
        ),
    )
    .into_response()
}
