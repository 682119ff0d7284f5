//! Where Butler's log goes, at which levels and in which format, from four variables:
//!
//! - `BUTLER_LOG`: levels, in `tracing`'s filter syntax (`info,butler_core::engine=debug`);
//!   `warn` by default for commands, `info` for `server`, `scheduler` and `worker`, both
//!   without the RabbitMQ client's channel closes ([`QUIET`]);
//! - `BUTLER_LOG_FORMAT`: `text` (default) or `json`, one object per line;
//! - `BUTLER_LOG_FILE=PATH`: append to that file instead of stderr;
//! - `BUTLER_LOG_DIR=DIR`: append to one file per component in `DIR` (see [`COMPONENTS`]).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use tracing::Metadata;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Levels, in `tracing`'s filter syntax.
pub const LOG_VAR: &str = "BUTLER_LOG";
/// `text` or `json`.
pub const FORMAT_VAR: &str = "BUTLER_LOG_FORMAT";
/// A file to append the log to.
pub const FILE_VAR: &str = "BUTLER_LOG_FILE";
/// A directory to append one file per component to.
pub const DIR_VAR: &str = "BUTLER_LOG_DIR";

/// The file of events whose target starts with none of [`COMPONENTS`]' prefixes.
pub const OTHER_COMPONENT: &str = "butler";

/// Which component's file (`DIR/COMPONENT.log`) an event goes to under `BUTLER_LOG_DIR`, by
/// the start of its target (a module path, or `butler::http` for the request log); the first
/// match wins, the rest go to `butler.log`.
pub const COMPONENTS: &[(&str, &str)] = &[
    ("butler::http", "http"),
    ("butler_cli::server", "http"),
    ("tower_http", "http"),
    ("butler_core::engine::scheduler", "scheduler"),
    ("butler_core::engine::plan", "scheduler"),
    ("butler_core::engine::worker", "worker"),
    ("butler_core::executor", "worker"),
    ("butler_providers::local", "worker"),
    ("butler_providers::sqlite::queue", "queue"),
    ("butler_providers::postgres::queue", "queue"),
    ("butler_providers::amqp", "queue"),
    ("lapin", "queue"),
    ("butler_providers::sqlite", "store"),
    ("butler_providers::postgres", "store"),
    ("butler_core::store", "store"),
    ("sqlx", "store"),
    ("butler_core::notify", "notify"),
    ("butler_providers::notify", "notify"),
];

/// Added to the default levels: RabbitMQ closes a channel that asks about a queue not yet
/// declared, which Butler expects (a fresh deployment's depth is zero) and which its client
/// logs as an error; a close Butler did not expect fails the call that met it, with the
/// broker's reason, so nothing is lost by not logging it twice.
const QUIET: &str = "lapin::channel=off";

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// The log settings, read and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// `BUTLER_LOG`, or the default level.
    pub filter: String,
    /// `BUTLER_LOG_FORMAT=json`.
    pub json: bool,
    /// Where events go.
    pub destination: Destination,
}

/// Where events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Standard error (the default).
    Stderr,
    /// One file, appended to.
    File(PathBuf),
    /// One file per component in this directory, appended to.
    Dir(PathBuf),
}

impl LogSettings {
    /// Reads the settings through `var` (the environment, in [`init`]); `long_lived` is for
    /// `server`, `scheduler` and `worker`, whose default level is `info`.
    pub fn read(var: impl Fn(&str) -> Option<String>, long_lived: bool) -> Result<LogSettings> {
        let set = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        let filter = match set(LOG_VAR) {
            Some(filter) => {
                check_filter(&filter)?;
                filter.trim().to_owned()
            }
            None if long_lived => format!("info,{QUIET}"),
            None => format!("warn,{QUIET}"),
        };
        let json = match set(FORMAT_VAR).as_deref().map(str::trim) {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => bail!(
                "{FORMAT_VAR}={other:?} is not a log format; set it to `text` (the default) or \
                 `json` (one JSON object per line)"
            ),
        };
        let destination = match (set(FILE_VAR), set(DIR_VAR)) {
            (Some(_), Some(_)) => bail!(
                "both {FILE_VAR} and {DIR_VAR} are set; set {FILE_VAR} for one log file, or \
                 {DIR_VAR} for one file per component, not both"
            ),
            (Some(file), None) => Destination::File(PathBuf::from(file)),
            (None, Some(dir)) => Destination::Dir(PathBuf::from(dir)),
            (None, None) => Destination::Stderr,
        };
        Ok(LogSettings {
            filter,
            json,
            destination,
        })
    }
}

/// Sends this process's `tracing` events where the environment says (see the module docs);
/// `long_lived` is for `server`, `scheduler` and `worker`. Fails naming the variable whose
/// value is wrong, or the file that cannot be opened.
pub fn init(long_lived: bool) -> Result<()> {
    let settings = LogSettings::read(|name| std::env::var(name).ok(), long_lived)?;
    let filter = parse_filter(&settings.filter)?;
    match &settings.destination {
        Destination::Stderr => install(
            filter,
            settings.json,
            io::stderr,
            io::stderr().is_terminal(),
        ),
        Destination::File(path) => {
            let file = open_append(path).with_context(|| {
                format!(
                    "cannot open {FILE_VAR}={} to append the log to; give a file in a \
                     directory Butler may write to",
                    path.display()
                )
            })?;
            install(filter, settings.json, std::sync::Arc::new(file), false);
        }
        Destination::Dir(dir) => {
            let split = SplitByComponent::open(dir).with_context(|| {
                format!(
                    "cannot write log files in {DIR_VAR}={}; give a directory Butler may \
                     create and write to",
                    dir.display()
                )
            })?;
            install(filter, settings.json, split, false);
        }
    }
    Ok(())
}

fn install<W>(filter: EnvFilter, json: bool, writer: W, ansi: bool)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    // A second initialisation can only happen in tests that run the CLI twice in one process;
    // logging stays as first set.
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder.with_ansi(ansi).try_init()
    };
}

/// Refuses what `tracing`'s syntax accepts but is surely a typo: a bare word that is not a
/// level (`verbose`, `warning`), which would otherwise be read as a module name and silence
/// everything else.
fn check_filter(filter: &str) -> Result<()> {
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !directive.contains(['=', '[', ':']);
        if bare && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            bail!(
                "{LOG_VAR}: {directive:?} is not a level; use one of {} (e.g. {LOG_VAR}=info), \
                 or MODULE=LEVEL for one module (e.g. {LOG_VAR}=info,butler_core::engine=debug)",
                LEVELS.join(", ")
            );
        }
    }
    parse_filter(filter).map(drop)
}

fn parse_filter(filter: &str) -> Result<EnvFilter> {
    EnvFilter::builder().parse(filter).map_err(|err| {
        anyhow::anyhow!(
            "{LOG_VAR}={filter:?} is not a valid log filter ({err}); write LEVEL or \
             MODULE=LEVEL separated by commas, e.g. {LOG_VAR}=info,butler_core::engine=debug"
        )
    })
}

fn open_append(path: &Path) -> io::Result<File> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// The component an event of `target` belongs to: its file's name without `.log`.
pub fn component(target: &str) -> &'static str {
    COMPONENTS
        .iter()
        .find(|(prefix, _)| {
            target
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
        .map_or(OTHER_COMPONENT, |(_, component)| component)
}

/// Appends each event to `DIR/COMPONENT.log`; a component's file is opened when its first
/// event comes. Each event is written with one `write` on a file opened for appending, so
/// several processes may share the directory without tearing lines.
struct SplitByComponent {
    dir: PathBuf,
    other: File,
    files: HashMap<&'static str, OnceLock<Option<File>>>,
}

impl SplitByComponent {
    fn open(dir: &Path) -> io::Result<SplitByComponent> {
        fs::create_dir_all(dir)?;
        let other = open_append(&dir.join(format!("{OTHER_COMPONENT}.log")))?;
        let files = COMPONENTS
            .iter()
            .map(|(_, component)| (*component, OnceLock::new()))
            .collect();
        Ok(SplitByComponent {
            dir: dir.to_owned(),
            other,
            files,
        })
    }
}

impl<'a> MakeWriter<'a> for SplitByComponent {
    type Writer = &'a File;

    fn make_writer(&'a self) -> &'a File {
        &self.other
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> &'a File {
        let component = component(meta.target());
        let Some(file) = self.files.get(component) else {
            return &self.other;
        };
        // A component file that cannot be opened falls back to the shared one rather than
        // losing events.
        file.get_or_init(|| open_append(&self.dir.join(format!("{component}.log"))).ok())
            .as_ref()
            .unwrap_or(&self.other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(vars: &[(&str, &str)], long_lived: bool) -> Result<LogSettings> {
        LogSettings::read(
            |name| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            },
            long_lived,
        )
    }

    #[test]
    fn defaults_are_quiet_for_commands_and_informative_for_services() {
        let command = read(&[], false).expect("defaults");
        assert_eq!(command.filter, "warn,lapin::channel=off");
        assert!(!command.json);
        assert_eq!(command.destination, Destination::Stderr);
        let service = read(&[], true).expect("defaults");
        assert_eq!(service.filter, "info,lapin::channel=off");
        // Empty values count as unset.
        assert_eq!(read(&[(LOG_VAR, " ")], true).expect("empty"), service);
    }

    #[test]
    fn per_module_levels_formats_and_destinations_are_read() {
        let settings = read(
            &[
                (LOG_VAR, "info,butler_core::engine=debug"),
                (FORMAT_VAR, "json"),
                (DIR_VAR, "/var/log/butler"),
            ],
            false,
        )
        .expect("valid");
        assert_eq!(settings.filter, "info,butler_core::engine=debug");
        assert!(settings.json);
        assert_eq!(
            settings.destination,
            Destination::Dir(PathBuf::from("/var/log/butler"))
        );
        let file = read(&[(FILE_VAR, "b.log"), (FORMAT_VAR, "text")], false).expect("valid");
        assert_eq!(file.destination, Destination::File(PathBuf::from("b.log")));
        assert!(!file.json);
    }

    #[test]
    fn bad_values_are_refused_naming_the_variable_and_the_fix() {
        let message = |vars: &[(&str, &str)]| format!("{:#}", read(vars, false).unwrap_err());
        let format = message(&[(FORMAT_VAR, "xml")]);
        assert!(format.contains("BUTLER_LOG_FORMAT=\"xml\"") && format.contains("`json`"));
        let both = message(&[(FILE_VAR, "a.log"), (DIR_VAR, "logs")]);
        assert!(both.contains("BUTLER_LOG_FILE") && both.contains("BUTLER_LOG_DIR"));
        let word = message(&[(LOG_VAR, "info,verbose")]);
        assert!(word.contains("BUTLER_LOG") && word.contains("\"verbose\" is not a level"));
        let syntax = message(&[(LOG_VAR, "butler_core=loud")]);
        assert!(
            syntax.contains("BUTLER_LOG=\"butler_core=loud\" is not a valid log filter"),
            "{syntax}"
        );
    }

    #[test]
    fn targets_map_to_components_on_module_boundaries() {
        assert_eq!(component("butler::http"), "http");
        assert_eq!(component("butler_core::engine::scheduler"), "scheduler");
        assert_eq!(component("butler_core::engine::worker"), "worker");
        assert_eq!(component("butler_providers::sqlite::queue"), "queue");
        assert_eq!(
            component("butler_providers::sqlite::store::engine"),
            "store"
        );
        assert_eq!(component("sqlx::query"), "store");
        assert_eq!(component("butler_core::engine"), "butler");
        // A prefix is a whole module, not the start of a longer name.
        assert_eq!(component("sqlxtra"), "butler");
        assert_eq!(component("butler_cli::commands::engine"), "butler");
    }

    #[test]
    fn events_are_split_into_one_file_per_component() {
        let dir = tempfile::tempdir().expect("tempdir");
        let split = SplitByComponent::open(dir.path()).expect("open");
        let subscriber = tracing_subscriber::fmt()
            .with_writer(split)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "butler::http", "a request");
            tracing::info!(target: "butler_core::engine::scheduler", "a run finished");
            tracing::info!(target: "butler_cli::commands", "something else");
        });
        let read = |name: &str| fs::read_to_string(dir.path().join(name)).unwrap_or_default();
        let http = read("http.log");
        assert!(
            http.contains("a request") && http.lines().count() == 1,
            "{http}"
        );
        let scheduler = read("scheduler.log");
        assert!(
            scheduler.contains("a run finished") && scheduler.lines().count() == 1,
            "{scheduler}"
        );
        let other = read("butler.log");
        assert!(
            other.contains("something else") && other.lines().count() == 1,
            "{other}"
        );
        assert!(!dir.path().join("worker.log").exists(), "no event, no file");
    }
}
