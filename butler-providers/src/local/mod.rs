//! The local process executor.
