//! One module per command group; each reads its arguments, calls the tracker and prints.

mod analysis;
mod config;
mod launch;
mod runs;
mod workflow;

use std::io::{self, Write};

use anyhow::{Context, Result};
use tracing_subscriber::EnvFilter;

use crate::opt::{Command, Opt};
use crate::settings::Settings;

/// Runs the command line `opt` to completion.
pub fn run(opt: Opt) -> Result<()> {
    let filter = EnvFilter::try_from_env("BUTLER_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    // A second initialisation can only fail in tests that call `run` twice; logging stays as set.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .try_init();
    let settings = Settings::new(opt.db)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start Butler's async runtime")?;
    runtime.block_on(dispatch(&settings, opt.command))
}

async fn dispatch(settings: &Settings, command: Command) -> Result<()> {
    let tracker = settings.tracker().await?;
    let mut out = io::stdout().lock();
    match command {
        Command::CreateWorkflow(args) => {
            workflow::create(&tracker, settings, args, &mut out).await?
        }
        Command::ListWorkflows(args) => workflow::list(&tracker, args.json, &mut out).await?,
        Command::CreateAnalysis(args) => analysis::create(&tracker, args, &mut out).await?,
        Command::ListAnalyses(args) => analysis::list(&tracker, args.json, &mut out).await?,
        Command::LaunchWorkflow(args) => launch::launch(&tracker, args, &mut out).await?,
        Command::ListRuns(args) => runs::list(&tracker, args, &mut out).await?,
        Command::GetRunCount(args) => runs::count(&tracker, args, &mut out).await?,
        Command::UpdateConfig(args) => config::update(&tracker, args, &mut out).await?,
        Command::PrintEffectiveConfig(args) => config::effective(&tracker, args, &mut out).await?,
        Command::PrintConfig(args) => config::print(&tracker, args, &mut out).await?,
    }
    out.flush()?;
    Ok(())
}
