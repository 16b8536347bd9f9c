//! `nixpfs car export|import`: moving DAGs (NAR sets) as CARv1 files
//! without a network. Both run in the gateway (through its admin API when
//! one is serving), so blocks come from and go to its node.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use super::{node, GlobalArgs};
use gateway::http::admin::AdminRequest;
use gateway::store::car::{ExportReport, ImportReport};

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
            node::dispatch(global, AdminRequest::CarExport { cid, out })?.print(
                false,
                |r: ExportReport| {
                    format!(
                        "exported {} ({} blocks, {} bytes of CAR)",
                        r.root, r.blocks, r.bytes
                    )
                },
            )
        }
        CarCommand::Import { file } => {
            let path = node::absolute(&file)?;
            node::dispatch(global, AdminRequest::CarImport { path })?.print(
                false,
                |r: ImportReport| {
                    format!(
                        "imported {} blocks ({} bytes), pinned {}",
                        r.blocks,
                        r.bytes,
                        r.roots.join(" ")
                    )
                },
            )
        }
    }
}
