//! `butler-bench`: Butler's benchmark scenarios. Each prints its figures beside the physical limit
//! measured in the same run, as a table or, with `--json`, one JSON object per line.

mod repeat;
mod report;
mod scenario;

use clap::Parser;

/// The allocator of the `butler` binary, so that the figures are those of what users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = scenario::Args::parse();
    if args.repeat > 1 {
        let figures = repeat::run(&args)?;
        report::print_repeated(&figures, args.json);
        return Ok(());
    }
    let figures = scenario::run(&args).await?;
    report::print(&figures, args.json);
    Ok(())
}
