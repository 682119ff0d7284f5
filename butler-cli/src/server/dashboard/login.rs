//! The login page: a person pastes a token's secret, the server checks it and keeps it in the
//! `butler_token` cookie, which then authenticates the pages and the script's API calls.

use axum::Form;
use axum::extract::{Query, State};
use axum::http::header::{CACHE_CONTROL, LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use butler_core::model::hash_token;
use minijinja::context;
use serde::Deserialize;

use super::{Chrome, Nav, PageError};
use crate::server::auth::{Auth, TOKEN_COOKIE};
use crate::server::state::AppState;

/// The login form's fields, and the query of `GET /login`.
#[derive(Debug, Default, Deserialize)]
pub struct LoginForm {
    /// The token's secret (the form only).
    #[serde(default)]
    secret: String,
    /// Where to go once logged in.
    #[serde(default)]
    next: Option<String>,
}

/// `GET /login`: the form; with `--no-auth`, straight to the runs.
pub async fn form(State(state): State<AppState>, Query(query): Query<LoginForm>) -> Response {
    let next = safe_next(query.next.as_deref());
    if state.auth == Auth::Open {
        return Redirect::to(&next).into_response();
    }
    page(&state, StatusCode::OK, &next, None)
}

/// `POST /login`: a valid secret sets the cookie and goes on to `next`; any other shows the
/// form again with the reason.
pub async fn submit(State(state): State<AppState>, Form(form): Form<LoginForm>) -> Response {
    let next = safe_next(form.next.as_deref());
    if state.auth == Auth::Open {
        return Redirect::to(&next).into_response();
    }
    let secret = form.secret.trim();
    if secret.is_empty() {
        let problem = "Paste a token's secret: `butler token create --name NAME` prints one.";
        return page(&state, StatusCode::BAD_REQUEST, &next, Some(problem));
    }
    let valid = match state.store.find_token(&hash_token(secret)).await {
        Ok(token) => token.is_some(),
        Err(error) => {
            let chrome = Chrome::new(&state, None, Nav::None);
            return chrome.error(PageError::from(error));
        }
    };
    let cookie = format!("{TOKEN_COOKIE}={secret}; HttpOnly; SameSite=Strict; Path=/");
    match (valid, HeaderValue::from_str(&cookie)) {
        (true, Ok(cookie)) => {
            let mut headers = HeaderMap::new();
            headers.insert(SET_COOKIE, cookie);
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            (headers, Redirect::to(&next)).into_response()
        }
        _ => page(
            &state,
            StatusCode::UNAUTHORIZED,
            &next,
            Some(
                "That secret matches no token. Paste the whole second line that `butler token \
                 create` printed; a deleted token no longer works.",
            ),
        ),
    }
}

/// `POST /logout`: forgets the cookie and shows the login page.
pub async fn logout() -> Response {
    let cookie = format!("{TOKEN_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    (
        StatusCode::SEE_OTHER,
        [
            (SET_COOKIE, cookie),
            (LOCATION, "/login".to_owned()),
            (CACHE_CONTROL, "no-store".to_owned()),
        ],
    )
        .into_response()
}

fn page(state: &AppState, status: StatusCode, next: &str, problem: Option<&str>) -> Response {
    let chrome = Chrome::new(state, None, Nav::None);
    let mut response = chrome.respond(
        "login.html",
        Ok::<_, PageError>(context! { next => next, problem => problem }),
    );
    *response.status_mut() = status;
    response
}

/// `next` when it is a path of this server, else `/`: a login link must not send people
/// elsewhere (`//host` and `/\host` are other hosts to browsers).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(path)
            if path.starts_with('/')
                && !path.starts_with("//")
                && !path.starts_with("/\\")
                && !path.chars().any(char::is_control) =>
        {
            path.to_owned()
        }
        _ => "/".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_followed_after_login() {
        assert_eq!(safe_next(Some("/runs/4?task=a")), "/runs/4?task=a");
        assert_eq!(safe_next(Some("//elsewhere.example/x")), "/");
        assert_eq!(safe_next(Some("/\\elsewhere.example")), "/");
        assert_eq!(safe_next(Some("https://elsewhere.example/")), "/");
        assert_eq!(safe_next(Some("/a\nb")), "/");
        assert_eq!(safe_next(None), "/");
    }
}
