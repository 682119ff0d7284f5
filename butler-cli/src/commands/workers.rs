//! `list-workers`.

use std::io::Write;

use anyhow::Result;
use butler_core::model::WorkerInfo;
use butler_core::tracker::Tracker;
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::output::{self, Table, precise_timestamp};
use crate::settings::Settings;

/// Prints every worker the store lists, with whether it still reports. In JSON, the last
/// heartbeat is a timestamp rather than an age.
pub async fn list(
    tracker: &Tracker,
    settings: &Settings,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let lost_after = settings.lost_after()?;
    let now = Utc::now();
    let mut table = Table::new(&[
        "NAME",
        "HOST",
        "QUEUE",
        "SLOTS",
        "RUNNING",
        "LAST HEARTBEAT",
        "VERSION",
        "STATE",
    ]);
    for worker in tracker.store().list_workers().await? {
        let state = state(&worker, now, lost_after);
        let heartbeat = if json {
            precise_timestamp(worker.heartbeat_at)
        } else {
            Value::from(age(worker.heartbeat_at, now))
        };
        table.push(vec![
            Value::from(worker.name),
            Value::from(worker.host),
            Value::from(worker.queue),
            Value::from(worker.slots),
            Value::from(worker.running),
            heartbeat,
            Value::from(worker.version),
            Value::from(state),
        ]);
    }
    table.print(out, json)?;
    Ok(())
}

/// `alive`, or `lost` once its heartbeats stopped for `lost_after`.
pub fn state(
    worker: &WorkerInfo,
    now: DateTime<Utc>,
    lost_after: std::time::Duration,
) -> &'static str {
    if worker.is_lost(now, lost_after) {
        "lost"
    } else {
        "alive"
    }
}

/// How long before `now` `at` was: `4.2s ago`, `3m05s ago`.
fn age(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let elapsed = now.signed_duration_since(at).to_std().unwrap_or_default();
    format!("{} ago", output::duration(elapsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_naturally_and_never_go_negative() {
        let now = Utc::now();
        assert_eq!(
            age(now - chrono::Duration::milliseconds(4200), now),
            "4.2s ago"
        );
        assert_eq!(age(now - chrono::Duration::seconds(185), now), "3m05s ago");
        // A heartbeat from a clock slightly ahead.
        assert_eq!(age(now + chrono::Duration::seconds(1), now), "0.0s ago");
    }
}
