//! The engine end to end: the SQLite store and its queue in one file under a temporary
//! `BUTLER_HOME`, and real `sh` processes run by the local executor.
//!
//! Commands leave traces (lines in files, marker arguments in `/proc`) that the tests read, and
//! every claim about timing is checked against the times the store recorded.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use butler_core::change::{Change, LeaseChange, TaskChange, TaskExpect};
use butler_core::definition::{Definition, Format};
use butler_core::engine::control::ResetScope;
use butler_core::engine::{Engine, EngineOptions};
use butler_core::executor::{DynExecutor, LOG_FILE, attempt_dir};
use butler_core::model::{AnalysisRun, Event, Id, RunFilter, RunStatus, TaskInstance, TaskState};
use butler_core::tracker::{RunSource, Tracker};
use butler_providers::connect::{Backends, connect};
use butler_providers::local::LocalExecutor;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::util::until;

/// The longest any test waits for its runs: the machine is small and shared with builds.
const WAIT: Duration = Duration::from_secs(60);
/// Leases are short so that heartbeats (every third of a lease) notice cancels quickly.
const LEASE: Duration = Duration::from_millis(1500);
/// How long a killed process may take to disappear from `/proc`.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// One test's world: a temporary `BUTLER_HOME` holding `butler.db`, opened through
/// [`connect`] as a real user's store and queue would be.
struct Harness {
    home: TempDir,
    backends: Backends,
    tracker: Tracker,
}

impl Harness {
    async fn new() -> Harness {
        let home = tempfile::tempdir().expect("a temporary BUTLER_HOME");
        let url = format!("sqlite://{}/butler.db", home.path().display());
        let backends = connect(&url, None)
            .await
            .unwrap_or_else(|e| panic!("{url} opens: {e}"));
        let tracker = Tracker::new(backends.store.clone());
        Harness {
            home,
            backends,
            tracker,
        }
    }

    fn home(&self) -> &Path {
        self.home.path()
    }

    /// Asserts that the store's run counts (which the engine's writes keep per transaction)
    /// are the runs as listed, per status.
    async fn assert_counts_are_the_runs(&self) {
        let filter = RunFilter::default();
        let store = &self.backends.store;
        let counts = store.count_runs(&filter).await.expect("count runs");
        let mut listed = BTreeMap::new();
        for run in store.list_runs(&filter).await.expect("list runs") {
            *listed.entry(run.status).or_insert(0u64) += 1;
        }
        assert_eq!(counts, listed, "the run counts are the runs as listed");
    }

    /// Options for an engine of `slots` worker slots that schedules, with test timings.
    fn options(&self, slots: usize) -> EngineOptions {
        let mut options = EngineOptions::new(self.home().to_path_buf(), slots);
        options.lease = LEASE;
        options.poll = Duration::from_millis(50);
        options
    }

    fn start(&self, options: EngineOptions) -> Engine {
        let executor: Arc<DynExecutor> = Arc::new(LocalExecutor::new());
        Engine::start(
            self.backends.store.clone(),
            self.backends.queue.clone(),
            executor,
            options,
        )
    }

    /// Registers `definition` (TOML) and launches one run per config of `runs`. The workflow
    /// config is `workflow_config` plus `dir`, the test's home, where commands leave traces.
    async fn launch_with(
        &self,
        definition: &str,
        workflow_config: Value,
        analysis_config: Value,
        runs: Vec<Value>,
    ) -> Vec<Id> {
        let definition =
            Definition::parse(definition, Format::Toml, "test.toml").expect("a valid definition");
        let mut workflow_config = workflow_config;
        workflow_config["dir"] = json!(self.home().display().to_string());
        let workflow = self
            .tracker
            .create_workflow("wf", "1", workflow_config, definition)
            .await
            .expect("the workflow registers");
        let date = NaiveDate::from_ymd_opt(2024, 5, 1).expect("a valid date");
        let analysis = self
            .tracker
            .create_analysis("analysis", date, analysis_config)
            .await
            .expect("the analysis is created");
        let sources = runs
            .into_iter()
            .map(|config| RunSource {
                source: None,
                config,
            })
            .collect();
        self.tracker
            .launch(workflow.id, analysis.id, sources, false)
            .await
            .expect("the runs launch")
            .into_iter()
            .map(|run| run.id)
            .collect()
    }

    /// Launches `count` runs of `definition`, each with its own `sample`.
    async fn launch(&self, definition: &str, count: usize) -> Vec<Id> {
        let runs = (0..count)
            .map(|i| json!({ "sample": format!("S{i}") }))
            .collect();
        self.launch_with(definition, json!({}), json!({}), runs)
            .await
    }

    /// The run and its tasks by id.
    async fn run(&self, id: Id) -> (AnalysisRun, HashMap<String, TaskInstance>) {
        let (run, tasks) = self
            .tracker
            .run_with_tasks(id)
            .await
            .expect("the run exists");
        let tasks = tasks.into_iter().map(|t| (t.task_id.clone(), t)).collect();
        (run, tasks)
    }

    async fn task(&self, run: Id, task: &str) -> TaskInstance {
        let (_, mut tasks) = self.run(run).await;
        tasks
            .remove(task)
            .unwrap_or_else(|| panic!("run {run} has a task `{task}`"))
    }

    async fn events(&self, run: Id) -> Vec<Event> {
        self.tracker.events(run).await.expect("the run's events")
    }

    /// Waits until every run of `runs` finishes; on timeout, fails showing where each run is.
    async fn wait(&self, engine: &mut Engine, runs: &[Id]) -> HashMap<Id, RunStatus> {
        match tokio::time::timeout(WAIT, engine.wait_for(runs, |_| {})).await {
            Ok(Ok(done)) => done.into_iter().map(|f| (f.run_id, f.status)).collect(),
            Ok(Err(err)) => panic!("the engine failed while waiting for runs {runs:?}: {err}"),
            Err(_) => panic!(
                "runs did not finish within {WAIT:?}:\n{}",
                self.describe(runs).await
            ),
        }
    }

    /// Waits for one run and returns how it ended, as stored.
    async fn finish(
        &self,
        engine: &mut Engine,
        run: Id,
    ) -> (AnalysisRun, HashMap<String, TaskInstance>) {
        let done = self.wait(engine, &[run]).await;
        let (stored, tasks) = self.run(run).await;
        assert_eq!(
            done.get(&run),
            Some(&stored.status),
            "wait_for reports the stored status"
        );
        (stored, tasks)
    }

    async fn describe(&self, runs: &[Id]) -> String {
        let mut out = String::new();
        for &id in runs {
            let (run, tasks) = self.run(id).await;
            out.push_str(&format!("run {id}: {} {:?}\n", run.status, run.error));
            let mut tasks: Vec<_> = tasks.into_values().collect();
            tasks.sort_by(|a, b| a.task_id.cmp(&b.task_id));
            for t in tasks {
                out.push_str(&format!(
                    "  {} {} try {} {:?}\n",
                    t.task_id, t.state, t.try_number, t.error
                ));
            }
        }
        out
    }

    /// The lines of file `name` in the test's home; none when it does not exist.
    fn lines(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.home().join(name))
            .map(|text| text.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }
}

/// Command lines of the live processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .expect("/proc is mounted")
        .flatten()
    {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // A process may end between listing and reading; a zombie's command line is empty.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) {
            found.push(format!("{}: {cmdline}", name.to_string_lossy()));
        }
    }
    found
}

/// Fails unless every process with `marker` is gone within [`KILL_GRACE`].
async fn assert_processes_end(marker: &str) {
    let deadline = Instant::now() + KILL_GRACE;
    loop {
        let left = processes_with(marker);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes outlived their task by {KILL_GRACE:?}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The events of `task`.
fn task_events<'a>(events: &'a [Event], task: &'a str) -> impl Iterator<Item = &'a Event> + 'a {
    events
        .iter()
        .filter(move |e| e.task_id.as_deref() == Some(task))
}

/// When each attempt of `task` started, from the event log.
fn attempt_starts(events: &[Event], task: &str) -> Vec<DateTime<Utc>> {
    task_events(events, task)
        .filter(|e| e.to == TaskState::Running.as_str())
        .map(|e| e.at)
        .collect()
}

fn count_to(events: &[Event], task: &str, state: TaskState) -> usize {
    task_events(events, task)
        .filter(|e| e.to == state.as_str())
        .count()
}

fn ms(d: chrono::Duration) -> i64 {
    d.num_milliseconds()
}

/// A command that appends `<task id> <nanoseconds>` to `order.log` in the test's home.
const LOG_LINE: &str = r#"echo "$BUTLER_TASK_ID $(date +%s%N)" >> "{{ config.dir }}/order.log""#;

/// A `[[tasks]]` table whose command logs the task's id and time.
fn logging_task(id: &str, needs: &[&str]) -> String {
    format!("[[tasks]]\nid = \"{id}\"\nrun = '{LOG_LINE}'\nneeds = {needs:?}\n\n")
}

/// Runs `definition` once and checks that every task succeeded at its first attempt, each
/// after all its needs ended, by the store's times and by the order of the log file.
async fn assert_dag_runs_in_order(definition: &str, slots: usize) {
    let h = Harness::new().await;
    let run = h.launch(definition, 1).await[0];
    let mut engine = h.start(h.options(slots));
    let (stored, tasks) = h.finish(&mut engine, run).await;
    engine.stop().await.expect("the engine stops");

    assert_eq!(stored.status, RunStatus::Completed, "{:?}", stored.error);
    assert_eq!(stored.error, None);
    let def = Definition::parse(definition, Format::Toml, "test.toml").expect("valid");
    let lines = h.lines("order.log");
    assert_eq!(
        lines.len(),
        def.tasks.len(),
        "each task ran once: {lines:?}"
    );
    let logged: HashMap<&str, (usize, u128)> = lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let (id, nanos) = line.split_once(' ').expect("`id nanos` lines");
            (id, (i, nanos.parse().expect("nanoseconds")))
        })
        .collect();
    for def_task in &def.tasks {
        let id = def_task.id.as_str();
        let task = &tasks[id];
        assert_eq!(task.state, TaskState::Succeeded, "task {id}");
        assert_eq!(task.try_number, 1, "task {id} ran at its first attempt");
        assert_eq!(task.exit_code, Some(0), "task {id}");
        let started = task.started_at.expect("a started task has a start time");
        let (line, nanos) = logged[id];
        for need in &def_task.needs {
            let upstream = &tasks[need];
            let ended = upstream.ended_at.expect("a finished task has an end time");
            assert!(
                started >= ended,
                "task {id} started at {started} before its need {need} ended at {ended}"
            );
            let (need_line, need_nanos) = logged[need.as_str()];
            assert!(need_line < line, "{need} logged after {id}: {lines:?}");
            assert!(need_nanos <= nanos, "{need} ran after {id}: {lines:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_runs_each_task_after_the_one_it_needs() {
    let definition = [
        logging_task("a", &[]),
        logging_task("b", &["a"]),
        logging_task("c", &["b"]),
    ]
    .concat();
    assert_dag_runs_in_order(&definition, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diamond_joins_only_after_both_branches() {
    let definition = [
        logging_task("a", &[]),
        logging_task("b", &["a"]),
        logging_task("c", &["a"]),
        logging_task("d", &["b", "c"]),
    ]
    .concat();
    assert_dag_runs_in_order(&definition, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_ten_then_fan_in() {
    let middle: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    let mut definition = logging_task("src", &[]);
    for id in &middle {
        definition.push_str(&logging_task(id, &["src"]));
    }
    let needs: Vec<&str> = middle.iter().map(String::as_str).collect();
    definition.push_str(&logging_task("sink", &needs));
    assert_dag_runs_in_order(&definition, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_branch_fails_the_join_but_not_the_sibling() {
    let definition = [
        logging_task("a", &[]),
        "[[tasks]]\nid = \"b\"\nrun = \"exit 1\"\nneeds = [\"a\"]\n\n".to_owned(),
        logging_task("c", &["a"]),
        logging_task("d", &["b", "c"]),
    ]
    .concat();
    let h = Harness::new().await;
    let run = h.launch(&definition, 1).await[0];
    let mut engine = h.start(h.options(3));
    let (stored, tasks) = h.finish(&mut engine, run).await;
    engine.stop().await.expect("the engine stops");

    assert_eq!(stored.status, RunStatus::Error);
    let error = stored.error.expect("a failed run says why");
    assert!(
        error.contains("`b`"),
        "the run's error names task b: {error}"
    );
    assert_eq!(tasks["a"].state, TaskState::Succeeded);
    assert_eq!(tasks["b"].state, TaskState::Failed);
    assert_eq!(tasks["b"].exit_code, Some(1));
    assert_eq!(tasks["b"].try_number, 1, "no retries were configured");
    assert_eq!(
        tasks["c"].state,
        TaskState::Succeeded,
        "the sibling still ran"
    );
    assert_eq!(tasks["d"].state, TaskState::UpstreamFailed);
    assert_eq!(tasks["d"].try_number, 0, "the join never started");
    let d_error = tasks["d"].error.as_deref().unwrap_or_default();
    assert!(
        d_error.contains("`b`"),
        "d names the need that failed: {d_error}"
    );
    let ran: Vec<String> = h
        .lines("order.log")
        .iter()
        .filter_map(|line| line.split(' ').next().map(str::to_owned))
        .collect();
    assert_eq!(ran, ["a", "c"], "only a and c ran their commands");
}

/// Appends a line to `attempts` in the test's home, so tests count the attempts that ran.
const COUNT: &str = r#"echo x >> "{{ config.dir }}/attempts""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_failing_twice_succeeds_at_its_third_try_after_backing_off() {
    let definition = format!(
        "[[tasks]]\nid = \"flaky\"\nrun = '{COUNT}; test $(wc -l < \"{{{{ config.dir }}}}/attempts\") -ge 3'\n\
         retries = 3\nretry_delay = \"100ms\"\n"
    );
    let h = Harness::new().await;
    let run = h.launch(&definition, 1).await[0];
    let mut engine = h.start(h.options(2));
    let (stored, tasks) = h.finish(&mut engine, run).await;
    engine.stop().await.expect("the engine stops");

    assert_eq!(stored.status, RunStatus::Completed, "{:?}", stored.error);
    let task = &tasks["flaky"];
    assert_eq!(task.state, TaskState::Succeeded);
    assert_eq!((task.try_number, task.failures), (3, 2));
    assert_eq!(h.lines("attempts").len(), 3);
    let events = h.events(run).await;
    assert_eq!(
        count_to(&events, "flaky", TaskState::UpForRetry),
        2,
        "{events:#?}"
    );
    let starts = attempt_starts(&events, "flaky");
    assert_eq!(starts.len(), 3, "{events:#?}");
    for pair in starts.windows(2) {
        let gap = ms(pair[1] - pair[0]);
        // The first retry waits at least half of retry_delay (the backoff's jitter is 0.5–1).
        assert!(
            gap >= 50,
            "a retry started {gap} ms after the attempt before it"
        );
    }
    for try_number in 1..=3 {
        let dir = attempt_dir(h.home(), run, "flaky", try_number);
        assert!(
            dir.join(LOG_FILE).exists(),
            "attempt {try_number} has its own directory"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_fails_for_good_when_its_retries_are_used_up() {
    let definition = format!(
        "[[tasks]]\nid = \"broken\"\nrun = '{COUNT}; exit 1'\nretries = 1\nretry_delay = \"100ms\"\n"
    );
    let h = Harness::new().await;
    let run = h.launch(&definition, 1).await[0];
    let mut engine = h.start(h.options(2));
    let (stored, tasks) = h.finish(&mut engine, run).await;
    engine.stop().await.expect("the engine stops");

    assert_eq!(stored.status, RunStatus::Error);
    let task = &tasks["broken"];
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!((task.try_number, task.failures), (2, 2));
    assert_eq!(task.exit_code, Some(1));
    assert_eq!(h.lines("attempts").len(), 2, "one attempt plus one retry");
    let events = h.events(run).await;
    assert_eq!(count_to(&events, "broken", TaskState::UpForRetry), 1);
    assert_eq!(count_to(&events, "broken", TaskState::Failed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_exit_code_is_not_retried() {
    let definition = format!(
        "[[tasks]]\nid = \"bad_input\"\nrun = '{COUNT}; exit 3'\nretries = 5\n\
         retry_delay = \"100ms\"\npermanent_exit_codes = [3]\n"
    );
    let h = Harness::new().await;
    let run = h.launch(&definition, 1).await[0];
    let mut engine = h.start(h.options(2));
    let (stored, tasks) = h.finish(&mut engine, run).await;
    engine.stop().await.expect("the engine stops");

    assert_eq!(stored.status, RunStatus::Error);
    let error = stored.error.unwrap_or_default();
    assert!(
        error.contains("`bad_input`") && error.contains("exit code 3"),
        "{error}"
    );
    let task = &tasks["bad_input"];
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!((task.try_number, task.exit_code), (1, Some(3)));
    assert_eq!(h.lines("attempts").len(), 1, "exit code 3 is permanent");
    assert_eq!(
        count_to(&h.events(run).await, "bad_input", TaskState::UpForRetry),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_for_keeps_retrying_until_its_window_closes() {
    let definition = format!(
        "[[tasks]]\nid = \"upstream_api\"\nrun = '{COUNT}; exit 1'\nretry_for = \"1s\"\n\
         retry_delay = \"100ms\"\nmax_retry_delay = \"200ms\"\n"
    );
    let h = Harness::new().await;
    let run = h.launch(&definition, 1).await[0];
    let mut engine = h.start(h.options(2));
    let (stored, tasks) = h.finish(&mut engine, run).await;
    engine.stop().await.expect("the engine stops");

    assert_eq!(stored.status, RunStatus::Error);
    let task = &tasks["upstream_api"];
    assert_eq!(task.state, TaskState::Failed);
    let attempts = h.lines("attempts").len();
    // Backoffs of 50–200 ms fit at least four attempts in one second, though retries = 0.
    assert!(attempts >= 4, "only {attempts} attempts within retry_for");
    assert_eq!(task.try_number as usize, attempts);
    let first = task.first_started_at.expect("the first start is kept");
    let ended = task.ended_at.expect("the task ended");
    let span = ms(ended - first);
    // It stops once the next retry would start past the window: after at least
    // 1 s - max_retry_delay, and not long after the window.
    assert!(
        (800..=3000).contains(&span),
        "retried for {span} ms with retry_for = 1s"
    );
    let starts = attempt_starts(&h.events(run).await, "upstream_api");
    let last = ms(*starts.last().expect("attempts started") - first);
    assert!(
        last < 2000,
        "the last attempt started {last} ms after the first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_timeout_kills_the_whole_process_tree() {
    let definition = "[[tasks]]\nid = \"hang\"\n\
                      run = \"sh -c 'sleep 30.4242 & sleep 30.4243; wait'\"\ntimeout = \"500ms\"\n";
    let h = Harness::new().await;
    let run = h.launch(definition, 1).await[0];
    let mut engine = h.start(h.options(2));
    let (stored, tasks) = h.finish(&mut engine, run).await;
    engine.stop().await.expect("the engine stops");

    assert_eq!(stored.status, RunStatus::Error);
    let task = &tasks["hang"];
    assert_eq!(task.state, TaskState::TimedOut);
    let ran = ms(task.ended_at.expect("ended") - task.started_at.expect("started"));
    assert!(
        (450..5000).contains(&ran),
        "the attempt ran {ran} ms with a 500 ms timeout"
    );
    let error = task.error.as_deref().unwrap_or_default();
    assert!(error.contains("timeout"), "{error}");
    assert_processes_end("30.4242").await;
    assert_processes_end("30.4243").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_timeout_cancels_running_tasks_and_kills_them() {
    let definition = "timeout = \"1s\"\n\n\
                      [[tasks]]\nid = \"slow\"\nrun = \"sleep 30.5151\"\n\n\
                      [[tasks]]\nid = \"after\"\nrun = \"echo never\"\nneeds = [\"slow\"]\n";
    let h = Harness::new().await;
    let run = h.launch(definition, 1).await[0];
    let mut engine = h.start(h.options(2));
    let (stored, tasks) = h.finish(&mut engine, run).await;

    assert_eq!(stored.status, RunStatus::Error);
    let error = stored.error.clone().unwrap_or_default();
    assert!(
        error.contains("timed out"),
        "the run says it timed out: {error}"
    );
    let took = ms(stored.ended_at.expect("ended") - stored.started_at.expect("started"));
    assert!(
        (1000..10_000).contains(&took),
        "the run ended {took} ms after it started"
    );
    assert_eq!(tasks["slow"].state, TaskState::Cancelled);
    assert_eq!(tasks["after"].state, TaskState::Cancelled);
    assert_eq!(tasks["after"].try_number, 0);
    assert_processes_end("30.5151").await;
    engine.stop().await.expect("the engine stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_running_attempt_and_cancels_what_follows() {
    let definition = "[[tasks]]\nid = \"long\"\nrun = \"sleep 30.6161\"\n\n\
                      [[tasks]]\nid = \"next\"\nrun = \"echo next\"\nneeds = [\"long\"]\n";
    let h = Harness::new().await;
    let run = h.launch(definition, 1).await[0];
    let mut engine = h.start(h.options(2));
    until("the long task's process runs", WAIT, async || {
        !processes_with("30.6161").is_empty()
    })
    .await;
    assert_eq!(h.task(run, "long").await.state, TaskState::Running);

    h.tracker.cancel_run(run).await.expect("the run cancels");
    let cancelled_at = Instant::now();
    let (stored, tasks) = h.finish(&mut engine, run).await;
    assert_eq!(stored.status, RunStatus::Cancelled);
    assert_eq!(tasks["long"].state, TaskState::Cancelled);
    assert_eq!(tasks["next"].state, TaskState::Cancelled);
    assert_eq!(
        tasks["next"].try_number, 0,
        "the downstream task never started"
    );
    assert_processes_end("30.6161").await;
    let killed_after = cancelled_at.elapsed();
    assert!(
        killed_after < KILL_GRACE,
        "killed {killed_after:?} after the cancel"
    );

    // The killed attempt's own result must not overwrite the cancel.
    tokio::time::sleep(LEASE).await;
    let events = h.events(run).await;
    let after_cancel: Vec<&Event> = task_events(&events, "long")
        .skip_while(|e| e.to != TaskState::Cancelled.as_str())
        .collect();
    assert_eq!(
        after_cancel.len(),
        1,
        "nothing follows the cancel: {after_cancel:#?}"
    );
    assert_eq!(after_cancel[0].by, "cli");
    assert_eq!(h.task(run, "long").await.state, TaskState::Cancelled);
    engine.stop().await.expect("the engine stops");
    h.assert_counts_are_the_runs().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_reruns_failed_tasks_only_then_everything() {
    let definition = "[[tasks]]\nid = \"a\"\nrun = 'echo a >> \"{{ config.dir }}/a.count\"'\n\n\
                      [[tasks]]\nid = \"b\"\nrun = 'test -f \"{{ config.dir }}/fixed\"'\nneeds = [\"a\"]\n\n\
                      [[tasks]]\nid = \"c\"\nrun = 'echo c >> \"{{ config.dir }}/c.count\"'\nneeds = [\"b\"]\n";
    let h = Harness::new().await;
    let run = h.launch(definition, 1).await[0];
    let mut engine = h.start(h.options(2));

    let (stored, tasks) = h.finish(&mut engine, run).await;
    assert_eq!(stored.status, RunStatus::Error);
    assert_eq!(tasks["a"].state, TaskState::Succeeded);
    assert_eq!(tasks["b"].state, TaskState::Failed);
    assert_eq!(tasks["c"].state, TaskState::UpstreamFailed);

    std::fs::write(h.home().join("fixed"), "").expect("the cause is fixed");
    h.tracker
        .reset_run(run, ResetScope::Failed)
        .await
        .expect("a failed run resets");
    let (stored, tasks) = h.finish(&mut engine, run).await;
    assert_eq!(stored.status, RunStatus::Completed, "{:?}", stored.error);
    assert_eq!(stored.error, None, "the old error is cleared");
    let tries: Vec<u32> = ["a", "b", "c"]
        .iter()
        .map(|t| tasks[*t].try_number)
        .collect();
    assert_eq!(
        tries,
        [1, 2, 1],
        "a kept its attempt; b ran again; c ran for the first time"
    );
    assert_eq!(
        h.lines("a.count").len(),
        1,
        "the succeeded task did not run again"
    );
    assert_eq!(h.lines("c.count").len(), 1);

    h.tracker
        .reset_run(run, ResetScope::All)
        .await
        .expect("a completed run resets");
    let (stored, tasks) = h.finish(&mut engine, run).await;
    assert_eq!(stored.status, RunStatus::Completed, "{:?}", stored.error);
    let tries: Vec<u32> = ["a", "b", "c"]
        .iter()
        .map(|t| tasks[*t].try_number)
        .collect();
    assert_eq!(
        tries,
        [2, 3, 2],
        "every task ran again, with a new attempt number"
    );
    assert_eq!(h.lines("a.count").len(), 2);
    assert_eq!(h.lines("c.count").len(), 2);
    engine.stop().await.expect("the engine stops");
    h.assert_counts_are_the_runs().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_active_runs_one_runs_runs_one_after_another() {
    let definition = "max_active_runs = 1\n\n[[tasks]]\nid = \"work\"\nrun = \"sleep 0.3\"\n";
    let h = Harness::new().await;
    let runs = h.launch(definition, 3).await;
    let mut engine = h.start(h.options(3));
    let done = h.wait(&mut engine, &runs).await;
    engine.stop().await.expect("the engine stops");

    let mut intervals = Vec::new();
    for &id in &runs {
        assert_eq!(done[&id], RunStatus::Completed);
        let (run, tasks) = h.run(id).await;
        let task = &tasks["work"];
        intervals.push((
            run.started_at.expect("started"),
            run.ended_at.expect("ended"),
            task.started_at.expect("task started"),
            task.ended_at.expect("task ended"),
        ));
    }
    intervals.sort_by_key(|i| i.0);
    for pair in intervals.windows(2) {
        let (earlier, later) = (pair[0], pair[1]);
        assert!(
            later.0 >= earlier.1,
            "a run started at {} before the previous one ended at {}",
            later.0,
            earlier.1
        );
        assert!(
            later.2 >= earlier.3,
            "two runs' tasks overlapped: {intervals:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_worker_cannot_record_a_result_after_its_lease_was_taken_back() {
    let h = Harness::new().await;
    let store = h.backends.store.clone();
    let run = h.launch("[[tasks]]\nid = \"a\"\nrun = \"true\"\n", 1).await[0];
    // A scheduler with no worker slot: the test plays the workers, the engine's reaper takes
    // expired leases back.
    let mut options = h.options(0);
    options.lease = Duration::from_millis(400);
    let mut engine = h.start(options);

    until("the task is queued", WAIT, async || {
        let t = h.task(run, "a").await;
        t.state == TaskState::Queued && t.try_number == 1
    })
    .await;
    let queued = h.task(run, "a").await;
    let now = Utc::now();
    let held_by_a = TaskInstance {
        state: TaskState::Running,
        token: Some(1),
        lease_until: Some(now + chrono::Duration::milliseconds(200)),
        worker: Some("worker-a".to_owned()),
        first_started_at: Some(now),
        started_at: Some(now),
        ..queued.clone()
    };
    let claim_a = Change::Task(TaskChange {
        expect: TaskExpect::of(&queued),
        new: held_by_a.clone(),
        by: "worker A".to_owned(),
        reason: "attempt 1 started".to_owned(),
    });
    assert_eq!(
        store.apply(vec![vec![claim_a]]).await.expect("apply"),
        [true]
    );

    until("the expired attempt is queued again", WAIT, async || {
        let t = h.task(run, "a").await;
        t.state == TaskState::Queued && t.try_number == 2
    })
    .await;
    let requeued = h.task(run, "a").await;
    assert_eq!(requeued.failures, 0, "a lost lease is not the task's fault");
    let now = Utc::now();
    let held_by_b = TaskInstance {
        state: TaskState::Running,
        token: Some(2),
        lease_until: Some(now + chrono::Duration::seconds(60)),
        worker: Some("worker-b".to_owned()),
        started_at: Some(now),
        ..requeued.clone()
    };
    let claim_b = Change::Task(TaskChange {
        expect: TaskExpect::of(&requeued),
        new: held_by_b.clone(),
        by: "worker B".to_owned(),
        reason: "attempt 2 started".to_owned(),
    });
    assert_eq!(
        store.apply(vec![vec![claim_b]]).await.expect("apply"),
        [true]
    );

    let result = |holder: &TaskInstance, try_number: u32, token: i64, by: &str| {
        Change::Task(TaskChange {
            expect: TaskExpect {
                state: TaskState::Running,
                try_number,
                token: Some(token),
            },
            new: TaskInstance {
                state: TaskState::Succeeded,
                token: None,
                lease_until: None,
                ended_at: Some(Utc::now()),
                exit_code: Some(0),
                ..holder.clone()
            },
            by: by.to_owned(),
            reason: format!("attempt {try_number} succeeded"),
        })
    };
    let renew = |token: i64| {
        Change::Lease(LeaseChange {
            run_id: run,
            task_id: "a".to_owned(),
            token,
            until: Utc::now() + chrono::Duration::seconds(60),
        })
    };
    // A, back from a pause, renews and reports its attempt, then even claims the current try.
    let refused = store
        .apply(vec![
            vec![renew(1)],
            vec![result(&held_by_a, 1, 1, "worker A")],
            vec![result(&held_by_b, 2, 1, "worker A")],
            vec![renew(2)],
        ])
        .await
        .expect("apply");
    assert_eq!(
        refused,
        [false, false, false, true],
        "only B's lease renewal holds"
    );
    let current = h.task(run, "a").await;
    assert_eq!(
        (current.state, current.token, current.worker.as_deref()),
        (TaskState::Running, Some(2), Some("worker-b")),
        "A's refused result changed nothing"
    );

    let recorded = store
        .apply(vec![vec![result(&held_by_b, 2, 2, "worker B")]])
        .await
        .expect("apply");
    assert_eq!(recorded, [true], "the lease holder's result is recorded");
    let again = store
        .apply(vec![vec![result(&held_by_b, 2, 2, "worker B")]])
        .await
        .expect("apply");
    assert_eq!(again, [false], "a result is recorded once");

    let (stored, tasks) = h.finish(&mut engine, run).await;
    engine.stop().await.expect("the engine stops");
    assert_eq!(stored.status, RunStatus::Completed, "{:?}", stored.error);
    assert_eq!(tasks["a"].try_number, 2);
    let events = h.events(run).await;
    let by_a: Vec<&Event> = events.iter().filter(|e| e.by == "worker A").collect();
    assert_eq!(by_a.len(), 1, "A's only event is its claim: {by_a:#?}");
    assert_eq!(by_a[0].to, TaskState::Running.as_str());
    let successes: Vec<&Event> = task_events(&events, "a")
        .filter(|e| e.to == TaskState::Succeeded.as_str())
        .collect();
    assert_eq!(successes.len(), 1, "{successes:#?}");
    assert_eq!(successes[0].by, "worker B");
    assert_eq!(successes[0].try_number, Some(2));
    assert!(
        task_events(&events, "a").any(|e| e.from == "running" && e.to == "up_for_retry"),
        "the reaper took the expired attempt back: {events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_engine_finishes_every_run_without_recording_twice() {
    let definition = "[[tasks]]\nid = \"first\"\nrun = \"sleep 0.3071\"\n\n\
                      [[tasks]]\nid = \"second\"\nrun = \"sleep 0.3072\"\nneeds = [\"first\"]\n";
    let h = Harness::new().await;
    let runs = h.launch(definition, 10).await;
    let store = h.backends.store.clone();

    let before = h.start(h.options(2));
    until("some tasks succeeded", WAIT, async || {
        let tasks = store.list_tasks(&runs).await.expect("tasks");
        tasks
            .iter()
            .filter(|t| t.state == TaskState::Succeeded)
            .count()
            >= 2
    })
    .await;
    before.stop().await.expect("the first engine stops");
    let mut unfinished = 0;
    for &id in &runs {
        if !h.run(id).await.0.status.is_finished() {
            unfinished += 1;
        }
    }
    assert!(unfinished > 0, "the engine was stopped mid-way");
    // A stopped engine leaves its attempts to their leases, but not their processes.
    assert_processes_end("sleep 0.307").await;

    let mut after = h.start(h.options(2));
    let done = h.wait(&mut after, &runs).await;
    after.stop().await.expect("the second engine stops");
    for &id in &runs {
        assert_eq!(done[&id], RunStatus::Completed, "run {id}");
        let events = h.events(id).await;
        for task in ["first", "second"] {
            let recorded = count_to(&events, task, TaskState::Succeeded);
            assert_eq!(
                recorded, 1,
                "run {id} task {task} succeeded {recorded} times"
            );
        }
        let (_, tasks) = h.run(id).await;
        assert!(tasks.values().all(|t| t.state == TaskState::Succeeded));
    }
    h.assert_counts_are_the_runs().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_sees_its_rendered_command_environment_and_config() {
    let definition = r#"
        [[tasks]]
        id = "say"
        run = '''
echo "sample={{ config.sample }} threads={{ config.threads }}"
echo "run=$BUTLER_RUN_ID task=$BUTLER_TASK_ID try=$BUTLER_TRY"
echo "greeting=$GREETING"
echo "config=$BUTLER_CONFIG"
cp "$BUTLER_CONFIG" seen-config.json
pwd > cwd.txt
'''
        env = { GREETING = "{{ config.word }} from {{ config.site }}" }
    "#;
    let h = Harness::new().await;
    let runs = h
        .launch_with(
            definition,
            json!({"sample": "wf", "threads": 1, "word": "hello", "site": "wf-site"}),
            json!({"threads": 4, "site": "lab-7"}),
            vec![json!({"sample": "S7"})],
        )
        .await;
    let run = runs[0];
    let mut engine = h.start(h.options(1));
    let (stored, tasks) = h.finish(&mut engine, run).await;
    engine.stop().await.expect("the engine stops");
    assert_eq!(stored.status, RunStatus::Completed, "{:?}", stored.error);
    assert_eq!(tasks["say"].try_number, 1);

    let dir: PathBuf = attempt_dir(h.home(), run, "say", 1);
    let log = std::fs::read_to_string(dir.join(LOG_FILE)).expect("the attempt's log");
    let lines: Vec<&str> = log.lines().collect();
    let config_path = dir.join("config.json");
    assert_eq!(
        lines,
        [
            "sample=S7 threads=4".to_owned(),
            format!("run={run} task=say try=1"),
            "greeting=hello from lab-7".to_owned(),
            format!("config={}", config_path.display()),
        ],
        "the run layer wins over the analysis, which wins over the workflow"
    );
    let cwd = std::fs::read_to_string(dir.join("cwd.txt")).expect("cwd.txt");
    assert_eq!(
        std::fs::canonicalize(cwd.trim()).expect("cwd exists"),
        std::fs::canonicalize(&dir).expect("the attempt dir exists"),
        "the command runs in its attempt's directory"
    );
    let seen: Value = serde_json::from_slice(
        &std::fs::read(dir.join("seen-config.json")).expect("the copied config"),
    )
    .expect("BUTLER_CONFIG holds JSON");
    let effective = h
        .tracker
        .effective_config(run)
        .await
        .expect("effective config");
    assert_eq!(
        seen, effective.data,
        "BUTLER_CONFIG holds the stored effective config"
    );
    assert_eq!(seen["analysis_run_id"], json!(run));
    assert_eq!(seen["sample"], json!("S7"));
}
