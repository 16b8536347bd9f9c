//! Publishing a signed set under the IPNS name of the key that signed it:
//! the set goes onto IPFS (pinned, provided), and a record pointing the
//! name at it — sequence = the set's version, validity = the set's expiry
//! — is signed with the same key and sent out (see `trust::names`). A
//! resolver thus learns the newest version without anyone passing a CID
//! along, and can tell it comes from the key itself.

use std::path::Path;
use std::time::Duration;

use anchor_registry::{SecretKey, SignedHeader};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::pin::Pinner;
use crate::store::ipfs::ipns::{self, IpnsName};
use crate::trust::names::{Names, Published};

/// How long resolvers may cache an answer: short, so a new set version
/// reaches gateways within minutes (Kubo's default is 5 minutes too).
pub const RECORD_TTL: Duration = Duration::from_secs(300);

/// What publishing a set under its key's name did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamePublished {
    /// The name, as `k51…`.
    pub name: IpnsName,
    /// The set's CID (`/ipfs/<cid>` is the record's value).
    pub cid: String,
    pub sequence: u64,
    /// Unix seconds: the set's expiry.
    pub validity: u64,
    pub published: Published,
}

/// Adds the set at `set_file` (signed by `key`) to IPFS and publishes it
/// under `key`'s IPNS name.
pub async fn publish_set(
    pinner: &Pinner,
    names: &Names<'_>,
    key: &SecretKey,
    set_file: &Path,
) -> Result<NamePublished> {
    let header = read_header(set_file).await?;
    let h = header.header();
    if h.key != key.public() {
        bail!(
            "{} is signed by {}, not by {}: publish a set under the name of the key that signed it",
            set_file.display(),
            h.key,
            key.public()
        );
    }
    let now = crate::util::time::now()?;
    if h.expires <= now {
        bail!(
            "{} has expired (at {}): publish a new version first",
            set_file.display(),
            h.expires
        );
    }
    let pinned = pinner.add_file(set_file).await?;
    let cid = crate::publish::pin::parse_cid(&pinned.cid)?;
    if let Some(node) = names.node {
        if let Err(e) = node.provide(cid).await {
            tracing::debug!(%cid, "set not announced on the DHT: {e}");
        }
    }
    let keypair = ipns::keypair_from_seed(key.seed())?;
    let name = IpnsName::from_ed25519(key.public().as_bytes())?;
    let record = ipns::sign(&keypair, &cid, h.version, h.expires, RECORD_TTL)?;
    let published = names.publish(&name, record).await?;
    tracing::info!(%name, %cid, sequence = h.version, dht_peers = published.dht_peers, routers = published.routers.len(), "published set under IPNS");
    Ok(NamePublished {
        name,
        cid: pinned.cid,
        sequence: h.version,
        validity: h.expires,
        published,
    })
}

/// The signed header: a set file's first line.
async fn read_header(set_file: &Path) -> Result<SignedHeader> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let file = tokio::fs::File::open(set_file)
        .await
        .with_context(|| format!("while opening {}", set_file.display()))?;
    let mut line = Vec::new();
    tokio::io::BufReader::new(file)
        .take(64 * 1024)
        .read_until(b'\n', &mut line)
        .await
        .with_context(|| format!("while reading {}", set_file.display()))?;
    let line = line.strip_suffix(b"\n").unwrap_or(&line);
    SignedHeader::parse(line)
        .with_context(|| format!("{} is not a signed mapping set", set_file.display()))
}
