//! Conformance suite for run stores.
//!
//! [`run_all`] runs every check against one store; each check is also a public function that can
//! run on its own. Checks create their own workflows and analyses under unique names and look only
//! at what they created, so they run in any order on one store, next to other data.
//!
//! Every check panics with a message naming the broken promise of the [`RunStore`] contract.

use chrono::NaiveDate;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::config::{self, Config, RUN_ID_KEY};
use crate::definition::Definition;
use crate::error::Error;
use crate::model::{
    Analysis, AnalysisRun, ConfigOwner, Id, NewAnalysis, NewRun, NewRuns, NewWorkflow, RunFilter,
    RunStatus, Workflow,
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
    create_runs_stores_effective_configs(store).await;
    create_runs_of_an_empty_launch_creates_nothing(store).await;
    create_runs_is_all_or_nothing(store).await;
    duplicate_runs_are_refused(store).await;
    duplicate_runs_within_a_launch_are_refused(store).await;
    duplicate_runs_are_allowed_when_asked(store).await;
    list_runs_filters_and_orders(store).await;
    list_runs_pages_by_id(store).await;
    count_runs_counts_per_status(store).await;
    missing_ids_are_not_found(store).await;
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

    let other = store
        .create_analysis(new_analysis(
            &unique("duplicates-other"),
            Config::new(json!({})),
        ))
        .await
        .expect("another analysis");
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
    let a2 = store
        .create_analysis(new_analysis(&unique("filters-a2"), Config::new(json!({}))))
        .await
        .expect("second analysis");

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

/// `count_runs` counts an analysis's runs per state and leaves out states with no run.
pub async fn count_runs_counts_per_status(store: &dyn RunStore) {
    let (workflow, analysis) = setup(store, "count").await;
    assert!(
        store
            .count_runs(analysis.id)
            .await
            .expect("count")
            .is_empty(),
        "an analysis without runs has no counts"
    );
    launch(store, &workflow, &analysis, &samples("count", 5))
        .await
        .expect("launch");
    let other = store
        .create_analysis(new_analysis(&unique("count-other"), Config::new(json!({}))))
        .await
        .expect("other analysis");
    launch(store, &workflow, &other, &samples("other", 2))
        .await
        .expect("launch");

    let counts = store.count_runs(analysis.id).await.expect("count");
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        vec![(RunStatus::Ready, 5)],
        "five ready runs, other states absent, other analyses not counted"
    );
    assert_not_found(store.count_runs(MISSING_ID).await, "analysis", MISSING_ID);
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
