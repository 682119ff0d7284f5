//! `update-config`, `print-effective-config` and `print-config`.

use std::io::Write;

use anyhow::{Result, bail};
use butler_core::config as layers;
use butler_core::model::ConfigOwner;
use butler_core::tracker::Tracker;
use serde_json::{Value, json};

use crate::opt::{PrintCommands, PrintConfig, PrintEffectiveConfig, UpdateConfig};
use crate::output::{Table, print_json};
use crate::settings::Settings;

/// Replaces a workflow's or an analysis's config layer and prints the new config id.
pub async fn update(settings: &Settings, args: UpdateConfig, out: &mut impl Write) -> Result<()> {
    let owner = match (args.workflow, args.analysis) {
        (Some(id), None) => ConfigOwner::Workflow(id),
        (None, Some(id)) => ConfigOwner::Analysis(id),
        _ => bail!("give exactly one of -w WORKFLOW_ID or -a ANALYSIS_ID"),
    };
    // Read before the store is opened, so a missing or bad file leaves no trace.
    let data = layers::read_json_file(&args.config)?;
    let config = settings.tracker().await?.update_config(owner, data).await?;
    let (kind, id) = match owner {
        ConfigOwner::Workflow(id) => ("workflow", id),
        ConfigOwner::Analysis(id) => ("analysis", id),
    };
    writeln!(
        out,
        "Updated config of {kind} {id}: config ID {}",
        config.id
    )?;
    Ok(())
}

/// Prints a run's effective config, or with `--explain` the layer that set each key.
pub async fn effective(
    tracker: &Tracker,
    args: PrintEffectiveConfig,
    out: &mut impl Write,
) -> Result<()> {
    if !args.explain {
        let config = tracker.effective_config(args.run).await?;
        print_json(out, &config.data)?;
        return Ok(());
    }
    let mut table = Table::with_keys(&[("KEY", "path"), ("LAYER", "layer"), ("VALUE", "value")]);
    for entry in tracker.explain(args.run).await? {
        let value = if args.json {
            entry.value
        } else {
            Value::String(entry.value.to_string())
        };
        table.push(vec![
            Value::from(entry.path),
            Value::from(entry.layer.to_string()),
            value,
        ]);
    }
    table.print(out, args.json)?;
    Ok(())
}

/// Prints a stored config.
pub async fn print(tracker: &Tracker, args: PrintConfig, out: &mut impl Write) -> Result<()> {
    let config = tracker.store().get_config(args.config).await?;
    print_json(out, &config.data)?;
    Ok(())
}

/// Prints the commands of a run's tasks, each under its task's id with its extra environment,
/// or with `--json` as an array of {task, command, env}.
pub async fn commands(tracker: &Tracker, args: PrintCommands, out: &mut impl Write) -> Result<()> {
    let tasks = tracker.commands(args.run, args.task.as_deref()).await?;
    if args.json {
        let tasks = tasks
            .into_iter()
            .map(|t| json!({"task": t.id, "command": t.command, "env": t.env}))
            .collect();
        return Ok(print_json(out, &Value::Array(tasks))?);
    }
    for (n, task) in tasks.iter().enumerate() {
        if n > 0 {
            writeln!(out)?;
        }
        writeln!(out, "== {}", task.id)?;
        for (name, value) in &task.env {
            writeln!(out, "env {name}={value}")?;
        }
        writeln!(out, "{}", task.command.trim_end_matches('\n'))?;
    }
    Ok(())
}
