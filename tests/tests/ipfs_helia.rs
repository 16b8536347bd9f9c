//! Our `unixfs-v1-2025` root CIDs equal real Helia's (its importer defaults
//! are that profile) for edge sizes and a file over 1 GiB, where the DAG
//! needs a second level (width 1024). Data is generated on the fly and
//! streamed to both sides; neither holds a whole file in memory.

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

use e2e::peers::{helia_hash, peers_dir};
use gateway::ipfs::dag;
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
fn root_cids_equal_helias_for_edge_sizes_and_over_1_gib() {
    let Some(peers) = peers_dir() else { return };
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
