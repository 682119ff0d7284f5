//! `butler server`'s HTTP side: the JSON API under `/api/`, the dashboard at `/`, and
//! `/health`, `/ready` and `/metrics`, served beside the scheduler and workers.
//!
//! Handlers map HTTP to core calls and core answers to JSON or HTML; what the CLI also needs
//! lives in `butler-core`.

mod api;
mod auth;
mod dashboard;
mod error;
mod metrics;
mod request_log;
mod state;

use std::future::Future;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

pub use auth::Auth;
pub use error::ApiError;
pub use state::AppState;

/// Every route of the server: the public ones (`/health`, `/ready`, `/metrics`, the login
/// page) and the rest behind [`auth::require_token`].
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .nest("/api", api::routes())
        .route("/openapi.json", get(api::openapi_json))
        .merge(dashboard::routes())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .merge(metrics::routes())
        .merge(dashboard::public_routes())
        .merge(protected)
        // Logs every route above; keep it after the last route.
        .layer(request_log::layer())
        .with_state(state)
}

/// Binds `addr`, failing with the fix when the address is taken or not ours.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr}; another process may be using it: choose another address \
             with --listen ADDR:PORT"
        )
    })
}

/// Serves `router` on `listener` until `stop` completes, then finishes the requests in
/// flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(target: "butler::http", %addr, "HTTP server listening");
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(stop)
        .await
        .context("the HTTP server failed")?;
    tracing::info!(target: "butler::http", "HTTP server stopped");
    Ok(())
}

/// Liveness: the process answers.
async fn health() -> &'static str {
    "ok\n"
}

/// Readiness: the store and the queue answer.
async fn ready(State(state): State<AppState>) -> Response {
    match state.check_ready().await {
        Ok(()) => "ready\n".into_response(),
        Err(problem) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {problem}\n"),
        )
            .into_response(),
    }
}
