//! The one error type of `butler-core`, shared by every backend.

use std::fmt;

/// A `Result` whose error is Butler's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Boxed source error carried by [`Error::Backend`] and [`Error::Unavailable`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in Butler, in the shape a caller acts on.
///
/// Messages are complete sentences that name the input, the problem and the next step, so a
/// frontend prints them as they are.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The named object does not exist.
    #[error("{kind} {id} not found; {hint}")]
    NotFound {
        /// What was looked up (`workflow`, `analysis`, `run`, `config`, …).
        kind: Kind,
        /// The identifier that was asked for.
        id: String,
        /// What the user can do about it.
        hint: &'static str,
    },
    /// An object with the same identity already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The object moved on: a compare-and-set found another state, or the change would duplicate
    /// existing work. Nothing was changed.
    #[error("{0}")]
    Conflict(String),
    /// The input is wrong; the message names the input, the problem and the fix.
    #[error("{0}")]
    InvalidInput(String),
    /// The backend cannot do this.
    #[error("{0}")]
    NotSupported(String),
    /// A service could not be reached; trying again later may succeed.
    #[error("{message}: {source}")]
    Unavailable {
        /// What was being attempted, and where.
        message: String,
        /// The underlying failure.
        #[source]
        source: BoxError,
    },
    /// Any other failure inside a backend.
    #[error("{message}: {source}")]
    Backend {
        /// What was being attempted.
        message: String,
        /// The underlying failure.
        #[source]
        source: BoxError,
    },
}

/// The kinds of object Butler tracks, as named in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// A registered workflow.
    Workflow,
    /// An analysis.
    Analysis,
    /// An analysis run.
    Run,
    /// A stored config.
    Config,
    /// A task of a run.
    Task,
    /// An API token of the server.
    Token,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Workflow => "workflow",
            Kind::Analysis => "analysis",
            Kind::Run => "run",
            Kind::Config => "config",
            Kind::Task => "task",
            Kind::Token => "token",
        })
    }
}

impl Error {
    /// A [`Error::NotFound`] with the hint that fits `kind`.
    pub fn not_found(kind: Kind, id: impl fmt::Display) -> Self {
        let hint = match kind {
            Kind::Workflow => "list them with `butler list-workflows`",
            Kind::Analysis => "list them with `butler list-analyses`",
            Kind::Run => "list them with `butler list-runs`",
            Kind::Config => "config ids are printed by `butler list-workflows` and `list-analyses`",
            Kind::Task => "the run's tasks are shown by `butler run-status`",
            Kind::Token => "list them with `butler token list`",
        };
        Error::NotFound {
            kind,
            id: id.to_string(),
            hint,
        }
    }

    /// A [`Error::Backend`] wrapping `source`.
    pub fn backend(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            message: message.into(),
            source: source.into(),
        }
    }

    /// An [`Error::Unavailable`] wrapping `source`.
    pub fn unavailable(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Unavailable {
            message: message.into(),
            source: source.into(),
        }
    }

    /// The [`Error::AlreadyExists`] of a second token with the same name.
    pub fn token_exists(name: &str) -> Self {
        Error::AlreadyExists(format!(
            "a token named {name:?} already exists; choose another name, or delete it first \
             with `butler token delete --name {name}`"
        ))
    }

    /// Whether trying the same call again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}

impl Error {
    /// The [`Error::Conflict`] of a launch that would repeat runs: each pair is the new run's
    /// source (a file name, or its position in the launch) and the existing run it duplicates.
    pub fn duplicate_runs(duplicates: &[(String, crate::model::Id)]) -> Self {
        const SHOWN: usize = 20;
        let mut lines: Vec<String> = duplicates
            .iter()
            .take(SHOWN)
            .map(|(source, run)| format!("  {source} duplicates run {run}"))
            .collect();
        if duplicates.len() > SHOWN {
            lines.push(format!("  … and {} more", duplicates.len() - SHOWN));
        }
        Error::Conflict(format!(
            "{} run config(s) were already launched for this workflow and analysis; no run was \
             created:\n{}\nTo launch them again as new runs, allow duplicates \
             (`--allow-duplicates` on the command line, `allow_duplicates=True` in Python).",
            duplicates.len(),
            lines.join("\n")
        ))
    }
}
