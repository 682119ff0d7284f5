//! Engine scenarios: `noop`, `shell`, `latency` and `memory`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use butler_core::DynRunStore;
use butler_core::definition::{Definition, Format};
use butler_core::engine::{DEFAULT_TASK_QUEUE, Engine, EngineOptions};
use butler_core::executor::{
    Attempt, CancellationToken, DynExecutor, Executor, Finished, Outcome, attempt_dir,
};
use butler_core::model::{Id, RunFilter, RunStatus};
use butler_core::queue::DynQueue;
use butler_core::tracker::{RunSource, Tracker};
use butler_providers::amqp::AmqpQueue;
use butler_providers::local::LocalExecutor;
use butler_providers::postgres::{PgQueue, PgStore};
use butler_providers::sqlite::SqliteQueue;
use serde_json::json;

use super::broker::{Layout, messages_per_second};
use super::{Args, commits, cpu, median, open_store, secs};
use crate::report::Figure;

/// Completes every attempt at once, so only Butler's own work is measured; remembers when each
/// attempt started and ended.
#[derive(Debug, Default)]
struct NoopExecutor {
    marks: Mutex<HashMap<(Id, String), (Instant, Instant)>>,
}

#[async_trait]
impl Executor for NoopExecutor {
    async fn execute(
        &self,
        attempt: Attempt,
        _cancel: CancellationToken,
    ) -> butler_core::Result<Finished> {
        let now = Instant::now();
        if let Ok(mut marks) = self.marks.lock() {
            marks.insert((attempt.run_id, attempt.task_id), (now, Instant::now()));
        }
        Ok(Finished {
            outcome: Outcome::Exited { code: 0 },
            log_path: attempt.workdir,
            duration: Duration::ZERO,
        })
    }
}

/// The database a scenario's commits go to, for the commit probe beside the figures.
enum Database {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// What a scenario made outside its temporary directory, to remove when it ends.
struct Made {
    database: Database,
    /// The RabbitMQ queue of `--queue`, whose queues stay on the broker until deleted.
    amqp: Option<AmqpQueue>,
}

struct Setup {
    _dir: tempfile::TempDir,
    home: std::path::PathBuf,
    store: Arc<DynRunStore>,
    queue: Arc<DynQueue>,
    made: Made,
    tracker: Tracker,
    workflow: Id,
    analysis: Id,
}

/// The store and queue of `--db` and `--queue`: by default a SQLite file in `dir` holding both.
/// A PostgreSQL URL gets a schema of its own and a RabbitMQ URL a prefix of its own, so a run
/// of the benchmark never meets another's data.
async fn backends(
    args: &Args,
    dir: &std::path::Path,
) -> anyhow::Result<(Arc<DynRunStore>, Arc<DynQueue>, Made)> {
    let tag = format!("bench_{}", std::process::id());
    let (store, own_queue, database): (Arc<DynRunStore>, Arc<DynQueue>, Database) =
        match args.db.as_deref() {
            Some(url) if url.starts_with("postgres") => {
                let joiner = if url.contains('?') { '&' } else { '?' };
                let durability = match args.durability {
                    super::DurabilityArg::Full => "full",
                    super::DurabilityArg::Normal => "normal",
                };
                let url = format!("{url}{joiner}schema={tag}&durability={durability}");
                let store = PgStore::connect(&url).await?;
                let queue = PgQueue::new(store.pool().clone());
                let pool = store.pool().clone();
                (Arc::new(store), Arc::new(queue), Database::Postgres(pool))
            }
            Some(other) => anyhow::bail!("--db takes a postgres:// URL; got {other:?}"),
            None => {
                let store = open_store(dir, args.durability).await?;
                let queue = SqliteQueue::new(store.pool().clone());
                let pool = store.pool().clone();
                (Arc::new(store), Arc::new(queue), Database::Sqlite(pool))
            }
        };
    let (queue, amqp): (Arc<DynQueue>, _) = match args.queue.as_deref() {
        None => (own_queue, None),
        Some(url) if url.starts_with("amqp") => {
            let joiner = if url.contains('?') { '&' } else { '?' };
            let amqp = AmqpQueue::connect(&format!("{url}{joiner}prefix={tag}")).await?;
            (Arc::new(amqp.clone()), Some(amqp))
        }
        Some(other) => anyhow::bail!("--queue takes an amqp:// URL; got {other:?}"),
    };
    Ok((store, queue, Made { database, amqp }))
}

impl Setup {
    /// Drops the PostgreSQL schema and deletes the RabbitMQ queues the scenario made.
    async fn clean_up(self) -> anyhow::Result<()> {
        if let Some(amqp) = &self.made.amqp {
            amqp.delete_queue(DEFAULT_TASK_QUEUE).await?;
            amqp.close().await?;
        }
        if let Database::Postgres(pool) = &self.made.database {
            let schema: String = sqlx::query_scalar("SELECT current_schema()")
                .fetch_one(pool)
                .await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA \"{schema}\" CASCADE"
            )))
            .execute(pool)
            .await?;
        }
        Ok(())
    }
}

async fn setup(args: &Args, definition: &str) -> anyhow::Result<Setup> {
    let dir = tempfile::tempdir()?;
    let (store, queue, made) = backends(args, dir.path()).await?;
    let tracker = Tracker::new(store.clone());
    let definition = Definition::parse(definition, Format::Toml, "bench.toml")?;
    let workflow = tracker
        .create_workflow("bench", "1", json!({}), definition)
        .await?;
    let analysis = tracker
        .create_analysis("bench", chrono::Utc::now().date_naive(), json!({}))
        .await?;
    Ok(Setup {
        home: dir.path().to_path_buf(),
        _dir: dir,
        store,
        queue,
        made,
        tracker,
        workflow: workflow.id,
        analysis: analysis.id,
    })
}

async fn launch(s: &Setup, first: usize, count: usize) -> anyhow::Result<Vec<Id>> {
    let sources = (first..first + count)
        .map(|i| RunSource {
            source: None,
            config: json!({ "n": i }),
        })
        .collect();
    Ok(s.tracker
        .launch(s.workflow, s.analysis, sources, false)
        .await?
        .into_iter()
        .map(|r| r.id)
        .collect())
}

fn start(s: &Setup, executor: Arc<DynExecutor>, slots: usize) -> Engine {
    let options = EngineOptions::new(s.home.clone(), slots);
    Engine::start(s.store.clone(), s.queue.clone(), executor, options)
}

/// Runs `runs` to completion with `slots` worker slots; the seconds it took. `apart` puts the
/// scheduler and the slots in two engines, as `butler scheduler` and `butler worker` run them,
/// so every task goes through the queue.
async fn run_all(
    s: &Setup,
    executor: Arc<DynExecutor>,
    slots: usize,
    runs: &[Id],
    apart: bool,
) -> anyhow::Result<f64> {
    let begin = Instant::now();
    let (mut engine, workers) = if apart {
        let mut options = EngineOptions::new(s.home.clone(), slots);
        options.schedule = false;
        let workers = Engine::start(s.store.clone(), s.queue.clone(), executor.clone(), options);
        (start(s, executor, 0), Some(workers))
    } else {
        (start(s, executor, slots), None)
    };
    let finished = engine.wait_for(runs, |_| {}).await?;
    let took = secs(begin);
    engine.stop().await?;
    if let Some(workers) = workers {
        workers.stop().await?;
    }
    all_completed(&finished)?;
    Ok(took)
}

/// Fails unless every run completed.
fn all_completed(finished: &[butler_core::engine::RunFinished]) -> anyhow::Result<()> {
    let failed = finished
        .iter()
        .filter(|f| f.status != RunStatus::Completed)
        .count();
    anyhow::ensure!(failed == 0, "{failed} runs did not complete");
    Ok(())
}

/// Single-row commits per second to the scenario's database at its durability: the unit cost a
/// task would pay without group commit.
async fn commits_per_second(s: &Setup) -> anyhow::Result<f64> {
    let begin = Instant::now();
    let mut n: i64 = 0;
    match &s.made.database {
        Database::Sqlite(pool) => {
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS bench_probe (id INTEGER PRIMARY KEY, v INTEGER)",
            )
            .execute(pool)
            .await?;
            while begin.elapsed() < Duration::from_secs(1) {
                sqlx::query("INSERT INTO bench_probe (v) VALUES (?)")
                    .bind(n)
                    .execute(pool)
                    .await?;
                n += 1;
            }
        }
        Database::Postgres(pool) => {
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS bench_probe (id BIGSERIAL PRIMARY KEY, v BIGINT)",
            )
            .execute(pool)
            .await?;
            while begin.elapsed() < Duration::from_secs(1) {
                sqlx::query("INSERT INTO bench_probe (v) VALUES ($1)")
                    .bind(n)
                    .execute(pool)
                    .await?;
                n += 1;
            }
        }
    }
    Ok(n as f64 / secs(begin))
}

pub async fn noop(args: &Args) -> anyhow::Result<Vec<Figure>> {
    let count = args.size.unwrap_or(10_000);
    let s = setup(args, "[[tasks]]\nid = \"noop\"\nrun = \"true\"\n").await?;
    let runs = launch(&s, 0, count).await?;
    let recorded = commits::record()?;
    let busy_before = recorded.writer_busy();
    let took = run_all(&s, Arc::new(NoopExecutor::default()), 2, &runs, false).await?;
    let writer_busy = (recorded.writer_busy() - busy_before).as_secs_f64() / took;
    let runs = launch(&s, count, count).await?;
    let servers = local_servers(args);
    let server_cpu = |servers: &[(&str, &str)]| -> Vec<Option<std::time::Duration>> {
        servers
            .iter()
            .map(|(command, _)| cpu::processes_named(command))
            .collect()
    };
    let (butler_before, servers_before) = (cpu::this_process(), server_cpu(&servers));
    let took_apart = run_all(&s, Arc::new(NoopExecutor::default()), 2, &runs, true).await?;
    let butler_apart = cpu::this_process() - butler_before;
    let servers_apart: Vec<_> = server_cpu(&servers)
        .into_iter()
        .zip(servers_before)
        // Less than before means a process ended meanwhile, taking its CPU time with it.
        .map(|(after, before)| after?.checked_sub(before?))
        .collect();
    let commits = commits_per_second(&s).await?;
    let dead = s.queue.depth(DEFAULT_TASK_QUEUE).await?.dead;
    let backend = backend_name(args);
    // The broker's limit, then the same with Butler's layout, each with the broker's own cost
    // per message, beside its cost per task apart.
    let (broker, butler_layout) = match &s.made.amqp {
        Some(amqp) => (
            Some(broker_probe(amqp, count, Layout::Plain).await?),
            Some(broker_probe(amqp, count, Layout::Butler).await?),
        ),
        None => (None, None),
    };
    s.clean_up().await?;
    let in_memory = noop_in_memory(count).await?;
    let apart_limit = match broker {
        Some((rate, _)) => (
            rate,
            "persistent messages/s through one queue of the same broker (confirmed publish, \
             consume, ack)",
        ),
        None => (commits, "single-row commits/s to the same database"),
    };
    let mut figures = vec![
        Figure::new(
            "noop",
            "the same on the in-memory store and queue",
            in_memory,
            "tasks/s",
        ),
        Figure::new(
            "noop",
            "messages dead-lettered (must be 0)",
            dead as f64,
            "messages",
        ),
        Figure::new(
            "noop",
            format!("{count} no-op tasks (one-task runs), 2 slots, {backend}"),
            count as f64 / took,
            "tasks/s",
        )
        .limit(commits, "single-row commits/s to the same database"),
        Figure::new(
            "noop",
            format!(
                "the same with scheduler and workers apart, every task through the queue, \
                 {backend}"
            ),
            count as f64 / took_apart,
            "tasks/s",
        )
        .limit(apart_limit.0, apart_limit.1),
    ];
    if args.db.is_none() {
        // The SQLite writer applies every change in order: near 100%, it is what limits.
        figures.push(Figure::new(
            "noop",
            "in one process: share of the run the SQLite writer was busy",
            100.0 * writer_busy,
            "%",
        ));
    }
    // Where the apart run's CPU went, per task, so that a rate short of its target can be
    // told from the cores it would need.
    let per_task = |cpu: std::time::Duration| cpu.as_secs_f64() * 1e6 / count as f64;
    figures.push(Figure::new(
        "noop",
        "apart: Butler's process CPU per task (scheduler and workers)",
        per_task(butler_apart),
        "us",
    ));
    let mut used = butler_apart;
    for ((_, server), cpu) in servers.iter().zip(servers_apart) {
        let Some(cpu) = cpu else { continue };
        used += cpu;
        figures.push(Figure::new(
            "noop",
            format!("apart: {server} CPU per task"),
            per_task(cpu),
            "us",
        ));
    }
    if let Some((_, Some(micros))) = broker {
        figures.push(Figure::new(
            "noop",
            "the broker's limit run: the local RabbitMQ broker's CPU per message",
            micros,
            "us",
        ));
    }
    if let Some((rate, micros)) = butler_layout {
        figures.push(Figure::new(
            "noop",
            "the broker's limit run with Butler's layout (21 priority levels, two headers)",
            rate,
            "messages/s",
        ));
        if let Some(micros) = micros {
            figures.push(Figure::new(
                "noop",
                "the same: the local RabbitMQ broker's CPU per message",
                micros,
                "us",
            ));
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    figures.push(Figure::new(
        "noop",
        format!("apart: share of the {cores} cores these processes used"),
        100.0 * used.as_secs_f64() / (took_apart * cores as f64),
        "%",
    ));
    Ok(figures)
}

/// The broker's messages per second through a scratch queue laid out as `layout`, and its own
/// CPU per message when it runs on this machine.
async fn broker_probe(
    amqp: &AmqpQueue,
    count: usize,
    layout: Layout,
) -> anyhow::Result<(f64, Option<f64>)> {
    let before = cpu::processes_named("beam.smp");
    let queue = format!("{}.probe", amqp.config().prefix);
    let rate = messages_per_second(&amqp.config().url, &queue, count, layout).await?;
    let per_message = before
        .zip(cpu::processes_named("beam.smp"))
        .and_then(|(before, after)| after.checked_sub(before))
        .map(|cpu| cpu.as_secs_f64() * 1e6 / count as f64);
    Ok((rate, per_message))
}

/// The servers a scenario on `args` talks to that may run on this machine, by command name,
/// with how figures name them.
fn local_servers(args: &Args) -> Vec<(&'static str, &'static str)> {
    let mut servers = Vec::new();
    if args.db.is_some() {
        servers.push(("postgres", "the local PostgreSQL server's"));
    }
    if args.queue.is_some() {
        servers.push(("beam.smp", "the local RabbitMQ broker's"));
    }
    servers
}

/// The store, queue and durability a scenario ran on, for its figures.
fn backend_name(args: &Args) -> String {
    let store = if args.db.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    let queue = if args.queue.is_some() {
        "RabbitMQ"
    } else {
        store
    };
    let durability = match args.durability {
        super::DurabilityArg::Full => "full",
        super::DurabilityArg::Normal => "normal",
    };
    format!("store {store}, queue {queue}, durability {durability}")
}

pub async fn shell(args: &Args) -> anyhow::Result<Vec<Figure>> {
    let count = args.size.unwrap_or(1_000);
    let s = setup(
        args,
        "[[tasks]]\nid = \"a\"\nrun = \"true\"\n[[tasks]]\nid = \"b\"\nneeds = [\"a\"]\nrun = \"true\"\n\
         [[tasks]]\nid = \"c\"\nneeds = [\"b\"]\nrun = \"true\"\n",
    )
    .await?;
    let tasks = count * 3;
    // The floor: the same processes spawned directly, two at a time, the shell named by its
    // path as the executor names it.
    let cpu = cpu::this_process();
    let floor = two_at_a_time(tasks, |_| async {
        tokio::process::Command::new("/bin/sh")
            .args(["-c", "true"])
            .status()
            .await?;
        anyhow::Ok(())
    })
    .await?;
    let floor_cpu = cpu::this_process() - cpu;
    // The executor alone: the same attempts, each with its directory, config, log and process
    // group, but no store, queue or scheduler.
    let executor = Arc::new(LocalExecutor::new());
    let home = s.home.join("executor-alone");
    let cpu = cpu::this_process();
    let shared = executor.clone();
    let alone = two_at_a_time(tasks, move |n| {
        let executor = shared.clone();
        let run_id = Id::try_from(n).unwrap_or(Id::MAX);
        let attempt = Attempt {
            run_id,
            task_id: "a".to_owned(),
            try_number: 1,
            command: "true".to_owned(),
            env: Default::default(),
            workdir: attempt_dir(&home, run_id, "a", 1),
            config: json!({}).into(),
            timeout: None,
        };
        async move {
            executor.execute(attempt, CancellationToken::new()).await?;
            anyhow::Ok(())
        }
    })
    .await?;
    let alone_cpu = cpu::this_process() - cpu;
    let runs = launch(&s, 0, count).await?;
    let cpu = cpu::this_process();
    let took = run_all(&s, executor, 2, &runs, false).await?;
    let engine_cpu = cpu::this_process() - cpu;
    s.clean_up().await?;
    let per_task = |cpu: Duration| cpu.as_secs_f64() * 1e6 / tasks as f64;
    Ok(vec![
        Figure::new(
            "shell",
            format!("{count} runs of a 3-task chain of `sh -c true`, 2 slots"),
            took,
            "s",
        )
        .limit(
            floor,
            format!("spawn {tasks} `sh -c true` directly, two at a time"),
        ),
        Figure::new("shell", "makespan / spawn floor", took / floor, "x"),
        Figure::new(
            "shell",
            format!("the local executor alone: {tasks} attempts, two at a time"),
            alone,
            "s",
        )
        .limit(floor, "the spawn floor"),
        Figure::new(
            "shell",
            "Butler's process CPU per task, running the runs (outside the `sh`s)",
            per_task(engine_cpu),
            "us",
        )
        .limit(per_task(floor_cpu), "the same, spawning directly"),
        Figure::new(
            "shell",
            "the same, the local executor alone",
            per_task(alone_cpu),
            "us",
        )
        .limit(per_task(floor_cpu), "the same, spawning directly"),
    ])
}

/// Runs `job(0)` … `job(count - 1)`, two at a time; returns the seconds they took.
async fn two_at_a_time<F, J>(count: usize, job: J) -> anyhow::Result<f64>
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    J: Fn(usize) -> F + Send + Sync + 'static,
{
    let begin = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let job = Arc::new(job);
    let mut lanes = Vec::new();
    for _ in 0..2 {
        let (next, job) = (next.clone(), job.clone());
        lanes.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if n >= count {
                    return anyhow::Ok(());
                }
                job(n).await?;
            }
        }));
    }
    for lane in lanes {
        lane.await??;
    }
    Ok(secs(begin))
}

pub async fn latency(args: &Args) -> anyhow::Result<Vec<Figure>> {
    let count = args.size.unwrap_or(200);
    let s = setup(
        args,
        "[[tasks]]\nid = \"a\"\nrun = \"true\"\n[[tasks]]\nid = \"b\"\nneeds = [\"a\"]\nrun = \"true\"\n",
    )
    .await?;
    let commits = commits::record()?;
    let commits_before = commits.count();
    let executor = Arc::new(NoopExecutor::default());
    let mut engine = start(&s, executor.clone(), 2);
    let mut runs = Vec::new();
    let mut launched = HashMap::new();
    // A light load: one run every 50 ms, 20 tasks/s.
    for i in 0..count {
        let ids = launch(&s, i, 1).await?;
        let committed = Instant::now();
        launched.extend(ids.iter().map(|id| (*id, committed)));
        runs.extend(ids);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    engine.wait_for(&runs, |_| {}).await?;
    engine.stop().await?;
    let marks = executor
        .marks
        .lock()
        .map_err(|_| anyhow::anyhow!("marks poisoned"))?
        .clone();
    let committed = commits.count() - commits_before;
    let mut samples = Vec::new();
    let mut first = Vec::new();
    for run in &runs {
        let (Some((a_start, a_end)), Some((b_start, _))) = (
            marks.get(&(*run, "a".to_owned())),
            marks.get(&(*run, "b".to_owned())),
        ) else {
            anyhow::bail!("run {run} has no marks");
        };
        samples.push(b_start.duration_since(*a_end));
        first.push(a_start.saturating_duration_since(launched[run]));
    }
    let (p50, p99) = p50_p99(samples);
    let (first_p50, first_p99) = p50_p99(first);
    let commit = 1000.0 / commits_per_second(&s).await?;
    let backend = backend_name(args);
    s.clean_up().await?;
    Ok(vec![
        Figure::new(
            "latency",
            format!("ready to started p50, {backend}"),
            ms(p50),
            "ms",
        )
        .limit(commit, "one single-row commit to the same database"),
        Figure::new(
            "latency",
            format!("ready to started p99, {backend}"),
            ms(p99),
            "ms",
        )
        .limit(commit, "one single-row commit to the same database"),
        Figure::new(
            "latency",
            "launched to first task started p50 (the launch's commit to the start)",
            ms(first_p50),
            "ms",
        ),
        Figure::new(
            "latency",
            "launched to first task started p99",
            ms(first_p99),
            "ms",
        ),
        Figure::new(
            "latency",
            "store commits per task, launches included (each an fsync with `full`)",
            committed as f64 / (2 * runs.len()) as f64,
            "commits",
        ),
    ])
}

/// The median and the 99th percentile of `samples`.
fn p50_p99(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort_unstable();
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
    (median(samples), p99)
}

pub async fn memory(args: &Args) -> anyhow::Result<Vec<Figure>> {
    let count = args.size.unwrap_or(100_000);
    let s = setup(args, "[[tasks]]\nid = \"a\"\nrun = \"true\"\n[[tasks]]\nid = \"b\"\nneeds = [\"a\"]\nrun = \"true\"\n").await?;
    launch(&s, 0, count).await?;
    let before = rss_mb()?;
    // A scheduler with no worker: every run is taken and its first task queued, none finishes.
    let engine = start(&s, Arc::new(NoopExecutor::default()), 0);
    let begin = Instant::now();
    loop {
        let ready = s
            .store
            .count_runs(&butler_core::model::RunFilter {
                analysis_id: Some(s.analysis),
                ..Default::default()
            })
            .await?
            .get(&RunStatus::Ready)
            .copied()
            .unwrap_or(0);
        if ready == 0 {
            break;
        }
        anyhow::ensure!(
            begin.elapsed() < Duration::from_secs(600),
            "runs were not all taken"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_mb()?;
    let in_flight = s
        .store
        .list_runs(&RunFilter {
            analysis_id: Some(s.analysis),
            status: Some(RunStatus::Scheduled),
            ..RunFilter::default()
        })
        .await?
        .len()
        + s.store
            .list_runs(&RunFilter {
                analysis_id: Some(s.analysis),
                status: Some(RunStatus::InProgress),
                ..RunFilter::default()
            })
            .await?
            .len();
    engine.stop().await?;
    s.clean_up().await?;
    Ok(vec![
        Figure::new(
            "memory",
            format!("process RSS with {in_flight} runs in flight"),
            after,
            "MB",
        )
        .limit(
            before,
            "RSS of the same process before the scheduler started",
        ),
        Figure::new("memory", "time to take every run", secs(begin), "s"),
    ])
}

fn rss_mb() -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/self/status"))?;
    Ok(kb / 1024.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The same no-op tasks through the in-memory store and queue: the engine's own ceiling.
async fn noop_in_memory(count: usize) -> anyhow::Result<f64> {
    let store = Arc::new(butler_core::memory::MemoryRunStore::new());
    let tracker = Tracker::new(store.clone());
    let definition = Definition::parse(
        "[[tasks]]\nid = \"noop\"\nrun = \"true\"\n",
        Format::Toml,
        "b.toml",
    )?;
    let w = tracker
        .create_workflow("bench", "1", json!({}), definition)
        .await?;
    let a = tracker
        .create_analysis("bench", chrono::Utc::now().date_naive(), json!({}))
        .await?;
    let sources = (0..count)
        .map(|i| RunSource {
            source: None,
            config: json!({ "n": i }),
        })
        .collect();
    let runs: Vec<Id> = tracker
        .launch(w.id, a.id, sources, false)
        .await?
        .into_iter()
        .map(|r| r.id)
        .collect();
    let begin = Instant::now();
    let mut engine = Engine::start(
        store,
        Arc::new(butler_core::memory::MemoryQueue::new()),
        Arc::new(NoopExecutor::default()),
        EngineOptions::new(std::env::temp_dir(), 2),
    );
    engine.wait_for(&runs, |_| {}).await?;
    let took = secs(begin);
    engine.stop().await?;
    Ok(count as f64 / took)
}
