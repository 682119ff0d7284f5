//! PostgreSQL store and queue tests.
