//! `/runs/{id}`: one run — its status and times, its DAG with each task's state, a timeline
//! of its attempts, the log of one attempt (followed live while it runs), its event history,
//! its effective config with the layer each key came from, and each task's command rendered
//! with it.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::Path as FsPath;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use butler_core::executor::log_file;
use butler_core::model::{Id, TaskInstance, TaskState};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::dag::{self, Dag, NodeInfo};
use super::format::{Time, compact_json, elapsed};
use super::timeline::{self, Gantt};
use super::{Chrome, Nav, PageError};
use crate::server::auth::{Access, percent_encode};
use crate::server::state::AppState;

/// The most of a log the page itself carries: its end. The script fetches what follows.
const LOG_TAIL: u64 = 256 * 1024;

/// The query of a run page: which attempt's log to show.
#[derive(Debug, Default, Deserialize)]
pub struct RunQuery {
    task: Option<String>,
    #[serde(rename = "try")]
    try_number: Option<String>,
}

#[derive(Debug, Serialize)]
struct Header {
    id: Id,
    status: &'static str,
    finished: bool,
    workflow: String,
    workflow_id: Id,
    analysis: String,
    analysis_id: Id,
    source: Option<String>,
    error: Option<String>,
    created: Time,
    started: Option<Time>,
    ended: Option<Time>,
    duration: Option<String>,
    config_id: String,
}

#[derive(Debug, Serialize)]
struct TaskRow {
    id: String,
    state: &'static str,
    try_number: u32,
    exit_code: Option<i32>,
    worker: Option<String>,
    started: Option<Time>,
    ended: Option<Time>,
    duration: Option<String>,
    next_try: Option<Time>,
    error: Option<String>,
    log_href: Option<String>,
}

#[derive(Debug, Serialize)]
struct AttemptLink {
    try_number: u32,
    href: String,
    selected: bool,
    state: String,
}

#[derive(Debug, Serialize)]
struct TaskAttempts {
    task: String,
    attempts: Vec<AttemptLink>,
}

#[derive(Debug, Serialize)]
struct LogView {
    task: String,
    try_number: u32,
    /// The end of the log as the page shows it.
    text: String,
    /// Bytes of the log before `text`, left out because the log is long.
    skipped: u64,
    /// The log's size when read: where following it resumes.
    offset: u64,
    /// The attempt finished, so the log will not grow.
    done: bool,
    /// The attempt has not written a log (yet).
    missing: bool,
    /// Where the script fetches what follows.
    api: String,
}

#[derive(Debug, Serialize)]
struct EventRow {
    at: Time,
    task: Option<String>,
    try_number: Option<u32>,
    from: String,
    to: String,
    by: String,
    reason: String,
}

#[derive(Debug, Serialize)]
struct KeyRow {
    key: String,
    layer: String,
    value: String,
}

/// A task's command as its attempts run it, with its extra environment as `NAME=value`.
#[derive(Debug, Serialize)]
struct CommandRow {
    task: String,
    command: String,
    env: Vec<String>,
}

#[derive(Debug, Serialize)]
struct RunPage {
    run: Header,
    dag: Dag,
    tasks: Vec<TaskRow>,
    gantt: Option<Gantt>,
    logs: Vec<TaskAttempts>,
    log: Option<LogView>,
    events: Vec<EventRow>,
    config: String,
    config_sha256: String,
    provenance: Vec<KeyRow>,
    commands: Vec<CommandRow>,
    can_cancel: bool,
    can_reset: bool,
}

/// `GET /runs/{id}`.
pub async fn page(
    State(state): State<AppState>,
    access: Option<Extension<Access>>,
    Path(id): Path<String>,
    Query(query): Query<RunQuery>,
) -> Response {
    let chrome = Chrome::new(&state, access.map(|a| a.0), Nav::Runs);
    let page = match id.trim().parse::<Id>() {
        Ok(id) => load(&state, id, query, chrome.can_write()).await,
        Err(_) => Err(PageError::bad_request(format!(
            "/runs/{id} names no run: a run's address is /runs/ID with its number, as the runs \
             page links it"
        ))),
    };
    chrome.respond("run.html", page)
}

async fn load(
    state: &AppState,
    id: Id,
    query: RunQuery,
    can_write: bool,
) -> Result<RunPage, PageError> {
    let tracker = &state.tracker;
    let (run, tasks) = tracker.run_with_tasks(id).await?;
    let workflow = state.store.get_workflow(run.workflow_id).await?;
    let analysis = state.store.get_analysis(run.analysis_id).await?;
    let events = tracker.events(id).await?;
    let effective = tracker.effective_config(id).await?;
    let provenance = tracker.explain(id).await?;
    let now = Utc::now();

    let by_id: HashMap<&str, &TaskInstance> =
        tasks.iter().map(|t| (t.task_id.as_str(), t)).collect();
    let log_href = |task: &str, try_number: Option<u32>| {
        let mut href = format!("/runs/{id}?task={}", percent_encode(task));
        if let Some(n) = try_number {
            href.push_str(&format!("&try={n}"));
        }
        href.push_str("#logs");
        href
    };

    let dag = dag::layout(&workflow.definition, |task_id| match by_id.get(task_id) {
        Some(task) => NodeInfo {
            state: task.state.as_str().to_owned(),
            detail: node_detail(task),
            href: (task.last_started_try() > 0).then(|| log_href(task_id, None)),
        },
        None => NodeInfo {
            state: "pending".to_owned(),
            detail: "not created".to_owned(),
            href: None,
        },
    });

    // Tasks in the definition's order, then any the definition no longer names.
    let mut ordered: Vec<&TaskInstance> = workflow
        .definition
        .tasks
        .iter()
        .filter_map(|t| by_id.get(t.id.as_str()).copied())
        .collect();
    for task in &tasks {
        if workflow.definition.task(&task.task_id).is_none() {
            ordered.push(task);
        }
    }

    let selected = choose_log(&ordered, &query)?;
    let logs = ordered
        .iter()
        .filter(|t| t.last_started_try() > 0)
        .map(|task| TaskAttempts {
            task: task.task_id.clone(),
            attempts: (1..=task.last_started_try())
                .map(|n| AttemptLink {
                    try_number: n,
                    href: log_href(&task.task_id, Some(n)),
                    selected: selected
                        .as_ref()
                        .is_some_and(|(t, s)| t.task_id == task.task_id && *s == n),
                    state: if n == task.last_started_try() {
                        task.state.as_str().to_owned()
                    } else {
                        "finished".to_owned()
                    },
                })
                .collect(),
        })
        .collect();
    let log = match selected {
        Some((task, try_number)) => Some(read_log(state, id, task, try_number).await),
        None => None,
    };

    let task_rows = ordered
        .iter()
        .map(|task| TaskRow {
            id: task.task_id.clone(),
            state: task.state.as_str(),
            try_number: task.try_number,
            exit_code: task.exit_code,
            worker: task.worker.clone(),
            started: task.started_at.map(Time::new),
            ended: task.ended_at.map(Time::new),
            duration: match task.state {
                TaskState::Running => elapsed(task.started_at, None, now),
                _ => task
                    .ended_at
                    .and_then(|end| elapsed(task.started_at, Some(end), now)),
            },
            next_try: task.next_try_at.map(Time::new),
            error: task.error.clone(),
            log_href: (task.last_started_try() > 0).then(|| log_href(&task.task_id, None)),
        })
        .collect();

    let attempts = timeline::attempts(&events);
    let gantt = timeline::gantt(&attempts, now, |task, n| log_href(task, Some(n)));
    let events = events
        .into_iter()
        .map(|e| EventRow {
            at: Time::precise(e.at),
            task: e.task_id,
            try_number: e.try_number,
            from: e.from,
            to: e.to,
            by: e.by,
            reason: e.reason,
        })
        .collect();
    let provenance = provenance
        .into_iter()
        .map(|p| KeyRow {
            key: p.path,
            layer: p.layer.to_string(),
            value: compact_json(&p.value, 120),
        })
        .collect();
    let config = serde_json::to_string_pretty(&effective.data)
        .unwrap_or_else(|_| effective.data.to_string());
    let commands = tracker
        .commands(id, None)
        .await?
        .into_iter()
        .map(|t| CommandRow {
            task: t.id,
            command: t.command,
            env: t.env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        })
        .collect();

    let finished = run.status.is_finished();
    Ok(RunPage {
        run: Header {
            id,
            status: run.status.as_str(),
            finished,
            workflow: format!("{} {}", workflow.name, workflow.version),
            workflow_id: workflow.id,
            analysis: analysis.name.clone(),
            analysis_id: analysis.id,
            source: run.source_file.clone(),
            error: run.error.clone(),
            created: Time::new(run.created_at),
            started: run.started_at.map(Time::new),
            ended: run.ended_at.map(Time::new),
            duration: elapsed(run.started_at, run.ended_at, now),
            config_id: run.effective_config_id.to_string(),
        },
        dag,
        tasks: task_rows,
        gantt,
        logs,
        log,
        events,
        config,
        config_sha256: effective.sha256,
        provenance,
        commands,
        can_cancel: can_write && !finished,
        can_reset: can_write && finished,
    })
}

/// A task's state and attempt for its box: `succeeded`, `running · try 2`.
fn node_detail(task: &TaskInstance) -> String {
    let state = task.state.as_str().replace('_', " ");
    if task.try_number > 1 {
        format!("{state} · try {}", task.try_number)
    } else {
        state
    }
}

/// The attempt whose log the page shows: the one the address names, else a running one, else
/// the last attempt of a task that failed, else the first task that ran.
fn choose_log<'a>(
    tasks: &[&'a TaskInstance],
    query: &RunQuery,
) -> Result<Option<(&'a TaskInstance, u32)>, PageError> {
    if let Some(name) = query.task.as_deref().filter(|t| !t.is_empty()) {
        let Some(task) = tasks.iter().find(|t| t.task_id == name) else {
            let names: Vec<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
            return Err(PageError::bad_request(format!(
                "this run has no task {name:?}; its tasks are: {}",
                names.join(", ")
            )));
        };
        let last = task.last_started_try();
        let try_number = match query.try_number.as_deref().map(str::trim) {
            None | Some("") => last,
            Some(text) => match text.parse::<u32>() {
                Ok(n) if n >= 1 && n <= last.max(1) => n,
                _ => {
                    return Err(PageError::bad_request(format!(
                        "try={text:?} is not an attempt of task {name}: it has made {last} \
                         attempt(s); use a number from 1 to {last}, or leave it out for the \
                         last"
                    )));
                }
            },
        };
        return Ok(Some((task, try_number.max(1))));
    }
    let pick = tasks
        .iter()
        .find(|t| t.state == TaskState::Running)
        .or_else(|| {
            tasks
                .iter()
                .find(|t| t.state.is_failure() && t.last_started_try() > 0)
        })
        .or_else(|| tasks.iter().find(|t| t.last_started_try() > 0));
    Ok(pick.map(|t| (*t, t.last_started_try())))
}

/// The end of the log of `task`'s attempt `try_number`, as the page shows it.
async fn read_log(state: &AppState, run_id: Id, task: &TaskInstance, try_number: u32) -> LogView {
    let path = log_file(&state.home, run_id, &task.task_id, try_number);
    let done = !(task.state == TaskState::Running && task.try_number == try_number);
    let api = format!(
        "/api/runs/{run_id}/logs/{}?try={try_number}",
        percent_encode(&task.task_id).replace('/', "%2F")
    );
    let (text, skipped, offset, missing) = match tail(&path, LOG_TAIL).await {
        Ok((text, skipped, size)) => (text, skipped, size, false),
        Err(_) => (String::new(), 0, 0, true),
    };
    LogView {
        task: task.task_id.clone(),
        try_number,
        text,
        skipped,
        offset,
        done,
        missing,
        api,
    }
}

/// The last `max` bytes of the file at `path` as text, the bytes left out before them, and
/// the file's size.
async fn tail(path: &FsPath, max: u64) -> std::io::Result<(String, u64, u64)> {
    let mut file = tokio::fs::File::open(path).await?;
    let size = file.metadata().await?.len();
    let skipped = size.saturating_sub(max);
    file.seek(SeekFrom::Start(skipped)).await?;
    let mut bytes = Vec::with_capacity((size - skipped) as usize);
    file.take(size - skipped).read_to_end(&mut bytes).await?;
    // The page resumes from what it shows, so a log that grew while being read stays whole.
    let size = skipped + bytes.len() as u64;
    Ok((String::from_utf8_lossy(&bytes).into_owned(), skipped, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, state: TaskState, try_number: u32) -> TaskInstance {
        TaskInstance {
            state,
            try_number,
            ..TaskInstance::pending(1, id)
        }
    }

    #[test]
    fn the_log_shown_is_the_one_asked_for_or_the_most_telling() {
        let a = task("a", TaskState::Succeeded, 1);
        let b = task("b", TaskState::Failed, 3);
        let c = task("c", TaskState::Running, 1);
        let none = RunQuery::default();
        let pick = |tasks: &[&TaskInstance], q: &RunQuery| {
            choose_log(tasks, q)
                .expect("a valid query")
                .map(|(t, n)| (t.task_id.clone(), n))
        };
        assert_eq!(pick(&[&a, &b, &c], &none), Some(("c".into(), 1)));
        assert_eq!(pick(&[&a, &b], &none), Some(("b".into(), 3)));
        assert_eq!(pick(&[&a], &none), Some(("a".into(), 1)));
        let pending = task("p", TaskState::Pending, 0);
        assert_eq!(pick(&[&pending], &none), None);
        let asked = RunQuery {
            task: Some("b".into()),
            try_number: Some("2".into()),
        };
        assert_eq!(pick(&[&a, &b], &asked), Some(("b".into(), 2)));

        let too_far = RunQuery {
            task: Some("b".into()),
            try_number: Some("4".into()),
        };
        let error = choose_log(&[&a, &b], &too_far).unwrap_err();
        assert!(error.message.contains("from 1 to 3"), "{}", error.message);
        let unknown = RunQuery {
            task: Some("zz".into()),
            try_number: None,
        };
        let error = choose_log(&[&a, &b], &unknown).unwrap_err();
        assert!(error.message.contains("a, b"), "{}", error.message);
    }

    #[tokio::test]
    async fn a_long_log_is_shown_by_its_end() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("output.log");
        std::fs::write(&path, "0123456789").expect("write a log");
        let (text, skipped, size) = tail(&path, 4).await.expect("read the log");
        assert_eq!((text.as_str(), skipped, size), ("6789", 6, 10));
        let (text, skipped, _) = tail(&path, 100).await.expect("read the log");
        assert_eq!((text.as_str(), skipped), ("0123456789", 0));
    }
}
