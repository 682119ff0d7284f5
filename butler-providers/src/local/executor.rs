//! [`LocalExecutor`]: each attempt is a `sh -c` process group on this machine.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use butler_core::executor::{
    Attempt, CONFIG_FILE, CancellationToken, Executor, Finished, LOG_FILE, Outcome,
};
use butler_core::{Error, Result};
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Runs each attempt as `/bin/sh -c <command>` (a command too long for one argument from a
/// file, [`SCRIPT_FILE`]) in a process group of its own, so a timeout or a cancel kills the
/// command and every process it started.
///
/// It follows the [`Executor`] contract; the log is opened once in append mode and shared by
/// stdout and stderr, so their lines land in the order the command wrote them.
#[derive(Debug, Default, Clone)]
pub struct LocalExecutor {
    _private: (),
}

impl LocalExecutor {
    /// A local executor.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Executor for LocalExecutor {
    async fn execute(&self, attempt: Attempt, cancel: CancellationToken) -> Result<Finished> {
        // Creating a directory and two small files takes microseconds; doing it inline keeps
        // thread hand-offs off the spawn path, which dominates short tasks.
        let workdir = std::path::absolute(&attempt.workdir).map_err(|e| {
            setup_error("cannot resolve the attempt directory", &attempt.workdir, e)
        })?;
        fs::create_dir_all(&workdir)
            .map_err(|e| setup_error("cannot create the attempt directory", &workdir, e))?;
        let config_path = workdir.join(CONFIG_FILE);
        let config = serde_json::to_vec_pretty(&*attempt.config).map_err(|e| {
            Error::backend(
                format!("cannot serialize the config of task {}", attempt.task_id),
                e,
            )
        })?;
        fs::write(&config_path, config)
            .map_err(|e| setup_error("cannot write the attempt's config", &config_path, e))?;
        let script = if attempt.command.len() > LONGEST_ARGUMENT {
            let path = workdir.join(SCRIPT_FILE);
            fs::write(&path, &attempt.command)
                .map_err(|e| setup_error("cannot write the attempt's command", &path, e))?;
            Some(path)
        } else {
            None
        };
        let log_path = workdir.join(LOG_FILE);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| setup_error("cannot open the attempt's log", &log_path, e))?;
        let log_for_stdout = log
            .try_clone()
            .map_err(|e| setup_error("cannot share the attempt's log", &log_path, e))?;

        if cancel.is_cancelled() {
            return Ok(Finished {
                outcome: Outcome::Cancelled,
                log_path,
                duration: Duration::ZERO,
            });
        }

        let started = Instant::now();
        let shell = command(
            &attempt,
            script.as_deref(),
            &workdir,
            &config_path,
            log_for_stdout,
            log,
        )
        .spawn();
        let child = match shell {
            Ok(child) => child,
            Err(e) => {
                return Ok(Finished {
                    outcome: Outcome::FailedToStart {
                        reason: format!("cannot run {SHELL} in {}: {e}", workdir.display()),
                    },
                    log_path,
                    duration: started.elapsed(),
                });
            }
        };
        let outcome = run(child, attempt.timeout, &cancel).await.map_err(|e| {
            Error::backend(
                format!(
                    "lost track of the process of task {} (run {}, try {})",
                    attempt.task_id, attempt.run_id, attempt.try_number
                ),
                e,
            )
        })?;
        Ok(Finished {
            outcome,
            log_path,
            duration: started.elapsed(),
        })
    }
}

/// The shell that runs every command, by absolute path as `system(3)` runs it: a name would be
/// looked up along `PATH` at every spawn, one failed `execve` per directory before it, and a
/// task's own `PATH` could pick another shell.
const SHELL: &str = "/bin/sh";

/// The longest command passed to the shell as an argument. Linux refuses to start a program
/// given one argument over 128 KiB (`MAX_ARG_STRLEN`), and a template that lists a few thousand
/// samples' files renders more; a longer command is run from [`SCRIPT_FILE`] instead.
const LONGEST_ARGUMENT: usize = 64 * 1024;

/// Name of the file in an attempt's directory that holds a command over [`LONGEST_ARGUMENT`].
pub const SCRIPT_FILE: &str = "command.sh";

/// The shell command of `attempt` in a new process group, with both outputs going to `log`:
/// `sh -c COMMAND`, or `sh SCRIPT` when the command was written to `script`.
fn command(
    attempt: &Attempt,
    script: Option<&Path>,
    workdir: &Path,
    config_path: &Path,
    stdout: File,
    stderr: File,
) -> Command {
    let mut cmd = Command::new(SHELL);
    match script {
        Some(script) => cmd.arg(script),
        None => cmd.arg("-c").arg(&attempt.command),
    };
    cmd.current_dir(workdir)
        .envs(&attempt.env)
        .env("BUTLER_RUN_ID", attempt.run_id.to_string())
        .env("BUTLER_TASK_ID", &attempt.task_id)
        .env("BUTLER_TRY", attempt.try_number.to_string())
        .env("BUTLER_CONFIG", config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

/// Waits for `child` until it exits, `timeout` passes or `cancel` fires, and makes sure no
/// process of its group outlives the call.
async fn run(
    mut child: Child,
    timeout: Option<Duration>,
    cancel: &CancellationToken,
) -> io::Result<Outcome> {
    // Only a child already reaped has no id, which spawn never returns.
    let pid = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .ok_or_else(|| io::Error::other("the spawned process has no usable id"))?;
    let group = ProcessGroup(Pid::from_raw(pid));
    let deadline = async {
        match timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        status = child.wait() => Ok(exit_outcome(status?)),
        () = deadline => {
            group.kill();
            // Should the group kill fail, ending the shell itself keeps the wait below finite.
            child.start_kill().ok();
            child.wait().await?;
            Ok(Outcome::TimedOut)
        }
        () = cancel.cancelled() => {
            group.kill();
            child.start_kill().ok();
            child.wait().await?;
            Ok(Outcome::Cancelled)
        }
    }
    // `group` is dropped here and kills whatever the command left running in the background.
}

fn exit_outcome(status: ExitStatus) -> Outcome {
    match (status.code(), status.signal()) {
        (Some(code), _) => Outcome::Exited { code },
        (None, Some(signal)) => Outcome::Signalled { signal },
        (None, None) => Outcome::FailedToStart {
            reason: format!("the process ended with an unrecognised status {status}"),
        },
    }
}

/// The process group of one attempt; killed when dropped, so an attempt whose future is
/// dropped, or whose shell exited leaving background jobs, leaves nothing running.
///
/// The group id is the shell's pid. Linux does not hand out a pid again while a process group
/// of that number has members, and allocates pids cyclically, so killing the group after the
/// shell was reaped cannot reach an unrelated process in practice.
struct ProcessGroup(Pid);

impl ProcessGroup {
    fn kill(&self) {
        match killpg(self.0, Signal::SIGKILL) {
            // ESRCH: every process of the group has already ended.
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => {
                tracing::warn!(pgid = self.0.as_raw(), error = %e, "cannot kill process group")
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

fn setup_error(what: &str, path: &Path, source: io::Error) -> Error {
    Error::backend(
        format!(
            "{what} {} (check that BUTLER_HOME is a writable directory)",
            path.display()
        ),
        source,
    )
}
