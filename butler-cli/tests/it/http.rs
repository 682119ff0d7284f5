//! A running `butler server` for tests of its HTTP side.

use std::time::Duration;

use crate::util::{Background, Sandbox, wait_until};

/// A `butler server` listening on a port the system picked; killed when dropped.
pub struct Server {
    /// The process.
    pub process: Background,
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub base: String,
}

impl Sandbox {
    /// Starts `butler server --listen 127.0.0.1:0 EXTRA…` and waits until it answers
    /// `/health`.
    pub fn start_server(&self, name: &str, extra: &[&str]) -> Server {
        let mut args = vec!["server", "--listen", "127.0.0.1:0", "--slots", "2"];
        args.extend_from_slice(extra);
        let process = self.spawn(name, &args);
        let base = wait_until("the server to print its address", || {
            let stderr = process.stderr();
            stderr
                .split_once("http://")
                .and_then(|(_, rest)| rest.split_once('/'))
                .map(|(addr, _)| format!("http://{addr}"))
                .ok_or(stderr)
        });
        let addr = base.trim_start_matches("http://").to_owned();
        wait_until("the server to accept connections", || {
            std::net::TcpStream::connect_timeout(
                &addr.parse().map_err(|e| format!("{addr}: {e}"))?,
                Duration::from_secs(2),
            )
            .map(drop)
            .map_err(|e| format!("{e}; stderr: {}", process.stderr()))
        });
        Server { process, base }
    }
}
