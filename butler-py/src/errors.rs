//! Butler's exceptions and the mapping from [`butler_core::Error`] to them.

use butler_core::Error;
use pyo3::PyErr;
use pyo3::create_exception;
use pyo3::exceptions::PyException;

create_exception!(
    butler,
    ButlerError,
    PyException,
    "Base class of every error Butler raises; its message names the input, the problem and the fix."
);
create_exception!(
    butler,
    NotFoundError,
    ButlerError,
    "A workflow, analysis, run, config or task with that id does not exist."
);
create_exception!(
    butler,
    InvalidInputError,
    ButlerError,
    "Bad input: a config, a definition, a template, a date, a status or an argument."
);
create_exception!(
    butler,
    ConflictError,
    ButlerError,
    "The change clashes with what is stored: a duplicate workflow, a duplicate launch, a run in the wrong state."
);
create_exception!(
    butler,
    UnavailableError,
    ButlerError,
    "A service could not be reached; trying again later may succeed."
);

/// The Python exception for `err`, with the core error's message (the one the CLI prints).
pub fn to_py(err: Error) -> PyErr {
    let message = err.to_string();
    match err {
        Error::NotFound { .. } => NotFoundError::new_err(message),
        Error::InvalidInput(_) => InvalidInputError::new_err(message),
        Error::AlreadyExists(_) | Error::Conflict(_) => ConflictError::new_err(message),
        Error::Unavailable { .. } => UnavailableError::new_err(message),
        _ => ButlerError::new_err(message),
    }
}

/// An [`InvalidInputError`] with `message`.
pub fn invalid(message: impl Into<String>) -> PyErr {
    InvalidInputError::new_err(message.into())
}
