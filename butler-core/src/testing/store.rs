//! Conformance suite for run stores.
