//! Workflow definitions: the DAG of tasks, parsed from TOML or JSON, validated and rendered.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A workflow's DAG of tasks and its run-level settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// The tasks, in file order.
    pub tasks: Vec<TaskDef>,
    /// At most this many runs of the workflow execute at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_active_runs: Option<u32>,
    /// A run still unfinished this long after it started is cancelled and fails.
    #[serde(default, with = "duration_opt", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

/// One task of a workflow definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskDef {
    /// Identifier, unique within the definition.
    pub id: String,
    /// Shell command, a Jinja template rendered against the effective config as `config`.
    pub run: String,
    /// Tasks that must succeed before this one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// An attempt running longer than this is killed (start to close).
    #[serde(default, with = "duration_opt", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// How many times a failed attempt is retried.
    #[serde(default)]
    pub retries: u32,
    /// Delay before the first retry; later retries back off exponentially.
    #[serde(default, with = "duration_opt", skip_serializing_if = "Option::is_none")]
    pub retry_delay: Option<Duration>,
    /// Upper bound of the backoff delay.
    #[serde(default, with = "duration_opt", skip_serializing_if = "Option::is_none")]
    pub max_retry_delay: Option<Duration>,
    /// Keep retrying until this long after the first attempt started, whatever `retries` says.
    #[serde(default, with = "duration_opt", skip_serializing_if = "Option::is_none")]
    pub retry_for: Option<Duration>,
    /// Exit codes that fail the task at once, without retry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permanent_exit_codes: Vec<i32>,
    /// Extra environment variables for the command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// Serde for optional durations written the human way (`"90s"`, `"5m"`, `"1h 30m"`).
mod duration_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| {
            humantime::parse_duration(&t).map_err(|e| {
                serde::de::Error::custom(format!(
                    "bad duration {t:?} ({e}); write it like \"30s\", \"5m\" or \"1h 30m\""
                ))
            })
        })
        .transpose()
    }
}
