//! How the pages write times, durations and values.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::output;

/// A moment as a page shows it: the machine form for `<time datetime>` (which the page's
/// script turns into the reader's local time) and a UTC text for readers without scripts.
#[derive(Debug, Clone, Serialize)]
pub struct Time {
    /// RFC 3339 with milliseconds.
    pub iso: String,
    /// `YYYY-MM-DD HH:MM:SS`, UTC.
    pub text: String,
}

impl Time {
    /// `at` for a page.
    pub fn new(at: DateTime<Utc>) -> Self {
        Time {
            iso: at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            text: at.format("%Y-%m-%d %H:%M:%S").to_string(),
        }
    }

    /// `at` with milliseconds, for events that follow each other closely.
    pub fn precise(at: DateTime<Utc>) -> Self {
        Time {
            iso: at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            text: at.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
        }
    }
}

/// The time from `start` to `end` (or to `now` while unfinished), as people read it; `None`
/// before the start.
pub fn elapsed(
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<String> {
    let start = start?;
    let end = end.unwrap_or(now);
    Some(output::duration(span(start, end)))
}

/// `end - start`, never negative.
pub fn span(start: DateTime<Utc>, end: DateTime<Utc>) -> Duration {
    end.signed_duration_since(start)
        .to_std()
        .unwrap_or_default()
}

/// How long before `now` `at` was: `4.2s ago`.
pub fn age(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    format!("{} ago", output::duration(span(at, now)))
}

/// A short label for an offset on a time axis: `0s`, `45s`, `2m`, `1m30s`, `1h`, `2h15m`.
pub fn axis_label(seconds: u64) -> String {
    let (h, m, s) = (seconds / 3600, seconds % 3600 / 60, seconds % 60);
    match (h, m, s) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, 0, _) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// A JSON value on one line, cut to `max` characters with `…` when longer.
pub fn compact_json(value: &Value, max: usize) -> String {
    let text = value.to_string();
    truncate(&text, max)
}

/// `text` cut to `max` characters with `…` when longer.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_labels_read_naturally() {
        assert_eq!(axis_label(0), "0s");
        assert_eq!(axis_label(45), "45s");
        assert_eq!(axis_label(120), "2m");
        assert_eq!(axis_label(90), "1m30s");
        assert_eq!(axis_label(3600), "1h");
        assert_eq!(axis_label(8100), "2h15m");
    }

    #[test]
    fn long_values_are_cut_on_characters() {
        assert_eq!(truncate("héllo", 10), "héllo");
        assert_eq!(truncate("héllo wörld", 6), "héllo…");
        assert_eq!(
            compact_json(&serde_json::json!({"a": [1, 2]}), 40),
            r#"{"a":[1,2]}"#
        );
    }

    #[test]
    fn elapsed_runs_to_now_while_unfinished_and_never_goes_negative() {
        let start = DateTime::parse_from_rfc3339("2024-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        let now = start + chrono::Duration::seconds(75);
        assert_eq!(elapsed(Some(start), None, now).as_deref(), Some("1m15s"));
        let end = start + chrono::Duration::milliseconds(400);
        assert_eq!(
            elapsed(Some(start), Some(end), now).as_deref(),
            Some("0.4s")
        );
        assert_eq!(elapsed(None, None, now), None);
        assert_eq!(age(now, start), "0.0s ago");
    }
}
