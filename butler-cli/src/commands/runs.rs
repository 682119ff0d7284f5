//! `list-runs` and `get-run-count`.

use std::io::Write;

use anyhow::Result;
use butler_core::model::{RunFilter, RunStatus};
use butler_core::tracker::Tracker;
use serde_json::{Map, Value};

use crate::opt::{GetRunCount, ListRuns};
use crate::output::{Table, opt_timestamp, print_json, timestamp};

/// Prints the runs matching the filters, oldest first.
pub async fn list(tracker: &Tracker, args: ListRuns, out: &mut impl Write) -> Result<()> {
    let filter = RunFilter {
        workflow_id: args.workflow,
        analysis_id: args.analysis,
        status: args.status,
        after_id: None,
        limit: args.limit,
        newest_first: false,
    };
    let mut table = Table::new(&[
        "ID", "WORKFLOW", "ANALYSIS", "STATUS", "SOURCE", "CREATED", "STARTED", "ENDED",
    ]);
    for run in tracker.store().list_runs(&filter).await? {
        table.push(vec![
            Value::from(run.id),
            Value::from(run.workflow_id),
            Value::from(run.analysis_id),
            Value::from(run.status.as_str()),
            run.source_file.map_or(Value::Null, Value::from),
            timestamp(run.created_at),
            opt_timestamp(run.started_at),
            opt_timestamp(run.ended_at),
        ]);
    }
    table.print(out, args.json)?;
    Ok(())
}

/// Prints how many runs of an analysis are in one status, or in each.
pub async fn count(tracker: &Tracker, args: GetRunCount, out: &mut impl Write) -> Result<()> {
    let only = args.status;
    let counts = tracker.run_counts(args.analysis).await?;
    let counts: Vec<(RunStatus, u64)> = counts
        .into_iter()
        .filter(|(status, _)| only.is_none_or(|only| only == *status))
        .collect();
    if args.json {
        let object: Map<String, Value> = counts
            .into_iter()
            .map(|(status, count)| (status.as_str().to_owned(), Value::from(count)))
            .collect();
        print_json(out, &Value::Object(object))?;
    } else if only.is_some() {
        let count = counts.first().map_or(0, |(_, count)| *count);
        writeln!(out, "{count}")?;
    } else {
        let mut table = Table::new(&["STATUS", "COUNT"]);
        for (status, count) in counts {
            table.push(vec![Value::from(status.as_str()), Value::from(count)]);
        }
        table.print(out, false)?;
    }
    Ok(())
}
