//! Butler's Python module, `butler._butler`: the tracker and the embedded engine of
//! `butler-core`, natively typed. It converts types and holds no rule of its own.

mod analysis;
mod client;
mod convert;
mod errors;
mod event;
mod run;
mod runtime;
mod task;
mod worker;
mod workflow;

use pyo3::prelude::*;

/// The `butler._butler` extension module; `butler` re-exports it.
#[pymodule]
fn _butler(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(client::connect, m)?)?;
    m.add_class::<client::Client>()?;
    m.add_class::<workflow::Workflow>()?;
    m.add_class::<analysis::Analysis>()?;
    m.add_class::<run::Run>()?;
    m.add_class::<task::Task>()?;
    m.add_class::<event::Event>()?;
    m.add_class::<worker::Worker>()?;
    m.add("Provenance", run::provenance_class(py)?)?;
    m.add("Command", run::command_class(py)?)?;
    m.add("ButlerError", py.get_type::<errors::ButlerError>())?;
    m.add("NotFoundError", py.get_type::<errors::NotFoundError>())?;
    m.add(
        "InvalidInputError",
        py.get_type::<errors::InvalidInputError>(),
    )?;
    m.add("ConflictError", py.get_type::<errors::ConflictError>())?;
    m.add(
        "UnavailableError",
        py.get_type::<errors::UnavailableError>(),
    )?;
    Ok(())
}
