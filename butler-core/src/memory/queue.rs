//! In-memory queue.
