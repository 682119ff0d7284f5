//! Parsing and validation of definitions, with errors that name the file, place and task.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use super::{Definition, Format, TaskDef, render};
use crate::config::{json_error_message, json_type_name};
use crate::{Error, Result};

/// How many known ids an unknown-need error lists before eliding the rest.
const KNOWN_IDS_SHOWN: usize = 10;

pub(super) fn parse(text: &str, format: Format, source: &str) -> Result<Definition> {
    let definition = match format {
        Format::Toml => parse_toml(text, source)?,
        Format::Json => parse_json(text, source)?,
    };
    validate(&definition, source)?;
    Ok(definition)
}

fn parse_toml(text: &str, source: &str) -> Result<Definition> {
    let err = match toml::from_str::<Definition>(text) {
        Ok(definition) => return Ok(definition),
        Err(err) => err,
    };
    let message = err.message().trim_end();
    let location = err
        .span()
        .map(|span| line_column(text, span.start))
        .map_or_else(String::new, |(line, column)| format!(":{line}:{column}"));
    let document = toml::from_str::<toml::Table>(text)
        .ok()
        .and_then(|table| serde_json::to_value(table).ok());
    Err(match document {
        None => invalid(format!("{source}{location}: invalid TOML: {message}")),
        Some(document) => blame(&document, source, &location, message),
    })
}

fn parse_json(text: &str, source: &str) -> Result<Definition> {
    let err = match serde_json::from_str::<Definition>(text) {
        Ok(definition) => return Ok(definition),
        Err(err) => err,
    };
    let message = json_error_message(&err);
    let location = format!(":{}:{}", err.line(), err.column());
    Err(match serde_json::from_str::<Value>(text) {
        Err(_) => invalid(format!("{source}{location}: invalid JSON: {message}")),
        Ok(document) => blame(&document, source, &location, &message),
    })
}

/// The error of a document that is well-formed but does not fit [`Definition`]: names the task
/// the typed parse failed on, found by deserializing the tasks one by one.
fn blame(document: &Value, source: &str, location: &str, message: &str) -> Error {
    let Some(fields) = document.as_object() else {
        return invalid(format!(
            "{source}: a workflow definition must be an object with a `tasks` array, found {}",
            json_type_name(document)
        ));
    };
    let Some(tasks) = fields.get("tasks") else {
        if message.contains("missing field `tasks`") {
            return no_tasks(source);
        }
        return invalid(format!("{source}{location}: {message}"));
    };
    for (i, task) in tasks.as_array().into_iter().flatten().enumerate() {
        let Err(err) = serde_json::from_value::<TaskDef>(task.clone()) else {
            continue;
        };
        let task_message = json_error_message(&err);
        if !(message.contains(&task_message) || task_message.contains(message)) {
            continue;
        }
        let label = match task.get("id").and_then(Value::as_str) {
            Some(id) => format!("task `{id}`"),
            None => format!("task #{}", i + 1),
        };
        let detail = if task_message.starts_with("missing field `id`") {
            " has no `id`; give every task a unique id of letters, digits, `_`, `.` and `-`"
                .to_owned()
        } else {
            format!(": {message}")
        };
        return invalid(format!("{source}{location}: {label}{detail}"));
    }
    invalid(format!("{source}{location}: {message}"))
}

/// Whether `target` reads `module.path:function` with Python identifiers.
fn is_python_target(target: &str) -> bool {
    let identifier = |part: &str| {
        let mut chars = part.chars();
        chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
            && chars.all(|c| c.is_alphanumeric() || c == '_')
    };
    target
        .split_once(':')
        .is_some_and(|(module, function)| module.split('.').all(identifier) && identifier(function))
}

fn no_tasks(source: &str) -> Error {
    invalid(format!(
        "{source}: the definition has no tasks; add at least one (a `[[tasks]]` table in TOML, an \
         entry of the `tasks` array in JSON) with an `id` and a `run` command"
    ))
}

fn invalid(message: String) -> Error {
    Error::InvalidInput(message)
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn validate(definition: &Definition, source: &str) -> Result<()> {
    if definition.tasks.is_empty() {
        return Err(no_tasks(source));
    }
    if definition.max_active_runs == Some(0) {
        return Err(invalid(format!(
            "{source}: `max_active_runs = 0` would never start a run; set it to 1 or more, or \
             remove it for no limit"
        )));
    }
    if definition.timeout == Some(Duration::ZERO) {
        return Err(invalid(format!(
            "{source}: a zero `timeout` would fail every run at once; give a duration such as \
             \"2h\", or remove it for no run timeout"
        )));
    }

    check_alerts(definition, source)?;

    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    for (i, task) in definition.tasks.iter().enumerate() {
        check_task(task, source)?;
        if let Some(first) = first_seen.insert(&task.id, i) {
            return Err(invalid(format!(
                "{source}: task `{}` is defined twice (tasks #{} and #{}); give each task a \
                 unique id",
                task.id,
                first + 1,
                i + 1
            )));
        }
    }

    for task in &definition.tasks {
        for need in &task.needs {
            if need == &task.id {
                return Err(invalid(format!(
                    "{source}: task `{}` needs itself; remove `{need}` from its needs",
                    task.id
                )));
            }
            if !first_seen.contains_key(need.as_str()) {
                return Err(invalid(format!(
                    "{source}: task `{}` needs `{need}`, which is not a task of this \
                     definition (tasks: {}); fix the name or add the task",
                    task.id,
                    known_ids(definition)
                )));
            }
        }
    }

    if let Some(cycle) = find_cycle(definition, &first_seen) {
        return Err(invalid(format!(
            "{source}: the tasks' needs form a cycle: {} (each task needs the next); remove one \
             of these needs",
            cycle.join(" -> ")
        )));
    }

    render::compile(definition, Some(source)).map(drop)
}

/// `expected_duration` and the `[notify]` table.
fn check_alerts(definition: &Definition, source: &str) -> Result<()> {
    if let Some(expected) = definition.expected_duration {
        if expected == Duration::ZERO {
            return Err(invalid(format!(
                "{source}: a zero `expected_duration` would report every run overdue at once; \
                 give a duration such as \"2h\", or remove it"
            )));
        }
        if let Some(timeout) = definition.timeout
            && expected >= timeout
        {
            return Err(invalid(format!(
                "{source}: `expected_duration` ({}) is not shorter than `timeout` ({}), so a run \
                 would fail before it is overdue; lower `expected_duration` or raise `timeout`",
                humantime::format_duration(expected),
                humantime::format_duration(timeout)
            )));
        }
    }
    let Some(notify) = &definition.notify else {
        return Ok(());
    };
    if notify
        .on_overdue
        .as_ref()
        .is_some_and(|names| !names.is_empty())
        && definition.expected_duration.is_none()
    {
        return Err(invalid(format!(
            "{source}: `[notify] on_overdue` names notifiers, but no run can be overdue without \
             an `expected_duration`; add one such as `expected_duration = \"2h\"`"
        )));
    }
    for (key, names) in [
        ("on_failure", &notify.on_failure),
        ("on_overdue", &notify.on_overdue),
    ] {
        let names = names.as_deref().unwrap_or_default();
        for (i, name) in names.iter().enumerate() {
            if !crate::notify::is_notifier_name(name) {
                return Err(invalid(format!(
                    "{source}: `[notify] {key}` names notifier {name:?}, which is not a valid \
                     name; use the name of a `[notifiers.NAME]` table of the notify config \
                     (letters, digits, `_`, `.` and `-`)"
                )));
            }
            if names[..i].contains(name) {
                return Err(invalid(format!(
                    "{source}: `[notify] {key}` names notifier `{name}` twice; keep one"
                )));
            }
        }
    }
    Ok(())
}

fn check_task(task: &TaskDef, source: &str) -> Result<()> {
    let id = &task.id;
    let valid_id = !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid_id {
        return Err(invalid(format!(
            "{source}: task id {id:?} is not allowed: ids become directory names, so use only \
             letters, digits, `_`, `.` and `-` (and not `.` or `..` alone)"
        )));
    }
    match (&task.python, task.run.trim().is_empty()) {
        (None, true) => {
            return Err(invalid(format!(
                "{source}: task `{id}` has no `run` command (or an empty one); give it the shell \
                 command to execute, or `python = \"module:function\"` for a Python function"
            )));
        }
        (Some(_), false) => {
            return Err(invalid(format!(
                "{source}: task `{id}` has both `run` and `python`; keep the one it should execute"
            )));
        }
        (Some(target), true) if !is_python_target(target) => {
            return Err(invalid(format!(
                "{source}: task `{id}` has `python = {target:?}`, which is not \
                 `module.path:function`; write it like \"pipeline.steps:align\""
            )));
        }
        _ => {}
    }
    if task.timeout == Some(Duration::ZERO) {
        return Err(invalid(format!(
            "{source}: task `{id}` has a zero `timeout`, which would kill every attempt at once; \
             give a duration such as \"5m\", or remove it for no timeout"
        )));
    }
    if let (Some(delay), Some(max)) = (task.retry_delay, task.max_retry_delay)
        && max < delay
    {
        return Err(invalid(format!(
            "{source}: task `{id}` has `max_retry_delay` ({}) shorter than `retry_delay` ({}); \
             raise `max_retry_delay` or lower `retry_delay`",
            humantime::format_duration(max),
            humantime::format_duration(delay)
        )));
    }
    for name in task.env.keys() {
        let mut chars = name.chars();
        let valid = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(invalid(format!(
                "{source}: task `{id}` sets environment variable {name:?}, which is not a valid \
                 name; use letters, digits and `_`, not starting with a digit"
            )));
        }
    }
    Ok(())
}

fn known_ids(definition: &Definition) -> String {
    let mut ids: Vec<&str> = definition
        .tasks
        .iter()
        .take(KNOWN_IDS_SHOWN)
        .map(|task| task.id.as_str())
        .collect();
    if definition.tasks.len() > KNOWN_IDS_SHOWN {
        ids.push("…");
    }
    ids.join(", ")
}

/// The first cycle of needs, found depth-first in file order, as ids ending where it started.
fn find_cycle<'a>(
    definition: &'a Definition,
    index: &HashMap<&str, usize>,
) -> Option<Vec<&'a str>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }

    let tasks = &definition.tasks;
    let mut marks = vec![Mark::New; tasks.len()];
    // Iterative, so a long chain of needs cannot overflow the stack: each frame is a task and
    // the position of the next need to follow.
    let mut path: Vec<(usize, usize)> = Vec::new();
    for root in 0..tasks.len() {
        if marks[root] != Mark::New {
            continue;
        }
        marks[root] = Mark::OnPath;
        path.push((root, 0));
        while let Some(frame) = path.last_mut() {
            let (i, next) = *frame;
            let Some(need) = tasks[i].needs.get(next) else {
                marks[i] = Mark::Done;
                path.pop();
                continue;
            };
            frame.1 += 1;
            let Some(&j) = index.get(need.as_str()) else {
                continue;
            };
            match marks[j] {
                Mark::OnPath => {
                    let start = path.iter().position(|&(k, _)| k == j).unwrap_or(0);
                    let mut cycle: Vec<&str> = path[start..]
                        .iter()
                        .map(|&(k, _)| tasks[k].id.as_str())
                        .collect();
                    cycle.push(tasks[j].id.as_str());
                    return Some(cycle);
                }
                Mark::New => {
                    marks[j] = Mark::OnPath;
                    path.push((j, 0));
                }
                Mark::Done => {}
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn toml_error(text: &str) -> String {
        match Definition::parse(text, Format::Toml, "wf.toml") {
            Err(Error::InvalidInput(msg)) => {
                assert!(
                    msg.starts_with("wf.toml"),
                    "message must start with the source: {msg}"
                );
                msg
            }
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    fn json_error(text: &str) -> String {
        match Definition::parse(text, Format::Json, "wf.json") {
            Err(Error::InvalidInput(msg)) => {
                assert!(
                    msg.starts_with("wf.json"),
                    "message must start with the source: {msg}"
                );
                msg
            }
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    fn assert_contains(msg: &str, parts: &[&str]) {
        for part in parts {
            assert!(msg.contains(part), "{part:?} missing from: {msg}");
        }
    }

    #[test]
    fn valid_toml_definition() {
        let text = r#"
            max_active_runs = 4
            timeout = "2h"

            [[tasks]]
            id = "align"
            run = """
            bwa mem -t {{ config.threads }} {{ config.sample }}.fq > out.sam
            """
            timeout = "8m"
            retries = 3
            retry_delay = "10s"
            max_retry_delay = "5m"
            retry_for = "1h"
            permanent_exit_codes = [2, 64]
            env = { SAMPLE = "{{ config.sample }}", MODE = "fast" }

            [[tasks]]
            id = "call.variants"
            run = "gatk {% for r in config.regions %}-L {{ r }} {% endfor %}"
            needs = ["align"]
        "#;
        let def = Definition::parse(text, Format::Toml, "wf.toml").unwrap();
        assert_eq!(def.max_active_runs, Some(4));
        assert_eq!(def.timeout, Some(Duration::from_secs(7200)));
        let align = &def.tasks[0];
        assert_eq!(align.timeout, Some(Duration::from_secs(480)));
        assert_eq!(align.retries, 3);
        assert_eq!(align.retry_delay, Some(Duration::from_secs(10)));
        assert_eq!(align.max_retry_delay, Some(Duration::from_secs(300)));
        assert_eq!(align.retry_for, Some(Duration::from_secs(3600)));
        assert_eq!(align.permanent_exit_codes, [2, 64]);
        assert_eq!(align.env.len(), 2);
        assert_eq!(def.tasks[1].needs, ["align"]);
    }

    #[test]
    fn valid_json_definition() {
        let text = r#"{
            "max_active_runs": 1,
            "tasks": [
                {"id": "fetch", "run": "curl -O {{ config.url }}", "timeout": "5m"},
                {"id": "unpack", "run": "tar xf {{ config.archive }}", "needs": ["fetch"]}
            ]
        }"#;
        let def = Definition::parse(text, Format::Json, "wf.json").unwrap();
        assert_eq!(def.tasks.len(), 2);
        assert_eq!(def.tasks[0].timeout, Some(Duration::from_secs(300)));
        assert_eq!(def.tasks[1].needs, ["fetch"]);
        // A definition survives a round trip through its own serde shape.
        let again = serde_json::to_string(&def).unwrap();
        assert_eq!(
            Definition::parse(&again, Format::Json, "again").unwrap(),
            def
        );
    }

    #[test]
    fn toml_syntax_error_has_line_and_column() {
        let msg = toml_error("[[tasks]]\nid = \"a\"\nrun = \"echo\n");
        assert!(msg.starts_with("wf.toml:3:"), "{msg}");
        assert_contains(&msg, &["invalid TOML"]);
    }

    #[test]
    fn json_syntax_error_has_line_and_column() {
        let msg = json_error("{\n  \"tasks\": [\n    {\"id\": \"a\" \"run\": \"x\"}\n  ]\n}");
        assert!(msg.starts_with("wf.json:3:"), "{msg}");
        assert_contains(&msg, &["invalid JSON"]);
        assert!(!msg.contains(" at line "), "{msg}");
    }

    #[test]
    fn unknown_task_key_names_task_key_and_allowed_keys() {
        let msg = toml_error("[[tasks]]\nid = \"say\"\nrun = \"echo\"\nretry = 3\n");
        assert!(msg.starts_with("wf.toml:4:"), "{msg}");
        assert_contains(&msg, &["task `say`", "unknown field `retry`", "`retries`"]);

        let msg = json_error(r#"{"tasks": [{"id": "say", "run": "echo", "cmd": "x"}]}"#);
        assert_contains(&msg, &["task `say`", "unknown field `cmd`", "`run`"]);
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let msg = toml_error("name = \"x\"\n[[tasks]]\nid = \"a\"\nrun = \"echo\"\n");
        assert_contains(
            &msg,
            &["unknown field `name`", "`tasks`", "`max_active_runs`"],
        );
        assert!(!msg.contains("task `"), "{msg}");
    }

    #[test]
    fn bad_duration_names_task_and_value() {
        let msg = toml_error("[[tasks]]\nid = \"slow\"\nrun = \"sleep 9\"\ntimeout = \"soon\"\n");
        assert_contains(&msg, &["task `slow`", "bad duration \"soon\"", "\"5m\""]);

        let msg =
            json_error(r#"{"tasks": [{"id": "slow", "run": "x", "retry_delay": "3 parsecs"}]}"#);
        assert_contains(&msg, &["task `slow`", "\"3 parsecs\""]);
    }

    #[test]
    fn no_tasks_is_rejected() {
        let msg = toml_error("max_active_runs = 2\n");
        assert_contains(&msg, &["has no tasks", "[[tasks]]"]);
        let msg = toml_error("tasks = []\n");
        assert_contains(&msg, &["has no tasks"]);
        let msg = json_error(r#"{"tasks": []}"#);
        assert_contains(&msg, &["has no tasks"]);
    }

    #[test]
    fn duplicate_task_id_is_rejected() {
        let msg = toml_error(
            "[[tasks]]\nid = \"a\"\nrun = \"x\"\n[[tasks]]\nid = \"b\"\nrun = \"x\"\n\
             [[tasks]]\nid = \"a\"\nrun = \"y\"\n",
        );
        assert_contains(&msg, &["task `a` is defined twice", "#1 and #3"]);
    }

    #[test]
    fn task_id_must_be_usable_as_a_directory_name() {
        for bad in ["has space", "a/b", "", "..", "ü"] {
            let msg = toml_error(&format!("[[tasks]]\nid = {bad:?}\nrun = \"x\"\n"));
            assert_contains(&msg, &[&format!("task id {bad:?}"), "letters, digits"]);
        }
        let ok = "[[tasks]]\nid = \"Step_1.a-b\"\nrun = \"x\"\n";
        assert!(Definition::parse(ok, Format::Toml, "wf.toml").is_ok());
    }

    #[test]
    fn empty_run_is_rejected() {
        let msg = toml_error("[[tasks]]\nid = \"a\"\nrun = \"\"\n");
        assert_contains(&msg, &["task `a` has no `run` command (or an empty one)"]);
        let msg = toml_error("[[tasks]]\nid = \"a\"\nrun = \"  \\n\\t \"\n");
        assert_contains(&msg, &["task `a` has no `run` command (or an empty one)"]);
    }

    #[test]
    fn missing_run_is_rejected() {
        let msg = toml_error("[[tasks]]\nid = \"a\"\nrun = \"x\"\n[[tasks]]\nid = \"b\"\n");
        assert_contains(&msg, &["task `b` has no `run` command"]);
    }

    #[test]
    fn missing_run_in_json_is_rejected() {
        let msg = json_error(r#"{"tasks": [{"id": "b"}]}"#);
        assert_contains(&msg, &["task `b` has no `run` command"]);
    }

    #[test]
    fn python_tasks_name_a_function_instead_of_a_command() {
        let ok = "[[tasks]]\nid = \"a\"\npython = \"pipeline.steps:align\"\n";
        let def = Definition::parse(ok, Format::Toml, "wf.toml").unwrap();
        assert_eq!(def.tasks[0].python.as_deref(), Some("pipeline.steps:align"));
        let msg = toml_error("[[tasks]]\nid = \"a\"\nrun = \"x\"\npython = \"m:f\"\n");
        assert_contains(&msg, &["task `a` has both `run` and `python`"]);
        for bad in ["steps", "steps:", "1steps:f", "a..b:f", "a:b:c"] {
            let msg = toml_error(&format!("[[tasks]]\nid = \"a\"\npython = {bad:?}\n"));
            assert_contains(&msg, &["not `module.path:function`"]);
        }
    }

    #[test]
    fn missing_id_is_rejected() {
        let msg = json_error(r#"{"tasks": [{"run": "x"}]}"#);
        assert_contains(&msg, &["task #1 has no `id`"]);
    }

    #[test]
    fn need_of_an_unknown_task_names_both() {
        let msg = toml_error(
            "[[tasks]]\nid = \"a\"\nrun = \"x\"\n[[tasks]]\nid = \"b\"\nrun = \"x\"\n\
             needs = [\"a\", \"zz\"]\n",
        );
        assert_contains(&msg, &["task `b` needs `zz`", "not a task", "tasks: a, b"]);
    }

    #[test]
    fn task_needing_itself_is_rejected() {
        let msg = toml_error("[[tasks]]\nid = \"a\"\nrun = \"x\"\nneeds = [\"a\"]\n");
        assert_contains(&msg, &["task `a` needs itself"]);
    }

    #[test]
    fn cycle_is_printed() {
        let msg = toml_error(
            "[[tasks]]\nid = \"start\"\nrun = \"x\"\n\
             [[tasks]]\nid = \"a\"\nrun = \"x\"\nneeds = [\"start\", \"b\"]\n\
             [[tasks]]\nid = \"b\"\nrun = \"x\"\nneeds = [\"c\"]\n\
             [[tasks]]\nid = \"c\"\nrun = \"x\"\nneeds = [\"a\"]\n",
        );
        assert_contains(&msg, &["cycle: a -> b -> c -> a"]);
    }

    #[test]
    fn long_chain_of_needs_is_accepted() {
        let mut text = String::from("[[tasks]]\nid = \"t0\"\nrun = \"x\"\n");
        for i in 1..20_000 {
            text.push_str(&format!(
                "[[tasks]]\nid = \"t{i}\"\nrun = \"x\"\nneeds = [\"t{}\"]\n",
                i - 1
            ));
        }
        let def = Definition::parse(&text, Format::Toml, "wf.toml").unwrap();
        assert_eq!(
            def.topological_order().last().map(|t| t.id.as_str()),
            Some("t19999")
        );
    }

    #[test]
    fn template_syntax_error_in_run_names_task_and_line() {
        let msg = toml_error(
            "[[tasks]]\nid = \"say\"\nrun = \"\"\"\necho one\necho {{ config.x \n\"\"\"\n",
        );
        assert_contains(
            &msg,
            &["task `say`", "`run` template", "line 2", "syntax error"],
        );
    }

    #[test]
    fn template_syntax_error_in_env_names_task_and_variable() {
        let msg = toml_error(
            "[[tasks]]\nid = \"say\"\nrun = \"echo\"\nenv = { GREETING = \"{% if %}\" }\n",
        );
        assert_contains(
            &msg,
            &["task `say`", "`env.GREETING` template", "syntax error"],
        );
    }

    #[test]
    fn template_variable_other_than_config_is_rejected() {
        let msg = toml_error("[[tasks]]\nid = \"say\"\nrun = \"echo {{ sample }}\"\n");
        assert_contains(
            &msg,
            &["task `say`", "uses `sample`", "write `config.sample`"],
        );
        let ok = "[[tasks]]\nid = \"say\"\n\
                  run = \"{% for x in range(2) %}{{ loop.index }}{{ x }}{% endfor %}\"\n";
        assert!(Definition::parse(ok, Format::Toml, "wf.toml").is_ok());
    }

    #[test]
    fn unknown_filter_is_rejected() {
        let msg = toml_error("[[tasks]]\nid = \"say\"\nrun = \"echo {{ config.x | shout }}\"\n");
        assert_contains(
            &msg,
            &["task `say`", "`run` template", "filter shout is unknown"],
        );
    }

    #[test]
    fn max_active_runs_zero_is_rejected() {
        let msg = toml_error("max_active_runs = 0\n[[tasks]]\nid = \"a\"\nrun = \"x\"\n");
        assert_contains(&msg, &["max_active_runs = 0"]);
    }

    #[test]
    fn zero_timeout_is_rejected() {
        let msg = toml_error("timeout = \"0s\"\n[[tasks]]\nid = \"a\"\nrun = \"x\"\n");
        assert_contains(&msg, &["zero `timeout`"]);
        let msg = toml_error("[[tasks]]\nid = \"a\"\nrun = \"x\"\ntimeout = \"0s\"\n");
        assert_contains(&msg, &["task `a` has a zero `timeout`"]);
    }

    #[test]
    fn max_retry_delay_below_retry_delay_is_rejected() {
        let msg = toml_error(
            "[[tasks]]\nid = \"a\"\nrun = \"x\"\nretry_delay = \"1m\"\nmax_retry_delay = \"10s\"\n",
        );
        assert_contains(
            &msg,
            &["task `a`", "`max_retry_delay` (10s)", "`retry_delay` (1m)"],
        );
    }

    #[test]
    fn bad_env_name_is_rejected() {
        let msg = toml_error("[[tasks]]\nid = \"a\"\nrun = \"x\"\nenv = { \"1X\" = \"y\" }\n");
        assert_contains(&msg, &["task `a`", "\"1X\"", "not a valid name"]);
    }

    #[test]
    fn json_definition_must_be_an_object() {
        let msg = json_error("[1, 2]");
        assert_contains(
            &msg,
            &["must be an object with a `tasks` array", "found an array"],
        );
    }

    #[test]
    fn alert_keys_are_read_and_kept_through_a_round_trip() {
        let text = "timeout = \"3h\"\nexpected_duration = \"2h\"\n\
                    [notify]\non_failure = [\"ops-slack\", \"ops.mail\"]\non_overdue = []\n\
                    [[tasks]]\nid = \"a\"\nrun = \"x\"\n";
        let def = Definition::parse(text, Format::Toml, "wf.toml").unwrap();
        assert_eq!(def.expected_duration, Some(Duration::from_secs(7200)));
        let notify = def.notify.clone().unwrap();
        assert_eq!(
            notify.on_failure.as_deref(),
            Some(&["ops-slack".to_owned(), "ops.mail".to_owned()][..])
        );
        assert_eq!(notify.on_overdue.as_deref(), Some(&[][..]));
        assert_eq!(
            notify.names().collect::<Vec<_>>(),
            [("on_failure", "ops-slack"), ("on_failure", "ops.mail")]
        );
        let again = serde_json::to_string(&def).unwrap();
        assert_eq!(
            Definition::parse(&again, Format::Json, "again").unwrap(),
            def
        );
        // A definition without them serializes as before, so stored ones read back unchanged.
        let plain =
            Definition::parse("[[tasks]]\nid = \"a\"\nrun = \"x\"\n", Format::Toml, "p").unwrap();
        let json = serde_json::to_string(&plain).unwrap();
        assert!(
            !json.contains("notify") && !json.contains("expected"),
            "{json}"
        );
    }

    #[test]
    fn bad_alert_keys_are_rejected_with_the_fix() {
        let tasks = "[[tasks]]\nid = \"a\"\nrun = \"x\"\n";
        let msg = toml_error(&format!("expected_duration = \"0s\"\n{tasks}"));
        assert_contains(&msg, &["zero `expected_duration`"]);
        let msg = toml_error(&format!(
            "timeout = \"1h\"\nexpected_duration = \"2h\"\n{tasks}"
        ));
        assert_contains(&msg, &["`expected_duration` (2h)", "`timeout` (1h)"]);
        let msg = toml_error(&format!("expected_duration = \"soon\"\n{tasks}"));
        assert_contains(&msg, &["bad duration \"soon\""]);
        let msg = toml_error(&format!("[notify]\non_overdue = [\"ops\"]\n{tasks}"));
        assert_contains(&msg, &["on_overdue", "expected_duration = \"2h\""]);
        let msg = toml_error(&format!("[notify]\non_failure = [\"a b\"]\n{tasks}"));
        assert_contains(&msg, &["on_failure", "\"a b\"", "not a valid name"]);
        let msg = toml_error(&format!("[notify]\non_failure = [\"x\", \"x\"]\n{tasks}"));
        assert_contains(&msg, &["`x` twice"]);
        let msg = toml_error(&format!("[notify]\non_fail = [\"x\"]\n{tasks}"));
        assert_contains(&msg, &["unknown field `on_fail`", "`on_failure`"]);
        let msg =
            json_error(r#"{"notify": {"on_failure": "x"}, "tasks": [{"id": "a", "run": "x"}]}"#);
        assert_contains(&msg, &["invalid type"]);
    }

    #[test]
    fn wrong_type_names_the_task() {
        let msg = toml_error("[[tasks]]\nid = \"a\"\nrun = \"x\"\nretries = \"three\"\n");
        assert_contains(&msg, &["task `a`", "invalid type"]);
    }
}
