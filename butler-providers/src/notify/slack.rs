//! The Slack-style incoming webhook: `{"text": …, "blocks": […]}` POSTed to the hook's URL.

use std::fmt;

use async_trait::async_trait;
use butler_core::Result;
use butler_core::notify::{Alert, AlertKind, Notifier, NotifierEntry};
use reqwest::Url;
use reqwest::header::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Place;
use super::http::{DEFAULT_TIMEOUT, client, parse_url, post_json, redact};

/// The longest header block text the chat service accepts.
const HEADER_MAX: usize = 150;
/// The longest section text the chat service accepts.
const SECTION_MAX: usize = 3000;

/// The keys of a `kind = "slack"` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    url: String,
    #[serde(default)]
    timeout: Option<String>,
}

/// Posts each [`Alert`] to a chat channel through an incoming webhook: a plain `text` (shown
/// in notifications) and `blocks` with the title as a header and the body preformatted.
pub struct SlackNotifier {
    url: Url,
    client: reqwest::Client,
}

impl fmt::Debug for SlackNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The hook's path is its secret.
        f.debug_struct("SlackNotifier")
            .field("url", &redact(&self.url))
            .finish()
    }
}

impl SlackNotifier {
    /// Builds the notifier of a `kind = "slack"` table: `url` (the incoming webhook's) and an
    /// optional `timeout` (default 10s).
    pub(crate) fn from_settings(at: &Place<'_>, entry: &NotifierEntry) -> Result<Self> {
        let settings: Settings = at.settings(entry)?;
        let url = parse_url(at, &settings.url)?;
        let timeout = at.duration("timeout", settings.timeout.as_deref(), DEFAULT_TIMEOUT)?;
        Ok(SlackNotifier {
            url,
            client: client(at, timeout)?,
        })
    }

    /// The message for `alert`.
    pub fn message(alert: &Alert) -> Value {
        let icon = match alert.kind {
            AlertKind::RunFailed => ":x:",
            AlertKind::RunOverdue => ":hourglass:",
            AlertKind::WorkerLost => ":warning:",
            AlertKind::Report => ":bar_chart:",
        };
        let body = match alert.kind {
            // The report's table lines up only in a fixed-width font.
            AlertKind::Report => format!("```{}```", escape(&alert.body)),
            _ => escape(&alert.body),
        };
        let mut blocks = vec![
            json!({
                "type": "header",
                "text": {"type": "plain_text", "text": truncate(&alert.title, HEADER_MAX)}
            }),
            json!({
                "type": "section",
                "text": {"type": "mrkdwn", "text": truncate(&body, SECTION_MAX)}
            }),
        ];
        if let Some(link) = alert.link.as_deref().filter(|l| l.starts_with("http")) {
            let label = alert
                .run_id
                .map_or_else(|| "Open".to_owned(), |id| format!("Open run {id}"));
            blocks.push(json!({
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": format!("<{}|{label}>", escape(link))}]
            }));
        }
        json!({
            "text": format!("{icon} {}\n{}", escape(&alert.title), escape(&alert.body)),
            "blocks": blocks,
        })
    }
}

#[async_trait]
impl Notifier for SlackNotifier {
    async fn send(&self, alert: &Alert) -> Result<()> {
        post_json(
            &self.client,
            &self.url,
            &HeaderMap::new(),
            &SlackNotifier::message(alert),
        )
        .await
    }
}

/// The three characters the chat service's markup reserves.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    #[test]
    fn a_message_has_a_text_and_escaped_blocks() {
        let mut alert = Alert::report(Utc::now(), Utc::now(), Vec::new());
        alert.kind = AlertKind::RunFailed;
        alert.title = "Run 7 failed: a<b> 1.0".to_owned();
        alert.body = "x & y".to_owned();
        alert.run_id = Some(7);
        alert.link = Some("https://butler.example.org/runs/7".to_owned());
        let message = SlackNotifier::message(&alert);
        assert_eq!(
            message["text"],
            ":x: Run 7 failed: a&lt;b&gt; 1.0\nx &amp; y"
        );
        assert_eq!(
            message["blocks"][0]["text"]["text"],
            "Run 7 failed: a<b> 1.0"
        );
        assert_eq!(message["blocks"][1]["text"]["text"], "x &amp; y");
        assert_eq!(
            message["blocks"][2]["elements"][0]["text"],
            "<https://butler.example.org/runs/7|Open run 7>"
        );
        alert.link = Some("/runs/7".to_owned());
        alert.title = "t".repeat(400);
        let message = SlackNotifier::message(&alert);
        assert_eq!(
            message["blocks"].as_array().unwrap().len(),
            2,
            "a bare path is no link"
        );
        assert_eq!(
            message["blocks"][0]["text"]["text"]
                .as_str()
                .unwrap()
                .chars()
                .count(),
            HEADER_MAX
        );
    }
}
