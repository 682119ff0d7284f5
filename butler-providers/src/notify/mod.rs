//! Notifiers of alerts and reports (feature `notify`): a generic [webhook](WebhookNotifier)
//! (the alert as JSON), a Slack-style [incoming webhook](SlackNotifier) and
//! [email](EmailNotifier) over SMTP; [`from_config`] builds the ones a notify config declares
//! and [`start_watcher`] runs the alert watcher beside a scheduler.

mod email;
mod http;
mod slack;
mod webhook;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use butler_core::engine::EngineOptions;
use butler_core::notify::{
    DynNotifier, NotifierEntry, NotifyConfig, Watcher, WatcherHandle, WatcherOptions,
};
use butler_core::{DynRunStore, Error, Result};
use serde::de::DeserializeOwned;
use tracing::info;

pub use email::{EmailConfig, EmailNotifier, SmtpTls};
pub use slack::SlackNotifier;
pub use webhook::WebhookNotifier;

/// The notifier kinds this build knows, for error messages.
const KINDS: &str = "\"webhook\", \"slack\" or \"email\"";

/// Builds every notifier `config` declares, by name.
///
/// Fails with [`Error::InvalidInput`] naming the config file, the `[notifiers.NAME]` table, the
/// key and the fix: an unknown `kind`, an unknown or missing key, a URL that is not
/// `http(s)://`, a bad header, address, duration or port, or an unset password variable.
pub fn from_config(config: &NotifyConfig) -> Result<BTreeMap<String, Arc<DynNotifier>>> {
    config
        .notifiers
        .iter()
        .map(|(name, entry)| Ok((name.clone(), notifier(&config.source, name, entry)?)))
        .collect()
}

/// Builds notifier `name` of the config read from `source`.
pub fn notifier(source: &str, name: &str, entry: &NotifierEntry) -> Result<Arc<DynNotifier>> {
    let at = Place {
        source,
        name,
        kind: &entry.kind,
    };
    Ok(match entry.kind.as_str() {
        "webhook" => Arc::new(WebhookNotifier::from_settings(&at, entry)?),
        "slack" => Arc::new(SlackNotifier::from_settings(&at, entry)?),
        "email" => Arc::new(EmailNotifier::new(EmailConfig::from_settings(&at, entry)?)?),
        other => {
            return Err(Error::InvalidInput(format!(
                "{source}: [notifiers.{name}] has kind = {other:?}, which this build does not \
                 know; use {KINDS}"
            )));
        }
    })
}

/// Starts the alert watcher beside the scheduler run with `engine`, if alerts are configured:
/// the notify config at `config_path`, else the file named by
/// `BUTLER_NOTIFY_CONFIG`, else `BUTLER_HOME/notify.toml`.
///
/// `None` when the engine does not schedule (a worker sends no alert) or no config exists.
/// The watcher sends only while this process's scheduler leads, so any number of standby
/// schedulers may run it. A config that cannot be read or is invalid is an error, so a
/// mistake shows when the server starts rather than when the first run fails.
pub async fn start_watcher(
    store: Arc<DynRunStore>,
    engine: &EngineOptions,
    config_path: Option<&Path>,
) -> Result<Option<WatcherHandle>> {
    if !engine.schedule {
        return Ok(None);
    }
    let Some(config) = NotifyConfig::load(&engine.home, config_path)? else {
        return Ok(None);
    };
    let notifiers = from_config(&config)?;
    let watcher = Watcher::new(
        store,
        config.routes.clone(),
        WatcherOptions::for_engine(engine),
    )
    .await?;
    info!(config = %config.source, "alerts and reports configured");
    Ok(Some(watcher.start(notifiers)))
}

/// Where a notifier's settings come from, for error messages.
pub(crate) struct Place<'a> {
    source: &'a str,
    name: &'a str,
    kind: &'a str,
}

impl Place<'_> {
    /// An [`Error::InvalidInput`] about this notifier's table.
    pub(crate) fn invalid(&self, problem: impl std::fmt::Display) -> Error {
        Error::InvalidInput(format!(
            "{}: [notifiers.{}] (kind = \"{}\"): {problem}",
            self.source, self.name, self.kind
        ))
    }

    /// The table's keys (but `kind`) as `T`.
    pub(crate) fn settings<T: DeserializeOwned>(&self, entry: &NotifierEntry) -> Result<T> {
        toml::Value::Table(entry.settings.clone())
            .try_into::<T>()
            .map_err(|err| {
                self.invalid(format!(
                    "{}; fix the key (docs/alerts.md lists every key)",
                    err.message().trim_end()
                ))
            })
    }

    /// The duration of optional key `key`, or `default`.
    pub(crate) fn duration(
        &self,
        key: &str,
        text: Option<&str>,
        default: Duration,
    ) -> Result<Duration> {
        let Some(text) = text else {
            return Ok(default);
        };
        match humantime::parse_duration(text) {
            Ok(duration) if !duration.is_zero() => Ok(duration),
            Ok(_) => Err(self.invalid(format!(
                "`{key} = {text:?}` is zero; give one such as \"10s\""
            ))),
            Err(err) => Err(self.invalid(format!(
                "`{key} = {text:?}` is not a duration ({err}); write it like \"10s\""
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        let config = NotifyConfig::parse(text, "notify.toml").expect("a valid config");
        match from_config(&config) {
            Err(Error::InvalidInput(msg)) => msg,
            Err(other) => panic!("expected InvalidInput, got {other:?}"),
            Ok(_) => panic!("expected an error for {text}"),
        }
    }

    fn assert_contains(msg: &str, parts: &[&str]) {
        for part in parts {
            assert!(msg.contains(part), "{part:?} missing from: {msg}");
        }
    }

    #[tokio::test]
    async fn every_kind_is_built_from_its_table() {
        let config = NotifyConfig::parse(
            r#"
            [notifiers.hook]
            kind = "webhook"
            url = "https://hooks.example.org/butler?token=sekrit"
            headers = { Authorization = "Bearer sekrit" }
            timeout = "5s"

            [notifiers.chat]
            kind = "slack"
            url = "https://chat.example.org/services/T0/B0/sekrit"

            [notifiers.mail]
            kind = "email"
            host = "smtp.example.org"
            username = "butler"
            password = "sekrit"
            from = "Butler <butler@example.org>"
            to = ["ops@example.org", "Lab <lab@example.org>"]
            "#,
            "notify.toml",
        )
        .unwrap();
        let notifiers = from_config(&config).unwrap();
        assert_eq!(
            notifiers.keys().collect::<Vec<_>>(),
            ["chat", "hook", "mail"]
        );
        for (name, notifier) in &notifiers {
            let debug = format!("{notifier:?}");
            assert!(!debug.contains("sekrit"), "{name} shows a secret: {debug}");
        }
        assert!(format!("{:?}", notifiers["hook"]).contains("hooks.example.org"));
    }

    #[test]
    fn mistakes_name_the_table_the_key_and_the_fix() {
        let msg = error("[notifiers.x]\nkind = \"pager\"\n");
        assert_contains(
            &msg,
            &[
                "notify.toml: [notifiers.x]",
                "kind = \"pager\"",
                "\"webhook\"",
            ],
        );
        let msg = error("[notifiers.x]\nkind = \"slack\"\n");
        assert_contains(
            &msg,
            &["[notifiers.x] (kind = \"slack\")", "missing field `url`"],
        );
        let msg =
            error("[notifiers.x]\nkind = \"webhook\"\nurl = \"https://a.example\"\nurls = 1\n");
        assert_contains(&msg, &["unknown field `urls`", "`url`"]);
        let msg = error("[notifiers.x]\nkind = \"webhook\"\nurl = \"ftp://a.example/x\"\n");
        assert_contains(&msg, &["`url`", "http:// or https://"]);
        let msg = error("[notifiers.x]\nkind = \"webhook\"\nurl = \"not a url\"\n");
        assert_contains(&msg, &["`url = \"not a url\"`"]);
        let msg = error(
            "[notifiers.x]\nkind = \"webhook\"\nurl = \"https://a.example\"\nheaders = { \"Bad Name\" = \"v\" }\n",
        );
        assert_contains(&msg, &["header \"Bad Name\""]);
        let msg = error(
            "[notifiers.x]\nkind = \"webhook\"\nurl = \"https://a.example\"\ntimeout = \"soon\"\n",
        );
        assert_contains(&msg, &["`timeout = \"soon\"` is not a duration"]);
        let mail = "[notifiers.m]\nkind = \"email\"\nhost = \"smtp.example.org\"\n";
        let msg = error(&format!(
            "{mail}from = \"butler\"\nto = \"ops@example.org\"\n"
        ));
        assert_contains(&msg, &["`from = \"butler\"` is not an email address"]);
        let msg = error(&format!("{mail}from = \"b@example.org\"\nto = []\n"));
        assert_contains(&msg, &["`to` names no recipient"]);
        let msg = error(&format!(
            "{mail}from = \"b@example.org\"\nto = \"o@example.org\"\ntls = \"ssl\"\n"
        ));
        assert_contains(&msg, &["unknown variant `ssl`", "`starttls`"]);
        let msg = error(&format!(
            "{mail}from = \"b@example.org\"\nto = \"o@example.org\"\nusername = \"u\"\n"
        ));
        assert_contains(&msg, &["`username` without a password", "password_env"]);
        let msg = error(&format!(
            "{mail}from = \"b@example.org\"\nto = \"o@example.org\"\nusername = \"u\"\n\
             password_env = \"BUTLER_TEST_SURELY_UNSET_PASSWORD\"\n"
        ));
        assert_contains(&msg, &["BUTLER_TEST_SURELY_UNSET_PASSWORD", "is not set"]);
    }
}
