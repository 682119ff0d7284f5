#![doc = include_str!("../README.md")]

pub mod config;
pub mod definition;
mod error;
pub mod model;
mod store;

pub use error::{BoxError, Error, Kind, Result};
pub use store::{DynRunStore, RunStore};
