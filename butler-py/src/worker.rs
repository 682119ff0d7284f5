//! `butler.Worker` and the executor of Python tasks: every attempt of a task defined with
//! `python = "module:function"` is a `python -m butler._task module:function` process, run by
//! the local executor, so timeouts, cancels, logs and lost leases work as for commands.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use butler_core::engine::{DEFAULT_TASK_QUEUE, Engine, EngineOptions, python_queue};
use butler_core::executor::{Attempt, CancellationToken, Executor, Finished};
use butler_core::model::Id;
use butler_providers::local::LocalExecutor;
use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;

use crate::client::{Client, Connection};
use crate::convert::repr_str;
use crate::errors::{ButlerError, invalid, to_py};
use crate::runtime::{block_on, runtime};

/// How often a blocking call wakes up to let Python handle signals such as Ctrl-C.
pub(crate) const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// The attempts run at once: `slots`, or one per CPU; 0 is refused.
pub(crate) fn slots_or_default(slots: Option<usize>) -> PyResult<usize> {
    let slots = slots.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    if slots == 0 {
        return Err(invalid(
            "slots=0 would run no task; give 1 or more, or None for one per CPU",
        ));
    }
    Ok(slots)
}

/// Options of an engine that executes Python tasks and schedules nothing.
pub(crate) fn python_options(
    home: PathBuf,
    slots: usize,
    only_runs: Option<Arc<HashSet<Id>>>,
) -> EngineOptions {
    let mut options = EngineOptions::new(home, slots);
    options.schedule = false;
    options.queue = python_queue(DEFAULT_TASK_QUEUE);
    options.only_runs = only_runs;
    options
}

/// Runs the attempts of Python tasks: the attempt's command, a `module:function` target,
/// becomes `'<interpreter>' -m butler._task '<target>'` and `PYTHONPATH` carries the import
/// path of the process that made the executor, so the attempt imports what it would.
/// Everything else, the attempt directory, the log, the timeout and cancel, is the local
/// executor's.
#[derive(Debug, Clone)]
pub struct PythonExecutor {
    inner: LocalExecutor,
    /// The interpreter, quoted for `sh`.
    python: String,
    /// The import path, `:`-separated.
    path: String,
}

impl PythonExecutor {
    /// An executor running attempts with this process's interpreter and `sys.path`.
    pub fn of_this_interpreter(py: Python<'_>) -> PyResult<Self> {
        let sys = py.import("sys")?;
        let executable = sys
            .getattr("executable")?
            .extract::<Option<String>>()?
            .filter(|exe| !exe.is_empty())
            .ok_or_else(|| {
                ButlerError::new_err(
                    "cannot run Python tasks: sys.executable is empty, so Butler cannot tell \
                     which interpreter to start; run the worker with a regular `python`",
                )
            })?;
        let cwd = std::env::current_dir().unwrap_or_default();
        let mut entries = Vec::new();
        for entry in sys.getattr("path")?.try_iter()? {
            // Entries that are not strings (rare, set by hand) cannot go in PYTHONPATH.
            let Ok(entry) = entry?.extract::<String>() else {
                continue;
            };
            entries.push(entry);
        }
        Ok(PythonExecutor {
            inner: LocalExecutor::new(),
            python: shell_quote(&executable),
            path: import_path(&cwd, &entries),
        })
    }
}

#[async_trait]
impl Executor for PythonExecutor {
    async fn execute(
        &self,
        mut attempt: Attempt,
        cancel: CancellationToken,
    ) -> butler_core::Result<Finished> {
        attempt.command = format!(
            "exec {} -m butler._task {}",
            self.python,
            shell_quote(&attempt.command)
        );
        let path = match attempt.env.get("PYTHONPATH") {
            // The task's own entries come first: it set them on purpose.
            Some(own) if !own.is_empty() => format!("{own}:{}", self.path),
            _ => self.path.clone(),
        };
        attempt.env.insert("PYTHONPATH".to_owned(), path);
        self.inner.execute(attempt, cancel).await
    }
}

/// `PYTHONPATH` for `entries` of `sys.path` seen from `cwd`: relative entries (`""` is the
/// working directory) made absolute, since an attempt runs in its own directory; duplicates
/// and entries holding the separator `:` left out.
fn import_path(cwd: &Path, entries: &[String]) -> String {
    let mut seen = HashSet::new();
    let mut parts = Vec::new();
    for entry in entries {
        let absolute = if entry.is_empty() {
            cwd.to_path_buf()
        } else {
            cwd.join(entry)
        };
        let text = absolute.to_string_lossy().into_owned();
        if !text.contains(':') && seen.insert(text.clone()) {
            parts.push(text);
        }
    }
    parts.join(":")
}

/// `text` as one `sh` word.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// While alive in the main thread, SIGTERM raises `KeyboardInterrupt` like Ctrl-C, so a
/// blocking call can stop cleanly; SIGTERM's default action comes back on [`TermGuard::restore`].
/// A handler the program set itself is left alone.
struct TermGuard {
    installed: bool,
}

impl TermGuard {
    fn install(py: Python<'_>) -> PyResult<TermGuard> {
        let threading = py.import("threading")?;
        let main = threading.call_method0("main_thread")?;
        let current = threading.call_method0("current_thread")?;
        if !main.is(&current) {
            return Ok(TermGuard { installed: false });
        }
        let signal = py.import("signal")?;
        let term = signal.getattr("SIGTERM")?;
        let old = signal.call_method1("getsignal", (&term,))?;
        if !old.eq(signal.getattr("SIG_DFL")?)? {
            return Ok(TermGuard { installed: false });
        }
        signal.call_method1("signal", (&term, signal.getattr("default_int_handler")?))?;
        Ok(TermGuard { installed: true })
    }

    fn restore(self, py: Python<'_>) -> PyResult<()> {
        if self.installed {
            let signal = py.import("signal")?;
            signal.call_method1(
                "signal",
                (signal.getattr("SIGTERM")?, signal.getattr("SIG_DFL")?),
            )?;
        }
        Ok(())
    }
}

/// A process that executes the Python tasks of Butler's runs: it takes their attempts from
/// the Python task queue, as `butler worker` does for commands, and runs each as a
/// `python -m butler._task` process with this interpreter and this `sys.path`. It schedules
/// nothing: a `butler server` (or a `Client.wait`) does.
#[pyclass(frozen, module = "butler")]
pub struct Worker {
    conn: Arc<Connection>,
    slots: usize,
    /// Stops the `run()` in progress, if any.
    stop: Mutex<Option<CancellationToken>>,
}

#[pymethods]
impl Worker {
    /// A worker over `client`'s store and queue, running `slots` attempts at once (default:
    /// one per CPU).
    #[new]
    #[pyo3(signature = (client, slots=None))]
    fn new(client: PyRef<'_, Client>, slots: Option<usize>) -> PyResult<Self> {
        Ok(Worker {
            conn: client.connection().clone(),
            slots: slots_or_default(slots)?,
            stop: Mutex::new(None),
        })
    }

    /// Attempts it runs at once.
    #[getter]
    fn slots(&self) -> usize {
        self.slots
    }

    /// The queue it takes attempts from.
    #[getter]
    fn queue(&self) -> String {
        python_queue(DEFAULT_TASK_QUEUE)
    }

    /// Executes Python tasks until the process gets Ctrl-C (SIGINT) or SIGTERM, or `stop()`
    /// is called, then returns; attempts still running are killed and given back to the
    /// queue. Another exception raised by a signal handler stops it too and propagates.
    fn run(&self, py: Python<'_>) -> PyResult<()> {
        let executor = PythonExecutor::of_this_interpreter(py)?;
        let conn = self.conn.clone();
        let backends = block_on(py, async move { conn.backends().await })?;
        let runtime = runtime()?;
        let guard = TermGuard::install(py)?;
        let stop = CancellationToken::new();
        *self.lock_stop() = Some(stop.clone());
        let options = python_options(self.conn.home.clone(), self.slots, None);
        let mut engine = {
            let _context = runtime.enter();
            Engine::start(backends.store, backends.queue, Arc::new(executor), options)
        };
        let outcome = loop {
            let step = py.detach(|| {
                runtime.block_on(async {
                    tokio::time::timeout(SIGNAL_CHECK, engine.run_until(stop.cancelled())).await
                })
            });
            match step {
                Ok(Ok(())) => break Ok(()),
                Ok(Err(err)) => break Err(to_py(err)),
                Err(_elapsed) => {}
            }
            if let Err(err) = py.check_signals() {
                break if err.is_instance_of::<PyKeyboardInterrupt>(py) {
                    Ok(())
                } else {
                    Err(err)
                };
            }
        };
        let stopped = py.detach(|| runtime.block_on(engine.stop()));
        *self.lock_stop() = None;
        guard.restore(py)?;
        outcome?;
        stopped.map_err(to_py)
    }

    /// Makes a `run()` in progress (in another thread) return; does nothing otherwise.
    fn stop(&self) {
        if let Some(stop) = self.lock_stop().as_ref() {
            stop.cancel();
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "Worker(db={}, queue={}, slots={})",
            repr_str(&self.conn.store_url),
            repr_str(&python_queue(DEFAULT_TASK_QUEUE)),
            self.slots
        )
    }
}

impl Worker {
    fn lock_stop(&self) -> std::sync::MutexGuard<'_, Option<CancellationToken>> {
        self.stop
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
