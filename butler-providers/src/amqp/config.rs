//! RabbitMQ settings.

use std::fmt;
use std::str::FromStr;

use butler_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// The form of an AMQP URL Butler accepts, for error messages.
const URL_FORM: &str = "amqp://user:password@host:5672/vhost (amqps:// for TLS; %2f is the \
                        default vhost `/`), optionally followed by \
                        ?prefix=butler&prefetch=100";

/// Longest accepted [`AmqpConfig::prefix`], in bytes; the rest of the 255 bytes RabbitMQ allows
/// in a name is left for the queue name.
pub const MAX_PREFIX_LEN: usize = 64;

/// How an [`AmqpQueue`](super::AmqpQueue) reaches RabbitMQ and names what it creates there.
///
/// Built from a URL with [`AmqpConfig::from_url`] (or `str::parse`), or directly. Defaults:
/// prefix `butler`, prefetch 100. `Debug` shows the URL with its password
/// replaced by `***`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// The broker, as the AMQP client reads it: `amqp://user:password@host:port/vhost`, with its
    /// own query parameters (`heartbeat`, `connection_timeout`, `channel_max`, `frame_max`,
    /// `auth_mechanism`) if any, and none of Butler's.
    pub url: String,
    /// Starts the name of every queue and exchange this Butler uses (`{prefix}.{queue}`, …), so
    /// environments sharing a vhost stay apart. Letters, digits, `.`, `-`, `_` and `:`; at most
    /// [`MAX_PREFIX_LEN`] bytes; not starting with `amq.`, which RabbitMQ reserves.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// How many messages of one queue a process receives ahead of its dequeues, besides those
    /// it holds leased (the consumer prefetch), 1 to 1000. More keeps fast tasks flowing; fewer
    /// spreads a queue of long tasks more evenly over many workers.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
}

fn default_prefix() -> String {
    "butler".to_owned()
}

fn default_prefetch() -> u16 {
    100
}

impl AmqpConfig {
    /// Settings for the broker at `url` (without Butler's parameters), with the defaults.
    pub fn new(url: impl Into<String>) -> Self {
        AmqpConfig {
            url: url.into(),
            prefix: default_prefix(),
            prefetch: default_prefetch(),
        }
    }

    /// Parses `amqp://user:password@host:port/vhost` or `amqps://…`, taking Butler's own query
    /// parameters `prefix` and `prefetch` out of it and leaving the client's
    /// (`heartbeat`, `connection_timeout`, …) in [`AmqpConfig::url`].
    pub fn from_url(url: &str) -> Result<Self> {
        let url = url.trim();
        let lower = url.to_ascii_lowercase();
        if !(lower.starts_with("amqp://") || lower.starts_with("amqps://")) {
            return Err(Error::InvalidInput(format!(
                "{:?} is not an AMQP URL; write it as {URL_FORM}",
                redact(url)
            )));
        }
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, query),
            None => (url, ""),
        };
        let mut config = AmqpConfig::new(base);
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "prefix" => {
                    config.prefix = percent_decode(value).ok_or_else(|| {
                        Error::InvalidInput(format!(
                            "prefix={value:?} in AMQP URL {:?} has a bad %-escape; write a `%` \
                             as %25",
                            redact(url)
                        ))
                    })?;
                }
                "prefetch" => config.prefetch = parse_number(url, key, value)?,
                _ => kept.push(pair),
            }
        }
        if !kept.is_empty() {
            config.url = format!("{base}?{}", kept.join("&"));
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every setting, naming the first wrong one and how to fix it.
    pub fn validate(&self) -> Result<()> {
        let shown = redact(&self.url);
        lapin::uri::AMQPUri::from_str(&self.url).map_err(|e| {
            Error::InvalidInput(format!(
                "the AMQP URL {shown:?} cannot be read ({e}); write it as {URL_FORM}"
            ))
        })?;
        let prefix = &self.prefix;
        if prefix.is_empty() || prefix.len() > MAX_PREFIX_LEN {
            return Err(Error::InvalidInput(format!(
                "the AMQP name prefix {prefix:?} is {} bytes long; give 1 to {MAX_PREFIX_LEN}, \
                 e.g. prefix=butler",
                prefix.len()
            )));
        }
        if let Some(c) = prefix
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':')))
        {
            return Err(Error::InvalidInput(format!(
                "the AMQP name prefix {prefix:?} contains {c:?}; use letters, digits, `.`, `-`, \
                 `_` and `:` only"
            )));
        }
        if prefix.starts_with("amq.") {
            return Err(Error::InvalidInput(format!(
                "the AMQP name prefix {prefix:?} starts with `amq.`, which RabbitMQ reserves for \
                 its own queues and exchanges; choose another, e.g. prefix=butler"
            )));
        }
        if !(1..=1000).contains(&self.prefetch) {
            return Err(Error::InvalidInput(format!(
                "prefetch={} in AMQP settings for {shown:?} is out of range; give 1 to 1000 (the \
                 default is {})",
                self.prefetch,
                default_prefetch()
            )));
        }
        Ok(())
    }

    /// The broker URL with its password replaced by `***`, for logs and messages.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// The URL that [`AmqpConfig::from_url`] turns back into these settings.
    pub fn to_url(&self) -> String {
        let mut params = Vec::new();
        if self.prefix != default_prefix() {
            params.push(format!("prefix={}", percent_encode(&self.prefix)));
        }
        if self.prefetch != default_prefetch() {
            params.push(format!("prefetch={}", self.prefetch));
        }
        if params.is_empty() {
            return self.url.clone();
        }
        let joiner = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{joiner}{}", self.url, params.join("&"))
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &self.redacted_url())
            .field("prefix", &self.prefix)
            .field("prefetch", &self.prefetch)
            .finish()
    }
}

impl FromStr for AmqpConfig {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self> {
        AmqpConfig::from_url(url)
    }
}

/// `url` with the password of its user info, if any, replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let Some(colon) = authority[..at].find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}***{}",
        &url[..start],
        &authority[..=colon],
        &url[start + at..]
    )
}

fn parse_number<T: FromStr>(url: &str, key: &str, value: &str) -> Result<T> {
    value.parse().map_err(|_| {
        Error::InvalidInput(format!(
            "{key}={value:?} in AMQP URL {:?} is not a whole number in range; write e.g. \
             {key}=32",
            redact(url)
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

/// Escapes what would end a query value.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '%' => out.push_str("%25"),
            '&' => out.push_str("%26"),
            '#' => out.push_str("%23"),
            '=' => out.push_str("%3D"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_butler_parameters_out_and_keeps_the_clients() {
        let config = AmqpConfig::from_url(
            "amqp://guest:secret@127.0.0.1:5672/%2f?heartbeat=10&prefix=dev.b&prefetch=64",
        )
        .unwrap();
        assert_eq!(
            config.url,
            "amqp://guest:secret@127.0.0.1:5672/%2f?heartbeat=10"
        );
        assert_eq!(config.prefix, "dev.b");
        assert_eq!(config.prefetch, 64);
        assert_eq!(AmqpConfig::from_url(&config.to_url()).unwrap(), config);
    }

    #[test]
    fn applies_defaults() {
        let config = AmqpConfig::from_url("amqp://127.0.0.1:5672/%2f").unwrap();
        assert_eq!(config, AmqpConfig::new("amqp://127.0.0.1:5672/%2f"));
        assert_eq!(config.prefix, "butler");
        assert_eq!(config.prefetch, 100);
        assert_eq!(config.to_url(), "amqp://127.0.0.1:5672/%2f");
        let parsed: AmqpConfig = serde_json::from_str(r#"{"url": "amqp://h/%2f"}"#).unwrap();
        assert_eq!(parsed, AmqpConfig::new("amqp://h/%2f"));
    }

    #[test]
    fn debug_and_errors_hide_the_password() {
        let config = AmqpConfig::from_url("amqp://guest:hunter2@host:5672/%2f").unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("guest:***@host"), "{shown}");
        let err = AmqpConfig::from_url("amqp://guest:hunter2@host/%2f?prefetch=lots")
            .unwrap_err()
            .to_string();
        assert!(
            !err.contains("hunter2") && err.contains("prefetch"),
            "{err}"
        );
        assert_eq!(redact("amqp://host/%2f"), "amqp://host/%2f");
        assert_eq!(redact("amqp://user@host/%2f"), "amqp://user@host/%2f");
    }

    #[test]
    fn rejects_bad_settings_naming_them() {
        let err = AmqpConfig::from_url("postgres://x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an AMQP URL"), "{err}");
        for (url, needle) in [
            ("amqp://h/%2f?prefix=", "prefix"),
            ("amqp://h/%2f?prefix=amq.x", "reserves"),
            ("amqp://h/%2f?prefix=a%20b", "contains"),
            ("amqp://h/%2f?prefetch=0", "prefetch"),
            ("amqp://h:notaport/%2f", "cannot be read"),
        ] {
            let err = AmqpConfig::from_url(url).expect_err(url).to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
    }
}
