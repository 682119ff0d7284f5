//! SQLite settings.
