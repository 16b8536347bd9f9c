//! The command line: clap definitions and the dispatch from each subcommand to
//! the library function that does the work. Output formatting lives here; the
//! work does not.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anchor_registry::SecretKey;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use gateway::store::nar;
use gateway::util::fs::write_secret_file;
use gateway::util::keys::read_secret_key;
use gateway::util::when::human;

mod car;
mod community;
mod node;
mod progress;
mod registry;

use gateway::app::{Conflict, Status};
use gateway::http::admin::{
    AdminRequest, FetchReply, IdReply, NameReply, PeerReply, ProviderReply,
};
use gateway::publish::names::NamePublished;
use gateway::publish::pin::PinEntry;
use gateway::store::repo_verify::RepoReport;
use gateway::trust::sync::SyncReport;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The `routing` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum RoutingCommand {
    /// Peers that provide CID, with their addresses, from the DHT and the
    /// configured routers.
    Findprovs {
        cid: String,
        /// Stop after this many providers.
        #[arg(long, short = 'n', default_value_t = 20)]
        num_providers: usize,
    },
    /// Announce on the DHT that this node has CID.
    Provide { cid: String },
}

/// The `name` subcommands (IPNS), as Kubo's `ipfs name`.
#[derive(Debug, clap::Subcommand)]
pub enum NameCommand {
    /// Resolve an IPNS name (from the DHT and the configured routers),
    /// verify its record and print `/ipfs/<cid>`.
    Resolve {
        /// `ipns://k51…`, `/ipns/k51…` or `k51…`.
        name: String,
    },
}

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
    /// Progress bars on stderr for long commands: when stderr is a terminal
    /// (auto), always, or never.
    #[arg(long, global = true, value_enum, default_value_t = progress::ProgressMode::Auto)]
    pub progress: progress::ProgressMode,
    /// Log lines as plain text or one JSON object each, for collectors
    /// (default: the config's `log_format`, else text).
    #[arg(long, global = true, env = "NIXPFS_LOG_FORMAT")]
    pub log_format: Option<gateway::config::LogFormat>,
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
    Serve(Box<node::ServeArgs>),
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
    /// Content routing on the DHT, as Kubo's `ipfs routing`.
    #[command(subcommand)]
    Routing(RoutingCommand),
    /// IPNS names: resolve and verify.
    #[command(subcommand)]
    Name(NameCommand),
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
    /// Check the data directory itself (`repo verify`).
    #[command(subcommand)]
    Repo(RepoCommand),
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
    /// Print a shell completion script (e.g. `nixpfs completions bash >
    /// /etc/bash_completion.d/nixpfs`).
    Completions { shell: clap_complete::Shell },
    /// Print the nixpfs(1) man page (roff), or write one page per command into --out.
    Man {
        /// Write nixpfs.1 and nixpfs-<command>.1 for every subcommand here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
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
        /// Also add the set to IPFS and publish it under the key's IPNS
        /// name (`ipns://k51…`, for the registry's `sources`).
        #[arg(long)]
        ipns: bool,
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
pub enum RepoCommand {
    /// Re-hash every block, check every pin's DAG is complete, every indexed
    /// path's CID held and every stored mapping set equal to its digest;
    /// print what is damaged and exit 1 if anything is.
    Verify {
        #[arg(long)]
        json: bool,
    },
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
/// Colour codes only when stderr is a terminal (and `NO_COLOR` is unset):
/// log files and journald get plain text. The format is `--log-format`,
/// else the config file's `log_format` (a config that cannot be read is
/// reported by the command itself, so here it only means "text").
pub fn init_tracing(cli: &Cli) {
    use gateway::config::LogFormat;
    use std::io::IsTerminal;
    let format = cli.global.log_format.unwrap_or_else(|| {
        node::resolve(&cli.global)
            .map(|(_, config)| config.log_format)
            .unwrap_or_default()
    });
    let default = match cli.verbose {
        0 => "warn,gateway=info",
        1 => "info,gateway=debug",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr);
    match format {
        LogFormat::Json => logs.json().with_current_span(false).init(),
        LogFormat::Text => logs
            .with_ansi(io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
    }
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
        Command::Serve(args) => node::serve(&cli.global, *args),
        Command::NixConfig => node::nix_config(&cli.global),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "nixpfs", &mut io::stdout().lock());
            Ok(())
        }
        Command::Man { out } => {
            let command = <Cli as clap::CommandFactory>::command();
            match out {
                Some(dir) => {
                    fs::create_dir_all(&dir)
                        .with_context(|| format!("while creating {}", dir.display()))?;
                    clap_mangen::generate_to(command, &dir)
                        .with_context(|| format!("while writing man pages into {}", dir.display()))
                }
                None => clap_mangen::Man::new(command)
                    .render(&mut io::stdout().lock())
                    .context("while writing the man page"),
            }
        }
        Command::Status { json } => {
            node::dispatch(&cli.global, AdminRequest::Status)?.print(json, render_status)
        }
        Command::Id => {
            node::dispatch(&cli.global, AdminRequest::Id)?.print(false, |id: IdReply| {
                let mut out = format!("peer id: {}\n", id.peer_id);
                for a in &id.listen_addrs {
                    out.push_str(&format!("listen: {a}\n"));
                }
                out.push_str(&format!("gateway key: {}", id.gateway_key));
                out
            })
        }
        Command::Peers => node::dispatch(&cli.global, AdminRequest::Peers)?.print(
            false,
            |peers: Vec<PeerReply>| {
                lines(&peers, |p| {
                    let agent = p
                        .agent_version
                        .as_deref()
                        .map_or_else(|| "(unknown agent)".to_owned(), remote);
                    format!("{} {agent}", p.peer_id)
                })
            },
        ),
        Command::Routing(RoutingCommand::Findprovs { cid, num_providers }) => node::dispatch(
            &cli.global,
            AdminRequest::FindProviders {
                cid,
                limit: num_providers,
            },
        )?
        .print(false, |providers: Vec<ProviderReply>| {
            lines(&providers, |p| {
                let mut line = p.peer_id.clone();
                for addr in &p.addrs {
                    line.push(' ');
                    line.push_str(&remote(addr));
                }
                line
            })
        }),
        Command::Routing(RoutingCommand::Provide { cid }) => node::dispatch(
            &cli.global,
            AdminRequest::Provide { cid },
        )?
        .print(false, |reply: Value| {
            format!(
                "provided {}",
                reply["provided"].as_str().unwrap_or_default()
            )
        }),
        Command::Add { file } => {
            let path = node::absolute(&file)?;
            node::dispatch(&cli.global, AdminRequest::Add { path })?
                .print(false, |pin: PinEntry| pin.cid)
        }
        Command::Fetch { cid, out } => {
            let out = node::absolute(&out)?;
            let request = AdminRequest::Fetch {
                cid,
                out: out.clone(),
            };
            node::dispatch(&cli.global, request)?.print(false, |f: FetchReply| {
                format!("fetched {} bytes to {}", f.bytes, out.display())
            })
        }
        Command::Pin { targets, closure } => {
            let targets = absolute_store_paths(targets)?;
            node::dispatch(&cli.global, AdminRequest::Pin { targets, closure })?
                .print(false, render_pins)
        }
        Command::Seed { anchors, max_size } => {
            node::dispatch(&cli.global, AdminRequest::Seed { anchors, max_size })?
                .print(false, render_pins)
        }
        Command::Unpin { targets } => {
            let targets = absolute_store_paths(targets)?;
            node::dispatch(&cli.global, AdminRequest::Unpin { targets })?
                .print(false, |unpinned: Vec<String>| {
                    lines(&unpinned, |t| format!("unpinned {t}"))
                })
        }
        Command::Pins { json } => {
            node::dispatch(&cli.global, AdminRequest::Pins)?.print(json, render_pins)
        }
        Command::Repo(RepoCommand::Verify { json }) => {
            let reply = node::dispatch(&cli.global, AdminRequest::RepoVerify)?;
            reply.print(json, render_repo_report)?;
            let report: RepoReport = reply.typed()?;
            if !report.is_clean() {
                bail!("repo verify: {} damaged", report.damaged.len());
            }
            Ok(())
        }
        Command::Gc => node::dispatch(&cli.global, AdminRequest::Gc)?.print(
            false,
            |gc: gateway::app::GcOutcome| {
                let mut out: String = gc
                    .evicted
                    .iter()
                    .map(|e| format!("evicted {} ({}, {} bytes)\n", e.cid, e.nar_hash, e.dag_size))
                    .collect();
                out.push_str(&format!("freed {} blocks, {} bytes", gc.blocks, gc.bytes));
                out
            },
        ),
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
            node::dispatch(&cli.global, request)?.print(false, |signed: Vec<String>| {
                lines(&signed, |p| format!("signed {p}"))
            })
        }
        Command::Anchor(AnchorCommand::Publish {
            key,
            out,
            expires,
            name,
            ipns,
        }) => {
            let (data_dir, _) = node::resolve(&cli.global)?;
            let key_file = key;
            let key = read_secret_key(&key_file)?;
            let kind = anchor_registry::SetKind::Anchor;
            let header = gateway::publish::anchor::publish(
                &data_dir,
                &key,
                name.as_deref(),
                kind,
                expires,
                &out,
            )?;
            let h = header.header();
            println!(
                "published {} version {} ({} entries, digest {}) to {}",
                h.anchor,
                h.version,
                h.count,
                header.digest(),
                out.display()
            );
            if ipns {
                let request = AdminRequest::NamePublish {
                    key_file: node::absolute(&key_file)?,
                    set_file: node::absolute(&out)?,
                };
                node::dispatch(&cli.global, request)?
                    .print(false, |p: NamePublished| name_published_text(&p))?;
            }
            Ok(())
        }
        Command::Name(NameCommand::Resolve { name }) => {
            node::dispatch(&cli.global, AdminRequest::NameResolve { name })?
                .print(false, |r: NameReply| r.value)
        }
        Command::Anchors(AnchorsCommand::Sync) => node::dispatch(&cli.global, AdminRequest::Sync)?
            .print(false, |sync: SyncReport| {
                let mut out = format!("registry version {}\n", sync.registry_version);
                if let Some(error) = &sync.registry_error {
                    out.push_str(&format!(
                        "registry not fetched, synced with the stored one: {}\n",
                        remote_error(error)
                    ));
                }
                out.push_str(&lines(&sync.anchors, |a| {
                    let mut line = format!("{}: {}", a.anchor, a.outcome);
                    if let Some(version) = a.version {
                        line.push_str(&format!(" version {version}"));
                    }
                    for e in &a.errors {
                        line.push_str(&format!("\n  {}", remote_error(e)));
                    }
                    line
                }));
                out
            }),
        Command::Conflicts { json } => node::dispatch(&cli.global, AdminRequest::Conflicts)?.print(
            json,
            |conflicts: Vec<Conflict>| {
                if conflicts.is_empty() {
                    return "no conflicts".to_owned();
                }
                lines(&conflicts, |c| {
                    let mut out = format!("{}:", c.store_path);
                    for e in &c.evidence {
                        out.push_str(&format!(
                            "\n  {} says {}",
                            e.anchor,
                            e.mapping.to_canonical_string()
                        ));
                    }
                    out
                })
            },
        ),
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

/// A gateway's reply to one admin request, as the JSON it sent.
pub(crate) struct Reply {
    /// The request's name in the admin API (`status`, `car-export`…).
    op: String,
    value: Value,
}

impl Reply {
    pub(crate) fn new(op: String, value: Value) -> Self {
        Self { op, value }
    }

    /// A request's name in the admin API: its `op` tag.
    pub(crate) fn op_name(request: &AdminRequest) -> String {
        serde_json::to_value(request)
            .ok()
            .and_then(|v| v.get("op").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| "the request".to_owned())
    }

    /// The reply read as the library type the gateway serialised it from:
    /// a renamed or missing field is an error, never a blank in the output.
    pub(crate) fn typed<T: DeserializeOwned>(&self) -> Result<T> {
        T::deserialize(&self.value).with_context(|| {
            format!(
                "the gateway's reply to {} did not have the expected shape",
                self.op
            )
        })
    }

    /// Prints the reply: with `json` as the gateway sent it (pretty), else
    /// read as `T` and rendered by `text` (nothing when that is empty).
    pub(crate) fn print<T: DeserializeOwned>(
        &self,
        json: bool,
        text: impl FnOnce(T) -> String,
    ) -> Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(&self.value)?);
        } else {
            let rendered = text(self.typed()?);
            if !rendered.is_empty() {
                println!("{rendered}");
            }
        }
        Ok(())
    }
}

/// One line per damaged item, then what was checked.
fn render_repo_report(r: RepoReport) -> String {
    let mut out: String = r
        .damaged
        .iter()
        .map(|d| {
            let part = serde_json::to_value(d.part)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            format!("damaged {part} {}: {}\n", d.item, d.problem)
        })
        .collect();
    out.push_str(&format!(
        "checked {} blocks ({} bytes), {} pins, {} indexed paths, {} mapping sets: {}",
        r.blocks,
        r.block_bytes,
        r.pins,
        r.paths,
        r.sets,
        if r.is_clean() { "clean" } else { "DAMAGED" }
    ));
    out
}

/// One line per item.
fn lines<T>(items: &[T], line: impl Fn(&T) -> String) -> String {
    items.iter().map(line).collect::<Vec<_>>().join("\n")
}

fn render_pins(pins: Vec<PinEntry>) -> String {
    lines(&pins, |p| {
        let mut line = format!("{} {}", p.cid, p.size);
        if let Some(path) = &p.store_path {
            line.push(' ');
            line.push_str(path);
        }
        line
    })
}

/// A string a remote party chose (a peer's agent version), safe to print.
fn remote(text: &str) -> String {
    gateway::util::text::for_terminal(text, gateway::util::text::REMOTE_MAX_CHARS)
}

/// An error message that may quote a remote party (a server's reply, a
/// URL), safe to print.
fn remote_error(text: &str) -> String {
    gateway::util::text::for_terminal(text, gateway::util::text::REMOTE_ERROR_MAX_CHARS)
}

/// A number as the JSON reply carries it: `null` when there is none.
fn render_status(s: Status) -> String {
    render_status_at(s, gateway::util::time::unix_now())
}

/// [`render_status`] as of `now` (unix seconds), times in a human form.
fn render_status_at(s: Status, now: u64) -> String {
    let when = |t: Option<u64>| t.map_or_else(|| "never".to_owned(), |t| human(t, now));
    let registry = s
        .registry_version
        .map_or_else(|| "none".to_owned(), |v| format!("version {v}"));
    let mut out = format!(
        "peer {}\nconnected peers: {}\npins: {} ({}), own store paths: {}\nregistry: {registry} (last sync {})\nforks seen: {}, conflicts: {}\n",
        s.peer_id,
        s.connected_peers,
        s.pins,
        indicatif::HumanBytes(s.pinned_bytes),
        s.local_paths,
        when(s.last_sync),
        s.forks,
        s.conflicts,
    );
    if let Some(expires) = s.registry_expires {
        if expires <= now {
            out.push_str(&format!(
                "registry expired at {}: no path is served on anchor policy until a fresh one syncs (last fetch: {})\n",
                human(expires, now),
                s.registry_error.as_deref().map_or_else(|| "ok".to_owned(), remote_error)
            ));
        } else if let Some(error) = &s.registry_error {
            out.push_str(&format!(
                "registry fetch failed, using the stored one: {}\n",
                remote_error(error)
            ));
        }
    }
    match &s.dht {
        Some(dht) => out.push_str(&format!(
            "dht: {} peers in the routing table, {} keys provided\n",
            dht.routing_peers, dht.provided_keys
        )),
        None => out.push_str("dht: off\n"),
    }
    let repro = &s.repro;
    out.push_str(&format!(
        "repro: {} paths, {} reproduced, {} differ, {} not checked\n",
        repro.paths, repro.reproduced, repro.differs, repro.not_checked
    ));
    for u in &s.upstreams {
        let health = match (&u.last_error, u.last_error_at) {
            (Some(error), at) => format!(
                "last error{}: {}{}",
                at.map(|at| format!(" {}", human(at, now)))
                    .unwrap_or_default(),
                remote_error(error),
                if u.backing_off {
                    " (skipped for now)"
                } else {
                    ""
                }
            ),
            (None, _) => "ok".to_owned(),
        };
        out.push_str(&format!(
            "upstream {} (priority {}, keys {}): {health}\n",
            remote_error(&u.url),
            u.priority,
            u.keys
                .iter()
                .map(|k| k.split(':').next().unwrap_or(k))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for a in &s.anchors {
        let trusted = match (a.version, a.entries, a.expires) {
            (Some(version), Some(entries), Some(expires)) => format!(
                "version {version}, {entries} entries, expires {}",
                human(expires, now)
            ),
            _ => "no trusted set".to_owned(),
        };
        let last_sync = match (a.last_sync, &a.reason) {
            (None, _) => "-".to_owned(),
            (Some(outcome), Some(reason)) => format!("{outcome}: {reason}"),
            (Some(outcome), None) => outcome.to_string(),
        };
        out.push_str(&format!(
            "{} {}: {trusted}, last sync {last_sync}\n",
            a.kind, a.name
        ));
    }
    // The counters are a name → count table; serde names them as the JSON
    // does. One line per group, in the order a user asks the questions.
    if let Ok(Value::Object(counters)) = serde_json::to_value(&s.counters) {
        let grouped = |name: &str| {
            COUNTER_GROUPS
                .iter()
                .any(|(_, names)| names.contains(&name))
        };
        for (group, names) in COUNTER_GROUPS {
            let items: Vec<String> = if names.is_empty() {
                counters
                    .iter()
                    .filter(|(name, _)| !grouped(name))
                    .map(|(name, n)| format!("{name} {n}"))
                    .collect()
            } else {
                names
                    .iter()
                    .filter_map(|name| counters.get(*name).map(|n| format!("{name} {n}")))
                    .collect()
            };
            if !items.is_empty() {
                out.push_str(&format!("{group}: {}\n", items.join(", ")));
            }
        }
    }
    out.trim_end().to_owned()
}

/// What `--ipns` publishing did, for people: the name first.
fn name_published_text(p: &NamePublished) -> String {
    let mut out = format!(
        "ipns://{}\n/ipfs/{} (sequence {}), sent to {} DHT peers and {} routers",
        p.name,
        p.cid,
        p.sequence,
        p.published.dht_peers,
        p.published.routers.len()
    );
    for error in &p.published.errors {
        out.push_str(&format!("\nnot sent: {error}"));
    }
    out
}

/// How `status` groups the counters; a counter not named here goes in the
/// last group (the one without names).
const COUNTER_GROUPS: [(&str, &[&str]); 7] = [
    (
        "served",
        &[
            "narinfo_served",
            "narinfo_not_found",
            "nar_served",
            "nar_bytes",
        ],
    ),
    (
        "refused",
        &[
            "narinfo_conflict",
            "narinfo_registry_expired",
            "nar_hash_mismatch",
            "nar_fetch_failed",
            "store_blocks_refused",
            "auth_failures",
            "http_header_timeouts",
            "http_idle_timeouts",
            "http_send_timeouts",
            "sources_refused",
            "seed_refused",
        ],
    ),
    (
        "sync",
        &[
            "sync_accepted",
            "sync_rejected",
            "registry_refused",
            "sets_purged",
            "ipns_resolved",
            "ipns_refused",
            "ipns_published",
        ],
    ),
    ("uploads", &["uploads_accepted", "uploads_rejected"]),
    (
        "upstreams",
        &[
            "upstream_narinfo_served",
            "upstream_bad_signature",
            "upstream_errors",
            "upstream_nar_fetched",
            "upstream_nar_prefetched",
            "narinfo_looked_ahead",
            "upstream_nar_refused",
            "upstream_bytes",
            "peer_narinfo_served",
            "peer_nar_prefetched",
            "peer_answers_refused",
            "peer_bytes",
            "seeded_fetched",
            "cache_evictions",
        ],
    ),
    (
        "routing",
        &[
            "routing_answered",
            "routing_refused",
            "router_providers",
            "router_errors",
        ],
    ),
    ("other", &[]),
];

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
    gateway::util::size::parse_size(text)
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

#[cfg(test)]
mod tests {
    use super::*;
    use gateway::app::AnchorStatus;
    use gateway::publish::ReproCounts;
    use gateway::store::ipfs::GcReport;
    use gateway::trust::sync::Outcome;
    use gateway::util::metrics::MetricsSnapshot;
    use serde_json::json;

    fn reply(value: Value) -> Reply {
        Reply::new("test".to_owned(), value)
    }

    #[test]
    fn reply_structs_keep_the_admin_api_field_names() {
        assert_eq!(
            serde_json::to_value(FetchReply { bytes: 7 }).unwrap(),
            json!({ "bytes": 7 })
        );
        assert_eq!(
            serde_json::to_value(GcReport {
                blocks: 2,
                bytes: 9
            })
            .unwrap(),
            json!({ "blocks": 2, "bytes": 9 })
        );
        assert_eq!(
            serde_json::to_value(PeerReply {
                peer_id: "12D3Koo".to_owned(),
                agent_version: None
            })
            .unwrap(),
            json!({ "peer_id": "12D3Koo", "agent_version": null })
        );
        let key = SecretKey::generate("gw-1").unwrap().public();
        let id = json!({
            "peer_id": "12D3Koo",
            "listen_addrs": ["/ip4/127.0.0.1/tcp/4001"],
            "gateway_key": key.to_string(),
        });
        let typed: IdReply = reply(id.clone()).typed().unwrap();
        assert_eq!(typed.gateway_key, key);
        assert_eq!(serde_json::to_value(typed).unwrap(), id);
    }

    #[test]
    fn a_reply_of_another_shape_is_an_error_not_a_blank() {
        let err = reply(json!({ "bytes_written": 7 }))
            .typed::<FetchReply>()
            .unwrap_err();
        assert!(
            format!("{err:#}")
                .starts_with("the gateway's reply to test did not have the expected shape"),
            "{err:#}"
        );
        assert!(reply(json!({ "blocks": 1 }))
            .print(false, |_: GcReport| String::new())
            .is_err());
    }

    #[test]
    fn status_renders_every_field() {
        let status = Status {
            peer_id: "12D3Koo".to_owned(),
            listen_addrs: vec![],
            connected_peers: 1,
            pins: 2,
            pinned_bytes: 300,
            local_paths: 4,
            registry_version: Some(5),
            registry_expires: None,
            registry_error: None,
            last_sync: None,
            anchors: vec![
                AnchorStatus {
                    name: "anchor-a".to_owned(),
                    kind: "anchor".to_owned(),
                    version: Some(6),
                    expires: Some(7),
                    entries: Some(8),
                    last_sync: Some(Outcome::Accepted),
                    reason: None,
                },
                AnchorStatus {
                    name: "anchor-b".to_owned(),
                    kind: "anchor".to_owned(),
                    version: None,
                    expires: None,
                    entries: None,
                    last_sync: Some(Outcome::Rejected),
                    reason: Some(
                        "b.jsonl: `anchor-b` version 1 is older than trusted version 2: rollback"
                            .to_owned(),
                    ),
                },
            ],
            forks: 0,
            conflicts: 1,
            dht: None,
            repro: ReproCounts {
                paths: 3,
                reproduced: 1,
                differs: 1,
                not_checked: 1,
            },
            upstreams: Vec::new(),
            counters: MetricsSnapshot {
                nar_bytes: 42,
                ..MetricsSnapshot::default()
            },
        };
        let typed: Status = reply(serde_json::to_value(&status).unwrap())
            .typed()
            .unwrap();
        let text = render_status_at(typed, 60);
        let head = "peer 12D3Koo\nconnected peers: 1\npins: 2 (300 B), own store paths: 4\n\
            registry: version 5 (last sync never)\nforks seen: 0, conflicts: 1\n\
            dht: off\n\
            repro: 3 paths, 1 reproduced, 1 differ, 1 not checked\n\
            anchor anchor-a: version 6, 8 entries, expires 1970-01-01 00:00:07 UTC (53 s ago), last sync accepted\n\
            anchor anchor-b: no trusted set, last sync rejected: b.jsonl: `anchor-b` version 1 is older than trusted version 2: rollback\n\
            served: narinfo_served 0, narinfo_not_found 0, nar_served 0, nar_bytes 42\n\
            refused: narinfo_conflict 0, narinfo_registry_expired 0, nar_hash_mismatch 0, nar_fetch_failed 0, store_blocks_refused 0, auth_failures 0, \
            http_header_timeouts 0, http_idle_timeouts 0, http_send_timeouts 0, sources_refused 0, seed_refused 0\n\
            sync: sync_accepted 0, sync_rejected 0, registry_refused 0, sets_purged 0, \
            ipns_resolved 0, ipns_refused 0, ipns_published 0\n\
            uploads: uploads_accepted 0, uploads_rejected 0\n\
            upstreams: upstream_narinfo_served 0, upstream_bad_signature 0, upstream_errors 0, \
            upstream_nar_fetched 0, upstream_nar_prefetched 0, narinfo_looked_ahead 0, upstream_nar_refused 0, upstream_bytes 0, \
            peer_narinfo_served 0, peer_nar_prefetched 0, \
            peer_answers_refused 0, peer_bytes 0, seeded_fetched 0, cache_evictions 0\n\
            routing: routing_answered 0, routing_refused 0, router_providers 0, router_errors 0";
        assert_eq!(text, head);
    }

    #[test]
    fn pins_show_the_store_path_when_there_is_one() {
        let pins = vec![
            PinEntry {
                cid: "bafyA".to_owned(),
                size: 10,
                store_path: Some("/nix/store/aaaa-x".to_owned()),
            },
            PinEntry {
                cid: "bafyB".to_owned(),
                size: 20,
                store_path: None,
            },
        ];
        assert_eq!(render_pins(pins), "bafyA 10 /nix/store/aaaa-x\nbafyB 20");
    }

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
