use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Id;
use crate::config::Config;

/// An analysis: a named piece of work (a study, a batch of articles) with its own config layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// Identifier printed by `create-analysis`.
    pub id: Id,
    /// Name; several analyses may share one.
    pub name: String,
    /// The analysis's start date.
    pub start_date: NaiveDate,
    /// The analysis's current config layer (between the workflow's and the run's).
    pub config_id: Uuid,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// What [`crate::RunStore::create_analysis`] stores.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAnalysis {
    /// Name.
    pub name: String,
    /// Start date.
    pub start_date: NaiveDate,
    /// The analysis's config layer, stored as a new config.
    pub config: Config,
}
