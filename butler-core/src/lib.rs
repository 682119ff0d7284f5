#![doc = include_str!("../README.md")]

pub mod change;
pub mod config;
pub mod definition;
pub mod engine;
mod error;
pub mod executor;
mod follow;
pub mod memory;
pub mod model;
pub mod notify;
pub mod queue;
mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tracker;

pub use error::{BoxError, Error, Kind, Result};
pub use store::{DynRunStore, ReadyRunsBell, RunStore};
