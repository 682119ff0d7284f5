//! The local backend: runs task attempts as processes on this machine.

mod executor;

pub use executor::{LocalExecutor, SCRIPT_FILE};
