//! The command line as typed: clap structs whose doc comments are the `--help` text.

use std::path::PathBuf;

use butler_core::model::{Id, RunStatus, parse_date};
use chrono::NaiveDate;
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

/// Butler: register workflows, create analyses, launch one analysis run per sample config and
/// run them.
///
/// The tracker lives in $BUTLER_HOME (default ~/.butler); --db or BUTLER_DB points at another
/// store.
#[derive(Debug, Parser)]
#[command(name = "butler", version)]
pub struct Opt {
    /// Store URL, e.g. sqlite:///path/to/butler.db [default: $BUTLER_HOME/butler.db].
    #[arg(long, env = "BUTLER_DB", global = true, value_name = "URL")]
    pub db: Option<String>,

    /// Queue URL for task attempts, e.g. memory:// [default: the store's own queue].
    #[arg(long, env = "BUTLER_QUEUE", global = true, value_name = "URL")]
    pub queue: Option<String>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Butler's commands, with the names and flags existing scripts use.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register a workflow: a name, a version, its config and its task definition.
    CreateWorkflow(CreateWorkflow),
    /// List registered workflows.
    ListWorkflows(JsonFlag),
    /// Create an analysis: a name, a start date and its config.
    CreateAnalysis(CreateAnalysis),
    /// List analyses.
    ListAnalyses(JsonFlag),
    /// Launch a workflow for an analysis: one run per JSON run config.
    LaunchWorkflow(LaunchWorkflow),
    /// List analysis runs, oldest first.
    ListRuns(ListRuns),
    /// Replace the config of a workflow or an analysis for runs launched from now on.
    UpdateConfig(UpdateConfig),
    /// Count the runs of an analysis, per status or for one status.
    GetRunCount(GetRunCount),
    /// Print the effective config a run was launched with.
    PrintEffectiveConfig(PrintEffectiveConfig),
    /// Print a stored config by its id.
    PrintConfig(PrintConfig),
    /// Print the commands a run's tasks run: each task's templates rendered with the run's
    /// effective config, as its attempts get them.
    PrintCommands(PrintCommands),
    /// Run every unfinished run in this process until all have finished; resumes an
    /// interrupted `launch-workflow --wait`.
    Wait(Wait),
    /// Run the scheduler and local workers until stopped with Ctrl-C or SIGTERM.
    ///
    /// One scheduler leads at a time: a second server (or `butler scheduler`) on the same store
    /// stands by and takes over when the leader stops or dies.
    Server(ServerArgs),
    /// Run the scheduler only (no worker) until stopped with Ctrl-C or SIGTERM; tasks run on
    /// `butler worker` processes.
    ///
    /// One scheduler leads at a time: start several for high availability; the others stand by
    /// and one takes over within seconds when the leader stops or dies.
    Scheduler,
    /// Run local workers only (no scheduler) until stopped with Ctrl-C or SIGTERM; adds
    /// capacity next to a `butler server` or `butler scheduler`.
    Worker(WorkerArgs),
    /// List the workers that report to the store, alive or lost.
    ///
    /// A worker reports every 5 seconds and is lost when 3 reports in a row are missing
    /// (BUTLER_HEARTBEAT_SECS sets another interval; it is meant for tests). Workers that stop
    /// cleanly leave the list; the tasks of a lost worker run again once their leases expire.
    ListWorkers(JsonFlag),
    /// Check that Butler can run here: the store, the queue, the executor, free disk space in
    /// BUTLER_HOME, a scheduler and workers. Prints one line per check; exits 1 if one failed.
    Doctor,
    /// Show a run's status and a table of its tasks.
    RunStatus(RunView),
    /// Print the output of a run's task attempts.
    Logs(Logs),
    /// Show a run's event log: every state change, who made it and why.
    Events(RunView),
    /// Put a finished run back to ready so its tasks that did not succeed run again.
    ResetRun(ResetRun),
    /// Cancel an unfinished run: its tasks stop and will not start.
    CancelRun(CancelRun),
    /// Create, list or delete the API tokens of `butler server`.
    #[command(subcommand)]
    Token(TokenCommand),
}

/// Arguments of `server`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// How many attempts run at once.
    #[command(flatten)]
    pub slots: Slots,
    /// Where the HTTP API, the dashboard and /metrics listen.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Serve without API tokens: anyone who can reach --listen may read, launch, reset and
    /// cancel. For local use only.
    #[arg(long)]
    pub no_auth: bool,
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print its secret, which is shown only this once.
    Create(TokenCreate),
    /// List the tokens: name, scope and creation time (never the secrets).
    List(JsonFlag),
    /// Delete a token: its secret stops working at once.
    Delete(TokenName),
}

/// Arguments of `token create`.
#[derive(Debug, Args)]
pub struct TokenCreate {
    /// Unique name, e.g. the program or person using it.
    #[arg(short = 'n', long = "name", value_name = "NAME")]
    pub name: String,
    /// The token may read everything but cannot launch, reset or cancel.
    #[arg(long)]
    pub read_only: bool,
}

/// Arguments of `token delete`.
#[derive(Debug, Args)]
pub struct TokenName {
    /// The token's name.
    #[arg(short = 'n', long = "name", value_name = "NAME")]
    pub name: String,
}

/// `--json` for commands that print a table.
#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print a JSON array of objects with the table's columns as keys.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `create-workflow`.
#[derive(Debug, Args)]
pub struct CreateWorkflow {
    /// Workflow name; unique together with the version.
    #[arg(short = 'n', long = "name", value_name = "NAME")]
    pub name: String,
    /// Workflow version, e.g. 1.0.
    #[arg(short = 'v', long = "version", value_name = "VERSION")]
    pub version: String,
    /// The workflow's config: a JSON object, the lowest layer of every run's config.
    #[arg(short = 'c', long = "config", value_name = "CONFIG.json")]
    pub config: PathBuf,
    /// Task definition (TOML or JSON) [default: $BUTLER_HOME/workflows/NAME.toml, or NAME.json].
    #[arg(long, value_name = "FILE")]
    pub definition: Option<PathBuf>,
}

/// Arguments of `create-analysis`.
#[derive(Debug, Args)]
pub struct CreateAnalysis {
    /// Analysis name.
    #[arg(short = 'n', long = "name", value_name = "NAME")]
    pub name: String,
    /// Start date, YYYY-MM-DD or MM-DD-YYYY [default: today, UTC].
    #[arg(short = 'd', long = "date", value_name = "DATE", value_parser = parse_date)]
    pub date: Option<NaiveDate>,
    /// The analysis's config: a JSON object, layered over the workflow's config.
    #[arg(short = 'c', long = "config", value_name = "CONFIG.json")]
    pub config: PathBuf,
}

/// Arguments of `launch-workflow`.
#[derive(Debug, Args)]
pub struct LaunchWorkflow {
    /// The workflow to run.
    #[arg(short = 'w', long = "workflow", value_name = "WORKFLOW_ID")]
    pub workflow: Id,
    /// The analysis the runs belong to.
    #[arg(short = 'a', long = "analysis", value_name = "ANALYSIS_ID")]
    pub analysis: Id,
    /// A directory of run configs (every *.json under it, sorted) or one JSON file.
    #[arg(short = 'c', long = "config", value_name = "DIR_OR_FILE")]
    pub config: PathBuf,
    /// Launch run configs even if identical ones were already launched for this workflow and
    /// analysis.
    #[arg(long)]
    pub allow_duplicates: bool,
    /// Then run the launched runs in this process (a scheduler and local workers) and wait
    /// until every one has finished; exit 1 unless all completed. Resume an interrupted wait
    /// with `butler wait`.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: task attempts run at once [default: the number of CPUs].
    #[arg(long, value_name = "N", requires = "wait")]
    pub slots: Option<usize>,
}

/// Arguments of `list-runs`.
#[derive(Debug, Args)]
pub struct ListRuns {
    /// Only runs of this workflow.
    #[arg(short = 'w', long = "workflow", value_name = "ID")]
    pub workflow: Option<Id>,
    /// Only runs of this analysis.
    #[arg(short = 'a', long = "analysis", value_name = "ID")]
    pub analysis: Option<Id>,
    /// Only runs in this status: ready, scheduled, in-progress, completed, error, cancelled.
    #[arg(short = 's', long = "status", value_name = "STATUS")]
    pub status: Option<RunStatus>,
    /// At most this many runs.
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    /// Print a JSON array of objects with the table's columns as keys.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `update-config`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("owner").required(true).args(["workflow", "analysis"]))]
pub struct UpdateConfig {
    /// Replace this workflow's config.
    #[arg(short = 'w', long = "workflow", value_name = "ID")]
    pub workflow: Option<Id>,
    /// Replace this analysis's config.
    #[arg(short = 'a', long = "analysis", value_name = "ID")]
    pub analysis: Option<Id>,
    /// The new config: a JSON object.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: PathBuf,
}

/// Arguments of `get-run-count`.
#[derive(Debug, Args)]
pub struct GetRunCount {
    /// The analysis whose runs are counted.
    #[arg(short = 'a', long = "analysis", value_name = "ID")]
    pub analysis: Id,
    /// Print only the number of runs in this status.
    #[arg(short = 's', long = "status", value_name = "STATUS")]
    pub status: Option<RunStatus>,
    /// Print a JSON object {status: count}.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `print-effective-config`.
#[derive(Debug, Args)]
pub struct PrintEffectiveConfig {
    /// The run.
    #[arg(short = 'r', long = "run", value_name = "RUN_ID")]
    pub run: Id,
    /// Show which layer (workflow, analysis, run, butler) set every key.
    #[arg(long)]
    pub explain: bool,
    /// With --explain, print a JSON array of {path, layer, value} (the config itself is always
    /// printed as JSON).
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `print-config`.
#[derive(Debug, Args)]
pub struct PrintConfig {
    /// The config's id (a UUID, as printed by list-workflows and list-analyses).
    #[arg(short = 'c', long = "config", value_name = "CONFIG_ID", value_parser = parse_config_id)]
    pub config: Uuid,
}

/// `--slots` of `worker`, which runs nothing but its slots.
fn worker_slots(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("a worker with --slots 0 would run nothing; give --slots 1 or more".into()),
        Ok(slots) => Ok(slots),
        Err(e) => Err(format!("{e}; give --slots 1 or more")),
    }
}

/// A config id as `print-config` takes it: a UUID, surrounding spaces ignored.
fn parse_config_id(text: &str) -> Result<Uuid, String> {
    let text = text.trim();
    Uuid::parse_str(text).map_err(|e| {
        format!(
            "bad config id {text:?} ({e}); a config id is a UUID such as \
             67e55044-10b1-426f-9247-bb680e5fe0c8, printed by `butler list-workflows` and \
             `butler list-analyses`"
        )
    })
}

/// Arguments of `print-commands`.
#[derive(Debug, Args)]
pub struct PrintCommands {
    /// The run.
    #[arg(short = 'r', long = "run", value_name = "RUN_ID")]
    pub run: Id,
    /// Only this task.
    #[arg(short = 't', long = "task", value_name = "TASK")]
    pub task: Option<String>,
    /// Print a JSON array of {task, command, env}.
    #[arg(long)]
    pub json: bool,
}

/// `--slots` of the commands that run workers.
#[derive(Debug, Args)]
pub struct Slots {
    /// Task attempts run at once in this process [default: the number of CPUs].
    #[arg(long, value_name = "N")]
    pub slots: Option<usize>,
}

/// Arguments of `worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Task attempts run at once in this process, 1 or more [default: the number of CPUs].
    #[arg(long, value_name = "N", value_parser = worker_slots)]
    pub slots: Option<usize>,
    /// The worker's name in `list-workers`, unique among the workers of the store
    /// [default: HOST/PID].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

/// Arguments of `wait`.
#[derive(Debug, Args)]
pub struct Wait {
    /// Only runs of this analysis.
    #[arg(short = 'a', long = "analysis", value_name = "ID")]
    pub analysis: Option<Id>,
    /// Only runs of this workflow.
    #[arg(short = 'w', long = "workflow", value_name = "ID")]
    pub workflow: Option<Id>,
    /// How many attempts run at once.
    #[command(flatten)]
    pub slots: Slots,
}

/// Arguments of `run-status` and `events`.
#[derive(Debug, Args)]
pub struct RunView {
    /// The run.
    #[arg(short = 'r', long = "run", value_name = "RUN_ID")]
    pub run: Id,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `logs`.
#[derive(Debug, Args)]
pub struct Logs {
    /// The run.
    #[arg(short = 'r', long = "run", value_name = "RUN_ID")]
    pub run: Id,
    /// Only this task (by default: every task that started, each under a `==> task (try N) <==`
    /// header).
    #[arg(short = 't', long = "task", value_name = "TASK")]
    pub task: Option<String>,
    /// This attempt of the task [default: its latest].
    #[arg(long = "try", value_name = "N", requires = "task")]
    pub try_number: Option<u32>,
    /// Keep printing new output until the task (or, without -t, the run) has finished.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

/// Arguments of `reset-run`.
#[derive(Debug, Args)]
pub struct ResetRun {
    /// The run; it must have finished.
    #[arg(short = 'r', long = "run", value_name = "RUN_ID")]
    pub run: Id,
    /// Run every task again, not only those that did not succeed.
    #[arg(long)]
    pub all: bool,
}

/// Arguments of `cancel-run`.
#[derive(Debug, Args)]
pub struct CancelRun {
    /// The run; it must not have finished.
    #[arg(short = 'r', long = "run", value_name = "RUN_ID")]
    pub run: Id,
}
