//! Integration tests of butler-providers' backends against Butler's conformance suites.
//!
//! The store and queue tests run the in-memory backends beside the SQLite ones, so they need
//! the `sqlite` feature (a default one).

#[cfg(feature = "amqp")]
mod amqp;
#[cfg(feature = "sqlite")]
mod engine;
mod executor;
#[cfg(all(feature = "notify", feature = "sqlite"))]
mod notify;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "postgres")]
mod postgres_queue;
#[cfg(feature = "sqlite")]
mod queue;
#[cfg(feature = "sqlite")]
mod sqlite_processes;
#[cfg(feature = "sqlite")]
mod store;
#[cfg(feature = "sqlite")]
mod util;

/// The URL of a service a test needs, from `var`; `None` (after saying why) when it is unset,
/// unless `BUTLER_TEST_REQUIRE_SERVICES=1`, under which a missing service fails the test.
#[allow(dead_code)]
pub fn service_url(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ if std::env::var("BUTLER_TEST_REQUIRE_SERVICES").as_deref() == Ok("1") => {
            panic!("{test} needs {var}, and BUTLER_TEST_REQUIRE_SERVICES=1 forbids skipping it")
        }
        _ => {
            eprintln!("skipping {test}: set {var}");
            None
        }
    }
}
