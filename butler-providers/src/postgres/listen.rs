//! Listening on a notification channel over a connection of its own, shared by the queue
//! (wake-ups of waiting dequeues) and the store (runs that became `ready`).

use std::time::Duration;

use butler_core::{Error, Result};
use sqlx::pool::CloseEvent;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a listener waits before reconnecting after its connection failed.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// What a listener heard.
pub(super) enum Heard<'a> {
    /// A notification, with its payload.
    Notification(&'a str),
    /// The connection was lost (and, unless it failed again, is back): notifications sent
    /// meanwhile are lost, so whoever waits for them should look for themselves.
    Gap,
}

/// A running listener; dropping it stops the task and closes its connection.
#[derive(Debug)]
pub(super) struct Listening {
    handle: JoinHandle<()>,
    _stop: oneshot::Sender<()>,
}

impl Listening {
    /// Listens on `channel` with a connection of its own (never one of `pool`'s), opened with
    /// `pool`'s options and `application_name`, and calls `heard` with what it hears until
    /// dropped or `pool` is closed. `what` names the listener in errors and warnings.
    pub(super) async fn start(
        pool: &PgPool,
        channel: &str,
        application_name: &str,
        what: &'static str,
        heard: impl Fn(Heard<'_>) + Send + 'static,
    ) -> Result<Listening> {
        let options = (*pool.connect_options())
            .clone()
            .application_name(application_name);
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_lazy_with(options);
        let failed = |e| {
            Error::unavailable(
                format!("cannot listen for {what} on PostgreSQL channel {channel:?}"),
                e,
            )
        };
        let mut listener = PgListener::connect_with(&listen_pool)
            .await
            .map_err(failed)?;
        listener.listen(channel).await.map_err(failed)?;
        let (stop, stopped) = oneshot::channel();
        let handle = tokio::spawn(listen(
            listener,
            listen_pool,
            what,
            heard,
            stopped,
            pool.close_event(),
        ));
        Ok(Listening {
            handle,
            _stop: stop,
        })
    }

    /// Whether the task still runs.
    pub(super) fn is_running(&self) -> bool {
        !self.handle.is_finished()
    }
}

async fn listen(
    mut listener: PgListener,
    listen_pool: PgPool,
    what: &'static str,
    heard: impl Fn(Heard<'_>),
    mut stop: oneshot::Receiver<()>,
    mut pool_closed: CloseEvent,
) {
    loop {
        tokio::select! {
            _ = &mut stop => break,
            () = &mut pool_closed => break,
            got = listener.try_recv() => match got {
                Ok(Some(notification)) => heard(Heard::Notification(notification.payload())),
                Ok(None) => heard(Heard::Gap),
                Err(error) => {
                    tracing::warn!(
                        %error,
                        "the listener for {what} lost its connection; polling until it reconnects"
                    );
                    heard(Heard::Gap);
                    tokio::select! {
                        _ = &mut stop => break,
                        () = &mut pool_closed => break,
                        () = tokio::time::sleep(RECONNECT_PAUSE) => {}
                    }
                }
            },
        }
    }
    drop(listener);
    listen_pool.close().await;
}
