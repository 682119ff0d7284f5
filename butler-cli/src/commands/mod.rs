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

/// Runs `command`. The engine's commands open the store and the queue; the others open the
/// store alone, so they work while a broker is down.
async fn dispatch(settings: &Settings, command: Command) -> Result<()> {
    let mut stdout = io::stdout().lock();
    let out = &mut stdout;
    match command {
        // The commands that read files read them before they open the store.
        Command::CreateWorkflow(args) => workflow::create(settings, args, out).await?,
        Command::ListWorkflows(args) => {
            workflow::list(&settings.tracker().await?, args.json, out).await?
        }
        Command::CreateAnalysis(args) => analysis::create(settings, args, out).await?,
        Command::ListAnalyses(args) => {
            analysis::list(&settings.tracker().await?, args.json, out).await?
        }
        Command::LaunchWorkflow(args) => engine::launch_workflow(settings, args, out).await?,
        Command::ListRuns(args) => runs::list(&settings.tracker().await?, args, out).await?,
        Command::GetRunCount(args) => runs::count(&settings.tracker().await?, args, out).await?,
        Command::UpdateConfig(args) => config::update(settings, args, out).await?,
        Command::PrintEffectiveConfig(args) => {
            config::effective(&settings.tracker().await?, args, out).await?
        }
        Command::PrintConfig(args) => config::print(&settings.tracker().await?, args, out).await?,
        Command::PrintCommands(args) => {
            config::commands(&settings.tracker().await?, args, out).await?
        }
        Command::Wait(args) => engine::wait(settings, &settings.connect().await?, args).await?,
        Command::Server(args) => engine::server(settings, &settings.connect().await?, args).await?,
        Command::Scheduler => engine::scheduler(settings, &settings.connect().await?).await?,
        Command::Worker(args) => engine::worker(settings, &settings.connect().await?, args).await?,
        Command::ListWorkers(args) => {
            workers::list(&settings.tracker().await?, settings, args.json, out).await?
        }
        // The doctor reports a store it cannot open rather than failing on it.
        Command::Doctor => doctor::run(settings, out).await?,
        Command::RunStatus(args) => {
            status::run_status(&settings.tracker().await?, args, out).await?
        }
        Command::Logs(args) => {
            status::logs(&settings.tracker().await?, settings.home(), args, out).await?
        }
        Command::Events(args) => status::events(&settings.tracker().await?, args, out).await?,
        Command::ResetRun(args) => status::reset(&settings.tracker().await?, args, out).await?,
        Command::CancelRun(args) => status::cancel(&settings.tracker().await?, args, out).await?,
        Command::Token(command) => tokens::run(&settings.tracker().await?, command, out).await?,
    }
    stdout.flush()?;
    Ok(())
}
