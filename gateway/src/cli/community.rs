//! `nixpfs contribute`, `nixpfs claims`, `nixpfs anchor rebuild` and
//! `nixpfs repro`: their options and how their replies read as text. The
//! work is in `gateway::publish`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use super::{absolute_store_paths, lines, node, parse_duration, GlobalArgs};
use gateway::http::admin::AdminRequest;
use gateway::publish::{
    ClaimsImport, Contribution, PathClaims, PathReport, RebuildReport, Verdict,
};

/// `nixpfs contribute`.
#[derive(Debug, Args)]
pub struct ContributeArgs {
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// Also claim everything the paths reference.
    #[arg(long)]
    pub closure: bool,
    /// The contributor's Nix-format secret key (any key: claims are evidence, not trust).
    #[arg(long)]
    pub key: PathBuf,
    /// Where to write the claims set (default: <data-dir>/claims/<key name>.jsonl).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// How long the claims stay valid, e.g. `30d`.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub expires: u64,
    /// Also publish the claims set under the key's IPNS name (peers then
    /// import `ipns://k51…`, which always names the newest version).
    #[arg(long)]
    pub ipns: bool,
}

/// `nixpfs claims`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ClaimsArgs {
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Option<ClaimsCommand>,
}

#[derive(Debug, Subcommand)]
pub enum ClaimsCommand {
    /// Accept claims sets: file paths, http(s) URLs, ipfs://<cid> (fetched from peers) or ipns://<name>.
    Import {
        #[arg(required = true)]
        sources: Vec<String>,
    },
}

/// `nixpfs anchor rebuild`.
#[derive(Debug, Args)]
pub struct RebuildArgs {
    /// Derivations (.drv) or output paths whose deriver the local store knows.
    #[arg(required = true)]
    pub targets: Vec<String>,
    /// The rebuilder anchor's Nix-format secret key.
    #[arg(long)]
    pub key: PathBuf,
    /// Sign a result only when it matches a contributor's claim.
    #[arg(long)]
    pub only_if_matches: bool,
    #[arg(long)]
    pub json: bool,
}

/// `nixpfs repro`.
#[derive(Debug, Args)]
pub struct ReproArgs {
    #[arg(long)]
    pub json: bool,
}

/// `nixpfs contribute`.
pub fn contribute(global: &GlobalArgs, args: ContributeArgs) -> Result<()> {
    let request = AdminRequest::Contribute {
        targets: absolute_store_paths(args.paths)?,
        closure: args.closure,
        key_file: node::absolute(&args.key)?,
        out: args.out.as_deref().map(node::absolute).transpose()?,
        expires: args.expires,
        ipns: args.ipns,
    };
    node::dispatch(global, request)?.print(false, |c: Contribution| {
        let mut out = format!(
            "claimed {} paths as {} (version {}, digest {})\nclaims set: {}\nannounce: ipfs://{}",
            c.paths.len(),
            c.claimant,
            c.version,
            c.digest,
            c.out.display(),
            c.cid,
        );
        if let Some(named) = &c.ipns {
            out.push_str(&format!("\n{}", super::name_published_text(named)));
        }
        out
    })
}

/// `nixpfs claims [--json]` and `nixpfs claims import SOURCE…`.
pub fn claims(global: &GlobalArgs, args: ClaimsArgs) -> Result<()> {
    match args.command {
        Some(ClaimsCommand::Import { sources }) => {
            for source in sources {
                let source = if source.contains("://") {
                    source
                } else {
                    node::absolute(source.as_ref())?
                        .to_string_lossy()
                        .into_owned()
                };
                node::dispatch(global, AdminRequest::ImportClaims { source })?.print(
                    false,
                    |i: ClaimsImport| {
                        let mut line =
                            format!("{}: {} version {}", i.claimant, i.outcome, i.version);
                        if let Some(n) = i.entries {
                            line.push_str(&format!(" ({n} claims)"));
                        }
                        line
                    },
                )?;
            }
            Ok(())
        }
        None => node::dispatch(global, AdminRequest::Claims)?.print(
            args.json,
            |paths: Vec<PathClaims>| {
                if paths.is_empty() {
                    return "no claims".to_owned();
                }
                lines(&paths, |p| {
                    let mut out = p.store_path.clone();
                    for c in &p.claims {
                        out.push_str(&format!(
                            "\n  {} ({}) claims {}",
                            c.claimant, c.key, c.nar_hash
                        ));
                    }
                    out
                })
            },
        ),
    }
}

/// `nixpfs anchor rebuild`.
pub fn rebuild(global: &GlobalArgs, args: RebuildArgs) -> Result<()> {
    let request = AdminRequest::AnchorRebuild {
        targets: absolute_store_paths(args.targets)?,
        key_file: node::absolute(&args.key)?,
        only_if_matches: args.only_if_matches,
    };
    node::dispatch(global, request)?.print(args.json, |report: RebuildReport| {
        let mut out = lines(&report.records, |r| {
            let mut line = format!("{}: {}", r.store_path, verdict(&r.verdict));
            if r.signed {
                line.push_str(" [signed]");
            }
            line
        });
        out.push_str(&format!(
            "\nsigned {} into the working set; Nix took {} ms of {} ms",
            report.signed, report.nix_ms, report.total_ms
        ));
        out.trim_start().to_owned()
    })
}

/// `nixpfs repro`.
pub fn repro(global: &GlobalArgs, args: ReproArgs) -> Result<()> {
    node::dispatch(global, AdminRequest::Repro)?.print(args.json, |reports: Vec<PathReport>| {
        if reports.is_empty() {
            return "nothing claimed, rebuilt or signed by more than one publisher".to_owned();
        }
        lines(&reports, |p| {
            let mut out = format!("{}: {}", p.store_path, verdict(&p.verdict));
            for c in &p.claims {
                out.push_str(&format!("\n  claim  {} {}", c.claimant, c.nar_hash));
            }
            for (label, group) in [("agrees", &p.agreeing), ("differs", &p.disagreeing)] {
                for a in group {
                    out.push_str(&format!(
                        "\n  anchor {} {} ({label})",
                        a.anchor,
                        a.mapping.nar_hash()
                    ));
                }
            }
            out
        })
    })
}

/// `reproduced (2 matches)`, `differs: sha256:… vs sha256:…`, `not checked: …`.
fn verdict(v: &Verdict) -> String {
    match v {
        Verdict::Reproduced { matches: 1 } => "reproduced (1 match)".to_owned(),
        Verdict::Reproduced { matches } => format!("reproduced ({matches} matches)"),
        Verdict::Differs { nar_hashes } => {
            let hashes: Vec<String> = nar_hashes.iter().map(ToString::to_string).collect();
            format!("differs: {}", hashes.join(" vs "))
        }
        Verdict::NotChecked { reason } => format!("not checked: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Reply;
    use anchor_registry::NarHash;

    #[test]
    fn verdicts_read_as_sentences() {
        assert_eq!(
            verdict(&Verdict::Reproduced { matches: 2 }),
            "reproduced (2 matches)"
        );
        assert_eq!(
            verdict(&Verdict::Reproduced { matches: 1 }),
            "reproduced (1 match)"
        );
        let (a, b) = (NarHash::digest(b"a"), NarHash::digest(b"b"));
        assert_eq!(
            verdict(&Verdict::Differs {
                nar_hashes: vec![a, b]
            }),
            format!("differs: {a} vs {b}")
        );
        assert_eq!(
            verdict(&Verdict::NotChecked {
                reason: "alone".to_owned()
            }),
            "not checked: alone"
        );
    }

    #[test]
    fn verdicts_read_from_the_reply_json() {
        let reply = Reply::new(
            "repro".to_owned(),
            serde_json::json!({"verdict": "reproduced", "matches": 3}),
        );
        assert_eq!(
            verdict(&reply.typed::<Verdict>().unwrap()),
            "reproduced (3 matches)"
        );
        let renamed = Reply::new(
            "repro".to_owned(),
            serde_json::json!({"verdict": "reproduced", "count": 3}),
        );
        let err = renamed.typed::<Verdict>().unwrap_err();
        assert!(
            format!("{err:#}")
                .contains("the gateway's reply to repro did not have the expected shape"),
            "{err:#}"
        );
    }
}
