//! Choosing backends from URLs.

use std::path::Path;
use std::sync::Arc;

use butler_core::memory::{MemoryQueue, MemoryRunStore};
use butler_core::queue::DynQueue;
use butler_core::{DynRunStore, Error, Result};

/// The store URL forms this build accepts, for error messages.
const STORE_FORMS: &str = "sqlite:///absolute/path.db, sqlite://relative/path.db, sqlite::memory:, \
                           a plain file path, postgres://user@host/db, or memory://";

/// Opens the run store named by `url`.
///
/// - `sqlite:///abs/path.db`, `sqlite://relative.db`, `sqlite:path.db`, `sqlite::memory:`
///   (feature `sqlite`), with optional `?durability=normal`: see
///   [`SqliteConfig::from_url`](crate::sqlite::SqliteConfig::from_url);
/// - a plain path such as `/var/lib/butler/butler.db` or `./butler.db`: a SQLite file;
/// - `memory://`: an empty in-memory store that lives as long as the returned value.
///
/// Any other scheme, or one whose backend this build was compiled without, fails with
/// [`Error::NotSupported`] naming the scheme and what to do.
pub async fn connect_store(url: &str) -> Result<Arc<DynRunStore>> {
    Ok(open_store(parse_store(url, "store")?).await?.0)
}

/// A run store and the queue that carries its task attempts.
#[derive(Debug, Clone)]
pub struct Backends {
    /// The run store.
    pub store: Arc<DynRunStore>,
    /// The task queue.
    pub queue: Arc<DynQueue>,
}

/// Opens the run store named by `store_url` (forms as in [`connect_store`]) and the queue named
/// by `queue_url`; without one (or with an empty one), the queue lives in the store itself (a
/// SQLite store's queue is in the same database file, a PostgreSQL store's in the same schema,
/// a memory store's in memory). `memory://` is an in-process queue,
/// `amqp://user:pass@host/vhost` a RabbitMQ queue (feature `amqp`), and a store URL the queue
/// of that store. Both URLs are checked before anything is opened.
pub async fn connect(store_url: &str, queue_url: Option<&str>) -> Result<Backends> {
    let queue_url = queue_url
        .filter(|url| !url.trim().is_empty())
        .map(parse_queue)
        .transpose()?;
    let (store, own_queue) = open_store(parse_store(store_url, "store")?).await?;
    let queue = match queue_url {
        None => own_queue,
        #[cfg(feature = "amqp")]
        Some(QueueUrl::Amqp(config)) => Arc::new(crate::amqp::AmqpQueue::open(config).await?),
        Some(QueueUrl::Store(url)) => open_store(url).await?.1,
    };
    Ok(Backends { store, queue })
}

/// Checks that `queue_url` names a queue this build can open, without opening it: a command
/// that needs only the store still refuses a mistyped `--queue` rather than ignoring it.
pub fn check_queue_url(queue_url: &str) -> Result<()> {
    parse_queue(queue_url).map(drop)
}

/// A store URL, checked but not yet opened.
enum StoreUrl {
    /// A `sqlite:` URL.
    #[cfg(feature = "sqlite")]
    Sqlite(String),
    /// A plain path of a SQLite file.
    #[cfg(feature = "sqlite")]
    SqliteFile(String),
    Memory,
    /// A `postgres:` URL.
    #[cfg(feature = "postgres")]
    Postgres(String),
}

/// A queue URL, checked but not yet opened.
enum QueueUrl {
    /// An `amqp:` URL, its settings read and checked.
    #[cfg(feature = "amqp")]
    Amqp(crate::amqp::AmqpConfig),
    /// The queue of a store, `memory://` for one in this process.
    Store(StoreUrl),
}

fn parse_queue(url: &str) -> Result<QueueUrl> {
    let url = url.trim();
    match scheme(url).map(|s| s.to_ascii_lowercase()).as_deref() {
        #[cfg(feature = "amqp")]
        Some("amqp" | "amqps") => {
            let config = crate::amqp::AmqpConfig::from_url(url)?;
            config.validate()?;
            Ok(QueueUrl::Amqp(config))
        }
        #[cfg(not(feature = "amqp"))]
        Some("amqp" | "amqps") => Err(not_compiled(url, "amqp")),
        _ => parse_store(url, "queue").map(QueueUrl::Store),
    }
}

/// Checks the store URL `url`; `what` (`store` or `queue`) names the URL in errors.
fn parse_store(url: &str, what: &str) -> Result<StoreUrl> {
    let url = url.trim();
    if url.is_empty() {
        return Err(Error::InvalidInput(format!(
            "the {what} URL is empty; give one of: {STORE_FORMS}"
        )));
    }
    let Some(scheme) = scheme(url) else {
        #[cfg(feature = "sqlite")]
        return Ok(StoreUrl::SqliteFile(url.to_owned()));
        #[cfg(not(feature = "sqlite"))]
        return Err(not_compiled(url, "sqlite"));
    };
    match scheme.to_ascii_lowercase().as_str() {
        #[cfg(feature = "sqlite")]
        "sqlite" => Ok(StoreUrl::Sqlite(url.to_owned())),
        #[cfg(not(feature = "sqlite"))]
        "sqlite" => Err(not_compiled(url, "sqlite")),
        "memory" => match url[scheme.len()..].trim_start_matches(':') {
            "" | "//" => Ok(StoreUrl::Memory),
            _ => Err(Error::InvalidInput(format!(
                "the {what} URL {url:?} has a path, but an in-memory {what} takes none; write \
                 memory://"
            ))),
        },
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => Ok(StoreUrl::Postgres(url.to_owned())),
        #[cfg(not(feature = "postgres"))]
        "postgres" | "postgresql" => Err(not_compiled(url, "postgres")),
        "amqp" | "amqps" => Err(Error::InvalidInput(format!(
            "an `{scheme}:` URL names a RabbitMQ queue, not a {what}; give it as the queue \
             (--queue, BUTLER_QUEUE, or `queue=` in Python) and the store as the db (--db, \
             BUTLER_DB, or `db=`)"
        ))),
        _ => Err(Error::NotSupported(format!(
            "unknown {what} URL scheme `{scheme}`; give one of: {STORE_FORMS}"
        ))),
    }
}

/// Opens the store `url` names and its own queue.
async fn open_store(url: StoreUrl) -> Result<(Arc<DynRunStore>, Arc<DynQueue>)> {
    match url {
        #[cfg(feature = "sqlite")]
        StoreUrl::Sqlite(url) => sqlite_backends(crate::sqlite::SqliteStore::connect(&url).await?),
        #[cfg(feature = "sqlite")]
        StoreUrl::SqliteFile(path) => {
            let config = crate::sqlite::SqliteConfig::new(&path);
            sqlite_backends(crate::sqlite::SqliteStore::open(&config).await?)
        }
        StoreUrl::Memory => Ok((
            Arc::new(MemoryRunStore::new()),
            Arc::new(MemoryQueue::new()),
        )),
        #[cfg(feature = "postgres")]
        StoreUrl::Postgres(url) => {
            let store = crate::postgres::PgStore::connect(&url).await?;
            let queue = crate::postgres::PgQueue::new(store.pool().clone());
            Ok((Arc::new(store), Arc::new(queue)))
        }
    }
}

#[cfg(feature = "sqlite")]
fn sqlite_backends(store: crate::sqlite::SqliteStore) -> Result<(Arc<DynRunStore>, Arc<DynQueue>)> {
    let queue = crate::sqlite::SqliteQueue::new(store.pool().clone());
    Ok((Arc::new(store), Arc::new(queue)))
}

/// The URL of the default store in `home` (`BUTLER_HOME`): `sqlite://{home}/butler.db`.
pub fn default_store_url(home: &Path) -> String {
    let path = home.join("butler.db");
    format!("sqlite://{}", encode_path(&path.to_string_lossy()))
}

/// The URL's scheme: letters, digits, `+`, `-` or `.` before the first `:`, starting with a
/// letter and at least two long, so `C:\…` and plain paths have none.
fn scheme(url: &str) -> Option<&str> {
    let (scheme, _) = url.split_once(':')?;
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    (valid && scheme.len() > 1).then_some(scheme)
}

#[cfg_attr(
    all(feature = "sqlite", feature = "postgres", feature = "amqp"),
    allow(dead_code)
)]
fn not_compiled(url: &str, feature: &str) -> Error {
    // Only the scheme: the rest of a URL may carry a password.
    let url = scheme(url).map_or("a plain path", |s| s);
    Error::NotSupported(format!(
        "a `{url}:` URL needs the `{feature}` backend, which this build of butler was \
         compiled without; rebuild with `--features {feature}` (cargo feature `{feature}` of \
         butler-providers), or use one of: {STORE_FORMS}"
    ))
}

/// Escapes the characters that would end or change the path part of a URL.
pub(crate) fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            '%' => out.push_str("%25"),
            '?' => out.push_str("%3F"),
            '#' => out.push_str("%23"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_schemes_but_not_paths() {
        assert_eq!(scheme("sqlite::memory:"), Some("sqlite"));
        assert_eq!(scheme("sqlite:///a.db"), Some("sqlite"));
        assert_eq!(scheme("memory://"), Some("memory"));
        assert_eq!(scheme("postgres://host/db"), Some("postgres"));
        assert_eq!(scheme("/var/lib/butler.db"), None);
        assert_eq!(scheme("./a:b.db"), None);
        assert_eq!(scheme("butler.db"), None);
        assert_eq!(scheme("C:\\butler.db"), None);
    }

    #[cfg(not(feature = "sqlite"))]
    #[tokio::test]
    async fn sqlite_urls_name_the_missing_feature() {
        for url in ["sqlite:///tmp/butler.db", "/tmp/butler.db"] {
            let err = connect_store(url).await.expect_err("no sqlite backend");
            let message = err.to_string();
            assert!(matches!(err, Error::NotSupported(_)), "{err:?}");
            assert!(message.contains("`sqlite`"), "{message}");
        }
    }

    #[test]
    fn queue_urls_are_checked_without_opening_them() {
        let err = check_queue_url("carrier-pigeon://loft").expect_err("no such queue");
        assert!(err.to_string().contains("`carrier-pigeon`"), "{err}");
        let err = check_queue_url("memory://somewhere").expect_err("a memory queue has no path");
        assert!(err.to_string().contains("memory://"), "{err}");
        check_queue_url("memory://").expect("an in-process queue");
        // Nothing listens on port 1: a check that connected would fail.
        #[cfg(feature = "amqp")]
        check_queue_url("amqp://guest:guest@127.0.0.1:1/%2f").expect("a RabbitMQ queue");
        #[cfg(feature = "amqp")]
        {
            let err = check_queue_url("amqp://guest:guest@127.0.0.1:1/%2f?prefetch=0")
                .expect_err("prefetch 0 takes nothing");
            assert!(err.to_string().contains("prefetch=0"), "{err}");
        }
        #[cfg(feature = "sqlite")]
        check_queue_url("sqlite:///no/such/dir/queue.db").expect("a SQLite store's queue");
    }

    #[test]
    fn a_rabbitmq_url_as_the_store_says_where_it_belongs() {
        let Err(err) = parse_store("amqp://guest:guest@127.0.0.1/%2f", "store") else {
            panic!("a RabbitMQ URL is no store");
        };
        let message = err.to_string();
        assert!(message.contains("names a RabbitMQ queue"), "{message}");
        assert!(
            message.contains("--queue") && message.contains("`queue=`"),
            "{message}"
        );
    }

    #[test]
    fn default_url_points_into_home() {
        assert_eq!(
            default_store_url(Path::new("/home/u/.butler")),
            "sqlite:///home/u/.butler/butler.db"
        );
        assert_eq!(
            default_store_url(Path::new("/tmp/what?#")),
            "sqlite:///tmp/what%3F%23/butler.db"
        );
    }
}
