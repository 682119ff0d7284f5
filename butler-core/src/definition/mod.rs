//! Workflow definitions: the DAG of tasks, parsed from TOML or JSON, validated and rendered.
//!
//! ```
//! use butler_core::definition::{Definition, Format};
//! use serde_json::json;
//!
//! let text = r#"
//!     [[tasks]]
//!     id = "align"
//!     run = "bwa mem -t {{ config.threads }} ref.fa {{ config.sample }}.fq"
//!
//!     [[tasks]]
//!     id = "report"
//!     run = "make-report {{ config.sample }}"
//!     needs = ["align"]
//! "#;
//! let definition = Definition::parse(text, Format::Toml, "wf.toml").unwrap();
//! let renderer = definition.renderer().unwrap();
//! let tasks = renderer.render(&json!({"threads": 8, "sample": "S1"})).unwrap();
//! assert_eq!(tasks[0].command, "bwa mem -t 8 ref.fa S1.fq");
//! ```

mod parse;
mod render;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use render::{RenderedTask, Renderer};

use crate::{Error, Result};

/// A workflow's DAG of tasks and its run-level settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// The tasks, in file order.
    pub tasks: Vec<TaskDef>,
    /// At most this many runs of the workflow execute at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_active_runs: Option<u32>,
    /// A run still unfinished this long after it started is cancelled and fails.
    #[serde(
        default,
        with = "duration_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// A run still unfinished this long after it started is reported overdue (it keeps
    /// running): the `run_overdue` alert of [`crate::notify`].
    #[serde(
        default,
        with = "duration_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub expected_duration: Option<Duration>,
    /// Which notifiers hear about this workflow's runs, instead of the defaults of the notify
    /// config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<WorkflowNotify>,
}

/// The `[notify]` table of a definition: the notifiers (declared in the notify config) that
/// receive this workflow's alerts. A list given here replaces the config's default for that
/// alert; an empty list silences it; a list left out keeps the default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowNotify {
    /// Notifiers told when a run ends in `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<Vec<String>>,
    /// Notifiers told when a run outlasts `expected_duration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_overdue: Option<Vec<String>>,
}

impl WorkflowNotify {
    /// Every notifier name the table mentions, with the key that mentions it.
    pub fn names(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.on_failure
            .iter()
            .flatten()
            .map(|n| ("on_failure", n.as_str()))
            .chain(
                self.on_overdue
                    .iter()
                    .flatten()
                    .map(|n| ("on_overdue", n.as_str())),
            )
    }
}

/// One task of a workflow definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskDef {
    /// Identifier, unique within the definition.
    pub id: String,
    /// Shell command, a Jinja template rendered against the effective config as `config`;
    /// empty for a Python task.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub run: String,
    /// A Python function to call instead of a command, as `module.path:function`; such tasks
    /// are executed by Python workers (`python -m butler worker`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<String>,
    /// Tasks that must succeed before this one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// An attempt running longer than this is killed (start to close).
    #[serde(
        default,
        with = "duration_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// How many times a failed attempt is retried.
    #[serde(default)]
    pub retries: u32,
    /// Delay before the first retry; later retries back off exponentially.
    #[serde(
        default,
        with = "duration_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_delay: Option<Duration>,
    /// Upper bound of the backoff delay.
    #[serde(
        default,
        with = "duration_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_retry_delay: Option<Duration>,
    /// Keep retrying until this long after the first attempt started, whatever `retries` says.
    #[serde(
        default,
        with = "duration_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_for: Option<Duration>,
    /// Exit codes that fail the task at once, without retry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permanent_exit_codes: Vec<i32>,
    /// Extra environment variables for the command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// The syntax a definition is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// TOML, the usual form: one `[[tasks]]` table per task.
    Toml,
    /// JSON: an object with a `tasks` array.
    Json,
}

impl Format {
    /// The format of the file at `path`: [`Format::Json`] for a `.json` extension (any case),
    /// [`Format::Toml`] otherwise.
    pub fn from_path(path: &Path) -> Format {
        match path.extension() {
            Some(ext) if ext.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Toml,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Toml => "TOML",
            Format::Json => "JSON",
        })
    }
}

impl Definition {
    /// Parses and fully validates a definition written in `format`; `source` (usually the file
    /// name) starts every error message.
    ///
    /// Rejected, each with an [`Error::InvalidInput`] naming the task where there is one:
    /// syntax errors (with line and column), unknown keys, bad durations, no tasks, a duplicate
    /// or malformed task id (ids are `[A-Za-z0-9_.-]+`, as they become directory names), an empty
    /// `run`, a need naming an unknown task or the task itself, a cycle of needs, a template
    /// syntax error or a variable other than `config` in `run` or an `env` value, a malformed
    /// `env` name, `max_active_runs = 0`, a zero `timeout`, a `max_retry_delay` shorter than
    /// the `retry_delay`, a zero `expected_duration` or one not shorter than the `timeout`, a
    /// `[notify]` table naming a notifier twice or with a malformed name, and `on_overdue`
    /// without an `expected_duration`. Whether the notifiers it names are declared is checked
    /// against the notify config by
    /// [`NotifyConfig::check_definition`](crate::notify::NotifyConfig::check_definition).
    pub fn parse(text: &str, format: Format, source: &str) -> Result<Definition> {
        parse::parse(text, format, source)
    }

    /// Reads the definition file at `path` and [parses](Self::parse) it, as JSON if its
    /// extension is `.json` and as TOML otherwise.
    pub fn from_file(path: &Path) -> Result<Definition> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| {
            Error::InvalidInput(format!("cannot read workflow definition {source}: {err}"))
        })?;
        Definition::parse(&text, Format::from_path(path), &source)
    }

    /// The task called `id`.
    pub fn task(&self, id: &str) -> Option<&TaskDef> {
        self.tasks.iter().find(|task| task.id == id)
    }

    /// The ids of the tasks that need `id` directly, in file order.
    pub fn downstream(&self, id: &str) -> Vec<&str> {
        self.tasks
            .iter()
            .filter(|task| task.needs.iter().any(|need| need == id))
            .map(|task| task.id.as_str())
            .collect()
    }

    /// Every task, each after all the tasks it needs; among tasks ready at the same time, file
    /// order wins, so the order is stable.
    ///
    /// On a definition that did not pass [`Definition::parse`], needs naming unknown tasks are
    /// ignored and tasks caught in a cycle come last, in file order.
    pub fn topological_order(&self) -> Vec<&TaskDef> {
        if self.lists_needs_first() {
            return self.tasks.iter().collect();
        }
        let index: HashMap<&str, usize> = self
            .tasks
            .iter()
            .enumerate()
            .map(|(i, task)| (task.id.as_str(), i))
            .collect();
        let mut waiting_on = vec![0usize; self.tasks.len()];
        let mut unblocks: Vec<Vec<usize>> = vec![Vec::new(); self.tasks.len()];
        for (i, task) in self.tasks.iter().enumerate() {
            let needs: BTreeSet<usize> = task
                .needs
                .iter()
                .filter_map(|need| index.get(need.as_str()).copied())
                .filter(|&j| j != i)
                .collect();
            waiting_on[i] = needs.len();
            for j in needs {
                unblocks[j].push(i);
            }
        }
        let mut ready: BTreeSet<usize> = (0..self.tasks.len())
            .filter(|&i| waiting_on[i] == 0)
            .collect();
        let mut done = vec![false; self.tasks.len()];
        let mut order = Vec::with_capacity(self.tasks.len());
        while let Some(i) = ready.pop_first() {
            done[i] = true;
            order.push(&self.tasks[i]);
            for &j in &unblocks[i] {
                waiting_on[j] -= 1;
                if waiting_on[j] == 0 {
                    ready.insert(j);
                }
            }
        }
        order.extend(
            self.tasks
                .iter()
                .zip(done)
                .filter(|(_, done)| !done)
                .map(|(task, _)| task),
        );
        order
    }

    /// Whether a short definition names every task after the tasks it needs, so that its
    /// file order is its topological order: most are written so, and the scheduler asks for
    /// the order at every plan. A need is looked up as the general order looks it up (the
    /// last task of that id), by scanning, which beats building an index only while the
    /// definition is short.
    fn lists_needs_first(&self) -> bool {
        const SHORT: usize = 32;
        self.tasks.len() <= SHORT
            && self.tasks.iter().enumerate().all(|(i, task)| {
                task.needs.iter().all(|need| {
                    self.tasks
                        .iter()
                        .rposition(|t| t.id == *need)
                        .is_some_and(|j| j < i)
                })
            })
    }

    /// Compiles every `run` and `env` template once, for rendering many effective configs.
    pub fn renderer(&self) -> Result<Renderer> {
        Renderer::new(self)
    }
}

/// Serde for optional durations written the human way (`"90s"`, `"5m"`, `"1h 30m"`).
mod duration_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| {
            humantime::parse_duration(&t).map_err(|e| {
                serde::de::Error::custom(format!(
                    "bad duration {t:?} ({e}); write it like \"30s\", \"5m\" or \"1h 30m\""
                ))
            })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(text: &str) -> Definition {
        Definition::parse(text, Format::Toml, "wf.toml").unwrap()
    }

    fn ids<'a>(tasks: impl IntoIterator<Item = &'a TaskDef>) -> Vec<&'a str> {
        tasks.into_iter().map(|t| t.id.as_str()).collect()
    }

    const DIAMOND: &str = r#"
        [[tasks]]
        id = "report"
        run = "r"
        needs = ["left", "right"]

        [[tasks]]
        id = "right"
        run = "r"
        needs = ["fetch"]

        [[tasks]]
        id = "left"
        run = "l"
        needs = ["fetch"]

        [[tasks]]
        id = "fetch"
        run = "f"

        [[tasks]]
        id = "lint"
        run = "x"
    "#;

    #[test]
    fn topological_order_puts_needs_first_and_keeps_file_order_among_ready_tasks() {
        let def = definition(DIAMOND);
        assert_eq!(
            ids(def.topological_order()),
            ["fetch", "right", "left", "report", "lint"]
        );
    }

    #[test]
    fn topological_order_of_a_definition_listed_needs_first_is_its_file_order() {
        let mut def = definition(DIAMOND);
        // fetch, lint, right, left, report: every task after its needs.
        let order = [3, 4, 1, 2, 0];
        def.tasks = order.iter().map(|&i| def.tasks[i].clone()).collect();
        assert!(def.lists_needs_first());
        assert_eq!(
            ids(def.topological_order()),
            ["fetch", "lint", "right", "left", "report"]
        );
        // A need of an unknown task, or of the task itself, takes the general order, which
        // ignores it.
        def.tasks[1].needs = vec!["lint".into(), "ghost".into()];
        assert!(!def.lists_needs_first());
        assert_eq!(
            ids(def.topological_order()),
            ["fetch", "lint", "right", "left", "report"]
        );
    }

    #[test]
    fn topological_order_keeps_every_task_of_an_unvalidated_cycle() {
        let mut def = definition(DIAMOND);
        def.tasks[3].needs = vec!["report".into(), "ghost".into()];
        assert_eq!(
            ids(def.topological_order()),
            ["lint", "report", "right", "left", "fetch"]
        );
    }

    #[test]
    fn task_and_downstream_look_up_by_id() {
        let def = definition(DIAMOND);
        assert_eq!(def.task("left").map(|t| t.run.as_str()), Some("l"));
        assert!(def.task("nope").is_none());
        assert_eq!(def.downstream("fetch"), ["right", "left"]);
        assert_eq!(def.downstream("left"), ["report"]);
        assert!(def.downstream("report").is_empty());
    }

    #[test]
    fn format_follows_the_extension() {
        assert_eq!(Format::from_path(Path::new("wf.json")), Format::Json);
        assert_eq!(Format::from_path(Path::new("wf.JSON")), Format::Json);
        assert_eq!(Format::from_path(Path::new("wf.toml")), Format::Toml);
        assert_eq!(Format::from_path(Path::new("workflow")), Format::Toml);
    }

    #[test]
    fn from_file_reads_json_by_extension_and_names_unreadable_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wf.json");
        std::fs::write(&path, r#"{"tasks": [{"id": "a", "run": "echo a"}]}"#).unwrap();
        let def = Definition::from_file(&path).unwrap();
        assert_eq!(def.tasks[0].id, "a");

        let missing = dir.path().join("missing.toml");
        match Definition::from_file(&missing) {
            Err(Error::InvalidInput(msg)) => {
                assert!(msg.contains(&missing.display().to_string()), "{msg}")
            }
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn from_file_errors_start_with_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wf.toml");
        std::fs::write(&path, "[[tasks]]\nid = \"a\"\nrun = \"\"\n").unwrap();
        match Definition::from_file(&path) {
            Err(Error::InvalidInput(msg)) => {
                assert!(msg.starts_with(&path.display().to_string()), "{msg}")
            }
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }
}
