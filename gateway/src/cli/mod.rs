//! The command line: clap definitions and the dispatch from each subcommand to
//! the library function that does the work. Output formatting lives here; the
//! work does not.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anchor_registry::SecretKey;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::nar;

mod car;
mod community;
mod node;
mod registry;

use crate::admin::AdminRequest;
use serde_json::Value;

/// nixpfs: a Nix binary cache whose bytes live on IPFS and whose truth comes
/// from well-known trust anchors.
#[derive(Debug, Parser)]
#[command(name = "nixpfs", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// State directory (IPFS repo, index, trusted state).
    #[arg(long, global = true, env = "NIXPFS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML configuration file (default: <data-dir>/config.toml).
    #[arg(long, global = true, env = "NIXPFS_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Key pairs in Nix's format (usable by `nix-store` and as anchor keys).
    #[command(subcommand)]
    Key(KeyCommand),
    /// NAR serialisation of filesystem paths.
    #[command(subcommand)]
    Nar(NarCommand),
    /// The signed registry of trust anchors (for its root-key holders).
    #[command(subcommand)]
    Registry(registry::RegistryCommand),
    /// Mapping sets published by anchors.
    #[command(subcommand)]
    Set(registry::SetCommand),
    /// Run the gateway: the binary cache for Nix, the IPFS node, anchor sync.
    Serve(node::ServeArgs),
    /// Print the nix.conf lines that point Nix at this gateway.
    NixConfig,
    /// Pins, anchors, conflicts, peers and counters.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// This node's IPFS peer id and listen addresses.
    Id,
    /// Connected IPFS peers and their agent versions.
    Peers,
    /// Import any file into the IPFS node (pinned) and print its CID.
    Add { file: PathBuf },
    /// CAR files: export a DAG by CID, import one (verified, roots pinned).
    #[command(subcommand)]
    Car(car::CarCommand),
    /// Fetch a file by CID (local blocks or peers), every block verified.
    Fetch {
        cid: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Pin store paths from the local Nix store (served and seeded), or CIDs from peers.
    Pin {
        #[arg(required = true)]
        targets: Vec<String>,
        /// Also pin everything the store paths reference.
        #[arg(long)]
        closure: bool,
    },
    /// Pin what registry anchors signed (newest first, within a size budget) to seed it to others.
    Seed {
        /// Only this anchor's mappings; repeat for more (default: all).
        #[arg(long = "anchor")]
        anchors: Vec<String>,
        /// Budget for the NARs pinned, e.g. `10G`, `500M`, or bytes.
        #[arg(long, value_parser = parse_size)]
        max_size: Option<u64>,
    },
    /// Unpin store paths or CIDs.
    Unpin {
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// List pins with sizes.
    Pins {
        #[arg(long)]
        json: bool,
    },
    /// Delete blocks no pin needs; reports what was freed.
    Gc,
    /// Act as a trust anchor: sign mappings and publish mapping sets.
    #[command(subcommand)]
    Anchor(AnchorCommand),
    /// Registry anchors as seen by this gateway.
    #[command(subcommand)]
    Anchors(AnchorsCommand),
    /// Paths registry anchors disagree about, with the signed evidence.
    Conflicts {
        #[arg(long)]
        json: bool,
    },
    /// Seed store paths and publish your signed claims about them (evidence for rebuilders).
    Contribute(community::ContributeArgs),
    /// Claims seen, by path (who claimed which NarHash); `claims import` accepts claims sets.
    Claims(community::ClaimsArgs),
    /// Per path: claims, anchors agreeing and disagreeing, reproducibility verdict.
    Repro(community::ReproArgs),
}

#[derive(Debug, Subcommand)]
pub enum AnchorCommand {
    /// Pin store paths and sign their mappings into this anchor's working set.
    Sign {
        #[arg(required = true)]
        paths: Vec<String>,
        #[arg(long)]
        closure: bool,
        /// The anchor's Nix-format secret key.
        #[arg(long)]
        key: PathBuf,
    },
    /// Write the next version of this anchor's signed mapping set.
    Publish {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// How long the set stays valid, e.g. `30d`.
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        expires: u64,
        /// Anchor name as listed in the registry (default: the key's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Rebuild derivations with the local Nix (`--check` if present) and sign this node's own results.
    Rebuild(community::RebuildArgs),
}

#[derive(Debug, Subcommand)]
pub enum AnchorsCommand {
    /// Fetch and verify the registry and every anchor's newest set now.
    Sync,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Generate a key pair; writes the secret key to --out and prints the public key.
    Generate {
        /// Key name, e.g. `cache.example.org-1`.
        #[arg(long)]
        name: String,
        /// File for the secret key (created with mode 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum NarCommand {
    /// Write the NAR of PATH to stdout.
    Dump { path: PathBuf },
    /// Print the NarHash (`sha256:<nix32>`) and NarSize of PATH.
    Hash { path: PathBuf },
}

/// Sets up `tracing` to stderr; `RUST_LOG` overrides the verbosity flag.
pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn,gateway=info",
        1 => "info,gateway=debug",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .init();
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Key(KeyCommand::Generate { name, out }) => key_generate(&name, &out),
        Command::Nar(NarCommand::Dump { path }) => {
            let stdout = io::stdout().lock();
            let mut out = io::BufWriter::with_capacity(1 << 20, stdout);
            nar::dump(&path, &mut out)
                .with_context(|| format!("while writing the NAR of {}", path.display()))?;
            out.flush().context("while writing to stdout")?;
            Ok(())
        }
        Command::Registry(cmd) => registry::run_registry(cmd),
        Command::Serve(args) => node::serve(&cli.global, args),
        Command::NixConfig => node::nix_config(&cli.global),
        Command::Status { json } => {
            let v = node::dispatch(&cli.global, AdminRequest::Status)?;
            print_value(&v, json, render_status)
        }
        Command::Id => {
            let v = node::dispatch(&cli.global, AdminRequest::Id)?;
            print_value(&v, false, |v| {
                let mut out = format!("peer id: {}\n", v["peer_id"].as_str().unwrap_or(""));
                for a in v["listen_addrs"].as_array().into_iter().flatten() {
                    out.push_str(&format!("listen: {}\n", a.as_str().unwrap_or("")));
                }
                out.push_str(&format!(
                    "gateway key: {}",
                    v["gateway_key"].as_str().unwrap_or("")
                ));
                out
            })
        }
        Command::Peers => {
            let v = node::dispatch(&cli.global, AdminRequest::Peers)?;
            print_value(&v, false, |v| {
                lines(v, |p| {
                    format!(
                        "{} {}",
                        p["peer_id"].as_str().unwrap_or(""),
                        p["agent_version"].as_str().unwrap_or("(unknown agent)")
                    )
                })
            })
        }
        Command::Add { file } => {
            let path = node::absolute(&file)?;
            let v = node::dispatch(&cli.global, AdminRequest::Add { path })?;
            print_value(&v, false, |v| v["cid"].as_str().unwrap_or("").to_owned())
        }
        Command::Fetch { cid, out } => {
            let out = node::absolute(&out)?;
            let v = node::dispatch(
                &cli.global,
                AdminRequest::Fetch {
                    cid,
                    out: out.clone(),
                },
            )?;
            print_value(&v, false, |v| {
                format!("fetched {} bytes to {}", v["bytes"], out.display())
            })
        }
        Command::Pin { targets, closure } => {
            let targets = absolute_store_paths(targets)?;
            let v = node::dispatch(&cli.global, AdminRequest::Pin { targets, closure })?;
            print_value(&v, false, render_pins)
        }
        Command::Seed { anchors, max_size } => {
            let v = node::dispatch(&cli.global, AdminRequest::Seed { anchors, max_size })?;
            print_value(&v, false, render_pins)
        }
        Command::Unpin { targets } => {
            let targets = absolute_store_paths(targets)?;
            let v = node::dispatch(&cli.global, AdminRequest::Unpin { targets })?;
            print_value(&v, false, |v| {
                lines(v, |t| format!("unpinned {}", t.as_str().unwrap_or("")))
            })
        }
        Command::Pins { json } => {
            let v = node::dispatch(&cli.global, AdminRequest::Pins)?;
            print_value(&v, json, render_pins)
        }
        Command::Gc => {
            let v = node::dispatch(&cli.global, AdminRequest::Gc)?;
            print_value(&v, false, |v| {
                format!("freed {} blocks, {} bytes", v["blocks"], v["bytes"])
            })
        }
        Command::Anchor(AnchorCommand::Sign {
            paths,
            closure,
            key,
        }) => {
            let request = AdminRequest::AnchorSign {
                targets: absolute_store_paths(paths)?,
                closure,
                key_file: node::absolute(&key)?,
            };
            let v = node::dispatch(&cli.global, request)?;
            print_value(&v, false, |v| {
                lines(v, |p| format!("signed {}", p.as_str().unwrap_or("")))
            })
        }
        Command::Anchor(AnchorCommand::Publish {
            key,
            out,
            expires,
            name,
        }) => {
            let (data_dir, _) = node::resolve(&cli.global)?;
            let key = read_secret_key(&key)?;
            let kind = anchor_registry::SetKind::Anchor;
            let header =
                crate::anchor::publish(&data_dir, &key, name.as_deref(), kind, expires, &out)?;
            let h = header.header();
            println!(
                "published {} version {} ({} entries, digest {}) to {}",
                h.anchor,
                h.version,
                h.count,
                header.digest(),
                out.display()
            );
            Ok(())
        }
        Command::Anchors(AnchorsCommand::Sync) => {
            let v = node::dispatch(&cli.global, AdminRequest::Sync)?;
            print_value(&v, false, |v| {
                let mut out = format!("registry version {}\n", v["registry_version"]);
                out.push_str(&lines(&v["anchors"], |a| {
                    let mut line = format!(
                        "{}: {}",
                        a["anchor"].as_str().unwrap_or(""),
                        a["outcome"].as_str().unwrap_or("")
                    );
                    if let Some(version) = a["version"].as_u64() {
                        line.push_str(&format!(" version {version}"));
                    }
                    for e in a["errors"].as_array().into_iter().flatten() {
                        line.push_str(&format!("\n  {}", e.as_str().unwrap_or("")));
                    }
                    line
                }));
                out
            })
        }
        Command::Conflicts { json } => {
            let v = node::dispatch(&cli.global, AdminRequest::Conflicts)?;
            print_value(&v, json, |v| {
                if v.as_array().is_none_or(|a| a.is_empty()) {
                    return "no conflicts".to_owned();
                }
                lines(v, |c| {
                    let mut out = format!("{}:", c["store_path"].as_str().unwrap_or(""));
                    for e in c["evidence"].as_array().into_iter().flatten() {
                        out.push_str(&format!(
                            "\n  {} says {}",
                            e["anchor"].as_str().unwrap_or(""),
                            e["mapping"]
                        ));
                    }
                    out
                })
            })
        }
        Command::Set(cmd) => registry::run_set(cmd),
        Command::Car(cmd) => car::run(&cli.global, cmd),
        Command::Contribute(args) => community::contribute(&cli.global, args),
        Command::Claims(args) => community::claims(&cli.global, args),
        Command::Repro(args) => community::repro(&cli.global, args),
        Command::Anchor(AnchorCommand::Rebuild(args)) => community::rebuild(&cli.global, args),
        Command::Nar(NarCommand::Hash { path }) => {
            let summary = nar::hash_path(&path)
                .with_context(|| format!("while hashing the NAR of {}", path.display()))?;
            println!("{} {}", summary.nar_hash, summary.nar_size);
            Ok(())
        }
    }
}

/// Prints a reply as pretty JSON or through its text renderer.
fn print_value(value: &Value, json: bool, text: impl Fn(&Value) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        let rendered = text(value);
        if !rendered.is_empty() {
            println!("{rendered}");
        }
    }
    Ok(())
}

fn lines(value: &Value, line: impl Fn(&Value) -> String) -> String {
    value
        .as_array()
        .into_iter()
        .flatten()
        .map(line)
        .collect::<Vec<_>>()
        .join("\n")
}

fn render_pins(value: &Value) -> String {
    lines(value, |p| {
        let mut line = format!("{} {}", p["cid"].as_str().unwrap_or(""), p["size"]);
        if let Some(path) = p["store_path"].as_str() {
            line.push(' ');
            line.push_str(path);
        }
        line
    })
}

fn render_status(v: &Value) -> String {
    let mut out = format!(
        "peer {}\nconnected peers: {}\npins: {} ({} bytes), own store paths: {}\nregistry version: {} (last sync at {})\nforks seen: {}, conflicts: {}\n",
        v["peer_id"].as_str().unwrap_or(""),
        v["connected_peers"],
        v["pins"],
        v["pinned_bytes"],
        v["local_paths"],
        v["registry_version"],
        v["last_sync"],
        v["forks"],
        v["conflicts"],
    );
    let repro = &v["repro"];
    out.push_str(&format!(
        "repro: {} paths, {} reproduced, {} differ, {} not checked\n",
        repro["paths"], repro["reproduced"], repro["differs"], repro["not_checked"]
    ));
    for a in v["anchors"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{} {}: version {}, {} entries, expires {}, last sync {}\n",
            a["kind"].as_str().unwrap_or(""),
            a["name"].as_str().unwrap_or(""),
            a["version"],
            a["entries"],
            a["expires"],
            a["last_sync"].as_str().unwrap_or("-")
        ));
    }
    if let Some(counters) = v["counters"].as_object() {
        for (k, n) in counters {
            out.push_str(&format!("{k}: {n}\n"));
        }
    }
    out.trim_end().to_owned()
}

/// Store paths may be given relative to /nix/store's symlinks (`./result`):
/// resolve those to the store path; CIDs pass through.
fn absolute_store_paths(targets: Vec<String>) -> Result<Vec<String>> {
    targets
        .into_iter()
        .map(|t| {
            if t.starts_with('/') || t.starts_with('.') {
                let resolved = fs::canonicalize(&t).with_context(|| format!("no such path {t}"))?;
                Ok(resolved.to_string_lossy().into_owned())
            } else {
                Ok(t)
            }
        })
        .collect()
}

/// Reads a Nix-format secret key file.
pub(crate) fn read_secret_key(path: &Path) -> Result<SecretKey> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("while reading the secret key {}", path.display()))?;
    SecretKey::parse(&text).with_context(|| format!("invalid secret key in {}", path.display()))
}

/// Writes `contents` to `path` through a temporary file and a rename, so a
/// crash never leaves a half-written document where a good one was.
pub(crate) fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("while creating a temporary file in {}", dir.display()))?;
    tmp.write_all(contents)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("while writing {}", path.display()))?;
    Ok(())
}

/// Parses durations such as `90d`, `12h`, `30m`, `45s` (a bare number is seconds).
pub(crate) fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 90d, 12h, 30m or 45s"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(format!(
                "invalid duration unit in {text:?}: use s, m, h, d or w"
            ))
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("duration {text:?} is too large"))
}

/// Parses sizes such as `10G`, `500M`, `64K` (powers of 1024) or plain bytes.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected e.g. 10G, 500M or 1048576"))?;
    let scale: u64 = match unit.trim_end_matches(['B', 'b', 'i']) {
        "" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        "T" | "t" => 1 << 40,
        _ => return Err(format!("invalid size unit in {text:?}: use K, M, G or T")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

fn key_generate(name: &str, out: &Path) -> Result<()> {
    if out.exists() {
        bail!(
            "{} already exists; refusing to overwrite a secret key (choose another --out)",
            out.display()
        );
    }
    let key = SecretKey::generate(name).context("while generating the key")?;
    write_secret_file(out, &key.to_string())
        .with_context(|| format!("while writing the secret key to {}", out.display()))?;
    println!("{}", key.public());
    Ok(())
}

/// Creates a file readable only by its owner: secret keys must not leak
/// through a permissive umask.
pub(crate) fn write_secret_file(path: &Path, contents: &str) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_common_units() {
        assert_eq!(parse_duration("45"), Ok(45));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("12h"), Ok(43_200));
        assert_eq!(parse_duration("90d"), Ok(90 * 86_400));
        assert!(parse_duration("3x").is_err());
        assert!(parse_duration("d").is_err());
        assert!(parse_duration("99999999999999999999w").is_err());
    }

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("500M"), Ok(500 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
