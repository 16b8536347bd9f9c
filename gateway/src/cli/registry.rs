//! `nixpfs registry …` and `nixpfs set verify`: the tool path for root-key
//! holders who maintain the anchor registry, and for anyone checking a set.

use std::fs;
use std::io::BufReader;
use std::path::PathBuf;

use anchor_registry::{
    read_set, verify_set, versioned_location, Anchor, AnchorName, PublicKey, Registry, Source,
};
use anyhow::{bail, Context, Result};
use clap::Subcommand;

use super::parse_duration;
use gateway::util::fs::write_atomically;
use gateway::util::keys::read_secret_key;
use gateway::util::time::now;

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Create version 1 of a registry with its root keys and threshold.
    Init {
        /// A root public key (`name:base64`); repeat for each.
        #[arg(long = "root-key", required = true)]
        root_keys: Vec<String>,
        /// How many distinct root keys must sign each version.
        #[arg(long)]
        threshold: u64,
        /// How long the registry stays valid, e.g. `365d`.
        #[arg(long, default_value = "365d", value_parser = parse_duration)]
        expires: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Add an anchor. A signed (published) registry becomes the next version.
    AddAnchor {
        file: PathBuf,
        #[arg(long)]
        name: String,
        /// The anchor's Nix public key (`name:base64`).
        #[arg(long)]
        key: String,
        /// Where it publishes: absolute path, http(s) URL, ipfs://CID or ipns://NAME.
        #[arg(long = "source", required = true)]
        sources: Vec<String>,
        #[arg(long)]
        note: Option<String>,
    },
    /// Remove an anchor. A signed (published) registry becomes the next version.
    RemoveAnchor {
        file: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Add this root key's signature.
    Sign {
        file: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Check signatures, threshold, expiry, and rotation from --previous.
    Verify {
        file: PathBuf,
        #[arg(long)]
        previous: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SetCommand {
    /// Check a mapping set: every byte signed, entries canonical and signed;
    /// with --registry also that its signer is a registry anchor and unexpired.
    Verify {
        file: PathBuf,
        #[arg(long)]
        registry: Option<PathBuf>,
    },
}

fn load(file: &PathBuf) -> Result<Registry> {
    let text = fs::read_to_string(file)
        .with_context(|| format!("while reading the registry {}", file.display()))?;
    Registry::parse(&text).with_context(|| format!("invalid registry {}", file.display()))
}

fn save(file: &std::path::Path, registry: &Registry) -> Result<()> {
    write_atomically(file, registry.render().as_bytes())?;
    Ok(())
}

/// The config lines a gateway needs to follow this registry: its trust root.
/// Users get them from the registry's maintainers, never from a fetch.
fn trust_root_lines(registry: &Registry) -> String {
    let keys: Vec<String> = registry
        .root_keys()
        .iter()
        .map(|k| format!("{:?}", k.to_string()))
        .collect();
    format!(
        "gateways that follow this registry need, in config.toml:\n  registry_root_keys = [{}]\n  registry_threshold = {}\n",
        keys.join(", "),
        registry.threshold()
    )
}

/// A published (signed) registry is immutable: changes go to the next version.
fn editable(registry: Registry) -> Result<Registry> {
    if registry.signatures().is_empty() {
        Ok(registry)
    } else {
        Ok(registry.next_version()?)
    }
}

pub fn run_registry(cmd: RegistryCommand) -> Result<()> {
    match cmd {
        RegistryCommand::Init {
            root_keys,
            threshold,
            expires,
            out,
        } => {
            if out.exists() {
                bail!(
                    "{} already exists; refusing to overwrite a registry",
                    out.display()
                );
            }
            let keys = root_keys
                .iter()
                .map(|k| PublicKey::parse(k).with_context(|| format!("invalid --root-key {k:?}")))
                .collect::<Result<Vec<_>>>()?;
            let registry = Registry::init(keys, threshold, now()?.saturating_add(expires))?;
            save(&out, &registry)?;
            println!(
                "created registry version 1 at {} (sign it with `nixpfs registry sign`)",
                out.display()
            );
            print!("{}", trust_root_lines(&registry));
        }
        RegistryCommand::AddAnchor {
            file,
            name,
            key,
            sources,
            note,
        } => {
            let mut registry = editable(load(&file)?)?;
            let anchor = Anchor {
                key: PublicKey::parse(&key).with_context(|| format!("invalid --key {key:?}"))?,
                name: AnchorName::parse(&name)?,
                note,
                sources: sources
                    .iter()
                    .map(|s| Source::parse(s))
                    .collect::<Result<Vec<_>, _>>()?,
            };
            registry.add_anchor(anchor)?;
            save(&file, &registry)?;
            println!(
                "added anchor {name}; registry is now version {} (unsigned)",
                registry.version()
            );
        }
        RegistryCommand::RemoveAnchor { file, name } => {
            let mut registry = editable(load(&file)?)?;
            registry.remove_anchor(&AnchorName::parse(&name)?)?;
            save(&file, &registry)?;
            println!(
                "removed anchor {name}; registry is now version {} (unsigned)",
                registry.version()
            );
        }
        RegistryCommand::Sign { file, key } => {
            let mut registry = load(&file)?;
            let key = read_secret_key(&key)?;
            registry.sign(&key);
            save(&file, &registry)?;
            // Gateways that skipped this version walk through this copy.
            let kept = file
                .to_str()
                .and_then(|f| versioned_location(f, registry.version()))
                .with_context(|| {
                    format!(
                        "{} has no file name to keep versions beside",
                        file.display()
                    )
                })?;
            save(std::path::Path::new(&kept), &registry)?;
            println!(
                "signed version {} with {} ({} of {} signatures needed); publish {} beside it too",
                registry.version(),
                key.name(),
                registry.signatures().len(),
                registry.threshold(),
                kept
            );
            print!("{}", trust_root_lines(&registry));
        }
        RegistryCommand::Verify { file, previous } => {
            let registry = load(&file)?;
            let previous = previous.as_ref().map(load).transpose()?;
            registry
                .verify(previous.as_ref(), now()?)
                .with_context(|| format!("registry {} is not trustworthy", file.display()))?;
            println!(
                "registry version {} OK: {} anchors, {} of {} root signatures, expires at {}",
                registry.version(),
                registry.anchors().len(),
                registry.signatures().len(),
                registry.threshold(),
                registry.expires()
            );
        }
    }
    Ok(())
}

pub fn run_set(cmd: SetCommand) -> Result<()> {
    let SetCommand::Verify { file, registry } = cmd;
    let open = || -> Result<BufReader<fs::File>> {
        Ok(BufReader::with_capacity(
            1 << 20,
            fs::File::open(&file).with_context(|| format!("while opening {}", file.display()))?,
        ))
    };
    let mut entries = 0u64;
    match registry {
        Some(registry_file) => {
            let registry = load(&registry_file)?;
            registry.verify(None, now()?).with_context(|| {
                format!("registry {} is not trustworthy", registry_file.display())
            })?;
            let (set, _) = verify_set(open()?, &registry, None, now()?, |_| entries += 1)
                .with_context(|| format!("set {} refused", file.display()))?;
            let h = set.header.header();
            println!(
                "{} set by registry anchor {} version {} OK: {} entries, digest {}",
                h.kind,
                h.anchor,
                h.version,
                entries,
                set.header.digest()
            );
        }
        None => {
            let header = read_set(open()?, |_| entries += 1)
                .with_context(|| format!("set {} refused", file.display()))?;
            let h = header.header();
            println!(
                "{} set by {} ({}) version {} is well-formed and self-consistent: {} entries, digest {} \
                 (pass --registry to check that its signer is trusted)",
                h.kind,
                h.anchor,
                h.key,
                h.version,
                entries,
                header.digest()
            );
        }
    }
    Ok(())
}
