//! `Analysis`: a named piece of work with its config layer.

use std::sync::Arc;

use butler_core::model::{self, Id};
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyInt;

use crate::client::Connection;
use crate::convert::{self, repr_str, type_name};
use crate::runtime::block_on;

/// An analysis: a named piece of work (a study, a batch of samples) with its config layer.
#[pyclass(frozen, module = "butler")]
pub struct Analysis {
    analysis: model::Analysis,
    conn: Arc<Connection>,
}

impl Analysis {
    pub(crate) fn new(analysis: model::Analysis, conn: Arc<Connection>) -> Self {
        Analysis { analysis, conn }
    }
}

#[pymethods]
impl Analysis {
    /// Identifier.
    #[getter]
    fn id(&self) -> Id {
        self.analysis.id
    }

    /// Name; several analyses may share one.
    #[getter]
    fn name(&self) -> &str {
        &self.analysis.name
    }

    /// Its start date.
    #[getter]
    fn start_date(&self) -> NaiveDate {
        self.analysis.start_date
    }

    /// Id of its current config layer.
    #[getter]
    fn config_id(&self) -> String {
        self.analysis.config_id.to_string()
    }

    /// When it was created (UTC).
    #[getter]
    fn created_at(&self) -> DateTime<Utc> {
        self.analysis.created_at
    }

    /// Its config layer, as of `config_id`.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (conn, id) = (self.conn.clone(), self.analysis.config_id);
        let config = block_on(py, async move {
            conn.backends().await?.store.get_config(id).await
        })?;
        convert::to_py(py, &config.data)
    }

    fn __repr__(&self) -> String {
        format!(
            "Analysis(id={}, name={}, start_date=datetime.date({}, {}, {}), config_id={})",
            self.analysis.id,
            repr_str(&self.analysis.name),
            self.analysis.start_date.year(),
            self.analysis.start_date.month(),
            self.analysis.start_date.day(),
            repr_str(&self.analysis.config_id.to_string())
        )
    }

    fn __eq__(&self, other: PyRef<'_, Self>) -> bool {
        self.analysis == other.analysis
    }

    fn __hash__(&self) -> u64 {
        self.analysis.id as u64
    }
}

/// The analysis id of `obj`: an [`Analysis`] or an `int`.
pub(crate) fn analysis_id(obj: &Bound<'_, PyAny>) -> PyResult<Id> {
    if let Ok(analysis) = obj.cast::<Analysis>() {
        return Ok(analysis.get().analysis.id);
    }
    if obj.cast::<PyInt>().is_ok() {
        return obj.extract::<Id>();
    }
    Err(PyTypeError::new_err(format!(
        "an analysis is given as an Analysis or an int id, not {}",
        type_name(obj)
    )))
}
