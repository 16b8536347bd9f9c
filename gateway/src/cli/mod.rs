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

mod registry;

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
        Command::Set(cmd) => registry::run_set(cmd),
        Command::Nar(NarCommand::Hash { path }) => {
            let summary = nar::hash_path(&path)
                .with_context(|| format!("while hashing the NAR of {}", path.display()))?;
            println!("{} {}", summary.nar_hash, summary.nar_size);
            Ok(())
        }
    }
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
fn write_secret_file(path: &Path, contents: &str) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}
