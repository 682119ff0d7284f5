//! util tests.
