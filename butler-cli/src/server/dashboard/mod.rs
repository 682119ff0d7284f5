//! The dashboard: server-rendered HTML pages over the store, with a small script that keeps
//! the live parts (run counts, task states, logs) current through the JSON API.
//!
//! Templates and assets are embedded in the binary; nothing is built or fetched at run time.

mod assets;
mod catalog;
mod dag;
mod format;
mod login;
mod run;
mod runs;
mod timeline;
mod workers;

use std::sync::LazyLock;

use axum::Router;
use axum::http::StatusCode;
use axum::http::header::CACHE_CONTROL;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use minijinja::value::Serde;
use minijinja::{AutoEscape, Environment, Value, context};
use serde::Serialize;

use super::auth::{Access, Auth};
use super::error::ApiError;
use super::state::AppState;

/// The pages behind the token check: runs, one run, analyses, workflows, workers.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(runs::page))
        .route("/runs/{id}", get(run::page))
        .route("/analyses", get(catalog::analyses))
        .route("/workflows", get(catalog::workflows))
        .route("/workers", get(workers::page))
}

/// What needs no token: the login page, logging out, and the style sheet and script the
/// login page uses.
pub fn public_routes() -> Router<AppState> {
    Router::new()
        .route("/login", get(login::form).post(login::submit))
        .route("/logout", post(login::logout))
        .route("/assets/{file}", get(assets::serve))
}

/// Every template, compiled once; a template that does not compile is reported on every page
/// instead of taking the server down.
static TEMPLATES: LazyLock<Result<Environment<'static>, String>> = LazyLock::new(|| {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| AutoEscape::Html);
    let sources = [
        ("base.html", include_str!("templates/base.html")),
        ("macros.html", include_str!("templates/macros.html")),
        ("login.html", include_str!("templates/login.html")),
        ("error.html", include_str!("templates/error.html")),
        ("runs.html", include_str!("templates/runs.html")),
        ("run.html", include_str!("templates/run.html")),
        ("analyses.html", include_str!("templates/analyses.html")),
        ("workflows.html", include_str!("templates/workflows.html")),
        ("workers.html", include_str!("templates/workers.html")),
    ];
    for (name, source) in sources {
        env.add_template(name, source)
            .map_err(|e| format!("dashboard template {name}: {e:#}"))?;
    }
    Ok(env)
});

/// The page the top bar marks as current.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Nav {
    /// The runs table.
    Runs,
    /// Analyses.
    Analyses,
    /// Workflows.
    Workflows,
    /// Workers and queues.
    Workers,
    /// No page of the bar (login, errors).
    None,
}

/// What every page's frame shows: the bar, who is looking, the assets.
#[derive(Debug, Clone, Serialize)]
pub struct Chrome {
    nav: Nav,
    /// The token may only read: no reset or cancel buttons.
    read_only: bool,
    /// The server asks for tokens, so logging out makes sense.
    logout: bool,
    css: &'static str,
    js: &'static str,
    version: &'static str,
}

impl Chrome {
    /// The frame of a page of `nav` for a request with `access`.
    pub fn new(state: &AppState, access: Option<Access>, nav: Nav) -> Self {
        Chrome {
            nav,
            read_only: access != Some(Access::ReadWrite),
            logout: state.auth == Auth::Tokens,
            css: assets::css_url(),
            js: assets::js_url(),
            version: env!("CARGO_PKG_VERSION"),
        }
    }

    /// Whether the reader may change things.
    pub fn can_write(&self) -> bool {
        !self.read_only
    }

    /// Renders `template` with `page`, or the error page when loading the page failed.
    pub fn respond<T: Serialize>(&self, template: &str, page: Result<T, PageError>) -> Response {
        match page {
            Ok(page) => self.render(StatusCode::OK, template, &page),
            Err(error) => self.error(error),
        }
    }

    /// The error page for `error`.
    pub fn error(&self, error: PageError) -> Response {
        let page = context! { title => error.title(), message => error.message };
        self.render(error.status, "error.html", &page)
    }

    fn render<T: Serialize>(&self, status: StatusCode, template: &str, page: &T) -> Response {
        let rendered = match &*TEMPLATES {
            Ok(env) => env
                .get_template(template)
                .and_then(|t| {
                    t.render(context! {
                        chrome => Value::from(Serde(self)),
                        page => Value::from(Serde(page)),
                    })
                })
                .map_err(|e| format!("cannot render {template}: {e:#}")),
            Err(error) => Err(error.clone()),
        };
        match rendered {
            Ok(html) => (status, [(CACHE_CONTROL, "no-store")], Html(html)).into_response(),
            Err(problem) => {
                tracing::error!(%problem, "dashboard page failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the dashboard could not draw this page: {problem}\n"),
                )
                    .into_response()
            }
        }
    }
}

/// Why a page cannot be shown: a status and a sentence for the reader.
#[derive(Debug)]
pub struct PageError {
    status: StatusCode,
    message: String,
}

impl PageError {
    /// 400: the address asks for something malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        PageError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    /// 500: the server failed.
    pub fn internal(message: impl Into<String>) -> Self {
        PageError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
        }
    }

    fn title(&self) -> &'static str {
        match self.status {
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::BAD_REQUEST => "Bad request",
            StatusCode::SERVICE_UNAVAILABLE => "Unavailable",
            _ => "Something went wrong",
        }
    }
}

impl From<butler_core::Error> for PageError {
    fn from(error: butler_core::Error) -> Self {
        // The API's mapping of core errors to statuses, so pages and the API agree.
        let api = ApiError::from(error);
        PageError {
            status: api.status,
            message: api.message,
        }
    }
}

/// A query parameter as an optional id: empty means not given.
fn id_param(value: Option<&str>, name: &str, page: &str) -> Result<Option<i64>, PageError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|_| {
            PageError::bad_request(format!(
                "{name}={text:?} is not an id: use a number from the {page} page, or leave it \
                 out"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_compiles() {
        if let Err(problem) = &*TEMPLATES {
            panic!("{problem}");
        }
    }

    #[test]
    fn ids_in_the_address_are_numbers_or_nothing() {
        assert_eq!(id_param(None, "workflow", "Workflows").unwrap(), None);
        assert_eq!(id_param(Some(" "), "workflow", "Workflows").unwrap(), None);
        assert_eq!(
            id_param(Some("12"), "workflow", "Workflows").unwrap(),
            Some(12)
        );
        let error = id_param(Some("x"), "workflow", "Workflows").unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert!(
            error.message.contains("workflow=\"x\""),
            "{}",
            error.message
        );
    }
}
