//! SQLite settings.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use butler_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// The forms of SQLite URL Butler accepts, for error messages.
const URL_FORMS: &str = "sqlite:///absolute/path.db, sqlite://relative/path.db, sqlite:path.db \
                         or sqlite::memory:, optionally followed by ?durability=normal";

/// How a [`super::SqliteStore`] opens its database.
///
/// Built from a URL with [`SqliteConfig::from_url`] (or `str::parse`), or directly. Defaults:
/// [`Durability::Full`], a busy timeout of 10 s and 8 connections (1 for an in-memory database).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteConfig {
    /// The database file, created with its parent directories on first use; `:memory:` is a
    /// private in-memory database that lives as long as the store.
    pub path: PathBuf,
    /// What a committed write survives.
    #[serde(default)]
    pub durability: Durability,
    /// How long a write waits for another connection's write to finish, in milliseconds, before
    /// failing as unavailable.
    #[serde(default = "default_busy_timeout_ms")]
    pub busy_timeout_ms: u64,
    /// The most connections open at once; `None` picks 8 for a file and 1 for memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

/// What a committed write survives, as SQLite's `synchronous` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Survives a crash of the machine or a power loss (`PRAGMA synchronous=FULL`).
    #[default]
    Full,
    /// Survives a crash of the process; the last commits may be lost if the machine loses
    /// power, in exchange for faster writes (`PRAGMA synchronous=NORMAL`).
    Normal,
}

fn default_busy_timeout_ms() -> u64 {
    10_000
}

impl SqliteConfig {
    /// The path that names an in-memory database.
    pub const MEMORY: &'static str = ":memory:";

    /// Settings for the database file at `path`, with the defaults.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteConfig {
            path: path.into(),
            durability: Durability::default(),
            busy_timeout_ms: default_busy_timeout_ms(),
            max_connections: None,
        }
    }

    /// Settings for a private in-memory database, with the defaults.
    pub fn memory() -> Self {
        Self::new(Self::MEMORY)
    }

    /// Whether the database lives in memory rather than in a file.
    pub fn is_memory(&self) -> bool {
        self.path == Path::new(Self::MEMORY)
    }

    /// How long a write waits for another one before failing.
    pub fn busy_timeout(&self) -> Duration {
        Duration::from_millis(self.busy_timeout_ms)
    }

    /// The most connections open at once, with the default applied.
    pub fn connections(&self) -> u32 {
        self.max_connections
            .unwrap_or(if self.is_memory() { 1 } else { 8 })
            .max(1)
    }

    /// Parses `sqlite:///abs/path.db`, `sqlite://relative.db`, `sqlite:path.db` or
    /// `sqlite::memory:`, with optional query parameters `durability` (`full` or `normal`),
    /// `busy_timeout_ms` and `max_connections`. `%XX` escapes in the path are decoded.
    pub fn from_url(url: &str) -> Result<Self> {
        let rest = url.strip_prefix("sqlite:").ok_or_else(|| {
            Error::InvalidInput(format!(
                "{url:?} is not a SQLite URL; write it as {URL_FORMS}"
            ))
        })?;
        let (location, query) = match rest.split_once('?') {
            Some((location, query)) => (location, Some(query)),
            None => (rest, None),
        };
        // `sqlite://x` names `x` (relative) and `sqlite:///x` names `/x`: the authority is
        // always empty, so the path starts right after `//`.
        let location = location.strip_prefix("//").unwrap_or(location);
        if location.is_empty() {
            return Err(Error::InvalidInput(format!(
                "the SQLite URL {url:?} names no database; write it as {URL_FORMS}"
            )));
        }
        let path = percent_decode(location).ok_or_else(|| {
            Error::InvalidInput(format!(
                "the SQLite URL {url:?} has a bad %-escape in its path; write a `%` as %25"
            ))
        })?;
        let mut config = SqliteConfig::new(path);
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "durability" => config.durability = value.parse()?,
                "busy_timeout_ms" => config.busy_timeout_ms = parse_number(url, key, value)?,
                "max_connections" => {
                    let n: u32 = parse_number(url, key, value)?;
                    if n == 0 {
                        return Err(Error::InvalidInput(format!(
                            "max_connections=0 in {url:?} allows no connection; give 1 or more"
                        )));
                    }
                    config.max_connections = Some(n);
                }
                _ => {
                    return Err(Error::InvalidInput(format!(
                        "unknown parameter {key:?} in SQLite URL {url:?}; the parameters are \
                         durability=full|normal, busy_timeout_ms=N and max_connections=N"
                    )));
                }
            }
        }
        Ok(config)
    }

    /// The URL that [`SqliteConfig::from_url`] turns back into these settings.
    pub fn to_url(&self) -> String {
        let location = if self.is_memory() {
            ":memory:".to_owned()
        } else {
            format!(
                "//{}",
                crate::connect::encode_path(&self.path.to_string_lossy())
            )
        };
        let mut params = Vec::new();
        if self.durability != Durability::Full {
            params.push(format!("durability={}", self.durability));
        }
        if self.busy_timeout_ms != default_busy_timeout_ms() {
            params.push(format!("busy_timeout_ms={}", self.busy_timeout_ms));
        }
        if let Some(n) = self.max_connections {
            params.push(format!("max_connections={n}"));
        }
        if params.is_empty() {
            format!("sqlite:{location}")
        } else {
            format!("sqlite:{location}?{}", params.join("&"))
        }
    }
}

impl FromStr for SqliteConfig {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self> {
        SqliteConfig::from_url(url)
    }
}

impl Durability {
    /// The name used in URLs and config files: `full` or `normal`.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Full => "full",
            Durability::Normal => "normal",
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Durability {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Durability::Full),
            "normal" => Ok(Durability::Normal),
            _ => Err(Error::InvalidInput(format!(
                "unknown durability {s:?}; use `full` (survives power loss, the default) or \
                 `normal` (faster, survives a process crash)"
            ))),
        }
    }
}

fn parse_number<T: FromStr>(url: &str, key: &str, value: &str) -> Result<T> {
    value.parse().map_err(|_| {
        Error::InvalidInput(format!(
            "{key}={value:?} in SQLite URL {url:?} is not a whole number; write e.g. {key}=10"
        ))
    })
}

/// Decodes `%XX` escapes; `None` when an escape is malformed or the result is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_url_form() {
        let abs = SqliteConfig::from_url("sqlite:///var/lib/butler/butler.db").unwrap();
        assert_eq!(abs.path, Path::new("/var/lib/butler/butler.db"));
        assert_eq!(abs.durability, Durability::Full);
        assert_eq!(abs.busy_timeout(), Duration::from_secs(10));
        assert_eq!(abs.connections(), 8);

        let rel = SqliteConfig::from_url("sqlite://data/butler.db").unwrap();
        assert_eq!(rel.path, Path::new("data/butler.db"));
        let bare = SqliteConfig::from_url("sqlite:butler.db").unwrap();
        assert_eq!(bare.path, Path::new("butler.db"));

        let memory = SqliteConfig::from_url("sqlite::memory:").unwrap();
        assert!(memory.is_memory());
        assert_eq!(memory.connections(), 1);
    }

    #[test]
    fn parses_parameters() {
        let config = SqliteConfig::from_url(
            "sqlite:///tmp/b.db?durability=normal&busy_timeout_ms=250&max_connections=3",
        )
        .unwrap();
        assert_eq!(config.durability, Durability::Normal);
        assert_eq!(config.busy_timeout(), Duration::from_millis(250));
        assert_eq!(config.connections(), 3);
        assert_eq!(SqliteConfig::from_url(&config.to_url()).unwrap(), config);
    }

    #[test]
    fn decodes_and_encodes_escapes() {
        let config = SqliteConfig::from_url("sqlite:///tmp/my%20dir/a%3Fb.db").unwrap();
        assert_eq!(config.path, Path::new("/tmp/my dir/a?b.db"));
        assert_eq!(SqliteConfig::from_url(&config.to_url()).unwrap(), config);
        assert!(SqliteConfig::from_url("sqlite:///tmp/100%.db").is_err());
    }

    #[test]
    fn rejects_bad_urls_naming_the_problem() {
        let err = SqliteConfig::from_url("sqlite:///b.db?durability=fast")
            .unwrap_err()
            .to_string();
        assert!(err.contains("fast") && err.contains("normal"), "{err}");
        let err = SqliteConfig::from_url("sqlite:///b.db?journal=wal")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("journal") && err.contains("durability"),
            "{err}"
        );
        let err = SqliteConfig::from_url("sqlite://").unwrap_err().to_string();
        assert!(err.contains("names no database"), "{err}");
        let err = SqliteConfig::from_url("postgres://x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a SQLite URL"), "{err}");
        assert!(SqliteConfig::from_url("sqlite:b.db?max_connections=0").is_err());
        assert!(SqliteConfig::from_url("sqlite:b.db?busy_timeout_ms=soon").is_err());
    }

    #[test]
    fn serde_applies_defaults() {
        let config: SqliteConfig = serde_json::from_str(r#"{"path": "/tmp/b.db"}"#).unwrap();
        assert_eq!(config, SqliteConfig::new("/tmp/b.db"));
        let normal: SqliteConfig =
            serde_json::from_str(r#"{"path": "b.db", "durability": "normal"}"#).unwrap();
        assert_eq!(normal.durability, Durability::Normal);
    }
}
