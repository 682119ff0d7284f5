//! PostgreSQL run store.
