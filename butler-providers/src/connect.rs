//! Choosing backends from URLs.
