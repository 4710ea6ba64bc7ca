use std::process::ExitCode;

use clap::Parser as _;
use drain_agent::cli::{Cli, dispatch};

fn main() -> ExitCode {
    match dispatch(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("drain-agent: {failure:#}");
            failure.exit_code()
        }
    }
}
