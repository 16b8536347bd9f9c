//! Our `unixfs-v1-2025` root CIDs equal real Helia's (its importer defaults
//! are that profile) for edge sizes and a file over 1 GiB, where the DAG
//! needs a second level (width 1024). Data is generated on the fly and
//! streamed to both sides; neither holds a whole file in memory. Then a
//! real Helia node and ours exchange files over bitswap in both directions.

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

use e2e::peers::{helia_hash, peers_dir, HeliaPeer};
use futures::StreamExt;
use gateway::store::ipfs::{dag, Node, NodeConfig};
use tokio::io::{AsyncRead, ReadBuf};

const MIB: u64 = 1024 * 1024;

/// Deterministic bytes: `i % 251`, or xorshift64 noise (distinct leaves).
#[derive(Clone)]
struct Data {
    noise: bool,
    state: u64,
    pos: u64,
    len: u64,
}

impl Data {
    fn pattern(len: u64) -> Self {
        Data {
            noise: false,
            state: 0,
            pos: 0,
            len,
        }
    }

    fn noise(len: u64) -> Self {
        Data {
            noise: true,
            state: 0x9e37_79b9_7f4a_7c15,
            pos: 0,
            len,
        }
    }

    fn fill(&mut self, buf: &mut [u8]) -> usize {
        let n = (buf.len() as u64).min(self.len - self.pos) as usize;
        let n = if self.noise && n >= 8 { n / 8 * 8 } else { n };
        if self.noise {
            for word in buf[..n].chunks_mut(8) {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                word.copy_from_slice(&self.state.to_le_bytes()[..word.len()]);
            }
        } else {
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = ((self.pos + i as u64) % 251) as u8;
            }
        }
        self.pos += n as u64;
        n
    }

    fn write_to(mut self, w: &mut dyn Write) -> std::io::Result<()> {
        let mut buf = vec![0u8; MIB as usize];
        loop {
            let n = self.fill(&mut buf);
            if n == 0 {
                return Ok(());
            }
            w.write_all(&buf[..n])?;
        }
    }
}

impl AsyncRead for Data {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.fill(buf.initialize_unfilled());
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

#[test]
#[cfg_attr(
    missing_peers,
    ignore = "needs the foreign IPFS peers: run scripts/install-peers DIR and export NIXPFS_PEERS_DIR=DIR"
)]
fn root_cids_equal_helias_for_edge_sizes_and_over_1_gib() {
    let peers = peers_dir();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let cases = [
        ("0 B", Data::pattern(0)),
        ("1 B", Data::pattern(1)),
        ("1 MiB", Data::pattern(MIB)),
        ("1 MiB + 1", Data::pattern(MIB + 1)),
        ("3 MiB", Data::pattern(3 * MIB)),
        ("1 GiB + 5 MiB + 7", Data::noise(1029 * MIB + 7)),
    ];
    let mut printed = false;
    for (name, data) in cases {
        let t0 = std::time::Instant::now();
        let ours = rt
            .block_on(dag::compute_cid(data.clone()))
            .expect("our import");
        let ours_secs = t0.elapsed().as_secs_f64();
        let t0 = std::time::Instant::now();
        let helia = helia_hash(&peers, |w| data.clone().write_to(w)).expect("helia");
        if !printed {
            println!(
                "Helia {} (@helia/unixfs {}, ipfs-unixfs-importer {})",
                helia.helia, helia.unixfs, helia.importer
            );
            printed = true;
        }
        println!(
            "{name}: {} ({} blocks; ours {ours_secs:.2} s, helia {:.2} s)",
            ours.cid,
            ours.blocks,
            t0.elapsed().as_secs_f64()
        );
        assert_eq!(ours.size, data.len, "{name}: bytes imported");
        assert_eq!(
            ours.cid.to_string(),
            helia.cid,
            "{name}: root CID differs from Helia's"
        );
    }
    // The value recorded in the peers recipes for the 3 MiB pattern file.
    let three = rt
        .block_on(dag::compute_cid(Data::pattern(3 * MIB)))
        .expect("import");
    assert_eq!(
        three.cid.to_string(),
        "bafybeihzpjrbcpjpzcx4yxh3hasnjidsikmwmsrli7hhamhny5iueulu5a"
    );
}

fn write_file(path: &std::path::Path, data: Data) -> Vec<u8> {
    let mut f = std::fs::File::create(path).expect("create");
    data.write_to(&mut f).expect("write");
    std::fs::read(path).expect("read back")
}

#[test]
#[cfg_attr(
    missing_peers,
    ignore = "needs the foreign IPFS peers: run scripts/install-peers DIR and export NIXPFS_PEERS_DIR=DIR"
)]
fn helia_and_our_node_exchange_files_over_bitswap() {
    let peers = peers_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let len = 20 * MIB + 3;
    let ours_path = tmp.path().join("ours.bin");
    let theirs_path = tmp.path().join("theirs.bin");
    let ours_bytes = write_file(&ours_path, Data::noise(len));
    let theirs_bytes = write_file(&theirs_path, Data::pattern(len));

    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let mut cfg = NodeConfig::new(tmp.path().join("node"));
    cfg.fetch_timeout = std::time::Duration::from_secs(30);
    let node = rt.block_on(Node::start(cfg)).expect("start node");
    let pinned = rt
        .block_on(async {
            node.add_and_pin(tokio::fs::File::open(&ours_path).await?)
                .await
                .map_err(std::io::Error::other)
        })
        .expect("add");

    let mut helia = HeliaPeer::start(&peers).expect("start helia");
    println!("Helia {} at {}", helia.version, helia.addrs[0]);
    let theirs = helia
        .request(&format!("add {}", theirs_path.display()))
        .expect("helia add");
    let theirs_cid: gateway::store::ipfs::Cid = theirs["cid"]
        .as_str()
        .expect("cid")
        .parse()
        .expect("parse cid");
    rt.block_on(node.connect(helia.addrs[0].parse().expect("multiaddr")))
        .expect("connect to helia");

    // Ours <- Helia.
    let t0 = std::time::Instant::now();
    let got = rt.block_on(async {
        let mut s = Box::pin(node.cat(theirs_cid));
        let mut out = Vec::new();
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok::<_, gateway::store::ipfs::IpfsError>(out)
    });
    let got = got.expect("fetch from helia");
    println!(
        "ours <- helia: {:.1} MB/s",
        len as f64 / t0.elapsed().as_secs_f64() / 1e6
    );
    assert!(got == theirs_bytes, "bytes from Helia differ");

    // Helia <- ours (Helia asks only peers whose identify lists bitswap).
    let out_path = tmp.path().join("from-ours.bin");
    let r = helia
        .request(&format!("cat {} {} 60", pinned.cid, out_path.display()))
        .expect("helia cat");
    println!(
        "helia <- ours: {r} ({:.1} MB/s)",
        len as f64 / r["ms"].as_f64().unwrap_or(1.0) / 1e3
    );
    assert!(
        std::fs::read(&out_path).expect("read") == ours_bytes,
        "bytes Helia got from us differ"
    );
    let stats = node.bitswap_stats();
    println!("our bitswap: {stats:?}");
    drop(helia);
    rt.block_on(node.shutdown());
}
