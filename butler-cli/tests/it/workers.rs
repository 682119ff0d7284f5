//! Processes that share a store: `worker`, `scheduler` and `list-workers`, leadership among
//! schedulers, and `doctor`.
//!
//! Heartbeats are shortened with `BUTLER_HEARTBEAT_SECS`, so that a killed worker is lost, and
//! a scheduler's lease ends, within a second or two.

use serde_json::{Value, json};

use crate::util::{PATIENCE, Sandbox, wait_until};

/// Seconds between heartbeats in these tests; the scheduler's lease lasts two of them.
const HEARTBEAT: &str = "0.3";

fn with_heartbeat() -> [(&'static str, &'static str); 1] {
    [("BUTLER_HEARTBEAT_SECS", HEARTBEAT)]
}

/// The parsed `list-workers --json`, judged with the tests' heartbeat.
fn workers(sandbox: &Sandbox) -> Vec<Value> {
    let outcome = sandbox.run_with_env(&["list-workers", "--json"], &with_heartbeat());
    assert_eq!(outcome.code, 0, "list-workers failed: {}", outcome.stderr);
    match outcome.json() {
        Value::Array(workers) => workers,
        other => panic!("list-workers --json printed {other}"),
    }
}

fn worker<'a>(workers: &'a [Value], name: &str) -> Option<&'a Value> {
    workers.iter().find(|w| w["name"] == name)
}

#[test]
fn list_workers_shows_a_worker_alive_then_lost_after_it_is_killed() {
    let sandbox = Sandbox::new();
    let mut w1 = sandbox.spawn_with_env(
        "w1",
        &["worker", "--slots", "2", "--name", "w1"],
        &with_heartbeat(),
    );
    let alive = wait_until("w1 to be listed alive", || {
        let listed = workers(&sandbox);
        match worker(&listed, "w1") {
            Some(w) if w["state"] == "alive" => Ok(w.clone()),
            _ => Err(format!("{listed:?}; worker stderr: {}", w1.stderr())),
        }
    });
    assert_eq!(alive["slots"], json!(2));
    assert_eq!(alive["running"], json!(0));
    assert_eq!(alive["queue"], "butler.tasks");
    assert_eq!(alive["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        alive["host"].as_str().is_some_and(|h| !h.is_empty()),
        "{alive}"
    );
    assert!(alive["last_heartbeat"].is_string(), "{alive}");

    let table = sandbox.ok(&["list-workers"]);
    let header: Vec<&str> = table
        .stdout
        .lines()
        .next()
        .unwrap_or("")
        .split("  ")
        .collect();
    assert_eq!(
        header
            .iter()
            .map(|h| h.trim())
            .filter(|h| !h.is_empty())
            .collect::<Vec<_>>(),
        [
            "NAME",
            "HOST",
            "QUEUE",
            "SLOTS",
            "RUNNING",
            "LAST HEARTBEAT",
            "VERSION",
            "STATE"
        ]
    );
    let row = &table.rows()[0];
    assert_eq!(row[0], "w1");
    assert!(
        row.iter().any(|cell| cell == "ago"),
        "the heartbeat shows as an age: {row:?}"
    );

    w1.kill();
    wait_until("w1 to be listed lost", || {
        let listed = workers(&sandbox);
        match worker(&listed, "w1") {
            Some(w) if w["state"] == "lost" => Ok(()),
            _ => Err(format!("{listed:?}")),
        }
    });
}

#[test]
fn a_worker_stopped_cleanly_leaves_the_list_and_its_name_is_free_again() {
    let sandbox = Sandbox::new();
    let mut first = sandbox.spawn_with_env(
        "first",
        &["worker", "--slots", "1", "--name", "gpu-1"],
        &with_heartbeat(),
    );
    wait_until("gpu-1 to be listed", || {
        let listed = workers(&sandbox);
        worker(&listed, "gpu-1")
            .map(|_| ())
            .ok_or_else(|| format!("{listed:?}; stderr: {}", first.stderr()))
    });

    // A second live worker may not take the name.
    let mut second = sandbox.spawn_with_env(
        "second",
        &["worker", "--slots", "1", "--name", "gpu-1"],
        &with_heartbeat(),
    );
    let refused = second.wait_exit(PATIENCE);
    assert_eq!(refused.code(), Some(1), "{}", second.stderr());
    assert!(
        second
            .stderr()
            .contains("a worker named \"gpu-1\" is already running"),
        "{}",
        second.stderr()
    );

    first.signal("TERM");
    let exit = first.wait_exit(PATIENCE);
    assert!(exit.success(), "{exit}: {}", first.stderr());
    let listed = workers(&sandbox);
    assert!(
        worker(&listed, "gpu-1").is_none(),
        "a stopped worker leaves the list: {listed:?}"
    );
    let mut third = sandbox.spawn_with_env(
        "third",
        &["worker", "--slots", "1", "--name", "gpu-1"],
        &with_heartbeat(),
    );
    wait_until("the name to be taken again", || {
        let listed = workers(&sandbox);
        match worker(&listed, "gpu-1") {
            Some(w) if w["state"] == "alive" => Ok(()),
            _ => Err(format!("{listed:?}; stderr: {}", third.stderr())),
        }
    });
    third.kill();
}

#[test]
fn a_worker_name_must_be_printable() {
    let sandbox = Sandbox::new();
    let stderr = sandbox.fail(&["worker", "--slots", "1", "--name", " "]);
    assert!(stderr.contains("--name is empty"), "{stderr}");
}

/// Sets up a one-task workflow and an analysis; returns their ids as arguments.
fn one_task_workflow(sandbox: &Sandbox) -> (String, String) {
    let workflow = sandbox.workflow("one", "[[tasks]]\nid = \"t\"\nrun = \"true\"\n", &json!({}));
    let analysis = sandbox.analysis(&json!({}));
    (workflow.to_string(), analysis.to_string())
}

/// Launches one run with its own config and returns its id.
fn launch_one(sandbox: &Sandbox, workflow: &str, analysis: &str, sample: &str) -> i64 {
    let config = sandbox.write(
        &format!("runs-{sample}.json"),
        &json!({ "sample": sample }).to_string(),
    );
    let ids = sandbox.launch(
        workflow.parse().expect("an id"),
        analysis.parse().expect("an id"),
        &config,
    );
    ids[0]
}

/// Waits for run `id` to complete and returns who scheduled it (the `by` of its move to
/// `scheduled`).
fn completed_and_scheduled_by(sandbox: &Sandbox, id: i64, stderrs: impl Fn() -> String) -> String {
    wait_until(&format!("run {id} to complete"), || {
        let status = sandbox.run_status(id);
        if status["status"] == "completed" {
            Ok(())
        } else {
            Err(format!("{status}; {}", stderrs()))
        }
    });
    let events = sandbox.events(id);
    events
        .iter()
        .find(|e| e["task"].is_null() && e["to"] == "scheduled")
        .and_then(|e| e["by"].as_str())
        .unwrap_or_else(|| panic!("run {id} was never scheduled: {events:?}"))
        .to_owned()
}

/// Whether `by` (`scheduler HOST/PID #N`) names process `pid`.
fn by_process(by: &str, pid: u32) -> bool {
    by.starts_with("scheduler ") && by.contains(&format!("/{pid} #"))
}

#[test]
fn one_of_two_schedulers_leads_and_the_other_takes_over_when_it_is_killed() {
    let sandbox = Sandbox::new();
    let (workflow, analysis) = one_task_workflow(&sandbox);
    // A lease of 4 s: long enough that a busy machine never lets it lapse between renewals,
    // while a killed leader is replaced at once (it was a process of this host).
    let env = [("BUTLER_HEARTBEAT_SECS", "2")];
    let mut first = sandbox.spawn_with_env("scheduler-1", &["scheduler"], &env);
    let mut second = sandbox.spawn_with_env("scheduler-2", &["scheduler"], &env);
    let _worker = sandbox.spawn_with_env("worker", &["worker", "--slots", "2"], &env);

    let runs: Vec<i64> = ["a", "b", "c"]
        .iter()
        .map(|sample| launch_one(&sandbox, &workflow, &analysis, sample))
        .collect();
    let by: Vec<String> = runs
        .iter()
        .map(|&id| {
            completed_and_scheduled_by(&sandbox, id, || {
                format!(
                    "scheduler 1: {}\nscheduler 2: {}",
                    first.stderr(),
                    second.stderr()
                )
            })
        })
        .collect();
    let (first_pid, second_pid) = (first.pid(), second.pid());
    let first_leads = by_process(&by[0], first_pid);
    assert!(
        first_leads || by_process(&by[0], second_pid),
        "a run was scheduled by one of the two schedulers: {by:?}"
    );
    let leader_pid = if first_leads { first_pid } else { second_pid };
    assert!(
        by.iter().all(|b| by_process(b, leader_pid)),
        "only the leader schedules: {by:?}"
    );
    let doctor = sandbox.run_with_env(&["doctor"], &env);
    assert!(
        doctor
            .stdout
            .lines()
            .any(|l| l.starts_with("ok    scheduler") && l.contains(&format!("/{leader_pid} #"))),
        "doctor names the leader:\n{}",
        doctor.stdout
    );

    // Kill the leader without a chance to resign: the other takes over.
    let standby = if first_leads {
        first.kill();
        &second
    } else {
        second.kill();
        &first
    };
    let after = launch_one(&sandbox, &workflow, &analysis, "after-the-kill");
    let by_after = completed_and_scheduled_by(&sandbox, after, || standby.stderr());
    assert!(
        by_process(&by_after, standby.pid()),
        "the standby scheduled the run launched after the kill: {by_after}"
    );
}

#[test]
fn doctor_passes_on_a_fresh_home() {
    let sandbox = Sandbox::new();
    let outcome = sandbox.run(&["doctor"]);
    assert_eq!(
        outcome.code, 0,
        "doctor failed:\n{}\n{}",
        outcome.stdout, outcome.stderr
    );
    let lines: Vec<&str> = outcome.stdout.lines().collect();
    for check in ["store", "queue", "executor", "disk"] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("ok") && l.split_whitespace().nth(1) == Some(check)),
            "no `ok {check}` line:\n{}",
            outcome.stdout
        );
    }
    assert!(
        outcome.stdout.contains(
            "warn  scheduler  no scheduler is running; start `butler server` or `butler scheduler`"
        ),
        "{}",
        outcome.stdout
    );
    assert!(!outcome.stdout.contains("FAIL"), "{}", outcome.stdout);
    assert!(
        sandbox.home().join("butler.db").is_file(),
        "the fresh home got its store"
    );
}

#[test]
fn doctor_fails_naming_a_store_it_cannot_open() {
    let sandbox = Sandbox::new();
    // A directory cannot be made under a plain file, whoever runs the test.
    sandbox.write("a-file", "not a directory");
    let url = format!("sqlite://{}/a-file/butler.db", sandbox.path().display());
    let outcome = sandbox.run(&["--db", &url, "doctor"]);
    assert_eq!(outcome.code, 1, "{}\n{}", outcome.stdout, outcome.stderr);
    let store = outcome
        .stdout
        .lines()
        .find(|l| l.starts_with("FAIL  store"))
        .unwrap_or_else(|| panic!("no failed store line:\n{}", outcome.stdout));
    assert!(store.contains(&url) && store.contains("Fix:"), "{store}");
    assert!(
        outcome.stdout.contains("ok    executor") && outcome.stdout.contains("ok    disk"),
        "checks that need no store still run:\n{}",
        outcome.stdout
    );
    assert_eq!(outcome.stderr.trim(), "error: 1 check failed: store");

    let postgres = "postgres://butler@127.0.0.1:1/butler";
    let outcome = sandbox.run(&["--db", postgres, "doctor"]);
    assert_eq!(outcome.code, 1, "{}\n{}", outcome.stdout, outcome.stderr);
    assert!(
        outcome
            .stdout
            .lines()
            .any(|l| l.starts_with("FAIL  store") && l.contains(postgres)),
        "{}",
        outcome.stdout
    );
}
