//! Run stores: the conformance suite against every store, then what only SQLite promises.

use std::time::{Duration, Instant};

use butler_core::change::{Change, ChangeSet, RunChange, TaskChange, TaskExpect};
use butler_core::config::Config;
use butler_core::memory::MemoryRunStore;
use butler_core::model::{
    Analysis, AnalysisRun, EventFilter, Id, NewAnalysis, NewRun, NewRuns, NewWorkflow, RunFilter,
    RunStatus, TaskInstance, TaskState, Workflow,
};
use butler_core::testing::store::run_all;
use butler_core::{Error, RunStore};
use butler_providers::connect::{connect_store, default_store_url};
use butler_providers::sqlite::{Durability, SqliteConfig, SqliteStore};
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::json;
use sqlx::error::ErrorKind;

use crate::util::{TempDb, open_sqlite};

#[tokio::test]
async fn memory_store_passes_the_conformance_suite() {
    run_all(&MemoryRunStore::new()).await;
}

#[tokio::test]
async fn sqlite_file_store_passes_the_conformance_suite() {
    let db = TempDb::new();
    run_all(&db.open().await).await;
}

#[tokio::test]
async fn sqlite_memory_store_passes_the_conformance_suite() {
    let store = SqliteStore::connect("sqlite::memory:").await.expect("open");
    run_all(&store).await;
}

#[tokio::test]
async fn every_store_url_form_passes_the_conformance_suite() {
    let db = TempDb::new();
    let bare = db.dir.path().join("bare.db");
    for url in [
        "memory://".to_owned(),
        "sqlite::memory:".to_owned(),
        db.url(""),
        bare.display().to_string(),
    ] {
        let store = connect_store(&url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        run_all(store.as_ref()).await;
    }
    assert!(bare.exists(), "a plain path opens a SQLite file there");
    assert!(db.path.exists());
}

#[tokio::test]
async fn sqlite_memory_stores_are_separate() {
    let a = SqliteStore::connect("sqlite::memory:").await.expect("a");
    let b = SqliteStore::connect("sqlite::memory:").await.expect("b");
    setup(&a, "only-in-a").await;
    assert_eq!(a.list_workflows().await.expect("list").len(), 1);
    assert!(b.list_workflows().await.expect("list").is_empty());
}

#[tokio::test]
async fn connect_store_refuses_unknown_and_missing_backends() {
    #[cfg(not(feature = "postgres"))]
    {
        let err = connect_store("postgres://localhost/butler")
            .await
            .expect_err("no postgres backend in this build");
        let message = err.to_string();
        assert!(matches!(err, Error::NotSupported(_)), "{err:?}");
        assert!(
            message.contains("postgres") && message.contains("feature"),
            "names the scheme and the cargo feature: {message}"
        );
    }

    let err = connect_store("amqp://guest:secret@localhost/%2f")
        .await
        .expect_err("a queue URL is no store");
    let message = err.to_string();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    assert!(
        message.contains("--queue"),
        "says where it belongs: {message}"
    );

    let err = connect_store("foo://bar")
        .await
        .expect_err("unknown scheme");
    let message = err.to_string();
    assert!(matches!(err, Error::NotSupported(_)), "{err:?}");
    assert!(
        message.contains("`foo`") && message.contains("sqlite://") && message.contains("memory://"),
        "names the scheme and the accepted forms: {message}"
    );

    let err = connect_store("memory://somewhere").await.expect_err("path");
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    let err = connect_store("  ").await.expect_err("empty");
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    let err = connect_store("sqlite:///tmp/x.db?durability=fast")
        .await
        .expect_err("bad durability");
    assert!(err.to_string().contains("fast"), "{err}");
}

#[tokio::test]
async fn default_store_url_opens_a_file_in_home() {
    let db = TempDb::new();
    let home = db.dir.path().join("home");
    let url = default_store_url(&home);
    assert_eq!(url, format!("sqlite://{}/butler.db", home.display()));
    let store = connect_store(&url).await.expect("the default store opens");
    setup(store.as_ref(), "home").await;
    assert!(
        home.join("butler.db").exists(),
        "the database file is created in home, with home itself"
    );
}

#[tokio::test]
async fn data_survives_closing_and_reopening() {
    let db = TempDb::new();
    let store = db.open().await;
    let (workflow, analysis) = setup(&store, "reopen").await;
    let runs = launch(&store, &workflow, &analysis, 3)
        .await
        .expect("launch");
    store.close().await;
    drop(store);

    let reopened = db.open().await;
    assert_eq!(
        reopened.get_workflow(workflow.id).await.expect("workflow"),
        workflow
    );
    assert_eq!(
        reopened.get_analysis(analysis.id).await.expect("analysis"),
        analysis
    );
    let listed = reopened
        .list_runs(&RunFilter {
            analysis_id: Some(analysis.id),
            ..RunFilter::default()
        })
        .await
        .expect("runs");
    assert_eq!(listed, runs, "runs come back exactly as launched");
    let effective = reopened
        .get_config(runs[2].effective_config_id)
        .await
        .expect("effective config");
    assert_eq!(effective.data["analysis_run_id"], json!(runs[2].id));

    let more = launch(&reopened, &workflow, &analysis, 1)
        .await
        .expect("more");
    assert!(
        more[0].id > runs[2].id,
        "ids keep increasing after a reopen"
    );
}

#[tokio::test]
async fn a_second_store_on_the_same_file_sees_the_first_ones_writes() {
    let db = TempDb::new();
    let first = db.open().await;
    let second = db.open().await;
    let (workflow, analysis) = setup(&first, "shared").await;
    let runs = launch(&first, &workflow, &analysis, 2)
        .await
        .expect("launch");
    assert_eq!(
        second.get_workflow(workflow.id).await.expect("wf"),
        workflow
    );
    assert_eq!(second.get_run(runs[1].id).await.expect("run"), runs[1]);

    let later = launch(&second, &workflow, &analysis, 2)
        .await
        .expect("launch from the second store");
    assert!(later[0].id > runs[1].id);
    let counts = first
        .count_runs(&butler_core::model::RunFilter {
            analysis_id: Some(analysis.id),
            ..Default::default()
        })
        .await
        .expect("counts");
    assert_eq!(counts.get(&RunStatus::Ready), Some(&4));
}

/// Stores on one file stand for processes: of several racing for the scheduler's lease, one
/// wins each round, the others see its lease and its workers, and it passes on when it
/// resigns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_on_one_file_elect_one_leader_and_share_the_worker_list() {
    let db = TempDb::new();
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(db.open().await);
    }
    let ttl = Duration::from_secs(30);
    for round in 0..3 {
        let races: Vec<_> = stores
            .iter()
            .enumerate()
            .map(|(i, store)| {
                let store = store.clone();
                tokio::spawn(async move {
                    let won = store
                        .try_lead("scheduler", &format!("p{i}"), ttl)
                        .await
                        .expect("try_lead");
                    (i, won)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for race in races {
            let (i, won) = race.await.expect("join");
            if won {
                winners.push(i);
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: one leader, got {winners:?}"
        );
        let winner = winners[0];
        for store in &stores {
            let lease = store
                .leader("scheduler")
                .await
                .expect("leader")
                .expect("a lease");
            assert_eq!(
                lease.holder,
                format!("p{winner}"),
                "every store sees the leader"
            );
        }
        // Resigning through another store of the same file frees the role for the next round.
        stores[(winner + 1) % stores.len()]
            .resign("scheduler", &format!("p{winner}"))
            .await
            .expect("resign");
    }

    let now = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).expect("now");
    let worker = butler_core::model::WorkerInfo {
        name: "w1".to_owned(),
        host: "node-1".to_owned(),
        pid: 99,
        queue: "butler.tasks".to_owned(),
        slots: 2,
        running: 1,
        version: "0.1.0".to_owned(),
        started_at: now,
        heartbeat_at: now,
    };
    stores[0]
        .heartbeat_worker(&worker)
        .await
        .expect("heartbeat");
    assert_eq!(
        stores[3].list_workers().await.expect("list"),
        vec![worker],
        "a worker recorded through one store is listed by another"
    );
}

#[tokio::test]
async fn stores_opening_a_new_file_at_once_all_succeed() {
    for _ in 0..5 {
        let db = TempDb::new();
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let path = db.path.clone();
                tokio::spawn(async move { SqliteStore::open(&SqliteConfig::new(path)).await })
            })
            .collect();
        for open in opens {
            let store = open.await.expect("join").expect("every store opens");
            assert!(store.list_workflows().await.expect("list").is_empty());
        }
    }
}

#[tokio::test]
async fn concurrent_launches_on_one_file_get_distinct_increasing_ids() {
    let db = TempDb::new();
    let setup_store = db.open().await;
    let (workflow, analysis) = setup(&setup_store, "concurrent").await;
    let mut tasks = Vec::new();
    for launcher in 0..4 {
        let store = db.open().await;
        let (workflow, analysis) = (workflow.clone(), analysis.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for batch in 0..5 {
                let runs = launch_named(
                    &store,
                    &workflow,
                    &analysis,
                    &format!("l{launcher}-b{batch}"),
                    50,
                )
                .await
                .expect("a concurrent launch succeeds");
                ids.extend(runs.iter().map(|r| r.id));
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        let ids = task.await.expect("the launcher finishes");
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "each launcher's ids increase"
        );
        all.extend(ids);
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 4 * 5 * 50, "no run id is handed out twice");
    let counts = setup_store
        .count_runs(&butler_core::model::RunFilter {
            analysis_id: Some(analysis.id),
            ..Default::default()
        })
        .await
        .expect("counts");
    assert_eq!(counts.get(&RunStatus::Ready), Some(&1000));
}

#[tokio::test]
async fn status_check_rejects_an_unknown_state_written_by_hand() {
    let db = TempDb::new();
    let store = db.open().await;
    let (workflow, analysis) = setup(&store, "check").await;
    let runs = launch(&store, &workflow, &analysis, 1)
        .await
        .expect("launch");
    let err = sqlx::query("UPDATE runs SET status = 'running' WHERE id = ?")
        .bind(runs[0].id)
        .execute(store.pool())
        .await
        .expect_err("the CHECK constraint refuses an unknown status");
    assert_eq!(
        err.as_database_error().map(|e| e.kind()),
        Some(ErrorKind::CheckViolation),
        "{err}"
    );
    assert_eq!(
        store.get_run(runs[0].id).await.expect("run").status,
        RunStatus::Ready
    );
}

#[tokio::test]
async fn workflow_name_and_version_are_unique_in_the_schema_too() {
    let db = TempDb::new();
    let store = db.open().await;
    let (workflow, _) = setup(&store, "unique").await;
    let err = sqlx::query(
        "INSERT INTO workflows (name, version, definition, config_id, created_at) \
         VALUES (?, ?, '{}', ?, 0)",
    )
    .bind(&workflow.name)
    .bind(&workflow.version)
    .bind(workflow.config_id.to_string())
    .execute(store.pool())
    .await
    .expect_err("the UNIQUE constraint refuses a second name and version");
    assert_eq!(
        err.as_database_error().map(|e| e.kind()),
        Some(ErrorKind::UniqueViolation),
        "{err}"
    );

    let err = store
        .create_workflow(new_workflow(&workflow.name, Config::new(json!({}))))
        .await
        .expect_err("AlreadyExists");
    assert_eq!(
        err.to_string(),
        format!(
            "workflow {} version 1.0 already exists (id {}); choose another version",
            workflow.name, workflow.id
        )
    );
}

#[tokio::test]
async fn states_written_by_others_are_counted_and_filtered() {
    let db = TempDb::new();
    let store = db.open().await;
    let (workflow, analysis) = setup(&store, "states").await;
    let runs = launch(&store, &workflow, &analysis, 6)
        .await
        .expect("launch");
    let set = |id, status: &'static str| {
        sqlx::query("UPDATE runs SET status = ?, error = ?, started_at = 1000, ended_at = 2000 WHERE id = ?")
            .bind(status)
            .bind((status == "error").then_some("task align failed"))
            .bind(id)
            .execute(store.pool())
    };
    set(runs[0].id, "completed").await.expect("update");
    set(runs[1].id, "completed").await.expect("update");
    set(runs[2].id, "error").await.expect("update");
    set(runs[3].id, "in-progress").await.expect("update");

    let counts = store
        .count_runs(&butler_core::model::RunFilter {
            analysis_id: Some(analysis.id),
            ..Default::default()
        })
        .await
        .expect("counts");
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        vec![
            (RunStatus::Ready, 2),
            (RunStatus::InProgress, 1),
            (RunStatus::Completed, 2),
            (RunStatus::Error, 1),
        ]
    );
    let completed = store
        .list_runs(&RunFilter {
            analysis_id: Some(analysis.id),
            status: Some(RunStatus::Completed),
            ..RunFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(
        completed.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![runs[0].id, runs[1].id]
    );
    let failed = store.get_run(runs[2].id).await.expect("run");
    assert_eq!(failed.status, RunStatus::Error);
    assert_eq!(failed.error.as_deref(), Some("task align failed"));
    assert_eq!(failed.started_at.map(|t| t.timestamp_millis()), Some(1000));
    assert_eq!(failed.ended_at.map(|t| t.timestamp_millis()), Some(2000));
}

#[tokio::test]
async fn durability_is_set_from_the_url() {
    let db = TempDb::new();
    let normal = SqliteStore::connect(&db.url("durability=normal"))
        .await
        .expect("open");
    assert_eq!(normal.config().durability, Durability::Normal);
    assert_eq!(pragma(&normal, "PRAGMA synchronous").await, "1", "NORMAL");
    assert_eq!(pragma(&normal, "PRAGMA journal_mode").await, "wal");
    assert_eq!(pragma(&normal, "PRAGMA foreign_keys").await, "1");

    let full = SqliteStore::connect(&db.url("")).await.expect("open");
    assert_eq!(full.config().durability, Durability::Full);
    assert_eq!(pragma(&full, "PRAGMA synchronous").await, "2", "FULL");
    assert_eq!(pragma(&full, "PRAGMA busy_timeout").await, "10000");
}

#[tokio::test]
async fn open_creates_parent_directories() {
    let db = TempDb::new();
    let path = db.dir.path().join("a/b/c/butler.db");
    let store = open_sqlite(&path).await;
    setup(&store, "nested").await;
    assert!(path.exists());
}

#[tokio::test]
async fn open_fails_as_unavailable_naming_the_path() {
    let db = TempDb::new();
    let file = db.dir.path().join("not-a-dir");
    std::fs::write(&file, "x").expect("write");
    let path = file.join("butler.db");
    let err = SqliteStore::open(&SqliteConfig::new(&path))
        .await
        .expect_err("a file cannot be a directory");
    assert!(err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains("not-a-dir"), "{err}");
}

#[tokio::test]
async fn a_write_blocked_past_the_busy_timeout_is_unavailable() {
    let db = TempDb::new();
    let holder = db.open().await;
    let mut config = SqliteConfig::new(&db.path);
    config.busy_timeout_ms = 100;
    let waiter = SqliteStore::open(&config).await.expect("open");

    let tx = holder
        .pool()
        .begin_with("BEGIN IMMEDIATE")
        .await
        .expect("hold the write lock");
    let started = Instant::now();
    let err = waiter
        .create_analysis(new_analysis("blocked", Config::new(json!({}))))
        .await
        .expect_err("the write lock is held");
    assert!(started.elapsed() >= Duration::from_millis(90), "it waited");
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        err.to_string().contains(&db.path.display().to_string()),
        "names the database: {err}"
    );
    drop(tx);
    assert!(
        waiter.list_analyses().await.expect("list").is_empty(),
        "nothing was written"
    );
    waiter
        .create_analysis(new_analysis("unblocked", Config::new(json!({}))))
        .await
        .expect("the write succeeds once the lock is free");
}

#[tokio::test]
async fn a_row_that_cannot_be_decoded_is_named_and_not_retried() {
    let db = TempDb::new();
    let store = db.open().await;
    let (workflow, analysis) = setup(&store, "corrupt").await;
    let run = store
        .create_runs(new_runs(&workflow, &analysis, "corrupt", 1))
        .await
        .expect("launch")
        .remove(0);
    for sql in [
        "UPDATE tasks SET queued_at = 9223372036854775807 WHERE run_id = ?1",
        "UPDATE runs SET created_at = 9223372036854775807 WHERE id = ?1",
        "UPDATE configs SET data = 'not json' \
         WHERE id = (SELECT effective_config_id FROM runs WHERE id = ?1)",
        "INSERT INTO events (at, run_id, from_state, to_state, by_whom, reason) \
         VALUES (0, ?1, 'ready', 'scheduled', 'test', 'test'), \
         (9223372036854775807, ?1, 'ready', 'scheduled', 'test', 'test')",
    ] {
        sqlx::query(sql)
            .bind(run.id)
            .execute(store.pool())
            .await
            .expect("corrupt");
    }
    let events = EventFilter {
        not_by_suffix: None,
        run_id: None,
        after: 0,
        limit: 10,
    };
    let run_what = format!("run {}", run.id);
    let errors = [
        ("a task", store.list_tasks(&[run.id]).await.map(drop)),
        (run_what.as_str(), store.get_run(run.id).await.map(drop)),
        (
            "a run",
            store.list_runs(&RunFilter::default()).await.map(drop),
        ),
        (
            "a config",
            store
                .get_configs(&[run.effective_config_id])
                .await
                .map(drop),
        ),
        ("an event", store.list_events(&events).await.map(drop)),
    ];
    let location = format!("the SQLite database {}", db.path.display());
    for (what, result) in errors {
        let err = result.expect_err(what);
        assert!(!err.is_retryable(), "{err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("{what} in {location} cannot be read")),
            "{err}"
        );
    }
}

#[tokio::test]
async fn a_launch_of_ten_thousand_runs_is_one_quick_transaction() {
    let db = TempDb::new();
    let store = db.open().await;
    let (workflow, analysis) = setup(&store, "big").await;
    let launch = new_runs(&workflow, &analysis, "big", 10_000);
    let started = Instant::now();
    let runs = store.create_runs(launch).await.expect("launch");
    let elapsed = started.elapsed();
    println!("create_runs of 10,000 runs with 3 tasks each took {elapsed:?}");
    assert_eq!(runs.len(), 10_000);
    assert!(runs.windows(2).all(|w| w[1].id == w[0].id + 1));
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE run_id BETWEEN ? AND ?")
        .bind(runs[0].id)
        .bind(runs[9_999].id)
        .fetch_one(store.pool())
        .await
        .expect("count tasks");
    assert_eq!(tasks, 30_000, "three pending tasks per run");
    let last = store.list_tasks(&[runs[9_999].id]).await.expect("tasks");
    assert_eq!(
        last.iter().map(|t| t.task_id.as_str()).collect::<Vec<_>>(),
        ["align", "call", "report"]
    );
    // Far above the target of well under 1 s in a release build, to allow for an unoptimized
    // test build on a busy machine; it still catches a store that commits run by run.
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");

    let started = Instant::now();
    let page = store
        .list_runs(&RunFilter {
            analysis_id: Some(analysis.id),
            status: Some(RunStatus::Ready),
            after_id: Some(runs[4_000].id),
            limit: Some(1000),
            ..RunFilter::default()
        })
        .await
        .expect("list");
    println!("list_runs of 1,000 runs took {:?}", started.elapsed());
    assert_eq!(page.len(), 1000);
    assert_eq!(page[0], runs[4_001]);

    let again = new_runs(&workflow, &analysis, "big", 10_000);
    let started = Instant::now();
    let err = store.create_runs(again).await.expect_err("all duplicates");
    println!("refusing 10,000 duplicates took {:?}", started.elapsed());
    assert!(err.to_string().contains("… and 9980 more"), "{err}");
}

#[tokio::test]
async fn run_lists_use_an_index_in_id_order() {
    let db = TempDb::new();
    let store = db.open().await;
    let filtered = [
        (
            "analysis_id = 1 AND status = 'ready' AND id > 5",
            "runs_by_analysis_status",
        ),
        ("analysis_id = 1", "runs_by_analysis"),
        (
            "workflow_id = 1 AND status = 'error'",
            "runs_by_workflow_status",
        ),
        ("workflow_id = 1", "runs_by_workflow"),
        ("status = 'ready' AND id > 5", "runs_by_status"),
    ];
    for (condition, index) in filtered {
        let sql = format!(
            "EXPLAIN QUERY PLAN SELECT * FROM runs WHERE {condition} ORDER BY id LIMIT 1000"
        );
        let plan = query_plan(&store, &sql).await;
        assert!(plan.contains(index), "{condition}: {plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{condition} sorts: {plan}");
    }
    let plan = query_plan(
        &store,
        "EXPLAIN QUERY PLAN SELECT status, count(*) FROM runs WHERE analysis_id = 1 GROUP BY status",
    )
    .await;
    assert!(
        plan.contains("COVERING INDEX runs_by_analysis_status"),
        "{plan}"
    );
    let plan = query_plan(
        &store,
        "EXPLAIN QUERY PLAN SELECT run_config_sha256, min(id) FROM runs WHERE workflow_id = 1 \
         AND analysis_id = 1 AND run_config_sha256 IN ('a', 'b') GROUP BY run_config_sha256",
    )
    .await;
    assert!(plan.contains("runs_by_run_config"), "{plan}");
}

#[tokio::test]
async fn engine_changes_are_seen_by_a_second_store_on_the_same_file() {
    let db = TempDb::new();
    let first = db.open().await;
    let second = db.open().await;
    assert_eq!(second.last_event_id().await.expect("last"), 0, "a new log");
    let (workflow, analysis) = setup(&first, "engine-shared").await;
    let runs = launch(&first, &workflow, &analysis, 2)
        .await
        .expect("launch");
    let run = &runs[0];
    let align = TaskInstance::pending(run.id, "align");
    assert_eq!(
        second.list_tasks(&[run.id]).await.expect("tasks"),
        ["align", "call", "report"].map(|t| TaskInstance::pending(run.id, t)),
        "the second store sees the launched tasks"
    );

    let queued = TaskInstance {
        state: TaskState::Queued,
        try_number: 1,
        queued_at: Some(ms(1_700_000_000_000)),
        ..align.clone()
    };
    let applied = first
        .apply(vec![
            vec![task_change(&align, &queued)],
            vec![Change::Run(RunChange {
                run_id: run.id,
                expect: RunStatus::Ready,
                status: RunStatus::Scheduled,
                error: None,
                started_at: None,
                ended_at: None,
                by: "scheduler".into(),
                reason: "taken".into(),
            })],
        ])
        .await
        .expect("apply");
    assert_eq!(applied, [true, true]);
    assert_eq!(
        second.list_tasks(&[run.id]).await.expect("tasks")[0],
        queued
    );
    assert_eq!(
        second.get_run(run.id).await.expect("run").status,
        RunStatus::Scheduled
    );
    let events = second
        .list_events(&EventFilter {
            not_by_suffix: None,
            run_id: Some(run.id),
            after: 0,
            limit: 10,
        })
        .await
        .expect("events");
    assert_eq!(
        events
            .iter()
            .map(|e| (e.from.as_str(), e.to.as_str()))
            .collect::<Vec<_>>(),
        [("pending", "queued"), ("ready", "scheduled")]
    );
    assert_eq!(
        second.last_event_id().await.expect("last"),
        events[1].id,
        "both stores read one log"
    );

    assert_eq!(
        second
            .apply(vec![vec![task_change(&align, &queued)]])
            .await
            .expect("apply"),
        [false],
        "the second store's stale change is refused"
    );
    let running = TaskInstance {
        state: TaskState::Running,
        token: Some(9),
        lease_until: Some(ms(1_700_000_060_000)),
        worker: Some("host-b/9".into()),
        started_at: Some(ms(1_700_000_001_000)),
        ..queued.clone()
    };
    assert_eq!(
        second
            .apply(vec![vec![task_change(&queued, &running)]])
            .await
            .expect("apply"),
        [true]
    );
    assert_eq!(
        first
            .expired_leases(ms(1_700_000_060_001), 10)
            .await
            .expect("expired"),
        [running],
        "the first store sees the second one's running task and its lease"
    );
}

#[tokio::test]
async fn apply_takes_a_thousand_sets_in_one_call() {
    let db = TempDb::new();
    let store = db.open().await;
    assert_eq!(store.config().durability, Durability::Full);
    let (workflow, analysis) = setup(&store, "thousand").await;
    let runs = launch(&store, &workflow, &analysis, 1_200)
        .await
        .expect("launch");
    let run_ids: Vec<Id> = runs.iter().map(|r| r.id).rev().collect();
    let started = Instant::now();
    let tasks = store.list_tasks(&run_ids).await.expect("tasks");
    println!("list_tasks of 1,200 runs took {:?}", started.elapsed());
    assert_eq!(tasks.len(), 3_600, "every task of every run asked for");
    assert!(
        tasks
            .windows(2)
            .all(|w| (w[0].run_id, position(&w[0])) < (w[1].run_id, position(&w[1]))),
        "runs in id order, tasks in definition order"
    );
    let cursor = store.last_event_id().await.expect("last");

    let now = ms(Utc::now().timestamp_millis());
    let queue = |task: &TaskInstance| TaskInstance {
        state: TaskState::Queued,
        try_number: 1,
        queued_at: Some(now),
        ..task.clone()
    };
    let aligns: Vec<&TaskInstance> = tasks.iter().filter(|t| t.task_id == "align").collect();
    let sets: Vec<ChangeSet> = aligns[..1_000]
        .iter()
        .map(|t| vec![task_change(t, &queue(t))])
        .collect();
    let started = Instant::now();
    let applied = store.apply(sets.clone()).await.expect("apply");
    let elapsed = started.elapsed();
    println!(
        "apply of 1,000 single task changes took {elapsed:?} ({:.0} changes/s)",
        1_000.0 / elapsed.as_secs_f64()
    );
    assert_eq!(applied, vec![true; 1_000]);
    // Far above what a release build needs, to allow for an unoptimized test build on a busy
    // machine; it still catches a store that commits set by set.
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    let logged = store
        .list_events(&EventFilter {
            not_by_suffix: None,
            run_id: None,
            after: cursor,
            limit: 5_000,
        })
        .await
        .expect("events");
    assert_eq!(logged.len(), 1_000, "one event per change");
    assert!(
        logged
            .iter()
            .zip(&aligns)
            .all(|(e, t)| e.run_id == t.run_id && e.to == "queued"),
        "events in the order of the sets"
    );

    let started = Instant::now();
    let again = store.apply(sets).await.expect("apply");
    println!("refusing 1,000 stale changes took {:?}", started.elapsed());
    assert_eq!(again, vec![false; 1_000], "every change is now stale");
    let cursor = store.last_event_id().await.expect("last");
    assert_eq!(cursor, logged[999].id, "refused changes log nothing");

    // Sets of two: a task and its run, with every fourth set refused by a stale run status.
    let sets: Vec<ChangeSet> = aligns[..1_000]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let queued = queue(t);
            let running = TaskInstance {
                state: TaskState::Running,
                token: Some(i64::try_from(i).unwrap_or_default()),
                started_at: Some(now),
                ..queued.clone()
            };
            let expect = if i % 4 == 3 {
                RunStatus::Completed
            } else {
                RunStatus::Ready
            };
            vec![
                task_change(&queued, &running),
                Change::Run(RunChange {
                    run_id: t.run_id,
                    expect,
                    status: RunStatus::InProgress,
                    error: None,
                    started_at: Some(now),
                    ended_at: None,
                    by: "worker".into(),
                    reason: "a task started".into(),
                }),
            ]
        })
        .collect();
    let started = Instant::now();
    let applied = store.apply(sets).await.expect("apply");
    let elapsed = started.elapsed();
    println!("apply of 1,000 sets of two changes took {elapsed:?}");
    assert_eq!(
        applied,
        (0..1_000).map(|i| i % 4 != 3).collect::<Vec<_>>(),
        "the sets with a stale run are refused, the others applied"
    );
    let after = store.list_tasks(&run_ids).await.expect("tasks");
    let running = after
        .iter()
        .filter(|t| t.state == TaskState::Running)
        .count();
    assert_eq!(running, 750, "a refused set leaves its task queued");
    let events = store
        .list_events(&EventFilter {
            not_by_suffix: None,
            run_id: None,
            after: cursor,
            limit: 5_000,
        })
        .await
        .expect("events");
    assert_eq!(events.len(), 1_500, "two events per applied set");
}

#[tokio::test]
async fn a_database_from_before_the_state_checks_changed_keeps_its_rows_and_checks() {
    let db = TempDb::new();
    let config = "00000000-0000-0000-0000-000000000001";
    {
        // The database as the migrations up to 0006 left it, with a run and its task.
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db.path)
            .create_if_missing(true)
            .foreign_keys(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.expect("open");
        sqlx::migrate!("./migrations/sqlite")
            .run_to(6, &pool)
            .await
            .expect("migrations 1 to 6");
        for statement in [
            "INSERT INTO configs VALUES (?1, '{}', 'sha', 0)",
            "INSERT INTO workflows VALUES (1, 'w', '1', '[[tasks]]', ?1, 0)",
            "INSERT INTO analyses VALUES (1, 'a', '2026-12-03', ?1, 0)",
            "INSERT INTO runs (id, workflow_id, analysis_id, status, workflow_config_id, \
             analysis_config_id, run_config_id, effective_config_id, run_config_sha256, \
             created_at) VALUES (7, 1, 1, 'in-progress', ?1, ?1, ?1, ?1, 'sha', 0)",
            "INSERT INTO tasks (run_id, task_id, position, state, try_number) \
             VALUES (7, 'align', 0, 'up_for_retry', 2)",
        ] {
            sqlx::query(statement)
                .bind(config)
                .execute(&pool)
                .await
                .expect(statement);
        }
        pool.close().await;
    }

    let store = db.open().await;
    assert_eq!(
        store.get_run(7).await.expect("run").status,
        RunStatus::InProgress
    );
    let tasks = store.list_tasks(&[7]).await.expect("tasks");
    assert_eq!(
        tasks
            .iter()
            .map(|t| (t.task_id.as_str(), t.state, t.try_number))
            .collect::<Vec<_>>(),
        [("align", TaskState::UpForRetry, 2)]
    );
    for (statement, what) in [
        (
            "UPDATE runs SET status = 'running' WHERE id = 7",
            "run status",
        ),
        (
            "UPDATE tasks SET state = 'done' WHERE run_id = 7",
            "task state",
        ),
    ] {
        let err = sqlx::query(statement)
            .execute(store.pool())
            .await
            .expect_err(what);
        assert_eq!(
            err.as_database_error().map(|e| e.kind()),
            Some(ErrorKind::CheckViolation),
            "{what}: {err}"
        );
    }
    sqlx::query("UPDATE runs SET status = 'completed' WHERE id = 7")
        .execute(store.pool())
        .await
        .expect("a known status is allowed");
    let counts = store
        .count_runs(&RunFilter::default())
        .await
        .expect("counts");
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        [(RunStatus::Completed, 1)]
    );
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(store.pool())
        .await
        .expect("integrity_check");
    assert_eq!(check, "ok");
}

#[tokio::test]
async fn task_state_check_rejects_an_unknown_state_written_by_hand() {
    let db = TempDb::new();
    let store = db.open().await;
    let (workflow, analysis) = setup(&store, "task-check").await;
    let runs = launch(&store, &workflow, &analysis, 1)
        .await
        .expect("launch");
    let err = sqlx::query("UPDATE tasks SET state = 'done' WHERE run_id = ?")
        .bind(runs[0].id)
        .execute(store.pool())
        .await
        .expect_err("the CHECK constraint refuses an unknown task state");
    assert_eq!(
        err.as_database_error().map(|e| e.kind()),
        Some(ErrorKind::CheckViolation),
        "{err}"
    );
    for state in TaskState::ALL {
        sqlx::query("UPDATE tasks SET state = ? WHERE run_id = ? AND task_id = 'align'")
            .bind(state.as_str())
            .bind(runs[0].id)
            .execute(store.pool())
            .await
            .unwrap_or_else(|e| panic!("{state} is a valid state: {e}"));
        let tasks = store.list_tasks(&[runs[0].id]).await.expect("tasks");
        assert_eq!(tasks[0].state, state, "{state} reads back");
    }
}

#[tokio::test]
async fn a_launch_naming_a_task_twice_stores_nothing() {
    let db = TempDb::new();
    let store = db.open().await;
    let (workflow, analysis) = setup(&store, "task-twice").await;
    let mut launch = new_runs(&workflow, &analysis, "twice", 3);
    launch.task_ids.push("align".into());
    let err = store.create_runs(launch).await.expect_err("refused");
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(store.pool())
        .await
        .expect("count");
    assert_eq!(tasks, 0);
    assert!(
        store
            .list_runs(&RunFilter::default())
            .await
            .expect("runs")
            .is_empty()
    );
}

#[tokio::test]
async fn engine_reads_use_their_indexes() {
    let db = TempDb::new();
    let store = db.open().await;
    let plan = query_plan(
        &store,
        "EXPLAIN QUERY PLAN SELECT * FROM tasks WHERE state = 'running' AND lease_until < 5 \
         ORDER BY lease_until LIMIT 100",
    )
    .await;
    assert!(plan.contains("tasks_running_by_lease"), "{plan}");
    assert!(!plan.contains("TEMP B-TREE"), "expired leases sort: {plan}");
    let plan = query_plan(
        &store,
        "EXPLAIN QUERY PLAN SELECT * FROM events WHERE run_id = 1 AND id > 5 ORDER BY id LIMIT 10",
    )
    .await;
    assert!(plan.contains("events_by_run"), "{plan}");
    assert!(!plan.contains("TEMP B-TREE"), "a run's events sort: {plan}");
    let plan = query_plan(
        &store,
        "EXPLAIN QUERY PLAN SELECT * FROM tasks WHERE run_id IN \
         (SELECT value FROM json_each('[1, 2]')) ORDER BY run_id, position",
    )
    .await;
    assert!(plan.contains("PRIMARY KEY (run_id=?)"), "{plan}");
    let plan = query_plan(
        &store,
        "EXPLAIN QUERY PLAN UPDATE tasks SET state = 'queued' WHERE run_id = 1 \
         AND task_id = 'a' AND state = 'pending' AND try_number = 0 AND token IS NULL",
    )
    .await;
    assert!(
        plan.contains("PRIMARY KEY (run_id=? AND task_id=?)"),
        "{plan}"
    );
}

/// Lists 1,000-run pages of one analysis and state among 1,000,000 runs. Slow to set up, so run
/// it on demand: `cargo test -p butler-providers --test it -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "inserts a million runs"]
async fn listing_a_page_among_a_million_runs_takes_milliseconds() {
    let db = TempDb::new();
    let store = SqliteStore::connect(&db.url("durability=normal"))
        .await
        .expect("open");
    let (workflow, analysis) = setup(&store, "million").await;
    let other = store
        .create_analysis(new_analysis("million-other", Config::new(json!({}))))
        .await
        .expect("other analysis");
    let started = Instant::now();
    let mut first = None;
    for batch in 0..100 {
        let target = if batch % 2 == 0 { &analysis } else { &other };
        let runs = store
            .create_runs(new_runs(&workflow, target, &format!("m{batch}"), 10_000))
            .await
            .expect("launch");
        first.get_or_insert(runs[0].id);
    }
    println!("inserting 1,000,000 runs took {:?}", started.elapsed());
    sqlx::query("UPDATE runs SET status = 'completed' WHERE id % 3 = 0")
        .execute(store.pool())
        .await
        .expect("mark some completed");

    let mut after_id = None;
    let mut pages = 0;
    let started = Instant::now();
    while pages < 50 {
        let page = store
            .list_runs(&RunFilter {
                analysis_id: Some(analysis.id),
                status: Some(RunStatus::Completed),
                after_id,
                limit: Some(1000),
                ..RunFilter::default()
            })
            .await
            .expect("list");
        assert_eq!(page.len(), 1000);
        after_id = page.last().map(|r| r.id);
        pages += 1;
    }
    let per_page = started.elapsed() / pages;
    println!("list_runs: {per_page:?} per page of 1,000 runs");
    let started = Instant::now();
    let counts = store
        .count_runs(&butler_core::model::RunFilter {
            analysis_id: Some(analysis.id),
            ..Default::default()
        })
        .await
        .expect("count");
    println!("count_runs over 500,000 runs took {:?}", started.elapsed());
    assert_eq!(counts.values().sum::<u64>(), 500_000);
    assert!(
        per_page < Duration::from_millis(100),
        "{per_page:?} per page"
    );
}

// ---- helpers ----

fn definition() -> butler_core::definition::Definition {
    serde_json::from_value(json!({"tasks": [
        {"id": "align", "run": "align {{ config.sample }}"},
        {"id": "call", "run": "call {{ config.sample }}", "needs": ["align"]},
        {"id": "report", "run": "report", "needs": ["call"]}
    ]}))
    .expect("definition")
}

fn new_workflow(name: &str, config: Config) -> NewWorkflow {
    NewWorkflow {
        name: name.to_owned(),
        version: "1.0".to_owned(),
        definition: definition(),
        config,
    }
}

fn new_analysis(name: &str, config: Config) -> NewAnalysis {
    NewAnalysis {
        name: name.to_owned(),
        start_date: NaiveDate::from_ymd_opt(2024, 1, 15).expect("date"),
        config,
    }
}

async fn setup(store: &dyn RunStore, name: &str) -> (Workflow, Analysis) {
    let workflow = store
        .create_workflow(new_workflow(name, Config::new(json!({"threads": 2}))))
        .await
        .expect("workflow");
    let analysis = store
        .create_analysis(new_analysis(name, Config::new(json!({"cohort": name}))))
        .await
        .expect("analysis");
    (workflow, analysis)
}

fn new_runs(workflow: &Workflow, analysis: &Analysis, prefix: &str, n: usize) -> NewRuns {
    let runs = (0..n)
        .map(|i| {
            let data = json!({"sample": format!("{prefix}-{i}")});
            NewRun {
                merged_config: json!({"threads": 2, "cohort": "x", "sample": format!("{prefix}-{i}")}),
                run_config: Config::new(data),
                source_file: Some(format!("{prefix}-{i}.json")),
            }
        })
        .collect();
    NewRuns {
        workflow_id: workflow.id,
        analysis_id: analysis.id,
        workflow_config_id: workflow.config_id,
        analysis_config_id: analysis.config_id,
        runs,
        task_ids: workflow
            .definition
            .tasks
            .iter()
            .map(|t| t.id.clone())
            .collect(),
        allow_duplicates: false,
    }
}

async fn launch(
    store: &dyn RunStore,
    workflow: &Workflow,
    analysis: &Analysis,
    n: usize,
) -> butler_core::Result<Vec<AnalysisRun>> {
    launch_named(store, workflow, analysis, "s", n).await
}

async fn launch_named(
    store: &dyn RunStore,
    workflow: &Workflow,
    analysis: &Analysis,
    prefix: &str,
    n: usize,
) -> butler_core::Result<Vec<AnalysisRun>> {
    let existing = store
        .list_runs(&RunFilter {
            analysis_id: Some(analysis.id),
            ..RunFilter::default()
        })
        .await?
        .len();
    let prefix = format!("{prefix}-{existing}");
    store
        .create_runs(new_runs(workflow, analysis, &prefix, n))
        .await
}

/// A time `ms` milliseconds after the epoch.
fn ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).expect("a time in range")
}

/// Where the task stands in the test definition.
fn position(task: &TaskInstance) -> usize {
    ["align", "call", "report"]
        .iter()
        .position(|id| *id == task.task_id)
        .expect("a task of the definition")
}

/// Replace `from` (as read) with `new`.
fn task_change(from: &TaskInstance, new: &TaskInstance) -> Change {
    Change::Task(TaskChange {
        expect: TaskExpect::of(from),
        new: new.clone(),
        by: "test".into(),
        reason: format!("{} to {}", from.state, new.state),
    })
}

async fn pragma(store: &SqliteStore, sql: &'static str) -> String {
    use sqlx::Row;
    let row = sqlx::query(sql)
        .fetch_one(store.pool())
        .await
        .expect("pragma");
    row.try_get::<i64, _>(0)
        .map(|n| n.to_string())
        .or_else(|_| row.try_get::<String, _>(0))
        .expect("a pragma value")
}

async fn query_plan(store: &SqliteStore, sql: &str) -> String {
    let rows: Vec<(i64, i64, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_all(store.pool())
        .await
        .expect("query plan");
    rows.into_iter()
        .map(|(_, _, _, detail)| detail)
        .collect::<Vec<_>>()
        .join("; ")
}
