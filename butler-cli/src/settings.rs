//! Validated settings: where Butler's home is, which store and queue to use, and how many
//! worker slots to run.

use std::env;
use std::ffi::OsString;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use butler_core::engine::{EngineOptions, LOST_AFTER_HEARTBEATS};
use butler_core::tracker::Tracker;
use butler_providers::connect::{self, Backends};

/// The variable that sets how often workers report themselves, in seconds (default 5). Meant
/// for tests, which need lost workers and scheduler takeovers within a second or two; the
/// scheduler's lease lasts two such intervals.
pub const HEARTBEAT_VAR: &str = "BUTLER_HEARTBEAT_SECS";

/// Where the tracker lives, resolved from flags and the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    home: PathBuf,
    store_url: String,
    queue_url: Option<String>,
    default_store: bool,
}

impl Settings {
    /// Settings from `--db` and `--queue` (or `BUTLER_DB` and `BUTLER_QUEUE`, already read by
    /// clap) and `BUTLER_HOME`, which defaults to `~/.butler`.
    pub fn new(db: Option<String>, queue: Option<String>) -> Result<Settings> {
        let home = match non_empty_env("BUTLER_HOME") {
            Some(home) => PathBuf::from(home),
            None => match non_empty_env("HOME") {
                Some(user_home) => PathBuf::from(user_home).join(".butler"),
                None => bail!(
                    "cannot find Butler's home: neither BUTLER_HOME nor HOME is set; set \
                     BUTLER_HOME to a directory Butler may write to"
                ),
            },
        };
        let (store_url, default_store) = match db.filter(|url| !url.trim().is_empty()) {
            Some(url) => (url, false),
            None => (connect::default_store_url(&home), true),
        };
        Ok(Settings {
            home,
            store_url,
            queue_url: queue.filter(|url| !url.trim().is_empty()),
            default_store,
        })
    }

    /// `BUTLER_HOME`: attempt directories and their logs live under `runs/` in it.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Where workflow definitions are looked up when `--definition` is not given.
    pub fn workflows_dir(&self) -> PathBuf {
        self.home.join("workflows")
    }

    /// The tracker on the store alone, creating Butler's home first when the default store
    /// lives there. A `--queue` is checked but not opened: only the engine's commands use it.
    pub async fn tracker(&self) -> Result<Tracker> {
        if let Some(url) = &self.queue_url {
            connect::check_queue_url(url)?;
        }
        self.create_home()?;
        Ok(Tracker::new(connect::connect_store(&self.store_url).await?))
    }

    /// Opens the store and the task queue, creating Butler's home first when the default store
    /// lives there.
    pub async fn connect(&self) -> Result<Backends> {
        self.create_home()?;
        Ok(connect::connect(&self.store_url, self.queue_url.as_deref()).await?)
    }

    /// The store's URL, as given or defaulted.
    pub fn store_url(&self) -> &str {
        &self.store_url
    }

    /// The queue's URL, if one other than the store's own queue was given.
    pub fn queue_url(&self) -> Option<&str> {
        self.queue_url.as_deref()
    }

    /// Creates Butler's home when the default store lives there.
    pub fn create_home(&self) -> Result<()> {
        if self.default_store {
            std::fs::create_dir_all(&self.home).with_context(|| {
                format!(
                    "cannot create Butler's home {}; set BUTLER_HOME to a directory you may \
                     write to, or pass --db URL",
                    self.home.display()
                )
            })?;
        }
        Ok(())
    }

    /// How often workers report themselves: [`HEARTBEAT_VAR`] seconds, or `None` for the
    /// engine's default.
    pub fn heartbeat(&self) -> Result<Option<Duration>> {
        let Some(value) = non_empty_env(HEARTBEAT_VAR) else {
            return Ok(None);
        };
        let text = value.to_string_lossy();
        match text.trim().parse::<f64>() {
            Ok(seconds) if seconds.is_finite() && seconds > 0.0 && seconds < 86_400.0 => {
                Ok(Some(Duration::from_secs_f64(seconds)))
            }
            _ => bail!(
                "{HEARTBEAT_VAR}={text:?} is not a number of seconds between 0 and 86400; \
                 unset it for the default of 5, or give one such as 0.5"
            ),
        }
    }

    /// How long a worker may stay silent before `list-workers` calls it lost.
    pub fn lost_after(&self) -> Result<Duration> {
        let heartbeat = match self.heartbeat()? {
            Some(heartbeat) => heartbeat,
            None => EngineOptions::new(self.home.clone(), 0).worker_heartbeat,
        };
        Ok(heartbeat * LOST_AFTER_HEARTBEATS)
    }

    /// Engine options for this home with `slots` worker slots, with the heartbeat of
    /// [`HEARTBEAT_VAR`] if it is set (and a scheduler lease of two heartbeats).
    pub fn engine_options(&self, slots: usize) -> Result<EngineOptions> {
        let mut options = EngineOptions::new(self.home.clone(), slots);
        if let Some(heartbeat) = self.heartbeat()? {
            options.worker_heartbeat = heartbeat;
            options.leader_ttl = heartbeat * 2;
        }
        Ok(options)
    }

    /// Worker slots from `--slots`, or one per CPU.
    pub fn slots(&self, slots: Option<usize>) -> usize {
        slots.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, NonZeroUsize::get))
    }
}

fn non_empty_env(name: &str) -> Option<OsString> {
    env::var_os(name).filter(|value| !value.is_empty())
}
