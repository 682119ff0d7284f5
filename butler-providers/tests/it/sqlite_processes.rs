//! Several processes writing one SQLite file at once, as the CLI, a server and workers do: each
//! process runs its store and queue writes on its own writer connection, and the file's lock
//! keeps them apart.
//!
//! The parent test starts copies of this test binary that run [`child_worker`] alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use butler_core::RunStore;
use butler_core::change::{Change, TaskChange, TaskExpect};
use butler_core::definition::{Definition, Format};
use butler_core::model::{EventFilter, Id, TaskInstance, TaskState};
use butler_core::queue::{NewMessage, Queue};
use butler_core::tracker::{RunSource, Tracker};
use butler_providers::sqlite::{SqliteConfig, SqliteQueue, SqliteStore};
use serde_json::json;

use crate::util::TempDb;

/// Processes in all: the parent and its children.
const PROCESSES: usize = 3;
/// Runs each process enqueues, and so messages.
const RUNS_EACH: usize = 150;
const QUEUE: &str = "shared";

/// The settings a child reads from its environment.
const DB_VAR: &str = "BUTLER_TEST_CHILD_DB";
const FIRST_VAR: &str = "BUTLER_TEST_CHILD_FIRST_RUN";
const OUT_VAR: &str = "BUTLER_TEST_CHILD_OUT";

/// One process's share of the work: enqueue one message per run of its range, in small
/// batches, while taking messages (anyone's) from the queue, moving each message's task from
/// pending to queued and acking the message. Answers one line per message taken: the run id,
/// whether the change applied and whether the ack held.
async fn work(db: &Path, first_run: Id, ready: &Path, go: &Path) -> Vec<String> {
    let store = SqliteStore::open(&SqliteConfig::new(db))
        .await
        .expect("the store opens");
    let queue = SqliteQueue::new(store.pool().clone());
    std::fs::write(ready, b"ready").expect("write the ready mark");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !go.exists() {
        assert!(Instant::now() < deadline, "the parent never said go");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let mut to_send: Vec<Id> = (first_run..first_run + RUNS_EACH as Id).collect();
    let mut lines = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "the work did not finish in 30 s");
        if !to_send.is_empty() {
            let batch: Vec<NewMessage> = to_send
                .drain(..to_send.len().min(10))
                .map(|run| NewMessage::new(run.to_string()))
                .collect();
            queue.enqueue(QUEUE, batch).await.expect("enqueue");
        }
        let got = queue
            .dequeue(QUEUE, 4, Duration::from_secs(60), Duration::from_millis(20))
            .await
            .expect("dequeue");
        if got.is_empty() && to_send.is_empty() {
            let depth = queue.depth(QUEUE).await.expect("depth");
            if depth.ready == 0 {
                break;
            }
            continue;
        }
        for delivery in got {
            let run: Id = String::from_utf8(delivery.payload)
                .expect("text")
                .parse()
                .expect("a run id");
            let pending = TaskInstance::pending(run, "a");
            let queued = TaskInstance {
                state: TaskState::Queued,
                try_number: 1,
                ..pending.clone()
            };
            let applied = store
                .apply(vec![vec![Change::Task(TaskChange {
                    expect: TaskExpect::of(&pending),
                    new: queued,
                    by: format!("process {}", std::process::id()),
                    reason: "taken from the shared queue".into(),
                })]])
                .await
                .expect("apply")[0];
            let acked = queue.ack(&[delivery.tag]).await.expect("ack")[0];
            lines.push(format!("{run} {applied} {acked}"));
        }
    }
    lines
}

/// The work of one child process, run by [`processes_share_one_file_without_losing_a_write`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of processes_share_one_file_without_losing_a_write"]
async fn child_worker() {
    let (Ok(db), Ok(first), Ok(out)) = (
        std::env::var(DB_VAR),
        std::env::var(FIRST_VAR),
        std::env::var(OUT_VAR),
    ) else {
        eprintln!("skipping child_worker: processes_share_one_file_without_losing_a_write runs it");
        return;
    };
    let out = PathBuf::from(out);
    let lines = work(
        Path::new(&db),
        first.parse().expect("a run id"),
        &out.with_extension("ready"),
        &Path::new(&db).with_extension("go"),
    )
    .await;
    std::fs::write(&out, lines.join("\n")).expect("write the child's answers");
}

fn spawn_child(db: &Path, first_run: Id, out: &Path) -> Child {
    Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "sqlite_processes::child_worker",
            "--exact",
            "--ignored",
            "--test-threads=1",
        ])
        .env(DB_VAR, db)
        .env(FIRST_VAR, first_run.to_string())
        .env(OUT_VAR, out)
        .spawn()
        .expect("the child starts")
}

/// A store on `db` with a workflow of one task and an analysis, and their ids.
async fn with_a_workflow(db: &TempDb) -> (SqliteStore, Tracker, Id, Id) {
    let store = db.open().await;
    let tracker = Tracker::new(Arc::new(store.clone()));
    let definition = Definition::parse(
        "[[tasks]]\nid = \"a\"\nrun = \"true\"\n",
        Format::Toml,
        "t.toml",
    )
    .expect("definition");
    let workflow = tracker
        .create_workflow("shared", "1", json!({}), definition)
        .await
        .expect("workflow");
    let analysis = tracker
        .create_analysis("shared", chrono::Utc::now().date_naive(), json!({}))
        .await
        .expect("analysis");
    (store, tracker, workflow.id, analysis.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_share_one_file_without_losing_a_write() {
    let db = TempDb::new();
    let (store, tracker, workflow, analysis) = with_a_workflow(&db).await;
    let sources = (0..PROCESSES * RUNS_EACH)
        .map(|n| RunSource {
            source: None,
            config: json!({ "n": n }),
        })
        .collect();
    let runs = tracker
        .launch(workflow, analysis, sources, false)
        .await
        .expect("launch");
    let ids: Vec<Id> = runs.iter().map(|r| r.id).collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "one launch numbers its runs in a row"
    );
    drop(store);

    let outs: Vec<PathBuf> = (1..PROCESSES)
        .map(|n| db.dir.path().join(format!("child-{n}.out")))
        .collect();
    let mut children: Vec<Child> = outs
        .iter()
        .enumerate()
        .map(|(n, out)| spawn_child(&db.path, ids[(n + 1) * RUNS_EACH], out))
        .collect();
    let ready: Vec<PathBuf> = outs.iter().map(|o| o.with_extension("ready")).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.iter().all(|r| r.exists()) {
        assert!(Instant::now() < deadline, "the children never got ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let go = db.path.with_extension("go");
    let parent_ready = db.dir.path().join("parent.ready");
    let parent = tokio::spawn({
        let path = db.path.clone();
        let go = go.clone();
        let first = ids[0];
        async move { work(&path, first, &parent_ready, &go).await }
    });
    std::fs::write(&go, b"go").expect("say go");
    let mut lines = parent.await.expect("the parent's share");
    for (child, out) in children.iter_mut().zip(&outs) {
        let status = child.wait().expect("the child ends");
        assert!(status.success(), "a child failed: {status}");
        let text = std::fs::read_to_string(out).expect("the child's answers");
        lines.extend(text.lines().map(str::to_owned));
    }

    let mut taken: BTreeMap<Id, Vec<String>> = BTreeMap::new();
    for line in &lines {
        let (run, answers) = line.split_once(' ').expect("run and answers");
        taken
            .entry(run.parse().expect("a run id"))
            .or_default()
            .push(answers.to_owned());
    }
    assert_eq!(
        taken.len(),
        PROCESSES * RUNS_EACH,
        "every message was taken by some process"
    );
    for (run, answers) in &taken {
        assert_eq!(
            answers,
            &["true true"],
            "run {run}: one delivery, one applied change, one ack"
        );
    }

    let store = db.open().await;
    let tasks = store.list_tasks(&ids).await.expect("tasks");
    assert!(
        tasks.iter().all(|t| t.state == TaskState::Queued),
        "every change is in the file"
    );
    let events = store
        .list_events(&EventFilter {
            not_by_suffix: None,
            run_id: None,
            after: 0,
            limit: 10_000,
        })
        .await
        .expect("events");
    let changes: Vec<_> = events.iter().filter(|e| e.to == "queued").collect();
    let by: std::collections::BTreeSet<&str> = changes.iter().map(|e| e.by.as_str()).collect();
    assert_eq!(
        changes.len(),
        PROCESSES * RUNS_EACH,
        "one event per change, none lost and none twice"
    );
    assert!(by.len() >= 2, "more than one process wrote changes: {by:?}");
    let queue = SqliteQueue::new(store.pool().clone());
    let depth = queue.depth(QUEUE).await.expect("depth");
    assert_eq!(
        (depth.ready, depth.leased, depth.dead),
        (0, 0, 0),
        "every message was acked"
    );
}

#[tokio::test]
async fn hot_writes_blocked_past_the_busy_timeout_are_unavailable_and_change_nothing() {
    let db = TempDb::new();
    let holder = db.open().await;
    let mut config = SqliteConfig::new(&db.path);
    config.busy_timeout_ms = 100;
    let waiter = SqliteStore::open(&config).await.expect("open");
    let queue = SqliteQueue::new(waiter.pool().clone());

    // Another connection (as another process would) holds the write lock.
    let tx = holder
        .pool()
        .begin_with("BEGIN IMMEDIATE")
        .await
        .expect("hold the write lock");
    let started = Instant::now();
    let err = queue
        .enqueue(QUEUE, vec![NewMessage::new("blocked")])
        .await
        .expect_err("the write lock is held");
    assert!(started.elapsed() >= Duration::from_millis(90), "it waited");
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        err.to_string().contains(&db.path.display().to_string()),
        "names the database: {err}"
    );
    let pending = TaskInstance::pending(1, "a");
    let err = waiter
        .apply(vec![vec![Change::Task(TaskChange {
            expect: TaskExpect::of(&pending),
            new: TaskInstance {
                state: TaskState::Queued,
                ..pending.clone()
            },
            by: "test".into(),
            reason: "blocked".into(),
        })]])
        .await
        .expect_err("the write lock is held");
    assert!(err.is_retryable(), "{err:?}");
    drop(tx);

    assert_eq!(
        queue.depth(QUEUE).await.expect("depth").ready,
        0,
        "nothing was written"
    );
    queue
        .enqueue(QUEUE, vec![NewMessage::new("free")])
        .await
        .expect("the write succeeds once the lock is free");
    assert_eq!(queue.depth(QUEUE).await.expect("depth").ready, 1);
}

/// The database a [`child_launcher`] launches one run into.
const LAUNCH_DB_VAR: &str = "BUTLER_TEST_CHILD_LAUNCH_DB";

/// Launches one run of workflow 1 for analysis 1, as `butler launch-workflow` would beside a
/// server; run by [`a_launch_by_another_process_rings_the_ready_runs_bell`].
#[tokio::test]
#[ignore = "a child process of a_launch_by_another_process_rings_the_ready_runs_bell"]
async fn child_launcher() {
    let Ok(db) = std::env::var(LAUNCH_DB_VAR) else {
        eprintln!(
            "skipping child_launcher: a_launch_by_another_process_rings_the_ready_runs_bell runs it"
        );
        return;
    };
    let store = SqliteStore::open(&SqliteConfig::new(&db))
        .await
        .expect("the store opens");
    let source = RunSource {
        source: None,
        config: json!({}),
    };
    Tracker::new(Arc::new(store))
        .launch(1, 1, vec![source], false)
        .await
        .expect("launch");
}

/// SQLite tells no process of another's commits: the scheduler of `butler server` learns of a
/// run launched by another process from its store's ready-runs bell, which the store's writer
/// rings when it sees the database changed and a newer run ready, instead of at its next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_by_another_process_rings_the_ready_runs_bell() {
    let db = TempDb::new();
    let (store, _, workflow, analysis) = with_a_workflow(&db).await;
    assert_eq!(
        (workflow, analysis),
        (1, 1),
        "the ids the child launches with"
    );
    let mut bell = store
        .ready_runs_signal()
        .expect("the SQLite store has a bell");
    bell.borrow_and_update();

    let status = Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "sqlite_processes::child_launcher",
            "--exact",
            "--ignored",
            "--test-threads=1",
        ])
        .env(LAUNCH_DB_VAR, &db.path)
        .status()
        .expect("the child runs");
    assert!(status.success(), "the child failed to launch: {status}");
    // Nothing in this process launched: only the look at the file can ring.
    tokio::time::timeout(Duration::from_secs(10), bell.changed())
        .await
        .expect("the bell rings within seconds of the other process's launch")
        .expect("the store is open");
}
