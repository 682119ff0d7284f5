//! `create-analysis` and `list-analyses`.

use std::io::Write;

use anyhow::Result;
use butler_core::config;
use butler_core::tracker::Tracker;
use chrono::Utc;
use serde_json::Value;

use crate::opt::CreateAnalysis;
use crate::output::{Table, timestamp};
use crate::settings::Settings;

/// Creates an analysis and prints its id. Its config is read before the store is opened.
pub async fn create(settings: &Settings, args: CreateAnalysis, out: &mut impl Write) -> Result<()> {
    let start_date = args.date.unwrap_or_else(|| Utc::now().date_naive());
    let config = config::read_json_file(&args.config)?;
    let analysis = settings
        .tracker()
        .await?
        .create_analysis(&args.name, start_date, config)
        .await?;
    writeln!(out, "Created analysis with ID: {}", analysis.id)?;
    Ok(())
}

/// Prints every analysis.
pub async fn list(tracker: &Tracker, json: bool, out: &mut impl Write) -> Result<()> {
    let mut table = Table::new(&["ID", "NAME", "START DATE", "CONFIG ID", "CREATED"]);
    for analysis in tracker.store().list_analyses().await? {
        table.push(vec![
            Value::from(analysis.id),
            Value::from(analysis.name),
            Value::from(analysis.start_date.format("%Y-%m-%d").to_string()),
            Value::from(analysis.config_id.to_string()),
            timestamp(analysis.created_at),
        ]);
    }
    table.print(out, json)?;
    Ok(())
}
