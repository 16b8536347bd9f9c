//! `nixpfs car export|import`: moving DAGs (NAR sets) as CARv1 files
//! without a network. Both run in the gateway (through its admin API when
//! one is serving), so blocks come from and go to its node.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use super::{node, print_value, GlobalArgs};
use crate::admin::AdminRequest;

/// The `car` subcommands.
#[derive(Debug, Subcommand)]
pub enum CarCommand {
    /// Write the whole DAG under CID (local blocks, else peers) as a CARv1 file; every block verified.
    Export {
        cid: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Store every block of a CAR file (each checked against its CID) and pin its roots.
    Import { file: PathBuf },
}

/// Runs one `car` subcommand.
pub fn run(global: &GlobalArgs, cmd: CarCommand) -> Result<()> {
    match cmd {
        CarCommand::Export { cid, out } => {
            let out = node::absolute(&out)?;
            let v = node::dispatch(global, AdminRequest::CarExport { cid, out })?;
            print_value(&v, false, |v| {
                format!(
                    "exported {} ({} blocks, {} bytes of CAR)",
                    v["root"].as_str().unwrap_or(""),
                    v["blocks"],
                    v["bytes"]
                )
            })
        }
        CarCommand::Import { file } => {
            let path = node::absolute(&file)?;
            let v = node::dispatch(global, AdminRequest::CarImport { path })?;
            print_value(&v, false, |v| {
                let roots: Vec<&str> = v["roots"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r.as_str())
                    .collect();
                format!(
                    "imported {} blocks ({} bytes), pinned {}",
                    v["blocks"],
                    v["bytes"],
                    roots.join(" ")
                )
            })
        }
    }
}
