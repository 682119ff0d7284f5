//! The executor trait.
