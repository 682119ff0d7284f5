//! In-memory implementations of Butler's traits, for tests and embedding.

mod queue;
mod store;

pub use queue::MemoryQueue;
pub use store::MemoryRunStore;
