//! PostgreSQL queue.
