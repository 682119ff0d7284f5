//! PostgreSQL settings.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use butler_core::{Error, Result};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnectOptions;

/// The forms of PostgreSQL URL Butler accepts, for error messages.
const URL_FORMS: &str = "postgres://user:password@host:5432/database or postgresql://…, \
                         optionally followed by ?schema=NAME&max_connections=N&durability=normal";

/// Butler's own URL parameters, taken out of the URL before it reaches the driver.
const BUTLER_PARAMS: &str = "schema=NAME, max_connections=N, durability=full|normal and \
                             connect_timeout_ms=N";

/// The driver's URL parameters, passed on to it unchanged.
const DRIVER_PARAMS: [&str; 18] = [
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// How a [`super::PgStore`] reaches its server and where its tables live.
///
/// Built from a URL with [`PgConfig::from_url`] (or `str::parse`), or directly. Defaults: schema
/// `butler`, 10 connections, [`Durability::Full`], a connect timeout of 10 s. `Debug` shows the
/// URL with its password replaced by `***`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgConfig {
    /// The server's URL as the driver takes it, without Butler's parameters:
    /// `postgres://user:password@host:5432/database`, with any driver parameter such as
    /// `sslmode` or `application_name`.
    pub url: String,
    /// The schema holding Butler's tables, created on first use: lowercase ASCII letters,
    /// digits and `_`, not starting with a digit or `pg_`.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// The most connections open at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// What a committed write survives.
    #[serde(default)]
    pub durability: Durability,
    /// How long opening a connection may take, in milliseconds, before failing as unavailable;
    /// also how long a call waits for a free connection of the pool.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

/// What a committed write survives, as PostgreSQL's `synchronous_commit` setting of each
/// session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// A commit returns once the server has flushed it to disk: it survives a crash of the
    /// server or a power loss (`synchronous_commit = on`).
    #[default]
    Full,
    /// A commit returns before the flush: a crash of the server may lose the last fraction of a
    /// second of commits, never corrupting the database, in exchange for faster writes
    /// (`synchronous_commit = off`).
    Normal,
}

fn default_schema() -> String {
    PgConfig::DEFAULT_SCHEMA.to_owned()
}

fn default_max_connections() -> u32 {
    10
}

fn default_connect_timeout_ms() -> u64 {
    10_000
}

impl PgConfig {
    /// The schema Butler's tables live in unless the URL names another.
    pub const DEFAULT_SCHEMA: &'static str = "butler";

    /// Settings for the server at `url` (taken as it is, without Butler's parameters), with the
    /// defaults.
    pub fn new(url: impl Into<String>) -> Self {
        PgConfig {
            url: url.into(),
            schema: default_schema(),
            max_connections: default_max_connections(),
            durability: Durability::default(),
            connect_timeout_ms: default_connect_timeout_ms(),
        }
    }

    /// These settings with the tables in `schema`.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// How long opening a connection may take.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Parses `postgres://…` or `postgresql://…`. Butler's parameters `schema`,
    /// `max_connections`, `durability` (`full` or `normal`) and `connect_timeout_ms` are taken
    /// out; the driver's (`sslmode`, `application_name`, `options`, …) stay in [`PgConfig::url`].
    /// Any other parameter is refused, so a misspelt one does not go unnoticed.
    pub fn from_url(url: &str) -> Result<Self> {
        let url = url.trim();
        let lower = url.to_ascii_lowercase();
        if !(lower.starts_with("postgres://") || lower.starts_with("postgresql://")) {
            return Err(Error::InvalidInput(format!(
                "{:?} is not a PostgreSQL URL; write it as {URL_FORMS}",
                redact(url)
            )));
        }
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, query),
            None => (url, ""),
        };
        let mut config = PgConfig::new(base);
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "schema" => config.schema = value.to_owned(),
                "durability" => config.durability = value.parse()?,
                "max_connections" => {
                    let n: u32 = parse_number(url, key, value)?;
                    if n == 0 {
                        return Err(Error::InvalidInput(format!(
                            "max_connections=0 in {:?} allows no connection; give 1 or more",
                            redact(url)
                        )));
                    }
                    config.max_connections = n;
                }
                "connect_timeout_ms" => {
                    config.connect_timeout_ms = parse_number(url, key, value)?;
                }
                _ if DRIVER_PARAMS.contains(&key) || key.starts_with("options[") => {
                    kept.push(pair);
                }
                _ => {
                    return Err(Error::InvalidInput(format!(
                        "unknown parameter {key:?} in PostgreSQL URL {:?}; Butler's parameters \
                         are {BUTLER_PARAMS}, and the driver's are {}",
                        redact(url),
                        DRIVER_PARAMS.join(", ")
                    )));
                }
            }
        }
        if !kept.is_empty() {
            config.url = format!("{base}?{}", kept.join("&"));
        }
        config.connect_options()?;
        Ok(config)
    }

    /// The URL that [`PgConfig::from_url`] turns back into these settings, password included.
    pub fn to_url(&self) -> String {
        let mut params = Vec::new();
        if self.schema != Self::DEFAULT_SCHEMA {
            params.push(format!("schema={}", self.schema));
        }
        if self.max_connections != default_max_connections() {
            params.push(format!("max_connections={}", self.max_connections));
        }
        if self.durability != Durability::Full {
            params.push(format!("durability={}", self.durability));
        }
        if self.connect_timeout_ms != default_connect_timeout_ms() {
            params.push(format!("connect_timeout_ms={}", self.connect_timeout_ms));
        }
        if params.is_empty() {
            return self.url.clone();
        }
        let joiner = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{joiner}{}", self.url, params.join("&"))
    }

    /// The URL with its password replaced by `***`, for messages and logs.
    pub fn redacted_url(&self) -> String {
        redact(&self.to_url())
    }

    /// Fails with `InvalidInput` when the schema name or the connection count cannot be used.
    pub fn validate(&self) -> Result<()> {
        check_schema(&self.schema)?;
        if self.max_connections == 0 {
            return Err(Error::InvalidInput(format!(
                "max_connections is 0 for {}, which allows no connection; give 1 or more",
                self.redacted_url()
            )));
        }
        Ok(())
    }

    /// The driver's options for [`PgConfig::url`], after checking the settings.
    pub(crate) fn connect_options(&self) -> Result<PgConnectOptions> {
        self.validate()?;
        self.url.parse::<PgConnectOptions>().map_err(|e| {
            Error::InvalidInput(format!(
                "the PostgreSQL URL {:?} cannot be used ({}); write it as {URL_FORMS}",
                redact(&self.url),
                redact(&e.to_string())
            ))
        })
    }
}

impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &redact(&self.url))
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("durability", &self.durability)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .finish()
    }
}

impl FromStr for PgConfig {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self> {
        PgConfig::from_url(url)
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

    /// The value of `synchronous_commit` that gives this durability.
    pub(crate) fn synchronous_commit(self) -> &'static str {
        match self {
            Durability::Full => "on",
            Durability::Normal => "off",
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
                "unknown durability {s:?}; use `full` (survives a server crash or power loss, \
                 the default) or `normal` (faster, may lose the last commits in a server crash)"
            ))),
        }
    }
}

/// Fails with `InvalidInput` unless `schema` is a name that needs no quoting.
fn check_schema(schema: &str) -> Result<()> {
    let mut chars = schema.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && schema.len() <= 63
        && !schema.starts_with("pg_");
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "the schema name {schema:?} cannot be used; give 1 to 63 lowercase ASCII letters, \
             digits or `_`, not starting with a digit or `pg_` (e.g. schema=butler)"
        )))
    }
}

fn parse_number<T: FromStr>(url: &str, key: &str, value: &str) -> Result<T> {
    value.parse().map_err(|_| {
        Error::InvalidInput(format!(
            "{key}={value:?} in PostgreSQL URL {:?} is not a whole number; write e.g. {key}=10",
            redact(url)
        ))
    })
}

/// `text` with the password of every URL in it, and every `password=` parameter, replaced by
/// `***`.
pub(crate) fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let authority_end = tail.find(['/', '?', '#', ' ']).unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match authority.rfind('@') {
            Some(end) => {
                let userinfo = &authority[..end];
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[end..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    redact_password_params(&out)
}

/// `text` with the value of every `password=` parameter replaced by `***`.
fn redact_password_params(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("password=") {
        let start_of_key = at == 0 || matches!(rest.as_bytes()[at - 1], b'?' | b'&');
        let (head, tail) = rest.split_at(at + "password=".len());
        out.push_str(head);
        if start_of_key {
            let end = tail.find(['&', '#', ' ']).unwrap_or(tail.len());
            out.push_str("***");
            rest = &tail[end..];
        } else {
            rest = tail;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_butler_parameters_and_keeps_the_drivers() {
        let config = PgConfig::from_url(
            "postgres://u:secret@db.example:6543/tracker?sslmode=disable&schema=team_a\
             &max_connections=4&durability=normal&application_name=butler",
        )
        .unwrap();
        assert_eq!(
            config.url,
            "postgres://u:secret@db.example:6543/tracker?sslmode=disable&application_name=butler"
        );
        assert_eq!(config.schema, "team_a");
        assert_eq!(config.max_connections, 4);
        assert_eq!(config.durability, Durability::Normal);
        assert_eq!(PgConfig::from_url(&config.to_url()).unwrap(), config);
    }

    #[test]
    fn applies_defaults() {
        let config = PgConfig::from_url("postgresql://localhost/butler").unwrap();
        assert_eq!(config.url, "postgresql://localhost/butler");
        assert_eq!(config.schema, "butler");
        assert_eq!(config.max_connections, 10);
        assert_eq!(config.durability, Durability::Full);
        assert_eq!(config.connect_timeout(), Duration::from_secs(10));
        assert_eq!(config.to_url(), "postgresql://localhost/butler");
        let serde: PgConfig =
            serde_json::from_str(r#"{"url": "postgresql://localhost/butler"}"#).unwrap();
        assert_eq!(serde, config);
    }

    #[test]
    fn debug_and_errors_hide_the_password() {
        let config =
            PgConfig::from_url("postgres://me:hunter2@h/db?password=hunter3&schema=s").unwrap();
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("hunter3"),
            "{shown}"
        );
        assert!(shown.contains("me:***@h/db"), "{shown}");
        assert!(!config.redacted_url().contains("hunter"));

        let err = PgConfig::from_url("postgres://me:hunter2@h/db?schema=Bad-Name")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Bad-Name") && !err.contains("hunter2"),
            "{err}"
        );
        let err = PgConfig::from_url("postgres://me:hunter2@h/db?durabilty=normal")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("durabilty") && err.contains("schema=NAME") && !err.contains("hunter2"),
            "{err}"
        );
        let err = PgConfig::from_url("mysql://me:hunter2@h/db")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a PostgreSQL URL") && !err.contains("hunter2"),
            "{err}"
        );
    }

    #[test]
    fn rejects_bad_values_naming_the_problem() {
        for (url, needle) in [
            ("postgres://h/db?max_connections=0", "max_connections=0"),
            ("postgres://h/db?max_connections=many", "many"),
            ("postgres://h/db?durability=fast", "fast"),
            ("postgres://h/db?schema=", "schema name"),
            ("postgres://h/db?schema=pg_catalog", "pg_"),
            ("postgres://h/db?schema=1abc", "1abc"),
            ("postgres://h/db?schema=Upper", "Upper"),
            ("postgres://h/db?connect_timeout_ms=soon", "soon"),
            ("postgres://h:notaport/db", "cannot be used"),
        ] {
            let err = PgConfig::from_url(url).expect_err(url);
            assert!(matches!(err, Error::InvalidInput(_)), "{url}: {err:?}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
        let ok = PgConfig::from_url("postgres://h/db?schema=_a1_b2").unwrap();
        assert_eq!(ok.schema, "_a1_b2");
    }

    #[test]
    fn redacts_every_form_of_password() {
        assert_eq!(redact("postgres://a:b@h/d"), "postgres://a:***@h/d");
        assert_eq!(redact("postgres://a@h/d"), "postgres://a@h/d");
        assert_eq!(redact("postgres://h/d"), "postgres://h/d");
        assert_eq!(redact("postgres://a:b:c@d@h/d"), "postgres://a:***@h/d");
        assert_eq!(
            redact("postgres://h/d?password=x&sslmode=disable"),
            "postgres://h/d?password=***&sslmode=disable"
        );
        assert_eq!(redact("no_password=x"), "no_password=x");
    }
}
