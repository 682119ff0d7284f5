//! Butler providers.
