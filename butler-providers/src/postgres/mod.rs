//! PostgreSQL backend: a run store and a queue for trackers that outgrow one machine.
//!
//! Butler's tables live in one schema (`butler` unless the URL names another), created on
//! first use together with the tables; open it with [`PgStore::open`] from a [`PgConfig`],
//! usually parsed from a `postgres://` URL. The queue shares the store's connection pool.

mod config;
mod listen;
mod queue;
mod store;

pub use config::{Durability, PgConfig};
pub use queue::PgQueue;
pub use store::PgStore;
