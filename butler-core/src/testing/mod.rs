//! Conformance suites every backend runs (feature `testing`).
//!
//! A backend is done when every suite here passes against it.

pub mod changes;
pub mod launch;
pub mod queue;
pub mod store;
