//! `--repeat N`: the scenario run N times, each in a fresh process of this program, so that no
//! run inherits another's memory, caches or files; its figures are summarised per metric.

use std::process::{Command, Stdio};

use crate::report::Repeated;
use crate::scenario::Args;

/// Runs the scenario of `args` `args.repeat` times, one after the other, and gathers each
/// figure's values.
pub fn run(args: &Args) -> anyhow::Result<Vec<Repeated>> {
    let exe = std::env::current_exe()?;
    let mut figures = Vec::new();
    for n in 1..=args.repeat {
        eprintln!("run {n} of {}", args.repeat);
        let output = Command::new(&exe)
            .args(args.once_as_json())
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "run {n} of {} failed ({}); its messages are above",
            args.repeat,
            output.status
        );
        for line in String::from_utf8(output.stdout)?.lines() {
            Repeated::add(&mut figures, line)?;
        }
    }
    Ok(figures)
}
