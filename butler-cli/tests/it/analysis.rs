//! `create-analysis` and `list-analyses`.

use chrono::Utc;
use serde_json::json;

use crate::util::Sandbox;

fn analysis_count(sandbox: &Sandbox) -> usize {
    sandbox
        .ok(&["list-analyses", "--json"])
        .json()
        .as_array()
        .expect("an array")
        .len()
}

#[test]
fn create_analysis_prints_its_id_and_accepts_both_date_forms() {
    let sandbox = Sandbox::new();
    let config = sandbox.write("an.json", r#"{"cohort": "pilot"}"#);
    let first = sandbox.ok(&[
        "create-analysis",
        "-n",
        "iso",
        "-d",
        "2024-03-31",
        "-c",
        &config,
    ]);
    assert_eq!(first.stdout, "Created analysis with ID: 1\n");
    let second = sandbox.ok(&[
        "create-analysis",
        "-n",
        "us",
        "-d",
        "03-31-2024",
        "-c",
        &config,
    ]);
    assert_eq!(second.stdout, "Created analysis with ID: 2\n");

    let table = sandbox.ok(&["list-analyses"]);
    assert!(
        table.stdout.starts_with("ID  NAME  START DATE  CONFIG ID"),
        "{}",
        table.stdout
    );
    let rows = table.rows();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0][..3], ["1", "iso", "2024-03-31"]);
    assert_eq!(rows[1][..3], ["2", "us", "2024-03-31"]);
}

#[test]
fn the_start_date_defaults_to_today_in_utc() {
    let sandbox = Sandbox::new();
    let config = sandbox.write("an.json", "{}");
    let before = Utc::now().date_naive().to_string();
    sandbox.ok(&["create-analysis", "-n", "today", "-c", &config]);
    let after = Utc::now().date_naive().to_string();
    let list = sandbox.ok(&["list-analyses", "--json"]).json();
    let date = list[0]["start_date"].as_str().unwrap();
    assert!(
        date == before || date == after,
        "{date} is not today ({before})"
    );
}

#[test]
fn list_analyses_json_has_the_table_fields() {
    let sandbox = Sandbox::new();
    sandbox.hello_analysis();
    let list = sandbox.ok(&["list-analyses", "--json"]).json();
    let analysis = list[0].as_object().expect("an array of objects");
    let keys: Vec<&str> = analysis.keys().map(String::as_str).collect();
    assert_eq!(keys, ["id", "name", "start_date", "config_id", "created"]);
    assert_eq!(analysis["id"], 1);
    assert_eq!(analysis["name"], "hello");
    assert_eq!(analysis["start_date"], "2024-03-31");
    let config_id = analysis["config_id"].as_str().unwrap();
    let config = sandbox.ok(&["print-config", "-c", config_id]).json();
    assert_eq!(
        config,
        json!({"test_message": "Hello, world! - set by Analysis"})
    );
}

#[test]
fn bad_dates_are_usage_errors_naming_the_accepted_forms() {
    let sandbox = Sandbox::new();
    let config = sandbox.write("an.json", "{}");
    for date in ["31/03/2024", "2024-02-30", "yesterday", "13-01-2024"] {
        let stderr =
            sandbox.usage_error(&["create-analysis", "-n", "a", "-d", date, "-c", &config]);
        assert!(stderr.contains(date), "{stderr}");
        assert!(
            stderr.contains("YYYY-MM-DD") && stderr.contains("MM-DD-YYYY"),
            "{stderr}"
        );
    }
    assert_eq!(analysis_count(&sandbox), 0);
}

#[test]
fn invalid_json_config_is_rejected_with_line_and_column() {
    let sandbox = Sandbox::new();
    let config = sandbox.write("conf/an.json", "{\"a\": 1,}");
    let stderr = sandbox.fail(&["create-analysis", "-n", "a", "-c", &config]);
    assert!(stderr.contains("conf/an.json:1:"), "{stderr}");
    assert_eq!(analysis_count(&sandbox), 0);
}

#[test]
fn non_object_and_missing_configs_are_rejected() {
    let sandbox = Sandbox::new();
    let config = sandbox.write("str.json", "\"just a string\"");
    let stderr = sandbox.fail(&["create-analysis", "-n", "a", "-c", &config]);
    assert!(
        stderr.contains("JSON object") && stderr.contains("a string"),
        "{stderr}"
    );
    let stderr = sandbox.fail(&["create-analysis", "-n", "a", "-c", "nowhere.json"]);
    assert!(stderr.contains("nowhere.json"), "{stderr}");
    assert_eq!(analysis_count(&sandbox), 0);
}
