//! SQLite queue.
