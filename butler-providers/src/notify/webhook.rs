//! The generic webhook: the alert, as JSON, POSTed to a URL.

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use butler_core::Result;
use butler_core::notify::{Alert, Notifier, NotifierEntry};
use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use super::Place;
use super::http::{DEFAULT_TIMEOUT, client, parse_url, post_json, redact};

/// The keys of a `kind = "webhook"` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    timeout: Option<String>,
}

/// POSTs each [`Alert`] as JSON (its serde shape) to a URL, with optional extra headers
/// (such as `Authorization`).
pub struct WebhookNotifier {
    url: Url,
    headers: HeaderMap,
    client: reqwest::Client,
}

impl fmt::Debug for WebhookNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The path, the query and the header values may hold tokens.
        f.debug_struct("WebhookNotifier")
            .field("url", &redact(&self.url))
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl WebhookNotifier {
    /// Builds the notifier of a `kind = "webhook"` table: `url`, optional `headers` (a table
    /// of names and values) and `timeout` (default 10s).
    pub(crate) fn from_settings(at: &Place<'_>, entry: &NotifierEntry) -> Result<Self> {
        let settings: Settings = at.settings(entry)?;
        let url = parse_url(at, &settings.url)?;
        let mut headers = HeaderMap::new();
        for (name, value) in &settings.headers {
            let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                at.invalid(format!(
                    "header {name:?} is not a valid header name; use letters, digits and `-`"
                ))
            })?;
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                at.invalid(format!(
                    "the value of header {name:?} has characters a header cannot carry (such \
                     as a line break); fix it"
                ))
            })?;
            value.set_sensitive(true);
            headers.insert(header, value);
        }
        let timeout = at.duration("timeout", settings.timeout.as_deref(), DEFAULT_TIMEOUT)?;
        Ok(WebhookNotifier {
            url,
            headers,
            client: client(at, timeout)?,
        })
    }
}

#[async_trait]
impl Notifier for WebhookNotifier {
    async fn send(&self, alert: &Alert) -> Result<()> {
        let body = serde_json::to_value(alert)
            .map_err(|err| butler_core::Error::backend("cannot encode the alert as JSON", err))?;
        post_json(&self.client, &self.url, &self.headers, &body).await
    }
}
