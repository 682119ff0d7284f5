//! What the webhook and Slack notifiers share: one POST of JSON, with errors that say whether
//! a retry can help and never show the URL's secret parts.

use std::time::Duration;

use butler_core::{Error, Result};
use reqwest::header::HeaderMap;
use reqwest::{StatusCode, Url};

use super::Place;

/// How long one POST may take unless the table sets `timeout`.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a refusing answer's body goes into the error.
const BODY_SHOWN: usize = 200;

/// The `http(s)://` URL of key `url`.
pub(crate) fn parse_url(at: &Place<'_>, url: &str) -> Result<Url> {
    let parsed = Url::parse(url.trim()).map_err(|err| {
        at.invalid(format!(
            "`url = {url:?}` is not a URL ({err}); give the full https:// address"
        ))
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(at.invalid(format!(
            "`url` must start with http:// or https:// and name a host, not {:?}",
            redact(&parsed)
        )));
    }
    Ok(parsed)
}

/// An HTTP client whose requests give up after `timeout`.
pub(crate) fn client(at: &Place<'_>, timeout: Duration) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .user_agent(concat!("butler/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|err| at.invalid(format!("cannot set up its HTTP client: {err}")))
}

/// `url` without its path, query and credentials, which may hold tokens.
pub(crate) fn redact(url: &Url) -> String {
    let host = url.host_str().unwrap_or("?");
    match url.port() {
        Some(port) => format!("{}://{host}:{port}/…", url.scheme()),
        None => format!("{}://{host}/…", url.scheme()),
    }
}

/// POSTs `body` as JSON: success on 2xx; [`Error::Unavailable`] (worth retrying) when the
/// destination cannot be reached, times out, or answers 408, 429 or 5xx; [`Error::Backend`]
/// (permanent) on any other answer.
pub(crate) async fn post_json(
    client: &reqwest::Client,
    url: &Url,
    headers: &HeaderMap,
    body: &serde_json::Value,
) -> Result<()> {
    let target = redact(url);
    let response = client
        .post(url.clone())
        .headers(headers.clone())
        .json(body)
        .send()
        .await
        .map_err(|err| Error::unavailable(format!("POST to {target} failed"), err.without_url()))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let text = response.text().await.unwrap_or_default();
    let mut shown: String = text.trim().chars().take(BODY_SHOWN).collect();
    if text.trim().chars().count() > BODY_SHOWN {
        shown.push('…');
    }
    let message = format!("POST to {target} answered {status}");
    let detail = if shown.is_empty() {
        status.to_string()
    } else {
        shown
    };
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
    {
        Err(Error::unavailable(message, detail))
    } else {
        Err(Error::backend(
            format!("{message}; check the notifier's url and headers"),
            detail,
        ))
    }
}
