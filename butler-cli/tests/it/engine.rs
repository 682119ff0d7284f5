//! Executing runs: `launch-workflow --wait`, `wait`, `server`, and the commands that show and
//! change runs (`run-status`, `logs`, `events`, `reset-run`, `cancel-run`), with real `sh`
//! processes.

use serde_json::{Value, json};

use crate::util::{
    KillOnDrop, PATIENCE, Sandbox, example, marker, path_str, processes_with, run_ids, wait_until,
};

/// `(from, to)` of the events of task `task`, in order.
fn transitions(events: &[Value], task: &str) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| e["task"] == task)
        .map(|e| {
            (
                e["from"].as_str().unwrap().to_owned(),
                e["to"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The task named `task` in `run-status --json` output.
fn task<'a>(status: &'a Value, task: &str) -> &'a Value {
    status["tasks"]
        .as_array()
        .expect("a task list")
        .iter()
        .find(|t| t["task"] == task)
        .unwrap_or_else(|| panic!("no task {task} in {status}"))
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[test]
fn hello_example_runs_to_completion_with_wait() {
    let sandbox = Sandbox::new();
    let workflow = sandbox.hello_workflow().to_string();
    let analysis = sandbox.hello_analysis().to_string();
    let runs = example("hello").join("runs");
    let outcome = sandbox.ok_engine(&[
        "launch-workflow",
        "-w",
        &workflow,
        "-a",
        &analysis,
        "-c",
        path_str(&runs),
        "--wait",
        "--slots",
        "2",
    ]);
    assert_eq!(run_ids(&outcome), vec![1, 2]);
    assert!(
        outcome.stderr.contains("Finished 2 runs") && outcome.stderr.contains("completed: 2"),
        "{}",
        outcome.stderr
    );
    assert_eq!(sandbox.run_statuses(), ["completed", "completed"]);

    assert_eq!(
        sandbox.ok(&["logs", "-r", "1"]).stdout,
        "==> say (try 1) <==\nHello, world! - set by Analysis Run.\n"
    );
    assert_eq!(
        sandbox.ok(&["logs", "-r", "1", "-t", "say"]).stdout,
        "Hello, world! - set by Analysis Run.\n"
    );

    let status = sandbox.run_status(1);
    assert_eq!(status["status"], "completed");
    assert_eq!(status["error"], Value::Null);
    assert!(status["ended"].is_string(), "{status}");
    let say = task(&status, "say");
    assert_eq!(say["state"], "succeeded");
    assert_eq!(say["try"], 1);
    assert_eq!(say["exit_code"], 0);
    assert!(say["duration_seconds"].as_f64().is_some(), "{say}");
    let text = sandbox.ok(&["run-status", "-r", "1"]).stdout;
    assert!(text.contains("status:   completed"), "{text}");
    let header = text
        .lines()
        .find(|line| line.starts_with("TASK"))
        .unwrap_or_else(|| panic!("no task table in {text}"));
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "TASK", "STATE", "TRY", "STARTED", "DURATION", "EXIT", "ERROR"
        ]
    );
    assert!(
        text.lines()
            .any(|line| line.starts_with("say") && line.contains("succeeded")),
        "{text}"
    );

    let events = sandbox.events(1);
    assert_eq!(
        transitions(&events, "say"),
        pairs(&[
            ("pending", "queued"),
            ("queued", "running"),
            ("running", "succeeded")
        ])
    );
    let run_events: Vec<&Value> = events.iter().filter(|e| e["task"].is_null()).collect();
    assert_eq!(
        run_events.first().map(|e| &e["from"]),
        Some(&json!("ready"))
    );
    assert_eq!(
        run_events.last().map(|e| &e["to"]),
        Some(&json!("completed"))
    );
    for event in &events {
        for key in ["at", "task", "try", "from", "to", "by", "reason"] {
            assert!(event.get(key).is_some(), "no {key} in {event}");
        }
    }
    let text = sandbox.ok(&["events", "-r", "1"]).stdout;
    assert_eq!(
        text.lines()
            .next()
            .map(|l| l.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["AT", "TASK", "TRY", "FROM", "TO", "BY", "REASON"])
    );
}

const THREE_STEPS: &str = r#"
[[tasks]]
id = "prepare"
run = "echo prepared"

[[tasks]]
id = "check"
needs = ["prepare"]
run = "cat '{{ config.input }}'"

[[tasks]]
id = "report"
needs = ["check"]
run = "echo reported"
"#;

/// Each task's try number in `run-status --json` output.
fn tries(status: &Value) -> Vec<(String, u64)> {
    status["tasks"]
        .as_array()
        .expect("a task list")
        .iter()
        .map(|t| {
            (
                t["task"].as_str().unwrap().to_owned(),
                t["try"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn named(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect()
}

#[test]
fn a_failing_task_fails_the_wait_and_a_reset_runs_it_again() {
    let sandbox = Sandbox::new();
    let input = sandbox.path().join("input.txt");
    let workflow = sandbox
        .workflow("steps", THREE_STEPS, &json!({"input": path_str(&input)}))
        .to_string();
    let analysis = sandbox.analysis(&json!({})).to_string();
    let runs = sandbox.write("runs/one.json", r#"{"sample_id": "one"}"#);
    let outcome = sandbox.run_engine(&[
        "launch-workflow",
        "-w",
        &workflow,
        "-a",
        &analysis,
        "-c",
        &runs,
        "--wait",
        "--slots",
        "1",
    ]);
    assert_eq!(outcome.code, 1, "{outcome:?}");
    assert_eq!(outcome.stdout, "1\n");
    assert!(outcome.stderr.contains("error: 1"), "{}", outcome.stderr);
    assert!(
        outcome
            .stderr
            .contains("error: 1 of 1 run did not complete: run 1 (error); see why with `butler run-status -r 1`"),
        "{}",
        outcome.stderr
    );

    let status = sandbox.run_status(1);
    assert_eq!(status["status"], "error");
    let error = status["error"].as_str().expect("the run's error");
    assert!(error.contains("`check`"), "{error}");
    assert_eq!(task(&status, "prepare")["state"], "succeeded");
    assert_eq!(task(&status, "check")["state"], "failed");
    assert_eq!(task(&status, "check")["exit_code"], 1);
    assert_eq!(task(&status, "report")["state"], "upstream_failed");
    let log = sandbox.ok(&["logs", "-r", "1", "-t", "check"]).stdout;
    assert!(log.contains("No such file"), "{log}");

    let cancel = sandbox.fail(&["cancel-run", "-r", "1"]);
    assert!(cancel.contains("already error"), "{cancel}");
    assert_eq!(
        sandbox.ok(&["reset-run", "-r", "1"]).stdout.lines().count(),
        1
    );
    assert_eq!(sandbox.run_status(1)["status"], "ready");
    let again = sandbox.fail(&["reset-run", "-r", "1"]);
    assert!(
        again.contains("only a finished run can be reset"),
        "{again}"
    );

    std::fs::write(&input, "fixed input\n").unwrap();
    let outcome = sandbox.ok_engine(&["wait", "--slots", "1"]);
    assert!(
        outcome.stderr.contains("Waiting for 1 run") && outcome.stderr.contains("completed: 1"),
        "{}",
        outcome.stderr
    );
    let status = sandbox.run_status(1);
    assert_eq!(status["status"], "completed");
    assert_eq!(status["error"], Value::Null);
    assert_eq!(
        tries(&status),
        named(&[("prepare", 1), ("check", 2), ("report", 1)])
    );
    assert_eq!(
        sandbox.ok(&["logs", "-r", "1", "-t", "check"]).stdout,
        "fixed input\n"
    );
    let first = sandbox
        .ok(&["logs", "-r", "1", "-t", "check", "--try", "1"])
        .stdout;
    assert!(first.contains("No such file"), "{first}");

    sandbox.ok(&["reset-run", "-r", "1", "--all"]);
    sandbox.ok_engine(&["wait", "--slots", "1"]);
    let status = sandbox.run_status(1);
    assert_eq!(status["status"], "completed");
    assert_eq!(
        tries(&status),
        named(&[("prepare", 2), ("check", 3), ("report", 2)])
    );
    let events = sandbox.events(1);
    let succeeded = |name: &str| {
        transitions(&events, name)
            .iter()
            .filter(|(from, to)| from == "running" && to == "succeeded")
            .count()
    };
    assert_eq!(
        (
            succeeded("prepare"),
            succeeded("check"),
            succeeded("report")
        ),
        (2, 2, 2)
    );

    let nothing = sandbox.ok_engine(&["wait", "--slots", "1"]);
    assert!(
        nothing.stderr.contains("Nothing to wait for"),
        "{}",
        nothing.stderr
    );
}

#[test]
fn logs_and_status_commands_explain_what_is_missing() {
    let sandbox = Sandbox::new();
    let input = sandbox.path().join("input.txt");
    let workflow = sandbox.workflow("steps", THREE_STEPS, &json!({"input": path_str(&input)}));
    let analysis = sandbox.analysis(&json!({}));
    let runs = sandbox.write("runs/one.json", r#"{"sample_id": "one"}"#);
    sandbox.launch(workflow, analysis, &runs);

    let error = sandbox.fail(&["logs", "-r", "1"]);
    assert!(error.contains("run 1 has no task output yet"), "{error}");
    let error = sandbox.fail(&["logs", "-r", "1", "-t", "nope"]);
    assert!(
        error.contains("run 1 has no task `nope`; its tasks are: prepare, check, report"),
        "{error}"
    );
    let error = sandbox.fail(&["logs", "-r", "1", "-t", "check"]);
    assert!(
        error.contains("task `check` of run 1 has not started yet (it is pending)"),
        "{error}"
    );
    let error = sandbox.fail(&["logs", "-r", "1", "-t", "check", "--try", "2"]);
    assert!(error.contains("has no attempt 2"), "{error}");
    for command in ["run-status", "events", "logs", "cancel-run", "reset-run"] {
        let error = sandbox.fail(&[command, "-r", "9"]);
        assert!(error.contains('9'), "{command}: {error}");
    }
    let error = sandbox.fail(&["wait", "-a", "99"]);
    assert!(error.contains("99"), "{error}");
    let error = sandbox.usage_error(&["worker", "--slots", "0"]);
    assert!(error.contains("--slots 1"), "{error}");

    let status = sandbox.run_status(1);
    assert_eq!(status["status"], "ready");
    assert_eq!(task(&status, "prepare")["state"], "pending");
    assert_eq!(task(&status, "prepare")["try"], 0);
}

#[test]
fn logs_follow_prints_output_until_the_task_or_the_run_finishes() {
    let sandbox = Sandbox::new();
    let definition = r#"
[[tasks]]
id = "talk"
run = "echo one; sleep 1; echo two"

[[tasks]]
id = "after"
needs = ["talk"]
run = "echo three"
"#;
    let workflow = sandbox.workflow("talk", definition, &json!({}));
    let analysis = sandbox.analysis(&json!({}));
    let runs = sandbox.write("runs/one.json", r#"{"sample_id": "one"}"#);
    sandbox.launch(workflow, analysis, &runs);

    let mut task = sandbox.spawn("follow-task", &["logs", "-r", "1", "-t", "talk", "-f"]);
    let mut run = sandbox.spawn("follow-run", &["logs", "-r", "1", "-f"]);
    sandbox.ok_engine(&["wait", "--slots", "1"]);
    assert!(task.wait_exit(PATIENCE).success(), "{}", task.stderr());
    assert!(run.wait_exit(PATIENCE).success(), "{}", run.stderr());
    assert_eq!(task.stdout(), "one\ntwo\n");
    assert_eq!(
        run.stdout(),
        "==> talk (try 1) <==\none\ntwo\n\n==> after (try 1) <==\nthree\n"
    );
    // A finished task: -f prints what there is and returns.
    assert_eq!(
        sandbox.ok(&["logs", "-r", "1", "-t", "after", "-f"]).stdout,
        "three\n"
    );
}

#[test]
fn cancel_run_kills_the_running_task_and_the_server_stops_on_sigterm() {
    let sandbox = Sandbox::new();
    let sleep = format!("sleep {}", marker("29."));
    let _cleanup = KillOnDrop(sleep.clone());
    let definition = format!(
        r#"
[[tasks]]
id = "nap"
run = "echo started; {sleep}; echo woke"

[[tasks]]
id = "after"
needs = ["nap"]
run = "echo after"
"#
    );
    let workflow = sandbox.workflow("nap", &definition, &json!({}));
    let analysis = sandbox.analysis(&json!({}));
    let mut server = sandbox.spawn("server", &["server", "--slots", "1"]);
    let runs = sandbox.write("runs/one.json", r#"{"sample_id": "one"}"#);
    sandbox.launch(workflow, analysis, &runs);

    wait_until("the task to run its sleep", || {
        let status = sandbox.run_status(1);
        let state = task(&status, "nap")["state"].clone();
        if state == "running" && !processes_with(&sleep).is_empty() {
            Ok(())
        } else {
            Err(format!("task {state}, server stderr: {}", server.stderr()))
        }
    });
    let cancelled = sandbox.ok(&["cancel-run", "-r", "1"]).stdout;
    assert!(cancelled.starts_with("Cancelled run 1"), "{cancelled}");
    assert_eq!(cancelled.lines().count(), 1);
    let status = sandbox.run_status(1);
    assert_eq!(status["status"], "cancelled");
    assert_eq!(task(&status, "nap")["state"], "cancelled");
    assert_eq!(task(&status, "after")["state"], "cancelled");

    wait_until("the cancelled task's process to end", || {
        let left = processes_with(&sleep);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("processes {left:?} still run `{sleep}`"))
        }
    });
    let log = sandbox.ok(&["logs", "-r", "1", "-t", "nap"]).stdout;
    assert_eq!(log, "started\n");
    // The cancelled attempt's result is not recorded over the cancel.
    let status = sandbox.run_status(1);
    assert_eq!(task(&status, "nap")["state"], "cancelled");

    server.signal("TERM");
    let exit = server.wait_exit(PATIENCE);
    assert!(exit.success(), "{exit}: {}", server.stderr());
    assert!(server.stderr().contains("Stopping"), "{}", server.stderr());
}

#[test]
fn the_queue_url_chooses_where_task_attempts_wait() {
    let sandbox = Sandbox::new();
    let workflow = sandbox.hello_workflow().to_string();
    let analysis = sandbox.hello_analysis().to_string();
    let runs = example("hello").join("runs");
    let launch = [
        "launch-workflow",
        "-w",
        &workflow,
        "-a",
        &analysis,
        "-c",
        path_str(&runs),
        "--wait",
        "--slots",
        "1",
    ];
    let mut args = launch.to_vec();
    args.extend(["--queue", "memory://"]);
    let outcome = sandbox.ok_engine(&args);
    assert!(
        outcome.stderr.contains("completed: 2"),
        "{}",
        outcome.stderr
    );
    assert_eq!(sandbox.run_statuses(), ["completed", "completed"]);

    let error = sandbox.fail(&["list-runs", "--queue", "carrier-pigeon://loft"]);
    assert!(error.contains("carrier-pigeon"), "{error}");
}

#[test]
fn only_the_engine_needs_the_queue_to_be_reachable() {
    let sandbox = Sandbox::new();
    let workflow = sandbox.hello_workflow().to_string();
    let analysis = sandbox.hello_analysis().to_string();
    let runs = example("hello").join("runs");
    // Nothing listens on port 1: every connection to this broker is refused.
    let down = "amqp://guest:guest@127.0.0.1:1/%2f";
    let launch = [
        "launch-workflow",
        "-w",
        &workflow,
        "-a",
        &analysis,
        "-c",
        path_str(&runs),
        "--queue",
        down,
    ];

    let error = sandbox.fail(&[&launch[..], &["--wait"]].concat());
    assert!(error.contains("127.0.0.1:1"), "{error}");
    assert!(
        sandbox.run_statuses().is_empty(),
        "a failed launch left runs"
    );

    let launched = sandbox.ok(&launch);
    assert!(
        launched.stderr.contains("Launched 2 runs"),
        "{}",
        launched.stderr
    );
    let listed = sandbox.ok(&["list-runs", "--queue", down]).stdout;
    assert_eq!(listed.lines().count(), 3, "{listed}");
    sandbox.ok(&["cancel-run", "-r", "1", "--queue", down]);
    assert_eq!(sandbox.run_statuses(), ["cancelled", "ready"]);
}
