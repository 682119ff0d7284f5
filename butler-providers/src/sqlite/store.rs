//! SQLite run store.
