//! In-memory implementations of Butler's traits, for tests and embedding.

mod queue;
mod store;



