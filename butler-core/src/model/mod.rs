//! Butler's vocabulary: workflows, analyses, analysis runs and their tasks, and the workers
//! and schedulers that execute them.

mod analysis;
mod event;
mod run;
mod task;
mod token;
mod worker;
mod workflow;

pub use analysis::{Analysis, NewAnalysis, parse_date};
pub use event::{Event, EventFilter};
pub use run::{AnalysisRun, NewRun, NewRuns, RunFilter, RunStatus};
pub use task::{TaskInstance, TaskState};
pub use token::{ApiToken, NewToken, TOKEN_PREFIX, hash_token};
pub use worker::{RoleLease, WorkerInfo};
pub use workflow::{NewWorkflow, Workflow};

/// Identifier of a workflow, an analysis or a run: small integers, as Butler has always printed.
pub type Id = i64;

/// Whose config an update replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigOwner {
    /// A workflow's config layer.
    Workflow(Id),
    /// An analysis's config layer.
    Analysis(Id),
}
