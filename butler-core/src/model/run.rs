use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Id;
use crate::config::Config;
use crate::error::{Error, Result};

/// The state of an analysis run, with the names Butler has always used.
///
/// `ready → scheduled → in-progress → completed | error`, plus `cancelled`; a reset puts a
/// finished run back to `ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    /// Launched, waiting for the scheduler.
    Ready,
    /// Taken by a scheduler; no task has started yet.
    Scheduled,
    /// At least one task has started.
    InProgress,
    /// Every task succeeded.
    Completed,
    /// A task failed for good, or the run timed out.
    Error,
    /// Cancelled by a user.
    Cancelled,
}

impl RunStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [RunStatus; 6] = [
        RunStatus::Ready,
        RunStatus::Scheduled,
        RunStatus::InProgress,
        RunStatus::Completed,
        RunStatus::Error,
        RunStatus::Cancelled,
    ];

    /// The status as stored and printed (`in-progress`).
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Ready => "ready",
            RunStatus::Scheduled => "scheduled",
            RunStatus::InProgress => "in-progress",
            RunStatus::Completed => "completed",
            RunStatus::Error => "error",
            RunStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the run has finished and will not change unless reset.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Error | RunStatus::Cancelled
        )
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        RunStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "unknown run status {s:?}; use one of: ready, scheduled, in-progress, \
                     completed, error, cancelled"
                ))
            })
    }
}

/// One run of a workflow for an analysis: one sample, one article.
///
/// The config layers are referenced as they were at launch, so the effective config and its
/// provenance can be reproduced exactly, however the workflow's and analysis's configs change
/// later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisRun {
    /// Identifier printed by `launch-workflow`.
    pub id: Id,
    /// The workflow it runs.
    pub workflow_id: Id,
    /// The analysis it belongs to.
    pub analysis_id: Id,
    /// Current state.
    pub status: RunStatus,
    /// The workflow's config layer at launch.
    pub workflow_config_id: Uuid,
    /// The analysis's config layer at launch.
    pub analysis_config_id: Uuid,
    /// The run's own config layer (one file of the launch directory).
    pub run_config_id: Uuid,
    /// The merged config the run executes with, stored at launch and never recomputed.
    pub effective_config_id: Uuid,
    /// The file the run config was read from, when it came from a file.
    pub source_file: Option<String>,
    /// Why the run ended in `error`, when it did.
    pub error: Option<String>,
    /// When it was launched.
    pub created_at: DateTime<Utc>,
    /// When its first task started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub ended_at: Option<DateTime<Utc>>,
}

/// One run to create in a launch.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRun {
    /// The run's own config layer.
    pub run_config: Config,
    /// The merged config without `analysis_run_id`; the store injects the run's id with
    /// [`crate::config::effective_for_run`] once the id is known.
    pub merged_config: serde_json::Value,
    /// The file the run config came from.
    pub source_file: Option<String>,
}

/// A launch: runs of one workflow for one analysis, created all together or not at all.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRuns {
    /// The workflow to run.
    pub workflow_id: Id,
    /// The analysis the runs belong to.
    pub analysis_id: Id,
    /// The workflow's config layer the runs were merged with.
    pub workflow_config_id: Uuid,
    /// The analysis's config layer the runs were merged with.
    pub analysis_config_id: Uuid,
    /// The runs, in launch order.
    pub runs: Vec<NewRun>,
    /// The workflow's task ids in definition order: every run gets one pending task for each.
    pub task_ids: Vec<String>,
    /// Create runs even when a run of the same workflow and analysis already has the same run
    /// config (by sha256).
    pub allow_duplicates: bool,
}

/// Which runs [`crate::RunStore::list_runs`] returns, ordered by id (oldest first, or newest
/// first with `newest_first`); [`crate::RunStore::count_runs`] counts the runs of its
/// `workflow_id` and `analysis_id`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunFilter {
    /// Only runs of this workflow.
    pub workflow_id: Option<Id>,
    /// Only runs of this analysis.
    pub analysis_id: Option<Id>,
    /// Only runs in this state.
    pub status: Option<RunStatus>,
    /// Only runs that come after this id in the listing order (keyset paging): greater ids,
    /// or smaller ones with `newest_first`.
    pub after_id: Option<Id>,
    /// At most this many runs.
    pub limit: Option<u32>,
    /// List the newest runs first.
    pub newest_first: bool,
}
