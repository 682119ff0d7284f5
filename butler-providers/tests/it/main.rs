//! Integration tests of butler-providers' backends against Butler's conformance suites.

mod executor;
mod queue;
mod store;
mod util;
