//! `run-status`, `logs`, `events`, `reset-run` and `cancel-run`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use butler_core::engine::control::ResetScope;
use butler_core::executor::log_file;
use butler_core::model::{AnalysisRun, TaskInstance, TaskState};
use butler_core::tracker::Tracker;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::opt::{CancelRun, Logs, ResetRun, RunView};
use crate::output::{self, Table, opt_timestamp, precise_timestamp, print_json, timestamp};

/// How often `logs -f` looks for new output and for the end of the task.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// Prints a run's status, then a table of its tasks.
pub async fn run_status(tracker: &Tracker, args: RunView, out: &mut impl Write) -> Result<()> {
    let (run, tasks) = tracker.run_with_tasks(args.run).await?;
    let now = Utc::now();
    let mut table = Table::with_keys(&[
        ("TASK", "task"),
        ("STATE", "state"),
        ("TRY", "try"),
        ("STARTED", "started"),
        ("DURATION", "duration_seconds"),
        ("EXIT", "exit_code"),
        ("ERROR", "error"),
    ]);
    for task in &tasks {
        let took = task_duration(task, now);
        let took = match took {
            Some(took) if args.json => json!(took.as_secs_f64()),
            Some(took) => Value::from(output::duration(took)),
            None => Value::Null,
        };
        table.push(vec![
            Value::from(task.task_id.as_str()),
            Value::from(task.state.as_str()),
            Value::from(task.try_number),
            opt_timestamp(task.started_at),
            took,
            task.exit_code.map_or(Value::Null, Value::from),
            task.error.as_deref().map_or(Value::Null, Value::from),
        ]);
    }
    if args.json {
        let value = json!({
            "id": run.id,
            "workflow": run.workflow_id,
            "analysis": run.analysis_id,
            "status": run.status.as_str(),
            "error": run.error,
            "source": run.source_file,
            "created": timestamp(run.created_at),
            "started": opt_timestamp(run.started_at),
            "ended": opt_timestamp(run.ended_at),
            "tasks": table.to_json(),
        });
        print_json(out, &value)?;
        return Ok(());
    }
    let mut fields = vec![
        ("run", run.id.to_string()),
        ("status", run.status.to_string()),
    ];
    if let Some(error) = &run.error {
        fields.push(("error", error.clone()));
    }
    fields.push(("workflow", run.workflow_id.to_string()));
    fields.push(("analysis", run.analysis_id.to_string()));
    if let Some(source) = &run.source_file {
        fields.push(("source", source.clone()));
    }
    fields.push(("created", cell(timestamp(run.created_at))));
    if let Some(started) = run.started_at {
        fields.push(("started", cell(timestamp(started))));
    }
    if let Some(ended) = run.ended_at {
        fields.push(("ended", cell(timestamp(ended))));
    }
    for (name, value) in fields {
        writeln!(out, "{:<10}{value}", format!("{name}:"))?;
    }
    writeln!(out)?;
    table.print(out, false)?;
    Ok(())
}

/// Prints a run's event log, oldest first.
pub async fn events(tracker: &Tracker, args: RunView, out: &mut impl Write) -> Result<()> {
    let mut table = Table::with_keys(&[
        ("AT", "at"),
        ("TASK", "task"),
        ("TRY", "try"),
        ("FROM", "from"),
        ("TO", "to"),
        ("BY", "by"),
        ("REASON", "reason"),
    ]);
    for event in tracker.events(args.run).await? {
        table.push(vec![
            precise_timestamp(event.at),
            event.task_id.map_or(Value::Null, Value::from),
            event.try_number.map_or(Value::Null, Value::from),
            Value::from(event.from),
            Value::from(event.to),
            Value::from(event.by),
            Value::from(event.reason),
        ]);
    }
    table.print(out, args.json)?;
    Ok(())
}

/// Puts a finished run back to `ready` and prints what will run again.
pub async fn reset(tracker: &Tracker, args: ResetRun, out: &mut impl Write) -> Result<()> {
    let (scope, what) = if args.all {
        (ResetScope::All, "every task")
    } else {
        (ResetScope::Failed, "the tasks that did not succeed")
    };
    tracker.reset_run(args.run, scope).await?;
    writeln!(
        out,
        "Reset run {}: {what} will run again once a scheduler takes it (`butler wait`, or a \
         running `butler server`)",
        args.run
    )?;
    Ok(())
}

/// Cancels an unfinished run.
pub async fn cancel(tracker: &Tracker, args: CancelRun, out: &mut impl Write) -> Result<()> {
    tracker.cancel_run(args.run).await?;
    writeln!(
        out,
        "Cancelled run {}: its waiting tasks will not start and its running ones are killed by \
         their workers",
        args.run
    )?;
    Ok(())
}

/// Prints the output of a run's attempts: one task's (its latest or `--try N`), or every started
/// task's latest under a header; with `--follow`, keeps printing until it has finished.
pub async fn logs(tracker: &Tracker, home: &Path, args: Logs, out: &mut impl Write) -> Result<()> {
    let (run, tasks) = tracker.run_with_tasks(args.run).await?;
    let chosen = match &args.task {
        Some(task_id) => Some(find_task(&run, &tasks, task_id)?),
        None => None,
    };
    if let (Some(task), Some(try_number)) = (chosen, args.try_number) {
        check_try(&run, task, try_number)?;
    }
    if args.follow {
        return follow(tracker, home, &args, out).await;
    }
    let mut tail = Tail::new(args.task.is_none());
    if let Some(task) = chosen {
        let try_number = match args.try_number {
            Some(try_number) => try_number,
            None => match task.last_started_try() {
                0 => bail!(
                    "task `{}` of run {} has not started yet (it is {}); its log appears once \
                     it runs: follow it with `butler logs -r {} -t {} -f`",
                    task.task_id,
                    run.id,
                    task.state,
                    run.id,
                    task.task_id
                ),
                last => last,
            },
        };
        let path = log_file(home, run.id, &task.task_id, try_number);
        if !tail.pump(&path, &task.task_id, try_number, true, out)? {
            bail!(
                "task `{}` try {try_number} of run {} left no log at {}: it failed before its \
                 command started (see `butler run-status -r {}`), or it ran with another \
                 BUTLER_HOME",
                task.task_id,
                run.id,
                path.display(),
                run.id
            );
        }
        return Ok(());
    }
    let mut any = false;
    for task in &tasks {
        let try_number = task.last_started_try();
        if try_number == 0 {
            continue;
        }
        let path = log_file(home, run.id, &task.task_id, try_number);
        if tail.pump(&path, &task.task_id, try_number, true, out)? {
            any = true;
        } else {
            eprintln!(
                "note: task `{}` try {try_number} has no log at {}",
                task.task_id,
                path.display()
            );
        }
    }
    if !any {
        bail!(
            "run {} has no task output yet (it is {}); run it with `butler wait`, or follow it \
             with `butler logs -r {} -f`",
            run.id,
            run.status,
            run.id
        );
    }
    Ok(())
}

/// `logs --follow`: prints new output every [`FOLLOW_EVERY`] until the attempt, the task or the
/// run has finished.
async fn follow(tracker: &Tracker, home: &Path, args: &Logs, out: &mut impl Write) -> Result<()> {
    let mut tail = Tail::new(args.task.is_none());
    // The first attempt shown of each task: the latest when following starts.
    let mut from: HashMap<String, u32> = HashMap::new();
    loop {
        // State first, output second: whatever an attempt wrote before it was seen finished
        // is in its log by the time the log is read.
        let (run, tasks) = tracker.run_with_tasks(args.run).await?;
        let selected: Vec<&TaskInstance> = tasks
            .iter()
            .filter(|t| args.task.as_deref().is_none_or(|id| t.task_id == id))
            .collect();
        let over = run.status.is_finished()
            || match (&args.task, args.try_number) {
                (Some(_), Some(try_number)) => selected.iter().all(|t| {
                    t.try_number > try_number
                        || !matches!(t.state, TaskState::Queued | TaskState::Running)
                }),
                (Some(_), None) => selected.iter().all(|t| t.state.is_finished()),
                (None, _) => false,
            };
        for task in selected {
            let last = task.last_started_try();
            let first = *from
                .entry(task.task_id.clone())
                .or_insert_with(|| args.try_number.unwrap_or(last.max(1)));
            let upto = args
                .try_number
                .map_or(last, |try_number| try_number.min(last));
            for try_number in first..=upto {
                let path = log_file(home, run.id, &task.task_id, try_number);
                tail.pump(&path, &task.task_id, try_number, false, out)?;
            }
        }
        out.flush()?;
        if over {
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

/// Copies the new part of attempt logs to the output, with a `==> task (try N) <==` header
/// whenever the output switches to another attempt.
struct Tail {
    /// Whether the first attempt printed gets a header too (several tasks are shown).
    headers: bool,
    offsets: HashMap<(String, u32), u64>,
    current: Option<(String, u32)>,
    ends_line: bool,
}

impl Tail {
    fn new(headers: bool) -> Tail {
        Tail {
            headers,
            offsets: HashMap::new(),
            current: None,
            ends_line: true,
        }
    }

    /// Prints what the log at `path` gained since the last call (with `show_empty`, a header
    /// even if that is nothing); returns whether the log exists.
    fn pump(
        &mut self,
        path: &Path,
        task_id: &str,
        try_number: u32,
        show_empty: bool,
        out: &mut impl Write,
    ) -> Result<bool> {
        let key = (task_id.to_owned(), try_number);
        let offset = self.offsets.get(&key).copied().unwrap_or(0);
        let mut file = match File::open(path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(err) => {
                return Err(err).with_context(|| format!("cannot read log {}", path.display()));
            }
        };
        let mut new = Vec::new();
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_to_end(&mut new))
            .with_context(|| format!("cannot read log {}", path.display()))?;
        let switching = self.current.as_ref() != Some(&key);
        if new.is_empty() && !(show_empty && switching) {
            return Ok(true);
        }
        if switching {
            if self.current.is_some() {
                if !self.ends_line {
                    writeln!(out)?;
                }
                writeln!(out)?;
            }
            if self.headers || self.current.is_some() {
                writeln!(out, "==> {task_id} (try {try_number}) <==")?;
            }
            self.ends_line = true;
            self.current = Some(key.clone());
        }
        if !new.is_empty() {
            out.write_all(&new)?;
            self.ends_line = new.last() == Some(&b'\n');
            self.offsets.insert(key, offset + new.len() as u64);
        }
        Ok(true)
    }
}

fn find_task<'a>(
    run: &AnalysisRun,
    tasks: &'a [TaskInstance],
    task_id: &str,
) -> Result<&'a TaskInstance> {
    match tasks.iter().find(|t| t.task_id == task_id) {
        Some(task) => Ok(task),
        None => {
            let names: Vec<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
            bail!(
                "run {} has no task `{task_id}`; its tasks are: {}",
                run.id,
                names.join(", ")
            )
        }
    }
}

/// Checks that attempt `try_number` of `task` has started or is about to.
fn check_try(run: &AnalysisRun, task: &TaskInstance, try_number: u32) -> Result<()> {
    if try_number == 0 || try_number > task.try_number {
        let has = match task.try_number {
            0 => "has not started yet".to_owned(),
            1 => "has had one attempt, --try 1".to_owned(),
            last => format!("has had attempts 1 to {last}"),
        };
        bail!(
            "task `{}` of run {} has no attempt {try_number}: it {has}",
            task.task_id,
            run.id
        );
    }
    Ok(())
}

/// How long the task's latest attempt ran, or has been running.
fn task_duration(task: &TaskInstance, now: DateTime<Utc>) -> Option<Duration> {
    let started = task.started_at?;
    let ended = match (task.state, task.ended_at) {
        (TaskState::Running, _) => now,
        (_, Some(ended)) => ended,
        (_, None) => return None,
    };
    (ended - started).to_std().ok()
}

fn cell(value: Value) -> String {
    match value {
        Value::String(text) => text,
        other => other.to_string(),
    }
}
