//! `butler`: Butler's command line.

mod commands;
mod logging;
mod opt;
mod output;
mod server;
mod settings;

use std::{io::Write, process::ExitCode};

/// mimalloc rather than the C library's allocator: the engine allocates and frees per task on
/// several threads at once, and with mimalloc the engine alone runs about 40% more tasks a
/// second (`butler-bench noop`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match commands::run(clap::Parser::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if output::is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            let _ = writeln!(
                std::io::stderr(),
                "error: {}",
                output::error_message(&error)
            );
            ExitCode::FAILURE
        }
    }
}
