//! `nixpfs contribute`, `nixpfs claims`, `nixpfs anchor rebuild` and
//! `nixpfs repro`: their options and how their replies read as text. The
//! work is in `crate::community`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::Value;

use super::{absolute_store_paths, lines, node, parse_duration, print_value, GlobalArgs};
use crate::admin::AdminRequest;

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
    /// Accept claims sets: file paths, http(s) URLs or ipfs://<cid> (fetched from peers).
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
    };
    let v = node::dispatch(global, request)?;
    print_value(&v, false, |v| {
        format!(
            "claimed {} paths as {} (version {}, digest {})\nclaims set: {}\nannounce: ipfs://{}",
            v["paths"].as_array().map_or(0, Vec::len),
            text(&v["claimant"]),
            v["version"],
            text(&v["digest"]),
            text(&v["out"]),
            text(&v["cid"]),
        )
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
                let v = node::dispatch(global, AdminRequest::ImportClaims { source })?;
                print_value(&v, false, |v| {
                    let mut line = format!(
                        "{}: {} version {}",
                        text(&v["claimant"]),
                        text(&v["outcome"]),
                        v["version"]
                    );
                    if let Some(n) = v["entries"].as_u64() {
                        line.push_str(&format!(" ({n} claims)"));
                    }
                    line
                })?;
            }
            Ok(())
        }
        None => {
            let v = node::dispatch(global, AdminRequest::Claims)?;
            print_value(&v, args.json, |v| {
                if v.as_array().is_none_or(Vec::is_empty) {
                    return "no claims".to_owned();
                }
                lines(v, |p| {
                    let mut out = text(&p["store_path"]).to_owned();
                    for c in p["claims"].as_array().into_iter().flatten() {
                        out.push_str(&format!(
                            "\n  {} ({}) claims {}",
                            text(&c["claimant"]),
                            text(&c["key"]),
                            text(&c["nar_hash"])
                        ));
                    }
                    out
                })
            })
        }
    }
}

/// `nixpfs anchor rebuild`.
pub fn rebuild(global: &GlobalArgs, args: RebuildArgs) -> Result<()> {
    let request = AdminRequest::AnchorRebuild {
        targets: absolute_store_paths(args.targets)?,
        key_file: node::absolute(&args.key)?,
        only_if_matches: args.only_if_matches,
    };
    let v = node::dispatch(global, request)?;
    print_value(&v, args.json, |v| {
        let mut out = lines(&v["records"], |r| {
            let mut line = format!("{}: {}", text(&r["store_path"]), verdict(&r["verdict"]));
            if r["signed"].as_bool() == Some(true) {
                line.push_str(" [signed]");
            }
            line
        });
        out.push_str(&format!(
            "\nsigned {} into the working set; Nix took {} ms of {} ms",
            v["signed"], v["nix_ms"], v["total_ms"]
        ));
        out.trim_start().to_owned()
    })
}

/// `nixpfs repro`.
pub fn repro(global: &GlobalArgs, args: ReproArgs) -> Result<()> {
    let v = node::dispatch(global, AdminRequest::Repro)?;
    print_value(&v, args.json, |v| {
        if v.as_array().is_none_or(Vec::is_empty) {
            return "nothing claimed, rebuilt or signed by more than one publisher".to_owned();
        }
        lines(v, |p| {
            let mut out = format!("{}: {}", text(&p["store_path"]), verdict(&p["verdict"]));
            for c in p["claims"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "\n  claim  {} {}",
                    text(&c["claimant"]),
                    text(&c["nar_hash"])
                ));
            }
            for (label, group) in [("agrees", "agreeing"), ("differs", "disagreeing")] {
                for a in p[group].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "\n  anchor {} {} ({label})",
                        text(&a["anchor"]),
                        text(&a["mapping"]["narHash"])
                    ));
                }
            }
            out
        })
    })
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// `reproduced (2 matches)`, `differs: sha256:… sha256:…`, `not checked: …`.
fn verdict(v: &Value) -> String {
    match text(&v["verdict"]) {
        "reproduced" => match v["matches"].as_u64() {
            Some(1) => "reproduced (1 match)".to_owned(),
            _ => format!("reproduced ({} matches)", v["matches"]),
        },
        "differs" => {
            let hashes: Vec<&str> = v["nar_hashes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect();
            format!("differs: {}", hashes.join(" vs "))
        }
        _ => format!("not checked: {}", text(&v["reason"])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn verdicts_read_as_sentences() {
        assert_eq!(
            verdict(&json!({"verdict": "reproduced", "matches": 2})),
            "reproduced (2 matches)"
        );
        assert_eq!(
            verdict(&json!({"verdict": "differs", "nar_hashes": ["sha256:a", "sha256:b"]})),
            "differs: sha256:a vs sha256:b"
        );
        assert_eq!(
            verdict(&json!({"verdict": "not_checked", "reason": "alone"})),
            "not checked: alone"
        );
    }
}
