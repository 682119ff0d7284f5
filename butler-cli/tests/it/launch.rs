//! `launch-workflow`.

use crate::util::{Sandbox, example, path_str, run_ids};

/// A workflow whose task needs `sample_id`, which only run configs provide.
fn sample_workflow(sandbox: &Sandbox) -> i64 {
    let config = sandbox.write("sample-wf.json", r#"{"greeting": "hi"}"#);
    let definition = sandbox.write(
        "sample.toml",
        "[[tasks]]\nid = \"greet\"\nrun = \"echo '{{ config.greeting }} {{ config.sample_id }}'\"\n",
    );
    sandbox
        .ok(&[
            "create-workflow",
            "-n",
            "sample",
            "-v",
            "1",
            "-c",
            &config,
            "--definition",
            &definition,
        ])
        .created_id()
}

#[test]
fn launch_creates_one_ready_run_per_file_and_prints_the_ids() {
    let sandbox = Sandbox::new();
    let (workflow, analysis) = (sandbox.hello_workflow(), sandbox.hello_analysis());
    let runs_dir = example("hello").join("runs");
    let outcome = sandbox.ok(&[
        "launch-workflow",
        "-w",
        "1",
        "-a",
        "1",
        "-c",
        path_str(&runs_dir),
    ]);
    assert_eq!(run_ids(&outcome), [1, 2]);
    assert_eq!(
        outcome.stderr,
        format!("Launched 2 runs of workflow {workflow} for analysis {analysis}\n")
    );

    let runs = sandbox.runs();
    assert_eq!(runs.len(), 2);
    for (run, file) in runs.iter().zip(["run-1.json", "run-2.json"]) {
        assert_eq!(run["status"], "ready");
        assert_eq!(run["workflow"], workflow);
        assert_eq!(run["analysis"], analysis);
        let source = run["source"].as_str().unwrap();
        assert_eq!(source, path_str(&runs_dir.join(file)));
    }
}

#[test]
fn the_source_keeps_the_path_as_typed() {
    let sandbox = Sandbox::new();
    sandbox.hello_workflow();
    sandbox.hello_analysis();
    let dir = sandbox.copy_example("hello");
    sandbox.launch(1, 1, &format!("{dir}/runs"));
    let runs = sandbox.runs();
    assert_eq!(runs[0]["source"], "hello/runs/run-1.json");
    assert_eq!(runs[1]["source"], "hello/runs/run-2.json");
}

#[test]
fn launch_accepts_a_single_file() {
    let sandbox = Sandbox::new();
    sandbox.hello_workflow();
    sandbox.hello_analysis();
    let file = example("hello").join("runs/run-2.json");
    let outcome = sandbox.ok(&[
        "launch-workflow",
        "-w",
        "1",
        "-a",
        "1",
        "-c",
        path_str(&file),
    ]);
    assert_eq!(run_ids(&outcome), [1]);
    assert_eq!(
        outcome.stderr,
        "Launched 1 run of workflow 1 for analysis 1\n"
    );
}

#[test]
fn one_invalid_file_among_good_ones_creates_no_run() {
    let sandbox = Sandbox::new();
    sandbox.hello_workflow();
    sandbox.hello_analysis();
    sandbox.write("runs/a.json", r#"{"sample_id": "a"}"#);
    sandbox.write(
        "runs/b.json",
        "{\n  \"sample_id\": \"b\",\n  \"depth\": 30x\n}\n",
    );
    sandbox.write("runs/c.json", r#"{"sample_id": "c"}"#);
    let stderr = sandbox.fail(&["launch-workflow", "-w", "1", "-a", "1", "-c", "runs"]);
    assert!(
        stderr.contains("runs/b.json:3:"),
        "file and line missing: {stderr}"
    );
    let column = stderr
        .split("runs/b.json:3:")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|column| column.parse::<u32>().ok());
    assert!(column.is_some(), "no column: {stderr}");
    assert!(sandbox.runs().is_empty());
}

#[test]
fn one_non_object_file_among_good_ones_creates_no_run() {
    let sandbox = Sandbox::new();
    sandbox.hello_workflow();
    sandbox.hello_analysis();
    sandbox.write("runs/a.json", r#"{"sample_id": "a"}"#);
    sandbox.write("runs/b.json", r#"["sample_id", "b"]"#);
    let stderr = sandbox.fail(&["launch-workflow", "-w", "1", "-a", "1", "-c", "runs"]);
    assert!(
        stderr.contains("runs/b.json") && stderr.contains("JSON object"),
        "{stderr}"
    );
    assert!(sandbox.runs().is_empty());
}

#[test]
fn a_template_key_missing_from_the_effective_config_fails_the_launch() {
    let sandbox = Sandbox::new();
    let workflow = sample_workflow(&sandbox);
    let analysis = sandbox.hello_analysis();
    sandbox.write("runs/s1.json", r#"{"sample_id": "S1"}"#);
    sandbox.write("runs/s2.json", r#"{"sample": "S2"}"#);
    let stderr = sandbox.fail(&[
        "launch-workflow",
        "-w",
        &workflow.to_string(),
        "-a",
        &analysis.to_string(),
        "-c",
        "runs",
    ]);
    assert!(stderr.contains("runs/s2.json"), "file missing: {stderr}");
    assert!(stderr.contains("sample_id"), "key missing: {stderr}");
    assert!(stderr.contains("greet"), "task missing: {stderr}");
    assert!(sandbox.runs().is_empty());
}

#[test]
fn relaunching_the_same_configs_is_refused_naming_the_runs() {
    let sandbox = Sandbox::new();
    sandbox.hello_workflow();
    sandbox.hello_analysis();
    let dir = sandbox.copy_example("hello");
    let runs = format!("{dir}/runs");
    assert_eq!(sandbox.launch(1, 1, &runs), [1, 2]);
    let stderr = sandbox.fail(&["launch-workflow", "-w", "1", "-a", "1", "-c", &runs]);
    assert!(
        stderr.contains("hello/runs/run-1.json duplicates run 1"),
        "{stderr}"
    );
    assert!(
        stderr.contains("hello/runs/run-2.json duplicates run 2"),
        "{stderr}"
    );
    assert!(stderr.contains("--allow-duplicates"), "{stderr}");
    assert_eq!(sandbox.runs().len(), 2);

    let again = sandbox.ok(&[
        "launch-workflow",
        "-w",
        "1",
        "-a",
        "1",
        "-c",
        &runs,
        "--allow-duplicates",
    ]);
    assert_eq!(run_ids(&again), [3, 4]);
    assert_eq!(sandbox.runs().len(), 4);
}

#[test]
fn the_same_configs_may_be_launched_for_another_analysis() {
    let sandbox = Sandbox::new();
    sandbox.hello_workflow();
    sandbox.hello_analysis();
    sandbox.hello_analysis();
    let runs = example("hello").join("runs");
    sandbox.launch(1, 1, path_str(&runs));
    assert_eq!(sandbox.launch(1, 2, path_str(&runs)), [3, 4]);
}

#[test]
fn unknown_workflow_or_analysis_is_named() {
    let sandbox = Sandbox::new();
    sandbox.hello_workflow();
    sandbox.hello_analysis();
    let runs = example("hello").join("runs");
    let stderr = sandbox.fail(&[
        "launch-workflow",
        "-w",
        "9",
        "-a",
        "1",
        "-c",
        path_str(&runs),
    ]);
    assert!(stderr.contains("workflow 9 not found"), "{stderr}");
    assert!(stderr.contains("list-workflows"), "{stderr}");
    let stderr = sandbox.fail(&[
        "launch-workflow",
        "-w",
        "1",
        "-a",
        "7",
        "-c",
        path_str(&runs),
    ]);
    assert!(stderr.contains("analysis 7 not found"), "{stderr}");
    assert!(sandbox.runs().is_empty());
}

#[test]
fn a_missing_path_or_an_empty_directory_is_named() {
    let sandbox = Sandbox::new();
    sandbox.hello_workflow();
    sandbox.hello_analysis();
    let stderr = sandbox.fail(&["launch-workflow", "-w", "1", "-a", "1", "-c", "no-such-dir"]);
    assert!(stderr.contains("no-such-dir"), "{stderr}");
    sandbox.write("empty/notes.txt", "not a run config");
    let stderr = sandbox.fail(&["launch-workflow", "-w", "1", "-a", "1", "-c", "empty"]);
    assert!(
        stderr.contains("empty") && stderr.contains("*.json"),
        "{stderr}"
    );
    assert!(sandbox.runs().is_empty());
}

#[test]
fn a_large_launch_off_a_terminal_prints_no_progress() {
    let sandbox = Sandbox::new();
    let workflow = sample_workflow(&sandbox);
    let analysis = sandbox.hello_analysis();
    for i in 0..250 {
        sandbox.write(
            &format!("many/s{i:03}.json"),
            &format!(r#"{{"sample_id": "S{i}"}}"#),
        );
    }
    let outcome = sandbox.ok(&[
        "launch-workflow",
        "-w",
        &workflow.to_string(),
        "-a",
        &analysis.to_string(),
        "-c",
        "many",
    ]);
    assert_eq!(
        outcome.stderr,
        format!("Launched 250 runs of workflow {workflow} for analysis {analysis}\n")
    );
    let ids = run_ids(&outcome);
    assert_eq!(ids, (1..=250).collect::<Vec<i64>>());
    let runs = sandbox.runs();
    assert_eq!(runs[0]["source"], "many/s000.json");
    assert_eq!(runs[249]["source"], "many/s249.json");
}
