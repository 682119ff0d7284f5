//! Integration tests of the `butler` binary: each runs the real binary against a temporary
//! `BUTLER_HOME`.

mod analysis;
mod cli;
mod config;
mod crash;
mod engine;
mod examples;
mod launch;
mod runs;
mod scale;
mod util;
mod workers;
mod workflow;
