//! The alert model: what a notifier is given, as text for people and fields for programs.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{AnalysisRun, Id, WorkerInfo, Workflow};

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A run ended in `error`.
    RunFailed,
    /// A run is still unfinished after its workflow's `expected_duration`.
    RunOverdue,
    /// A worker stopped sending heartbeats.
    WorkerLost,
    /// The periodic report of runs per workflow.
    Report,
}

impl AlertKind {
    /// The kind as sent in JSON (`run_failed`).
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::RunFailed => "run_failed",
            AlertKind::RunOverdue => "run_overdue",
            AlertKind::WorkerLost => "worker_lost",
            AlertKind::Report => "report",
        }
    }
}

impl fmt::Display for AlertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Runs of one workflow version in a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowCounts {
    /// The workflow's name.
    pub workflow: String,
    /// Its version.
    pub version: String,
    /// Runs that completed in the report's period.
    pub completed: u64,
    /// Runs that ended in `error` in the report's period.
    pub failed: u64,
    /// Runs scheduled or in progress when the report was made.
    pub running: u64,
}

/// One alert: a title and a plain-text body for people, and the fields a program needs.
///
/// Webhooks receive it as JSON in this shape; fields that do not apply to the kind are left
/// out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// What it is about.
    pub kind: AlertKind,
    /// One line: a chat message's headline, an email's subject.
    pub title: String,
    /// Plain text, several lines, with what happened and what to do.
    pub body: String,
    /// When the watcher noticed it.
    pub at: DateTime<Utc>,
    /// The run concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<Id>,
    /// The run's workflow name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// The run's workflow version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_version: Option<String>,
    /// The run's analysis name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<String>,
    /// Why: the run's error, how long it has run, when the worker last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Where the dashboard shows the run: `/runs/ID`, after the configured `dashboard_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// The worker concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Start of the report's period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// A report's runs per workflow version, by name and version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub counts: Vec<WorkflowCounts>,
}

impl Alert {
    fn new(kind: AlertKind, title: String, body: String, at: DateTime<Utc>) -> Alert {
        Alert {
            kind,
            title,
            body,
            at,
            run_id: None,
            workflow: None,
            workflow_version: None,
            analysis: None,
            reason: None,
            link: None,
            worker: None,
            since: None,
            counts: Vec::new(),
        }
    }

    fn about_run(
        mut self,
        run: &AnalysisRun,
        workflow: &Workflow,
        analysis: &str,
        reason: String,
        link: String,
    ) -> Alert {
        self.run_id = Some(run.id);
        self.workflow = Some(workflow.name.clone());
        self.workflow_version = Some(workflow.version.clone());
        self.analysis = Some(analysis.to_owned());
        self.reason = Some(reason);
        self.link = Some(link);
        self
    }

    /// Run `run` of `workflow` (for analysis `analysis`) ended in error because of `reason`;
    /// links start with `dashboard` (the configured `dashboard_url`), if given.
    pub fn run_failed(
        run: &AnalysisRun,
        workflow: &Workflow,
        analysis: &str,
        reason: &str,
        at: DateTime<Utc>,
        dashboard: Option<&str>,
    ) -> Alert {
        let link = run_link(run.id, dashboard);
        let title = format!(
            "Run {} failed: {} {}",
            run.id, workflow.name, workflow.version
        );
        let body = format!(
            "Run {} of workflow {} {} (analysis {analysis}) ended in error.\n\
             Reason: {reason}\n\
             Details: {link}, or `butler run-status -r {}`; run the failed tasks again with \
             `butler reset-run -r {}`.",
            run.id, workflow.name, workflow.version, run.id, run.id
        );
        Alert::new(AlertKind::RunFailed, title, body, at).about_run(
            run,
            workflow,
            analysis,
            reason.to_owned(),
            link,
        )
    }

    /// Run `run` has been running for `running_for`, longer than its workflow's
    /// `expected_duration` of `expected`.
    pub fn run_overdue(
        run: &AnalysisRun,
        workflow: &Workflow,
        analysis: &str,
        running_for: Duration,
        expected: Duration,
        at: DateTime<Utc>,
        dashboard: Option<&str>,
    ) -> Alert {
        let link = run_link(run.id, dashboard);
        let running_for = round_to_seconds(running_for);
        let reason = format!(
            "running for {}, expected to take {}",
            humantime::format_duration(running_for),
            humantime::format_duration(expected)
        );
        let title = format!(
            "Run {} overdue: {} {}",
            run.id, workflow.name, workflow.version
        );
        let body = format!(
            "Run {} of workflow {} {} (analysis {analysis}) has been running for {}, longer \
             than its expected duration of {}. It keeps running.\n\
             Details: {link}, or `butler run-status -r {}`; stop it with `butler cancel-run -r {}`.",
            run.id,
            workflow.name,
            workflow.version,
            humantime::format_duration(running_for),
            humantime::format_duration(expected),
            run.id,
            run.id
        );
        Alert::new(AlertKind::RunOverdue, title, body, at)
            .about_run(run, workflow, analysis, reason, link)
    }

    /// `worker` has sent no heartbeat for longer than `lost_after`.
    pub fn worker_lost(worker: &WorkerInfo, lost_after: Duration, at: DateTime<Utc>) -> Alert {
        let silent = (at - worker.heartbeat_at).to_std().unwrap_or_default();
        let reason = format!(
            "no heartbeat since {} ({} ago; the limit is {})",
            worker.heartbeat_at.format("%Y-%m-%d %H:%M:%S UTC"),
            humantime::format_duration(round_to_seconds(silent)),
            humantime::format_duration(lost_after)
        );
        let title = format!("Worker {} lost", worker.name);
        let body = format!(
            "Worker {} (host {}, pid {}, queue {}, {} of {} slots busy) has sent {reason}.\n\
             The attempts it was running are retried when their leases expire. Check the host \
             and the process, then `butler list-workers`.",
            worker.name, worker.host, worker.pid, worker.queue, worker.running, worker.slots
        );
        let mut alert = Alert::new(AlertKind::WorkerLost, title, body, at);
        alert.worker = Some(worker.name.clone());
        alert.reason = Some(reason);
        alert
    }

    /// The report of the period from `since` to `at`: per workflow version, the runs that
    /// completed and failed in it and those running at its end.
    pub fn report(
        since: DateTime<Utc>,
        at: DateTime<Utc>,
        mut counts: Vec<WorkflowCounts>,
    ) -> Alert {
        counts.sort_by(|a, b| (&a.workflow, &a.version).cmp(&(&b.workflow, &b.version)));
        let total = |f: fn(&WorkflowCounts) -> u64| counts.iter().map(f).sum::<u64>();
        let (completed, failed, running) = (
            total(|c| c.completed),
            total(|c| c.failed),
            total(|c| c.running),
        );
        let title =
            format!("Butler report: {completed} completed, {failed} failed, {running} running");
        let period = format!(
            "Runs from {} to {}",
            since.format("%Y-%m-%d %H:%M UTC"),
            at.format("%Y-%m-%d %H:%M UTC")
        );
        let body = if counts.is_empty() {
            format!("{period}: no run completed, failed or was running.")
        } else {
            let names: Vec<String> = counts
                .iter()
                .map(|c| format!("{} {}", c.workflow, c.version))
                .collect();
            let width = names
                .iter()
                .map(|n| n.chars().count())
                .max()
                .unwrap_or(0)
                .max(8);
            let mut body = format!(
                "{period}:\n{:<width$}  {:>9}  {:>6}  {:>7}\n",
                "workflow", "completed", "failed", "running"
            );
            for (name, c) in names.iter().zip(&counts) {
                body.push_str(&format!(
                    "{name:<width$}  {:>9}  {:>6}  {:>7}\n",
                    c.completed, c.failed, c.running
                ));
            }
            body.push_str(&format!(
                "{:<width$}  {completed:>9}  {failed:>6}  {running:>7}",
                "total"
            ));
            body
        };
        let mut alert = Alert::new(AlertKind::Report, title, body, at);
        alert.since = Some(since);
        alert.counts = counts;
        alert
    }
}

/// The dashboard's page of run `id`.
fn run_link(id: Id, dashboard: Option<&str>) -> String {
    format!(
        "{}/runs/{id}",
        dashboard.unwrap_or_default().trim_end_matches('/')
    )
}

fn round_to_seconds(duration: Duration) -> Duration {
    Duration::from_secs(duration.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_totals_and_aligns_its_table() {
        let at = Utc::now();
        let alert = Alert::report(
            at - chrono::Duration::hours(4),
            at,
            vec![
                WorkflowCounts {
                    workflow: "variant-calling".into(),
                    version: "2.1".into(),
                    completed: 120,
                    failed: 3,
                    running: 7,
                },
                WorkflowCounts {
                    workflow: "align".into(),
                    version: "1.0".into(),
                    completed: 5,
                    failed: 0,
                    running: 0,
                },
            ],
        );
        assert_eq!(
            alert.title,
            "Butler report: 125 completed, 3 failed, 7 running"
        );
        let lines: Vec<&str> = alert.body.lines().collect();
        assert_eq!(lines[1], "workflow             completed  failed  running");
        assert_eq!(lines[2], "align 1.0                    5       0        0");
        assert_eq!(lines[3], "variant-calling 2.1        120       3        7");
        assert_eq!(lines[4], "total                      125       3        7");
        assert_eq!(alert.counts[0].workflow, "align");
        let json = serde_json::to_value(&alert).unwrap();
        assert_eq!(json["kind"], "report");
        assert!(json.get("run_id").is_none(), "{json}");

        let empty = Alert::report(at, at, Vec::new());
        assert!(
            empty
                .body
                .ends_with("no run completed, failed or was running.")
        );
    }
}
