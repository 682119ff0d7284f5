//! Alerts and reports: who is told when a run fails, outlasts its expected duration or loses
//! its worker, and the periodic report of runs per workflow.
//!
//! The pieces:
//!
//! - [`Notifier`], the seam: one delivery attempt of one [`Alert`] to one destination
//!   (a webhook, a chat channel, a mailbox). Concrete notifiers live in `butler-providers`.
//! - [`NotifyConfig`], the settings file (`$BUTLER_HOME/notify.toml`): the named notifiers and
//!   which alerts go to which by default ([`Routes`]). A workflow definition may override the
//!   routes of its own runs ([`WorkflowNotify`](crate::definition::WorkflowNotify)).
//! - [`Watcher`], which runs beside the scheduler: it reads the store, decides what to send
//!   (each alert once), and hands alerts to one delivery task per notifier through a bounded
//!   channel, so a slow or broken destination never holds up the watcher, let alone the
//!   scheduler.

mod alert;
mod config;
mod delivery;
mod watcher;

use std::fmt::Debug;

use async_trait::async_trait;

pub use alert::{Alert, AlertKind, WorkflowCounts};
pub use config::{
    CONFIG_FILE, CONFIG_VAR, DEFAULT_REPORT_EVERY, NotifierEntry, NotifyConfig, Routes,
};
pub use delivery::{DeliveryOptions, DeliveryStats, Outbox};
pub use watcher::{Dispatch, Watcher, WatcherHandle, WatcherOptions};

use crate::error::Result;

/// A notifier shared across tasks.
pub type DynNotifier = dyn Notifier;

/// One destination of alerts: a webhook, a chat channel, a mailbox.
///
/// # Contract
///
/// - [`Notifier::send`] makes **one** delivery attempt; retries, backoff and the bound on how
///   long an attempt may take are the caller's (the [`Watcher`]'s delivery task), so an
///   implementation neither loops nor sleeps.
/// - A failure that may pass if tried again later (the destination is unreachable, answers
///   429 or 5xx, or times out) is [`Error::Unavailable`](crate::Error::Unavailable), which
///   [`is_retryable`](crate::Error::is_retryable); any other error (a refused address, a
///   4xx answer) is permanent and the alert is not tried again.
/// - An implementation's `Debug` shows no secret (webhook URLs with tokens, passwords).
#[async_trait]
pub trait Notifier: Send + Sync + Debug + 'static {
    /// Delivers `alert` once.
    async fn send(&self, alert: &Alert) -> Result<()>;
}

/// Whether `name` may name a notifier: letters, digits, `_`, `.` and `-`, as in
/// `[notifiers.ops-slack]`.
pub fn is_notifier_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}
