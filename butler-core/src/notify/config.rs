//! The notify config file: named notifiers and the default routes of each alert.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::is_notifier_name;
use crate::definition::Definition;
use crate::error::{Error, Result};

/// The notify config's file name in `BUTLER_HOME`.
pub const CONFIG_FILE: &str = "notify.toml";

/// The environment variable naming another notify config file.
pub const CONFIG_VAR: &str = "BUTLER_NOTIFY_CONFIG";

/// How often the report is sent when `report` names notifiers and `report_every` is not set.
pub const DEFAULT_REPORT_EVERY: Duration = Duration::from_secs(4 * 3600);

/// Which notifiers receive each alert unless a workflow's definition says otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes {
    /// Told when a run ends in `error`.
    pub on_failure: Vec<String>,
    /// Told when a run outlasts its workflow's `expected_duration`.
    pub on_overdue: Vec<String>,
    /// Told when a worker stops sending heartbeats.
    pub on_worker_lost: Vec<String>,
    /// Sent the periodic report.
    pub report: Vec<String>,
    /// How often the report is sent.
    pub report_every: Duration,
    /// The dashboard's address (`https://butler.example.org`), put before the `/runs/ID`
    /// links of alerts.
    pub dashboard_url: Option<String>,
}

impl Default for Routes {
    fn default() -> Self {
        Routes {
            on_failure: Vec::new(),
            on_overdue: Vec::new(),
            on_worker_lost: Vec::new(),
            report: Vec::new(),
            report_every: DEFAULT_REPORT_EVERY,
            dashboard_url: None,
        }
    }
}

/// One `[notifiers.NAME]` table: its `kind` and the rest of its keys, which the provider of
/// that kind reads.
#[derive(Clone, PartialEq)]
pub struct NotifierEntry {
    /// `webhook`, `slack`, `email`, …
    pub kind: String,
    /// Every key of the table but `kind`.
    pub settings: toml::Table,
}

impl fmt::Debug for NotifierEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The settings hold webhook tokens and passwords.
        f.debug_struct("NotifierEntry")
            .field("kind", &self.kind)
            .field("keys", &self.settings.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The notify config (`$BUTLER_HOME/notify.toml`), validated.
///
/// ```
/// use butler_core::notify::NotifyConfig;
///
/// let config = NotifyConfig::parse(r#"
///     on_failure = ["ops"]
///     report = ["ops"]
///     report_every = "4h"
///
///     [notifiers.ops]
///     kind = "slack"
///     url = "https://chat.example.org/hooks/T0/B0/x"
/// "#, "notify.toml").unwrap();
/// assert_eq!(config.notifiers["ops"].kind, "slack");
/// assert_eq!(config.routes.on_failure, ["ops"]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct NotifyConfig {
    /// Where the config was read from, as errors name it.
    pub source: String,
    /// The declared notifiers, by name.
    pub notifiers: BTreeMap<String, NotifierEntry>,
    /// The default routes.
    pub routes: Routes,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    on_failure: Vec<String>,
    #[serde(default)]
    on_overdue: Vec<String>,
    #[serde(default)]
    on_worker_lost: Vec<String>,
    #[serde(default)]
    report: Vec<String>,
    #[serde(default)]
    report_every: Option<String>,
    #[serde(default)]
    dashboard_url: Option<String>,
    #[serde(default)]
    notifiers: BTreeMap<String, toml::Table>,
}

impl NotifyConfig {
    /// Parses and validates a notify config; `source` (the file's path) starts every error.
    ///
    /// Rejected with an [`Error::InvalidInput`] naming the key and the fix: TOML syntax errors
    /// (with line and column), unknown keys, a malformed notifier name, a notifier without a
    /// `kind`, a route naming a notifier that is not declared, a bad or zero `report_every`,
    /// `report_every` with no `report` notifier, and a `dashboard_url` that is not `http(s)://`.
    /// The notifiers' own keys are checked by the provider that builds them.
    pub fn parse(text: &str, source: &str) -> Result<NotifyConfig> {
        let file: File = toml::from_str(text).map_err(|err| {
            let location = err
                .span()
                .map(|span| line_column(text, span.start))
                .map_or_else(String::new, |(line, column)| format!(":{line}:{column}"));
            invalid(format!(
                "{source}{location}: {}; fix it (see docs/alerts.md for every key)",
                err.message().trim_end()
            ))
        })?;

        let mut notifiers = BTreeMap::new();
        for (name, mut table) in file.notifiers {
            if !is_notifier_name(&name) {
                return Err(invalid(format!(
                    "{source}: notifier name {name:?} is not allowed; name it with letters, \
                     digits, `_`, `.` and `-` only, as in [notifiers.ops-slack]"
                )));
            }
            let kind = match table.remove("kind") {
                Some(toml::Value::String(kind)) => kind,
                Some(other) => {
                    return Err(invalid(format!(
                        "{source}: [notifiers.{name}] `kind` is a {}, not a string; write \
                         kind = \"webhook\", \"slack\" or \"email\"",
                        other.type_str()
                    )));
                }
                None => {
                    return Err(invalid(format!(
                        "{source}: [notifiers.{name}] has no `kind`; add kind = \"webhook\", \
                         \"slack\" or \"email\""
                    )));
                }
            };
            notifiers.insert(
                name,
                NotifierEntry {
                    kind,
                    settings: table,
                },
            );
        }

        let report_every = match file.report_every.as_deref() {
            None => DEFAULT_REPORT_EVERY,
            Some(text) => {
                let every = humantime::parse_duration(text).map_err(|e| {
                    invalid(format!(
                        "{source}: `report_every = {text:?}` is not a duration ({e}); write it \
                         like \"4h\" or \"30m\""
                    ))
                })?;
                if every < Duration::from_secs(1) {
                    return Err(invalid(format!(
                        "{source}: `report_every = {text:?}` is shorter than a second; give a \
                         period such as \"4h\""
                    )));
                }
                if file.report.is_empty() {
                    return Err(invalid(format!(
                        "{source}: `report_every` is set but `report` names no notifier, so no \
                         report would be sent; add report = [\"NAME\"] or remove report_every"
                    )));
                }
                every
            }
        };

        let dashboard_url = match file.dashboard_url {
            None => None,
            Some(url) => {
                let url = url.trim().trim_end_matches('/').to_owned();
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(invalid(format!(
                        "{source}: `dashboard_url = {url:?}` is not an http(s) address; write \
                         it like \"https://butler.example.org\""
                    )));
                }
                Some(url)
            }
        };

        let routes = Routes {
            on_failure: file.on_failure,
            on_overdue: file.on_overdue,
            on_worker_lost: file.on_worker_lost,
            report: file.report,
            report_every,
            dashboard_url,
        };
        for (key, names) in [
            ("on_failure", &routes.on_failure),
            ("on_overdue", &routes.on_overdue),
            ("on_worker_lost", &routes.on_worker_lost),
            ("report", &routes.report),
        ] {
            for name in names {
                if !notifiers.contains_key(name) {
                    return Err(invalid(format!(
                        "{source}: `{key}` names notifier `{name}`, which is not declared{}; \
                         add a [notifiers.{name}] table or fix the name",
                        declared(&notifiers)
                    )));
                }
            }
        }
        Ok(NotifyConfig {
            source: source.to_owned(),
            notifiers,
            routes,
        })
    }

    /// Reads and [parses](Self::parse) the notify config at `path`.
    pub fn from_file(path: &Path) -> Result<NotifyConfig> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| {
            invalid(format!(
                "cannot read the notify config {source}: {err}; fix the path, or remove the \
                 setting that names it"
            ))
        })?;
        NotifyConfig::parse(&text, &source)
    }

    /// The notify config in force: the file at `explicit`, else the one
    /// named by [`CONFIG_VAR`], else `home`/[`CONFIG_FILE`]; `None` when neither is given and
    /// `home` has no such file (alerts are off). A file that is named but cannot be read is an
    /// error.
    pub fn load(home: &Path, explicit: Option<&Path>) -> Result<Option<NotifyConfig>> {
        let named = explicit.map(Path::to_path_buf).or_else(|| {
            std::env::var_os(CONFIG_VAR)
                .filter(|value| !value.is_empty())
                .map(PathBuf::from)
        });
        match named {
            Some(path) => NotifyConfig::from_file(&path).map(Some),
            None => {
                let path = home.join(CONFIG_FILE);
                if path.exists() {
                    NotifyConfig::from_file(&path).map(Some)
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// The `[notify]` names of `definition` that this config does not declare, with the key
    /// that names each.
    pub fn undeclared<'a>(&self, definition: &'a Definition) -> Vec<(&'static str, &'a str)> {
        definition
            .notify
            .iter()
            .flat_map(|notify| notify.names())
            .filter(|(_, name)| !self.notifiers.contains_key(*name))
            .collect()
    }

    /// Checks that every notifier the `[notify]` table of `definition` names is declared
    /// here; `workflow` (a file or `NAME VERSION`) starts the error.
    pub fn check_definition(&self, definition: &Definition, workflow: &str) -> Result<()> {
        match self.undeclared(definition).first() {
            None => Ok(()),
            Some((key, name)) => Err(invalid(format!(
                "{workflow}: `[notify] {key}` names notifier `{name}`, which {} does not \
                 declare{}; add a [notifiers.{name}] table there or fix the name",
                self.source,
                declared(&self.notifiers)
            ))),
        }
    }
}

fn declared(notifiers: &BTreeMap<String, NotifierEntry>) -> String {
    if notifiers.is_empty() {
        " (no notifier is declared)".to_owned()
    } else {
        let names: Vec<&str> = notifiers.keys().map(String::as_str).collect();
        format!(" (declared: {})", names.join(", "))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::Format;

    const NOTIFIERS: &str = r#"
        [notifiers.ops-slack]
        kind = "slack"
        url = "https://chat.example.org/hooks/secret-token"

        [notifiers.oncall]
        kind = "email"
        host = "smtp.example.org"
        password = "hunter2"
    "#;

    fn error(text: &str) -> String {
        match NotifyConfig::parse(text, "notify.toml") {
            Err(Error::InvalidInput(msg)) => {
                assert!(msg.starts_with("notify.toml"), "{msg}");
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
    fn a_full_config_is_read() {
        let text = format!(
            "on_failure = [\"ops-slack\", \"oncall\"]\non_overdue = [\"ops-slack\"]\n\
             on_worker_lost = [\"oncall\"]\nreport = [\"oncall\"]\nreport_every = \"2h\"\n\
             dashboard_url = \"https://butler.example.org/\"\n{NOTIFIERS}"
        );
        let config = NotifyConfig::parse(&text, "notify.toml").unwrap();
        assert_eq!(config.routes.on_failure, ["ops-slack", "oncall"]);
        assert_eq!(config.routes.on_worker_lost, ["oncall"]);
        assert_eq!(config.routes.report_every, Duration::from_secs(7200));
        assert_eq!(
            config.routes.dashboard_url.as_deref(),
            Some("https://butler.example.org")
        );
        let oncall = &config.notifiers["oncall"];
        assert_eq!(oncall.kind, "email");
        assert!(!oncall.settings.contains_key("kind"));
        assert_eq!(oncall.settings["host"].as_str(), Some("smtp.example.org"));
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("secret-token"),
            "{debug}"
        );
    }

    #[test]
    fn defaults_apply_when_keys_are_left_out() {
        let config = NotifyConfig::parse("report = [\"oncall\"]\n", "x");
        assert!(config.is_err(), "oncall is not declared");
        let config =
            NotifyConfig::parse(&format!("report = [\"oncall\"]\n{NOTIFIERS}"), "n").unwrap();
        assert_eq!(config.routes.report_every, DEFAULT_REPORT_EVERY);
        assert!(config.routes.on_failure.is_empty());
        let empty = NotifyConfig::parse("", "n").unwrap();
        assert!(empty.notifiers.is_empty());
    }

    #[test]
    fn mistakes_are_named_with_the_fix() {
        let msg = error(&format!("on_failure = [\"ops\"]\n{NOTIFIERS}"));
        assert_contains(
            &msg,
            &[
                "`on_failure` names notifier `ops`",
                "declared: oncall, ops-slack",
                "[notifiers.ops]",
            ],
        );
        let msg = error("on_falure = []\n");
        assert_contains(
            &msg,
            &[
                "notify.toml:1:1",
                "unknown field `on_falure`",
                "`on_failure`",
            ],
        );
        let msg = error("[notifiers.x]\nurl = \"https://a\"\n");
        assert_contains(&msg, &["[notifiers.x] has no `kind`", "kind = \"webhook\""]);
        let msg = error("[notifiers.x]\nkind = 3\n");
        assert_contains(&msg, &["`kind` is a integer"]);
        let msg = error("[notifiers.\"a b\"]\nkind = \"slack\"\n");
        assert_contains(&msg, &["\"a b\" is not allowed"]);
        let msg = error(&format!(
            "report = [\"oncall\"]\nreport_every = \"often\"\n{NOTIFIERS}"
        ));
        assert_contains(
            &msg,
            &["`report_every = \"often\"` is not a duration", "\"4h\""],
        );
        let msg = error(&format!(
            "report = [\"oncall\"]\nreport_every = \"0s\"\n{NOTIFIERS}"
        ));
        assert_contains(&msg, &["shorter than a second"]);
        let msg = error(&format!("report_every = \"1h\"\n{NOTIFIERS}"));
        assert_contains(&msg, &["`report` names no notifier"]);
        let msg = error("dashboard_url = \"butler.example.org\"\n");
        assert_contains(&msg, &["not an http(s) address"]);
        let msg = error("on_failure = \"ops\"\n");
        assert_contains(&msg, &["notify.toml:1:", "invalid type"]);
    }

    #[test]
    fn a_definition_may_name_only_declared_notifiers() {
        let config = NotifyConfig::parse(NOTIFIERS, "/etc/butler/notify.toml").unwrap();
        let text = "expected_duration = \"1h\"\n[notify]\non_failure = [\"oncall\"]\n\
                    on_overdue = [\"pager\"]\n[[tasks]]\nid = \"a\"\nrun = \"x\"\n";
        let definition = Definition::parse(text, Format::Toml, "wf.toml").unwrap();
        assert_eq!(config.undeclared(&definition), [("on_overdue", "pager")]);
        let msg = config
            .check_definition(&definition, "align 1.0")
            .unwrap_err()
            .to_string();
        assert_contains(
            &msg,
            &[
                "align 1.0: `[notify] on_overdue` names notifier `pager`",
                "/etc/butler/notify.toml does not declare",
                "[notifiers.pager]",
            ],
        );
        let fine =
            Definition::parse("[[tasks]]\nid = \"a\"\nrun = \"x\"\n", Format::Toml, "w").unwrap();
        config.check_definition(&fine, "w").unwrap();
    }

    #[test]
    fn load_prefers_the_named_file_and_is_off_without_one() {
        let home = tempfile::tempdir().unwrap();
        assert_eq!(NotifyConfig::load(home.path(), None).unwrap(), None);
        std::fs::write(home.path().join(CONFIG_FILE), NOTIFIERS).unwrap();
        let found = NotifyConfig::load(home.path(), None).unwrap().unwrap();
        assert!(found.source.ends_with("notify.toml"));
        let other = home.path().join("other.toml");
        std::fs::write(&other, "").unwrap();
        let named = NotifyConfig::load(home.path(), Some(&other))
            .unwrap()
            .unwrap();
        assert!(named.notifiers.is_empty());
        let missing = home.path().join("missing.toml");
        let msg = NotifyConfig::load(home.path(), Some(&missing))
            .unwrap_err()
            .to_string();
        assert_contains(&msg, &["cannot read the notify config", "missing.toml"]);
    }
}
