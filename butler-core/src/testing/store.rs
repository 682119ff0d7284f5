//! Conformance suite for run stores.
//!
//! [`run_all`] runs every check against one store; each check is also a public function that can
//! run on its own. Checks create their own workflows and analyses under unique names and look only
//! at what they created, so they run in any order on one store, next to other data.
//!
//! Every check panics with a message naming the broken promise of the [`RunStore`] contract.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::change::{Change, ChangeSet, LeaseChange, RunChange, TaskChange, TaskExpect};
use crate::config::{self, Config, RUN_ID_KEY};
use crate::definition::Definition;
use crate::error::Error;
use crate::model::{
    Analysis, AnalysisRun, ConfigOwner, Event, EventFilter, Id, NewAnalysis, NewRun, NewRuns,
    NewToken, NewWorkflow, RunFilter, RunStatus, TaskInstance, TaskState, WorkerInfo, Workflow,
    hash_token,
};
use crate::store::RunStore;

/// An id no store hands out in a test.
const MISSING_ID: Id = 8_000_000_000_000_000_000;

/// Runs every check of this suite against `store`.
pub async fn run_all(store: &dyn RunStore) {
    workflows_are_created_read_and_listed(store).await;
    workflow_name_and_version_are_unique(store).await;
    analyses_are_created_read_and_listed(store).await;
    set_config_keeps_launched_layers(store).await;
    set_config_of_missing_owner_stores_nothing(store).await;
    configs_are_read_in_batches(store).await;
    create_runs_stores_effective_configs(store).await;
    create_runs_of_an_empty_launch_creates_nothing(store).await;
    create_runs_is_all_or_nothing(store).await;
    duplicate_runs_are_refused(store).await;
    duplicate_runs_within_a_launch_are_refused(store).await;
    duplicate_runs_are_allowed_when_asked(store).await;
    list_runs_filters_and_orders(store).await;
    list_runs_pages_by_id(store).await;
    count_runs_counts_per_status(store).await;
    count_runs_follow_every_change_of_a_call(store).await;
    count_active_tasks_counts_unfinished_runs(store).await;
    list_runs_pages_newest_first(store).await;
    tokens_are_stored_found_and_deleted(store).await;
    missing_ids_are_not_found(store).await;
    create_runs_creates_pending_tasks_in_order(store).await;
    create_runs_refuses_a_task_named_twice(store).await;
    task_changes_are_compare_and_set(store).await;
    a_set_applies_all_of_its_changes_or_none(store).await;
    run_changes_are_compare_and_set(store).await;
    ready_runs_are_signalled(store).await;
    leases_are_extended_only_by_the_running_holder(store).await;
    events_record_every_change_in_order(store).await;
    last_event_id_is_the_newest_event(store).await;
    expired_leases_are_running_tasks_with_past_leases(store).await;
    workers_are_recorded_by_name_and_listed_in_order(store).await;
    a_role_is_held_by_one_holder_until_it_resigns(store).await;
    an_expired_lease_goes_to_the_next_holder(store).await;
    racing_holders_elect_exactly_one(store).await;
}

/// `get_configs` returns every stored config asked for, whole, and leaves out unknown ids.
pub async fn configs_are_read_in_batches(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "get-configs").await;
    let mut got = store
        .get_configs(&[workflow.config_id, Uuid::new_v4(), analysis.config_id])
        .await
        .expect("get_configs");
    got.sort_by_key(|c| c.id);
    let mut want = vec![
        store.get_config(workflow.config_id).await.expect("config"),
        store.get_config(analysis.config_id).await.expect("config"),
    ];
    want.sort_by_key(|c| c.id);
    assert_eq!(
        got, want,
        "both stored configs, and nothing for the unknown id"
    );
    assert!(store.get_configs(&[]).await.expect("no ids").is_empty());
}

/// Workflows come back as created, their config layer is stored, and the list is ordered by id.
pub async fn workflows_are_created_read_and_listed(store: &dyn RunStore) {
    let name = unique("wf");
    let config = Config::new(json!({"threads": 4, "reference": {"genome": "hg38"}}));
    let first = store
        .create_workflow(new_workflow(&name, "1.0", config.clone()))
        .await
        .expect("create_workflow of a new name and version succeeds");
    assert!(first.id > 0, "workflow ids are positive, got {}", first.id);
    assert_eq!(first.name, name);
    assert_eq!(first.version, "1.0");
    assert_eq!(first.definition, definition());
    assert_eq!(
        first.config_id, config.id,
        "the workflow points at its config"
    );
    assert_eq!(
        store.get_config(config.id).await.expect("workflow config"),
        config,
        "the workflow's config is stored as given"
    );

    let second = store
        .create_workflow(new_workflow(&name, "2.0", Config::new(json!({}))))
        .await
        .expect("the same name with another version is a new workflow");
    assert!(
        second.id > first.id,
        "workflow ids increase: {} then {}",
        first.id,
        second.id
    );

    assert_eq!(store.get_workflow(first.id).await.expect("get"), first);
    assert_eq!(store.get_workflow(second.id).await.expect("get"), second);

    let listed = store.list_workflows().await.expect("list_workflows");
    assert_sorted_by_id(listed.iter().map(|w| w.id), "list_workflows");
    let ours: Vec<&Workflow> = listed.iter().filter(|w| w.name == name).collect();
    assert_eq!(ours, vec![&first, &second], "both workflows are listed");
}

/// A second workflow with the same name and version fails with `AlreadyExists` and stores
/// nothing.
pub async fn workflow_name_and_version_are_unique(store: &dyn RunStore) {
    let name = unique("wf-unique");
    let original = store
        .create_workflow(new_workflow(&name, "1.0", Config::new(json!({"a": 1}))))
        .await
        .expect("first workflow");
    let before = store.list_workflows().await.expect("list").len();

    let rejected_config = Config::new(json!({"a": 2}));
    let err = store
        .create_workflow(new_workflow(&name, "1.0", rejected_config.clone()))
        .await
        .expect_err("a second workflow with the same name and version is refused");
    let message = err.to_string();
    assert!(
        matches!(err, Error::AlreadyExists(_)),
        "expected AlreadyExists, got {err:?}"
    );
    assert!(
        message.contains(&name) && message.contains("1.0"),
        "the message names the workflow and version: {message}"
    );
    assert!(
        message.contains(&original.id.to_string()),
        "the message names the existing workflow's id {}: {message}",
        original.id
    );

    assert_eq!(
        store.list_workflows().await.expect("list").len(),
        before,
        "a refused workflow is not stored"
    );
    assert_not_found(
        store.get_config(rejected_config.id).await,
        "config",
        rejected_config.id,
    );
    assert_eq!(
        store.get_workflow(original.id).await.expect("get"),
        original,
        "the existing workflow is unchanged"
    );
}

/// Analyses come back as created, their config layer is stored, and the list is ordered by id.
pub async fn analyses_are_created_read_and_listed(store: &dyn RunStore) {
    let name = unique("analysis");
    let config = Config::new(json!({"cohort": "A", "samples": [1, 2, 3]}));
    let first = store
        .create_analysis(new_analysis(&name, config.clone()))
        .await
        .expect("create_analysis");
    assert!(first.id > 0, "analysis ids are positive, got {}", first.id);
    assert_eq!(first.name, name);
    assert_eq!(first.start_date, start_date());
    assert_eq!(first.config_id, config.id);
    assert_eq!(store.get_config(config.id).await.expect("config"), config);

    let second = store
        .create_analysis(new_analysis(&name, Config::new(json!({"cohort": "B"}))))
        .await
        .expect("analyses may share a name");
    assert!(second.id > first.id, "analysis ids increase");

    assert_eq!(store.get_analysis(first.id).await.expect("get"), first);
    let listed = store.list_analyses().await.expect("list_analyses");
    assert_sorted_by_id(listed.iter().map(|a| a.id), "list_analyses");
    let ours: Vec<&Analysis> = listed.iter().filter(|a| a.name == name).collect();
    assert_eq!(ours, vec![&first, &second], "both analyses are listed");
}

/// `set_config` stores a new config and repoints the owner; runs launched earlier keep the layers
/// they were launched with, and old configs stay readable.
pub async fn set_config_keeps_launched_layers(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "set-config").await;
    let old_workflow_config = store.get_config(workflow.config_id).await.expect("config");
    let old_analysis_config = store.get_config(analysis.config_id).await.expect("config");
    let before = launch(store, &workflow, &analysis, &[json!({"sample": "s1"})])
        .await
        .expect("launch before the update");

    let new_workflow_config = Config::new(json!({"threads": 16}));
    store
        .set_config(
            ConfigOwner::Workflow(workflow.id),
            new_workflow_config.clone(),
        )
        .await
        .expect("set_config of a workflow");
    let new_analysis_config = Config::new(json!({"cohort": "updated"}));
    store
        .set_config(
            ConfigOwner::Analysis(analysis.id),
            new_analysis_config.clone(),
        )
        .await
        .expect("set_config of an analysis");

    let workflow = store.get_workflow(workflow.id).await.expect("workflow");
    let analysis = store.get_analysis(analysis.id).await.expect("analysis");
    assert_eq!(
        workflow.config_id, new_workflow_config.id,
        "workflow repointed"
    );
    assert_eq!(
        analysis.config_id, new_analysis_config.id,
        "analysis repointed"
    );
    assert_eq!(
        store.get_config(new_workflow_config.id).await.expect("new"),
        new_workflow_config
    );
    assert_eq!(
        store.get_config(new_analysis_config.id).await.expect("new"),
        new_analysis_config
    );
    assert_eq!(
        store.get_config(old_workflow_config.id).await.expect("old"),
        old_workflow_config,
        "the replaced workflow config is still stored, unchanged"
    );
    assert_eq!(
        store.get_config(old_analysis_config.id).await.expect("old"),
        old_analysis_config,
        "the replaced analysis config is still stored, unchanged"
    );

    let earlier = store.get_run(before[0].id).await.expect("earlier run");
    assert_eq!(
        earlier.workflow_config_id, old_workflow_config.id,
        "a run launched before the update keeps its workflow layer"
    );
    assert_eq!(
        earlier.analysis_config_id, old_analysis_config.id,
        "a run launched before the update keeps its analysis layer"
    );

    let after = launch(store, &workflow, &analysis, &[json!({"sample": "s2"})])
        .await
        .expect("launch after the update");
    assert_eq!(after[0].workflow_config_id, new_workflow_config.id);
    assert_eq!(after[0].analysis_config_id, new_analysis_config.id);
    let effective = store
        .get_config(after[0].effective_config_id)
        .await
        .expect("effective config");
    assert_eq!(effective.data["threads"], json!(16));
    assert_eq!(effective.data["cohort"], json!("updated"));
}

/// `set_config` for a missing workflow or analysis fails with `NotFound` and stores nothing.
pub async fn set_config_of_missing_owner_stores_nothing(store: &dyn RunStore) {
    let config = Config::new(json!({"orphan": true}));
    assert_not_found(
        store
            .set_config(ConfigOwner::Workflow(MISSING_ID), config.clone())
            .await,
        "workflow",
        MISSING_ID,
    );
    assert_not_found(
        store
            .set_config(ConfigOwner::Analysis(MISSING_ID), config.clone())
            .await,
        "analysis",
        MISSING_ID,
    );
    assert_not_found(store.get_config(config.id).await, "config", config.id);
}

/// `create_runs` creates `ready` runs in launch order with increasing ids, and stores each run's
/// own config and its effective config: the merged layers with `analysis_run_id` set to the id.
pub async fn create_runs_stores_effective_configs(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "create-runs").await;
    let configs = [
        json!({"sample": "s1", "threads": 1}),
        json!({"sample": "s2", "reference": {"genome": "hg19"}}),
        json!({"sample": "s3"}),
    ];
    let sources = ["s1.json", "s2.json", "s3.json"];
    let new_runs = new_runs(store, &workflow, &analysis, &configs, Some(&sources)).await;
    let expected: Vec<NewRun> = new_runs.runs.clone();
    let runs = store.create_runs(new_runs).await.expect("create_runs");

    assert_eq!(runs.len(), 3, "one run per run config");
    assert_sorted_by_id(runs.iter().map(|r| r.id), "create_runs");
    assert!(runs[0].id > 0, "run ids are positive");
    for ((run, new), source) in runs.iter().zip(&expected).zip(sources) {
        assert_eq!(run.status, RunStatus::Ready, "new runs are ready");
        assert_eq!(run.workflow_id, workflow.id);
        assert_eq!(run.analysis_id, analysis.id);
        assert_eq!(run.workflow_config_id, workflow.config_id);
        assert_eq!(run.analysis_config_id, analysis.config_id);
        assert_eq!(run.run_config_id, new.run_config.id);
        assert_eq!(run.source_file.as_deref(), Some(source), "source file kept");
        assert_eq!(run.error, None);
        assert_eq!(run.started_at, None);
        assert_eq!(run.ended_at, None);

        assert_eq!(
            store
                .get_config(run.run_config_id)
                .await
                .expect("run config"),
            new.run_config,
            "the run's own config is stored as given"
        );
        let effective = store
            .get_config(run.effective_config_id)
            .await
            .expect("effective config");
        let mut want = new.merged_config.clone();
        want[RUN_ID_KEY] = json!(run.id);
        assert_eq!(
            effective.data, want,
            "the effective config is the merged config with the run's id"
        );
        assert_eq!(
            effective.sha256,
            config::sha256(&effective.data),
            "the effective config's hash matches its data"
        );
        assert_eq!(
            &store.get_run(run.id).await.expect("get_run"),
            run,
            "get_run returns the run as create_runs did"
        );
    }

    let later = launch(store, &workflow, &analysis, &[json!({"sample": "s4"})])
        .await
        .expect("second launch");
    assert!(
        later[0].id > runs[2].id,
        "a later launch gets larger ids: {} after {}",
        later[0].id,
        runs[2].id
    );
}

/// A launch with no run creates nothing and succeeds.
pub async fn create_runs_of_an_empty_launch_creates_nothing(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "empty-launch").await;
    let runs = launch(store, &workflow, &analysis, &[])
        .await
        .expect("an empty launch");
    assert!(runs.is_empty());
    assert!(runs_of(store, analysis.id).await.is_empty());
}

/// A launch naming a missing workflow, analysis or config layer fails with `NotFound` and stores
/// none of its runs or configs.
pub async fn create_runs_is_all_or_nothing(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "all-or-nothing").await;
    let configs = [json!({"sample": "a"}), json!({"sample": "b"})];

    let mut missing_workflow = new_runs(store, &workflow, &analysis, &configs, None).await;
    missing_workflow.workflow_id = MISSING_ID;
    let run_configs = run_config_ids(&missing_workflow);
    assert_not_found(
        store.create_runs(missing_workflow).await,
        "workflow",
        MISSING_ID,
    );
    assert_nothing_launched(store, analysis.id, &run_configs).await;

    let mut missing_analysis = new_runs(store, &workflow, &analysis, &configs, None).await;
    missing_analysis.analysis_id = MISSING_ID;
    let run_configs = run_config_ids(&missing_analysis);
    assert_not_found(
        store.create_runs(missing_analysis).await,
        "analysis",
        MISSING_ID,
    );
    assert_nothing_launched(store, analysis.id, &run_configs).await;

    let mut missing_layer = new_runs(store, &workflow, &analysis, &configs, None).await;
    let missing_config = Uuid::new_v4();
    missing_layer.analysis_config_id = missing_config;
    let run_configs = run_config_ids(&missing_layer);
    assert_not_found(
        store.create_runs(missing_layer).await,
        "config",
        missing_config,
    );
    assert_nothing_launched(store, analysis.id, &run_configs).await;
}

/// Relaunching a run config already launched for the same workflow and analysis fails with a
/// `Conflict` naming the file and the existing run, and creates nothing; the same config for
/// another analysis is no duplicate.
pub async fn duplicate_runs_are_refused(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "duplicates").await;
    let first = launch_from(
        store,
        &workflow,
        &analysis,
        &[json!({"sample": "a"}), json!({"sample": "b"})],
        &["a.json", "b.json"],
    )
    .await
    .expect("first launch");

    let again = new_runs(
        store,
        &workflow,
        &analysis,
        &[json!({"sample": "new"}), json!({"sample": "b"})],
        Some(&["new.json", "b-again.json"]),
    )
    .await;
    let run_configs = run_config_ids(&again);
    let err = store
        .create_runs(again)
        .await
        .expect_err("a launch repeating a run config is refused");
    let message = err.to_string();
    assert!(
        matches!(err, Error::Conflict(_)),
        "expected Conflict, got {err:?}"
    );
    assert!(
        message.contains("b-again.json") && message.contains(&format!("run {}", first[1].id)),
        "the message names the duplicate file and the run it repeats ({}): {message}",
        first[1].id
    );
    assert!(
        !message.contains("new.json"),
        "the message names only the duplicates: {message}"
    );
    let runs = runs_of(store, analysis.id).await;
    assert_eq!(runs, first, "a refused launch creates no run");
    for id in run_configs {
        assert_not_found(store.get_config(id).await, "config", id);
    }

    let other = another_analysis(store, "duplicates-other").await;
    launch(store, &workflow, &other, &[json!({"sample": "b"})])
        .await
        .expect("the same run config for another analysis is not a duplicate");
}

/// A launch holding the same run config twice fails with a `Conflict` naming both sources, and
/// creates nothing.
pub async fn duplicate_runs_within_a_launch_are_refused(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "duplicates-in-launch").await;
    let twice = new_runs(
        store,
        &workflow,
        &analysis,
        &[
            json!({"sample": "x", "lane": 1}),
            json!({"sample": "y"}),
            json!({"lane": 1, "sample": "x"}),
        ],
        Some(&["x.json", "y.json", "x-copy.json"]),
    )
    .await;
    let run_configs = run_config_ids(&twice);
    let err = store
        .create_runs(twice)
        .await
        .expect_err("a launch holding one run config twice is refused");
    let message = err.to_string();
    assert!(
        matches!(err, Error::Conflict(_)),
        "expected Conflict, got {err:?}"
    );
    assert!(
        message.contains("x-copy.json") && message.contains("x.json"),
        "the message names both files: {message}"
    );
    assert_nothing_launched(store, analysis.id, &run_configs).await;
}

/// With `allow_duplicates`, repeated run configs are launched again as new runs.
pub async fn duplicate_runs_are_allowed_when_asked(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "allow-duplicates").await;
    let config = json!({"sample": "again"});
    let first = launch(store, &workflow, &analysis, std::slice::from_ref(&config))
        .await
        .expect("first launch");
    let mut repeat = new_runs(
        store,
        &workflow,
        &analysis,
        &[config.clone(), config.clone()],
        None,
    )
    .await;
    repeat.allow_duplicates = true;
    let repeated = store
        .create_runs(repeat)
        .await
        .expect("duplicates are launched when allowed");
    assert_eq!(repeated.len(), 2);
    assert!(repeated[0].id > first[0].id && repeated[1].id > repeated[0].id);
    assert_eq!(runs_of(store, analysis.id).await.len(), 3);
    for run in &repeated {
        let effective = store
            .get_config(run.effective_config_id)
            .await
            .expect("cfg");
        assert_eq!(
            effective.data[RUN_ID_KEY],
            json!(run.id),
            "each repeat has its own effective config"
        );
    }
}

/// `list_runs` filters by workflow, analysis and status, and orders by id.
pub async fn list_runs_filters_and_orders(store: &dyn RunStore) {
    let (w1, a1) = setup(store, "filters").await;
    let w2 = store
        .create_workflow(new_workflow(
            &unique("filters-w2"),
            "1.0",
            Config::new(json!({})),
        ))
        .await
        .expect("second workflow");
    let a2 = another_analysis(store, "filters-a2").await;

    let r11 = launch(store, &w1, &a1, &samples("w1a1", 3))
        .await
        .expect("w1 a1");
    let r21 = launch(store, &w2, &a1, &samples("w2a1", 2))
        .await
        .expect("w2 a1");
    let r12 = launch(store, &w1, &a2, &samples("w1a2", 2))
        .await
        .expect("w1 a2");

    let by_analysis = list(
        store,
        RunFilter {
            analysis_id: Some(a1.id),
            ..RunFilter::default()
        },
    )
    .await;
    assert_eq!(ids(&by_analysis), ids(&[r11.clone(), r21.clone()].concat()));

    let by_workflow = list(
        store,
        RunFilter {
            workflow_id: Some(w1.id),
            ..RunFilter::default()
        },
    )
    .await;
    assert_eq!(ids(&by_workflow), ids(&[r11.clone(), r12.clone()].concat()));

    let both = list(
        store,
        RunFilter {
            workflow_id: Some(w2.id),
            analysis_id: Some(a1.id),
            ..RunFilter::default()
        },
    )
    .await;
    assert_eq!(both, r21, "workflow and analysis filters combine");

    let ready = list(
        store,
        RunFilter {
            analysis_id: Some(a2.id),
            status: Some(RunStatus::Ready),
            ..RunFilter::default()
        },
    )
    .await;
    assert_eq!(ready, r12, "new runs are listed as ready");
    for status in RunStatus::ALL
        .into_iter()
        .filter(|s| *s != RunStatus::Ready)
    {
        let none = list(
            store,
            RunFilter {
                analysis_id: Some(a1.id),
                status: Some(status),
                ..RunFilter::default()
            },
        )
        .await;
        assert!(none.is_empty(), "no run of a new launch is {status}");
    }

    let everything = list(store, RunFilter::default()).await;
    assert_sorted_by_id(everything.iter().map(|r| r.id), "list_runs");
    for run in r11.iter().chain(&r21).chain(&r12) {
        assert!(
            everything.contains(run),
            "an unfiltered list holds run {}",
            run.id
        );
    }
    let any_ready = list(
        store,
        RunFilter {
            status: Some(RunStatus::Ready),
            ..RunFilter::default()
        },
    )
    .await;
    assert!(r12.iter().all(|r| any_ready.contains(r)));

    let nobody = list(
        store,
        RunFilter {
            analysis_id: Some(MISSING_ID),
            ..RunFilter::default()
        },
    )
    .await;
    assert!(
        nobody.is_empty(),
        "filtering on a missing analysis lists nothing"
    );
}

/// `after_id` and `limit` page through runs in id order without gaps or repeats.
pub async fn list_runs_pages_by_id(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "paging").await;
    let runs = launch(store, &workflow, &analysis, &samples("page", 7))
        .await
        .expect("launch");

    let filter = |after_id, limit| RunFilter {
        analysis_id: Some(analysis.id),
        after_id,
        limit,
        ..RunFilter::default()
    };
    let first_three = list(store, filter(None, Some(3))).await;
    assert_eq!(first_three, runs[..3], "limit keeps the first runs by id");
    let after = list(store, filter(Some(runs[2].id), Some(3))).await;
    assert_eq!(after, runs[3..6], "after_id starts after that run");
    let rest = list(store, filter(Some(runs[5].id), None)).await;
    assert_eq!(rest, runs[6..]);
    assert!(list(store, filter(Some(runs[6].id), None)).await.is_empty());
    assert!(
        list(store, filter(None, Some(0))).await.is_empty(),
        "limit 0 lists nothing"
    );

    let mut paged = Vec::new();
    let mut after_id = None;
    loop {
        let page = list(store, filter(after_id, Some(2))).await;
        let Some(last) = page.last() else { break };
        after_id = Some(last.id);
        paged.extend(page);
    }
    assert_eq!(paged, runs, "paging visits every run once, in order");
}

/// `count_runs` counts the runs of an analysis, a workflow or the whole store per state and
/// leaves out states with no run.
pub async fn count_runs_counts_per_status(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "count").await;
    let of_analysis = |id| RunFilter {
        analysis_id: Some(id),
        ..RunFilter::default()
    };
    assert!(
        store
            .count_runs(&of_analysis(analysis.id))
            .await
            .expect("count")
            .is_empty(),
        "an analysis without runs has no counts"
    );
    let everything = store
        .count_runs(&RunFilter::default())
        .await
        .expect("count all");
    launch(store, &workflow, &analysis, &samples("count", 5))
        .await
        .expect("launch");
    let other = another_analysis(store, "count-other").await;
    let others = launch(store, &workflow, &other, &samples("other", 2))
        .await
        .expect("launch");
    apply(
        store,
        vec![vec![Change::Run(run_change(
            others[0].id,
            RunStatus::Ready,
            RunStatus::Cancelled,
        ))]],
    )
    .await;

    let counts = store
        .count_runs(&of_analysis(analysis.id))
        .await
        .expect("count");
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        vec![(RunStatus::Ready, 5)],
        "five ready runs, other states absent, other analyses not counted"
    );
    let of_workflow = RunFilter {
        workflow_id: Some(workflow.id),
        status: Some(RunStatus::Completed),
        limit: Some(1),
        ..RunFilter::default()
    };
    assert_eq!(
        store
            .count_runs(&of_workflow)
            .await
            .expect("count")
            .into_iter()
            .collect::<Vec<_>>(),
        vec![(RunStatus::Ready, 6), (RunStatus::Cancelled, 1)],
        "a workflow's runs of every analysis; status and paging are ignored"
    );
    let all = store
        .count_runs(&RunFilter::default())
        .await
        .expect("count all");
    let grew = |status| {
        all.get(&status).copied().unwrap_or(0) - everything.get(&status).copied().unwrap_or(0)
    };
    assert_eq!(
        (grew(RunStatus::Ready), grew(RunStatus::Cancelled)),
        (6, 1),
        "without a filter every run is counted"
    );
    assert_not_found(
        store.count_runs(&of_analysis(MISSING_ID)).await,
        "analysis",
        MISSING_ID,
    );
    let missing_workflow = RunFilter {
        workflow_id: Some(MISSING_ID),
        ..RunFilter::default()
    };
    assert_not_found(
        store.count_runs(&missing_workflow).await,
        "workflow",
        MISSING_ID,
    );
}

/// The counts follow one `apply` call that moves runs in several sets: a run moved twice in
/// one set and again in a later set, a run moved by a refused set, runs of two analyses, each
/// counted where it ends, as listing the runs finds them.
pub async fn count_runs_follow_every_change_of_a_call(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "count-call").await;
    let other = another_analysis(store, "count-call-other").await;
    let mut runs = launch(store, &workflow, &analysis, &samples("count-call", 4))
        .await
        .expect("launch");
    runs.extend(
        launch(store, &workflow, &other, &samples("count-call-other", 2))
            .await
            .expect("launch"),
    );
    let change = |run: usize, expect, status| Change::Run(run_change(runs[run].id, expect, status));
    let applied = apply(
        store,
        vec![
            vec![
                change(0, RunStatus::Ready, RunStatus::Scheduled),
                change(0, RunStatus::Scheduled, RunStatus::InProgress),
            ],
            vec![change(1, RunStatus::Ready, RunStatus::Scheduled)],
            // Refused as a whole: run 3 is not scheduled.
            vec![
                change(2, RunStatus::Ready, RunStatus::Cancelled),
                change(3, RunStatus::Scheduled, RunStatus::Completed),
            ],
            vec![change(0, RunStatus::InProgress, RunStatus::Completed)],
            vec![change(1, RunStatus::Scheduled, RunStatus::Ready)],
            vec![change(3, RunStatus::Ready, RunStatus::Error)],
            // The other analysis's runs, in the same call.
            vec![
                change(4, RunStatus::Ready, RunStatus::Completed),
                change(5, RunStatus::Ready, RunStatus::Completed),
            ],
        ],
    )
    .await;
    assert_eq!(applied, [true, true, false, true, true, true, true]);
    let of_analysis = |id| RunFilter {
        analysis_id: Some(id),
        ..RunFilter::default()
    };
    let of_workflow = RunFilter {
        workflow_id: Some(workflow.id),
        ..RunFilter::default()
    };
    use RunStatus::{Completed, Error, Ready};
    for (of, expected) in [
        (
            of_analysis(analysis.id),
            vec![(Ready, 2), (Completed, 1), (Error, 1)],
        ),
        (of_analysis(other.id), vec![(Completed, 2)]),
        (of_workflow, vec![(Ready, 2), (Completed, 3), (Error, 1)]),
    ] {
        let counts = store.count_runs(&of).await.expect("count");
        let mut listed: BTreeMap<RunStatus, u64> = BTreeMap::new();
        for run in store.list_runs(&of).await.expect("list") {
            *listed.entry(run.status).or_default() += 1;
        }
        assert_eq!(counts, listed, "the counts are the runs as listed");
        assert_eq!(counts.into_iter().collect::<Vec<_>>(), expected);
    }
}

/// `count_active_tasks` counts the tasks of unfinished runs per state.
pub async fn count_active_tasks_counts_unfinished_runs(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "active-tasks").await;
    let before = store.count_active_tasks().await.expect("count");
    let runs = launch(store, &workflow, &analysis, &samples("active", 3))
        .await
        .expect("launch");
    let align = task_of(store, runs[0].id, "align").await;
    let t = now_ms();
    apply(
        store,
        vec![
            vec![task_change(&align, queued(&align, t))],
            vec![Change::Run(run_change(
                runs[2].id,
                RunStatus::Ready,
                RunStatus::Cancelled,
            ))],
        ],
    )
    .await;
    let after = store.count_active_tasks().await.expect("count");
    let grew =
        |state| after.get(&state).copied().unwrap_or(0) - before.get(&state).copied().unwrap_or(0);
    assert_eq!(
        (grew(TaskState::Pending), grew(TaskState::Queued)),
        (3, 1),
        "two unfinished runs of two tasks, one task queued; the cancelled run's tasks are left out"
    );
    assert!(
        after.values().all(|&n| n > 0),
        "states with no task are absent"
    );
}

/// `newest_first` lists runs by descending id and pages backwards with `after_id`.
pub async fn list_runs_pages_newest_first(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "newest").await;
    let mut runs = launch(store, &workflow, &analysis, &samples("newest", 5))
        .await
        .expect("launch");
    runs.reverse();
    let filter = |after_id, limit| RunFilter {
        analysis_id: Some(analysis.id),
        after_id,
        limit,
        newest_first: true,
        ..RunFilter::default()
    };
    assert_eq!(list(store, filter(None, None)).await, runs, "newest first");
    let first_two = list(store, filter(None, Some(2))).await;
    assert_eq!(first_two, runs[..2], "limit keeps the newest runs");
    let next = list(store, filter(Some(runs[1].id), Some(2))).await;
    assert_eq!(next, runs[2..4], "after_id continues with older runs");
    assert!(list(store, filter(Some(runs[4].id), None)).await.is_empty());
}

/// Tokens are stored by name, found by the hash of their secret, listed and deleted.
pub async fn tokens_are_stored_found_and_deleted(store: &dyn RunStore) {
    let name = unique("token");
    let (token, secret) = NewToken::generate(&name, true);
    let created = store
        .create_token(token.clone())
        .await
        .expect("create token");
    assert_eq!(
        (created.name.as_str(), created.read_only),
        (name.as_str(), true)
    );
    let found = store
        .find_token(&hash_token(&secret))
        .await
        .expect("find token");
    assert_eq!(
        found.as_ref(),
        Some(&created),
        "the secret's hash finds the token"
    );
    assert_eq!(
        store
            .find_token(&hash_token("butler_wrong"))
            .await
            .expect("find"),
        None,
        "another secret finds nothing"
    );
    let (again, _) = NewToken::generate(&name, false);
    match store.create_token(again).await {
        Err(Error::AlreadyExists(message)) => assert!(message.contains(&name), "{message}"),
        other => panic!("a second token named {name} must be AlreadyExists, got {other:?}"),
    }
    let (writer, _) = NewToken::generate(&format!("{name}-w"), false);
    store.create_token(writer).await.expect("second token");
    let listed: Vec<(String, bool)> = store
        .list_tokens()
        .await
        .expect("list tokens")
        .into_iter()
        .filter(|t| t.name.starts_with(&name))
        .map(|t| (t.name, t.read_only))
        .collect();
    assert_eq!(
        listed,
        vec![(name.clone(), true), (format!("{name}-w"), false)],
        "ordered by name"
    );
    store.delete_token(&name).await.expect("delete token");
    assert_eq!(
        store.find_token(&hash_token(&secret)).await.expect("find"),
        None,
        "a deleted token's secret stops working"
    );
    assert_not_found(store.delete_token(&name).await, "token", &name);
}

/// Reading a missing workflow, analysis, run or config fails with `NotFound` naming its kind
/// and id.
pub async fn missing_ids_are_not_found(store: &dyn RunStore) {
    assert_not_found(store.get_workflow(MISSING_ID).await, "workflow", MISSING_ID);
    assert_not_found(store.get_analysis(MISSING_ID).await, "analysis", MISSING_ID);
    assert_not_found(store.get_run(MISSING_ID).await, "run", MISSING_ID);
    assert_not_found(store.get_workflow(0).await, "workflow", 0);
    assert_not_found(store.get_run(-1).await, "run", -1);
    let id = Uuid::new_v4();
    assert_not_found(store.get_config(id).await, "config", id);
}

/// Every run of a launch gets one `pending` task per task id, listed in the launch's order
/// (not by name); `list_tasks` orders runs by id whatever order they are asked in.
pub async fn create_runs_creates_pending_tasks_in_order(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "tasks").await;
    // Twelve ids in reverse alphabetical order: neither name nor text order of positions works.
    let task_ids: Vec<String> = (0..12).rev().map(|i| format!("step-{i:x}")).collect();
    let mut launch = new_runs(store, &workflow, &analysis, &samples("tasks", 3), None).await;
    launch.task_ids = task_ids.clone();
    let runs = store.create_runs(launch).await.expect("launch");

    let asked = [runs[2].id, runs[0].id, MISSING_ID, runs[2].id, runs[1].id];
    let tasks = store.list_tasks(&asked).await.expect("list_tasks");
    let want: Vec<TaskInstance> = runs
        .iter()
        .flat_map(|run| task_ids.iter().map(|id| TaskInstance::pending(run.id, id)))
        .collect();
    assert_eq!(
        tasks, want,
        "each run has its tasks pending in launch order, runs in id order, each run once"
    );
    assert!(
        store.list_tasks(&[]).await.expect("list_tasks").is_empty(),
        "no run ids, no tasks"
    );
    assert!(
        store
            .list_tasks(&[MISSING_ID])
            .await
            .expect("list_tasks")
            .is_empty(),
        "a missing run has no tasks"
    );

    let default = launch_tasks(store, &workflow, &analysis, "default-tasks").await;
    let names: Vec<String> = tasks_of(store, default.id)
        .await
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert_eq!(names, ["align", "report"], "the definition's tasks");
}

/// A launch naming a task twice fails with `InvalidInput` naming the task, and creates nothing.
pub async fn create_runs_refuses_a_task_named_twice(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "task-twice").await;
    let mut launch = new_runs(store, &workflow, &analysis, &samples("twice", 2), None).await;
    launch.task_ids = vec!["align".into(), "report".into(), "align".into()];
    let run_configs = run_config_ids(&launch);
    let err = store
        .create_runs(launch)
        .await
        .expect_err("a task id given twice is refused");
    assert!(
        matches!(err, Error::InvalidInput(_)),
        "expected InvalidInput, got {err:?}"
    );
    assert!(
        err.to_string().contains("\"align\""),
        "the message names the task: {err}"
    );
    assert_nothing_launched(store, analysis.id, &run_configs).await;
}

/// A task change replaces the whole row only while the task's state, attempt and token are
/// those expected; a stale expectation changes nothing and logs nothing.
pub async fn task_changes_are_compare_and_set(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "task-cas").await;
    let run = launch_tasks(store, &workflow, &analysis, "task-cas").await;
    let cursor = store.last_event_id().await.expect("last_event_id");
    let pending = task_of(store, run.id, "align").await;
    let t0 = now_ms();

    let queued = queued(&pending, t0);
    assert_eq!(
        apply(store, vec![vec![task_change(&pending, queued.clone())]]).await,
        [true],
        "a change expecting the stored row applies"
    );
    assert_eq!(task_of(store, run.id, "align").await, queued);

    // Every column set, to see each one stored and read back.
    let running = TaskInstance {
        state: TaskState::Running,
        failures: 2,
        token: Some(42),
        lease_until: Some(t0 + TimeDelta::minutes(5)),
        worker: Some("host-a/17".to_owned()),
        first_started_at: Some(t0 + TimeDelta::seconds(1)),
        started_at: Some(t0 + TimeDelta::seconds(2)),
        ended_at: Some(t0 + TimeDelta::seconds(3)),
        next_try_at: Some(t0 + TimeDelta::seconds(4)),
        exit_code: Some(-9),
        error: Some("killed by signal 9".to_owned()),
        ..queued.clone()
    };
    let stale = [
        (TaskState::Pending, 1, None, "a stale state"),
        (TaskState::Queued, 0, None, "a stale attempt"),
        (
            TaskState::Queued,
            1,
            Some(7),
            "a token the task does not have",
        ),
    ];
    for (state, try_number, token, what) in stale {
        let change = TaskChange {
            expect: TaskExpect {
                state,
                try_number,
                token,
            },
            new: running.clone(),
            by: "suite".to_owned(),
            reason: what.to_owned(),
        };
        assert_eq!(
            apply(store, vec![vec![Change::Task(change)]]).await,
            [false],
            "a change expecting {what} is refused"
        );
        assert_eq!(
            task_of(store, run.id, "align").await,
            queued,
            "a change expecting {what} changes nothing"
        );
    }
    assert_eq!(
        apply(store, vec![vec![task_change(&queued, running.clone())]]).await,
        [true]
    );
    assert_eq!(
        task_of(store, run.id, "align").await,
        running,
        "every column of the new row is stored"
    );

    let succeeded = finished(&running, TaskState::Succeeded, t0 + TimeDelta::seconds(9));
    for token in [None, Some(41)] {
        let expect = TaskExpect {
            token,
            ..TaskExpect::of(&running)
        };
        let change = TaskChange {
            expect,
            new: succeeded.clone(),
            by: "stale worker".to_owned(),
            reason: "late result".to_owned(),
        };
        assert_eq!(
            apply(store, vec![vec![Change::Task(change)]]).await,
            [false],
            "a result from the holder of token {token:?} is refused while token 42 runs"
        );
    }
    assert_eq!(task_of(store, run.id, "align").await, running);
    assert_eq!(
        apply(store, vec![vec![task_change(&running, succeeded.clone())]]).await,
        [true],
        "the holder of the current token records the result"
    );
    assert_eq!(task_of(store, run.id, "align").await, succeeded);

    let missing_task = TaskInstance::pending(run.id, "no-such-task");
    let missing_run = TaskInstance::pending(MISSING_ID, "align");
    for missing in [missing_task, missing_run] {
        let mut new = missing.clone();
        new.state = TaskState::Queued;
        assert_eq!(
            apply(store, vec![vec![task_change(&missing, new)]]).await,
            [false],
            "a change of a missing task ({}, {}) is refused",
            missing.run_id,
            missing.task_id
        );
    }
    assert_eq!(
        task_of(store, run.id, "report").await,
        TaskInstance::pending(run.id, "report"),
        "the run's other task is untouched"
    );

    let moves: Vec<(String, String)> = events_after(store, run.id, cursor)
        .await
        .into_iter()
        .map(|e| (e.from, e.to))
        .collect();
    assert_eq!(
        moves,
        [
            pair("pending", "queued"),
            pair("queued", "running"),
            pair("running", "succeeded")
        ],
        "only the applied changes are logged"
    );
}

/// A set applies every one of its changes or none; one call applies some sets and refuses
/// others, and each change sees those applied before it in the same call.
pub async fn a_set_applies_all_of_its_changes_or_none(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "sets").await;
    let runs = launch(store, &workflow, &analysis, &samples("sets", 2))
        .await
        .expect("launch");
    let (a, b) = (&runs[0], &runs[1]);
    let cursor = store.last_event_id().await.expect("last_event_id");
    let t = now_ms();

    let a_align = task_of(store, a.id, "align").await;
    let a_report = task_of(store, a.id, "report").await;
    let wrong = TaskChange {
        expect: TaskExpect {
            state: TaskState::Running,
            ..TaskExpect::of(&a_report)
        },
        new: queued(&a_report, t),
        by: "suite".to_owned(),
        reason: "expects a state the task is not in".to_owned(),
    };
    let refused = vec![
        task_change(&a_align, queued(&a_align, t)),
        Change::Run(run_change(a.id, RunStatus::Ready, RunStatus::Scheduled)),
        Change::Task(wrong),
    ];

    let b_align = task_of(store, b.id, "align").await;
    let b_report = task_of(store, b.id, "report").await;
    let b_queued = queued(&b_align, t);
    let applied = vec![
        task_change(&b_align, b_queued.clone()),
        Change::Run(run_change(b.id, RunStatus::Ready, RunStatus::Scheduled)),
    ];
    let b_running = running(&b_queued, 7, t);
    let b_succeeded = finished(&b_running, TaskState::Succeeded, t);
    let chained = vec![
        task_change(&b_queued, b_running.clone()),
        task_change(&b_running, b_succeeded.clone()),
    ];
    let lease_refused = vec![
        task_change(&b_report, queued(&b_report, t)),
        Change::Lease(LeaseChange {
            run_id: b.id,
            task_id: "align".to_owned(),
            token: 7,
            until: t + TimeDelta::minutes(1),
        }),
    ];

    let answer = apply(
        store,
        vec![refused, applied, chained, lease_refused, Vec::new()],
    )
    .await;
    assert_eq!(
        answer,
        [false, true, true, false, true],
        "the set with a stale change and the one with a refused lease are refused; the others, \
         including one building on an earlier set and an empty one, apply"
    );

    assert_eq!(
        tasks_of(store, a.id).await,
        [a_align, a_report],
        "no change of a refused set is applied"
    );
    assert_eq!(
        store.get_run(a.id).await.expect("run").status,
        RunStatus::Ready,
        "the run change of a refused set is not applied"
    );
    assert!(
        events_after(store, a.id, cursor).await.is_empty(),
        "a refused set logs no event"
    );

    assert_eq!(
        tasks_of(store, b.id).await,
        [b_succeeded, b_report],
        "applied sets are applied in order; the refused lease undid its set's task change"
    );
    assert_eq!(
        store.get_run(b.id).await.expect("run").status,
        RunStatus::Scheduled
    );
    let logged: Vec<(Option<String>, String, String)> = events_after(store, b.id, cursor)
        .await
        .into_iter()
        .map(|e| (e.task_id, e.from, e.to))
        .collect();
    assert_eq!(
        logged,
        [
            (Some("align".to_owned()), "pending".into(), "queued".into()),
            (None, "ready".into(), "scheduled".into()),
            (Some("align".to_owned()), "queued".into(), "running".into()),
            (
                Some("align".to_owned()),
                "running".into(),
                "succeeded".into()
            ),
        ],
        "applied sets log their changes in order"
    );
    assert!(
        apply(store, Vec::new()).await.is_empty(),
        "no sets, no answers"
    );
}

/// Where the store gives a ready-runs signal, it changes after a launch and after a change that
/// puts a run back to `ready` (a reset). (It may change at other times too, as when another
/// process's notification arrives late: that costs a scheduler one needless look.)
pub async fn ready_runs_are_signalled(store: &dyn RunStore) {
    let Some(mut signal) = store.ready_runs_signal() else {
        return;
    };
    let (workflow, analysis) = setup(store, "ready-signal").await;
    signal.borrow_and_update();
    let id = launch_tasks(store, &workflow, &analysis, "ready-signal")
        .await
        .id;
    assert!(signal.has_changed().expect("signal"), "a launch signals");

    let scheduled = run_change(id, RunStatus::Ready, RunStatus::Scheduled);
    assert_eq!(
        apply(store, vec![vec![Change::Run(scheduled)]]).await,
        [true]
    );
    signal.borrow_and_update();
    let back = run_change(id, RunStatus::Scheduled, RunStatus::Ready);
    assert_eq!(apply(store, vec![vec![Change::Run(back)]]).await, [true]);
    assert!(
        signal.has_changed().expect("signal"),
        "a run back to `ready` signals"
    );
}

/// A run change moves the run only from the expected status; `started_at` is kept when the
/// change has none, and a move back to `ready` clears the times and the error.
pub async fn run_changes_are_compare_and_set(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "run-cas").await;
    let launched = launch_tasks(store, &workflow, &analysis, "run-cas").await;
    let id = launched.id;
    let cursor = store.last_event_id().await.expect("last_event_id");
    let t1 = now_ms();
    let t2 = t1 + TimeDelta::seconds(30);

    let scheduled = run_change(id, RunStatus::Ready, RunStatus::Scheduled);
    assert_eq!(
        apply(store, vec![vec![Change::Run(scheduled)]]).await,
        [true]
    );
    let mut want = AnalysisRun {
        status: RunStatus::Scheduled,
        ..launched.clone()
    };
    assert_eq!(store.get_run(id).await.expect("run"), want);

    let started = RunChange {
        started_at: Some(t1),
        ..run_change(id, RunStatus::Scheduled, RunStatus::InProgress)
    };
    assert_eq!(apply(store, vec![vec![Change::Run(started)]]).await, [true]);
    want.status = RunStatus::InProgress;
    want.started_at = Some(t1);
    assert_eq!(
        store.get_run(id).await.expect("run"),
        want,
        "started_at set"
    );

    let failed = RunChange {
        error: Some("task align failed".to_owned()),
        ended_at: Some(t2),
        ..run_change(id, RunStatus::InProgress, RunStatus::Error)
    };
    assert_eq!(apply(store, vec![vec![Change::Run(failed)]]).await, [true]);
    want.status = RunStatus::Error;
    want.error = Some("task align failed".to_owned());
    want.ended_at = Some(t2);
    assert_eq!(
        store.get_run(id).await.expect("run"),
        want,
        "a change without started_at keeps the stored one"
    );

    let stale = RunChange {
        ended_at: Some(t2 + TimeDelta::seconds(1)),
        ..run_change(id, RunStatus::InProgress, RunStatus::Completed)
    };
    assert_eq!(
        apply(store, vec![vec![Change::Run(stale)]]).await,
        [false],
        "a change expecting a status the run left is refused"
    );
    assert_eq!(
        store.get_run(id).await.expect("run"),
        want,
        "a refused change leaves the run as it was"
    );
    assert_eq!(
        apply(
            store,
            vec![vec![Change::Run(run_change(
                MISSING_ID,
                RunStatus::Ready,
                RunStatus::Scheduled
            ))]]
        )
        .await,
        [false],
        "a change of a missing run is refused"
    );

    let reset = RunChange {
        error: Some("kept nowhere".to_owned()),
        started_at: Some(t2),
        ended_at: Some(t2),
        ..run_change(id, RunStatus::Error, RunStatus::Ready)
    };
    assert_eq!(apply(store, vec![vec![Change::Run(reset)]]).await, [true]);
    assert_eq!(
        store.get_run(id).await.expect("run"),
        launched,
        "a run put back to ready has no start, end or error"
    );

    let logged: Vec<Event> = events_after(store, id, cursor).await;
    let moves: Vec<(String, String)> = logged
        .iter()
        .map(|e| (e.from.clone(), e.to.clone()))
        .collect();
    assert_eq!(
        moves,
        [
            pair("ready", "scheduled"),
            pair("scheduled", "in-progress"),
            pair("in-progress", "error"),
            pair("error", "ready")
        ]
    );
    assert!(
        logged
            .iter()
            .all(|e| e.task_id.is_none() && e.try_number.is_none()),
        "run events name no task: {logged:?}"
    );
}

/// A lease is extended only for a running task and only by the holder of its token; lease
/// changes log no event.
pub async fn leases_are_extended_only_by_the_running_holder(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "lease").await;
    let run = launch_tasks(store, &workflow, &analysis, "lease").await;
    let t = now_ms();
    let pending = task_of(store, run.id, "align").await;
    let queued = queued(&pending, t);
    let running = running(&queued, 5, t);
    assert_eq!(
        apply(
            store,
            vec![vec![
                task_change(&pending, queued.clone()),
                task_change(&queued, running.clone())
            ]]
        )
        .await,
        [true]
    );
    let cursor = store.last_event_id().await.expect("last_event_id");

    let lease = |task_id: &str, token, until| {
        vec![Change::Lease(LeaseChange {
            run_id: run.id,
            task_id: task_id.to_owned(),
            token,
            until,
        })]
    };
    let later = t + TimeDelta::minutes(10);
    assert_eq!(
        apply(store, vec![lease("align", 5, later)]).await,
        [true],
        "the holder extends its lease"
    );
    let extended = TaskInstance {
        lease_until: Some(later),
        ..running.clone()
    };
    assert_eq!(
        task_of(store, run.id, "align").await,
        extended,
        "only lease_until changes"
    );
    let other = later + TimeDelta::minutes(10);
    assert_eq!(
        apply(
            store,
            vec![lease("align", 6, other), lease("report", 5, other)]
        )
        .await,
        [false, false],
        "another token, or a task that is not running, extends nothing"
    );
    assert_eq!(task_of(store, run.id, "align").await, extended);
    assert_eq!(
        task_of(store, run.id, "report").await,
        TaskInstance::pending(run.id, "report")
    );
    assert!(
        events_after(store, run.id, cursor).await.is_empty(),
        "lease changes log no event"
    );

    let retry = TaskInstance {
        next_try_at: Some(t + TimeDelta::minutes(1)),
        ..finished(&extended, TaskState::UpForRetry, t)
    };
    assert_eq!(
        apply(store, vec![vec![task_change(&extended, retry.clone())]]).await,
        [true]
    );
    assert_eq!(
        apply(store, vec![lease("align", 5, other)]).await,
        [false],
        "a task that stopped running keeps no lease, even for its last token"
    );
    assert_eq!(task_of(store, run.id, "align").await, retry);
    let missing = Change::Lease(LeaseChange {
        run_id: MISSING_ID,
        task_id: "align".to_owned(),
        token: 5,
        until: other,
    });
    assert_eq!(apply(store, vec![vec![missing]]).await, [false]);
}

/// Each applied change logs who made it, why, from which state to which, with the attempt
/// number for tasks; `list_events` filters by run and pages by id.
pub async fn events_record_every_change_in_order(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "events").await;
    let runs = launch(store, &workflow, &analysis, &samples("events", 2))
        .await
        .expect("launch");
    let (a, b) = (&runs[0], &runs[1]);
    let cursor = store.last_event_id().await.expect("last_event_id");
    let before = now_ms();
    let align = task_of(store, a.id, "align").await;
    let queued = queued(&align, before);
    let started = running(&queued, 11, before);
    let by = |change: Change, by: &str, reason: &str| match change {
        Change::Task(c) => Change::Task(TaskChange {
            by: by.to_owned(),
            reason: reason.to_owned(),
            ..c
        }),
        Change::Run(c) => Change::Run(RunChange {
            by: by.to_owned(),
            reason: reason.to_owned(),
            ..c
        }),
        lease => lease,
    };
    let answer = apply(
        store,
        vec![
            vec![by(
                task_change(&align, queued.clone()),
                "scheduler",
                "its needs are met",
            )],
            vec![by(
                Change::Run(run_change(b.id, RunStatus::Ready, RunStatus::Cancelled)),
                "cli",
                "cancelled by a user",
            )],
            vec![
                by(
                    task_change(&queued, started.clone()),
                    "worker host-b/42",
                    "started",
                ),
                by(
                    Change::Run(run_change(a.id, RunStatus::Ready, RunStatus::InProgress)),
                    "worker host-b/42",
                    "a task started",
                ),
            ],
        ],
    )
    .await;
    assert_eq!(answer, [true, true, true]);
    let after = Utc::now();

    let all = store
        .list_events(&EventFilter {
            not_by_suffix: None,
            run_id: None,
            after: cursor,
            limit: u32::MAX,
        })
        .await
        .expect("list_events");
    assert_sorted_by_id(all.iter().map(|e| e.id), "list_events");
    assert!(
        all.iter().all(|e| e.id > cursor),
        "only events after the cursor"
    );
    let ours: Vec<&Event> = all
        .iter()
        .filter(|e| e.run_id == a.id || e.run_id == b.id)
        .collect();
    let summary: Vec<_> = ours
        .iter()
        .map(|e| {
            (
                e.run_id,
                e.task_id.as_deref(),
                e.try_number,
                e.from.as_str(),
                e.to.as_str(),
                e.by.as_str(),
                e.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                a.id,
                Some("align"),
                Some(1),
                "pending",
                "queued",
                "scheduler",
                "its needs are met"
            ),
            (
                b.id,
                None,
                None,
                "ready",
                "cancelled",
                "cli",
                "cancelled by a user"
            ),
            (
                a.id,
                Some("align"),
                Some(1),
                "queued",
                "running",
                "worker host-b/42",
                "started"
            ),
            (
                a.id,
                None,
                None,
                "ready",
                "in-progress",
                "worker host-b/42",
                "a task started"
            ),
        ],
        "every applied change is logged in order, with who, why and the attempt"
    );
    for event in &ours {
        assert!(
            event.at >= before && event.at <= after,
            "event {} was logged at {}, not between {before} and {after}",
            event.id,
            event.at
        );
    }

    let of_a = |after, limit| EventFilter {
        not_by_suffix: None,
        run_id: Some(a.id),
        after,
        limit,
    };
    let a_events = store
        .list_events(&of_a(cursor, 100))
        .await
        .expect("list_events");
    let want: Vec<Event> = ours
        .iter()
        .filter(|e| e.run_id == a.id)
        .map(|e| (*e).clone())
        .collect();
    assert_eq!(
        a_events, want,
        "the run filter keeps only that run's events"
    );
    let first = store.list_events(&of_a(cursor, 2)).await.expect("page");
    assert_eq!(first, want[..2], "limit keeps the oldest events");
    let rest = store
        .list_events(&of_a(first[1].id, 2))
        .await
        .expect("page");
    assert_eq!(rest, want[2..], "after starts past that event");
    assert!(
        store
            .list_events(&of_a(want[2].id, 10))
            .await
            .expect("page")
            .is_empty()
    );
    assert!(
        store
            .list_events(&of_a(cursor, 0))
            .await
            .expect("page")
            .is_empty(),
        "limit 0 lists nothing"
    );
    assert!(
        store
            .list_events(&EventFilter {
                not_by_suffix: None,
                run_id: Some(MISSING_ID),
                after: 0,
                limit: 10,
            })
            .await
            .expect("list_events")
            .is_empty()
    );
}

/// `last_event_id` is the id of the newest event; refused sets and lease changes leave it.
pub async fn last_event_id_is_the_newest_event(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "last-event").await;
    let run = launch_tasks(store, &workflow, &analysis, "last-event").await;
    let before = store.last_event_id().await.expect("last_event_id");
    assert!(before >= 0, "event ids are not negative: {before}");
    let pending = task_of(store, run.id, "align").await;
    let queued = queued(&pending, now_ms());
    assert_eq!(
        apply(store, vec![vec![task_change(&pending, queued.clone())]]).await,
        [true]
    );
    let last = store.last_event_id().await.expect("last_event_id");
    let logged = events_after(store, run.id, before).await;
    assert_eq!(logged.len(), 1);
    assert!(
        last > before && last >= logged[0].id,
        "last_event_id {last} counts the new event {}",
        logged[0].id
    );

    let running = running(&queued, 3, now_ms());
    let refused = vec![
        task_change(&queued, running.clone()),
        task_change(&pending, queued.clone()),
    ];
    let lease = vec![Change::Lease(LeaseChange {
        run_id: run.id,
        task_id: "align".to_owned(),
        token: 3,
        until: now_ms(),
    })];
    assert_eq!(apply(store, vec![refused]).await, [false]);
    assert_eq!(
        store.last_event_id().await.expect("last_event_id"),
        last,
        "a refused set leaves no event, not even a rolled-back one"
    );
    assert_eq!(
        apply(store, vec![vec![task_change(&queued, running)], lease]).await,
        [true, true]
    );
    let newest = store.last_event_id().await.expect("last_event_id");
    let logged = events_after(store, run.id, last).await;
    assert_eq!(
        logged.len(),
        1,
        "one task change, and the lease logs nothing"
    );
    assert_eq!(newest, logged[0].id, "the newest event is the task change");
}

/// `expired_leases` lists running tasks whose lease ended strictly before `now`, oldest lease
/// first, up to `limit`; tasks in other states are never listed, whatever their lease.
pub async fn expired_leases_are_running_tasks_with_past_leases(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "expired").await;
    let runs = launch(store, &workflow, &analysis, &samples("expired", 3))
        .await
        .expect("launch");
    // Long ago, so that no lease of a test using the clock is listed.
    let now = DateTime::from_timestamp_millis(978_307_200_000).expect("2001-01-01");
    let minutes = TimeDelta::minutes;
    let leased = |run: &AnalysisRun, task_id: &str, state, until| TaskInstance {
        state,
        try_number: 1,
        token: Some(run.id),
        lease_until: Some(until),
        started_at: Some(until - minutes(5)),
        ..TaskInstance::pending(run.id, task_id)
    };
    let oldest = leased(&runs[1], "align", TaskState::Running, now - minutes(2));
    let older = leased(&runs[0], "align", TaskState::Running, now - minutes(1));
    let rows = [
        older.clone(),
        oldest.clone(),
        leased(&runs[2], "align", TaskState::Running, now + minutes(10)),
        leased(&runs[2], "report", TaskState::Running, now),
        leased(&runs[0], "report", TaskState::Queued, now - minutes(5)),
        leased(&runs[1], "report", TaskState::UpForRetry, now - minutes(5)),
    ];
    let sets: Vec<ChangeSet> = rows
        .iter()
        .map(|row| {
            vec![task_change(
                &TaskInstance::pending(row.run_id, &row.task_id),
                row.clone(),
            )]
        })
        .collect();
    assert_eq!(apply(store, sets).await, [true; 6]);

    let ours = |tasks: Vec<TaskInstance>| -> Vec<TaskInstance> {
        tasks
            .into_iter()
            .filter(|t| runs.iter().any(|r| r.id == t.run_id))
            .collect()
    };
    let expired = store
        .expired_leases(now, 1000)
        .await
        .expect("expired_leases");
    assert!(
        expired
            .iter()
            .all(|t| t.state == TaskState::Running && t.lease_until.is_some_and(|u| u < now)),
        "only running tasks with a lease ended before now: {expired:?}"
    );
    assert!(
        expired
            .windows(2)
            .all(|w| w[0].lease_until <= w[1].lease_until),
        "oldest lease first: {expired:?}"
    );
    assert_eq!(
        ours(expired),
        [oldest.clone(), older],
        "the two running tasks with past leases, oldest first; not a lease ending at now, a \
         future lease, or tasks that are not running"
    );
    let first = store.expired_leases(now, 1).await.expect("expired_leases");
    assert_eq!(first.len(), 1, "limit 1 lists one task");
    assert!(
        first[0].lease_until <= oldest.lease_until,
        "limit keeps the oldest lease: {first:?}"
    );
    assert_eq!(
        ours(
            store
                .expired_leases(now - TimeDelta::seconds(90), 1000)
                .await
                .expect("expired")
        ),
        [oldest],
        "an earlier now lists fewer tasks"
    );
    assert!(
        store
            .expired_leases(now, 0)
            .await
            .expect("expired")
            .is_empty(),
        "limit 0 lists nothing"
    );
}

/// A heartbeat records a worker whole under its name and the next one replaces it; workers
/// are listed by name and removed when forgotten.
pub async fn workers_are_recorded_by_name_and_listed_in_order(store: &dyn RunStore) {
    let prefix = unique("worker");
    let started = now_ms() - TimeDelta::seconds(30);
    let worker = |suffix: &str, pid: u32, running: u32| WorkerInfo {
        name: format!("{prefix}-{suffix}"),
        host: "node-7".to_owned(),
        pid,
        queue: "butler.tasks".to_owned(),
        slots: 4,
        running,
        version: "1.2.3".to_owned(),
        started_at: started,
        heartbeat_at: started + TimeDelta::seconds(1),
    };
    let ours = async || -> Vec<WorkerInfo> {
        store
            .list_workers()
            .await
            .expect("list_workers")
            .into_iter()
            .filter(|w| w.name.starts_with(&prefix))
            .collect()
    };
    assert!(
        ours().await.is_empty(),
        "no worker before its first heartbeat"
    );

    let b = worker("b", 20, 0);
    let a = worker("a", 10, 1);
    for w in [&b, &a] {
        store.heartbeat_worker(w).await.expect("heartbeat_worker");
    }
    assert_eq!(
        ours().await,
        vec![a.clone(), b.clone()],
        "both workers, whole, ordered by name"
    );

    let a_again = WorkerInfo {
        running: 3,
        queue: "butler.tasks.python".to_owned(),
        heartbeat_at: now_ms(),
        ..a.clone()
    };
    store
        .heartbeat_worker(&a_again)
        .await
        .expect("a second heartbeat");
    assert_eq!(
        ours().await,
        vec![a_again.clone(), b.clone()],
        "a heartbeat replaces the worker of its name and adds no other"
    );

    store.forget_worker(&a.name).await.expect("forget_worker");
    assert_eq!(ours().await, vec![b.clone()], "a forgotten worker is gone");
    store
        .forget_worker(&a.name)
        .await
        .expect("forgetting a worker not recorded is not an error");
    store.forget_worker(&b.name).await.expect("forget_worker");
    assert!(ours().await.is_empty(), "every worker forgotten");
}

/// A role's lease goes to one holder, is renewed only by it, and is free for another at once
/// when it resigns; a resignation by anyone else changes nothing.
pub async fn a_role_is_held_by_one_holder_until_it_resigns(store: &dyn RunStore) {
    let role = unique("role");
    let ttl = Duration::from_secs(60);
    assert_eq!(
        store.leader(&role).await.expect("leader"),
        None,
        "a role never taken has no lease"
    );

    let before = now_ms();
    assert!(
        store.try_lead(&role, "alpha", ttl).await.expect("try_lead"),
        "a free role is taken"
    );
    let first = store
        .leader(&role)
        .await
        .expect("leader")
        .expect("a lease once taken");
    assert_eq!(first.role, role);
    assert_eq!(first.holder, "alpha");
    assert!(
        first.is_held(Utc::now()),
        "the lease is in force: {first:?}"
    );
    assert!(
        first.until >= before + TimeDelta::seconds(59),
        "the lease lasts its ttl: {first:?} taken at {before}"
    );

    assert!(
        !store.try_lead(&role, "beta", ttl).await.expect("try_lead"),
        "a lease in force is not taken by another holder"
    );
    assert_eq!(
        store.leader(&role).await.expect("leader").map(|l| l.holder),
        Some("alpha".to_owned()),
        "a refused try changes nothing"
    );

    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(
        store.try_lead(&role, "alpha", ttl).await.expect("renew"),
        "the holder renews its lease"
    );
    let renewed = store.leader(&role).await.expect("leader").expect("a lease");
    assert_eq!(renewed.holder, "alpha");
    assert_eq!(renewed.since, first.since, "a renewal keeps `since`");
    assert!(
        renewed.until >= first.until,
        "a renewal moves the end forward: {first:?} then {renewed:?}"
    );

    store
        .resign(&role, "beta")
        .await
        .expect("resigning a role one does not hold");
    let after_beta = store.leader(&role).await.expect("leader").expect("a lease");
    assert!(
        after_beta.holder == "alpha" && after_beta.is_held(Utc::now()),
        "only the holder can resign: {after_beta:?}"
    );

    store.resign(&role, "alpha").await.expect("resign");
    let resigned = store.leader(&role).await.expect("leader").expect("a lease");
    assert_eq!(
        resigned.holder, "alpha",
        "an ended lease still names its last holder"
    );
    assert!(
        !resigned.is_held(Utc::now() + TimeDelta::milliseconds(1)),
        "a resigned lease has ended: {resigned:?}"
    );
    assert!(
        store.try_lead(&role, "beta", ttl).await.expect("try_lead"),
        "a resigned role is free for another holder at once"
    );
    let taken = store.leader(&role).await.expect("leader").expect("a lease");
    assert_eq!(taken.holder, "beta");
    assert!(
        taken.since >= first.since,
        "a takeover starts a new lease: {first:?} then {taken:?}"
    );
    store.resign(&role, "beta").await.expect("resign");
}

/// A lease its holder stops renewing ends after its ttl; then another holder takes it, and the
/// old holder can no longer renew it.
pub async fn an_expired_lease_goes_to_the_next_holder(store: &dyn RunStore) {
    let role = unique("role-expiry");
    let short = Duration::from_millis(100);
    assert!(
        store
            .try_lead(&role, "alpha", short)
            .await
            .expect("try_lead")
    );
    assert!(
        !store
            .try_lead(&role, "beta", short)
            .await
            .expect("try_lead"),
        "the lease is still in force"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let expired = store.leader(&role).await.expect("leader").expect("a lease");
    assert!(
        !expired.is_held(Utc::now()),
        "a lease not renewed within its ttl has ended: {expired:?}"
    );
    assert!(
        store
            .try_lead(&role, "beta", Duration::from_secs(60))
            .await
            .expect("try_lead"),
        "an expired lease is taken over"
    );
    assert!(
        !store
            .try_lead(&role, "alpha", Duration::from_secs(60))
            .await
            .expect("try_lead"),
        "the old holder cannot renew a lease taken over"
    );
    let lease = store.leader(&role).await.expect("leader").expect("a lease");
    assert_eq!(lease.holder, "beta");
    store.resign(&role, "beta").await.expect("resign");
}

/// Of several holders trying for a free role at the same moment, exactly one wins it.
pub async fn racing_holders_elect_exactly_one(store: &dyn RunStore) {
    let role = unique("role-race");
    let ttl = Duration::from_secs(60);
    let holders = ["h1", "h2", "h3", "h4", "h5", "h6"];
    let attempt = |holder: &'static str| {
        let role = role.clone();
        async move {
            let won = store
                .try_lead(&role, holder, ttl)
                .await
                .expect("try_lead in a race");
            (holder, won)
        }
    };
    let results = tokio::join!(
        attempt(holders[0]),
        attempt(holders[1]),
        attempt(holders[2]),
        attempt(holders[3]),
        attempt(holders[4]),
        attempt(holders[5]),
    );
    let results = [
        results.0, results.1, results.2, results.3, results.4, results.5,
    ];
    let winners: Vec<&str> = results
        .iter()
        .filter(|(_, won)| *won)
        .map(|(holder, _)| *holder)
        .collect();
    assert_eq!(
        winners.len(),
        1,
        "exactly one of the racing holders leads: {results:?}"
    );
    let lease = store.leader(&role).await.expect("leader").expect("a lease");
    assert_eq!(lease.holder, winners[0], "the lease names the winner");
    store.resign(&role, winners[0]).await.expect("resign");
}

// ---- helpers ----

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::new_v4().simple())
}

fn start_date() -> NaiveDate {
    NaiveDate::from_ymd_opt(2024, 3, 31).expect("a valid date")
}

fn definition() -> Definition {
    serde_json::from_value(json!({
        "tasks": [
            {"id": "align", "run": "align {{ config.sample }}", "timeout": "5m"},
            {"id": "report", "run": "report", "needs": ["align"], "retries": 2}
        ],
        "max_active_runs": 4
    }))
    .expect("the suite's definition parses")
}

fn new_workflow(name: &str, version: &str, config: Config) -> NewWorkflow {
    NewWorkflow {
        name: name.to_owned(),
        version: version.to_owned(),
        definition: definition(),
        config,
    }
}

fn new_analysis(name: &str, config: Config) -> NewAnalysis {
    NewAnalysis {
        name: name.to_owned(),
        start_date: start_date(),
        config,
    }
}

/// A fresh analysis with an empty config, beside the one [`setup`] made.
async fn another_analysis(store: &dyn RunStore, prefix: &str) -> Analysis {
    store
        .create_analysis(new_analysis(&unique(prefix), Config::new(json!({}))))
        .await
        .expect("create_analysis")
}

/// A fresh workflow and analysis, each with a config layer.
async fn setup(store: &dyn RunStore, prefix: &str) -> (Workflow, Analysis) {
    let workflow = store
        .create_workflow(new_workflow(
            &unique(prefix),
            "1.0",
            Config::new(json!({"threads": 8, "reference": {"genome": "hg38", "build": 1}})),
        ))
        .await
        .expect("create_workflow");
    let analysis = store
        .create_analysis(new_analysis(
            &unique(prefix),
            Config::new(json!({"cohort": "A", "reference": {"build": 2}})),
        ))
        .await
        .expect("create_analysis");
    (workflow, analysis)
}

fn samples(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"sample": format!("{prefix}-{i}")}))
        .collect()
}

/// The launch of `configs` with the workflow's and analysis's current layers.
async fn new_runs(
    store: &dyn RunStore,
    workflow: &Workflow,
    analysis: &Analysis,
    configs: &[Value],
    sources: Option<&[&str]>,
) -> NewRuns {
    let workflow_config = store.get_config(workflow.config_id).await.expect("config");
    let analysis_config = store.get_config(analysis.config_id).await.expect("config");
    let runs = configs
        .iter()
        .enumerate()
        .map(|(i, data)| NewRun {
            run_config: Config::new(data.clone()),
            merged_config: config::merge(&[&workflow_config.data, &analysis_config.data, data]),
            source_file: sources.map(|s| s[i].to_owned()),
        })
        .collect();
    NewRuns {
        workflow_id: workflow.id,
        analysis_id: analysis.id,
        workflow_config_id: workflow_config.id,
        analysis_config_id: analysis_config.id,
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
    configs: &[Value],
) -> crate::Result<Vec<AnalysisRun>> {
    let runs = new_runs(store, workflow, analysis, configs, None).await;
    store.create_runs(runs).await
}

async fn launch_from(
    store: &dyn RunStore,
    workflow: &Workflow,
    analysis: &Analysis,
    configs: &[Value],
    sources: &[&str],
) -> crate::Result<Vec<AnalysisRun>> {
    let runs = new_runs(store, workflow, analysis, configs, Some(sources)).await;
    store.create_runs(runs).await
}

fn run_config_ids(runs: &NewRuns) -> Vec<Uuid> {
    runs.runs.iter().map(|r| r.run_config.id).collect()
}

async fn list(store: &dyn RunStore, filter: RunFilter) -> Vec<AnalysisRun> {
    store.list_runs(&filter).await.expect("list_runs")
}

async fn runs_of(store: &dyn RunStore, analysis_id: Id) -> Vec<AnalysisRun> {
    list(
        store,
        RunFilter {
            analysis_id: Some(analysis_id),
            ..RunFilter::default()
        },
    )
    .await
}

fn ids(runs: &[AnalysisRun]) -> Vec<Id> {
    runs.iter().map(|r| r.id).collect()
}

async fn assert_nothing_launched(store: &dyn RunStore, analysis_id: Id, run_configs: &[Uuid]) {
    assert!(
        runs_of(store, analysis_id).await.is_empty(),
        "a failed launch creates no run"
    );
    for id in run_configs {
        assert_not_found(store.get_config(*id).await, "config", id);
    }
}

fn assert_sorted_by_id(ids: impl Iterator<Item = Id>, what: &str) {
    let ids: Vec<Id> = ids.collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "{what} is ordered by increasing id: {ids:?}"
    );
}

fn assert_not_found<T: std::fmt::Debug>(
    result: crate::Result<T>,
    kind: &str,
    id: impl std::fmt::Display,
) {
    let id = id.to_string();
    match result {
        Err(err @ Error::NotFound { .. }) => {
            let message = err.to_string();
            assert!(
                message.contains(kind) && message.contains(&id),
                "the NotFound message names the {kind} and its id {id}: {message}"
            );
        }
        other => panic!("expected NotFound for {kind} {id}, got {other:?}"),
    }
}

/// Launches one run with the workflow's tasks.
async fn launch_tasks(
    store: &dyn RunStore,
    workflow: &Workflow,
    analysis: &Analysis,
    prefix: &str,
) -> AnalysisRun {
    let mut runs = launch(store, workflow, analysis, &samples(prefix, 1))
        .await
        .expect("launch");
    runs.pop().expect("one run")
}

/// Now, on a whole millisecond: stores keep times to the millisecond.
fn now_ms() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

fn pair(from: &str, to: &str) -> (String, String) {
    (from.to_owned(), to.to_owned())
}

async fn apply(store: &dyn RunStore, sets: Vec<ChangeSet>) -> Vec<bool> {
    let count = sets.len();
    let answer = store.apply(sets).await.expect("apply");
    assert_eq!(answer.len(), count, "apply answers once per set");
    answer
}

async fn tasks_of(store: &dyn RunStore, run_id: Id) -> Vec<TaskInstance> {
    store.list_tasks(&[run_id]).await.expect("list_tasks")
}

async fn task_of(store: &dyn RunStore, run_id: Id, task_id: &str) -> TaskInstance {
    tasks_of(store, run_id)
        .await
        .into_iter()
        .find(|t| t.task_id == task_id)
        .unwrap_or_else(|| panic!("run {run_id} has a task {task_id}"))
}

/// The events of one run after `cursor`.
async fn events_after(store: &dyn RunStore, run_id: Id, cursor: Id) -> Vec<Event> {
    store
        .list_events(&EventFilter {
            not_by_suffix: None,
            run_id: Some(run_id),
            after: cursor,
            limit: u32::MAX,
        })
        .await
        .expect("list_events")
}

/// Replace `from` (as read) with `new`.
fn task_change(from: &TaskInstance, new: TaskInstance) -> Change {
    Change::Task(TaskChange {
        expect: TaskExpect::of(from),
        reason: format!("{} to {}", from.state, new.state),
        new,
        by: "suite".to_owned(),
    })
}

fn run_change(run_id: Id, expect: RunStatus, status: RunStatus) -> RunChange {
    RunChange {
        run_id,
        expect,
        status,
        error: None,
        started_at: None,
        ended_at: None,
        by: "suite".to_owned(),
        reason: format!("{expect} to {status}"),
    }
}

/// `task` queued for its next attempt.
fn queued(task: &TaskInstance, at: DateTime<Utc>) -> TaskInstance {
    TaskInstance {
        state: TaskState::Queued,
        try_number: task.try_number + 1,
        queued_at: Some(at),
        ..task.clone()
    }
}

/// `task` started by a worker holding `token`.
fn running(task: &TaskInstance, token: i64, at: DateTime<Utc>) -> TaskInstance {
    TaskInstance {
        state: TaskState::Running,
        token: Some(token),
        lease_until: Some(at + TimeDelta::minutes(1)),
        worker: Some("suite-worker".to_owned()),
        first_started_at: task.first_started_at.or(Some(at)),
        started_at: Some(at),
        ..task.clone()
    }
}

/// `task`'s attempt ended in `state`.
fn finished(task: &TaskInstance, state: TaskState, at: DateTime<Utc>) -> TaskInstance {
    TaskInstance {
        state,
        lease_until: None,
        ended_at: Some(at),
        exit_code: Some(i32::from(state != TaskState::Succeeded)),
        ..task.clone()
    }
}
