//! Butler's backends, one module per backend, each behind a cargo feature.
//!
//! Backends are chosen at run time from a URL with [`connect`].

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod connect;
pub mod local;
#[cfg(feature = "notify")]
pub mod notify;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;
