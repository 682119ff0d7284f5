//! SQLite backend: the embedded default run store and queue.
//!
//! One database file holds the tracker's tables and the queue's; open it with
//! [`SqliteStore::open`] from a [`SqliteConfig`], usually parsed from a `sqlite:` URL.

mod config;
mod queue;
mod reader;
mod store;
mod writer;

pub use config::{Durability, SqliteConfig};
pub use queue::SqliteQueue;
pub use store::SqliteStore;
