use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Id;
use crate::config::Config;
use crate::definition::Definition;

/// A registered workflow: a named, versioned DAG definition with its config layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workflow {
    /// Identifier printed by `create-workflow`.
    pub id: Id,
    /// Name; unique together with `version`.
    pub name: String,
    /// Version string, as the user gave it.
    pub version: String,
    /// The validated DAG definition.
    pub definition: Definition,
    /// The workflow's current config layer (the lowest layer of every run's effective config).
    pub config_id: Uuid,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
}

/// What [`crate::RunStore::create_workflow`] stores.
#[derive(Debug, Clone, PartialEq)]
pub struct NewWorkflow {
    /// Name; unique together with `version`.
    pub name: String,
    /// Version string.
    pub version: String,
    /// The validated DAG definition.
    pub definition: Definition,
    /// The workflow's config layer, stored as a new config.
    pub config: Config,
}
