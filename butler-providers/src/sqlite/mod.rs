//! SQLite backend: the embedded default run store and queue.

mod config;
mod queue;
mod store;
