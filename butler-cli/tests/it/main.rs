//! Integration tests of the `butler` binary: each runs the real binary against a temporary
//! `BUTLER_HOME`.

mod analysis;
mod api;
mod cli;
mod config;
mod crash;
mod dashboard;
mod engine;
mod examples;
mod http;
mod launch;
mod metrics;
mod runs;
mod scale;
mod tokens;
mod util;
mod workers;
mod workflow;
