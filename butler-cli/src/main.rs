//! `butler`: Butler's command line.

mod commands;
mod logging;
mod opt;
mod output;
mod server;
mod settings;

use std::{io::Write, process::ExitCode};

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
