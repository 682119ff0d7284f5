//! The examples in `examples/`, run as the README runs them.

use std::fs;

use serde_json::{Value, json};

use crate::util::{Sandbox, path_str};

#[test]
fn hello_example_runs_get_the_message_set_by_the_run() {
    let sandbox = Sandbox::new();
    let dir = sandbox.copy_example("hello");
    // As in the README: the definition lives in $BUTLER_HOME/workflows.
    fs::create_dir_all(sandbox.home().join("workflows")).unwrap();
    fs::copy(
        sandbox.path().join("hello/workflows/test.toml"),
        sandbox.home().join("workflows/test.toml"),
    )
    .unwrap();
    let workflow = sandbox
        .ok(&[
            "create-workflow",
            "-n",
            "test",
            "-v",
            "1.0",
            "-c",
            &format!("{dir}/workflow-config.json"),
        ])
        .created_id();
    let analysis = sandbox
        .ok(&[
            "create-analysis",
            "-n",
            "hello",
            "-d",
            "03-31-2024",
            "-c",
            &format!("{dir}/analysis-config.json"),
        ])
        .created_id();
    let ids = sandbox.launch(workflow, analysis, &format!("{dir}/runs"));
    assert_eq!(ids.len(), 2);
    for id in ids {
        let effective = sandbox.effective_config(id);
        assert_eq!(
            effective["test_message"],
            "Hello, world! - set by Analysis Run."
        );
        assert_eq!(effective["analysis_run_id"], id);
        let shown = sandbox
            .ok(&["print-effective-config", "-r", &id.to_string()])
            .stdout;
        assert!(
            shown.contains("Hello, world! - set by Analysis Run."),
            "{shown}"
        );
    }
    assert_eq!(
        sandbox
            .ok(&["get-run-count", "-a", &analysis.to_string(), "-s", "ready"])
            .stdout,
        "2\n"
    );
}

#[test]
fn hello_example_explain_credits_run_and_butler() {
    let sandbox = Sandbox::new();
    sandbox.hello_workflow();
    sandbox.hello_analysis();
    sandbox.launch(1, 1, path_str(&crate::util::example("hello").join("runs")));
    let explained = sandbox
        .ok(&["print-effective-config", "-r", "1", "--explain", "--json"])
        .json();
    let layers: Vec<(&str, &str)> = explained
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["path"].as_str().unwrap(), e["layer"].as_str().unwrap()))
        .collect();
    assert!(layers.contains(&("test_message", "run")), "{layers:?}");
    assert!(layers.contains(&("sample_id", "run")), "{layers:?}");
    assert!(
        layers.contains(&("analysis_run_id", "butler")),
        "{layers:?}"
    );
}

#[test]
fn variant_calling_example_merges_nested_tool_settings_per_sample() {
    let sandbox = Sandbox::new();
    let dir = sandbox.copy_example("variant-calling");
    let workflow = sandbox
        .ok(&[
            "create-workflow",
            "-n",
            "variant-calling",
            "-v",
            "2.1.0",
            "-c",
            &format!("{dir}/workflow-config.json"),
            "--definition",
            &format!("{dir}/workflows/variant-calling.toml"),
        ])
        .created_id();
    let listed = sandbox.ok(&["list-workflows", "--json"]).json();
    assert_eq!(listed[0]["tasks"], 4);
    let analysis = sandbox
        .ok(&[
            "create-analysis",
            "-n",
            "trio-pilot",
            "-d",
            "2024-05-02",
            "-c",
            &format!("{dir}/analysis-config.json"),
        ])
        .created_id();
    let ids = sandbox.launch(workflow, analysis, &format!("{dir}/runs"));
    assert_eq!(ids.len(), 6);

    let runs = sandbox.runs();
    let id_of = |sample: &str| -> i64 {
        let source = format!("{dir}/runs/{sample}.json");
        runs.iter()
            .find(|run| run["source"] == source.as_str())
            .and_then(|run| run["id"].as_i64())
            .unwrap_or_else(|| panic!("no run from {source}"))
    };

    let na12878 = sandbox.effective_config(id_of("NA12878"));
    assert_eq!(na12878["sample_id"], "NA12878");
    assert_eq!(na12878["bwa"], json!({"threads": 8, "min_seed": 19}));
    assert_eq!(na12878["gatk"]["java_opts"], "-Xmx16g -XX:+UseParallelGC");
    assert_eq!(na12878["gatk"]["emit_ref_confidence"], "GVCF");
    assert_eq!(na12878["contigs"], json!(["chr20", "chr21", "chr22"]));
    assert_eq!(na12878["filter"]["min_depth"], 15);
    assert_eq!(na12878["reference"]["build"], "GRCh38");

    assert_eq!(
        sandbox.effective_config(id_of("NA12892"))["bwa"]["threads"],
        16
    );
    assert_eq!(
        sandbox.effective_config(id_of("HG00099"))["filter"]["min_depth"],
        8
    );

    let explained = sandbox
        .ok(&[
            "print-effective-config",
            "-r",
            &id_of("NA12892").to_string(),
            "--explain",
            "--json",
        ])
        .json();
    let layer = |path: &str| -> Value {
        explained
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"] == path)
            .map(|e| e["layer"].clone())
            .unwrap_or_else(|| panic!("{path} not explained"))
    };
    assert_eq!(layer("bwa.threads"), "run");
    assert_eq!(layer("bwa.min_seed"), "workflow");
    assert_eq!(layer("gatk.java_opts"), "analysis");
    assert_eq!(layer("contigs"), "analysis");
    assert_eq!(layer("fastq.r1"), "run");
    assert_eq!(layer("analysis_run_id"), "butler");
}
