//! PostgreSQL backend: a run store and a queue for many machines, tables in a `butler` schema.

mod config;
mod queue;
mod store;
