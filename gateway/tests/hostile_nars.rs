//! 100,000 random, truncated and mutated NARs: the strict parser returns an
//! error or a summary whose hash is that of the bytes, never a panic.

// Test fixtures built from constants: a failure is a bug in the test itself.
#![allow(clippy::unwrap_used)]

use gateway::store::nar;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn sample_nar() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("t");
    std::fs::create_dir_all(root.join("d/e")).unwrap();
    std::fs::write(root.join("d/file"), b"contents").unwrap();
    std::fs::write(root.join("d/e/x"), vec![1u8; 300]).unwrap();
    std::os::unix::fs::symlink("d/file", root.join("link")).unwrap();
    let mut out = Vec::new();
    nar::dump(&root, &mut out).unwrap();
    out
}

#[test]
fn hundred_thousand_hostile_nars_never_panic() {
    let valid = sample_nar();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut accepted = 0;
    for _ in 0..100_000 {
        let input: Vec<u8> = match rng.below(3) {
            0 => (0..rng.below(600)).map(|_| rng.next() as u8).collect(),
            1 => valid[..rng.below(valid.len() + 1)].to_vec(),
            _ => {
                let mut v = valid.clone();
                for _ in 0..=rng.below(3) {
                    let i = rng.below(v.len());
                    v[i] = rng.next() as u8;
                }
                v
            }
        };
        if let Ok(summary) = nar::validate(&input[..]) {
            accepted += 1;
            assert_eq!(summary.nar_size, input.len() as u64);
            assert_eq!(
                summary.nar_hash,
                anchor_registry::NarHash::digest(&input),
                "an accepted NAR's hash is the hash of its bytes"
            );
        }
    }
    assert!(accepted > 0, "the full sample itself must validate");
}
