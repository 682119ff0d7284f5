//! Scale-out on PostgreSQL and RabbitMQ with real processes: `butler scheduler` and several
//! `butler worker` processes share one store and one broker. Killing a worker or the scheduler
//! with SIGKILL loses no run, and every result is recorded once.
//!
//! The services come from `BUTLER_TEST_POSTGRES_URL` and `BUTLER_TEST_AMQP_URL`; without them
//! each test says so and passes, unless `BUTLER_TEST_REQUIRE_SERVICES=1`. Every test works in a
//! schema and under a queue prefix of its own, and drops both at its end.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::{Background, KillOnDrop, Outcome, PATIENCE, Sandbox, marker, processes_with};

/// Seconds between heartbeats of every process: a killed worker is lost after three of them,
/// and a scheduler's lease lasts two.
const HEARTBEAT: &str = "1";

/// How long a test waits for all its runs to complete. A killed worker's attempts come back
/// only when their 30 s lease ends, so this leaves room for that on a busy machine.
const DEADLINE: Duration = Duration::from_secs(180);

/// How long a process stopped with SIGTERM may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The tasks of every run: `a`, then `b` and `c` side by side.
const TASKS: [&str; 3] = ["a", "b", "c"];

/// How many `events` commands run at once while checking the results.
const READERS: usize = 4;

/// The service URL in `var`, or `None` after saying why the test is skipped; panics instead
/// when `BUTLER_TEST_REQUIRE_SERVICES=1`.
fn service_url(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => Some(url.trim().to_owned()),
        _ if std::env::var("BUTLER_TEST_REQUIRE_SERVICES").as_deref() == Ok("1") => {
            panic!("{test} needs {var}, and BUTLER_TEST_REQUIRE_SERVICES=1 forbids skipping it")
        }
        _ => {
            eprintln!("skipping {test}: set {var}");
            None
        }
    }
}

/// A random lowercase hexadecimal string of 16 digits.
fn random_suffix() -> String {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    format!("{:016x}", hasher.finish())
}

/// `url` with the query parameter `param` added.
fn with_param(url: &str, param: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{param}")
}

/// A sandbox whose commands all use a PostgreSQL schema and a RabbitMQ name prefix of their
/// own, with short heartbeats. The schema and the queues are dropped when this is dropped, so it
/// must outlive every process started from it.
struct Cluster {
    sandbox: Sandbox,
    postgres: String,
    schema: String,
    db: String,
    queue: String,
}

impl Cluster {
    /// A cluster for `test`, or `None` when the services are not configured.
    fn new(test: &str) -> Option<Cluster> {
        let postgres = service_url("BUTLER_TEST_POSTGRES_URL", test)?;
        let amqp = service_url("BUTLER_TEST_AMQP_URL", test)?;
        let suffix = random_suffix();
        let schema = format!("t_{suffix}");
        Some(Cluster {
            sandbox: Sandbox::new(),
            db: with_param(&postgres, &format!("schema={schema}")),
            queue: with_param(&amqp, &format!("prefix=t{suffix}")),
            postgres,
            schema,
        })
    }

    fn env(&self) -> [(&str, &str); 3] {
        [
            ("BUTLER_DB", &self.db),
            ("BUTLER_QUEUE", &self.queue),
            ("BUTLER_HEARTBEAT_SECS", HEARTBEAT),
        ]
    }

    /// Runs `butler ARGS` against the cluster.
    fn run(&self, args: &[&str]) -> Outcome {
        self.sandbox.run_with_env(args, &self.env())
    }

    /// Runs `butler ARGS` and checks that it succeeded.
    fn ok(&self, args: &[&str]) -> Outcome {
        let outcome = self.run(args);
        assert_eq!(
            outcome.code, 0,
            "butler {args:?} failed:\nstdout: {}\nstderr: {}",
            outcome.stdout, outcome.stderr
        );
        outcome
    }

    /// The parsed JSON array `butler ARGS` printed.
    fn array(&self, args: &[&str]) -> Vec<Value> {
        match self.ok(args).json() {
            Value::Array(items) => items,
            other => panic!("butler {args:?} printed {other}"),
        }
    }

    /// Starts `butler ARGS` in the background against the cluster.
    fn spawn(&self, name: &str, args: &[&str]) -> Background {
        self.sandbox.spawn_with_env(name, args, &self.env())
    }

    /// How many runs of `analysis` are in each status, from `get-run-count --json`.
    fn counts(&self, analysis: &str) -> BTreeMap<String, u64> {
        let counts = self.ok(&["get-run-count", "-a", analysis, "--json"]).json();
        let Value::Object(counts) = counts else {
            panic!("get-run-count --json printed {counts}");
        };
        counts
            .into_iter()
            .filter_map(|(status, count)| Some((status, count.as_u64()?)))
            .filter(|(_, count)| *count > 0)
            .collect()
    }

    /// The event log of every run in `ids`, read by a few `events` commands at once.
    fn events_of(&self, ids: &[i64]) -> BTreeMap<i64, Vec<Value>> {
        let chunk = ids.len().div_ceil(READERS).max(1);
        thread::scope(|scope| {
            let readers: Vec<_> = ids
                .chunks(chunk)
                .map(|chunk| {
                    scope.spawn(move || {
                        chunk
                            .iter()
                            .map(|&id| {
                                (id, self.array(&["events", "-r", &id.to_string(), "--json"]))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            readers
                .into_iter()
                .flat_map(|reader| reader.join().expect("an events reader panicked"))
                .collect()
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let dropped = Command::new("psql")
            .args([
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                &self.postgres,
                "-c",
                &format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema),
            ])
            .stdin(Stdio::null())
            .output();
        match dropped {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "could not drop schema {}: {}",
                self.schema,
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(err) => eprintln!("could not run psql to drop schema {}: {err}", self.schema),
        }
        if let Err(err) = self.delete_queues() {
            eprintln!("could not delete the queues of {}: {err}", self.queue);
        }
    }
}

impl Cluster {
    /// Deletes the broker's queues and exchanges under this cluster's prefix.
    fn delete_queues(&self) -> butler_core::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| butler_core::Error::backend("cannot start a runtime", e))?;
        runtime.block_on(async {
            let queue = butler_providers::amqp::AmqpQueue::connect(&self.queue).await?;
            let task_queue = butler_core::engine::DEFAULT_TASK_QUEUE;
            for name in [task_queue.to_owned(), format!("{task_queue}.python")] {
                queue.delete_queue(&name).await?;
            }
            queue.close().await
        })
    }
}

/// Registers the `a → {b, c}` workflow, creates an analysis and writes `runs` run configs
/// under `runs/`. Every attempt first appends `TASK TRY` to its run's ledger file
/// (`ledger/SAMPLE`), so the test sees every attempt that started, then sleeps with `sleep`.
/// Returns the workflow and analysis ids as arguments.
fn setup(cluster: &Cluster, runs: usize, max_active_runs: usize, sleep: &str) -> (String, String) {
    let sandbox = &cluster.sandbox;
    let ledger = sandbox.path().join("ledger");
    fs::create_dir_all(&ledger).expect("create the ledger directory");
    let task = |id: &str, needs: Option<&str>| {
        let needs = needs.map_or(String::new(), |n| format!("needs = [\"{n}\"]\n"));
        format!(
            "[[tasks]]\nid = \"{id}\"\n{needs}run = \"echo {id} $BUTLER_TRY >> \
             '{{{{ config.ledger }}}}/{{{{ config.sample_id }}}}'; {sleep}\"\n\n"
        )
    };
    let definition = format!(
        "max_active_runs = {max_active_runs}\n\n{}{}{}",
        task("a", None),
        task("b", Some("a")),
        task("c", Some("a"))
    );
    let definition = sandbox.write("defs/fan.toml", &definition);
    let config = sandbox.write("defs/fan.json", "{}");
    let workflow = cluster
        .ok(&[
            "create-workflow",
            "-n",
            "fan",
            "-v",
            "1",
            "-c",
            &config,
            "--definition",
            &definition,
        ])
        .created_id();
    let analysis_config = sandbox.write(
        "defs/analysis.json",
        &json!({ "ledger": ledger.to_str().expect("test paths are UTF-8") }).to_string(),
    );
    let analysis = cluster
        .ok(&[
            "create-analysis",
            "-n",
            "scale",
            "-d",
            "2024-03-31",
            "-c",
            &analysis_config,
        ])
        .created_id();
    for i in 1..=runs {
        sandbox.write(
            &format!("runs/s{i:03}.json"),
            &json!({ "sample_id": format!("s{i:03}") }).to_string(),
        );
    }
    (workflow.to_string(), analysis.to_string())
}

/// Launches every run config under `runs/` and returns the run ids.
fn launch(cluster: &Cluster, workflow: &str, analysis: &str, runs: usize) -> Vec<i64> {
    let outcome = cluster.ok(&[
        "launch-workflow",
        "-w",
        workflow,
        "-a",
        analysis,
        "-c",
        "runs",
    ]);
    let ids: Vec<i64> = outcome
        .stdout
        .lines()
        .map(|line| {
            line.trim()
                .parse()
                .unwrap_or_else(|_| panic!("not a run id: {line:?}"))
        })
        .collect();
    assert_eq!(ids.len(), runs, "launch-workflow printed every id");
    ids
}

/// Polls `condition` every 200 ms until it holds, failing the test after `timeout` with `what`
/// and the last state `condition` reported.
fn poll<T>(what: &str, timeout: Duration, mut condition: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match condition() {
            Ok(value) => return value,
            Err(state) if Instant::now() >= deadline => {
                panic!("gave up after {timeout:?} waiting for {what}; last seen: {state}")
            }
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Waits until every one of `runs` runs of `analysis` has completed; `logs` describes the
/// processes for the failure message, which also shows the state and events of a few runs
/// that did not complete.
fn wait_all_completed(cluster: &Cluster, analysis: &str, runs: usize, logs: impl Fn() -> String) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let counts = cluster.counts(analysis);
        if counts.get("completed") == Some(&(runs as u64)) && counts.len() == 1 {
            return;
        }
        if Instant::now() >= deadline {
            let unfinished: Vec<String> = cluster
                .array(&["list-runs", "-a", analysis, "--json"])
                .iter()
                .filter(|run| run["status"] != "completed")
                .take(3)
                .map(|run| {
                    let id = run["id"].to_string();
                    let status = cluster.ok(&["run-status", "-r", &id, "--json"]).stdout;
                    let events = cluster.ok(&["events", "-r", &id, "--json"]).stdout;
                    format!("run {id}: {status}\nevents: {events}")
                })
                .collect();
            panic!(
                "gave up after {DEADLINE:?} waiting for every run to complete: {counts:?}\n{}\n{}",
                unfinished.join("\n"),
                logs()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// The last lines of what each process wrote to stderr, for failure messages.
fn stderr_tails(processes: &[(&str, &Background)]) -> String {
    processes
        .iter()
        .map(|(name, process)| {
            let stderr = process.stderr();
            let lines: Vec<&str> = stderr.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            format!("--- {name} (pid {}) stderr:\n{tail}", process.pid())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Stops `process` with SIGTERM, and with SIGKILL if it has not exited after
/// [`STOP_TIMEOUT`]; returns whether it exited by itself with status 0.
fn stop(process: &mut Background) -> bool {
    if let Ok(Some(status)) = process.child.try_wait() {
        return status.success();
    }
    let _ = Command::new("kill")
        .args(["-s", "TERM", &process.pid().to_string()])
        .status();
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = process.child.try_wait() {
            return status.success();
        }
        thread::sleep(Duration::from_millis(50));
    }
    process.kill();
    false
}

/// Stops every process and checks that each one stopped cleanly on SIGTERM.
fn stop_all(processes: &mut [(&str, &mut Background)]) {
    let mut unclean = Vec::new();
    for (name, process) in processes.iter_mut() {
        if !stop(process) {
            unclean.push(format!("{name}: {}", process.stderr()));
        }
    }
    assert!(
        unclean.is_empty(),
        "processes did not stop cleanly on SIGTERM:\n{}",
        unclean.join("\n")
    );
}

/// The parent of process `pid`, from `/proc/PID/status`.
fn parent_of(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("PPid:"))
        .and_then(|ppid| ppid.trim().parse().ok())
}

/// The task attempts whose command line contains `marker` that run under process `ancestor`,
/// as `SAMPLE/TASK`.
fn attempts_under(ancestor: u32, marker: &str) -> BTreeSet<String> {
    processes_with(marker)
        .into_iter()
        .filter(|&pid| {
            let mut current = pid;
            for _ in 0..8 {
                match parent_of(current) {
                    Some(parent) if parent == ancestor => return true,
                    Some(parent) if parent > 1 => current = parent,
                    _ => return false,
                }
            }
            false
        })
        .filter_map(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            // `sh -c echo TASK $BUTLER_TRY >> '…/ledger/SAMPLE'; sleep …`
            let task = cmdline.split_once("echo ")?.1.split_whitespace().next()?;
            let sample = cmdline.split_once("/ledger/")?.1.split('\'').next()?;
            Some(format!("{sample}/{task}"))
        })
        .collect()
}

/// How many attempts have started, from the ledger files.
fn attempts_started(sandbox: &Sandbox) -> usize {
    let Ok(entries) = fs::read_dir(sandbox.path().join("ledger")) else {
        return 0;
    };
    entries
        .filter_map(|entry| fs::read_to_string(entry.ok()?.path()).ok())
        .map(|ledger| ledger.lines().count())
        .sum()
}

/// The run-level events of `events` that move the run to `to`.
fn run_moves<'a>(events: &'a [Value], to: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["task"].is_null() && e["to"] == to)
        .collect()
}

/// Checks that every run completed once, that each of its tasks has exactly one result,
/// recorded by an attempt that really started and as the task's final state, and that no
/// attempt ran twice. Returns every run's events.
fn assert_every_result_recorded_once(
    cluster: &Cluster,
    analysis: &str,
    ids: &[i64],
) -> BTreeMap<i64, Vec<Value>> {
    let runs = cluster.array(&["list-runs", "-a", analysis, "--json"]);
    assert_eq!(runs.len(), ids.len(), "list-runs shows every run");
    let mut samples = BTreeMap::new();
    for run in &runs {
        assert_eq!(run["status"], "completed", "{run}");
        let sample = run["source"]
            .as_str()
            .and_then(|s| s.rsplit('/').next())
            .and_then(|s| s.strip_suffix(".json"))
            .unwrap_or_else(|| panic!("no source file in {run}"))
            .to_owned();
        samples.insert(run["id"].as_i64().expect("a run id"), sample);
    }
    let all_events = cluster.events_of(ids);
    let mut extra_attempts = 0;
    for (&id, events) in &all_events {
        let completed = run_moves(events, "completed").len();
        assert_eq!(
            completed, 1,
            "run {id} completed {completed} times: {events:#?}"
        );
        let scheduled = run_moves(events, "scheduled").len();
        assert_eq!(
            scheduled, 1,
            "run {id} was scheduled {scheduled} times: {events:#?}"
        );
        let sample = &samples[&id];
        let ledger = fs::read_to_string(cluster.sandbox.path().join("ledger").join(sample))
            .unwrap_or_else(|e| panic!("no ledger for run {id} ({sample}): {e}"));
        let attempts: Vec<&str> = ledger.lines().collect();
        let distinct: BTreeSet<&str> = attempts.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            attempts.len(),
            "run {id}: an attempt ran twice; ledger:\n{ledger}"
        );
        for task in TASKS {
            let of_task: Vec<&Value> = events.iter().filter(|e| e["task"] == task).collect();
            let recorded: Vec<&&Value> = of_task
                .iter()
                .filter(|e| e["from"] == "running" && e["to"] == "succeeded")
                .collect();
            assert_eq!(
                recorded.len(),
                1,
                "run {id} task {task}: {} results recorded: {events:#?}",
                recorded.len()
            );
            let last = of_task.last().expect("the task has events");
            assert_eq!(
                last["to"], "succeeded",
                "run {id} task {task} ended in another state: {events:#?}"
            );
            let line = format!("{task} {}", recorded[0]["try"]);
            assert!(
                distinct.contains(line.as_str()),
                "run {id}: the recorded attempt `{line}` never started; ledger:\n{ledger}"
            );
        }
        extra_attempts += attempts.len().saturating_sub(TASKS.len());
    }
    eprintln!("attempts that ran more than once per task: {extra_attempts}");
    all_events
}

/// An attempt a worker started and never recorded a result for.
#[derive(Debug)]
struct Orphan {
    run: i64,
    task: String,
    try_number: i64,
}

/// The attempts that worker `name` started and did not finish, from every run's events.
fn orphans_of(name: &str, all_events: &BTreeMap<i64, Vec<Value>>) -> Vec<Orphan> {
    let by_worker = |e: &Value| {
        e["by"]
            .as_str()
            .is_some_and(|by| by.starts_with(&format!("worker {name} #")))
    };
    let mut orphans = Vec::new();
    for (&run, events) in all_events {
        for started in events
            .iter()
            .filter(|e| e["from"] == "queued" && e["to"] == "running" && by_worker(e))
        {
            let finished = events.iter().any(|e| {
                e["task"] == started["task"]
                    && e["try"] == started["try"]
                    && e["from"] == "running"
                    && by_worker(e)
            });
            if !finished {
                orphans.push(Orphan {
                    run,
                    task: started["task"].as_str().unwrap_or_default().to_owned(),
                    try_number: started["try"].as_i64().unwrap_or_default(),
                });
            }
        }
    }
    orphans
}

/// The worker list, as `list-workers --json` prints it.
fn workers(cluster: &Cluster) -> Vec<Value> {
    cluster.array(&["list-workers", "--json"])
}

/// The state (`alive`, `lost`) of each worker in `names`, `-` for one not listed.
fn worker_states(cluster: &Cluster, names: &[&str]) -> Vec<String> {
    let listed = workers(cluster);
    names
        .iter()
        .map(|name| {
            listed
                .iter()
                .find(|w| w["name"] == *name)
                .and_then(|w| w["state"].as_str())
                .unwrap_or("-")
                .to_owned()
        })
        .collect()
}

/// The scheduler process (`HOST/PID`) that signed `event`, if a scheduler did.
fn scheduler_pid(event: &Value) -> Option<u32> {
    let by = event["by"].as_str()?.strip_prefix("scheduler ")?;
    let process = by.split_once(" #").map_or(by, |(process, _)| process);
    process.rsplit_once('/')?.1.parse().ok()
}

/// The process id of the scheduler that leads now, from `doctor`.
fn leader(cluster: &Cluster) -> u32 {
    let doctor = cluster.run(&["doctor"]);
    doctor
        .stdout
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            if words.next() != Some("ok") || words.next() != Some("scheduler") {
                return None;
            }
            words.next()?.rsplit_once('/')?.1.parse().ok()
        })
        .unwrap_or_else(|| {
            panic!(
                "doctor names no leading scheduler:\n{}\n{}",
                doctor.stdout, doctor.stderr
            )
        })
}

/// The times at which the scheduler `pid` signed events, earliest and latest.
fn signed_between(all_events: &BTreeMap<i64, Vec<Value>>, pid: u32) -> Option<(String, String)> {
    let times: BTreeSet<String> = all_events
        .values()
        .flatten()
        .filter(|e| scheduler_pid(e) == Some(pid))
        .filter_map(|e| e["at"].as_str().map(str::to_owned))
        .collect();
    Some((times.first()?.clone(), times.last()?.clone()))
}

#[test]
fn workers_on_many_processes_survive_a_killed_worker() {
    const RUNS: usize = 300;
    let Some(cluster) = Cluster::new("workers_on_many_processes_survive_a_killed_worker") else {
        return;
    };
    let sleep = format!("sleep {}", marker("0.051"));
    let _sleeps = KillOnDrop(sleep.clone());
    let (workflow, analysis) = setup(&cluster, RUNS, RUNS, &sleep);
    let ids = launch(&cluster, &workflow, &analysis, RUNS);

    let began = Instant::now();
    let mut scheduler = cluster.spawn("scheduler", &["scheduler"]);
    let mut w1 = cluster.spawn("w1", &["worker", "--slots", "2", "--name", "w1"]);
    let mut w2 = cluster.spawn("w2", &["worker", "--slots", "2", "--name", "w2"]);
    let mut w3 = cluster.spawn("w3", &["worker", "--slots", "2", "--name", "w3"]);
    let logs = || stderr_tails(&[("scheduler", &scheduler), ("w1", &w1), ("w3", &w3)]);

    // Kill w2 while it runs attempts, once work flows through every worker.
    let running_on_w2 = poll("w2 to run attempts", PATIENCE, || {
        let on_w2 = attempts_under(w2.pid(), &sleep);
        let started = attempts_started(&cluster.sandbox);
        if !on_w2.is_empty() && started >= 60 {
            Ok(on_w2)
        } else {
            Err(format!(
                "{started} attempts started, {} on w2\n{}\n{}",
                on_w2.len(),
                logs(),
                stderr_tails(&[("w2", &w2)])
            ))
        }
    });
    w2.kill();
    let counts_at_kill = cluster.counts(&analysis);
    eprintln!(
        "killed w2 after {:?} while it ran {running_on_w2:?}; runs then: {counts_at_kill:?}",
        began.elapsed()
    );
    assert_ne!(
        counts_at_kill.get("completed"),
        Some(&(RUNS as u64)),
        "every run completed before w2 was killed"
    );

    poll("w2 to be listed lost", PATIENCE, || {
        match worker_states(&cluster, &["w1", "w2", "w3"]).as_slice() {
            [w1, w2, w3] if w1 == "alive" && w2 == "lost" && w3 == "alive" => Ok(()),
            states => Err(format!("w1, w2, w3: {states:?}")),
        }
    });

    wait_all_completed(&cluster, &analysis, RUNS, logs);
    eprintln!("{RUNS} runs completed after {:?}", began.elapsed());
    let all_events = assert_every_result_recorded_once(&cluster, &analysis, &ids);

    // w2's unfinished attempts ran again elsewhere once their leases ended.
    let orphans = orphans_of("w2", &all_events);
    assert!(
        !orphans.is_empty(),
        "w2 was killed while running {running_on_w2:?}, yet every attempt it started has a \
         result by w2"
    );
    for orphan in &orphans {
        let events = &all_events[&orphan.run];
        let of_task = |e: &&Value| e["task"] == orphan.task.as_str();
        let put_back = events.iter().filter(of_task).any(|e| {
            e["try"] == orphan.try_number
                && e["from"] == "running"
                && e["by"]
                    .as_str()
                    .is_some_and(|by| by.starts_with("scheduler "))
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("lease expired"))
        });
        assert!(
            put_back,
            "{orphan:?} was not put back after its lease: {events:#?}"
        );
        let succeeded = events
            .iter()
            .filter(of_task)
            .find(|e| e["from"] == "running" && e["to"] == "succeeded")
            .expect("checked above: one result per task");
        let by = succeeded["by"].as_str().unwrap_or_default();
        assert!(
            succeeded["try"].as_i64().unwrap_or_default() > orphan.try_number
                && !by.starts_with("worker w2 #")
                && (by.starts_with("worker w1 #") || by.starts_with("worker w3 #")),
            "{orphan:?} was retried by another worker: {succeeded}"
        );
    }
    eprintln!("attempts of w2 that w1 and w3 ran again: {}", orphans.len());
    let w2_listed = workers(&cluster)
        .into_iter()
        .find(|w| w["name"] == "w2")
        .expect("w2 is still listed");
    assert_eq!(w2_listed["state"], "lost", "{w2_listed}");

    stop_all(&mut [
        ("scheduler", &mut scheduler),
        ("w1", &mut w1),
        ("w3", &mut w3),
    ]);
    assert_eq!(
        worker_states(&cluster, &["w1", "w2", "w3"]),
        ["-", "lost", "-"],
        "stopped workers leave the list, the killed one stays lost"
    );
}

/// Launches `runs` runs, starts `schedulers` schedulers and two workers, kills the scheduler
/// that leads once some runs have completed, and checks that every run then completes with
/// single results. With one scheduler, a new one is started after the kill; with more, a
/// standby takes over. Returns every run's events, the killed leader's pid and the pid of the
/// scheduler that took over.
fn kill_the_leading_scheduler(
    test: &str,
    runs: usize,
    schedulers: usize,
    sleep_base: &str,
) -> Option<(BTreeMap<i64, Vec<Value>>, u32, u32)> {
    let cluster = Cluster::new(test)?;
    let sleep = format!("sleep {}", marker(sleep_base));
    let _sleeps = KillOnDrop(sleep.clone());
    // Few runs at once, so the scheduler keeps starting runs as others complete.
    let (workflow, analysis) = setup(&cluster, runs, runs / 4, &sleep);
    let ids = launch(&cluster, &workflow, &analysis, runs);

    let began = Instant::now();
    let mut standing: Vec<Background> = (1..=schedulers)
        .map(|n| cluster.spawn(&format!("scheduler-{n}"), &["scheduler"]))
        .collect();
    let mut w1 = cluster.spawn("w1", &["worker", "--slots", "2", "--name", "w1"]);
    let mut w2 = cluster.spawn("w2", &["worker", "--slots", "2", "--name", "w2"]);
    let logs = |schedulers: &[Background]| {
        let names: Vec<String> = (1..=schedulers.len())
            .map(|n| format!("scheduler-{n}"))
            .collect();
        let mut processes: Vec<(&str, &Background)> = names
            .iter()
            .map(String::as_str)
            .zip(schedulers.iter())
            .collect();
        processes.push(("w1", &w1));
        processes.push(("w2", &w2));
        stderr_tails(&processes)
    };

    poll("a quarter of the runs to complete", PATIENCE, || {
        let counts = cluster.counts(&analysis);
        match counts.get("completed") {
            Some(&done) if done as usize >= runs / 4 => Ok(()),
            _ => Err(format!("{counts:?}\n{}", logs(&standing))),
        }
    });
    let leader_pid = leader(&cluster);
    let leader = standing
        .iter()
        .position(|s| s.pid() == leader_pid)
        .unwrap_or_else(|| panic!("the leader {leader_pid} is none of the schedulers started"));
    let mut killed = standing.remove(leader);
    killed.kill();
    let counts_at_kill = cluster.counts(&analysis);
    eprintln!(
        "{test}: killed the leading scheduler {leader_pid} after {:?}; runs then: \
         {counts_at_kill:?}",
        began.elapsed()
    );
    assert_ne!(
        counts_at_kill.get("completed"),
        Some(&(runs as u64)),
        "every run completed before the scheduler was killed"
    );
    if standing.is_empty() {
        standing.push(cluster.spawn("scheduler-new", &["scheduler"]));
    }

    wait_all_completed(&cluster, &analysis, runs, || logs(&standing));
    eprintln!("{test}: {runs} runs completed after {:?}", began.elapsed());
    let all_events = assert_every_result_recorded_once(&cluster, &analysis, &ids);

    // One scheduler led at a time, the killed one among them, and a live one led last.
    let signers: BTreeSet<u32> = all_events
        .values()
        .flatten()
        .filter_map(scheduler_pid)
        .collect();
    let mut spans: Vec<(String, String, u32)> = signers
        .iter()
        .filter_map(|&pid| {
            let (first, last) = signed_between(&all_events, pid)?;
            Some((first, last, pid))
        })
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "two schedulers led at once (first and last event each signed): {spans:?}"
        );
    }
    assert!(
        signers.contains(&leader_pid),
        "the killed leader {leader_pid} signed nothing: {spans:?}"
    );
    let successor = spans.last().map_or(leader_pid, |span| span.2);
    assert!(
        successor != leader_pid && standing.iter().any(|s| s.pid() == successor),
        "a live scheduler took over from {leader_pid}: {spans:?}"
    );

    let mut names: Vec<String> = (1..=standing.len())
        .map(|n| format!("scheduler {n}"))
        .collect();
    names.push("w1".to_owned());
    names.push("w2".to_owned());
    let mut processes: Vec<(&str, &mut Background)> = names
        .iter()
        .map(String::as_str)
        .zip(standing.iter_mut().chain([&mut w1, &mut w2]))
        .collect();
    stop_all(&mut processes);
    Some((all_events, leader_pid, successor))
}

#[test]
fn doctor_on_a_fresh_cluster_checks_each_service_and_logs_no_error() {
    let Some(cluster) =
        Cluster::new("doctor_on_a_fresh_cluster_checks_each_service_and_logs_no_error")
    else {
        return;
    };
    // Nothing has declared the cluster's queues yet: RabbitMQ answers the depth check by
    // closing its channel, which Butler expects and must not show as an error.
    let outcome = cluster.run(&["doctor"]);
    assert_eq!(
        outcome.code, 0,
        "doctor failed:\n{}\n{}",
        outcome.stdout, outcome.stderr
    );
    for (check, url) in [("store", "postgres://"), ("queue", "amqp://")] {
        assert!(
            outcome
                .stdout
                .lines()
                .any(|l| l.starts_with(&format!("ok    {check}")) && l.contains(url)),
            "no `ok {check}` line for {url}:\n{}",
            outcome.stdout
        );
    }
    assert!(
        !outcome.stderr.contains("ERROR"),
        "doctor logged an error on a healthy cluster:\n{}",
        outcome.stderr
    );
}

#[test]
fn a_killed_scheduler_is_replaced_and_runs_finish() {
    let Some((all_events, killed, successor)) = kill_the_leading_scheduler(
        "a_killed_scheduler_is_replaced_and_runs_finish",
        100,
        1,
        "0.052",
    ) else {
        return;
    };
    let scheduled_by_successor = all_events
        .values()
        .flat_map(|events| run_moves(events, "scheduled"))
        .filter(|e| scheduler_pid(e) == Some(successor))
        .count();
    assert!(
        scheduled_by_successor > 0,
        "the new scheduler started none of the runs left when {killed} was killed"
    );
}

#[test]
fn a_standby_scheduler_takes_over_from_a_killed_leader() {
    let Some((all_events, killed, successor)) = kill_the_leading_scheduler(
        "a_standby_scheduler_takes_over_from_a_killed_leader",
        60,
        2,
        "0.053",
    ) else {
        return;
    };
    let completed_by_successor = all_events
        .values()
        .flat_map(|events| run_moves(events, "completed"))
        .filter(|e| scheduler_pid(e) == Some(successor))
        .count();
    assert!(
        completed_by_successor > 0,
        "the standby completed none of the runs left when {killed} was killed"
    );
}
