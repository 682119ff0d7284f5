//! Email over SMTP: one plain-text message per alert.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use butler_core::notify::{Alert, Notifier, NotifierEntry};
use butler_core::{Error, Result};
use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Deserialize;

use super::Place;

/// How long one delivery may take unless the table sets `timeout`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// What starts every subject unless the table sets `subject_prefix`.
const DEFAULT_PREFIX: &str = "[butler] ";

/// How the connection to the SMTP server is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS, which must succeed (port 587 by default).
    Starttls,
    /// TLS from the first byte (port 465 by default).
    Tls,
    /// No encryption at all (port 25 by default): only for a relay on the same host or network.
    None,
}

impl SmtpTls {
    fn default_port(self) -> u16 {
        match self {
            SmtpTls::Starttls => 587,
            SmtpTls::Tls => 465,
            SmtpTls::None => 25,
        }
    }
}

/// One recipient or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum Recipients {
    One(String),
    Many(Vec<String>),
}

/// The keys of a `kind = "email"` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    host: String,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    tls: Option<SmtpTls>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    password_env: Option<String>,
    from: String,
    to: Recipients,
    #[serde(default)]
    subject_prefix: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
}

/// A validated `kind = "email"` table.
#[derive(Clone)]
pub struct EmailConfig {
    /// The SMTP server.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// How the connection is protected.
    pub tls: SmtpTls,
    /// User name and password, when the server wants them.
    pub credentials: Option<(String, String)>,
    /// The sender.
    pub from: Mailbox,
    /// The recipients.
    pub to: Vec<Mailbox>,
    /// What starts every subject.
    pub subject_prefix: String,
    /// How long one delivery may take.
    pub timeout: Duration,
}

impl fmt::Debug for EmailConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmailConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.credentials.as_ref().map(|(user, _)| user))
            .field("from", &self.from.to_string())
            .field(
                "to",
                &self.to.iter().map(ToString::to_string).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl EmailConfig {
    /// Reads a `kind = "email"` table: `host`, `from`, `to` (one address or a list), and
    /// optional `port`, `tls` (`starttls`, the default; `tls`; or `none`), `username` with
    /// `password` or `password_env` (a variable holding it), `subject_prefix` and `timeout`.
    pub(crate) fn from_settings(at: &Place<'_>, entry: &NotifierEntry) -> Result<Self> {
        let settings: Settings = at.settings(entry)?;
        let host = settings.host.trim().to_owned();
        if host.is_empty() {
            return Err(at.invalid("`host` is empty; give the SMTP server's name"));
        }
        let tls = settings.tls.unwrap_or(SmtpTls::Starttls);
        let port = settings.port.unwrap_or_else(|| tls.default_port());
        if port == 0 {
            return Err(at.invalid("`port = 0` is not a port; leave it out for the default"));
        }
        let address = |key: &str, text: &str| -> Result<Mailbox> {
            text.trim().parse::<Mailbox>().map_err(|err| {
                at.invalid(format!(
                    "`{key} = {text:?}` is not an email address ({err}); write it like \
                     \"ops@example.org\" or \"Ops <ops@example.org>\""
                ))
            })
        };
        let from = address("from", &settings.from)?;
        let to = match settings.to {
            Recipients::One(one) => vec![address("to", &one)?],
            Recipients::Many(many) => many
                .iter()
                .map(|one| address("to", one))
                .collect::<Result<Vec<_>>>()?,
        };
        if to.is_empty() {
            return Err(at.invalid("`to` names no recipient; give one address or a list"));
        }
        let password = match (settings.password, settings.password_env) {
            (Some(_), Some(_)) => {
                return Err(at.invalid(
                    "both `password` and `password_env` are set; keep one (password_env keeps \
                     the secret out of the file)",
                ));
            }
            (Some(password), None) => Some(password),
            (None, Some(var)) => match std::env::var(&var) {
                Ok(password) if !password.is_empty() => Some(password),
                _ => {
                    return Err(at.invalid(format!(
                        "`password_env = {var:?}` names a variable that is not set; set {var} \
                         in the environment of the server, or fix the name"
                    )));
                }
            },
            (None, None) => None,
        };
        let credentials = match (settings.username, password) {
            (Some(user), Some(password)) => Some((user, password)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(at.invalid(
                    "`username` without a password; add `password_env = \"VAR\"` (or \
                     `password`), or remove `username`",
                ));
            }
            (None, Some(_)) => {
                return Err(at.invalid("a password without `username`; add `username`"));
            }
        };
        let timeout = at.duration("timeout", settings.timeout.as_deref(), DEFAULT_TIMEOUT)?;
        Ok(EmailConfig {
            host,
            port,
            tls,
            credentials,
            from,
            to,
            subject_prefix: settings
                .subject_prefix
                .unwrap_or_else(|| DEFAULT_PREFIX.to_owned()),
            timeout,
        })
    }
}

/// Sends each [`Alert`] as a plain-text email: the title (after a prefix) as the subject, the
/// body as the text.
pub struct EmailNotifier {
    config: EmailConfig,
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl fmt::Debug for EmailNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmailNotifier")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl EmailNotifier {
    /// A notifier sending through the server of `config`.
    pub fn new(config: EmailConfig) -> Result<Self> {
        let builder = match config.tls {
            SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&config.host),
            SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&config.host),
            SmtpTls::None => Ok(AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(
                config.host.as_str(),
            )),
        }
        .map_err(|err| {
            Error::InvalidInput(format!(
                "cannot set up TLS for the SMTP server {}: {err}; check `host`",
                config.host
            ))
        })?;
        let mut builder = builder.port(config.port).timeout(Some(config.timeout));
        if let Some((user, password)) = &config.credentials {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(EmailNotifier {
            transport: builder.build(),
            config,
        })
    }

    /// The message for `alert`.
    fn message(&self, alert: &Alert) -> Result<Message> {
        let mut builder = Message::builder()
            .from(self.config.from.clone())
            .subject(format!("{}{}", self.config.subject_prefix, alert.title))
            .header(ContentType::TEXT_PLAIN);
        for to in &self.config.to {
            builder = builder.to(to.clone());
        }
        let body = format!(
            "{}\n\n-- \nSent by Butler ({} alert at {}).\n",
            alert.body,
            alert.kind,
            alert.at.format("%Y-%m-%d %H:%M:%S UTC")
        );
        builder
            .body(body)
            .map_err(|err| Error::backend("cannot build the alert's email", err))
    }
}

#[async_trait]
impl Notifier for EmailNotifier {
    async fn send(&self, alert: &Alert) -> Result<()> {
        let message = self.message(alert)?;
        let server = format!("{}:{}", self.config.host, self.config.port);
        match self.transport.send(message).await {
            Ok(_) => Ok(()),
            Err(err) if err.is_permanent() || err.is_client() => Err(Error::backend(
                format!(
                    "the SMTP server {server} refused the alert's email; check `from`, `to` \
                     and the credentials"
                ),
                err,
            )),
            Err(err) => Err(Error::unavailable(
                format!("cannot send the alert's email through {server}"),
                err,
            )),
        }
    }
}
