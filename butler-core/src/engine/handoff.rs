//! Tasks the scheduler hands straight to the worker slots of its own process.
//!
//! A queued task is durable in the store before its message is sent anywhere, so the queue is
//! only a hint of what to start (decision 1). When nobody but this process's own slots takes
//! from the queue, sending the hint through it costs an enqueue, a dequeue and an ack, each a
//! write, for nothing: the scheduler hands such tasks over in memory instead, with the task's
//! row as it committed it, so the worker claims them without reading the store either. If the
//! process dies, the tasks stay `queued` in the store, and the scheduler that adopts their
//! runs sends them again, as it does for messages a queue lost.
//!
//! The tasks the slots would take at once, the scheduler claims for them in the commit that
//! queues them (see [`super::worker::Worker::reserve`]), and hands over already claimed.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use super::plan::QueuedTask;
use super::worker::ClaimedTask;

/// The tasks handed over and not yet taken by a worker slot, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Handoff {
    tasks: Mutex<Handed>,
    arrived: Notify,
}

/// What the scheduler handed over: tasks still to claim, and tasks it claimed.
#[derive(Debug, Default)]
struct Handed {
    queued: VecDeque<QueuedTask>,
    claimed: Vec<ClaimedTask>,
}

impl Handoff {
    /// Hands `tasks` to the worker, to claim.
    pub fn push(&self, tasks: impl IntoIterator<Item = QueuedTask>) {
        let mut handed = self.lock();
        let before = handed.queued.len();
        handed.queued.extend(tasks);
        if handed.queued.len() > before {
            self.arrived.notify_one();
        }
    }

    /// Hands `tasks`, claimed for the worker, to the worker, to start.
    pub fn push_claimed(&self, tasks: Vec<ClaimedTask>) {
        if tasks.is_empty() {
            return;
        }
        self.lock().claimed.extend(tasks);
        self.arrived.notify_one();
    }

    /// Takes up to `at_most` tasks to claim, oldest first.
    pub fn take(&self, at_most: usize) -> Vec<QueuedTask> {
        let mut handed = self.lock();
        let n = at_most.min(handed.queued.len());
        handed.queued.drain(..n).collect()
    }

    /// Takes every claimed task.
    pub fn take_claimed(&self) -> Vec<ClaimedTask> {
        std::mem::take(&mut self.lock().claimed)
    }

    /// Tasks handed over and not yet taken, claimed or not.
    pub fn len(&self) -> usize {
        let handed = self.lock();
        handed.queued.len() + handed.claimed.len()
    }

    /// Resolves once tasks have arrived since the last time it resolved (at once if they
    /// arrived meanwhile).
    pub async fn arrived(&self) {
        self.arrived.notified().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Handed> {
        self.tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;
    use chrono::Utc;

    use super::super::{DEFAULT_TASK_QUEUE, Engine, EngineOptions, VERSION};
    use crate::executor::{Attempt, CancellationToken, Executor, Finished, Outcome};
    use crate::memory::{MemoryQueue, MemoryRunStore};
    use crate::model::{Event, EventFilter, RunStatus, TaskInstance, TaskState, WorkerInfo};
    use crate::queue::{DeadLetter, Delivery, DeliveryTag, NewMessage, Queue, QueueDepth};
    use crate::store::RunStore;
    use crate::testing::launch::launch_runs;

    /// A memory queue that counts the messages enqueued on it.
    #[derive(Debug, Default)]
    struct Counting {
        inner: MemoryQueue,
        enqueued: AtomicUsize,
    }

    #[async_trait]
    impl Queue for Counting {
        async fn enqueue(&self, queue: &str, messages: Vec<NewMessage>) -> crate::Result<Vec<i64>> {
            self.enqueued.fetch_add(messages.len(), Ordering::SeqCst);
            self.inner.enqueue(queue, messages).await
        }
        async fn dequeue(
            &self,
            queue: &str,
            max: usize,
            lease: Duration,
            wait: Duration,
        ) -> crate::Result<Vec<Delivery>> {
            self.inner.dequeue(queue, max, lease, wait).await
        }
        async fn ack(&self, tags: &[DeliveryTag]) -> crate::Result<Vec<bool>> {
            self.inner.ack(tags).await
        }
        async fn nack(&self, tags: &[DeliveryTag], delay: Duration) -> crate::Result<Vec<bool>> {
            self.inner.nack(tags, delay).await
        }
        async fn extend(&self, tags: &[DeliveryTag], lease: Duration) -> crate::Result<Vec<bool>> {
            self.inner.extend(tags, lease).await
        }
        async fn depth(&self, queue: &str) -> crate::Result<QueueDepth> {
            self.inner.depth(queue).await
        }
        async fn dead_letters(&self, queue: &str, limit: usize) -> crate::Result<Vec<DeadLetter>> {
            self.inner.dead_letters(queue, limit).await
        }
    }

    /// Each attempt takes a few milliseconds, so the slots are busy while tasks are queued.
    #[derive(Debug)]
    struct Brief;

    #[async_trait]
    impl Executor for Brief {
        async fn execute(&self, attempt: Attempt, _: CancellationToken) -> crate::Result<Finished> {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(Finished {
                outcome: Outcome::Exited { code: 0 },
                log_path: attempt.workdir,
                duration: Duration::ZERO,
            })
        }
    }

    /// A chain of two tasks.
    const TWO_TASKS: &str =
        "[[tasks]]\nid = \"a\"\nrun = \"x\"\n[[tasks]]\nid = \"b\"\nneeds = [\"a\"]\nrun = \"x\"\n";

    /// Runs `runs` runs of `definition` to completion in one engine with 2 slots on `queue`,
    /// with `other_worker` listed in the store first; every task ran exactly once. Answers the
    /// tasks and the events of the runs.
    async fn run_in_one_process(
        queue: Arc<Counting>,
        definition: &str,
        runs: usize,
        other_worker: Option<WorkerInfo>,
    ) -> (Vec<TaskInstance>, Vec<Event>) {
        let store = Arc::new(MemoryRunStore::new());
        if let Some(other) = &other_worker {
            store.heartbeat_worker(other).await.expect("heartbeat");
        }
        let ids = launch_runs(store.clone(), definition, runs).await;
        let mut options = EngineOptions::new(std::env::temp_dir(), 2);
        options.poll = Duration::from_millis(20);
        let mut engine = Engine::start(store.clone(), queue, Arc::new(Brief), options);
        let done = tokio::time::timeout(Duration::from_secs(30), engine.wait_for(&ids, |_| {}))
            .await
            .expect("the runs finish in time")
            .expect("the engine runs");
        engine.stop().await.expect("stops");
        assert!(
            done.iter().all(|r| r.status == RunStatus::Completed),
            "{done:?}"
        );
        let tasks = store.list_tasks(&ids).await.expect("tasks");
        for task in &tasks {
            assert_eq!(
                (task.state, task.try_number),
                (TaskState::Succeeded, 1),
                "run {} task {}: one attempt",
                task.run_id,
                task.task_id
            );
        }
        let events = store
            .list_events(&EventFilter {
                not_by_suffix: None,
                run_id: None,
                after: 0,
                limit: u32::MAX,
            })
            .await
            .expect("events");
        (tasks, events)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn alone_a_process_runs_its_tasks_without_the_queue() {
        let queue = Arc::new(Counting::default());
        run_in_one_process(queue.clone(), TWO_TASKS, 40, None).await;
        assert_eq!(
            queue.enqueued.load(Ordering::SeqCst),
            0,
            "no message is sent when the process's own slots take every task"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_the_slots_can_take_at_once_is_queued_and_started_in_one_commit() {
        let chain = "[[tasks]]\nid = \"a\"\nrun = \"x\"\n\
                     [[tasks]]\nid = \"b\"\nneeds = [\"a\"]\nrun = \"x\"\n\
                     [[tasks]]\nid = \"c\"\nneeds = [\"b\"]\nrun = \"x\"\n";
        let queue = Arc::new(Counting::default());
        // Two runs never fill two slots and their look-ahead, so each task, first or next in
        // its chain, was claimed by the commit that queued it: it started when it was queued.
        let (tasks, events) = run_in_one_process(queue.clone(), chain, 2, None).await;
        for task in &tasks {
            assert_eq!(
                task.started_at, task.queued_at,
                "run {} task {}: started in the commit that queued it",
                task.run_id, task.task_id
            );
        }
        assert_eq!(queue.enqueued.load(Ordering::SeqCst), 0);
        // The run went in-progress in the commit that started its first task (one time of
        // change per commit), not in a commit of its own after it.
        for run_id in tasks.iter().map(|t| t.run_id).collect::<BTreeSet<_>>() {
            let at = |task: Option<&str>, to: &str| {
                events
                    .iter()
                    .find(|e| e.run_id == run_id && e.task_id.as_deref() == task && e.to == to)
                    .map(|e| e.at)
            };
            let (run_started, a_started) = (at(None, "in-progress"), at(Some("a"), "running"));
            assert!(run_started.is_some(), "run {run_id} went in-progress");
            assert_eq!(run_started, a_started, "run {run_id}: {events:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_another_worker_about_tasks_the_slots_cannot_take_go_to_the_queue() {
        let queue = Arc::new(Counting::default());
        let now = Utc::now();
        // A live worker of another host on the same queue: it never takes anything here, so
        // this process's slots take the queued messages too.
        let other = WorkerInfo {
            name: "elsewhere".to_owned(),
            host: "elsewhere".to_owned(),
            pid: 1,
            queue: DEFAULT_TASK_QUEUE.to_owned(),
            slots: 4,
            running: 0,
            version: VERSION.to_owned(),
            started_at: now,
            heartbeat_at: now + chrono::Duration::hours(1),
        };
        run_in_one_process(queue.clone(), TWO_TASKS, 40, Some(other)).await;
        let enqueued = queue.enqueued.load(Ordering::SeqCst);
        assert!(
            enqueued > 0 && enqueued < 80,
            "some of the 80 tasks went through the queue for other workers, the rest straight \
             to the slots: {enqueued} enqueued"
        );
    }
}
