//! The queue trait.
