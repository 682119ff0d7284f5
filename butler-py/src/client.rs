//! `butler.connect` and `Client`: the tracker and the embedded engine.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use butler_core::DynRunStore;
use butler_core::config;
use butler_core::definition::{Definition, Format};
use butler_core::engine::control::ResetScope;
use butler_core::engine::{Engine, EngineOptions};
use butler_core::model::{ConfigOwner, Id, RunFilter, RunStatus, parse_date};
use butler_core::tracker::{RunSource, Tracker};
use butler_providers::connect::{self as backends, Backends};
use butler_providers::local::LocalExecutor;
use chrono::{NaiveDate, Utc};
use pyo3::exceptions::{PyTimeoutError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::analysis::{Analysis, analysis_id};
use crate::convert::{self, ConfigArg, as_path, repr_str, type_name};
use crate::errors::{invalid, to_py};
use crate::run::{Run, run_id};
use crate::runtime::{block_on, runtime};
use crate::worker::{PythonExecutor, SIGNAL_CHECK, python_options, slots_or_default};
use crate::workflow::{Workflow, workflow_id};

/// Where a client's tracker lives, and its open backends.
#[derive(Debug)]
pub struct Connection {
    /// `BUTLER_HOME`: attempt directories and their logs live under `runs/` in it.
    pub home: PathBuf,
    /// The run store's URL.
    pub store_url: String,
    /// The task queue's URL; `None` keeps the queue in the store.
    pub queue_url: Option<String>,
    /// The backends and the process that opened them.
    backends: Mutex<(u32, Backends)>,
}

impl Connection {
    async fn open(
        home: PathBuf,
        store_url: String,
        queue_url: Option<String>,
    ) -> butler_core::Result<Connection> {
        let backends = backends::connect(&store_url, queue_url.as_deref()).await?;
        Ok(Connection {
            home,
            store_url,
            queue_url,
            backends: Mutex::new((std::process::id(), backends)),
        })
    }

    /// The backends, opened again in a forked child: the parent's database connections live
    /// on threads the child does not have.
    pub async fn backends(&self) -> butler_core::Result<Backends> {
        let pid = std::process::id();
        {
            let slot = self.lock();
            // An in-memory store cannot be opened again: the child keeps its copy.
            if slot.0 == pid || is_memory(&self.store_url) {
                return Ok(slot.1.clone());
            }
        }
        let fresh = backends::connect(&self.store_url, self.queue_url.as_deref()).await?;
        let mut slot = self.lock();
        if slot.0 != pid {
            let inherited = std::mem::replace(&mut slot.1, fresh.clone());
            slot.0 = pid;
            // Closing it would talk to the parent's connection threads.
            std::mem::forget(inherited);
        }
        Ok(slot.1.clone())
    }

    /// The tracker over this connection's store.
    pub async fn tracker(&self) -> butler_core::Result<Tracker> {
        Ok(Tracker::new(self.backends().await?.store))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u32, Backends)> {
        self.backends
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn is_memory(url: &str) -> bool {
    url.trim().to_ascii_lowercase().starts_with("memory:")
}

/// Opens Butler's tracker.
///
/// `db` is a store URL or a SQLite file path (default: `BUTLER_DB`, else
/// `sqlite://$BUTLER_HOME/butler.db`), `queue` a queue URL (default: `BUTLER_QUEUE`, else the
/// store's own queue), `home` Butler's home (default: `BUTLER_HOME`, else `~/.butler`, created
/// when the default store lives there).
#[pyfunction]
#[pyo3(signature = (db=None, queue=None, home=None))]
pub fn connect(
    py: Python<'_>,
    db: Option<&Bound<'_, PyAny>>,
    queue: Option<String>,
    home: Option<PathBuf>,
) -> PyResult<Client> {
    let home = match home.filter(|h| !h.as_os_str().is_empty()) {
        Some(home) => home,
        None => match non_empty_env("BUTLER_HOME") {
            Some(home) => PathBuf::from(home),
            None => match non_empty_env("HOME") {
                Some(user_home) => PathBuf::from(user_home).join(".butler"),
                None => {
                    return Err(invalid(
                        "cannot find Butler's home: neither BUTLER_HOME nor HOME is set; pass \
                         home= or set BUTLER_HOME to a directory Butler may write to",
                    ));
                }
            },
        },
    };
    let db = match db {
        Some(db) if !db.is_none() => match as_path(db)? {
            Some(path) => Some(path.to_string_lossy().into_owned()),
            None => {
                return Err(PyTypeError::new_err(format!(
                    "db must be a store URL or a database path, not {}",
                    type_name(db)
                )));
            }
        },
        _ => None,
    };
    let db = db
        .filter(|url| !url.trim().is_empty())
        .or_else(|| non_empty_env("BUTLER_DB").map(|v| v.to_string_lossy().into_owned()));
    let queue = queue
        .filter(|url| !url.trim().is_empty())
        .or_else(|| non_empty_env("BUTLER_QUEUE").map(|v| v.to_string_lossy().into_owned()));
    let store_url = match db {
        Some(url) => url,
        None => {
            std::fs::create_dir_all(&home).map_err(|err| {
                invalid(format!(
                    "cannot create Butler's home {}: {err}; set BUTLER_HOME to a directory you \
                     may write to, or pass db=",
                    home.display()
                ))
            })?;
            backends::default_store_url(&home)
        }
    };
    let connection = block_on(py, Connection::open(home, store_url, queue))?;
    Ok(Client {
        conn: Arc::new(connection),
    })
}

fn non_empty_env(name: &str) -> Option<OsString> {
    std::env::var_os(name).filter(|value| !value.is_empty())
}

/// A connection to Butler's tracker: register workflows and analyses, launch runs, follow
/// them, and execute them in this process with `wait`.
#[pyclass(frozen, module = "butler")]
pub struct Client {
    conn: Arc<Connection>,
}

impl Client {
    /// The connection it speaks through.
    pub(crate) fn connection(&self) -> &Arc<Connection> {
        &self.conn
    }
}

#[pymethods]
impl Client {
    /// The run store's URL.
    #[getter]
    fn db(&self) -> &str {
        &self.conn.store_url
    }

    /// The task queue's URL, `None` when the queue lives in the store.
    #[getter]
    fn queue(&self) -> Option<&str> {
        self.conn.queue_url.as_deref()
    }

    /// Butler's home: attempt directories and their logs are under `runs/` in it.
    #[getter]
    fn home(&self) -> PathBuf {
        self.conn.home.clone()
    }

    fn __repr__(&self) -> String {
        format!(
            "Client(db={}, home={})",
            repr_str(&self.conn.store_url),
            repr_str(&self.conn.home.display().to_string())
        )
    }

    /// Registers workflow `name` `version` with its config (a dict or a JSON file's path) and
    /// its definition (a TOML or JSON file's path, or a dict of the same shape).
    fn create_workflow(
        &self,
        py: Python<'_>,
        name: String,
        version: String,
        config: &Bound<'_, PyAny>,
        definition: &Bound<'_, PyAny>,
    ) -> PyResult<Workflow> {
        let config = ConfigArg::extract(config, "workflow config")?;
        let definition = DefinitionArg::extract(definition)?;
        let conn = self.conn.clone();
        let workflow = block_on(py, async move {
            let config = config.load()?;
            let definition = definition.load()?;
            conn.tracker()
                .await?
                .create_workflow(&name, &version, config, definition)
                .await
        })?;
        Ok(Workflow::new(workflow, self.conn.clone()))
    }

    /// Every workflow, oldest first.
    fn list_workflows(&self, py: Python<'_>) -> PyResult<Vec<Workflow>> {
        let conn = self.conn.clone();
        let workflows = block_on(py, async move {
            conn.tracker().await?.store().list_workflows().await
        })?;
        Ok(workflows
            .into_iter()
            .map(|w| Workflow::new(w, self.conn.clone()))
            .collect())
    }

    /// The workflow with this id.
    fn workflow(&self, py: Python<'_>, id: &Bound<'_, PyAny>) -> PyResult<Workflow> {
        let id = workflow_id(id)?;
        let conn = self.conn.clone();
        let workflow = block_on(py, async move {
            conn.tracker().await?.store().get_workflow(id).await
        })?;
        Ok(Workflow::new(workflow, self.conn.clone()))
    }

    /// Creates analysis `name` starting on `date` (a `datetime.date`, or a string
    /// `YYYY-MM-DD` or `MM-DD-YYYY`; default today, UTC) with its config (a dict or a JSON
    /// file's path).
    #[pyo3(signature = (name, date=None, *, config))]
    fn create_analysis(
        &self,
        py: Python<'_>,
        name: String,
        date: Option<&Bound<'_, PyAny>>,
        config: &Bound<'_, PyAny>,
    ) -> PyResult<Analysis> {
        let start_date = match date {
            None => Utc::now().date_naive(),
            Some(date) if date.is_none() => Utc::now().date_naive(),
            Some(date) => match date.cast::<PyString>() {
                Ok(text) => parse_date(&text.to_cow()?).map_err(to_py)?,
                Err(_) => date.extract::<NaiveDate>().map_err(|_| {
                    PyTypeError::new_err(format!(
                        "date must be a datetime.date or a string YYYY-MM-DD or MM-DD-YYYY, \
                         not {}",
                        type_name(date)
                    ))
                })?,
            },
        };
        let config = ConfigArg::extract(config, "analysis config")?;
        let conn = self.conn.clone();
        let analysis = block_on(py, async move {
            let config = config.load()?;
            conn.tracker()
                .await?
                .create_analysis(&name, start_date, config)
                .await
        })?;
        Ok(Analysis::new(analysis, self.conn.clone()))
    }

    /// Every analysis, oldest first.
    fn list_analyses(&self, py: Python<'_>) -> PyResult<Vec<Analysis>> {
        let conn = self.conn.clone();
        let analyses = block_on(py, async move {
            conn.tracker().await?.store().list_analyses().await
        })?;
        Ok(analyses
            .into_iter()
            .map(|a| Analysis::new(a, self.conn.clone()))
            .collect())
    }

    /// The analysis with this id.
    fn analysis(&self, py: Python<'_>, id: &Bound<'_, PyAny>) -> PyResult<Analysis> {
        let id = analysis_id(id)?;
        let conn = self.conn.clone();
        let analysis = block_on(py, async move {
            conn.tracker().await?.store().get_analysis(id).await
        })?;
        Ok(Analysis::new(analysis, self.conn.clone()))
    }

    /// Replaces the config of exactly one of `workflow` or `analysis` for runs launched from
    /// now on; returns the new config's id.
    #[pyo3(signature = (workflow=None, analysis=None, *, config))]
    fn update_config(
        &self,
        py: Python<'_>,
        workflow: Option<&Bound<'_, PyAny>>,
        analysis: Option<&Bound<'_, PyAny>>,
        config: &Bound<'_, PyAny>,
    ) -> PyResult<String> {
        let workflow = workflow
            .filter(|w| !w.is_none())
            .map(workflow_id)
            .transpose()?;
        let analysis = analysis
            .filter(|a| !a.is_none())
            .map(analysis_id)
            .transpose()?;
        let owner = match (workflow, analysis) {
            (Some(id), None) => ConfigOwner::Workflow(id),
            (None, Some(id)) => ConfigOwner::Analysis(id),
            _ => {
                return Err(invalid(
                    "give exactly one of workflow= or analysis= to say whose config to replace",
                ));
            }
        };
        let config = ConfigArg::extract(config, "config")?;
        let conn = self.conn.clone();
        let stored = block_on(py, async move {
            let data = config.load()?;
            conn.tracker().await?.update_config(owner, data).await
        })?;
        Ok(stored.id.to_string())
    }

    /// Launches `workflow` for `analysis`: one run per run config, all or none. `configs` is
    /// a directory (every `*.json` under it, sorted), or a list of dicts and JSON file paths.
    #[pyo3(signature = (workflow, analysis, configs, allow_duplicates=false))]
    fn launch(
        &self,
        py: Python<'_>,
        workflow: &Bound<'_, PyAny>,
        analysis: &Bound<'_, PyAny>,
        configs: &Bound<'_, PyAny>,
        allow_duplicates: bool,
    ) -> PyResult<Vec<Run>> {
        let workflow = workflow_id(workflow)?;
        let analysis = analysis_id(analysis)?;
        let sources = run_sources(configs)?;
        let conn = self.conn.clone();
        let runs = block_on(py, async move {
            let mut runs = Vec::with_capacity(sources.len());
            for source in sources {
                match source {
                    Source::Inline(config) => runs.push(RunSource {
                        source: None,
                        config,
                    }),
                    Source::Path(path) => {
                        for file in config::run_config_files(&path)? {
                            runs.push(RunSource {
                                config: config::read_json_file(&file)?,
                                source: Some(file.display().to_string()),
                            });
                        }
                    }
                }
            }
            conn.tracker()
                .await?
                .launch(workflow, analysis, runs, allow_duplicates)
                .await
        })?;
        Ok(runs
            .into_iter()
            .map(|run| Run::new(run, self.conn.clone()))
            .collect())
    }

    /// The runs of `workflow` and of `analysis` in `status` (each filter optional), oldest
    /// first.
    #[pyo3(signature = (workflow=None, analysis=None, status=None))]
    fn runs(
        &self,
        py: Python<'_>,
        workflow: Option<&Bound<'_, PyAny>>,
        analysis: Option<&Bound<'_, PyAny>>,
        status: Option<String>,
    ) -> PyResult<Vec<Run>> {
        let filter = RunFilter {
            workflow_id: workflow
                .filter(|w| !w.is_none())
                .map(workflow_id)
                .transpose()?,
            analysis_id: analysis
                .filter(|a| !a.is_none())
                .map(analysis_id)
                .transpose()?,
            status: status
                .as_deref()
                .map(str::parse::<RunStatus>)
                .transpose()
                .map_err(to_py)?,
            after_id: None,
            limit: None,
            newest_first: false,
        };
        let conn = self.conn.clone();
        let runs = block_on(py, async move {
            conn.tracker().await?.store().list_runs(&filter).await
        })?;
        Ok(runs
            .into_iter()
            .map(|run| Run::new(run, self.conn.clone()))
            .collect())
    }

    /// The run with this id, as stored now.
    fn run(&self, py: Python<'_>, id: &Bound<'_, PyAny>) -> PyResult<Run> {
        let id = run_id(id)?;
        Run::fetch(py, &self.conn, id)
    }

    /// How many runs of `analysis` are in `status`, or without a status a dict of every
    /// status (in lifecycle order) to its count.
    #[pyo3(signature = (analysis, status=None))]
    fn get_run_count<'py>(
        &self,
        py: Python<'py>,
        analysis: &Bound<'py, PyAny>,
        status: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let analysis = analysis_id(analysis)?;
        let only = status
            .as_deref()
            .map(str::parse::<RunStatus>)
            .transpose()
            .map_err(to_py)?;
        let conn = self.conn.clone();
        let counts = block_on(py, async move {
            conn.tracker().await?.run_counts(analysis).await
        })?;
        if let Some(only) = only {
            let count = counts.get(&only).copied().unwrap_or(0);
            return Ok(count.into_pyobject(py)?.into_any());
        }
        let dict = PyDict::new(py);
        for (status, count) in counts {
            dict.set_item(status.as_str(), count)?;
        }
        Ok(dict.into_any())
    }

    /// Executes `runs` (Runs or ids) in this process until each has finished, with `slots`
    /// attempts of commands and `slots` of Python functions at once (default: one per CPU),
    /// and returns them as stored then. Python tasks run with this interpreter and
    /// `sys.path`. Other runs are left to other processes. After `timeout` seconds the engine
    /// stops and `TimeoutError` is raised; the runs are safe in the store and a later wait
    /// resumes them.
    #[pyo3(signature = (runs, timeout=None, slots=None))]
    fn wait(
        &self,
        py: Python<'_>,
        runs: &Bound<'_, PyAny>,
        timeout: Option<f64>,
        slots: Option<usize>,
    ) -> PyResult<Vec<Run>> {
        let ids = ids_of(runs)?;
        let deadline = match timeout {
            None => None,
            Some(seconds) if seconds.is_finite() && seconds >= 0.0 => {
                Some(Instant::now() + Duration::from_secs_f64(seconds.min(1e9)))
            }
            Some(seconds) => {
                return Err(invalid(format!(
                    "timeout={seconds} is not a number of seconds; give 0 or more, or None to \
                     wait until every run has finished"
                )));
            }
        };
        let slots = slots_or_default(slots)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.conn.clone();
        let wanted = ids.clone();
        let (backends, python_tasks) = block_on(py, async move {
            let backends = conn.backends().await?;
            let python_tasks = any_python_task(backends.store.as_ref(), &wanted).await?;
            Ok((backends, python_tasks))
        })?;
        let python_executor = if python_tasks {
            Some(PythonExecutor::of_this_interpreter(py)?)
        } else {
            None
        };
        let runtime = runtime()?;
        let only_runs = Some(Arc::new(ids.iter().copied().collect::<HashSet<Id>>()));
        let mut options = EngineOptions::new(self.conn.home.clone(), slots);
        options.only_runs = only_runs.clone();
        let (mut engine, mut python_engine) = {
            let _context = runtime.enter();
            let engine = Engine::start(
                backends.store.clone(),
                backends.queue.clone(),
                Arc::new(LocalExecutor::new()),
                options,
            );
            // The scheduler above sends Python tasks to their own queue; these workers take
            // them.
            let python_engine = python_executor.map(|executor| {
                Engine::start(
                    backends.store,
                    backends.queue,
                    Arc::new(executor),
                    python_options(self.conn.home.clone(), slots, only_runs),
                )
            });
            (engine, python_engine)
        };
        let finished = AtomicUsize::new(0);
        let outcome = {
            // Dropping `waiting` (on a timeout) drops store queries in flight, which needs the
            // runtime's context; this guard is dropped after it.
            let _context = runtime.enter();
            let wait = engine.wait_for(&ids, |done| {
                finished.store(done.len(), Ordering::Relaxed);
            });
            let python_failed = async {
                match python_engine.as_mut() {
                    Some(python) => python.run_until(std::future::pending()).await,
                    None => std::future::pending().await,
                }
            };
            let mut waiting = Box::pin(async move {
                tokio::select! {
                    done = wait => done,
                    failed = python_failed => Err(failed.err().unwrap_or_else(|| {
                        butler_core::Error::Conflict("the Python workers stopped".to_owned())
                    })),
                }
            });
            loop {
                let slice = match deadline {
                    Some(deadline) => deadline
                        .saturating_duration_since(Instant::now())
                        .min(SIGNAL_CHECK),
                    None => SIGNAL_CHECK,
                };
                let step = py.detach(|| {
                    runtime.block_on(async { tokio::time::timeout(slice, &mut waiting).await })
                });
                if let Ok(result) = step {
                    break Outcome::Done(result);
                }
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    break Outcome::TimedOut;
                }
                if let Err(err) = py.check_signals() {
                    break Outcome::Interrupted(err);
                }
            }
        };
        let stopped = py.detach(|| {
            runtime.block_on(async {
                let python_stopped = match python_engine {
                    Some(python) => python.stop().await,
                    None => Ok(()),
                };
                engine.stop().await.and(python_stopped)
            })
        });
        match outcome {
            Outcome::Done(Err(err)) => return Err(to_py(err)),
            Outcome::Interrupted(err) => return Err(err),
            Outcome::TimedOut => {
                stopped.map_err(to_py)?;
                return Err(PyTimeoutError::new_err(format!(
                    "{} of {} runs finished within {}s; the engine was stopped and the rest are \
                     safe in the store: call wait() again to resume them",
                    finished.load(Ordering::Relaxed),
                    ids.len(),
                    timeout.unwrap_or_default()
                )));
            }
            Outcome::Done(Ok(_)) => stopped.map_err(to_py)?,
        }
        let conn = self.conn.clone();
        let refreshed = block_on(py, async move {
            let store = conn.backends().await?.store;
            let mut runs = Vec::with_capacity(ids.len());
            for id in ids {
                runs.push(store.get_run(id).await?);
            }
            Ok(runs)
        })?;
        Ok(refreshed
            .into_iter()
            .map(|run| Run::new(run, self.conn.clone()))
            .collect())
    }

    /// Puts finished `run` back to `ready` so that it runs again: the tasks that did not
    /// succeed, or with `all=True` every task.
    #[pyo3(signature = (run, all=false))]
    fn reset(&self, py: Python<'_>, run: &Bound<'_, PyAny>, all: bool) -> PyResult<()> {
        let id = run_id(run)?;
        let scope = if all {
            ResetScope::All
        } else {
            ResetScope::Failed
        };
        let conn = self.conn.clone();
        block_on(py, async move {
            conn.tracker().await?.reset_run(id, scope).await
        })
    }

    /// Cancels unfinished `run`: its waiting tasks will not start and its running attempts
    /// are killed.
    fn cancel(&self, py: Python<'_>, run: &Bound<'_, PyAny>) -> PyResult<()> {
        let id = run_id(run)?;
        let conn = self.conn.clone();
        block_on(
            py,
            async move { conn.tracker().await?.cancel_run(id).await },
        )
    }
}

/// How a wait ended.
enum Outcome {
    Done(butler_core::Result<Vec<butler_core::engine::RunFinished>>),
    TimedOut,
    Interrupted(PyErr),
}

/// A workflow definition argument: a file's path, or a dict of the file's shape.
enum DefinitionArg {
    File(PathBuf),
    Json(String),
}

impl DefinitionArg {
    fn extract(obj: &Bound<'_, PyAny>) -> PyResult<DefinitionArg> {
        if let Some(path) = as_path(obj)? {
            return Ok(DefinitionArg::File(path));
        }
        if obj.cast::<PyDict>().is_ok() {
            let value = convert::to_json(obj, "workflow definition")?;
            // Pretty, so the line and column of a type error point at one field.
            let text = serde_json::to_string_pretty(&value)
                .map_err(|err| invalid(format!("workflow definition: {err}")))?;
            return Ok(DefinitionArg::Json(text));
        }
        Err(PyTypeError::new_err(format!(
            "definition must be the path of a TOML or JSON file, or a dict, not {}",
            type_name(obj)
        )))
    }

    fn load(self) -> butler_core::Result<Definition> {
        match self {
            DefinitionArg::File(path) => Definition::from_file(&path),
            DefinitionArg::Json(text) => {
                Definition::parse(&text, Format::Json, "workflow definition (dict)")
            }
        }
    }
}

/// One element of a launch's configs.
enum Source {
    Inline(serde_json::Value),
    Path(PathBuf),
}

/// The run configs of a launch: a directory or file path, or an iterable of dicts and paths.
fn run_sources(configs: &Bound<'_, PyAny>) -> PyResult<Vec<Source>> {
    if let Some(path) = as_path(configs)? {
        return Ok(vec![Source::Path(path)]);
    }
    if configs.cast::<PyDict>().is_ok() {
        return Err(PyTypeError::new_err(
            "configs must be a directory, or a list of dicts or JSON file paths; to launch one \
             run from a dict, pass [config]",
        ));
    }
    let items = configs.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "configs must be a directory, or a list of dicts or JSON file paths, not {}",
            type_name(configs)
        ))
    })?;
    let mut sources = Vec::new();
    for (index, item) in items.enumerate() {
        let item = item?;
        match as_path(&item)? {
            Some(path) => sources.push(Source::Path(path)),
            None => sources.push(Source::Inline(convert::to_json(
                &item,
                &format!("run config #{}", index + 1),
            )?)),
        }
    }
    Ok(sources)
}

/// Whether a workflow of runs `ids` has a Python task; fails with the store's `NotFound` for
/// the first of `ids` that is no run, which would never finish. Reads the runs in pages
/// rather than one by one.
async fn any_python_task(store: &DynRunStore, ids: &[Id]) -> butler_core::Result<bool> {
    let mut missing: HashSet<Id> = ids.iter().copied().collect();
    let mut workflows = HashSet::new();
    let (Some(&first), Some(&last)) = (missing.iter().min(), missing.iter().max()) else {
        return Ok(false);
    };
    let mut after = first.saturating_sub(1);
    while after < last {
        let page = store
            .list_runs(&RunFilter {
                after_id: Some(after),
                limit: Some(10_000),
                ..RunFilter::default()
            })
            .await?;
        let Some(tail) = page.last() else {
            break;
        };
        after = tail.id;
        for run in &page {
            if missing.remove(&run.id) {
                workflows.insert(run.workflow_id);
            }
        }
    }
    if let Some(&id) = missing.iter().min() {
        store.get_run(id).await?;
    }
    for id in workflows {
        let workflow = store.get_workflow(id).await?;
        if workflow.definition.tasks.iter().any(|t| t.python.is_some()) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The run ids of an iterable of Runs and ids.
fn ids_of(runs: &Bound<'_, PyAny>) -> PyResult<Vec<Id>> {
    if runs.cast::<Run>().is_ok() || runs.cast::<pyo3::types::PyInt>().is_ok() {
        return Err(PyTypeError::new_err(
            "runs must be a list of Runs or run ids; to wait for one run, pass [run]",
        ));
    }
    let items = runs.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "runs must be a list of Runs or run ids, not {}",
            type_name(runs)
        ))
    })?;
    items.map(|item| run_id(&item?)).collect()
}
