//! `Run`: one analysis run, with its config, tasks, events and logs.

use std::sync::Arc;

use butler_core::executor::{LOG_FILE, attempt_dir};
use butler_core::model::{AnalysisRun, Id, TaskInstance};
use chrono::{DateTime, Utc};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyInt, PyList, PyType};

use crate::client::Connection;
use crate::convert::{self, repr_opt, repr_str, type_name};
use crate::errors::{ButlerError, NotFoundError};
use crate::event::Event;
use crate::runtime::block_on;
use crate::task::Task;

/// The file in an attempt's directory that holds what a Python task's function returned.
const OUTPUT_FILE: &str = "output.json";

/// One run of a workflow for an analysis, as it was stored when this object was made; get the
/// current state with `refresh()` or `Client.run(id)`.
#[pyclass(frozen, module = "butler")]
pub struct Run {
    run: AnalysisRun,
    conn: Arc<Connection>,
}

impl Run {
    pub(crate) fn new(run: AnalysisRun, conn: Arc<Connection>) -> Self {
        Run { run, conn }
    }

    /// Run `id` as stored now.
    pub(crate) fn fetch(py: Python<'_>, conn: &Arc<Connection>, id: Id) -> PyResult<Run> {
        let c = conn.clone();
        let run = block_on(
            py,
            async move { c.backends().await?.store.get_run(id).await },
        )?;
        Ok(Run::new(run, conn.clone()))
    }
}

#[pymethods]
impl Run {
    /// Identifier.
    #[getter]
    fn id(&self) -> Id {
        self.run.id
    }

    /// The workflow it runs.
    #[getter]
    fn workflow_id(&self) -> Id {
        self.run.workflow_id
    }

    /// The analysis it belongs to.
    #[getter]
    fn analysis_id(&self) -> Id {
        self.run.analysis_id
    }

    /// `ready`, `scheduled`, `in-progress`, `completed`, `error` or `cancelled`.
    #[getter]
    fn status(&self) -> &'static str {
        self.run.status.as_str()
    }

    /// Why the run ended in `error`, when it did.
    #[getter]
    fn error(&self) -> Option<&str> {
        self.run.error.as_deref()
    }

    /// The file its run config was read from; `None` for a config given as a dict.
    #[getter]
    fn source_file(&self) -> Option<&str> {
        self.run.source_file.as_deref()
    }

    /// When it was launched (UTC).
    #[getter]
    fn created_at(&self) -> DateTime<Utc> {
        self.run.created_at
    }

    /// When its first task started (UTC).
    #[getter]
    fn started_at(&self) -> Option<DateTime<Utc>> {
        self.run.started_at
    }

    /// When it finished (UTC).
    #[getter]
    fn ended_at(&self) -> Option<DateTime<Utc>> {
        self.run.ended_at
    }

    /// Id of the workflow config layer it was launched with.
    #[getter]
    fn workflow_config_id(&self) -> String {
        self.run.workflow_config_id.to_string()
    }

    /// Id of the analysis config layer it was launched with.
    #[getter]
    fn analysis_config_id(&self) -> String {
        self.run.analysis_config_id.to_string()
    }

    /// Id of its own config layer.
    #[getter]
    fn run_config_id(&self) -> String {
        self.run.run_config_id.to_string()
    }

    /// Id of its effective config.
    #[getter]
    fn effective_config_id(&self) -> String {
        self.run.effective_config_id.to_string()
    }

    /// The merged config it executes with, stored at launch and never recomputed.
    #[getter]
    fn effective_config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (conn, id) = (self.conn.clone(), self.run.id);
        let config = block_on(py, async move {
            conn.tracker().await?.effective_config(id).await
        })?;
        convert::to_py(py, &config.data)
    }

    /// For every leaf of the effective config, `Provenance(path, layer, value)`: the dotted
    /// path, the layer that set it (`workflow`, `analysis`, `run` or `butler`) and its value.
    fn explain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let (conn, id) = (self.conn.clone(), self.run.id);
        let entries = block_on(py, async move { conn.tracker().await?.explain(id).await })?;
        let class = provenance_class(py)?;
        let list = PyList::empty(py);
        for entry in entries {
            let value = convert::to_py(py, &entry.value)?;
            list.append(class.call1((entry.path, entry.layer.to_string(), value))?)?;
        }
        Ok(list)
    }

    /// Each task's `Command(task, command, env)`, in definition order: its templates rendered
    /// with the effective config, as its attempts run them.
    fn commands<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let (conn, id) = (self.conn.clone(), self.run.id);
        let tasks = block_on(
            py,
            async move { conn.tracker().await?.commands(id, None).await },
        )?;
        let class = command_class(py)?;
        let list = PyList::empty(py);
        for task in tasks {
            list.append(class.call1((task.id, task.command, task.env))?)?;
        }
        Ok(list)
    }

    /// Its tasks in definition order, as stored now.
    #[getter]
    fn tasks(&self, py: Python<'_>) -> PyResult<Vec<Task>> {
        let (conn, id) = (self.conn.clone(), self.run.id);
        let (_, tasks) = block_on(
            py,
            async move { conn.tracker().await?.run_with_tasks(id).await },
        )?;
        Ok(tasks.into_iter().map(Task::new).collect())
    }

    /// Its event log, oldest first.
    #[getter]
    fn events(&self, py: Python<'_>) -> PyResult<Vec<Event>> {
        let (conn, id) = (self.conn.clone(), self.run.id);
        let events = block_on(py, async move { conn.tracker().await?.events(id).await })?;
        Ok(events.into_iter().map(Event::new).collect())
    }

    /// The output of task `task`'s latest attempt; without `task`, that of every task that
    /// started, each under a `==> TASK (try N) <==` header. A task that has not started yet
    /// has no output (`""`).
    #[pyo3(signature = (task=None))]
    fn logs(&self, py: Python<'_>, task: Option<String>) -> PyResult<String> {
        let (conn, id) = (self.conn.clone(), self.run.id);
        let (run, tasks) = block_on(
            py,
            async move { conn.tracker().await?.run_with_tasks(id).await },
        )?;
        let home = self.conn.home.clone();
        let chosen: Vec<&TaskInstance> = match &task {
            Some(task_id) => match tasks.iter().find(|t| &t.task_id == task_id) {
                Some(found) => vec![found],
                None => return Err(no_such_task(run.id, task_id, &tasks)),
            },
            None => tasks.iter().collect(),
        };
        let headers = task.is_none();
        py.detach(|| {
            let mut out = String::new();
            for task in chosen {
                let try_number = task.last_started_try();
                if try_number == 0 {
                    continue;
                }
                let path = attempt_dir(&home, run.id, &task.task_id, try_number).join(LOG_FILE);
                let text = match std::fs::read(&path) {
                    Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                    // The attempt has started but not opened its log yet.
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
                    Err(err) => {
                        return Err(crate::errors::ButlerError::new_err(format!(
                            "cannot read log {}: {err}",
                            path.display()
                        )));
                    }
                };
                if headers {
                    if !out.is_empty() {
                        if !out.ends_with('\n') {
                            out.push('\n');
                        }
                        out.push('\n');
                    }
                    out.push_str(&format!("==> {} (try {try_number}) <==\n", task.task_id));
                }
                out.push_str(&text);
            }
            Ok(out)
        })
    }

    /// What task `task`'s latest attempt returned: the JSON value a Python task's function
    /// returned (written to `output.json` in the attempt's directory, which a command may
    /// also write). `None` if it returned `None`, has not finished, or wrote no output.
    fn output<'py>(&self, py: Python<'py>, task: String) -> PyResult<Bound<'py, PyAny>> {
        let (conn, id) = (self.conn.clone(), self.run.id);
        let (run, tasks) = block_on(
            py,
            async move { conn.tracker().await?.run_with_tasks(id).await },
        )?;
        let Some(found) = tasks.iter().find(|t| t.task_id == task) else {
            return Err(no_such_task(run.id, &task, &tasks));
        };
        let try_number = found.last_started_try();
        if try_number == 0 {
            return Ok(py.None().into_bound(py));
        }
        let path = attempt_dir(&self.conn.home, run.id, &task, try_number).join(OUTPUT_FILE);
        let value = py.detach(|| match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes)
                .map(Some)
                .map_err(|err| {
                    ButlerError::new_err(format!(
                        "the output of task `{task}` of run {} is not JSON: {} ({err}); run                          the task again to rewrite it",
                        run.id,
                        path.display()
                    ))
                }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(ButlerError::new_err(format!(
                "cannot read the output of task `{task}` of run {}: {}: {err}",
                run.id,
                path.display()
            ))),
        })?;
        match value {
            Some(value) => convert::to_py(py, &value),
            None => Ok(py.None().into_bound(py)),
        }
    }

    /// This run as stored now.
    fn refresh(&self, py: Python<'_>) -> PyResult<Run> {
        Run::fetch(py, &self.conn, self.run.id)
    }

    fn __repr__(&self) -> String {
        let run = &self.run;
        format!(
            "Run(id={}, workflow_id={}, analysis_id={}, status={}, source_file={}, error={})",
            run.id,
            run.workflow_id,
            run.analysis_id,
            repr_str(run.status.as_str()),
            repr_opt(run.source_file.as_deref()),
            repr_opt(run.error.as_deref()),
        )
    }

    fn __eq__(&self, other: PyRef<'_, Self>) -> bool {
        self.run == other.run
    }

    fn __hash__(&self) -> u64 {
        self.run.id as u64
    }
}

/// The error for a task id that `run` does not have, listing the ones it has.
fn no_such_task(run: Id, task_id: &str, tasks: &[TaskInstance]) -> PyErr {
    let names: Vec<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
    NotFoundError::new_err(format!(
        "run {run} has no task `{task_id}`; its tasks are: {}",
        names.join(", ")
    ))
}

/// The run id of `obj`: a [`Run`] or an `int`.
pub(crate) fn run_id(obj: &Bound<'_, PyAny>) -> PyResult<Id> {
    if let Ok(run) = obj.cast::<Run>() {
        return Ok(run.get().run.id);
    }
    if obj.cast::<PyInt>().is_ok() {
        return obj.extract::<Id>();
    }
    Err(PyTypeError::new_err(format!(
        "a run is given as a Run or an int id, not {}",
        type_name(obj)
    )))
}

/// `butler.Provenance`, a named tuple `(path, layer, value)`.
static PROVENANCE: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// `butler.Command`, a named tuple `(task, command, env)`.
static COMMAND: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// The `Provenance` class, made on first use.
pub(crate) fn provenance_class(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    named_tuple(
        py,
        &PROVENANCE,
        "Provenance",
        &["path", "layer", "value"],
        "Where one leaf of a run's effective config comes from: its dotted path, the layer \
         that set it (workflow, analysis, run or butler) and its value.",
    )
}

/// The `Command` class, made on first use.
pub(crate) fn command_class(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    named_tuple(
        py,
        &COMMAND,
        "Command",
        &["task", "command", "env"],
        "A task's command as its attempts run it: the task's id, its command rendered with the \
         run's effective config, and its extra environment variables.",
    )
}

/// The `collections.namedtuple` class `name` of module `butler`, made once into `cell`.
fn named_tuple<'py>(
    py: Python<'py>,
    cell: &'py PyOnceLock<Py<PyType>>,
    name: &str,
    fields: &[&str],
    doc: &str,
) -> PyResult<&'py Bound<'py, PyType>> {
    cell.get_or_try_init(py, || {
        let namedtuple = py.import("collections")?.getattr("namedtuple")?;
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("module", "butler")?;
        let class = namedtuple.call((name, fields.to_vec()), Some(&kwargs))?;
        class.setattr("__doc__", doc)?;
        Ok::<_, PyErr>(class.cast_into::<PyType>()?.unbind())
    })
    .map(|class| class.bind(py))
}
