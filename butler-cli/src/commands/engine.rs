//! `launch-workflow --wait`, `wait`, `server`, `scheduler` and `worker`: the engine inside this
//! process.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io::{self, IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use butler_core::engine::{Engine, EngineOptions, RunFinished, Stats};
use butler_core::model::{Id, RunFilter, RunStatus};
use butler_core::tracker::Tracker;
use butler_providers::connect::Backends;
use butler_providers::local::LocalExecutor;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;

use super::launch::RunConfigs;
use crate::opt::{LaunchWorkflow, ServerArgs, Wait, WorkerArgs};
use crate::output;
use crate::server::{self, AppState, Auth};
use crate::settings::Settings;

/// Failed runs named in the error of a wait; the rest are counted.
const NAMED_FAILURES: usize = 5;

/// Launches the runs, then executes them in this process when `--wait` is given.
pub async fn launch_workflow(
    settings: &Settings,
    args: LaunchWorkflow,
    out: &mut impl Write,
) -> Result<()> {
    let configs = RunConfigs::read(&args)?;
    if !args.wait {
        return configs
            .launch(&settings.tracker().await?, &args, out)
            .await
            .map(drop);
    }
    // The queue is opened before anything is launched, so a queue that cannot be reached
    // leaves no runs behind that this command promised to run.
    let backends = settings.connect().await?;
    let runs = configs
        .launch(&Tracker::new(backends.store.clone()), &args, out)
        .await?;
    out.flush()?;
    let slots = settings.slots(args.slots);
    run_to_the_end(settings, &backends, &runs, slots).await
}

/// Executes every unfinished run matching the filter in this process until all have finished.
pub async fn wait(settings: &Settings, backends: &Backends, args: Wait) -> Result<()> {
    if let Some(id) = args.analysis {
        backends.store.get_analysis(id).await?;
    }
    if let Some(id) = args.workflow {
        backends.store.get_workflow(id).await?;
    }
    let mut runs = Vec::new();
    for status in [
        RunStatus::Ready,
        RunStatus::Scheduled,
        RunStatus::InProgress,
    ] {
        let filter = RunFilter {
            workflow_id: args.workflow,
            analysis_id: args.analysis,
            status: Some(status),
            after_id: None,
            limit: None,
            newest_first: false,
        };
        runs.extend(
            backends
                .store
                .list_runs(&filter)
                .await?
                .iter()
                .map(|r| r.id),
        );
    }
    runs.sort_unstable();
    if runs.is_empty() {
        eprintln!("Nothing to wait for: no matching run is ready, scheduled or in progress");
        return Ok(());
    }
    let slots = settings.slots(args.slots.slots);
    eprintln!(
        "Waiting for {} with {slots} worker {}",
        runs_noun(runs.len()),
        plural(slots, "slot", "slots")
    );
    run_to_the_end(settings, backends, &runs, slots).await
}

/// Schedules and executes runs, and serves the HTTP API, the dashboard and the metrics, until
/// stopped by a signal.
pub async fn server(settings: &Settings, backends: &Backends, args: ServerArgs) -> Result<()> {
    let slots = settings.slots(args.slots.slots);
    let options = settings.engine_options(slots)?;
    let listener = server::bind(args.listen).await?;
    // With port 0 the system picks one: print the one it picked.
    let addr = listener.local_addr().unwrap_or(args.listen);
    let auth = if args.no_auth {
        Auth::Open
    } else {
        Auth::Tokens
    };
    let state = AppState::new(
        backends,
        options.queue.clone(),
        settings.home().to_owned(),
        auth,
    )
    .with_lost_after(settings.lost_after()?);
    eprintln!(
        "Butler server {}: scheduling runs with {slots} worker {} (standing by while another \
         scheduler leads); dashboard and API on http://{}/; stop with Ctrl-C or SIGTERM",
        options.name,
        plural(slots, "slot", "slots"),
        addr
    );
    match auth {
        Auth::Open if !addr.ip().is_loopback() => eprintln!(
            "warning: --no-auth on {addr}: anyone who can reach it may launch, reset and cancel \
             runs"
        ),
        Auth::Open => {}
        Auth::Tokens => {
            if backends.store.list_tokens().await?.is_empty() {
                eprintln!(
                    "No API token exists yet: create one with `butler token create --name NAME`"
                );
            }
        }
    }
    let (stop_http, http_stop) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(server::serve(listener, server::router(state), async {
        let _ = http_stop.await;
    }));
    let served = serve(backends, options).await;
    let _ = stop_http.send(());
    http.await.context("the HTTP server panicked")??;
    served
}

/// Schedules runs, with no worker of its own, until stopped by a signal.
pub async fn scheduler(settings: &Settings, backends: &Backends) -> Result<()> {
    let options = settings.engine_options(0)?;
    eprintln!(
        "Butler scheduler {}: scheduling runs for `butler worker` processes (standing by while \
         another scheduler leads); stop with Ctrl-C or SIGTERM",
        options.name
    );
    serve(backends, options).await
}

/// Executes task attempts scheduled by another process until stopped by a signal.
pub async fn worker(settings: &Settings, backends: &Backends, args: WorkerArgs) -> Result<()> {
    let slots = settings.slots(args.slots);
    let mut options = settings.engine_options(slots)?;
    if let Some(name) = args.name {
        options.name = worker_name(&name)?;
    }
    options.schedule = false;
    eprintln!(
        "Butler worker {}: running tasks in {slots} {}; stop with Ctrl-C or SIGTERM",
        options.name,
        plural(slots, "slot", "slots")
    );
    serve(backends, options).await
}

/// Runs an engine until a stop signal, then stops it; attempts still running are killed and
/// left to their leases.
async fn serve(backends: &Backends, options: EngineOptions) -> Result<()> {
    let stop = stop_signal()?;
    // Alerts and reports (docs/alerts.md): none for a worker, or without a notify config.
    let alerts = butler_providers::notify::start_watcher(backends.store.clone(), &options, None)
        .await
        .context("cannot start alerts and reports")?;
    let mut engine = start(backends, options);
    // A failed part has already been joined, so the engine is not stopped in order then: the
    // rest ends with the process.
    engine.run_until(stop).await.context("the engine stopped")?;
    eprintln!("Stopping: attempts still running are put back when their leases end");
    engine.stop().await?;
    if let Some(alerts) = alerts {
        alerts.stop().await;
    }
    Ok(())
}

/// `--name` of a worker, checked: something to read in a table.
fn worker_name(name: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty() {
        bail!(
            "--name is empty; give the worker a name such as gpu-1, or leave --name out for HOST/PID"
        );
    }
    if name.chars().any(char::is_control) {
        bail!("--name {name:?} contains control characters; give a printable name such as gpu-1");
    }
    Ok(name.to_owned())
}

fn start(backends: &Backends, options: EngineOptions) -> Engine {
    Engine::start(
        backends.store.clone(),
        backends.queue.clone(),
        Arc::new(LocalExecutor::new()),
        options,
    )
}

/// Runs an embedded engine until every run in `runs` has finished, then prints a summary and
/// fails unless every one completed.
async fn run_to_the_end(
    settings: &Settings,
    backends: &Backends,
    runs: &[Id],
    slots: usize,
) -> Result<()> {
    let stop = stop_signal()?;
    let started = Instant::now();
    let mut options = settings.engine_options(slots)?;
    // Drive only these runs: others are left to the processes that launched them.
    options.only_runs = Some(Arc::new(runs.iter().copied().collect()));
    let mut engine = start(backends, options);
    let progress = Progress::new(runs.len(), engine.stats().clone());
    let waited = tokio::select! {
        done = engine.wait_for(runs, |done| progress.update(done)) => Some(done),
        () = stop => None,
    };
    let finished = progress.finish();
    let done = match waited {
        Some(Ok(done)) => done,
        Some(Err(err)) => {
            return Err(err).context(
                "the engine stopped; the runs are safe in the store: resume with `butler wait`",
            );
        }
        None => {
            engine.stop().await?;
            bail!(
                "interrupted with {} of {} runs finished; the rest are safe in the store: \
                 resume with `butler wait`",
                finished,
                runs.len()
            );
        }
    };
    engine.stop().await?;
    summarize(&done, started.elapsed())
}

/// Prints one line per status and fails naming the runs that did not complete.
fn summarize(done: &[RunFinished], took: Duration) -> Result<()> {
    let mut counts: BTreeMap<RunStatus, usize> = BTreeMap::new();
    for run in done {
        *counts.entry(run.status).or_default() += 1;
    }
    eprintln!(
        "Finished {} in {}",
        runs_noun(done.len()),
        output::duration(took)
    );
    for (status, count) in &counts {
        eprintln!("  {status}: {count}");
    }
    let mut failed: Vec<&RunFinished> = done
        .iter()
        .filter(|run| run.status != RunStatus::Completed)
        .collect();
    failed.sort_by_key(|run| run.run_id);
    let Some(first) = failed.first().map(|run| run.run_id) else {
        return Ok(());
    };
    let mut named: Vec<String> = failed
        .iter()
        .take(NAMED_FAILURES)
        .map(|run| format!("run {} ({})", run.run_id, run.status))
        .collect();
    if failed.len() > NAMED_FAILURES {
        named.push(format!("and {} more", failed.len() - NAMED_FAILURES));
    }
    bail!(
        "{} of {} did not complete: {}; see why with `butler run-status -r {first}`",
        failed.len(),
        runs_noun(done.len()),
        named.join(", ")
    )
}

/// Resolves on SIGINT, SIGTERM or SIGHUP, so an interrupted command stops its attempts instead
/// of leaving them running.
fn stop_signal() -> Result<impl Future<Output = ()>> {
    let listen = |kind: SignalKind, name: &str| {
        signal(kind).with_context(|| format!("cannot listen for {name}"))
    };
    let mut interrupt = listen(SignalKind::interrupt(), "SIGINT")?;
    let mut terminate = listen(SignalKind::terminate(), "SIGTERM")?;
    let mut hangup = listen(SignalKind::hangup(), "SIGHUP")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
            _ = hangup.recv() => {}
        }
    })
}

/// A bar on stderr while runs execute: runs done of all, how many failed, tasks per second.
/// Hidden when stderr is not a terminal.
struct Progress {
    bar: ProgressBar,
    failed: Arc<AtomicU64>,
    ticker: Option<JoinHandle<()>>,
}

impl Progress {
    fn new(total: usize, stats: Arc<Stats>) -> Progress {
        let failed = Arc::new(AtomicU64::new(0));
        if !io::stderr().is_terminal() {
            return Progress {
                bar: ProgressBar::hidden(),
                failed,
                ticker: None,
            };
        }
        let bar = ProgressBar::new(total as u64);
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} {bar:30} {pos}/{len} runs  {msg}  {elapsed}")
        {
            bar.set_style(style);
        }
        bar.set_message("0 failed  0.0 tasks/s");
        bar.enable_steady_tick(Duration::from_millis(120));
        let ticker = tokio::spawn(show_rates(bar.clone(), failed.clone(), stats));
        Progress {
            bar,
            failed,
            ticker: Some(ticker),
        }
    }

    fn update(&self, done: &[RunFinished]) {
        let failed = done
            .iter()
            .filter(|run| run.status != RunStatus::Completed)
            .count();
        self.failed.store(failed as u64, Ordering::Relaxed);
        self.bar.set_position(done.len() as u64);
    }

    /// Clears the bar and returns how many runs had finished.
    fn finish(self) -> u64 {
        if let Some(ticker) = self.ticker {
            ticker.abort();
        }
        let position = self.bar.position();
        self.bar.finish_and_clear();
        position
    }
}

/// Updates the bar's message twice a second with the failures and the task rate of the last
/// few seconds.
async fn show_rates(bar: ProgressBar, failed: Arc<AtomicU64>, stats: Arc<Stats>) {
    const WINDOW: usize = 10;
    let mut samples: VecDeque<(Instant, u64)> = VecDeque::with_capacity(WINDOW + 1);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let now = Instant::now();
        let tasks = stats.tasks_finished.load(Ordering::Relaxed);
        samples.push_back((now, tasks));
        if samples.len() > WINDOW {
            samples.pop_front();
        }
        let rate = match samples.front() {
            Some((then, before)) if now > *then => {
                tasks.saturating_sub(*before) as f64 / (now - *then).as_secs_f64()
            }
            _ => 0.0,
        };
        bar.set_message(format!(
            "{} failed  {rate:.1} tasks/s",
            failed.load(Ordering::Relaxed)
        ));
    }
}

fn runs_noun(count: usize) -> String {
    format!("{count} {}", plural(count, "run", "runs"))
}

fn plural(count: usize, one: &'static str, many: &'static str) -> &'static str {
    if count == 1 { one } else { many }
}
