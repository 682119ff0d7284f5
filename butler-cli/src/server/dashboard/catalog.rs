//! `/analyses` and `/workflows`: what has been registered, with the runs of each by status.

use std::collections::{BTreeMap, HashMap};

use axum::Extension;
use axum::extract::State;
use axum::response::Response;
use butler_core::config::Config;
use butler_core::model::{Id, RunFilter, RunStatus};
use serde::Serialize;
use serde_json::Value;
use tokio::task::JoinSet;
use uuid::Uuid;

use super::dag::{self, Dag, NodeInfo};
use super::format::{Time, compact_json};
use super::{Chrome, Nav, PageError};
use crate::server::auth::Access;
use crate::server::state::AppState;

/// The runs of one workflow or analysis by status.
#[derive(Debug, Serialize)]
struct Counts {
    total: u64,
    /// Statuses with at least one run: status, count, link to those runs.
    chips: Vec<(&'static str, u64, String)>,
}

#[derive(Debug, Serialize)]
struct AnalysisRow {
    id: Id,
    name: String,
    start_date: String,
    created: Time,
    counts: Counts,
    runs_href: String,
    config: String,
}

#[derive(Debug, Serialize)]
struct TaskRow {
    id: String,
    needs: Vec<String>,
    command: String,
    settings: Vec<(String, String)>,
}

#[derive(Debug, Serialize)]
struct WorkflowRow {
    id: Id,
    name: String,
    version: String,
    created: Time,
    counts: Counts,
    runs_href: String,
    tasks: Vec<TaskRow>,
    settings: Vec<(String, String)>,
    dag: Dag,
    config: String,
}

/// `GET /analyses`.
pub async fn analyses(
    State(state): State<AppState>,
    access: Option<Extension<Access>>,
) -> Response {
    let chrome = Chrome::new(&state, access.map(|a| a.0), Nav::Analyses);
    chrome.respond("analyses.html", load_analyses(&state).await)
}

/// `GET /workflows`.
pub async fn workflows(
    State(state): State<AppState>,
    access: Option<Extension<Access>>,
) -> Response {
    let chrome = Chrome::new(&state, access.map(|a| a.0), Nav::Workflows);
    chrome.respond("workflows.html", load_workflows(&state).await)
}

async fn load_analyses(state: &AppState) -> Result<Value, PageError> {
    let mut analyses = state.store.list_analyses().await?;
    analyses.reverse();
    let configs = configs(state, analyses.iter().map(|a| a.config_id)).await?;
    let filters = analyses
        .iter()
        .map(|analysis| {
            let filter = RunFilter {
                analysis_id: Some(analysis.id),
                ..RunFilter::default()
            };
            (filter, format!("/?analysis={}", analysis.id))
        })
        .collect();
    let counts = counts(state, filters).await?;
    let rows: Vec<AnalysisRow> = analyses
        .into_iter()
        .zip(counts)
        .map(|(analysis, counts)| AnalysisRow {
            id: analysis.id,
            runs_href: format!("/?analysis={}", analysis.id),
            config: pretty(configs.get(&analysis.config_id)),
            name: analysis.name,
            start_date: analysis.start_date.to_string(),
            created: Time::new(analysis.created_at),
            counts,
        })
        .collect();
    Ok(serde_json::json!({ "analyses": rows }))
}

async fn load_workflows(state: &AppState) -> Result<Value, PageError> {
    let mut workflows = state.store.list_workflows().await?;
    workflows.reverse();
    let configs = configs(state, workflows.iter().map(|w| w.config_id)).await?;
    let filters = workflows
        .iter()
        .map(|workflow| {
            let filter = RunFilter {
                workflow_id: Some(workflow.id),
                ..RunFilter::default()
            };
            (filter, format!("/?workflow={}", workflow.id))
        })
        .collect();
    let counts = counts(state, filters).await?;
    let mut rows = Vec::with_capacity(workflows.len());
    for (workflow, counts) in workflows.into_iter().zip(counts) {
        let runs_href = format!("/?workflow={}", workflow.id);
        let definition = &workflow.definition;
        let tasks = definition
            .tasks
            .iter()
            .map(|task| TaskRow {
                id: task.id.clone(),
                needs: task.needs.clone(),
                command: match &task.python {
                    Some(function) => format!("python: {function}"),
                    None => task.run.clone(),
                },
                settings: settings(
                    serde_json::to_value(task).unwrap_or_default(),
                    &["id", "run", "python", "needs"],
                ),
            })
            .collect();
        let dag = dag::layout(definition, |_| NodeInfo {
            state: "definition".to_owned(),
            detail: String::new(),
            href: None,
        });
        rows.push(WorkflowRow {
            id: workflow.id,
            name: workflow.name.clone(),
            version: workflow.version.clone(),
            created: Time::new(workflow.created_at),
            counts,
            runs_href,
            tasks,
            settings: settings(
                serde_json::to_value(definition).unwrap_or_default(),
                &["tasks"],
            ),
            dag,
            config: pretty(configs.get(&workflow.config_id)),
        });
    }
    Ok(serde_json::json!({ "workflows": rows }))
}

/// The runs of each filter by status, each chip linking to `href&status=…`; the counts are
/// read at the same time, as a page may list hundreds of analyses.
async fn counts(
    state: &AppState,
    filters: Vec<(RunFilter, String)>,
) -> Result<Vec<Counts>, PageError> {
    let mut reads = JoinSet::new();
    for (index, (filter, href)) in filters.into_iter().enumerate() {
        let store = state.store.clone();
        reads.spawn(async move {
            let counts: BTreeMap<RunStatus, u64> = store.count_runs(&filter).await?;
            let counts = Counts {
                total: counts.values().sum(),
                chips: counts
                    .into_iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(status, n)| (status.as_str(), n, format!("{href}&status={status}")))
                    .collect(),
            };
            Ok::<_, butler_core::Error>((index, counts))
        });
    }
    let mut all = Vec::with_capacity(reads.len());
    while let Some(read) = reads.join_next().await {
        match read {
            Ok(counted) => all.push(counted?),
            Err(panic) => {
                return Err(PageError::internal(format!(
                    "counting runs failed: {panic}"
                )));
            }
        }
    }
    all.sort_by_key(|(index, _)| *index);
    Ok(all.into_iter().map(|(_, counts)| counts).collect())
}

async fn configs(
    state: &AppState,
    ids: impl Iterator<Item = Uuid>,
) -> Result<HashMap<Uuid, Config>, PageError> {
    let ids: Vec<Uuid> = ids.collect();
    Ok(state
        .store
        .get_configs(&ids)
        .await?
        .into_iter()
        .map(|c| (c.id, c))
        .collect())
}

fn pretty(config: Option<&Config>) -> String {
    config.map_or_else(
        || "(config not found)".to_owned(),
        |c| serde_json::to_string_pretty(&c.data).unwrap_or_else(|_| c.data.to_string()),
    )
}

/// The fields of a serialized definition or task other than `skip`, as `key`, `value` text.
fn settings(value: Value, skip: &[&str]) -> Vec<(String, String)> {
    let Value::Object(map) = value else {
        return Vec::new();
    };
    map.into_iter()
        .filter(|(key, value)| !skip.contains(&key.as_str()) && !is_default(value))
        .map(|(key, value)| {
            let text = match value {
                Value::String(s) => s,
                other => compact_json(&other, 80),
            };
            (key, text)
        })
        .collect()
}

fn is_default(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Number(n) => n.as_u64() == Some(0),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_leave_out_defaults_and_named_keys() {
        let value = serde_json::json!({
            "id": "a", "run": "true", "retries": 0, "timeout": "5m", "env": {"X": "1"},
            "permanent_exit_codes": []
        });
        assert_eq!(
            settings(value, &["id", "run"]),
            [
                ("timeout".to_owned(), "5m".to_owned()),
                ("env".to_owned(), r#"{"X":"1"}"#.to_owned())
            ]
        );
    }
}
