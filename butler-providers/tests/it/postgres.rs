//! PostgreSQL run store: the conformance suite on a schema of its own, then what only a shared
//! server promises. Tests needing the server read its URL from `BUTLER_TEST_POSTGRES_URL`; each
//! works in a fresh schema, dropped at its end.

use std::time::{Duration, Instant};

use butler_core::change::{Change, ChangeSet, RunChange, TaskChange, TaskExpect};
use butler_core::config::Config;
use butler_core::model::{
    Analysis, AnalysisRun, EventFilter, Id, NewAnalysis, NewRun, NewRuns, NewWorkflow, RunFilter,
    RunStatus, TaskInstance, TaskState, Workflow,
};
use butler_core::testing::store::run_all;
use butler_core::{Error, RunStore};
use butler_providers::postgres::{Durability, PgConfig, PgStore};
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::json;
use uuid::Uuid;

/// The server's URL with `params` added to its query.
fn with_params(url: &str, params: &str) -> String {
    let joiner = if url.contains('?') { '&' } else { '?' };
    format!("{url}{joiner}{params}")
}

/// A schema of its own on the test server, with a store open on it.
struct Schema {
    server: String,
    name: String,
    store: PgStore,
}

impl Schema {
    /// A fresh schema, or `None` (after saying why) when no server is configured.
    async fn new(test: &str) -> Option<Schema> {
        let server = crate::service_url("BUTLER_TEST_POSTGRES_URL", test)?
            .trim()
            .to_owned();
        let name = format!("butler_test_{}", Uuid::new_v4().simple());
        let url = with_params(&server, &format!("schema={name}&max_connections=4"));
        let store = PgStore::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{test}: opening a fresh schema: {e}"));
        Some(Schema {
            server,
            name,
            store,
        })
    }

    /// The URL of this schema, with `params` added.
    fn url(&self, params: &str) -> String {
        let own = format!("schema={}&max_connections=4", self.name);
        if params.is_empty() {
            with_params(&self.server, &own)
        } else {
            with_params(&self.server, &format!("{own}&{params}"))
        }
    }

    /// Another store on the same schema, as another process would open it.
    async fn open(&self) -> PgStore {
        PgStore::connect(&self.url(""))
            .await
            .expect("a second store")
    }

    /// Drops the schema and everything in it.
    async fn drop(self) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA \"{}\" CASCADE",
            self.name
        )))
        .execute(self.store.pool())
        .await
        .expect("drop the test schema");
        self.store.close().await;
    }
}

#[tokio::test]
async fn postgres_store_passes_the_conformance_suite() {
    let Some(schema) = Schema::new("postgres_store_passes_the_conformance_suite").await else {
        return;
    };
    run_all(&schema.store).await;
    schema.drop().await;
}

#[tokio::test]
async fn postgres_store_passes_the_conformance_suite_with_normal_durability() {
    let test = "postgres_store_passes_the_conformance_suite_with_normal_durability";
    let Some(schema) = Schema::new(test).await else {
        return;
    };
    let normal = PgStore::connect(&schema.url("durability=normal"))
        .await
        .expect("open");
    assert_eq!(normal.config().durability, Durability::Normal);
    run_all(&normal).await;
    normal.close().await;
    schema.drop().await;
}

#[tokio::test]
async fn a_second_store_on_the_same_schema_sees_the_first_ones_writes() {
    let test = "a_second_store_on_the_same_schema_sees_the_first_ones_writes";
    let Some(schema) = Schema::new(test).await else {
        return;
    };
    let first = &schema.store;
    let second = schema.open().await;
    let (workflow, analysis) = setup(first, "shared").await;
    let runs = launch(first, &workflow, &analysis, 3)
        .await
        .expect("launch");

    assert_eq!(
        second.get_workflow(workflow.id).await.expect("get"),
        workflow
    );
    assert_eq!(
        second.get_analysis(analysis.id).await.expect("get"),
        analysis
    );
    assert_eq!(runs_of(&second, analysis.id).await, runs);

    // The second store moves a task and the run; the first sees both and their events.
    let task = second.list_tasks(&[runs[0].id]).await.expect("tasks")[0].clone();
    let cursor = first.last_event_id().await.expect("last");
    let queued = TaskInstance {
        state: TaskState::Queued,
        try_number: 1,
        queued_at: Some(ms(Utc::now().timestamp_millis())),
        ..task.clone()
    };
    let applied = second
        .apply(vec![vec![
            task_change(&task, &queued),
            run_change(runs[0].id, RunStatus::Ready, RunStatus::Scheduled),
        ]])
        .await
        .expect("apply");
    assert_eq!(applied, [true]);
    assert_eq!(
        first.list_tasks(&[runs[0].id]).await.expect("tasks")[0],
        queued
    );
    assert_eq!(
        first.get_run(runs[0].id).await.expect("run").status,
        RunStatus::Scheduled
    );
    let events = first
        .list_events(&EventFilter {
            not_by_suffix: None,
            run_id: Some(runs[0].id),
            after: cursor,
            limit: 10,
        })
        .await
        .expect("events");
    assert_eq!(events.len(), 2, "{events:?}");
    // The first store's stale view is refused.
    assert_eq!(
        first
            .apply(vec![vec![task_change(&task, &queued)]])
            .await
            .expect("apply"),
        [false]
    );

    // Another schema on the same server is another world.
    let other = Schema::new(test).await.expect("the server is there");
    assert!(other.store.list_workflows().await.expect("list").is_empty());
    other.drop().await;
    second.close().await;
    schema.drop().await;
}

#[tokio::test]
async fn launches_and_resets_in_another_process_signal_its_scheduler() {
    let test = "launches_and_resets_in_another_process_signal_its_scheduler";
    let Some(schema) = Schema::new(test).await else {
        return;
    };
    let scheduler_side = schema.open().await;
    let mut signal = scheduler_side
        .ready_runs_signal()
        .expect("the PostgreSQL store gives a ready-runs signal");
    let (workflow, analysis) = setup(&schema.store, "elsewhere").await;
    // The listener starts in the background: launch until one launch's notification arrives.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut heard = false;
    let mut last = None;
    while !heard && Instant::now() < deadline {
        signal.borrow_and_update();
        last = Some(
            launch(&schema.store, &workflow, &analysis, 1)
                .await
                .expect("launch")[0]
                .id,
        );
        heard = tokio::time::timeout(Duration::from_millis(500), signal.changed())
            .await
            .is_ok();
    }
    assert!(
        heard,
        "a launch in another process never reached the signal"
    );

    // Once listening, a reset there arrives too.
    let id = last.expect("a run");
    let scheduled = run_change(id, RunStatus::Ready, RunStatus::Scheduled);
    assert_eq!(
        schema
            .store
            .apply(vec![vec![scheduled]])
            .await
            .expect("apply"),
        [true]
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal.borrow_and_update();
    let back = run_change(id, RunStatus::Scheduled, RunStatus::Ready);
    assert_eq!(
        schema.store.apply(vec![vec![back]]).await.expect("apply"),
        [true]
    );
    tokio::time::timeout(Duration::from_secs(5), signal.changed())
        .await
        .expect("a reset in another process reached the signal")
        .expect("signal open");
    scheduler_side.close().await;
    schema.drop().await;
}

#[tokio::test]
async fn stores_opening_a_new_schema_at_once_all_succeed() {
    let test = "stores_opening_a_new_schema_at_once_all_succeed";
    let Some(server) = crate::service_url("BUTLER_TEST_POSTGRES_URL", test) else {
        return;
    };
    let name = format!("butler_test_{}", Uuid::new_v4().simple());
    let url = with_params(&server, &format!("schema={name}&max_connections=2"));
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgStore::connect(&url).await })
        })
        .collect();
    let mut stores = Vec::new();
    for open in opens {
        stores.push(
            open.await
                .expect("the opener finishes")
                .expect("every store opens the new schema"),
        );
    }
    let store = &stores[0];
    assert_eq!(store.schema(), name);
    let migrations: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = '_sqlx_migrations'",
    )
    .bind(&name)
    .fetch_one(store.pool())
    .await
    .expect("look for the migrations table");
    assert_eq!(migrations, 1, "the migrations table lives in the schema");
    setup(&stores[3], "after-race").await;
    assert_eq!(store.list_workflows().await.expect("list").len(), 1);
    Schema {
        server,
        name,
        store: store.clone(),
    }
    .drop()
    .await;
}

#[tokio::test]
async fn every_connection_works_in_the_schema_with_the_durability_asked() {
    let test = "every_connection_works_in_the_schema_with_the_durability_asked";
    let Some(schema) = Schema::new(test).await else {
        return;
    };
    for (params, want) in [
        ("", "on"),
        ("durability=normal", "off"),
        ("durability=full", "on"),
    ] {
        let store = PgStore::connect(&schema.url(params)).await.expect("open");
        // More connections than the pool keeps idle, so several are opened and checked.
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut conn = store.pool().acquire().await.expect("connection");
            let (path, commit): (String, String) = sqlx::query_as(
                "SELECT current_setting('search_path'), current_setting('synchronous_commit')",
            )
            .fetch_one(&mut *conn)
            .await
            .expect("settings");
            assert_eq!(path, schema.name, "{params}");
            assert_eq!(commit, want, "{params}");
            held.push(conn);
        }
        drop(held);
        store.close().await;
    }
    schema.drop().await;
}

#[tokio::test]
async fn concurrent_launches_get_distinct_consecutive_ids() {
    let Some(schema) = Schema::new("concurrent_launches_get_distinct_consecutive_ids").await else {
        return;
    };
    let (workflow, analysis) = setup(&schema.store, "concurrent").await;
    let mut tasks = Vec::new();
    for launcher in 0..4 {
        let store = schema.open().await;
        let (workflow, analysis) = (workflow.clone(), analysis.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for batch in 0..5 {
                let runs = store
                    .create_runs(new_runs(
                        &workflow,
                        &analysis,
                        &format!("l{launcher}-b{batch}"),
                        50,
                    ))
                    .await
                    .expect("a concurrent launch succeeds");
                assert!(
                    runs.windows(2).all(|w| w[1].id == w[0].id + 1),
                    "a launch's ids are consecutive"
                );
                ids.extend(runs.iter().map(|r| r.id));
            }
            store.close().await;
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
    let counts = schema
        .store
        .count_runs(&butler_core::model::RunFilter {
            analysis_id: Some(analysis.id),
            ..Default::default()
        })
        .await
        .expect("counts");
    assert_eq!(counts.get(&RunStatus::Ready), Some(&1000));
    let tasks = schema.store.list_tasks(&all).await.expect("tasks");
    assert_eq!(tasks.len(), 3_000, "three tasks per run");
    schema.drop().await;
}

#[tokio::test]
async fn racing_launches_of_the_same_run_config_launch_it_once() {
    let test = "racing_launches_of_the_same_run_config_launch_it_once";
    let Some(schema) = Schema::new(test).await else {
        return;
    };
    let (workflow, analysis) = setup(&schema.store, "race").await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let store = schema.open().await;
        let launch = new_runs(&workflow, &analysis, "same", 20);
        tasks.push(tokio::spawn(async move {
            let result = store.create_runs(launch).await;
            store.close().await;
            result
        }));
    }
    let mut launched = 0;
    for task in tasks {
        match task.await.expect("the launcher finishes") {
            Ok(runs) => launched += runs.len(),
            Err(Error::Conflict(message)) => {
                assert!(message.contains("same-0.json"), "{message}");
            }
            Err(other) => panic!("expected a launch or a Conflict, got {other:?}"),
        }
    }
    assert_eq!(launched, 20, "exactly one launch of the same configs wins");
    assert_eq!(runs_of(&schema.store, analysis.id).await.len(), 20);
    schema.drop().await;
}

#[tokio::test]
async fn racing_workflows_of_one_name_and_version_register_once() {
    let test = "racing_workflows_of_one_name_and_version_register_once";
    let Some(schema) = Schema::new(test).await else {
        return;
    };
    let mut tasks = Vec::new();
    for n in 0..4 {
        let store = schema.open().await;
        tasks.push(tokio::spawn(async move {
            let result = store
                .create_workflow(new_workflow("raced", Config::new(json!({"n": n}))))
                .await;
            store.close().await;
            result
        }));
    }
    let mut winners = Vec::new();
    let mut refused = Vec::new();
    for task in tasks {
        match task.await.expect("the registrar finishes") {
            Ok(workflow) => winners.push(workflow),
            Err(Error::AlreadyExists(message)) => refused.push(message),
            Err(other) => panic!("expected a workflow or AlreadyExists, got {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "one registration wins: {refused:?}");
    let id = winners[0].id;
    for message in &refused {
        assert!(
            message.contains("raced version 1.0") && message.contains(&format!("(id {id})")),
            "the refusal names the workflow and the winner's id: {message}"
        );
    }
    assert_eq!(schema.store.list_workflows().await.expect("list"), winners);
    schema.drop().await;
}

#[tokio::test]
async fn a_launch_of_ten_thousand_runs_is_one_quick_transaction() {
    let test = "a_launch_of_ten_thousand_runs_is_one_quick_transaction";
    let Some(schema) = Schema::new(test).await else {
        return;
    };
    let store = &schema.store;
    let (workflow, analysis) = setup(store, "big").await;
    let launch = new_runs(&workflow, &analysis, "big", 10_000);
    let started = Instant::now();
    let runs = store.create_runs(launch).await.expect("launch");
    let elapsed = started.elapsed();
    println!("create_runs of 10,000 runs with 3 tasks each took {elapsed:?}");
    assert_eq!(runs.len(), 10_000);
    assert!(runs.windows(2).all(|w| w[1].id == w[0].id + 1));
    let tasks: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE run_id BETWEEN $1 AND $2")
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
    let effective = store
        .get_config(runs[9_999].effective_config_id)
        .await
        .expect("effective config");
    assert_eq!(effective.data["analysis_run_id"], json!(runs[9_999].id));
    // Far above the target of well under 2 s, to allow for an unoptimized test build on a busy
    // machine; it still catches a store that inserts run by run.
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");

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
    assert_eq!(page.len(), 1000);
    assert_eq!(page[0], runs[4_001]);

    let again = new_runs(&workflow, &analysis, "big", 10_000);
    let started = Instant::now();
    let err = store.create_runs(again).await.expect_err("all duplicates");
    println!("refusing 10,000 duplicates took {:?}", started.elapsed());
    assert!(err.to_string().contains("… and 9980 more"), "{err}");
    schema.drop().await;
}

#[tokio::test]
async fn apply_takes_a_thousand_sets_in_one_call() {
    let Some(schema) = Schema::new("apply_takes_a_thousand_sets_in_one_call").await else {
        return;
    };
    let store = &schema.store;
    let (workflow, analysis) = setup(store, "thousand").await;
    let runs = launch(store, &workflow, &analysis, 1_200)
        .await
        .expect("launch");
    let run_ids: Vec<Id> = runs.iter().map(|r| r.id).rev().collect();
    let tasks = store.list_tasks(&run_ids).await.expect("tasks");
    assert_eq!(tasks.len(), 3_600, "every task of every run asked for");
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

    let again = store.apply(sets).await.expect("apply");
    assert_eq!(again, vec![false; 1_000], "every change is now stale");
    assert_eq!(
        store.last_event_id().await.expect("last"),
        logged[999].id,
        "refused changes log nothing"
    );
    schema.drop().await;
}

#[tokio::test]
async fn deleting_runs_by_hand_deletes_their_tasks_and_events() {
    let Some(schema) = Schema::new("deleting_runs_by_hand").await else {
        return;
    };
    let store = &schema.store;
    let (workflow, analysis) = setup(store, "deleted").await;
    let runs = launch(store, &workflow, &analysis, 3)
        .await
        .expect("launch");
    let ids: Vec<Id> = runs.iter().map(|r| r.id).collect();
    let tasks = store.list_tasks(&ids).await.expect("tasks");
    let queued = |task: &TaskInstance| TaskInstance {
        state: TaskState::Queued,
        try_number: 1,
        ..task.clone()
    };
    let sets = tasks
        .iter()
        .map(|t| vec![task_change(t, &queued(t))])
        .collect();
    assert!(store.apply(sets).await.expect("apply").iter().all(|a| *a));
    let events_of = |run_id: Id| EventFilter {
        not_by_suffix: None,
        run_id: Some(run_id),
        after: 0,
        limit: 100,
    };
    assert!(
        !store
            .list_events(&events_of(ids[0]))
            .await
            .expect("events")
            .is_empty()
    );

    sqlx::query("DELETE FROM runs WHERE id = ANY($1)")
        .bind(&ids[..2])
        .execute(store.pool())
        .await
        .expect("an operator deletes two runs");

    for gone in &ids[..2] {
        assert!(
            store
                .list_events(&events_of(*gone))
                .await
                .expect("events")
                .is_empty(),
            "the events of deleted run {gone} are gone"
        );
    }
    assert!(store.list_tasks(&ids[..2]).await.expect("tasks").is_empty());
    let kept = store.list_events(&events_of(ids[2])).await.expect("events");
    assert_eq!(
        kept.len(),
        3,
        "the run kept keeps one event per task: {kept:?}"
    );
    assert_eq!(store.list_tasks(&ids[2..]).await.expect("tasks").len(), 3);
    schema.drop().await;
}

#[tokio::test]
async fn racing_applies_of_one_change_apply_it_once() {
    let Some(schema) = Schema::new("racing_applies_of_one_change_apply_it_once").await else {
        return;
    };
    let (workflow, analysis) = setup(&schema.store, "cas-race").await;
    let runs = launch(&schema.store, &workflow, &analysis, 1)
        .await
        .expect("launch");
    let pending = schema.store.list_tasks(&[runs[0].id]).await.expect("tasks")[0].clone();
    let mut tasks = Vec::new();
    for n in 0..8 {
        let store = schema.open().await;
        let change = task_change(
            &pending,
            &TaskInstance {
                state: TaskState::Queued,
                try_number: 1,
                worker: Some(format!("racer-{n}")),
                ..pending.clone()
            },
        );
        tasks.push(tokio::spawn(async move {
            let applied = store.apply(vec![vec![change]]).await.expect("apply");
            store.close().await;
            applied[0]
        }));
    }
    let mut wins = 0;
    for task in tasks {
        wins += usize::from(task.await.expect("the racer finishes"));
    }
    assert_eq!(wins, 1, "exactly one compare-and-set of the same row holds");
    let events = schema
        .store
        .list_events(&EventFilter {
            not_by_suffix: None,
            run_id: Some(runs[0].id),
            after: 0,
            limit: 100,
        })
        .await
        .expect("events");
    assert_eq!(events.len(), 1, "one event for the one change applied");
    schema.drop().await;
}

/// Calls that each change a task of one run and the status of another, crossing each other
/// (one caller moves a task of run X and run Y's status, its partner a task of Y and X's
/// status), all complete: the row locks they take leave logging events free, so none fails
/// as a deadlock.
#[tokio::test]
async fn crossing_applies_do_not_deadlock() {
    let Some(schema) = Schema::new("crossing_applies_do_not_deadlock").await else {
        return;
    };
    const CALLS: u32 = 30;
    let (workflow, analysis) = setup(&schema.store, "crossing").await;
    let runs = launch(&schema.store, &workflow, &analysis, 8)
        .await
        .expect("launch");
    let ids: Vec<Id> = runs.iter().map(|r| r.id).collect();
    let tasks = schema.store.list_tasks(&ids).await.expect("tasks");
    let mut callers = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        let store = schema.open().await;
        // Runs pair up (0, 1), (2, 3), …: each caller owns a task of its run and the status
        // of its partner's, so every one of its calls applies.
        let partner = runs[i ^ 1].id;
        let mut task = tasks
            .iter()
            .find(|t| t.run_id == run.id && t.task_id == "align")
            .expect("align")
            .clone();
        callers.push(tokio::spawn(async move {
            let mut status = RunStatus::Ready;
            for _ in 0..CALLS {
                let next_task = TaskInstance {
                    state: if task.state == TaskState::Queued {
                        TaskState::Pending
                    } else {
                        TaskState::Queued
                    },
                    try_number: task.try_number + 1,
                    ..task.clone()
                };
                let next_status = if status == RunStatus::Ready {
                    RunStatus::Scheduled
                } else {
                    RunStatus::Ready
                };
                let applied = store
                    .apply(vec![vec![
                        task_change(&task, &next_task),
                        run_change(partner, status, next_status),
                    ]])
                    .await
                    .expect("no deadlock");
                assert_eq!(applied, [true], "the caller's own rows are as it left them");
                task = next_task;
                status = next_status;
            }
            store.close().await;
        }));
    }
    for caller in callers {
        caller.await.expect("the caller finishes");
    }
    let events = schema
        .store
        .list_events(&EventFilter {
            not_by_suffix: None,
            run_id: None,
            after: 0,
            limit: 10_000,
        })
        .await
        .expect("events");
    assert_eq!(events.len(), 8 * 2 * CALLS as usize, "two events per call");
    let tasks = schema.store.list_tasks(&ids).await.expect("tasks");
    assert!(
        tasks
            .iter()
            .filter(|t| t.task_id == "align")
            .all(|t| t.try_number == CALLS),
        "every call moved its task"
    );
    schema.drop().await;
}

#[tokio::test]
async fn configs_keep_their_key_order() {
    let Some(schema) = Schema::new("configs_keep_their_key_order").await else {
        return;
    };
    let store = &schema.store;
    let text = r#"{"zeta":1,"alpha":{"y":2,"b":[3,{"k":"v","a":null}]},"mid":"ü \"quoted\""}"#;
    let config = Config::new(serde_json::from_str(text).expect("json"));
    let workflow = store
        .create_workflow(new_workflow("ordered", config.clone()))
        .await
        .expect("workflow");
    let stored = store.get_config(workflow.config_id).await.expect("config");
    assert_eq!(
        serde_json::to_string(&stored.data).expect("json"),
        text,
        "a config prints with its keys in the order they were written"
    );
    let batch = store
        .get_configs(&[workflow.config_id])
        .await
        .expect("configs");
    assert_eq!(serde_json::to_string(&batch[0].data).expect("json"), text);
    schema.drop().await;
}

#[tokio::test]
async fn a_nul_character_is_refused_as_invalid_input() {
    let Some(schema) = Schema::new("a_nul_character_is_refused_as_invalid_input").await else {
        return;
    };
    let err = schema
        .store
        .create_workflow(new_workflow("bad\u{0}name", Config::new(json!({}))))
        .await
        .expect_err("PostgreSQL cannot store a NUL in text");
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    assert!(err.to_string().contains("NUL"), "{err}");
    let (workflow, analysis) = setup(&schema.store, "nul").await;
    let runs = launch(&schema.store, &workflow, &analysis, 1)
        .await
        .expect("launch");
    let task = schema.store.list_tasks(&[runs[0].id]).await.expect("tasks")[0].clone();
    let failed = TaskInstance {
        state: TaskState::Failed,
        error: Some("exit\u{0}".to_owned()),
        ..task.clone()
    };
    let err = schema
        .store
        .apply(vec![vec![task_change(&task, &failed)]])
        .await
        .expect_err("a NUL in a task's error");
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    assert_eq!(
        schema.store.list_tasks(&[runs[0].id]).await.expect("tasks")[0],
        task,
        "the refused call changed nothing"
    );
    schema.drop().await;
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_and_keeps_the_password_secret() {
    let url = "postgres://butler:s3cret-pw@127.0.0.1:1/tracker?schema=team";
    let started = Instant::now();
    let err = PgStore::connect(url)
        .await
        .expect_err("nothing listens on port 1");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a refused connection fails at once, took {:?}",
        started.elapsed()
    );
    assert!(err.is_retryable(), "{err:?}");
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("127.0.0.1:1") && message.contains("`tracker`"),
        "names the server and database: {message}"
    );
    assert!(
        !message.contains("s3cret") && !format!("{err:?}").contains("s3cret"),
        "never the password: {message}"
    );
}

#[tokio::test]
async fn a_missing_database_is_named() {
    let Some(server) =
        crate::service_url("BUTLER_TEST_POSTGRES_URL", "a_missing_database_is_named")
    else {
        return;
    };
    let config = PgConfig::from_url(&server).expect("the test URL parses");
    let (base, query) = config
        .url
        .split_once('?')
        .map_or((config.url.as_str(), None), |(b, q)| (b, Some(q)));
    let authority_end = base
        .find("://")
        .map(|i| i + 3)
        .and_then(|start| base[start..].find('/').map(|i| start + i))
        .unwrap_or(base.len());
    let mut missing = format!("{}/butler_no_such_database", &base[..authority_end]);
    if let Some(query) = query {
        missing = with_params(&missing, query);
    }
    let err = PgStore::connect(&missing)
        .await
        .expect_err("the database does not exist");
    let message = err.to_string();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(
        message.contains("`butler_no_such_database`") && message.contains("does not exist"),
        "{message}"
    );
}

#[tokio::test]
async fn urls_set_schema_and_durability_and_hide_the_password() {
    let config = PgConfig::from_url(
        "postgresql://ops:pa55word@db.internal:6543/butler?schema=lab_two&durability=normal\
         &max_connections=3&sslmode=disable",
    )
    .expect("parse");
    assert_eq!(config.schema, "lab_two");
    assert_eq!(config.durability, Durability::Normal);
    assert_eq!(config.max_connections, 3);
    assert_eq!(
        config.url, "postgresql://ops:pa55word@db.internal:6543/butler?sslmode=disable",
        "only the driver's parameters reach the driver"
    );
    let shown = format!("{config:?}");
    assert!(
        !shown.contains("pa55word") && shown.contains("ops:***@"),
        "{shown}"
    );

    let default = PgConfig::from_url("postgres://db.internal/butler").expect("parse");
    assert_eq!(default.schema, PgConfig::DEFAULT_SCHEMA);
    assert_eq!(default.durability, Durability::Full);

    for bad in [
        "postgres://ops:pa55word@db/butler?schema=Robert');DROP",
        "postgres://ops:pa55word@db/butler?durability=sometimes",
        "postgres://ops:pa55word@db/butler?shema=typo",
    ] {
        let err = PgStore::connect(bad).await.expect_err(bad);
        assert!(matches!(err, Error::InvalidInput(_)), "{bad}: {err:?}");
        assert!(!err.to_string().contains("pa55word"), "{err}");
    }
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

async fn setup(store: &dyn RunStore, name: &str) -> (Workflow, Analysis) {
    let workflow = store
        .create_workflow(new_workflow(name, Config::new(json!({"threads": 2}))))
        .await
        .expect("workflow");
    let analysis = store
        .create_analysis(NewAnalysis {
            name: name.to_owned(),
            start_date: NaiveDate::from_ymd_opt(2024, 1, 15).expect("date"),
            config: Config::new(json!({"cohort": name})),
        })
        .await
        .expect("analysis");
    (workflow, analysis)
}

fn new_runs(workflow: &Workflow, analysis: &Analysis, prefix: &str, n: usize) -> NewRuns {
    let runs = (0..n)
        .map(|i| NewRun {
            merged_config: json!({"threads": 2, "cohort": "x", "sample": format!("{prefix}-{i}")}),
            run_config: Config::new(json!({"sample": format!("{prefix}-{i}")})),
            source_file: Some(format!("{prefix}-{i}.json")),
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
    store
        .create_runs(new_runs(workflow, analysis, &Uuid::new_v4().to_string(), n))
        .await
}

async fn runs_of(store: &dyn RunStore, analysis_id: Id) -> Vec<AnalysisRun> {
    store
        .list_runs(&RunFilter {
            analysis_id: Some(analysis_id),
            ..RunFilter::default()
        })
        .await
        .expect("list_runs")
}

fn ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).expect("in range")
}

fn task_change(from: &TaskInstance, new: &TaskInstance) -> Change {
    Change::Task(TaskChange {
        expect: TaskExpect::of(from),
        new: new.clone(),
        by: "test".to_owned(),
        reason: format!("{} to {}", from.state, new.state),
    })
}

fn run_change(run_id: Id, expect: RunStatus, status: RunStatus) -> Change {
    Change::Run(RunChange {
        run_id,
        expect,
        status,
        error: None,
        started_at: None,
        ended_at: None,
        by: "test".to_owned(),
        reason: format!("{expect} to {status}"),
    })
}
