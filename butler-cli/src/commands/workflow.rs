//! `create-workflow` and `list-workflows`.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use anyhow::{Result, bail};
use butler_core::config;
use butler_core::definition::Definition;
use butler_core::tracker::Tracker;
use serde_json::Value;

use crate::opt::CreateWorkflow;
use crate::output::{Table, timestamp};
use crate::settings::Settings;

/// Registers a workflow and prints its id. Its files are read before the store is opened, so
/// a missing or bad file leaves no trace, not even a new `BUTLER_HOME`.
pub async fn create(settings: &Settings, args: CreateWorkflow, out: &mut impl Write) -> Result<()> {
    let config = config::read_json_file(&args.config)?;
    let path = match args.definition {
        Some(path) => path,
        None => default_definition(settings, &args.name)?,
    };
    let definition = Definition::from_file(&path)?;
    let workflow = settings
        .tracker()
        .await?
        .create_workflow(&args.name, &args.version, config, definition)
        .await?;
    writeln!(out, "Created workflow with ID: {}", workflow.id)?;
    Ok(())
}

/// Prints every workflow.
pub async fn list(tracker: &Tracker, json: bool, out: &mut impl Write) -> Result<()> {
    let mut table = Table::new(&["ID", "NAME", "VERSION", "TASKS", "CONFIG ID", "CREATED"]);
    for workflow in tracker.store().list_workflows().await? {
        table.push(vec![
            Value::from(workflow.id),
            Value::from(workflow.name),
            Value::from(workflow.version),
            Value::from(workflow.definition.tasks.len()),
            Value::from(workflow.config_id.to_string()),
            timestamp(workflow.created_at),
        ]);
    }
    table.print(out, json)?;
    Ok(())
}

/// `$BUTLER_HOME/workflows/NAME.toml`, or `NAME.json` when only that one exists.
fn default_definition(settings: &Settings, name: &str) -> Result<PathBuf> {
    let mut parts = Path::new(name).components();
    let plain_name = matches!(
        (parts.next(), parts.next()),
        (Some(Component::Normal(_)), None)
    );
    if !plain_name {
        bail!(
            "workflow name {name:?} cannot name a definition file in {}; pass the definition \
             with --definition FILE",
            settings.workflows_dir().display()
        );
    }
    let toml = settings.workflows_dir().join(format!("{name}.toml"));
    let json = settings.workflows_dir().join(format!("{name}.json"));
    if toml.is_file() {
        Ok(toml)
    } else if json.is_file() {
        Ok(json)
    } else {
        bail!(
            "no definition for workflow {name:?}: neither {} nor {} exists; write the workflow's \
             tasks to one of them, or pass --definition FILE",
            toml.display(),
            json.display()
        )
    }
}
