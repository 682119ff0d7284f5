//! The HTTP request log: one event per request under the target `butler::http`, at `info`
//! (`debug` for the probes `/health`, `/ready` and `/metrics`, which Prometheus and load
//! balancers call every few seconds), and at `warn` when the answer is a server error.
//!
//! Only the path is logged, never the query string or headers, so tokens and the like stay
//! out of the log.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response};
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::trace::TraceLayer;
use tracing::{Level, Span};

/// The paths logged at `debug`.
const PROBES: [&str; 3] = ["/health", "/ready", "/metrics"];

/// The request log layer's type.
pub type RequestLog = TraceLayer<
    SharedClassifier<ServerErrorsAsFailures>,
    fn(&Request<Body>) -> Span,
    (),
    fn(&Response<Body>, Duration, &Span),
    (),
    (),
    (),
>;

/// A layer that logs every request it wraps.
pub fn layer() -> RequestLog {
    TraceLayer::new_for_http()
        .make_span_with(request_span as fn(&Request<Body>) -> Span)
        .on_request(())
        .on_response(log_response as fn(&Response<Body>, Duration, &Span))
        .on_body_chunk(())
        .on_eos(())
        .on_failure(())
}

fn request_span(request: &Request<Body>) -> Span {
    let path = request.uri().path();
    if PROBES.contains(&path) {
        tracing::debug_span!(target: "butler::http", "request", method = %request.method(), path)
    } else {
        tracing::info_span!(target: "butler::http", "request", method = %request.method(), path)
    }
}

fn log_response(response: &Response<Body>, latency: Duration, span: &Span) {
    let status = response.status().as_u16();
    // Microsecond precision, without the float noise of a full division.
    let latency_ms = latency.as_micros() as f64 / 1000.0;
    if response.status().is_server_error() {
        tracing::warn!(target: "butler::http", status, latency_ms, "request failed");
    } else if span
        .metadata()
        .is_some_and(|meta| *meta.level() == Level::DEBUG)
    {
        tracing::debug!(target: "butler::http", status, latency_ms, "request served");
    } else {
        tracing::info!(target: "butler::http", status, latency_ms, "request served");
    }
}
