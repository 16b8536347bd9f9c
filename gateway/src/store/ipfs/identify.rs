//! Asking a connected peer who it is: an identify (`/ipfs/id/1.0.0`) request
//! on a stream of our own. rust-ipfs 0.16 runs identify but never records
//! what peers send (its `identity(Some(peer))` needs the DHT), so agent
//! versions for `nixpfs peers` and bitswap tuning come from here.

use std::time::Duration;

use futures::AsyncReadExt;
use rust_ipfs::{Ipfs, Multiaddr, PeerId, StreamProtocol};

use super::pb::{self, Fields};

/// The identify protocol: the side that opens the stream is sent the record.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/ipfs/id/1.0.0");
/// Identify records are small; refuse anything larger.
const MAX_RECORD: usize = 64 * 1024;

/// What a peer says about itself (the fields we use).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerIdentity {
    /// e.g. `kubo/0.22.0/`, `nixpfs/0.1.0`.
    pub agent_version: String,
    pub protocol_version: String,
    pub protocols: Vec<String>,
    /// Where the peer says it listens (addresses that do not parse are
    /// left out).
    pub listen_addrs: Vec<Multiaddr>,
}

/// Why a peer could not be identified.
#[derive(Debug, thiserror::Error)]
pub enum IdentifyError {
    #[error("identify stream to {peer}: {reason}")]
    Stream { peer: PeerId, reason: String },
    #[error("identify record from {peer} is malformed: {reason}")]
    Malformed { peer: PeerId, reason: String },
    #[error("{peer} did not answer identify within {timeout:?}")]
    Timeout { peer: PeerId, timeout: Duration },
}

/// Parses an Identify message (without its length prefix).
pub fn decode(buf: &[u8]) -> Result<PeerIdentity, pb::PbError> {
    let mut out = PeerIdentity::default();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    for field in Fields::new(buf) {
        let (num, value) = field?;
        match num {
            2 => {
                if let Ok(addr) = Multiaddr::try_from(value.bytes(2)?.to_vec()) {
                    out.listen_addrs.push(addr);
                }
            }
            3 => out.protocols.push(text(value.bytes(3)?)),
            5 => out.protocol_version = text(value.bytes(5)?),
            6 => out.agent_version = text(value.bytes(6)?),
            _ => {}
        }
    }
    Ok(out)
}

/// Opens an identify stream to a connected `peer` and reads its record.
pub async fn query(
    ipfs: &Ipfs,
    peer: PeerId,
    timeout: Duration,
) -> Result<PeerIdentity, IdentifyError> {
    let stream_err = |reason: String| IdentifyError::Stream { peer, reason };
    let read = async {
        let mut control = ipfs
            .stream_control()
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        let mut stream = control
            .open_stream(peer, PROTOCOL)
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        let mut buf = Vec::new();
        (&mut stream)
            .take(MAX_RECORD as u64 + 10)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        let malformed = |reason: String| IdentifyError::Malformed { peer, reason };
        let mut pos = 0;
        let len = pb::get_varint(&buf, &mut pos).map_err(|e| malformed(e.to_string()))?;
        let body = usize::try_from(len)
            .ok()
            .filter(|l| *l <= MAX_RECORD)
            .and_then(|l| buf.get(pos..pos + l))
            .ok_or_else(|| {
                malformed(format!(
                    "record of {len} bytes, {} received",
                    buf.len() - pos
                ))
            })?;
        decode(body).map_err(|e| malformed(e.to_string()))
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| IdentifyError::Timeout { peer, timeout })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(id: &PeerIdentity) -> Vec<u8> {
        let mut out = Vec::new();
        pb::put_bytes(&mut out, 1, b"\x08\x01\x12\x20key");
        for a in &id.listen_addrs {
            pb::put_bytes(&mut out, 2, &a.to_vec());
        }
        for p in &id.protocols {
            pb::put_bytes(&mut out, 3, p.as_bytes());
        }
        pb::put_bytes(&mut out, 5, id.protocol_version.as_bytes());
        pb::put_bytes(&mut out, 6, id.agent_version.as_bytes());
        out
    }

    #[test]
    fn reads_a_kubo_style_record() {
        let id = PeerIdentity {
            agent_version: "kubo/0.22.0/".into(),
            protocol_version: "ipfs/0.1.0".into(),
            protocols: vec!["/ipfs/bitswap/1.2.0".into(), "/ipfs/id/1.0.0".into()],
            listen_addrs: vec!["/ip4/127.0.0.1/tcp/4001".parse().unwrap()],
        };
        assert_eq!(decode(&encode(&id)).unwrap(), id);
    }

    proptest! {
        #[test]
        fn record_round_trips(agent in ".{0,40}", version in ".{0,20}", protocols in proptest::collection::vec("/[a-z/0-9.]{1,30}", 0..5)) {
            let id = PeerIdentity { agent_version: agent, protocol_version: version, protocols, listen_addrs: Vec::new() };
            prop_assert_eq!(decode(&encode(&id)).unwrap(), id);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }
}
