//! The engine on the in-memory store and queue, with an executor that answers from a script.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;

use super::control::ResetScope;
use super::{Engine, EngineOptions};
use crate::definition::{Definition, Format};
use crate::executor::{Attempt, CancellationToken, Executor, Finished, Outcome};
use crate::memory::{MemoryQueue, MemoryRunStore};
use crate::model::{Id, RunStatus, TaskState};
use crate::tracker::{RunSource, Tracker};

/// Ends each attempt with the exit code scripted for its task and try (0 when none is), and
/// records the order attempts started in.
#[derive(Debug, Default)]
struct Scripted {
    codes: HashMap<(String, u32), i32>,
    started: Mutex<Vec<(Id, String, u32)>>,
}

#[async_trait]
impl Executor for Scripted {
    async fn execute(&self, attempt: Attempt, _: CancellationToken) -> crate::Result<Finished> {
        self.started.lock().unwrap().push((
            attempt.run_id,
            attempt.task_id.clone(),
            attempt.try_number,
        ));
        let code = self
            .codes
            .get(&(attempt.task_id.clone(), attempt.try_number))
            .copied()
            .unwrap_or(0);
        Ok(Finished {
            outcome: Outcome::Exited { code },
            log_path: attempt.workdir,
            duration: Duration::ZERO,
        })
    }
}

async fn run(definition: &str, runs: usize, executor: Arc<Scripted>) -> (Tracker, Vec<Id>) {
    let store = Arc::new(MemoryRunStore::new());
    let tracker = Tracker::new(store.clone());
    let def = Definition::parse(definition, Format::Toml, "test.toml").unwrap();
    let w = tracker
        .create_workflow("w", "1", json!({}), def)
        .await
        .unwrap();
    let a = tracker
        .create_analysis("a", chrono::Utc::now().date_naive(), json!({}))
        .await
        .unwrap();
    let sources = (0..runs)
        .map(|i| RunSource {
            source: None,
            config: json!({ "i": i }),
        })
        .collect();
    let ids: Vec<Id> = tracker
        .launch(w.id, a.id, sources, false)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    let mut options = EngineOptions::new(std::env::temp_dir(), 2);
    options.poll = Duration::from_millis(20);
    let mut engine = Engine::start(store, Arc::new(MemoryQueue::new()), executor, options);
    tokio::time::timeout(Duration::from_secs(20), engine.wait_for(&ids, |_| {}))
        .await
        .expect("runs did not finish in time")
        .unwrap();
    engine.stop().await.unwrap();
    (tracker, ids)
}

const DIAMOND: &str = r#"
[[tasks]]
id = "a"
run = "true"
[[tasks]]
id = "b"
needs = ["a"]
run = "true"
[[tasks]]
id = "c"
needs = ["a"]
run = "true"
[[tasks]]
id = "d"
needs = ["b", "c"]
run = "true"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diamond_runs_every_task_after_its_needs() {
    let executor = Arc::new(Scripted::default());
    let (tracker, ids) = run(DIAMOND, 20, executor.clone()).await;
    let started = executor.started.lock().unwrap().clone();
    for id in ids {
        let (run, tasks) = tracker.run_with_tasks(id).await.unwrap();
        assert_eq!(run.status, RunStatus::Completed, "{run:?}");
        assert!(
            tasks
                .iter()
                .all(|t| t.state == TaskState::Succeeded && t.try_number == 1)
        );
        let pos = |task: &str| {
            started
                .iter()
                .position(|(r, t, _)| *r == id && t == task)
                .unwrap()
        };
        assert!(pos("a") < pos("b") && pos("a") < pos("c"));
        assert!(pos("b") < pos("d") && pos("c") < pos("d"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_stops_downstream_tasks_and_fails_the_run() {
    let mut executor = Scripted::default();
    executor.codes.insert(("b".into(), 1), 1);
    let (tracker, ids) = run(DIAMOND, 1, Arc::new(executor)).await;
    let (run, tasks) = tracker.run_with_tasks(ids[0]).await.unwrap();
    assert_eq!(run.status, RunStatus::Error);
    assert!(
        run.error.as_deref().unwrap().contains("`b`"),
        "{:?}",
        run.error
    );
    let state = |id: &str| tasks.iter().find(|t| t.task_id == id).unwrap().state;
    assert_eq!(state("b"), TaskState::Failed);
    assert_eq!(state("c"), TaskState::Succeeded);
    assert_eq!(state("d"), TaskState::UpstreamFailed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_is_retried_and_logged() {
    let mut executor = Scripted::default();
    executor.codes.insert(("t".into(), 1), 2);
    let definition = "[[tasks]]\nid = \"t\"\nrun = \"true\"\nretries = 1\nretry_delay = \"10ms\"\n";
    let (tracker, ids) = run(definition, 1, Arc::new(executor)).await;
    let (run, tasks) = tracker.run_with_tasks(ids[0]).await.unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!((tasks[0].try_number, tasks[0].failures), (2, 1));
    let path: Vec<String> = tracker
        .events(ids[0])
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.task_id.is_some())
        .map(|e| e.to)
        .collect();
    assert_eq!(
        path,
        [
            "queued",
            "running",
            "up_for_retry",
            "queued",
            "running",
            "succeeded"
        ]
    );
}

/// Waiting for runs that have already ended answers at once with how each ended (whichever
/// way), and says nothing of the runs around them that were not waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_ended_runs_answers_how_each_ended() {
    let (store, tracker, analysis) = store_with_analysis().await;
    // In id order: completes, is not waited for, fails, is cancelled, completes.
    let mut ids = Vec::new();
    for task in ["ok", "ok2", "bad", "cancelled", "ok3"] {
        ids.push(launch_one_task_run(&tracker, analysis.id, task).await);
    }
    tracker.cancel_run(ids[3]).await.unwrap();
    let mut executor = Scripted::default();
    executor.codes.insert(("bad".into(), 1), 1);
    let executor = Arc::new(executor);
    let mut options = EngineOptions::new(std::env::temp_dir(), 2);
    options.poll = Duration::from_millis(20);
    let mut engine = Engine::start(
        store.clone(),
        Arc::new(MemoryQueue::new()),
        executor.clone(),
        options,
    );
    let all = [ids[0], ids[1], ids[2], ids[4]];
    tokio::time::timeout(Duration::from_secs(20), engine.wait_for(&all, |_| {}))
        .await
        .expect("runs did not finish in time")
        .unwrap();
    engine.stop().await.unwrap();

    // A process that runs nothing finds them ended in the store.
    let options = EngineOptions::new(std::env::temp_dir(), 0);
    let mut idle = Engine::start(store, Arc::new(MemoryQueue::new()), executor, options);
    let waited = [ids[0], ids[2], ids[3], ids[4]];
    let done = tokio::time::timeout(Duration::from_secs(10), idle.wait_for(&waited, |_| {}))
        .await
        .expect("ended runs are answered without waiting for anything")
        .unwrap();
    idle.stop().await.unwrap();
    let mut ended: Vec<(Id, RunStatus)> = done.iter().map(|f| (f.run_id, f.status)).collect();
    ended.sort();
    assert_eq!(
        ended,
        [
            (ids[0], RunStatus::Completed),
            (ids[2], RunStatus::Error),
            (ids[3], RunStatus::Cancelled),
            (ids[4], RunStatus::Completed),
        ]
    );
}

/// A memory store, a tracker on it and one analysis.
async fn store_with_analysis() -> (Arc<MemoryRunStore>, Tracker, crate::model::Analysis) {
    let store = Arc::new(MemoryRunStore::new());
    let tracker = Tracker::new(store.clone());
    let analysis = tracker
        .create_analysis("a", chrono::Utc::now().date_naive(), json!({}))
        .await
        .unwrap();
    (store, tracker, analysis)
}

/// Launches one run of a new workflow whose only task is `task`.
async fn launch_one_task_run(tracker: &Tracker, analysis: Id, task: &str) -> Id {
    let text = format!("[[tasks]]\nid = \"{task}\"\nrun = \"true\"\n");
    let def = Definition::parse(&text, Format::Toml, "test.toml").unwrap();
    let workflow = tracker
        .create_workflow(task, "1", json!({}), def)
        .await
        .unwrap();
    let source = RunSource {
        source: None,
        config: json!({}),
    };
    tracker
        .launch(workflow.id, analysis, vec![source], false)
        .await
        .unwrap()[0]
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_launched_or_reset_in_the_process_start_before_the_next_poll() {
    let (store, tracker, analysis) = store_with_analysis().await;
    let executor = Arc::new(Scripted::default());
    let mut options = EngineOptions::new(std::env::temp_dir(), 2);
    // Far beyond the waits below: only the store's signal can start these runs in time.
    options.poll = Duration::from_secs(60);
    options.leader_ttl = Duration::from_secs(600);
    let mut engine = Engine::start(
        store.clone(),
        Arc::new(MemoryQueue::new()),
        executor.clone(),
        options,
    );
    // Past the scheduler's first look at the ready runs.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let id = launch_one_task_run(&tracker, analysis.id, "late").await;
    tokio::time::timeout(Duration::from_secs(10), engine.wait_for(&[id], |_| {}))
        .await
        .expect("a launched run waited for the next poll")
        .unwrap();
    tracker.reset_run(id, ResetScope::All).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), engine.wait_for(&[id], |_| {}))
        .await
        .expect("a reset run waited for the next poll")
        .unwrap();
    engine.stop().await.unwrap();

    let (run, tasks) = tracker.run_with_tasks(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(tasks[0].state, TaskState::Succeeded);
    let attempts = executor.started.lock().unwrap().len();
    assert_eq!(
        attempts, 2,
        "the run ran once, and once more after its reset"
    );
}
