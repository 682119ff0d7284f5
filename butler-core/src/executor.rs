//! The [`Executor`] trait: runs one task attempt and reports how it ended.
//!
//! An attempt lives in its own directory, [`attempt_dir`], which holds the effective config
//! ([`CONFIG_FILE`]) and the command's output ([`LOG_FILE`]).

use std::collections::BTreeMap;
use std::fmt::{self, Debug};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::model::Id;

/// Cancels a running attempt; re-exported so callers need no extra dependency.
pub use tokio_util::sync::CancellationToken;

/// An executor shared across tasks and threads.
pub type DynExecutor = dyn Executor;

/// Name of the log file in an attempt's directory: the command's stdout and stderr.
pub const LOG_FILE: &str = "output.log";

/// Name of the file in an attempt's directory that holds the attempt's effective config.
pub const CONFIG_FILE: &str = "config.json";

/// The directory of one attempt: `home/runs/<run_id>/<task_id>/<try_number>`.
///
/// `task_id` becomes one path component, so callers pass a validated task id: one without
/// `/` that is neither `.` nor `..`.
pub fn attempt_dir(home: &Path, run_id: Id, task_id: &str, try_number: u32) -> PathBuf {
    home.join("runs")
        .join(run_id.to_string())
        .join(task_id)
        .join(try_number.to_string())
}

/// The output log of one attempt: [`LOG_FILE`] in its [`attempt_dir`].
pub fn log_file(home: &Path, run_id: Id, task_id: &str, try_number: u32) -> PathBuf {
    attempt_dir(home, run_id, task_id, try_number).join(LOG_FILE)
}

/// One task attempt to execute.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// The analysis run the task belongs to.
    pub run_id: Id,
    /// The task's id within its workflow.
    pub task_id: String,
    /// Which try this is, starting at 1.
    pub try_number: u32,
    /// The shell command, already rendered; run with `/bin/sh -c`.
    pub command: String,
    /// The task's environment; the executor adds the `BUTLER_*` variables to it.
    pub env: BTreeMap<String, String>,
    /// The attempt's directory (see [`attempt_dir`]); the executor creates it.
    pub workdir: PathBuf,
    /// The run's effective config; the executor writes it to `workdir/config.json`. Shared:
    /// every attempt of a run has the same one.
    pub config: Arc<serde_json::Value>,
    /// Longest time from start to close; `None` lets the command run until it ends.
    pub timeout: Option<Duration>,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The command ran to its end with this exit code.
    Exited {
        /// The exit code; 0 is success.
        code: i32,
    },
    /// The command was killed by a signal it did not expect (not a timeout or a cancel).
    Signalled {
        /// The signal number, e.g. 15 for `SIGTERM`.
        signal: i32,
    },
    /// The command ran past the attempt's timeout and was killed with its children.
    TimedOut,
    /// The attempt was cancelled and the command was killed with its children.
    Cancelled,
    /// The command could not be started at all.
    FailedToStart {
        /// Why, as the operating system put it.
        reason: String,
    },
}

impl Outcome {
    /// Whether the attempt succeeded: the command exited with code 0.
    pub fn succeeded(&self) -> bool {
        matches!(self, Outcome::Exited { code: 0 })
    }

    /// The exit code, when the command ran to its end.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Outcome::Exited { code } => Some(*code),
            _ => None,
        }
    }

    /// A short phrase for messages and tables: `exit code 3`, `killed by signal 15 (SIGTERM)`,
    /// `killed after reaching its timeout`, `cancelled`, `failed to start: …`.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Exited { code } => format!("exit code {code}"),
            Outcome::Signalled { signal } => match signal_name(*signal) {
                Some(name) => format!("killed by signal {signal} ({name})"),
                None => format!("killed by signal {signal}"),
            },
            Outcome::TimedOut => "killed after reaching its timeout".to_owned(),
            Outcome::Cancelled => "cancelled".to_owned(),
            Outcome::FailedToStart { reason } => format!("failed to start: {reason}"),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The names of the signals that commonly end a task; their numbers are the same on every
/// platform Butler runs on.
fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return None,
    })
}

/// A finished attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// How it ended.
    pub outcome: Outcome,
    /// The log file with the command's output, `workdir/output.log`.
    pub log_path: PathBuf,
    /// How long the command ran, from start to close.
    pub duration: Duration,
}

/// Runs task attempts.
///
/// # Contract
///
/// For each [`Attempt`], every implementation:
///
/// - **Sets up the attempt's directory.** It creates [`Attempt::workdir`] (and its parents),
///   writes [`Attempt::config`] as JSON to `workdir/config.json` ([`CONFIG_FILE`]) and runs the
///   command with `workdir` as its current directory.
/// - **Keeps one log.** The command's stdout and stderr are both appended to
///   `workdir/output.log` ([`LOG_FILE`]), in the order they were written; the log holds nothing
///   but the command's output, and a retry's log is in its own directory.
/// - **Sets the environment**: the attempt's [`Attempt::env`], then `BUTLER_RUN_ID`,
///   `BUTLER_TASK_ID`, `BUTLER_TRY` and `BUTLER_CONFIG` (the absolute path of `config.json`),
///   which win over task variables of the same name.
/// - **Enforces the timeout and honours cancellation.** When [`Attempt::timeout`] passes, or
///   `cancel` is cancelled, it kills the command's whole process group, children included, and
///   returns [`Outcome::TimedOut`] or [`Outcome::Cancelled`]. A token already cancelled before
///   the start returns [`Outcome::Cancelled`] without running the command.
/// - **Leaves no process behind** once `execute` returns, or when its future is dropped.
/// - **Reports the command's fate as an [`Outcome`], not an error**: a non-zero exit, a signal,
///   or a command that cannot be spawned ([`Outcome::FailedToStart`]) are all `Ok`. An `Err` means
///   the attempt could not be set up at all (for example, the workdir is not writable) and
///   names the path at fault; the command did not run.
#[async_trait]
pub trait Executor: Send + Sync + Debug + 'static {
    /// Runs `attempt` to its end, its timeout, or `cancel`, whichever comes first.
    async fn execute(&self, attempt: Attempt, cancel: CancellationToken) -> Result<Finished>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_dir_nests_run_task_and_try_under_runs() {
        let dir = attempt_dir(Path::new("/home/u/.butler"), 42, "align", 3);
        assert_eq!(dir, PathBuf::from("/home/u/.butler/runs/42/align/3"));
    }

    #[test]
    fn attempt_dirs_of_retries_differ() {
        let home = Path::new("/b");
        assert_ne!(attempt_dir(home, 1, "t", 1), attempt_dir(home, 1, "t", 2));
    }

    #[test]
    fn describe_names_each_outcome() {
        assert_eq!(Outcome::Exited { code: 3 }.describe(), "exit code 3");
        assert_eq!(
            Outcome::Signalled { signal: 15 }.describe(),
            "killed by signal 15 (SIGTERM)"
        );
        assert_eq!(
            Outcome::Signalled { signal: 64 }.describe(),
            "killed by signal 64"
        );
        assert_eq!(
            Outcome::TimedOut.describe(),
            "killed after reaching its timeout"
        );
        assert_eq!(Outcome::Cancelled.describe(), "cancelled");
        assert_eq!(
            Outcome::FailedToStart {
                reason: "No such file or directory".into()
            }
            .to_string(),
            "failed to start: No such file or directory"
        );
    }

    #[test]
    fn only_exit_code_zero_succeeds() {
        assert!(Outcome::Exited { code: 0 }.succeeded());
        assert!(!Outcome::Exited { code: 1 }.succeeded());
        assert!(!Outcome::Signalled { signal: 9 }.succeeded());
        assert!(!Outcome::TimedOut.succeeded());
        assert!(!Outcome::Cancelled.succeeded());
        assert_eq!(Outcome::Exited { code: 3 }.exit_code(), Some(3));
        assert_eq!(Outcome::TimedOut.exit_code(), None);
    }

    #[test]
    fn executor_is_object_safe() {
        fn takes(_: Option<&DynExecutor>) {}
        takes(None);
    }
}
