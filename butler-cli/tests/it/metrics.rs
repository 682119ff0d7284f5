//! What operators watch: `/metrics` of a real `butler server` after real runs (parsed from
//! Prometheus' text format and compared with what the CLI says), `/health` and `/ready`, the
//! metric names the monitoring guide's alert rules and Grafana dashboard use, and the log
//! settings (`BUTLER_LOG_FORMAT`, `BUTLER_LOG_FILE`, `BUTLER_LOG_DIR`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::http::Server;
use crate::util::{Background, KillOnDrop, Sandbox, marker, run_ids, wait_until};

/// `GET path` over plain HTTP/1.0 (so the answer is never chunked): the status and the body.
fn get(base: &str, path: &str) -> Result<(u16, String), String> {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")
        .map_err(|e| format!("send GET {path}: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read the answer to GET {path}: {e}"))?;
    let raw = String::from_utf8(raw).map_err(|e| format!("GET {path}: not UTF-8: {e}"))?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: no end of headers in {raw:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("GET {path}: no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// `GET path`, failing the test unless it answers.
fn must_get(base: &str, path: &str) -> (u16, String) {
    get(base, path).unwrap_or_else(|e| panic!("{e}"))
}

/// One sample line of the text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A `/metrics` page, parsed.
#[derive(Debug)]
struct Scrape {
    samples: Vec<Sample>,
    /// `# TYPE` of each family.
    types: BTreeMap<String, String>,
    /// Families with a `# HELP` line.
    helped: BTreeSet<String>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape {
            samples: Vec::new(),
            types: BTreeMap::new(),
            helped: BTreeSet::new(),
        };
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE NAME KIND");
                scrape.types.insert(name.to_owned(), kind.to_owned());
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().expect("HELP NAME TEXT");
                scrape.helped.insert(name.to_owned());
            } else if line.starts_with('#') {
                continue;
            } else {
                scrape.samples.push(parse_sample(line));
            }
        }
        scrape
    }

    /// The samples of `name` whose labels include `labels`.
    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(k, v)| sample.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The one sample of `name` with `labels`; fails the test if there is none or several.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self.matching(name, labels).collect();
        match found.as_slice() {
            [one] => one.value,
            [] => panic!("no sample {name}{labels:?} in:\n{}", self.names()),
            many => panic!("several samples {name}{labels:?}: {many:?}"),
        }
    }

    /// The sum of the samples of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Every family (from `# TYPE`).
    fn families(&self) -> BTreeSet<String> {
        self.types.keys().cloned().collect()
    }

    fn names(&self) -> String {
        self.families().into_iter().collect::<Vec<_>>().join("\n")
    }

    /// Whether `name` is a family or a series of a histogram family (`_bucket`, `_sum`,
    /// `_count`).
    fn knows(&self, name: &str) -> bool {
        self.types.contains_key(name)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|family| self.types.get(family).is_some_and(|t| t == "histogram"))
            })
    }
}

fn parse_sample(line: &str) -> Sample {
    let (series, value) = line
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("a sample line has a value: {line:?}"));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other
            .parse()
            .unwrap_or_else(|_| panic!("not a number in {line:?}")),
    };
    let (name, labels) = match series.split_once('{') {
        None => (series, BTreeMap::new()),
        Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'), line)),
    };
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}

/// `a="x",b="y \"quoted\""` into pairs, undoing the text format's escapes.
fn parse_labels(text: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "a quoted label value in {line:?}");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => panic!("a dangling escape in {line:?}"),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_owned(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    labels
}

fn scrape(base: &str) -> Scrape {
    let (status, body) = must_get(base, "/metrics");
    assert_eq!(status, 200, "/metrics answered {status}: {body}");
    Scrape::parse(&body)
}

/// How many runs are in each status, from `list-runs --json`.
fn run_counts(sandbox: &Sandbox) -> BTreeMap<String, f64> {
    let mut counts = BTreeMap::new();
    for status in sandbox.run_statuses() {
        *counts.entry(status).or_insert(0.0) += 1.0;
    }
    counts
}

/// Every status a run can be in.
const RUN_STATUSES: [&str; 6] = [
    "ready",
    "scheduled",
    "in-progress",
    "completed",
    "error",
    "cancelled",
];

/// Asserts that `butler_runs` agrees with `list-runs` for every status.
fn assert_runs_match_the_cli(scrape: &Scrape, sandbox: &Sandbox) {
    let counts = run_counts(sandbox);
    for status in RUN_STATUSES {
        assert_eq!(
            scrape.value("butler_runs", &[("status", status)]),
            counts.get(status).copied().unwrap_or(0.0),
            "butler_runs{{status={status:?}}} against list-runs {counts:?}"
        );
    }
}

/// The outcomes of attempts a worker ran to an end (the others have no duration).
const RAN_OUTCOMES: [&str; 5] = [
    "succeeded",
    "failed",
    "failed_to_start",
    "timed_out",
    "cancelled",
];

/// A single-task workflow whose command comes from the run config: `true` succeeds, `exit 3`
/// fails twice (one retry), a long `sleep` times out twice.
const STEP: &str = r#"
[[tasks]]
id = "step"
run = "{{ config.command }}"
timeout = "2s"
retries = 1
retry_delay = "200ms"
max_retry_delay = "200ms"
"#;

/// A workflow whose runs may take one second, running a command that takes longer.
const CAPPED: &str = r#"
timeout = "1s"

[[tasks]]
id = "step"
run = "{{ config.command }}"
"#;

#[test]
fn metrics_count_what_the_runs_did_and_agree_with_the_cli() {
    let sandbox = Sandbox::new();
    let sleep = marker("sleep 30.");
    let _cleanup = KillOnDrop(sleep.clone());
    let workflow = sandbox.workflow("step", STEP, &json!({})).to_string();
    let analysis = sandbox.analysis(&json!({})).to_string();
    for (file, command) in [
        ("ok-1", "true"),
        ("ok-2", "true"),
        ("ok-3", "true"),
        ("fails", "exit 3"),
        ("slow", sleep.as_str()),
    ] {
        sandbox.write(
            &format!("runs/{file}.json"),
            &json!({ "command": command, "sample": file }).to_string(),
        );
    }
    let analysis: i64 = analysis.parse().expect("an id");
    let runs = sandbox.launch(workflow.parse().expect("an id"), analysis, "runs");
    assert_eq!(runs.len(), 5);
    // A run that outlives its workflow's timeout: its attempt is cancelled, the run fails.
    let capped = sandbox.workflow("capped", CAPPED, &json!({ "command": sleep }));
    sandbox.write("capped/run.json", "{}");
    assert_eq!(sandbox.launch(capped, analysis, "capped").len(), 1);

    // A server with no worker slot schedules the runs: their tasks wait in the queue.
    let mut queued = start_server_with_env(&sandbox, "no-workers", &["--slots", "0"], &[]);
    let waiting = wait_until("six tasks waiting in the queue for half a second", || {
        let scrape = scrape(&queued.base);
        let ready = scrape.value(
            "butler_queue_messages",
            &[("queue", "butler.tasks"), ("state", "ready")],
        );
        let age = scrape.value(
            "butler_queue_oldest_ready_age_seconds",
            &[("queue", "butler.tasks")],
        );
        if ready == 6.0 && age >= 0.5 {
            Ok(scrape)
        } else {
            Err(format!("{ready} ready, the oldest for {age} s"))
        }
    });
    assert_runs_match_the_cli(&waiting, &sandbox);
    assert_eq!(
        waiting.value("butler_runs", &[("status", "scheduled")]),
        6.0
    );
    assert_eq!(
        waiting.value("butler_active_run_tasks", &[("state", "queued")]),
        6.0
    );
    assert_eq!(waiting.sum("butler_active_run_tasks", &[]), 6.0);
    assert_eq!(waiting.value("butler_workers", &[("state", "alive")]), 0.0);
    assert_eq!(waiting.value("butler_scheduler_leader", &[]), 1.0);
    assert_eq!(waiting.value("butler_store_up", &[]), 1.0);
    assert_eq!(waiting.value("butler_queue_up", &[]), 1.0);
    assert_eq!(must_get(&queued.base, "/health"), (200, "ok\n".to_owned()));
    assert_eq!(
        must_get(&queued.base, "/ready"),
        (200, "ready\n".to_owned())
    );
    stop(&mut queued.process);

    // A server with two slots runs them.
    let server = start_server_with_env(&sandbox, "workers", &[], &[]);
    wait_until("every run to finish", || {
        let statuses = sandbox.run_statuses();
        if statuses.iter().all(|s| s == "completed" || s == "error") {
            Ok(())
        } else {
            Err(format!("{statuses:?}"))
        }
    });
    let done = wait_until("the server to see every run finish", || {
        let scrape = scrape(&server.base);
        // The store's numbers may be up to a second old: wait for both to agree.
        let finished = scrape.sum("butler_runs_finished_total", &[]);
        let stored = scrape.value("butler_runs", &[("status", "completed")])
            + scrape.value("butler_runs", &[("status", "error")]);
        if finished == 6.0 && stored == 6.0 {
            Ok(scrape)
        } else {
            Err(format!("{finished} runs finished, {stored} in the store"))
        }
    });

    assert_runs_match_the_cli(&done, &sandbox);
    assert_eq!(done.value("butler_runs", &[("status", "completed")]), 3.0);
    assert_eq!(done.value("butler_runs", &[("status", "error")]), 3.0);
    let finished = |status| done.value("butler_runs_finished_total", &[("status", status)]);
    assert_eq!((finished("completed"), finished("error")), (3.0, 3.0));
    assert_eq!(done.value("butler_run_timeouts_total", &[]), 1.0);

    let attempts = |outcome| done.value("butler_task_attempts_total", &[("outcome", outcome)]);
    assert_eq!(attempts("succeeded"), 3.0);
    assert_eq!(attempts("failed"), 2.0, "exit 3, retried once");
    assert_eq!(attempts("timed_out"), 2.0, "the sleep, retried once");
    assert_eq!(
        attempts("cancelled"),
        1.0,
        "the attempt of the run that timed out"
    );
    for outcome in ["failed_to_start", "lost", "interrupted"] {
        assert_eq!(attempts(outcome), 0.0, "{outcome}");
    }
    let retries = |outcome| done.value("butler_task_retries_total", &[("outcome", outcome)]);
    assert_eq!((retries("failed"), retries("timed_out")), (1.0, 1.0));
    assert_eq!(done.sum("butler_task_retries_total", &[]), 2.0);

    // The histogram saw every attempt the worker ran, and the timed-out ones ran 2 s each.
    let durations = "butler_task_attempt_duration_seconds";
    let ran: f64 = RAN_OUTCOMES.iter().map(|o| attempts(o)).sum();
    assert_eq!(done.sum(&format!("{durations}_count"), &[]), ran);
    assert_eq!(ran, 8.0);
    assert_eq!(
        done.value(&format!("{durations}_count"), &[("outcome", "timed_out")]),
        2.0
    );
    assert!(done.value(&format!("{durations}_sum"), &[("outcome", "timed_out")]) >= 4.0);
    assert_eq!(
        done.value(
            &format!("{durations}_bucket"),
            &[("outcome", "timed_out"), ("le", "1")]
        ),
        0.0,
        "no timed-out attempt took under a second"
    );
    assert_eq!(
        done.value(
            &format!("{durations}_bucket"),
            &[("outcome", "succeeded"), ("le", "+Inf")]
        ),
        3.0
    );
    assert_eq!(
        done.types.get(durations).map(String::as_str),
        Some("histogram")
    );

    // The engine's store and queue calls were timed.
    for (family, op) in [
        ("butler_store_call_duration_seconds_count", "apply"),
        ("butler_store_call_duration_seconds_count", "list_tasks"),
        ("butler_queue_call_duration_seconds_count", "enqueue"),
        ("butler_queue_call_duration_seconds_count", "ack"),
    ] {
        assert!(done.value(family, &[("op", op)]) > 0.0, "{family} {op}");
    }
    assert!(done.sum("butler_store_batch_size_count", &[]) > 0.0);
    // The group commits reached the database as commits of its own, each a transaction of
    // the writer thread, timed.
    assert!(done.sum("butler_store_commits_total", &[]) > 0.0);
    let transactions = "butler_store_transaction_duration_seconds";
    assert!(done.sum(&format!("{transactions}_count"), &[]) > 0.0);
    assert!(done.sum(&format!("{transactions}_sum"), &[]) > 0.0);
    assert_eq!(
        done.types.get(transactions).map(String::as_str),
        Some("histogram")
    );

    // Nothing waits; one worker is alive and reported recently.
    assert_eq!(done.sum("butler_active_run_tasks", &[]), 0.0);
    for state in ["ready", "delayed", "leased", "dead"] {
        assert_eq!(
            done.value(
                "butler_queue_messages",
                &[("queue", "butler.tasks"), ("state", state)]
            ),
            0.0,
            "{state}"
        );
    }
    assert_eq!(
        done.value(
            "butler_queue_oldest_ready_age_seconds",
            &[("queue", "butler.tasks")]
        ),
        0.0
    );
    assert_eq!(done.value("butler_workers", &[("state", "alive")]), 1.0);
    assert_eq!(done.value("butler_workers", &[("state", "lost")]), 0.0);
    let age = done.sum("butler_worker_heartbeat_age_seconds", &[]);
    assert!(
        (0.0..done.value("butler_worker_lost_after_seconds", &[])).contains(&age),
        "heartbeat age {age}"
    );
    assert_eq!(done.sum("butler_worker_slots", &[]), 2.0);
    assert_eq!(done.sum("butler_worker_slots_busy", &[]), 0.0);
    assert!(done.value("butler_home_disk_free_bytes", &[]) > 0.0);
    assert!(
        done.value("butler_home_disk_size_bytes", &[])
            >= done.value("butler_home_disk_free_bytes", &[])
    );

    // Every family says what it is.
    for family in done.families() {
        assert!(done.helped.contains(&family), "{family} has no HELP line");
        assert!(family.starts_with("butler_"), "{family} lacks the prefix");
    }
    for sample in &done.samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| sample.name.strip_suffix(suffix))
            .filter(|family| done.types.contains_key(*family))
            .unwrap_or(&sample.name);
        assert!(
            done.types.contains_key(family),
            "{} has no TYPE line",
            sample.name
        );
    }

    // The monitoring guide's alert rules and dashboard use only names the server exports.
    let used = documented_metric_names();
    assert!(used.len() >= 10, "too few names found: {used:?}");
    let unknown: Vec<&String> = used.iter().filter(|name| !done.knows(name)).collect();
    assert!(
        unknown.is_empty(),
        "the monitoring guide uses metrics /metrics does not have: {unknown:?}"
    );

    // At the default level a server logs runs finishing and its HTTP side starting.
    let stderr = server.process.stderr();
    assert!(stderr.contains("run finished"), "{stderr}");
    assert!(stderr.contains("HTTP server listening"), "{stderr}");
}

/// The metric names in the expressions of `docs/grafana/butler.json` and of the alert rules
/// in `docs/monitoring.md`.
fn documented_metric_names() -> BTreeSet<String> {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let dashboard: Value = serde_json::from_str(
        &fs::read_to_string(docs.join("grafana/butler.json")).expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut expressions = Vec::new();
    collect_exprs(&dashboard, &mut expressions);
    assert!(
        expressions.len() >= 8,
        "the dashboard has panels with queries: {expressions:?}"
    );
    let guide = fs::read_to_string(docs.join("monitoring.md")).expect("read the guide");
    let mut rules = 0;
    for block in guide.split("```yaml").skip(1) {
        let block = block.split("```").next().unwrap_or_default();
        for line in block.lines() {
            if let Some(expr) = line.trim().strip_prefix("expr:") {
                expressions.push(expr.to_owned());
                rules += 1;
            }
        }
    }
    assert!(rules >= 4, "the guide has alert rules with expr: lines");
    let mut names = BTreeSet::new();
    for expr in expressions {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("butler_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    names
}

fn collect_exprs(value: &Value, into: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Value::String(expr)) => into.push(expr.clone()),
                    _ => collect_exprs(value, into),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_exprs(item, into)),
        _ => {}
    }
}

/// Stops a server with SIGTERM and waits for it to exit.
fn stop(process: &mut Background) {
    process.signal("TERM");
    let status = process.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "the server stopped with {status}: {}",
        process.stderr()
    );
}

/// Launches the hello example's two runs and waits until both completed.
fn run_hello(sandbox: &Sandbox) -> Vec<i64> {
    let workflow = sandbox.hello_workflow();
    let analysis = sandbox.hello_analysis();
    let runs = sandbox.copy_example("hello");
    let launched = run_ids(&sandbox.ok(&[
        "launch-workflow",
        "-w",
        &workflow.to_string(),
        "-a",
        &analysis.to_string(),
        "-c",
        &format!("{runs}/runs"),
    ]));
    wait_until("the hello runs to complete", || {
        let statuses = sandbox.run_statuses();
        if statuses.iter().all(|s| s == "completed") {
            Ok(())
        } else {
            Err(format!("{statuses:?}"))
        }
    });
    launched
}

#[test]
fn json_logs_go_to_a_file_one_object_per_line() {
    let sandbox = Sandbox::new();
    let log = sandbox.path().join("log/butler.jsonl");
    let log_env = log.to_str().expect("UTF-8").to_owned();
    let mut server = start_server_with_env(
        &sandbox,
        "json",
        &[],
        &[
            ("BUTLER_LOG_FORMAT", "json"),
            ("BUTLER_LOG_FILE", &log_env),
            ("BUTLER_LOG", "info,butler::http=debug"),
        ],
    );
    let runs = run_hello(&sandbox);
    assert_eq!(must_get(&server.base, "/health").0, 200);
    assert_eq!(must_get(&server.base, "/nowhere").0, 404);
    stop(&mut server.process);

    let text = fs::read_to_string(&log).expect("the log file exists");
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    for line in &lines {
        for field in ["timestamp", "level", "target", "message"] {
            assert!(line[field].is_string(), "no {field} in {line}");
        }
    }
    let find = |message: &str| -> Vec<&Value> {
        lines.iter().filter(|l| l["message"] == message).collect()
    };
    let finished = find("run finished");
    assert_eq!(finished.len(), runs.len(), "{text}");
    for line in &finished {
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["target"], "butler_core::engine::scheduler");
        assert_eq!(line["status"], "completed");
        assert!(runs.contains(&line["run"].as_i64().expect("a run id")));
    }
    let served = find("request served");
    let health = served
        .iter()
        .find(|l| l["span"]["path"] == "/health")
        .unwrap_or_else(|| panic!("no /health request in {text}"));
    assert_eq!(health["target"], "butler::http");
    assert_eq!(health["level"], "DEBUG", "probes are logged at debug");
    assert_eq!(health["status"], 200);
    assert_eq!(health["span"]["method"], "GET");
    assert!(health["latency_ms"].is_number());
    let missing = served
        .iter()
        .find(|l| l["span"]["path"] == "/nowhere")
        .unwrap_or_else(|| panic!("no /nowhere request in {text}"));
    assert_eq!(
        (&missing["level"], &missing["status"]),
        (&json!("INFO"), &json!(404))
    );
    assert_eq!(find("HTTP server listening").len(), 1);
    assert_eq!(find("HTTP server stopped").len(), 1);
    // Nothing of the log went to stderr.
    assert!(!server.process.stderr().contains("run finished"));
}

#[test]
fn a_log_dir_gets_one_file_per_component() {
    let sandbox = Sandbox::new();
    let dir = sandbox.path().join("logs");
    let dir_env = dir.to_str().expect("UTF-8").to_owned();
    let mut server = start_server_with_env(
        &sandbox,
        "split",
        &[],
        &[("BUTLER_LOG_DIR", &dir_env), ("BUTLER_LOG", "debug")],
    );
    let runs = run_hello(&sandbox);
    assert_eq!(must_get(&server.base, "/metrics").0, 200);
    stop(&mut server.process);

    let read = |name: &str| {
        fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
    };
    let http = read("http.log");
    assert!(
        http.contains("request served") && http.contains("/metrics"),
        "{http}"
    );
    assert!(http.contains("HTTP server listening"), "{http}");
    let scheduler = read("scheduler.log");
    assert_eq!(
        scheduler.matches("run finished").count(),
        runs.len(),
        "{scheduler}"
    );
    assert!(!scheduler.contains("butler::http"), "{scheduler}");
    for line in http.lines() {
        assert!(
            line.contains("butler::http"),
            "a line of another component: {line}"
        );
    }
    assert!(dir.join("butler.log").exists());
    for file in fs::read_dir(&dir).expect("the log dir") {
        let name = file.expect("an entry").file_name();
        let name = name.to_str().expect("UTF-8");
        assert!(
            [
                "http.log",
                "scheduler.log",
                "worker.log",
                "store.log",
                "queue.log",
                "notify.log",
                "butler.log"
            ]
            .contains(&name),
            "unexpected log file {name}"
        );
    }
    assert!(!server.process.stderr().contains("request served"));
}

#[test]
fn bad_log_settings_are_refused_naming_the_variable() {
    let sandbox = Sandbox::new();
    for (env, expected) in [
        (
            vec![("BUTLER_LOG_FORMAT", "xml")],
            "BUTLER_LOG_FORMAT=\"xml\" is not a log format",
        ),
        (
            vec![("BUTLER_LOG", "verbose")],
            "BUTLER_LOG: \"verbose\" is not a level",
        ),
        (
            vec![("BUTLER_LOG_FILE", "a.log"), ("BUTLER_LOG_DIR", "logs")],
            "both BUTLER_LOG_FILE and BUTLER_LOG_DIR are set",
        ),
    ] {
        let outcome = sandbox.run_with_env(&["list-workflows"], &env);
        assert_eq!(outcome.code, 1, "{env:?}: {outcome:?}");
        assert!(
            outcome.stderr.starts_with("error: ") && outcome.stderr.contains(expected),
            "{env:?}: {}",
            outcome.stderr
        );
    }
    // A file where the log directory should be.
    sandbox.write("taken", "");
    let outcome = sandbox.run_with_env(&["list-workflows"], &[("BUTLER_LOG_DIR", "taken")]);
    assert_eq!(outcome.code, 1);
    assert!(
        outcome.stderr.contains("BUTLER_LOG_DIR=taken"),
        "{}",
        outcome.stderr
    );
}

/// Starts `butler server --listen 127.0.0.1:0 EXTRA…` (with `--slots 2` unless `EXTRA` sets
/// them) with `env` added to its environment, and waits until it answers.
fn start_server_with_env(
    sandbox: &Sandbox,
    name: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Server {
    let mut args = vec!["server", "--listen", "127.0.0.1:0"];
    if !extra.contains(&"--slots") {
        args.extend(["--slots", "2"]);
    }
    args.extend_from_slice(extra);
    let process = sandbox.spawn_with_env(name, &args, env);
    let base = wait_until("the server to print its address", || {
        let stderr = process.stderr();
        stderr
            .split_once("http://")
            .and_then(|(_, rest)| rest.split_once('/'))
            .map(|(addr, _)| format!("http://{addr}"))
            .ok_or(stderr)
    });
    wait_until("the server to answer /health", || {
        get(&base, "/health").map_err(|e| format!("{e}; stderr: {}", process.stderr()))
    });
    Server { process, base }
}

/// A store outage does not stop `butler server`: its scheduler and worker wait for the store
/// and go on, so runs launched once it is back complete.
#[test]
fn the_server_outlives_a_store_outage_and_goes_on_scheduling() {
    let Some((pg, db)) = PostgresRole::create(
        "the_server_outlives_a_store_outage_and_goes_on_scheduling",
        "outage",
    ) else {
        return;
    };
    let sandbox = Sandbox::new();
    let env = [("BUTLER_DB", db.as_str())];
    let ok = |args: &[&str]| {
        let outcome = sandbox.run_with_env(args, &env);
        assert_eq!(outcome.code, 0, "butler {args:?}: {outcome:?}");
        outcome
    };
    let hello = crate::util::example("hello");
    let workflow = ok(&[
        "create-workflow",
        "-n",
        "test",
        "-v",
        "1.0",
        "-c",
        crate::util::path_str(&hello.join("workflow-config.json")),
        "--definition",
        crate::util::path_str(&hello.join("workflows/test.toml")),
    ])
    .created_id();
    let analysis = ok(&[
        "create-analysis",
        "-n",
        "hello",
        "-d",
        "2024-03-31",
        "-c",
        crate::util::path_str(&hello.join("analysis-config.json")),
    ])
    .created_id();
    let server = start_server_with_env(&sandbox, "postgres", &["--slots", "1"], &env);
    wait_until("the server's scheduler to lead", || {
        match scrape(&server.base).value("butler_scheduler_leader", &[]) {
            1.0 => Ok(()),
            other => Err(format!("butler_scheduler_leader {other}")),
        }
    });

    pg.refuse_connections();
    wait_until("/ready to answer 503", || {
        match get(&server.base, "/ready") {
            Ok((503, body)) => Ok(body),
            other => Err(format!("{other:?}")),
        }
    });
    // Long enough for the scheduler's polls and the worker's takes to meet the outage.
    std::thread::sleep(Duration::from_secs(3));
    pg.accept_connections();
    wait_until("/ready to answer 200 again", || {
        match get(&server.base, "/ready") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}, stderr: {}", server.process.stderr())),
        }
    });

    let runs = sandbox.copy_example("hello");
    let launched = run_ids(&ok(&[
        "launch-workflow",
        "-w",
        &workflow.to_string(),
        "-a",
        &analysis.to_string(),
        "-c",
        &format!("{runs}/runs"),
    ]));
    assert_eq!(launched.len(), 2, "the hello example has two runs");
    wait_until("the runs launched after the outage to complete", || {
        let listed = ok(&["list-runs", "--json"]).json();
        let statuses: Vec<&str> = listed
            .as_array()
            .map(|runs| runs.iter().filter_map(|r| r["status"].as_str()).collect())
            .unwrap_or_default();
        if statuses.len() == 2 && statuses.iter().all(|s| *s == "completed") {
            Ok(())
        } else {
            Err(format!(
                "{statuses:?}; server stderr: {}",
                server.process.stderr()
            ))
        }
    });
    drop(server);
}

/// A PostgreSQL role and schema of this test's own, dropped when this is dropped.
struct PostgresRole {
    admin: String,
    role: String,
}

impl PostgresRole {
    /// A role named `PREFIX_PID` with a password and a schema of its own on the server of
    /// `BUTLER_TEST_POSTGRES_URL`, and the `BUTLER_DB` URL that logs in as it; `None` (after
    /// saying so) when that variable is unset, unless services are required.
    fn create(test: &str, prefix: &str) -> Option<(PostgresRole, String)> {
        let admin = match std::env::var("BUTLER_TEST_POSTGRES_URL") {
            Ok(url) if !url.trim().is_empty() => url.trim().to_owned(),
            _ if std::env::var("BUTLER_TEST_REQUIRE_SERVICES").as_deref() == Ok("1") => {
                panic!("{test} needs BUTLER_TEST_POSTGRES_URL")
            }
            _ => {
                eprintln!("skipping {test}: set BUTLER_TEST_POSTGRES_URL");
                return None;
            }
        };
        let role = format!("{prefix}_{}", std::process::id());
        let password = format!("{prefix}-test");
        let pg = PostgresRole {
            admin: admin.clone(),
            role: role.clone(),
        };
        pg.psql(&format!(
            "CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'; \
             CREATE SCHEMA \"{role}\" AUTHORIZATION \"{role}\"; \
             DO $$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %I TO \"{role}\"', \
             current_database()); END $$;"
        ))
        .expect("create the test's role and schema");
        let url = with_user(&admin, &role, &password);
        let separator = if url.contains('?') { '&' } else { '?' };
        let db = format!("{url}{separator}schema={role}&connect_timeout_ms=1000");
        Some((pg, db))
    }

    /// Refuses the role's new connections and ends its open ones: the store goes away.
    fn refuse_connections(&self) {
        let role = &self.role;
        self.psql(&format!(
            "ALTER ROLE \"{role}\" CONNECTION LIMIT 0; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
        ))
        .expect("refuse the role's connections");
    }

    /// Accepts the role's connections again.
    fn accept_connections(&self) {
        let role = &self.role;
        self.psql(&format!("ALTER ROLE \"{role}\" CONNECTION LIMIT -1"))
            .expect("accept the role's connections again");
    }

    fn psql(&self, sql: &str) -> Result<(), String> {
        let output = Command::new("psql")
            .args(["-q", "-v", "ON_ERROR_STOP=1", &self.admin, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run psql: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }
}

impl Drop for PostgresRole {
    fn drop(&mut self) {
        let role = &self.role;
        if let Err(err) = self.psql(&format!(
            "DROP SCHEMA IF EXISTS \"{role}\" CASCADE; DROP OWNED BY \"{role}\"; \
             DROP ROLE IF EXISTS \"{role}\""
        )) {
            eprintln!("could not drop role {role}: {err}");
        }
    }
}

/// `url` with its user and password replaced.
fn with_user(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let host = match authority.rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    format!("{scheme}://{user}:{password}@{host}")
}

#[test]
fn ready_answers_503_while_the_store_refuses_connections_and_recovers() {
    let Some((pg, db)) = PostgresRole::create(
        "ready_answers_503_while_the_store_refuses_connections_and_recovers",
        "metrics",
    ) else {
        return;
    };
    let role = pg.role.clone();
    let sandbox = Sandbox::new();
    let env = [("BUTLER_DB", db.as_str())];
    // Create the tables, then let a scheduler elsewhere hold the lease: this server's engine
    // stands by, so losing the store stops nothing but its answers.
    let created = sandbox.run_with_env(&["list-workflows"], &env);
    assert_eq!(created.code, 0, "{created:?}");
    pg.psql(&format!(
        "INSERT INTO \"{role}\".role_leases (role, holder, since, until) VALUES \
         ('scheduler', 'elsewhere/1 #1', (extract(epoch FROM now()) * 1000)::bigint, \
         (extract(epoch FROM now()) * 1000)::bigint + 3600000)"
    ))
    .expect("hold the scheduler's lease elsewhere");
    let server = start_server_with_env(&sandbox, "postgres", &["--slots", "0"], &env);
    assert_eq!(
        must_get(&server.base, "/ready"),
        (200, "ready\n".to_owned())
    );
    let up = scrape(&server.base);
    assert_eq!(up.value("butler_store_up", &[]), 1.0);
    assert_eq!(
        up.value("butler_scheduler_leader", &[]),
        1.0,
        "held elsewhere"
    );

    pg.refuse_connections();
    let body = wait_until("/ready to answer 503", || {
        match get(&server.base, "/ready") {
            Ok((503, body)) => Ok(body),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(
        body.starts_with("not ready: the store does not answer"),
        "{body}"
    );
    let down = wait_until("/metrics to report the store down", || {
        let scrape = scrape(&server.base);
        match scrape.value("butler_store_up", &[]) {
            0.0 => Ok(scrape),
            up => Err(format!("butler_store_up {up}")),
        }
    });
    assert_eq!(
        down.value("butler_queue_up", &[]),
        0.0,
        "the queue lives in the store"
    );
    assert_eq!(
        must_get(&server.base, "/health").0,
        200,
        "alive all the same"
    );

    pg.accept_connections();
    wait_until("/ready to answer 200 again", || {
        match get(&server.base, "/ready") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    wait_until("/metrics to report the store up", || {
        match scrape(&server.base).value("butler_store_up", &[]) {
            1.0 => Ok(()),
            up => Err(format!("butler_store_up {up}")),
        }
    });
    drop(server);
}
