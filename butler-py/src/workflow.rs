//! `Workflow`: a registered workflow.

use std::sync::Arc;

use butler_core::model::{self, Id};
use chrono::{DateTime, Utc};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyInt;

use crate::client::Connection;
use crate::convert::{self, repr_str, type_name};
use crate::errors::ButlerError;
use crate::runtime::block_on;

/// A registered workflow: a named, versioned DAG of tasks with its config layer.
#[pyclass(frozen, module = "butler")]
pub struct Workflow {
    workflow: model::Workflow,
    conn: Arc<Connection>,
}

impl Workflow {
    pub(crate) fn new(workflow: model::Workflow, conn: Arc<Connection>) -> Self {
        Workflow { workflow, conn }
    }
}

#[pymethods]
impl Workflow {
    /// Identifier.
    #[getter]
    fn id(&self) -> Id {
        self.workflow.id
    }

    /// Name; unique together with the version.
    #[getter]
    fn name(&self) -> &str {
        &self.workflow.name
    }

    /// Version, as given.
    #[getter]
    fn version(&self) -> &str {
        &self.workflow.version
    }

    /// Id of its current config layer.
    #[getter]
    fn config_id(&self) -> String {
        self.workflow.config_id.to_string()
    }

    /// When it was registered (UTC).
    #[getter]
    fn created_at(&self) -> DateTime<Utc> {
        self.workflow.created_at
    }

    /// Its validated definition, in the shape of a JSON definition file.
    #[getter]
    fn definition<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let value = serde_json::to_value(&self.workflow.definition).map_err(|err| {
            ButlerError::new_err(format!(
                "cannot convert the definition of workflow {}: {err}",
                self.workflow.id
            ))
        })?;
        convert::to_py(py, &value)
    }

    /// Its config layer, as of `config_id`.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (conn, id) = (self.conn.clone(), self.workflow.config_id);
        let config = block_on(py, async move {
            conn.backends().await?.store.get_config(id).await
        })?;
        convert::to_py(py, &config.data)
    }

    fn __repr__(&self) -> String {
        format!(
            "Workflow(id={}, name={}, version={}, config_id={})",
            self.workflow.id,
            repr_str(&self.workflow.name),
            repr_str(&self.workflow.version),
            repr_str(&self.workflow.config_id.to_string())
        )
    }

    fn __eq__(&self, other: PyRef<'_, Self>) -> bool {
        self.workflow == other.workflow
    }

    fn __hash__(&self) -> u64 {
        self.workflow.id as u64
    }
}

/// The workflow id of `obj`: a [`Workflow`] or an `int`.
pub(crate) fn workflow_id(obj: &Bound<'_, PyAny>) -> PyResult<Id> {
    if let Ok(workflow) = obj.cast::<Workflow>() {
        return Ok(workflow.get().workflow.id);
    }
    if obj.cast::<PyInt>().is_ok() {
        return obj.extract::<Id>();
    }
    Err(PyTypeError::new_err(format!(
        "a workflow is given as a Workflow or an int id, not {}",
        type_name(obj)
    )))
}
