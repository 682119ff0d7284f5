//! The scenarios and what they share.

mod broker;
mod commits;
mod cpu;
mod engine;
mod launch;
mod list;
mod server;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use butler_core::tracker::Tracker;
use butler_providers::sqlite::{Durability, SqliteConfig, SqliteStore};
use clap::{Parser, ValueEnum};
use serde_json::json;

use crate::report::Figure;

/// Butler's benchmarks: each scenario reports its figures beside the physical limit measured in
/// the same run.
#[derive(Debug, Parser)]
#[command(name = "butler-bench", version)]
pub struct Args {
    /// The scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Print one JSON object per figure instead of a table.
    #[arg(long)]
    pub json: bool,
    /// What a commit survives: `full` (power loss) or `normal` (process crash).
    #[arg(long, value_enum, default_value = "full")]
    pub durability: DurabilityArg,
    /// Size of the scenario: run configs for `launch`, runs in the store for `list`, tasks for
    /// `noop`, runs for `shell`, `latency` and `memory`.
    #[arg(long)]
    pub size: Option<usize>,
    /// Run `noop`, `latency`, `shell` or `memory` on this PostgreSQL store (a schema of its own
    /// is made and dropped) instead of a SQLite file.
    #[arg(long, value_name = "postgres://…")]
    pub db: Option<String>,
    /// Run them with this RabbitMQ queue (under a prefix of its own) instead of the store's.
    #[arg(long, value_name = "amqp://…")]
    pub queue: Option<String>,
    /// Run the scenario this many times, each in a fresh process, one after the other, and
    /// print each figure's median with the lowest and highest value.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
}

impl Args {
    /// The arguments that run the same scenario once, printing JSON.
    pub fn once_as_json(&self) -> Vec<String> {
        let name = |value: Option<clap::builder::PossibleValue>| {
            value.map(|v| v.get_name().to_owned()).unwrap_or_default()
        };
        let mut args = vec![
            name(self.scenario.to_possible_value()),
            "--json".to_owned(),
            "--durability".to_owned(),
            name(self.durability.to_possible_value()),
        ];
        for (flag, value) in [
            ("--size", self.size.map(|n| n.to_string())),
            ("--db", self.db.clone()),
            ("--queue", self.queue.clone()),
        ] {
            if let Some(value) = value {
                args.extend([flag.to_owned(), value]);
            }
        }
        args
    }
}

/// Benchmark scenarios.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Scenario {
    /// Launch 10,000 run-config files into SQLite.
    Launch,
    /// List runs filtered by analysis and status among 1,000,000 runs.
    List,
    /// 10,000 no-op tasks through the SQLite queue and store with 2 slots.
    Noop,
    /// 1,000 runs of a 3-task chain of `sh -c true` with 2 slots, beside the raw spawn time.
    Shell,
    /// Ready-to-started latency of a task at a light load (20 tasks/s).
    Latency,
    /// Process memory with 100,000 runs in flight.
    Memory,
    /// HTTP answer times of `butler server` (runs API, runs page, /metrics) with 1,000,000
    /// runs in the store, 10,000 of them active, measured with `wrk`.
    Server,
}

/// `--durability`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DurabilityArg {
    /// `PRAGMA synchronous=FULL`.
    Full,
    /// `PRAGMA synchronous=NORMAL`.
    Normal,
}

pub async fn run(args: &Args) -> anyhow::Result<Vec<Figure>> {
    match args.scenario {
        Scenario::Launch => launch::run(args).await,
        Scenario::List => list::run(args).await,
        Scenario::Noop => engine::noop(args).await,
        Scenario::Shell => engine::shell(args).await,
        Scenario::Latency => engine::latency(args).await,
        Scenario::Memory => engine::memory(args).await,
        Scenario::Server => server::run(args).await,
    }
}

/// A fresh SQLite store in `dir` with the chosen durability.
pub async fn open_store(dir: &Path, durability: DurabilityArg) -> anyhow::Result<SqliteStore> {
    let mut config = SqliteConfig::new(dir.join("butler.db"));
    config.durability = match durability {
        DurabilityArg::Full => Durability::Full,
        DurabilityArg::Normal => Durability::Normal,
    };
    Ok(SqliteStore::open(&config).await?)
}

/// A tracker over `store` with a three-task workflow and one analysis; returns their ids.
pub async fn fixture(store: &SqliteStore) -> anyhow::Result<(Tracker, i64, i64)> {
    let tracker = Tracker::new(Arc::new(store.clone()));
    let definition = butler_core::definition::Definition::parse(
        r#"
[[tasks]]
id = "align"
run = "echo align {{ config.sample }} with {{ config.tools.aligner.threads }} threads"
[[tasks]]
id = "call"
needs = ["align"]
run = "echo call {{ config.sample }}"
[[tasks]]
id = "report"
needs = ["call"]
run = "echo report {{ config.sample }}"
"#,
        butler_core::definition::Format::Toml,
        "bench.toml",
    )?;
    let config =
        json!({"tools": {"aligner": {"threads": 4, "min_seed": 19}}, "reference": "hg38.fa"});
    let workflow = tracker
        .create_workflow("bench", "1", config, definition)
        .await?;
    let analysis = tracker
        .create_analysis(
            "bench",
            chrono::Utc::now().date_naive(),
            json!({"tools": {"aligner": {"threads": 8}}}),
        )
        .await?;
    Ok((tracker, workflow.id, analysis.id))
}

/// A per-sample run config, as pipelines write them.
pub fn sample_config(i: usize) -> serde_json::Value {
    json!({
        "sample": format!("S{i:07}"),
        "fastq": [format!("/data/S{i:07}_R1.fastq.gz"), format!("/data/S{i:07}_R2.fastq.gz")],
        "tools": {"aligner": {"min_seed": 17 + (i % 5)}},
    })
}

/// How many analyses [`seed_runs`] spreads its runs over.
pub const ANALYSES: usize = 100;

/// Launches `total` runs of `workflow` over [`ANALYSES`] analyses (the first is `first`) and
/// gives them a realistic mix of states: one in `active_every` still in progress, one in ten
/// failed, the rest completed. Returns the analyses' ids.
pub async fn seed_runs(
    store: &SqliteStore,
    tracker: &Tracker,
    workflow: i64,
    first: i64,
    total: usize,
    active_every: i64,
) -> anyhow::Result<Vec<i64>> {
    eprintln!("preparing {total} runs in {ANALYSES} analyses…");
    let per_analysis = total / ANALYSES;
    let mut analyses = vec![first];
    for i in 1..ANALYSES {
        let a = tracker
            .create_analysis(
                &format!("bench-{i}"),
                chrono::Utc::now().date_naive(),
                serde_json::json!({}),
            )
            .await?;
        analyses.push(a.id);
    }
    for (n, analysis) in analyses.iter().enumerate() {
        let sources = (0..per_analysis)
            .map(|i| butler_core::tracker::RunSource {
                source: None,
                config: sample_config(n * per_analysis + i),
            })
            .collect();
        tracker.launch(workflow, *analysis, sources, false).await?;
    }
    sqlx::query(
        "UPDATE runs SET status = CASE WHEN id % ?1 = 1 THEN 'in-progress' \
         WHEN id % 10 = 0 THEN 'error' ELSE 'completed' END",
    )
    .bind(active_every)
    .execute(store.pool())
    .await?;
    sqlx::query("ANALYZE").execute(store.pool()).await?;
    Ok(analyses)
}

/// Median of `samples`.
pub fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// Seconds since `start`.
pub fn secs(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}
