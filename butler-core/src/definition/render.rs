//! Rendering task templates against effective configs.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Definition;
use crate::{Error, Result};

/// The one variable templates see: the effective config.
const CONFIG_VAR: &str = "config";

/// Names a template may use without defining them besides `config` and the engine's globals.
const IMPLICIT_VARS: &[&str] = &["loop", "self", "super", "caller", "varargs", "kwargs"];

/// One task of a run, its templates rendered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedTask {
    /// The task's id.
    pub id: String,
    /// The shell command to execute, or for a Python task its `module:function`.
    pub command: String,
    /// The task's extra environment variables.
    pub env: BTreeMap<String, String>,
}

/// A definition's templates compiled once, to render the tasks of many runs.
///
/// Templates are Jinja, rendered against one variable, `config`, the effective config. Undefined
/// values are errors: a template that uses a key the config lacks fails instead of rendering an
/// empty string into a command. Build it with [`Definition::renderer`].
pub struct Renderer {
    env: Environment<'static>,
    tasks: Vec<TaskTemplates>,
}

struct TaskTemplates {
    id: String,
    run: String,
    python: Option<String>,
    env: Vec<(String, String)>,
}

impl fmt::Debug for Renderer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Renderer")
            .field(
                "tasks",
                &self.tasks.iter().map(|t| &t.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Which of a task's templates: its `run` or one of its `env` values.
#[derive(Clone, Copy)]
enum Part<'a> {
    Run,
    Env(&'a str),
}

impl fmt::Display for Part<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::Run => f.write_str("`run` template"),
            Part::Env(name) => write!(f, "`env.{name}` template"),
        }
    }
}

impl Renderer {
    pub(super) fn new(definition: &Definition) -> Result<Renderer> {
        compile(definition, None)
    }

    /// Renders every task against `effective`, in definition order.
    ///
    /// A template that uses a key `effective` lacks is an [`Error::InvalidInput`] naming the
    /// task and the key, such as "task `say`: its template uses `config.test_message`, which
    /// the effective config does not define; add `test_message` to the workflow, analysis or
    /// run config".
    pub fn render(&self, effective: &Value) -> Result<Vec<RenderedTask>> {
        let context = context(effective);
        self.tasks
            .iter()
            .map(|task| self.render_templates(task, &context, effective))
            .collect()
    }

    /// Renders the task `id` alone against `effective`, as [`Renderer::render`] does; `None`
    /// if the definition has no such task. An attempt renders only its own task, so a run of
    /// many tasks does not render every template for each of them.
    pub fn render_task(&self, id: &str, effective: &Value) -> Result<Option<RenderedTask>> {
        self.tasks
            .iter()
            .find(|task| task.id == id)
            .map(|task| self.render_templates(task, &context(effective), effective))
            .transpose()
    }

    fn render_templates(
        &self,
        task: &TaskTemplates,
        context: &minijinja::Value,
        effective: &Value,
    ) -> Result<RenderedTask> {
        let command = match &task.python {
            Some(target) => target.clone(),
            None => self.render_one(task, &task.run, Part::Run, context, effective)?,
        };
        let env = task
            .env
            .iter()
            .map(|(name, template)| {
                let value = self.render_one(task, template, Part::Env(name), context, effective)?;
                Ok((name.clone(), value))
            })
            .collect::<Result<_>>()?;
        Ok(RenderedTask {
            id: task.id.clone(),
            command,
            env,
        })
    }

    fn render_one(
        &self,
        task: &TaskTemplates,
        name: &str,
        part: Part<'_>,
        context: &minijinja::Value,
        effective: &Value,
    ) -> Result<String> {
        let template = self.env.get_template(name).map_err(|err| {
            Error::InvalidInput(format!("task `{}`: cannot load its {part}: {err}", task.id))
        })?;
        template
            .render(context)
            .map_err(|err| render_error(&err, &task.id, part, &template, effective))
    }
}

/// The one variable templates see: `config`, the effective config.
fn context(effective: &Value) -> minijinja::Value {
    minijinja::context! {
        config => minijinja::Value::from(minijinja::value::Serde(effective)),
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // Commands are shell text: never HTML-escape what the config holds.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    // Debug mode makes errors name the undefined expression; it costs nothing until one fails.
    env.set_debug(true);
    env
}

/// Compiles every template of `definition`. `source`, when given, starts error messages.
pub(super) fn compile(definition: &Definition, source: Option<&str>) -> Result<Renderer> {
    let prefix = source.map_or_else(String::new, |s| format!("{s}: "));
    let mut env = environment();
    let mut tasks = Vec::with_capacity(definition.tasks.len());
    // Names by position, so even an unvalidated definition with clashing ids keeps every
    // template apart; messages name tasks by id instead.
    for (i, task) in definition.tasks.iter().enumerate() {
        let run = format!("{i}/run");
        add_template(&mut env, &prefix, &task.id, Part::Run, &run, &task.run)?;
        let mut vars = Vec::with_capacity(task.env.len());
        for (var, text) in &task.env {
            let name = format!("{i}/env/{var}");
            add_template(&mut env, &prefix, &task.id, Part::Env(var), &name, text)?;
            vars.push((var.clone(), name));
        }
        tasks.push(TaskTemplates {
            id: task.id.clone(),
            run,
            python: task.python.clone(),
            env: vars,
        });
    }
    check_names(&mut env, &prefix, &tasks)?;
    Ok(Renderer { env, tasks })
}

/// Rejects unknown filters and tests, which the engine only notices when it runs them, by
/// rendering every template once against an empty config with undefined values allowed. This
/// covers the branches an empty config takes, which is where most templates keep their filters.
fn check_names(
    env: &mut Environment<'static>,
    prefix: &str,
    tasks: &[TaskTemplates],
) -> Result<()> {
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    let context = minijinja::context! { config => minijinja::Value::from(BTreeMap::<String, minijinja::Value>::new()) };
    let mut outcome = Ok(());
    'tasks: for task in tasks {
        let parts = std::iter::once((Part::Run, &task.run))
            .chain(task.env.iter().map(|(var, name)| (Part::Env(var), name)));
        for (part, name) in parts {
            let Ok(template) = env.get_template(name) else {
                continue;
            };
            if let Err(err) = template.render(&context)
                && matches!(
                    err.kind(),
                    ErrorKind::UnknownFilter | ErrorKind::UnknownTest
                )
            {
                let line = err
                    .line()
                    .map_or_else(String::new, |l| format!(" at line {l}"));
                let detail = err.detail().unwrap_or_default();
                outcome = Err(Error::InvalidInput(format!(
                    "{prefix}task `{}`: its {part} is invalid{line}: {}: {detail}; use one of \
                     the built-in Jinja filters and tests",
                    task.id,
                    err.kind()
                )));
                break 'tasks;
            }
        }
    }
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    outcome
}

fn add_template(
    env: &mut Environment<'static>,
    prefix: &str,
    task: &str,
    part: Part<'_>,
    name: &str,
    text: &str,
) -> Result<()> {
    env.add_template_owned(name.to_owned(), text.to_owned())
        .map_err(|err| {
            let line = err
                .line()
                .map_or_else(String::new, |l| format!(" at line {l}"));
            let detail = err.detail().map_or_else(|| err.to_string(), str::to_owned);
            Error::InvalidInput(format!(
                "{prefix}task `{task}`: its {part} is invalid{line}: {}: {detail}; fix the \
                 template (Jinja syntax)",
                err.kind()
            ))
        })?;
    let template = env.get_template(name).map_err(|err| {
        Error::InvalidInput(format!(
            "{prefix}task `{task}`: cannot load its {part}: {err}"
        ))
    })?;
    let globals: HashSet<&str> = env.globals().map(|(name, _)| name).collect();
    let mut unknown: Vec<String> = template
        .undeclared_variables(false)
        .into_iter()
        .filter(|var| {
            var != CONFIG_VAR
                && !globals.contains(var.as_str())
                && !IMPLICIT_VARS.contains(&var.as_str())
        })
        .collect();
    unknown.sort_unstable();
    if let Some(var) = unknown.first() {
        return Err(Error::InvalidInput(format!(
            "{prefix}task `{task}`: its {part} uses `{var}`, which is not defined: templates see \
             only `config`, the effective config; write `config.{var}`"
        )));
    }
    Ok(())
}

fn render_error(
    err: &minijinja::Error,
    task: &str,
    part: Part<'_>,
    template: &minijinja::Template<'_, '_>,
    effective: &Value,
) -> Error {
    let its = match part {
        Part::Run => "its template".to_owned(),
        Part::Env(_) => format!("its {part}"),
    };
    if err.kind() != ErrorKind::UndefinedError && !is_undefined_message(err) {
        let line = err
            .line()
            .map_or_else(String::new, |l| format!(" at line {l}"));
        let detail = err.detail().map_or_else(String::new, |d| format!(": {d}"));
        return Error::InvalidInput(format!(
            "task `{task}`: cannot render its {part}{line}: {}{detail}; fix the template or the \
             config",
            err.kind()
        ));
    }
    let expression = undefined_expression(err)
        .or_else(|| first_missing_path(template, effective))
        .unwrap_or_default();
    match expression.strip_prefix("config.") {
        Some(key) => Error::InvalidInput(format!(
            "task `{task}`: {its} uses `{expression}`, which the effective config does not \
             define; add `{key}` to the workflow, analysis or run config"
        )),
        None if expression.is_empty() => Error::InvalidInput(format!(
            "task `{task}`: {its} uses a value the effective config does not define ({}{}); add \
             it to the workflow, analysis or run config",
            err.kind(),
            err.line()
                .map_or_else(String::new, |l| format!(" at line {l}"))
        )),
        None => Error::InvalidInput(format!(
            "task `{task}`: {its} uses `{expression}`, which is undefined; add it to the \
             workflow, analysis or run config"
        )),
    }
}

fn is_undefined_message(err: &minijinja::Error) -> bool {
    err.detail().is_some_and(|d| d.contains("` is undefined"))
}

/// The expression minijinja names in "… (`config.x` is undefined)".
fn undefined_expression(err: &minijinja::Error) -> Option<String> {
    let detail = err.detail()?;
    let end = detail.find("` is undefined")?;
    let start = detail[..end].rfind('`')? + 1;
    Some(detail[start..end].to_owned())
}

/// The first `config.…` path the template reads that `effective` lacks, as `config.a.b`, cut
/// at the first missing key.
fn first_missing_path(template: &minijinja::Template<'_, '_>, effective: &Value) -> Option<String> {
    let mut paths: Vec<String> = template.undeclared_variables(true).into_iter().collect();
    paths.sort_unstable();
    paths.iter().find_map(|path| {
        let mut keys = path.split('.');
        if keys.next() != Some(CONFIG_VAR) {
            return None;
        }
        let mut node = effective;
        let mut prefix = CONFIG_VAR.to_owned();
        for key in keys {
            prefix.push('.');
            prefix.push_str(key);
            node = match node.as_object().and_then(|map| map.get(key)) {
                Some(child) => child,
                None => return Some(prefix),
            };
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::definition::Format;

    const SAY: &str = r#"
        [[tasks]]
        id = "prepare"
        run = "mkdir -p {{ config.out }}"

        [[tasks]]
        id = "say"
        run = "echo {{ config.test_message }} > {{ config.out }}/msg"
        needs = ["prepare"]
        env = { RUN_ID = "{{ config.analysis_run_id }}", PLAIN = "yes" }

        [[tasks]]
        id = "tools"
        run = "bwa -t {{ config.tools.bwa.threads }}{% if config.extra is defined %} {{ config.extra }}{% endif %}"
        needs = ["say"]
    "#;

    fn renderer() -> Renderer {
        Definition::parse(SAY, Format::Toml, "wf.toml")
            .unwrap()
            .renderer()
            .unwrap()
    }

    fn render_error(effective: &Value) -> String {
        match renderer().render(effective) {
            Err(Error::InvalidInput(msg)) => msg,
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    fn full_config() -> Value {
        json!({
            "out": "/tmp/o",
            "test_message": "hi",
            "tools": {"bwa": {"threads": 8}},
            "analysis_run_id": 7,
        })
    }

    #[test]
    fn renders_every_task_in_definition_order() {
        let tasks = renderer().render(&full_config()).unwrap();
        assert_eq!(
            tasks,
            [
                RenderedTask {
                    id: "prepare".into(),
                    command: "mkdir -p /tmp/o".into(),
                    env: BTreeMap::new(),
                },
                RenderedTask {
                    id: "say".into(),
                    command: "echo hi > /tmp/o/msg".into(),
                    env: BTreeMap::from([
                        ("PLAIN".into(), "yes".into()),
                        ("RUN_ID".into(), "7".into()),
                    ]),
                },
                RenderedTask {
                    id: "tools".into(),
                    command: "bwa -t 8".into(),
                    env: BTreeMap::new(),
                },
            ]
        );
    }

    #[test]
    fn defined_guards_see_optional_keys() {
        let mut config = full_config();
        config["extra"] = json!("--fast");
        let tasks = renderer().render(&config).unwrap();
        assert_eq!(tasks[2].command, "bwa -t 8 --fast");
    }

    #[test]
    fn values_are_not_html_escaped() {
        let mut config = full_config();
        config["test_message"] = json!("a<b & 'c'");
        let tasks = renderer().render(&config).unwrap();
        assert_eq!(tasks[1].command, "echo a<b & 'c' > /tmp/o/msg");
    }

    #[test]
    fn missing_key_is_an_error_naming_task_and_key() {
        let mut config = full_config();
        config.as_object_mut().unwrap().remove("test_message");
        assert_eq!(
            render_error(&config),
            "task `say`: its template uses `config.test_message`, which the effective config \
             does not define; add `test_message` to the workflow, analysis or run config"
        );
    }

    #[test]
    fn missing_nested_key_names_the_first_missing_part() {
        let mut config = full_config();
        config["tools"] = json!({"gatk": {}});
        let msg = render_error(&config);
        assert!(
            msg.starts_with("task `tools`: its template uses `config.tools.bwa`"),
            "{msg}"
        );
        assert!(msg.contains("add `tools.bwa`"), "{msg}");
    }

    #[test]
    fn missing_key_in_env_template_names_the_variable() {
        let mut config = full_config();
        config.as_object_mut().unwrap().remove("analysis_run_id");
        let msg = render_error(&config);
        assert!(
            msg.starts_with(
                "task `say`: its `env.RUN_ID` template uses `config.analysis_run_id`, which"
            ),
            "{msg}"
        );
    }

    #[test]
    fn other_render_failures_name_the_task() {
        let def = Definition::parse(
            "[[tasks]]\nid = \"math\"\nrun = \"echo {{ config.n + 1 }}\"\n",
            Format::Toml,
            "wf.toml",
        )
        .unwrap();
        match def.renderer().unwrap().render(&json!({"n": "seven"})) {
            Err(Error::InvalidInput(msg)) => {
                assert!(
                    msg.starts_with(
                        "task `math`: cannot render its `run` template at line 1: invalid operation"
                    ),
                    "{msg}"
                )
            }
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn one_task_renders_without_the_others_templates() {
        let mut config = full_config();
        config.as_object_mut().unwrap().remove("test_message");
        let renderer = renderer();
        assert!(
            renderer.render(&config).is_err(),
            "`say` needs test_message"
        );
        let all = renderer.render(&full_config()).unwrap();
        for task in all.iter().filter(|t| t.id != "say") {
            let alone = renderer.render_task(&task.id, &config).unwrap();
            assert_eq!(alone.as_ref(), Some(task));
        }
        assert!(renderer.render_task("say", &config).is_err());
        assert_eq!(renderer.render_task("nosuch", &config).unwrap(), None);
    }

    #[test]
    fn default_filter_fills_in_missing_keys() {
        let def = Definition::parse(
            "[[tasks]]\nid = \"a\"\nrun = \"echo {{ config.opt | default('none') }}\"\n",
            Format::Toml,
            "wf.toml",
        )
        .unwrap();
        let tasks = def.renderer().unwrap().render(&json!({})).unwrap();
        assert_eq!(tasks[0].command, "echo none");
    }

    #[test]
    fn renderer_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Renderer>();
    }

    #[test]
    fn renders_ten_thousand_configs() {
        let renderer = renderer();
        for i in 0..10_000 {
            let mut config = full_config();
            config["analysis_run_id"] = json!(i);
            let tasks = renderer.render(&config).unwrap();
            assert_eq!(tasks[1].env["RUN_ID"], i.to_string());
        }
    }
}
