//! The scheduler's rules for one run: which tasks to queue, which can never run, and when the
//! run is over. Pure functions of the run's stored state, so a restarted scheduler decides
//! exactly as the one before it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::change::{Change, ChangeSet, RunChange, TaskChange, TaskExpect};
use crate::definition::Definition;
use crate::model::{AnalysisRun, Id, RunStatus, TaskInstance, TaskState};

/// A task attempt to hand to the queue once the plan is committed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TaskMessage {
    /// The run.
    pub run: i64,
    /// The task.
    pub task: String,
    /// The attempt number the worker must find the task queued at.
    #[serde(rename = "try")]
    pub try_number: u32,
    /// The run's workflow, so the worker need not read the run.
    pub workflow: i64,
    /// The run's effective config.
    pub config: uuid::Uuid,
    /// How long the message stays invisible (a retry's backoff).
    #[serde(skip)]
    pub delay: Duration,
    /// Whether it is a Python task, which goes to the Python workers' queue.
    #[serde(skip)]
    pub python: bool,
}

/// A task a plan queues: the message to send once the plan is committed, and the task's row
/// as the plan leaves it (what a worker of the same process claims it from).
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedTask {
    /// The message.
    pub message: TaskMessage,
    /// The task, queued.
    pub row: TaskInstance,
}

/// What the scheduler does for one run.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    /// The changes, applied together or not at all.
    pub changes: ChangeSet,
    /// Tasks to send to the workers after the changes are committed.
    pub enqueue: Vec<QueuedTask>,
    /// The run's status after the plan, if it finishes the run.
    pub finishes: Option<RunStatus>,
    /// The run, when it stays `scheduled` with no task started: a task that this process's
    /// slots claim in the plan's own commit moves it to `in-progress` in that commit too
    /// (see `Scheduler::claim_for_slots`), rather than in a commit of its own later.
    pub unstarted: Option<Id>,
}

/// Plans run `run` whose tasks are `tasks`, at `now`, as `by`.
///
/// - a pending task whose needs all succeeded is queued as its next attempt;
/// - a pending task one of whose needs failed becomes `upstream_failed`;
/// - an `up_for_retry` task is queued again, its message delayed until the retry is due;
/// - a run past its `timeout` has its unfinished tasks cancelled and ends in `error`;
/// - when every task has finished, the run ends `completed`, or `error` naming the first task
///   that failed;
/// - a `scheduled` run with a started task becomes `in-progress`.
pub fn plan_run(
    def: &Definition,
    run: &AnalysisRun,
    tasks: &[TaskInstance],
    now: DateTime<Utc>,
    by: &str,
) -> Plan {
    let mut plan = Plan::default();
    if !matches!(run.status, RunStatus::Scheduled | RunStatus::InProgress) {
        return plan;
    }
    // Each task as stored, or as this plan leaves it.
    let mut current: HashMap<&str, Cow<'_, TaskInstance>> = tasks
        .iter()
        .map(|t| (t.task_id.as_str(), Cow::Borrowed(t)))
        .collect();

    if let Some(reason) = timed_out(def, run, now) {
        for task in tasks.iter().filter(|t| !t.state.is_finished()) {
            let new = TaskInstance {
                state: TaskState::Cancelled,
                token: None,
                lease_until: None,
                ended_at: Some(now),
                error: Some(reason.clone()),
                ..task.clone()
            };
            push_task(&mut plan, task, new, by, &reason);
        }
        finish(
            &mut plan,
            run,
            RunStatus::Error,
            Some(reason),
            run.started_at,
            now,
            by,
        );
        return plan;
    }

    let order = def.topological_order();
    for &def_task in &order {
        let Some(task) = current.get(def_task.id.as_str()) else {
            continue;
        };
        let new = match task.state {
            TaskState::Pending => {
                let failed_need = def_task.needs.iter().find(|need| {
                    current
                        .get(need.as_str())
                        .is_some_and(|t| t.state.is_failure())
                });
                if let Some(need) = failed_need {
                    let reason = format!("upstream task `{need}` did not succeed");
                    Some((
                        TaskInstance {
                            state: TaskState::UpstreamFailed,
                            ended_at: Some(now),
                            error: Some(reason.clone()),
                            ..TaskInstance::clone(task)
                        },
                        reason,
                        None,
                    ))
                } else if def_task.needs.iter().all(|need| {
                    current.get(need.as_str()).is_some_and(|t| {
                        matches!(t.state, TaskState::Succeeded | TaskState::Skipped)
                    })
                }) {
                    Some((
                        queued(task, now),
                        "its needs succeeded".to_owned(),
                        Some(Duration::ZERO),
                    ))
                } else {
                    None
                }
            }
            TaskState::UpForRetry => {
                let due = task.next_try_at.unwrap_or(now);
                let delay = (due - now).to_std().unwrap_or(Duration::ZERO);
                let reason = format!("retry {} is due", task.failures.max(1));
                Some((queued(task, now), reason, Some(delay)))
            }
            _ => None,
        };
        if let Some((new, reason, delay)) = new {
            if let Some(delay) = delay {
                plan.enqueue.push(QueuedTask {
                    message: TaskMessage {
                        run: run.id,
                        task: new.task_id.clone(),
                        try_number: new.try_number,
                        workflow: run.workflow_id,
                        config: run.effective_config_id,
                        delay,
                        python: def_task.python.is_some(),
                    },
                    row: new.clone(),
                });
            }
            push_task(&mut plan, task, new.clone(), by, &reason);
            current.insert(def_task.id.as_str(), Cow::Owned(new));
        }
    }

    let all: Vec<&TaskInstance> = current.values().map(|t| t.as_ref()).collect();
    let first_start = run
        .started_at
        .or_else(|| all.iter().filter_map(|t| t.started_at).min());
    if all.iter().all(|t| t.state.is_finished()) {
        let failed = order.iter().find_map(|d| {
            current
                .get(d.id.as_str())
                .filter(|t| t.state.is_failure() && t.state != TaskState::UpstreamFailed)
        });
        match failed {
            None => finish(
                &mut plan,
                run,
                RunStatus::Completed,
                None,
                first_start,
                now,
                by,
            ),
            Some(task) => {
                let why = task.error.as_deref().unwrap_or(task.state.as_str());
                let reason = format!("task `{}` {}: {why}", task.task_id, task.state);
                finish(
                    &mut plan,
                    run,
                    RunStatus::Error,
                    Some(reason),
                    first_start,
                    now,
                    by,
                );
            }
        }
    } else if run.status == RunStatus::Scheduled {
        match all.iter().filter_map(|t| t.started_at).min() {
            Some(started) => plan.changes.push(started_change(run.id, started, by)),
            None => plan.unstarted = Some(run.id),
        }
    }
    plan
}

/// Run `run_id`, `scheduled`, goes `in-progress`: its first task started at `started`.
pub fn started_change(run_id: Id, started: DateTime<Utc>, by: &str) -> Change {
    Change::Run(RunChange {
        run_id,
        expect: RunStatus::Scheduled,
        status: RunStatus::InProgress,
        error: None,
        started_at: Some(started),
        ended_at: None,
        by: by.to_owned(),
        reason: "a task started".to_owned(),
    })
}

/// The reason run `run` is past its timeout at `now`, if it is.
fn timed_out(def: &Definition, run: &AnalysisRun, now: DateTime<Utc>) -> Option<String> {
    let limit = def.timeout?;
    let started = run.started_at?;
    let deadline = started + chrono::Duration::from_std(limit).ok()?;
    (now >= deadline).then(|| format!("run timed out after {}", humantime::format_duration(limit)))
}

/// When run `run` times out, if it has a timeout and has started.
pub fn run_deadline(def: &Definition, run: &AnalysisRun) -> Option<DateTime<Utc>> {
    Some(run.started_at? + chrono::Duration::from_std(def.timeout?).ok()?)
}

fn queued(task: &TaskInstance, now: DateTime<Utc>) -> TaskInstance {
    TaskInstance {
        state: TaskState::Queued,
        try_number: task.try_number + 1,
        token: None,
        lease_until: None,
        worker: None,
        queued_at: Some(now),
        next_try_at: None,
        ..task.clone()
    }
}

fn push_task(plan: &mut Plan, old: &TaskInstance, new: TaskInstance, by: &str, reason: &str) {
    plan.changes.push(Change::Task(TaskChange {
        expect: TaskExpect::of(old),
        new,
        by: by.to_owned(),
        reason: reason.to_owned(),
    }));
}

fn finish(
    plan: &mut Plan,
    run: &AnalysisRun,
    status: RunStatus,
    error: Option<String>,
    started_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    by: &str,
) {
    let reason = error
        .clone()
        .unwrap_or_else(|| "every task succeeded".to_owned());
    plan.changes.push(Change::Run(RunChange {
        run_id: run.id,
        expect: run.status,
        status,
        error,
        started_at,
        ended_at: Some(now),
        by: by.to_owned(),
        reason,
    }));
    plan.finishes = Some(status);
}
