//! The process's one tokio runtime, and running core calls on it with the GIL released.

use std::future::Future;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use tokio::runtime::{Builder, Runtime};

use crate::errors::{ButlerError, to_py};

/// The runtime and the process it was built in.
static RUNTIME: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);

/// The process's runtime, built on first use and built again in a forked child, whose copy of
/// the parent's runtime has no threads.
pub fn runtime() -> PyResult<Arc<Runtime>> {
    let pid = std::process::id();
    let mut slot = RUNTIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((owner, runtime)) = slot.as_ref()
        && *owner == pid
    {
        return Ok(runtime.clone());
    }
    if let Some((_, inherited)) = slot.take() {
        // Dropping it would wait for worker threads that only exist in the parent.
        std::mem::forget(inherited);
    }
    let runtime = Builder::new_multi_thread()
        .enable_all()
        .thread_name("butler")
        .build()
        .map(Arc::new)
        .map_err(|err| {
            ButlerError::new_err(format!(
                "cannot start Butler's async runtime: {err}; check the process's thread and \
                 file limits"
            ))
        })?;
    *slot = Some((pid, runtime.clone()));
    Ok(runtime)
}

/// Runs `future` to completion on the runtime without holding the GIL, mapping a core error
/// to its Python exception.
pub fn block_on<T, F>(py: Python<'_>, future: F) -> PyResult<T>
where
    F: Future<Output = butler_core::Result<T>> + Send,
    T: Send,
{
    let runtime = runtime()?;
    py.detach(|| runtime.block_on(future)).map_err(to_py)
}
