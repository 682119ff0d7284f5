//! `create-workflow` and `list-workflows`.

use std::fs;

use serde_json::Value;

use crate::util::{Sandbox, example, path_str};

const CONFIG: &str = r#"{"test_message": "hi"}"#;
const DEFINITION: &str = "[[tasks]]\nid = \"say\"\nrun = \"echo '{{ config.test_message }}'\"\n";

fn workflow_count(sandbox: &Sandbox) -> usize {
    sandbox
        .ok(&["list-workflows", "--json"])
        .json()
        .as_array()
        .expect("an array")
        .len()
}

#[test]
fn create_workflow_prints_its_id_and_list_shows_it() {
    let sandbox = Sandbox::new();
    let first = sandbox.hello_workflow();
    assert_eq!(first, 1);
    let config = sandbox.write("wf.json", CONFIG);
    let definition = sandbox.write(
        "two.toml",
        &format!("{DEFINITION}[[tasks]]\nid = \"after\"\nneeds = [\"say\"]\nrun = \"true\"\n"),
    );
    let created = sandbox.ok(&[
        "create-workflow",
        "-n",
        "other",
        "-v",
        "2",
        "-c",
        &config,
        "--definition",
        &definition,
    ]);
    assert_eq!(created.stdout, "Created workflow with ID: 2\n");

    let table = sandbox.ok(&["list-workflows"]);
    let header: Vec<&str> = table
        .stdout
        .lines()
        .next()
        .unwrap()
        .split("  ")
        .filter(|s| !s.is_empty())
        .map(str::trim)
        .collect();
    assert_eq!(
        header,
        ["ID", "NAME", "VERSION", "TASKS", "CONFIG ID", "CREATED"]
    );
    let rows = table.rows();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0][..4], ["1", "test", "1.0", "1"]);
    assert_eq!(rows[1][..4], ["2", "other", "2", "2"]);
    // CONFIG ID is a UUID; CREATED is `YYYY-MM-DD HH:MM:SS`.
    assert_eq!(rows[1][4].len(), 36);
    assert_eq!(rows[1][5].len(), 10);
    assert_eq!(rows[1][6].len(), 8);
}

#[test]
fn list_workflows_json_has_the_table_fields() {
    let sandbox = Sandbox::new();
    sandbox.hello_workflow();
    let list = sandbox.ok(&["list-workflows", "--json"]).json();
    let workflows = list.as_array().expect("a JSON array");
    assert_eq!(workflows.len(), 1);
    let workflow = workflows[0].as_object().expect("an object");
    let keys: Vec<&str> = workflow.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["id", "name", "version", "tasks", "config_id", "created"]
    );
    assert_eq!(workflow["id"], 1);
    assert_eq!(workflow["name"], "test");
    assert_eq!(workflow["version"], "1.0");
    assert_eq!(workflow["tasks"], 1);
    let config_id = workflow["config_id"].as_str().expect("a string");
    let config = sandbox.ok(&["print-config", "-c", config_id]).json();
    assert_eq!(config, serde_json::json!({"test_message": "Hello, world!"}));
}

#[test]
fn list_workflows_on_a_new_home_prints_only_the_header() {
    let sandbox = Sandbox::new();
    let table = sandbox.ok(&["list-workflows"]);
    assert_eq!(table.stdout.lines().count(), 1);
    assert!(table.stdout.starts_with("ID"));
    assert_eq!(
        sandbox.ok(&["list-workflows", "--json"]).json(),
        Value::Array(vec![])
    );
}

#[test]
fn default_definition_comes_from_butler_home_workflows() {
    let sandbox = Sandbox::new();
    let workflows = sandbox.home().join("workflows");
    fs::create_dir_all(&workflows).unwrap();
    fs::copy(
        example("hello").join("workflows/test.toml"),
        workflows.join("test.toml"),
    )
    .unwrap();
    let config = example("hello").join("workflow-config.json");
    let created = sandbox.ok(&[
        "create-workflow",
        "-n",
        "test",
        "-v",
        "1",
        "-c",
        path_str(&config),
    ]);
    assert_eq!(created.stdout, "Created workflow with ID: 1\n");
    assert_eq!(
        sandbox.ok(&["list-workflows", "--json"]).json()[0]["tasks"],
        1
    );
}

#[test]
fn default_definition_may_be_json() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "home/workflows/jsonflow.json",
        r#"{"tasks": [{"id": "a", "run": "true"}, {"id": "b", "run": "true", "needs": ["a"]}]}"#,
    );
    let config = sandbox.write("wf.json", "{}");
    sandbox.ok(&[
        "create-workflow",
        "-n",
        "jsonflow",
        "-v",
        "1",
        "-c",
        &config,
    ]);
    assert_eq!(
        sandbox.ok(&["list-workflows", "--json"]).json()[0]["tasks"],
        2
    );
}

#[test]
fn missing_default_definition_names_both_paths_and_the_fix() {
    let sandbox = Sandbox::new();
    let config = sandbox.write("wf.json", CONFIG);
    let stderr = sandbox.fail(&["create-workflow", "-n", "nodef", "-v", "1", "-c", &config]);
    let workflows = sandbox.home().join("workflows");
    assert!(
        stderr.contains(path_str(&workflows.join("nodef.toml"))),
        "{stderr}"
    );
    assert!(
        stderr.contains(path_str(&workflows.join("nodef.json"))),
        "{stderr}"
    );
    assert!(stderr.contains("--definition"), "{stderr}");
    assert_eq!(workflow_count(&sandbox), 0);
}

#[test]
fn a_name_with_a_path_separator_needs_an_explicit_definition() {
    let sandbox = Sandbox::new();
    let config = sandbox.write("wf.json", CONFIG);
    sandbox.write("escape.toml", DEFINITION);
    let stderr = sandbox.fail(&[
        "create-workflow",
        "-n",
        "../escape",
        "-v",
        "1",
        "-c",
        &config,
    ]);
    assert!(stderr.contains("--definition"), "{stderr}");
    assert_eq!(workflow_count(&sandbox), 0);
}

#[test]
fn invalid_json_config_is_rejected_with_line_and_column() {
    let sandbox = Sandbox::new();
    let config = sandbox.write(
        "bad.json",
        "{\n  \"test_message\": \"hi\",\n  \"depth\": 30x\n}\n",
    );
    let definition = sandbox.write("def.toml", DEFINITION);
    let stderr = create_fails(&sandbox, &config, &definition);
    assert!(
        stderr.contains("bad.json:3:"),
        "file and line missing: {stderr}"
    );
    assert!(stderr.contains("invalid JSON"), "{stderr}");
    assert_eq!(workflow_count(&sandbox), 0);
}

#[test]
fn missing_config_file_is_named() {
    let sandbox = Sandbox::new();
    let definition = sandbox.write("def.toml", DEFINITION);
    let stderr = create_fails(&sandbox, "absent.json", &definition);
    assert!(stderr.contains("absent.json"), "{stderr}");
    assert_eq!(workflow_count(&sandbox), 0);
}

#[test]
fn non_object_config_is_rejected() {
    let sandbox = Sandbox::new();
    let config = sandbox.write("list.json", "[1, 2, 3]");
    let definition = sandbox.write("def.toml", DEFINITION);
    let stderr = create_fails(&sandbox, &config, &definition);
    assert!(stderr.contains("JSON object"), "{stderr}");
    assert!(stderr.contains("an array"), "{stderr}");
    assert_eq!(workflow_count(&sandbox), 0);
}

#[test]
fn a_cycle_in_the_definition_is_shown_and_nothing_stored() {
    let sandbox = Sandbox::new();
    let config = sandbox.write("wf.json", CONFIG);
    let definition = sandbox.write(
        "cycle.toml",
        "[[tasks]]\nid = \"a\"\nrun = \"true\"\nneeds = [\"b\"]\n\n\
         [[tasks]]\nid = \"b\"\nrun = \"true\"\nneeds = [\"a\"]\n",
    );
    let stderr = create_fails(&sandbox, &config, &definition);
    assert!(stderr.contains("cycle.toml"), "{stderr}");
    assert!(stderr.contains("cycle"), "{stderr}");
    assert!(stderr.contains('a') && stderr.contains('b'), "{stderr}");
    assert_eq!(workflow_count(&sandbox), 0);
}

#[test]
fn an_unknown_need_is_named_and_nothing_stored() {
    let sandbox = Sandbox::new();
    let config = sandbox.write("wf.json", CONFIG);
    let definition = sandbox.write(
        "unknown.toml",
        "[[tasks]]\nid = \"align\"\nrun = \"true\"\nneeds = [\"fetch_reads\"]\n",
    );
    let stderr = create_fails(&sandbox, &config, &definition);
    assert!(stderr.contains("fetch_reads"), "{stderr}");
    assert!(stderr.contains("align"), "{stderr}");
    assert_eq!(workflow_count(&sandbox), 0);
}

#[test]
fn a_template_syntax_error_is_rejected() {
    let sandbox = Sandbox::new();
    let config = sandbox.write("wf.json", CONFIG);
    let definition = sandbox.write(
        "broken.toml",
        "[[tasks]]\nid = \"say\"\nrun = \"echo {{ config.x \"\n",
    );
    let stderr = create_fails(&sandbox, &config, &definition);
    assert!(stderr.contains("say"), "{stderr}");
    assert_eq!(workflow_count(&sandbox), 0);
}

#[test]
fn a_duplicate_name_and_version_is_refused_and_the_first_kept() {
    let sandbox = Sandbox::new();
    sandbox.hello_workflow();
    let dir = example("hello");
    let stderr = sandbox.fail(&[
        "create-workflow",
        "-n",
        "test",
        "-v",
        "1.0",
        "-c",
        path_str(&dir.join("analysis-config.json")),
        "--definition",
        path_str(&dir.join("workflows/test.toml")),
    ]);
    assert!(
        stderr.contains("test") && stderr.contains("1.0"),
        "{stderr}"
    );
    let list = sandbox.ok(&["list-workflows", "--json"]).json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let config_id = list[0]["config_id"].as_str().unwrap();
    let config = sandbox.ok(&["print-config", "-c", config_id]).json();
    assert_eq!(config["test_message"], "Hello, world!");
    // Another version of the same workflow is a new workflow.
    sandbox.ok(&[
        "create-workflow",
        "-n",
        "test",
        "-v",
        "1.1",
        "-c",
        path_str(&dir.join("workflow-config.json")),
        "--definition",
        path_str(&dir.join("workflows/test.toml")),
    ]);
    assert_eq!(workflow_count(&sandbox), 2);
}

#[test]
fn an_empty_name_is_refused() {
    let sandbox = Sandbox::new();
    let config = sandbox.write("wf.json", CONFIG);
    let definition = sandbox.write("def.toml", DEFINITION);
    let stderr = sandbox.fail(&[
        "create-workflow",
        "-n",
        " ",
        "-v",
        "1",
        "-c",
        &config,
        "--definition",
        &definition,
    ]);
    assert!(stderr.contains("-n NAME"), "{stderr}");
    assert_eq!(workflow_count(&sandbox), 0);
}

#[test]
fn a_missing_definition_file_is_named() {
    let sandbox = Sandbox::new();
    let config = sandbox.write("wf.json", CONFIG);
    let stderr = create_fails(&sandbox, &config, "nowhere.toml");
    assert!(stderr.contains("nowhere.toml"), "{stderr}");
    assert_eq!(workflow_count(&sandbox), 0);
}

/// Runs `create-workflow -n t -v 1` with `config` and `definition`, which must fail; its stderr.
fn create_fails(sandbox: &Sandbox, config: &str, definition: &str) -> String {
    sandbox.fail(&[
        "create-workflow",
        "-n",
        "t",
        "-v",
        "1",
        "-c",
        config,
        "--definition",
        definition,
    ])
}
