//! `update-config`, `print-effective-config`, `print-config` and `print-commands`.

use serde_json::json;

use crate::util::{Sandbox, example, path_str};

fn hello_runs(sandbox: &Sandbox) -> Vec<i64> {
    sandbox.hello_workflow();
    sandbox.hello_analysis();
    sandbox.launch(1, 1, path_str(&example("hello").join("runs")))
}

#[test]
fn print_effective_config_prints_the_merged_layers_as_pretty_json() {
    let sandbox = Sandbox::new();
    hello_runs(&sandbox);
    let outcome = sandbox.ok(&["print-effective-config", "-r", "2"]);
    assert!(
        outcome.stdout.contains("\n  \""),
        "not pretty: {}",
        outcome.stdout
    );
    assert_eq!(
        outcome.json(),
        json!({
            "test_message": "Hello, world! - set by Analysis Run.",
            "sample_id": "sample-2",
            "analysis_run_id": 2
        })
    );
}

#[test]
fn explain_shows_the_layer_of_every_key() {
    let sandbox = Sandbox::new();
    sandbox.hello_workflow();
    sandbox.hello_analysis();
    let run = sandbox.write(
        "run.json",
        r#"{"test_message": "Hello, world! - set by Analysis Run.", "sample_id": "s1"}"#,
    );
    // An extra key in each lower layer, so every layer shows up.
    let wf = sandbox.write("wf.json", r#"{"test_message": "w", "threads": 4}"#);
    let an = sandbox.write("an.json", r#"{"test_message": "a", "cohort": "pilot"}"#);
    sandbox.ok(&["update-config", "-w", "1", "-c", &wf]);
    sandbox.ok(&["update-config", "-a", "1", "-c", &an]);
    sandbox.launch(1, 1, &run);

    let table = sandbox.ok(&["print-effective-config", "-r", "1", "--explain"]);
    let lines: Vec<&str> = table.stdout.lines().collect();
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["KEY", "LAYER", "VALUE"]);
    let layer_of = |key: &str| -> (String, String) {
        let line = lines[1..]
            .iter()
            .find(|line| line.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("{key} missing:\n{}", table.stdout));
        let mut cells = line.split_whitespace();
        cells.next();
        let layer = cells.next().unwrap().to_owned();
        (layer, cells.collect::<Vec<_>>().join(" "))
    };
    assert_eq!(
        layer_of("test_message"),
        (
            "run".into(),
            "\"Hello, world! - set by Analysis Run.\"".into()
        )
    );
    assert_eq!(layer_of("threads"), ("workflow".into(), "4".into()));
    assert_eq!(layer_of("cohort"), ("analysis".into(), "\"pilot\"".into()));
    assert_eq!(layer_of("sample_id"), ("run".into(), "\"s1\"".into()));
    assert_eq!(layer_of("analysis_run_id"), ("butler".into(), "1".into()));
}

#[test]
fn explain_json_is_an_array_of_path_layer_value() {
    let sandbox = Sandbox::new();
    hello_runs(&sandbox);
    let explained = sandbox
        .ok(&["print-effective-config", "-r", "1", "--explain", "--json"])
        .json();
    let entries = explained.as_array().expect("an array");
    for entry in entries {
        let keys: Vec<&str> = entry
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["path", "layer", "value"]);
    }
    let find = |path: &str| {
        entries
            .iter()
            .find(|e| e["path"] == path)
            .unwrap_or_else(|| panic!("{path} missing"))
    };
    assert_eq!(find("test_message")["layer"], "run");
    assert_eq!(
        find("test_message")["value"],
        "Hello, world! - set by Analysis Run."
    );
    assert_eq!(find("analysis_run_id")["layer"], "butler");
    assert_eq!(find("analysis_run_id")["value"], 1);
}

#[test]
fn an_unknown_run_is_named() {
    let sandbox = Sandbox::new();
    hello_runs(&sandbox);
    for args in [
        &["print-effective-config", "-r", "99"][..],
        &["print-effective-config", "-r", "99", "--explain"],
    ] {
        let stderr = sandbox.fail(args);
        assert!(stderr.contains("run 99 not found"), "{stderr}");
        assert!(stderr.contains("list-runs"), "{stderr}");
    }
}

#[test]
fn update_config_changes_new_launches_but_not_existing_runs() {
    let sandbox = Sandbox::new();
    hello_runs(&sandbox);
    let before = sandbox.effective_config(1);

    let wf = sandbox.write(
        "wf2.json",
        r#"{"test_message": "new workflow message", "threads": 8}"#,
    );
    let outcome = sandbox.ok(&["update-config", "-w", "1", "-c", &wf]);
    let new_id = outcome
        .stdout
        .trim()
        .strip_prefix("Updated config of workflow 1: config ID ")
        .unwrap_or_else(|| panic!("{}", outcome.stdout));
    assert_eq!(new_id.len(), 36, "{new_id}");
    assert_eq!(
        sandbox.ok(&["print-config", "-c", new_id]).json()["threads"],
        8
    );
    let listed = sandbox.ok(&["list-workflows", "--json"]).json();
    assert_eq!(listed[0]["config_id"], new_id);

    let an = sandbox.write("an2.json", r#"{"cohort": "second"}"#);
    let outcome = sandbox.ok(&["update-config", "-a", "1", "-c", &an]);
    assert!(
        outcome
            .stdout
            .starts_with("Updated config of analysis 1: config ID "),
        "{}",
        outcome.stdout
    );

    assert_eq!(sandbox.effective_config(1), before);
    let run = sandbox.write("new-run.json", r#"{"sample_id": "late"}"#);
    let [id] = sandbox.launch(1, 1, &run)[..] else {
        panic!("one run expected")
    };
    assert_eq!(
        sandbox.effective_config(id),
        json!({"test_message": "new workflow message", "threads": 8, "cohort": "second", "sample_id": "late", "analysis_run_id": id})
    );
}

#[test]
fn update_config_rejects_bad_files_and_unknown_owners() {
    let sandbox = Sandbox::new();
    hello_runs(&sandbox);
    let bad = sandbox.write("bad.json", "{\"x\": }");
    let stderr = sandbox.fail(&["update-config", "-w", "1", "-c", &bad]);
    assert!(stderr.contains("bad.json:1:"), "{stderr}");
    let array = sandbox.write("array.json", "[]");
    let stderr = sandbox.fail(&["update-config", "-a", "1", "-c", &array]);
    assert!(stderr.contains("JSON object"), "{stderr}");
    let good = sandbox.write("good.json", "{}");
    let stderr = sandbox.fail(&["update-config", "-w", "5", "-c", &good]);
    assert!(stderr.contains("workflow 5 not found"), "{stderr}");
    let stderr = sandbox.fail(&["update-config", "-a", "6", "-c", &good]);
    assert!(stderr.contains("analysis 6 not found"), "{stderr}");
    // Nothing changed.
    let listed = sandbox.ok(&["list-workflows", "--json"]).json();
    let config_id = listed[0]["config_id"].as_str().unwrap();
    assert_eq!(
        sandbox.ok(&["print-config", "-c", config_id]).json()["test_message"],
        "Hello, world!"
    );
}

#[test]
fn update_config_needs_exactly_one_owner() {
    let sandbox = Sandbox::new();
    let good = sandbox.write("good.json", "{}");
    for args in [
        &["update-config", "-c", &good][..],
        &["update-config", "-w", "1", "-a", "1", "-c", &good],
    ] {
        let outcome = sandbox.run(args);
        assert_eq!(outcome.code, 2, "{outcome:?}");
        assert!(
            outcome.stderr.contains("--workflow") || outcome.stderr.contains("-w"),
            "{}",
            outcome.stderr
        );
    }
}

#[test]
fn print_config_rejects_malformed_and_unknown_ids() {
    let sandbox = Sandbox::new();
    let stderr = sandbox.usage_error(&["print-config", "-c", "not-a-uuid"]);
    assert!(
        stderr.contains("\"not-a-uuid\"") && stderr.contains("UUID"),
        "{stderr}"
    );
    let stderr = sandbox.fail(&["print-config", "-c", "67e55044-10b1-426f-9247-bb680e5fe0c8"]);
    assert!(
        stderr.contains("config 67e55044-10b1-426f-9247-bb680e5fe0c8 not found"),
        "{stderr}"
    );
}

/// A workflow whose two tasks template their commands and environment from every layer.
const ALIGN_AND_CALL: &str = r#"
[[tasks]]
id = "align"
run = "bwa mem -t {{ config.threads }} {{ config.reference }} {{ config.sample }}.fq"
env = { SAMPLE = "{{ config.sample }}" }
[[tasks]]
id = "call"
needs = ["align"]
run = """
for chr in {% for c in config.chromosomes %}{{ c }} {% endfor %}; do
  call --chr $chr {{ config.sample }}.bam
done
"""
"#;

#[test]
fn print_commands_renders_each_task_with_the_runs_effective_config() {
    let sandbox = Sandbox::new();
    let workflow = sandbox.workflow(
        "calls",
        ALIGN_AND_CALL,
        &json!({"threads": 4, "reference": "hg38.fa", "chromosomes": ["chr1", "chr2"]}),
    );
    let analysis = sandbox.analysis(&json!({"threads": 8}));
    let run = sandbox.write("runs/s1.json", r#"{"sample": "S1"}"#);
    let ids = sandbox.launch(workflow, analysis, &run);
    let id = ids[0].to_string();

    let text = sandbox.ok(&["print-commands", "-r", &id]).stdout;
    assert_eq!(
        text,
        "== align\nenv SAMPLE=S1\nbwa mem -t 8 hg38.fa S1.fq\n\n== call\n\
         for chr in chr1 chr2 ; do\n  call --chr $chr S1.bam\ndone\n"
    );

    let one = sandbox.ok(&["print-commands", "-r", &id, "-t", "align", "--json"]);
    assert_eq!(
        one.json(),
        json!([{"task": "align", "command": "bwa mem -t 8 hg38.fa S1.fq",
                "env": {"SAMPLE": "S1"}}])
    );
}

#[test]
fn print_commands_names_an_unknown_run_or_task() {
    let sandbox = Sandbox::new();
    hello_runs(&sandbox);
    let err = sandbox.fail(&["print-commands", "-r", "1", "-t", "nope"]);
    assert!(err.contains("task nope of run 1 not found"), "{err}");
    assert!(err.contains("butler run-status"), "{err}");
    let err = sandbox.fail(&["print-commands", "-r", "99"]);
    assert!(err.contains("run 99 not found"), "{err}");
}
