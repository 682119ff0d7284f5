//! `/`: the runs, newest first, filtered by workflow, analysis and status, with the count of
//! runs in each status; paged with keyset cursors (`after`, `before`), so a page costs the
//! same with a million runs as with ten.

use std::collections::BTreeMap;

use axum::Extension;
use axum::extract::{Query, State};
use axum::response::Response;
use butler_core::model::{AnalysisRun, Id, RunFilter, RunStatus};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::format::{Time, elapsed, truncate};
use super::{Chrome, Nav, PageError, id_param};
use crate::server::auth::{Access, percent_encode};
use crate::server::state::AppState;

/// Runs on one page unless `limit` says otherwise.
const PAGE: u32 = 50;
/// The most runs one page shows.
const MAX_PAGE: u32 = 500;

/// The query of `/`; every part is optional and an empty one counts as left out.
#[derive(Debug, Default, Deserialize)]
pub struct RunsQuery {
    workflow: Option<String>,
    analysis: Option<String>,
    status: Option<String>,
    after: Option<String>,
    before: Option<String>,
    limit: Option<String>,
}

/// The filters of a runs page, validated.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Filters {
    workflow: Option<Id>,
    analysis: Option<Id>,
    status: Option<RunStatus>,
}

impl Filters {
    /// The link to the runs page with these filters and `extra` query pairs.
    pub fn href(&self, extra: &[(&str, String)]) -> String {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        if let Some(id) = self.workflow {
            pairs.push(("workflow", id.to_string()));
        }
        if let Some(id) = self.analysis {
            pairs.push(("analysis", id.to_string()));
        }
        if let Some(status) = self.status {
            pairs.push(("status", status.as_str().to_owned()));
        }
        pairs.extend(extra.iter().cloned());
        if pairs.is_empty() {
            return "/".to_owned();
        }
        let query: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .collect();
        format!("/?{}", query.join("&"))
    }

    /// The same filters with another status (or none).
    fn with_status(&self, status: Option<RunStatus>) -> Filters {
        Filters {
            status,
            ..self.clone()
        }
    }
}

#[derive(Debug, Serialize)]
struct Choice {
    id: Id,
    label: String,
    selected: bool,
}

#[derive(Debug, Serialize)]
struct Chip {
    status: &'static str,
    count: u64,
    href: String,
    active: bool,
}

/// One row of the table.
#[derive(Debug, Serialize)]
struct RunRow {
    id: Id,
    workflow_id: Id,
    workflow: String,
    analysis_id: Id,
    analysis: String,
    status: &'static str,
    error: Option<String>,
    source: Option<String>,
    source_full: Option<String>,
    created: Time,
    started: Option<Time>,
    duration: Option<String>,
}

#[derive(Debug, Serialize)]
struct RunsPage {
    workflows: Vec<Choice>,
    analyses: Vec<Choice>,
    statuses: Vec<(&'static str, bool)>,
    chips: Vec<Chip>,
    total: u64,
    all_href: String,
    all_active: bool,
    rows: Vec<RunRow>,
    older: Option<String>,
    newer: Option<String>,
    newest: Option<String>,
    filtered: bool,
    /// What the script needs to refresh the page through the API.
    live: serde_json::Value,
}

/// `GET /`.
pub async fn page(
    State(state): State<AppState>,
    access: Option<Extension<Access>>,
    Query(query): Query<RunsQuery>,
) -> Response {
    let chrome = Chrome::new(&state, access.map(|a| a.0), Nav::Runs);
    chrome.respond("runs.html", load(&state, query).await)
}

async fn load(state: &AppState, query: RunsQuery) -> Result<RunsPage, PageError> {
    let filters = Filters {
        workflow: id_param(query.workflow.as_deref(), "workflow", "Workflows")?,
        analysis: id_param(query.analysis.as_deref(), "analysis", "Analyses")?,
        status: match query.status.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(text) => Some(text.parse::<RunStatus>()?),
        },
    };
    let after = id_param(query.after.as_deref(), "after", "Runs")?;
    let before = id_param(query.before.as_deref(), "before", "Runs")?;
    let limit = match query.limit.as_deref().map(str::trim) {
        None | Some("") => PAGE,
        Some(text) => match text.parse::<u32>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(PageError::bad_request(format!(
                    "limit={text:?} is not a page size: use a number from 1 to {MAX_PAGE}, or \
                     leave it out for {PAGE}"
                )));
            }
        },
    };

    let store = &state.store;
    // The store keeps counts per status, so this reads a few rows however many runs there are.
    let mut counts = store
        .count_runs(&RunFilter {
            workflow_id: filters.workflow,
            analysis_id: filters.analysis,
            ..RunFilter::default()
        })
        .await?;
    let mut filter = RunFilter {
        workflow_id: filters.workflow,
        analysis_id: filters.analysis,
        status: filters.status,
        after_id: after,
        // One more than shown tells whether another page follows.
        limit: Some(limit + 1),
        newest_first: true,
    };
    let (runs, older_exists, newer_exists) = if let Some(before) = before {
        // Newer runs than `before`: the oldest of them first, then flipped.
        filter.after_id = Some(before);
        filter.newest_first = false;
        let mut runs = store.list_runs(&filter).await?;
        let more = runs.len() > limit as usize;
        runs.truncate(limit as usize);
        runs.reverse();
        (runs, true, more)
    } else {
        let mut runs = store.list_runs(&filter).await?;
        let more = runs.len() > limit as usize;
        runs.truncate(limit as usize);
        (runs, more, after.is_some())
    };

    let workflows = store.list_workflows().await?;
    let analyses = store.list_analyses().await?;
    let workflow_names: BTreeMap<Id, String> = workflows
        .iter()
        .map(|w| (w.id, format!("{} {}", w.name, w.version)))
        .collect();
    let analysis_names: BTreeMap<Id, String> =
        analyses.iter().map(|a| (a.id, a.name.clone())).collect();

    let now = Utc::now();
    let rows = runs
        .iter()
        .map(|run| row(run, &workflow_names, &analysis_names, now))
        .collect();
    let page_size = if limit == PAGE {
        Vec::new()
    } else {
        vec![("limit", limit.to_string())]
    };
    let with_cursor = |name: &'static str, id: Id| {
        let mut extra = vec![(name, id.to_string())];
        extra.extend(page_size.iter().cloned());
        filters.href(&extra)
    };
    let older = older_exists
        .then(|| runs.last().map(|r| with_cursor("after", r.id)))
        .flatten();
    let newer = newer_exists
        .then(|| runs.first().map(|r| with_cursor("before", r.id)))
        .flatten();
    let newest = (after.is_some() || before.is_some()).then(|| filters.href(&page_size));

    let total = counts.values().sum();
    let chips = RunStatus::ALL
        .into_iter()
        .map(|status| Chip {
            status: status.as_str(),
            count: counts.remove(&status).unwrap_or(0),
            href: filters.with_status(Some(status)).href(&page_size),
            active: filters.status == Some(status),
        })
        .collect();
    let live = json!({
        "workflow": filters.workflow,
        "analysis": filters.analysis,
        "status": filters.status.map(RunStatus::as_str),
        "after": after,
        // Rows of a page of newer runs are left as they are; counts still refresh.
        "rows": before.is_none(),
        "limit": limit,
        "workflows": workflow_names,
        "analyses": analysis_names,
    });
    Ok(RunsPage {
        workflows: workflows
            .iter()
            .map(|w| Choice {
                id: w.id,
                label: format!("{} {}", w.name, w.version),
                selected: filters.workflow == Some(w.id),
            })
            .collect(),
        analyses: analyses
            .iter()
            .map(|a| Choice {
                id: a.id,
                label: format!("{} ({})", a.name, a.start_date),
                selected: filters.analysis == Some(a.id),
            })
            .collect(),
        statuses: RunStatus::ALL
            .into_iter()
            .map(|s| (s.as_str(), filters.status == Some(s)))
            .collect(),
        chips,
        total,
        all_href: filters.with_status(None).href(&page_size),
        all_active: filters.status.is_none(),
        rows,
        older,
        newer,
        newest,
        filtered: filters != Filters::default(),
        live,
    })
}

fn row(
    run: &AnalysisRun,
    workflows: &BTreeMap<Id, String>,
    analyses: &BTreeMap<Id, String>,
    now: chrono::DateTime<Utc>,
) -> RunRow {
    let source_full = run.source_file.clone();
    let source = source_full.as_deref().map(|path| {
        let name = path.rsplit('/').next().unwrap_or(path);
        truncate(name, 40)
    });
    RunRow {
        id: run.id,
        workflow_id: run.workflow_id,
        workflow: workflows
            .get(&run.workflow_id)
            .cloned()
            .unwrap_or_else(|| format!("workflow {}", run.workflow_id)),
        analysis_id: run.analysis_id,
        analysis: analyses
            .get(&run.analysis_id)
            .cloned()
            .unwrap_or_else(|| format!("analysis {}", run.analysis_id)),
        status: run.status.as_str(),
        error: run.error.clone(),
        source,
        source_full,
        created: Time::new(run.created_at),
        started: run.started_at.map(Time::new),
        duration: elapsed(run.started_at, run.ended_at, now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_keep_the_filters_and_encode_values() {
        let filters = Filters {
            workflow: Some(3),
            analysis: None,
            status: Some(RunStatus::InProgress),
        };
        assert_eq!(
            filters.href(&[("after", "120".into())]),
            "/?workflow=3&status=in-progress&after=120"
        );
        assert_eq!(Filters::default().href(&[]), "/");
        assert_eq!(
            filters.with_status(None).href(&[]),
            "/?workflow=3",
            "the all chip drops only the status"
        );
    }
}
