//! `butler-bench`: Butler's benchmark scenarios. Each prints its figures beside the physical limit
//! measured in the same run, as a table or, with `--json`, one JSON object per line.

mod report;
mod scenario;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = scenario::Args::parse();
    let figures = scenario::run(&args).await?;
    report::print(&figures, args.json);
    Ok(())
}
