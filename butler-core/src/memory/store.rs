//! In-memory run store.
