//! Integration tests of butler-providers' backends against Butler's conformance suites.
//!
//! The store and queue tests run the in-memory backends beside the SQLite ones, so they need
//! the `sqlite` feature (a default one).

#[cfg(feature = "sqlite")]
mod engine;
mod executor;
#[cfg(feature = "sqlite")]
mod queue;
#[cfg(feature = "sqlite")]
mod store;
#[cfg(feature = "sqlite")]
mod util;
