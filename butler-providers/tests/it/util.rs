//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use butler_providers::sqlite::{SqliteConfig, SqliteStore};
use tempfile::TempDir;

/// A database path inside a fresh temporary directory, removed when dropped.
pub struct TempDb {
    /// Keeps the directory alive.
    pub dir: TempDir,
    /// The database file inside it (not created yet).
    pub path: PathBuf,
}

impl TempDb {
    /// A new temporary directory with a `butler.db` path in it.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("butler.db");
        TempDb { dir, path }
    }

    /// The `sqlite://` URL of the database, with `params` (such as `durability=normal`).
    pub fn url(&self, params: &str) -> String {
        let base = format!("sqlite://{}", self.path.display());
        if params.is_empty() {
            base
        } else {
            format!("{base}?{params}")
        }
    }

    /// Opens a store on the database with default settings.
    pub async fn open(&self) -> SqliteStore {
        open_sqlite(&self.path).await
    }
}

/// Opens a SQLite store on `path` with default settings.
pub async fn open_sqlite(path: &Path) -> SqliteStore {
    SqliteStore::open(&SqliteConfig::new(path))
        .await
        .expect("the SQLite store opens")
}

/// Polls `check` until it holds, failing after `limit`.
pub async fn until(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "gave up after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
