//! Validated settings: where Butler's home is, which store and queue to use, and how many
//! worker slots to run.

use std::env;
use std::ffi::OsString;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use butler_providers::connect::{self, Backends};

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

    /// Opens the store and the task queue, creating Butler's home first when the default store
    /// lives there.
    pub async fn connect(&self) -> Result<Backends> {
        if self.default_store {
            std::fs::create_dir_all(&self.home).with_context(|| {
                format!(
                    "cannot create Butler's home {}; set BUTLER_HOME to a directory you may \
                     write to, or pass --db URL",
                    self.home.display()
                )
            })?;
        }
        Ok(connect::connect(&self.store_url, self.queue_url.as_deref()).await?)
    }

    /// Worker slots from `--slots`, or one per CPU.
    pub fn slots(&self, slots: Option<usize>) -> usize {
        slots.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, NonZeroUsize::get))
    }
}

fn non_empty_env(name: &str) -> Option<OsString> {
    env::var_os(name).filter(|value| !value.is_empty())
}
