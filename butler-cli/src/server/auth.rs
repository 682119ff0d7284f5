//! API tokens: every request but `/health`, `/metrics` and the login page presents one, as
//! `Authorization: Bearer SECRET` (programs) or the `butler_token` cookie set by the login
//! page (the dashboard), unless the server runs with `--no-auth`.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::{AUTHORIZATION, COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use butler_core::model::hash_token;

use super::error::ApiError;
use super::state::AppState;

/// The cookie the dashboard's login page stores the token in.
pub const TOKEN_COOKIE: &str = "butler_token";

/// Whether the server asks for tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Every request but the public ones needs a valid token.
    Tokens,
    /// No token needed (`--no-auth`, for local use): every request may read and write.
    Open,
}

/// What the request's token allows; set by [`require_token`] for the handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read everything, change nothing.
    ReadOnly,
    /// Read, launch, reset and cancel.
    ReadWrite,
}

/// Lets the request through with its [`Access`] when it carries a valid token; otherwise
/// answers 401 (the API) or sends the browser to the login page (the dashboard).
pub async fn require_token(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let access = match state.auth {
        Auth::Open => Some(Access::ReadWrite),
        Auth::Tokens => match presented_secret(request.headers()) {
            None => None,
            Some(secret) => match state.store.find_token(&hash_token(&secret)).await {
                Ok(token) => token.map(|t| {
                    if t.read_only {
                        Access::ReadOnly
                    } else {
                        Access::ReadWrite
                    }
                }),
                Err(error) => return ApiError::from(error).into_response(),
            },
        },
    };
    let Some(access) = access else {
        return unauthorized(&request);
    };
    request.extensions_mut().insert(access);
    next.run(request).await
}

fn unauthorized(request: &Request) -> Response {
    let path = request.uri().path();
    if path.starts_with("/api/") || path == "/api" || path == "/openapi.json" {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this request needs an API token: send `Authorization: Bearer SECRET` with a secret \
             from `butler token create --name NAME`",
        )
        .into_response();
    }
    let next = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    Redirect::to(&format!("/login?next={}", percent_encode(&next))).into_response()
}

/// The secret of the `Authorization: Bearer` header, or else of the token cookie.
fn presented_secret(headers: &HeaderMap) -> Option<String> {
    if let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, secret) = value.trim().split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| secret.trim().to_owned());
    }
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// `text` made safe for a query parameter.
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An extractor for handlers that change something: refuses read-only tokens with 403.
#[derive(Debug, Clone, Copy)]
pub struct CanWrite;

impl<S: Send + Sync> FromRequestParts<S> for CanWrite {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<Access>() {
            Some(Access::ReadWrite) => Ok(CanWrite),
            _ => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "read_only_token",
                "this token may only read: launching, resetting and cancelling need a token \
                 made without --read-only",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().expect("header value"));
        }
        map
    }

    #[test]
    fn the_secret_comes_from_the_bearer_header_or_the_cookie() {
        let bearer = headers(&[("authorization", "Bearer butler_abc")]);
        assert_eq!(presented_secret(&bearer).as_deref(), Some("butler_abc"));
        let cookie = headers(&[("cookie", "theme=dark; butler_token=butler_xyz")]);
        assert_eq!(presented_secret(&cookie).as_deref(), Some("butler_xyz"));
        let basic = headers(&[("authorization", "Basic dXNlcjpwYXNz")]);
        assert_eq!(presented_secret(&basic), None);
        assert_eq!(presented_secret(&HeaderMap::new()), None);
    }

    #[test]
    fn next_paths_are_percent_encoded() {
        assert_eq!(
            percent_encode("/runs?status=error&x=1"),
            "/runs%3Fstatus%3Derror%26x%3D1"
        );
    }
}
