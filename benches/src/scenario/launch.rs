//! `launch`: 10,000 run-config files into SQLite, as `butler launch-workflow` does it.

use std::time::Instant;

use butler_core::config::{read_json_file, run_config_files};
use butler_core::tracker::RunSource;

use super::{Args, fixture, open_store, sample_config, secs};
use crate::report::Figure;

pub async fn run(args: &Args) -> anyhow::Result<Vec<Figure>> {
    let count = args.size.unwrap_or(10_000);
    let dir = tempfile::tempdir()?;
    let runs = dir.path().join("runs");
    std::fs::create_dir(&runs)?;
    for i in 0..count {
        let text = serde_json::to_string_pretty(&sample_config(i))?;
        std::fs::write(runs.join(format!("sample-{i:07}.json")), text)?;
    }
    let store = open_store(dir.path(), args.durability).await?;
    let (tracker, workflow, analysis) = fixture(&store).await?;

    // The floor: finding, reading and parsing the files, which any launch must do.
    let start = Instant::now();
    let mut parsed = 0;
    for path in run_config_files(&runs)? {
        parsed += read_json_file(&path)?.as_object().map_or(0, |o| o.len());
    }
    let floor = secs(start);
    anyhow::ensure!(parsed > 0, "no run config was read");

    let start = Instant::now();
    let mut sources = Vec::with_capacity(count);
    for path in run_config_files(&runs)? {
        sources.push(RunSource {
            config: read_json_file(&path)?,
            source: Some(path.display().to_string()),
        });
    }
    let launched = tracker.launch(workflow, analysis, sources, false).await?;
    let took = secs(start);
    anyhow::ensure!(
        launched.len() == count,
        "launched {} of {count} runs",
        launched.len()
    );

    Ok(vec![
        Figure::new(
            "launch",
            format!("launch {count} run-config files"),
            took,
            "s",
        )
        .limit(floor, "find, read and parse the files"),
        Figure::new(
            "launch",
            "runs launched per second",
            count as f64 / took,
            "runs/s",
        ),
    ])
}
