//! One module per command group; each reads its arguments, calls the tracker and prints.

mod analysis;
mod config;
mod doctor;
mod engine;
mod launch;
mod runs;
mod status;
mod tokens;
mod workers;
mod workflow;

use std::io::{self, Write};

use anyhow::{Context, Result};
use butler_core::tracker::Tracker;

use crate::opt::{Command, Opt};
use crate::settings::Settings;

/// Runs the command line `opt` to completion.
pub fn run(opt: Opt) -> Result<()> {
    crate::logging::init(matches!(
        opt.command,
        Command::Server(_) | Command::Scheduler | Command::Worker(_)
    ))?;
    let settings = Settings::new(opt.db, opt.queue)?;
    // The engine runs its scheduler, its worker slots and their processes side by side; the
    // other commands make a few store calls in a row.
    let mut runtime = if runs_engine(&opt.command) {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = runtime
        .enable_all()
        .build()
        .context("cannot start Butler's async runtime")?;
    runtime.block_on(dispatch(&settings, opt.command))
}

fn runs_engine(command: &Command) -> bool {
    match command {
        Command::LaunchWorkflow(args) => args.wait,
        Command::Wait(_) | Command::Server(_) | Command::Scheduler | Command::Worker(_) => true,
        _ => false,
    }
}

async fn dispatch(settings: &Settings, command: Command) -> Result<()> {
    let mut out = io::stdout().lock();
    match command {
        // The doctor reports a store it cannot open rather than failing on it.
        Command::Doctor => doctor::run(settings, &mut out).await?,
        command => connected(settings, command, &mut out).await?,
    }
    out.flush()?;
    Ok(())
}

/// Runs a command that needs the store and the queue open.
async fn connected(settings: &Settings, command: Command, out: &mut impl Write) -> Result<()> {
    let backends = settings.connect().await?;
    let tracker = Tracker::new(backends.store.clone());
    match command {
        Command::CreateWorkflow(args) => workflow::create(&tracker, settings, args, out).await?,
        Command::ListWorkflows(args) => workflow::list(&tracker, args.json, out).await?,
        Command::CreateAnalysis(args) => analysis::create(&tracker, args, out).await?,
        Command::ListAnalyses(args) => analysis::list(&tracker, args.json, out).await?,
        Command::LaunchWorkflow(args) => {
            engine::launch_workflow(settings, &backends, &tracker, args, out).await?
        }
        Command::ListRuns(args) => runs::list(&tracker, args, out).await?,
        Command::GetRunCount(args) => runs::count(&tracker, args, out).await?,
        Command::UpdateConfig(args) => config::update(&tracker, args, out).await?,
        Command::PrintEffectiveConfig(args) => config::effective(&tracker, args, out).await?,
        Command::PrintConfig(args) => config::print(&tracker, args, out).await?,
        Command::Wait(args) => engine::wait(settings, &backends, args).await?,
        Command::Server(args) => engine::server(settings, &backends, args).await?,
        Command::Scheduler => engine::scheduler(settings, &backends).await?,
        Command::Worker(args) => engine::worker(settings, &backends, args).await?,
        Command::ListWorkers(args) => workers::list(&tracker, settings, args.json, out).await?,
        Command::Doctor => doctor::run(settings, out).await?,
        Command::RunStatus(args) => status::run_status(&tracker, args, out).await?,
        Command::Logs(args) => status::logs(&tracker, settings.home(), args, out).await?,
        Command::Events(args) => status::events(&tracker, args, out).await?,
        Command::ResetRun(args) => status::reset(&tracker, args, out).await?,
        Command::CancelRun(args) => status::cancel(&tracker, args, out).await?,
        Command::Token(command) => tokens::run(&tracker, command, out).await?,
    }
    Ok(())
}
