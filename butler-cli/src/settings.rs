//! Validated settings: where Butler's home is and which store to use.

use std::env;
use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use butler_core::tracker::Tracker;

/// Where the tracker lives, resolved from flags and the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    home: PathBuf,
    store_url: String,
    default_store: bool,
}

impl Settings {
    /// Settings from `--db` (or `BUTLER_DB`, already read by clap) and `BUTLER_HOME`, which
    /// defaults to `~/.butler`.
    pub fn new(db: Option<String>) -> Result<Settings> {
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
            None => (butler_providers::connect::default_store_url(&home), true),
        };
        Ok(Settings {
            home,
            store_url,
            default_store,
        })
    }

    /// Where workflow definitions are looked up when `--definition` is not given.
    pub fn workflows_dir(&self) -> PathBuf {
        self.home.join("workflows")
    }

    /// Opens the store, creating Butler's home first when the default store lives there.
    pub async fn tracker(&self) -> Result<Tracker> {
        if self.default_store {
            std::fs::create_dir_all(&self.home).with_context(|| {
                format!(
                    "cannot create Butler's home {}; set BUTLER_HOME to a directory you may \
                     write to, or pass --db URL",
                    self.home.display()
                )
            })?;
        }
        let store = butler_providers::connect::connect_store(&self.store_url).await?;
        Ok(Tracker::new(store))
    }
}

fn non_empty_env(name: &str) -> Option<OsString> {
    env::var_os(name).filter(|value| !value.is_empty())
}
