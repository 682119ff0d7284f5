//! Tasks the scheduler hands straight to the worker slots of its own process.
//!
//! A queued task is durable in the store before its message is sent anywhere, so the queue is
//! only a hint of what to start (decision 1). When nobody but this process's own slots takes
//! from the queue, sending the hint through it costs an enqueue, a dequeue and an ack, each a
//! write, for nothing: the scheduler hands such tasks over in memory instead, with the task's
//! row as it committed it, so the worker claims them without reading the store either. If the
//! process dies, the tasks stay `queued` in the store, and the scheduler that adopts their
//! runs sends them again, as it does for messages a queue lost.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use super::plan::QueuedTask;

/// The tasks handed over and not yet taken by a worker slot, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Handoff {
    tasks: Mutex<VecDeque<QueuedTask>>,
    arrived: Notify,
}

impl Handoff {
    /// Hands `tasks` to the worker.
    pub fn push(&self, tasks: impl IntoIterator<Item = QueuedTask>) {
        let mut queue = self.lock();
        let before = queue.len();
        queue.extend(tasks);
        if queue.len() > before {
            self.arrived.notify_one();
        }
    }

    /// Takes up to `at_most` tasks, oldest first.
    pub fn take(&self, at_most: usize) -> Vec<QueuedTask> {
        let mut queue = self.lock();
        let n = at_most.min(queue.len());
        queue.drain(..n).collect()
    }

    /// Tasks handed over and not yet taken.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Resolves once tasks have arrived since the last time it resolved (at once if they
    /// arrived meanwhile).
    pub async fn arrived(&self) {
        self.arrived.notified().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<QueuedTask>> {
        self.tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
