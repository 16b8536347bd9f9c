//! The `nixpfs` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = gateway::cli::Cli::parse();
    gateway::cli::init_tracing(cli.verbose);
    match gateway::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nixpfs: {err:#}");
            ExitCode::FAILURE
        }
    }
}
