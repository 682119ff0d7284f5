//! `launch-workflow`.

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use butler_core::config;
use butler_core::model::Id;
use butler_core::tracker::{RunSource, Tracker};
use indicatif::{ProgressBar, ProgressStyle};

use crate::opt::LaunchWorkflow;

/// Launches below this many run configs are quick enough to need no progress bar.
const PROGRESS_THRESHOLD: usize = 200;

/// The run configs of one `launch-workflow`, read and parsed before the store is opened, so a
/// missing or bad file leaves no trace, not even a new `BUTLER_HOME`.
pub struct RunConfigs {
    runs: Vec<RunSource>,
    progress: ProgressBar,
}

impl RunConfigs {
    /// Reads every run config `args` names.
    pub fn read(args: &LaunchWorkflow) -> Result<Self> {
        let files = config::run_config_files(&args.config)?;
        let progress = progress_bar(files.len());
        match read_all(&files, &progress) {
            Ok(runs) => Ok(Self { runs, progress }),
            Err(error) => {
                progress.finish_and_clear();
                Err(error.into())
            }
        }
    }

    /// Launches the runs, all or none, prints their new ids and returns them.
    pub async fn launch(
        self,
        tracker: &Tracker,
        args: &LaunchWorkflow,
        out: &mut impl Write,
    ) -> Result<Vec<Id>> {
        let Self { runs, progress } = self;
        progress.set_message("checking and storing runs");
        progress.enable_steady_tick(Duration::from_millis(120));
        let launched = tracker
            .launch(args.workflow, args.analysis, runs, args.allow_duplicates)
            .await;
        progress.finish_and_clear();
        let launched = launched?;
        let noun = if launched.len() == 1 { "run" } else { "runs" };
        eprintln!(
            "Launched {} {noun} of workflow {} for analysis {}",
            launched.len(),
            args.workflow,
            args.analysis
        );
        let ids: Vec<Id> = launched.iter().map(|run| run.id).collect();
        for id in &ids {
            writeln!(out, "{id}")?;
        }
        Ok(ids)
    }
}

fn read_all(files: &[PathBuf], progress: &ProgressBar) -> butler_core::Result<Vec<RunSource>> {
    let mut runs = Vec::with_capacity(files.len());
    for file in files {
        runs.push(RunSource {
            source: Some(file.display().to_string()),
            config: config::read_json_file(file)?,
        });
        progress.inc(1);
    }
    Ok(runs)
}

/// A bar on stderr for large launches on a terminal; hidden otherwise, so scripts and logs stay
/// clean.
fn progress_bar(files: usize) -> ProgressBar {
    if files < PROGRESS_THRESHOLD || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(files as u64).with_message("reading run configs");
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}") {
        bar.set_style(style);
    }
    bar
}
