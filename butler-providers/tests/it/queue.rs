//! queue tests.
