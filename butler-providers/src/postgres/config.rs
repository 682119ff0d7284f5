//! PostgreSQL settings.
