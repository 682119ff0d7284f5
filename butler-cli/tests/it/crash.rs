//! Killing Butler with SIGKILL in the middle of runs loses nothing and records nothing twice:
//! a task may run again after the kill (delivery is at least once), but its result is recorded
//! once.

use std::collections::BTreeMap;
use std::fs;

use serde_json::{Value, json};

use crate::util::{KillOnDrop, PATIENCE, Sandbox, marker, path_str, wait_until};

/// Runs launched by each crash test.
const RUNS: usize = 20;

/// A chain `a → b → c` of short tasks; every attempt first appends `TASK TRY` to the run's
/// ledger file, so the test sees every attempt that started.
fn chain(sandbox: &Sandbox, sleep: &str) -> (String, String) {
    let ledger = sandbox.path().join("ledger");
    fs::create_dir_all(&ledger).unwrap();
    let task = |id: &str, needs: Option<&str>| {
        let needs = needs.map_or(String::new(), |n| format!("needs = [\"{n}\"]\n"));
        format!(
            "[[tasks]]\nid = \"{id}\"\n{needs}run = \"echo {id} $BUTLER_TRY >> \
             '{{{{ config.ledger }}}}/{{{{ config.sample_id }}}}'; {sleep}\"\n\n"
        )
    };
    // Few runs at once, so runs complete one after another rather than all at the end.
    let definition = format!(
        "max_active_runs = 6\n\n{}{}{}",
        task("a", None),
        task("b", Some("a")),
        task("c", Some("b"))
    );
    let workflow = sandbox.workflow("chain", &definition, &json!({}));
    let analysis = sandbox.analysis(&json!({"ledger": path_str(&ledger)}));
    for i in 1..=RUNS {
        sandbox.write(
            &format!("runs/s{i:02}.json"),
            &format!(r#"{{"sample_id": "s{i:02}"}}"#),
        );
    }
    (workflow.to_string(), analysis.to_string())
}

/// How many runs are in each status.
fn count(sandbox: &Sandbox) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for status in sandbox.run_statuses() {
        *counts.entry(status).or_default() += 1;
    }
    counts
}

/// Waits until at least three runs have completed, but not all.
fn wait_for_a_few_completed(sandbox: &Sandbox, stderr: impl Fn() -> String) {
    wait_until("a few runs to complete", || {
        let counts = count(sandbox);
        match counts.get("completed").copied().unwrap_or(0) {
            3.. => Ok(()),
            _ => Err(format!("{counts:?}; butler stderr: {}", stderr())),
        }
    });
}

/// Every run completed, no task is left unfinished, and every result was recorded once, by an
/// attempt that really ran.
fn assert_every_result_recorded_once(sandbox: &Sandbox) {
    let runs = sandbox.runs();
    assert_eq!(runs.len(), RUNS);
    let mut extra_attempts = 0;
    for run in &runs {
        let id = run["id"].as_i64().unwrap();
        assert_eq!(run["status"], "completed", "{run}");
        let status = sandbox.run_status(id);
        let events = sandbox.events(id);
        let completed = events
            .iter()
            .filter(|e| e["task"].is_null() && e["to"] == "completed")
            .count();
        assert_eq!(
            completed, 1,
            "run {id} completed {completed} times: {events:#?}"
        );
        let sample = status["source"]
            .as_str()
            .and_then(|s| s.rsplit('/').next())
            .and_then(|s| s.strip_suffix(".json"))
            .expect("the run's source file")
            .to_owned();
        let ledger = fs::read_to_string(sandbox.path().join("ledger").join(&sample))
            .unwrap_or_else(|e| panic!("no ledger for run {id} ({sample}): {e}"));
        let attempts: Vec<&str> = ledger.lines().collect();
        for task in status["tasks"].as_array().unwrap() {
            let name = task["task"].as_str().unwrap();
            assert_eq!(task["state"], "succeeded", "run {id}: {task}");
            let recorded: Vec<&Value> = events
                .iter()
                .filter(|e| e["task"] == name && e["from"] == "running" && e["to"] == "succeeded")
                .collect();
            assert_eq!(
                recorded.len(),
                1,
                "run {id} task {name}: {} results recorded: {events:#?}",
                recorded.len()
            );
            let line = format!("{name} {}", recorded[0]["try"]);
            assert!(
                attempts.contains(&line.as_str()),
                "run {id}: the recorded attempt `{line}` never started; ledger:\n{ledger}"
            );
            assert_eq!(task["try"], recorded[0]["try"], "run {id}: {task}");
        }
        extra_attempts += attempts.len().saturating_sub(3);
    }
    eprintln!("attempts run again after the kill: {extra_attempts}");
}

#[test]
fn a_killed_launch_wait_is_resumed_by_wait() {
    let sandbox = Sandbox::new();
    let sleep = format!("sleep {}", marker("0.21"));
    let _cleanup = KillOnDrop(sleep.clone());
    let (workflow, analysis) = chain(&sandbox, &sleep);
    let mut launch = sandbox.spawn(
        "launch",
        &[
            "launch-workflow",
            "-w",
            &workflow,
            "-a",
            &analysis,
            "-c",
            "runs",
            "--wait",
            "--slots",
            "2",
        ],
    );
    wait_for_a_few_completed(&sandbox, || launch.stderr());
    launch.kill();
    let at_kill = count(&sandbox);
    assert!(
        at_kill.get("completed").copied().unwrap_or(0) < RUNS,
        "every run completed before the kill: {at_kill:?}"
    );
    assert_eq!(
        launch.stdout().lines().count(),
        RUNS,
        "the launch printed every id"
    );

    let outcome = sandbox.ok_engine(&["wait", "--slots", "2"]);
    let unfinished = RUNS - at_kill.get("completed").copied().unwrap_or(0);
    assert!(
        outcome
            .stderr
            .contains(&format!("Waiting for {unfinished} run")),
        "{at_kill:?}: {}",
        outcome.stderr
    );
    assert_eq!(
        count(&sandbox),
        BTreeMap::from([("completed".to_owned(), RUNS)])
    );
    assert_every_result_recorded_once(&sandbox);
}

#[test]
fn a_killed_server_is_replaced_by_a_new_one() {
    let sandbox = Sandbox::new();
    let sleep = format!("sleep {}", marker("0.22"));
    let _cleanup = KillOnDrop(sleep.clone());
    let (workflow, analysis) = chain(&sandbox, &sleep);
    let mut first = sandbox.spawn("server-1", &["server", "--slots", "2"]);
    sandbox.launch(workflow.parse().unwrap(), analysis.parse().unwrap(), "runs");
    wait_for_a_few_completed(&sandbox, || first.stderr());
    first.kill();
    let at_kill = count(&sandbox);
    assert!(
        at_kill.get("completed").copied().unwrap_or(0) < RUNS,
        "every run completed before the kill: {at_kill:?}"
    );

    let mut second = sandbox.spawn("server-2", &["server", "--slots", "2"]);
    wait_until("every run to complete under the new server", || {
        let counts = count(&sandbox);
        if counts.get("completed") == Some(&RUNS) {
            Ok(())
        } else {
            Err(format!("{counts:?}; server stderr: {}", second.stderr()))
        }
    });
    second.signal("TERM");
    let exit = second.wait_exit(PATIENCE);
    assert!(exit.success(), "{exit}: {}", second.stderr());
    assert_every_result_recorded_once(&sandbox);
}
