//! Conformance suite for queues.
