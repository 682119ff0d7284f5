//! `list-runs` and `get-run-count`.

use serde_json::json;

use crate::util::{Sandbox, example, path_str};

/// Two analyses of the hello workflow: analysis 1 with runs 1 and 2, analysis 2 with run 3.
fn two_analyses(sandbox: &Sandbox) {
    sandbox.hello_workflow();
    sandbox.hello_analysis();
    sandbox.hello_analysis();
    let runs = example("hello").join("runs");
    sandbox.launch(1, 1, path_str(&runs));
    sandbox.launch(1, 2, path_str(&runs.join("run-1.json")));
}

fn ids(outcome: &crate::util::Outcome) -> Vec<i64> {
    outcome
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["id"].as_i64().unwrap())
        .collect()
}

#[test]
fn list_runs_prints_a_table_with_empty_cells_for_unset_times() {
    let sandbox = Sandbox::new();
    two_analyses(&sandbox);
    let table = sandbox.ok(&["list-runs"]);
    let mut lines = table.stdout.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID", "WORKFLOW", "ANALYSIS", "STATUS", "SOURCE", "CREATED", "STARTED", "ENDED"
        ]
    );
    let rows = table.rows();
    assert_eq!(rows.len(), 3);
    // ID, WORKFLOW, ANALYSIS, STATUS, SOURCE, CREATED (date, time); STARTED and ENDED empty.
    assert_eq!(rows[2].len(), 7, "{:?}", rows[2]);
    assert_eq!(rows[2][..4], ["3", "1", "2", "ready"]);
    assert!(rows[2][4].ends_with("run-1.json"));
}

#[test]
fn list_runs_json_has_the_table_fields() {
    let sandbox = Sandbox::new();
    two_analyses(&sandbox);
    let runs = sandbox.runs();
    let keys: Vec<&str> = runs[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "id", "workflow", "analysis", "status", "source", "created", "started", "ended"
        ]
    );
    assert_eq!(runs[0]["started"], serde_json::Value::Null);
    let created = runs[0]["created"].as_str().unwrap();
    assert_eq!(created.len(), "2024-03-31 12:00:00".len(), "{created}");
}

#[test]
fn list_runs_filters_by_workflow_analysis_status_and_limit() {
    let sandbox = Sandbox::new();
    two_analyses(&sandbox);
    assert_eq!(
        ids(&sandbox.ok(&["list-runs", "-a", "1", "--json"])),
        [1, 2]
    );
    assert_eq!(ids(&sandbox.ok(&["list-runs", "-a", "2", "--json"])), [3]);
    assert_eq!(
        ids(&sandbox.ok(&["list-runs", "-w", "1", "--json"])),
        [1, 2, 3]
    );
    assert_eq!(
        ids(&sandbox.ok(&["list-runs", "-w", "2", "--json"])),
        Vec::<i64>::new()
    );
    assert_eq!(
        ids(&sandbox.ok(&["list-runs", "-s", "ready", "--json"])),
        [1, 2, 3]
    );
    assert_eq!(
        ids(&sandbox.ok(&["list-runs", "-s", "in-progress", "--json"])),
        Vec::<i64>::new()
    );
    assert_eq!(
        ids(&sandbox.ok(&["list-runs", "--limit", "2", "--json"])),
        [1, 2]
    );
}

#[test]
fn an_unknown_status_is_a_usage_error_listing_the_valid_ones() {
    let sandbox = Sandbox::new();
    for args in [
        &["list-runs", "-s", "running"][..],
        &["get-run-count", "-a", "1", "-s", "running"],
    ] {
        let stderr = sandbox.usage_error(args);
        assert!(stderr.contains("\"running\""), "{stderr}");
        for status in [
            "ready",
            "scheduled",
            "in-progress",
            "completed",
            "error",
            "cancelled",
        ] {
            assert!(stderr.contains(status), "{status} missing: {stderr}");
        }
    }
}

#[test]
fn get_run_count_with_a_status_prints_just_the_number() {
    let sandbox = Sandbox::new();
    two_analyses(&sandbox);
    assert_eq!(
        sandbox
            .ok(&["get-run-count", "-a", "1", "-s", "ready"])
            .stdout,
        "2\n"
    );
    assert_eq!(
        sandbox
            .ok(&["get-run-count", "-a", "2", "-s", "ready"])
            .stdout,
        "1\n"
    );
    assert_eq!(
        sandbox
            .ok(&["get-run-count", "-a", "1", "-s", "completed"])
            .stdout,
        "0\n"
    );
    assert_eq!(
        sandbox
            .ok(&["get-run-count", "-a", "1", "-s", "ready", "--json"])
            .json(),
        json!({"ready": 2})
    );
}

#[test]
fn get_run_count_without_a_status_counts_every_status() {
    let sandbox = Sandbox::new();
    two_analyses(&sandbox);
    let table = sandbox.ok(&["get-run-count", "-a", "1"]);
    let lines: Vec<Vec<&str>> = table
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec!["STATUS", "COUNT"],
            vec!["ready", "2"],
            vec!["scheduled", "0"],
            vec!["in-progress", "0"],
            vec!["completed", "0"],
            vec!["error", "0"],
            vec!["cancelled", "0"],
        ]
    );
    let counts = sandbox.ok(&["get-run-count", "-a", "1", "--json"]).json();
    assert_eq!(
        counts,
        json!({"ready": 2, "scheduled": 0, "in-progress": 0, "completed": 0, "error": 0, "cancelled": 0})
    );
}

#[test]
fn get_run_count_of_an_unknown_analysis_fails() {
    let sandbox = Sandbox::new();
    let stderr = sandbox.fail(&["get-run-count", "-a", "42"]);
    assert!(stderr.contains("analysis 42 not found"), "{stderr}");
    assert!(stderr.contains("list-analyses"), "{stderr}");
}
