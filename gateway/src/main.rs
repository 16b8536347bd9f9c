//! The `nixpfs` binary: parse the command line, set up logging, run. The
//! command line (`cli/`) belongs to the binary alone; the library never sees it.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    cli::init_tracing(&cli);
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nixpfs: {err:#}");
            ExitCode::FAILURE
        }
    }
}
