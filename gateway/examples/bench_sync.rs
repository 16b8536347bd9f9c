//! Benchmark for `scripts/bench`: `gen N DIR` writes a signed mapping set of N
//! entries and its registry into DIR; `run DIR` (a fresh process, so peak RSS
//! is its own) times what `nixpfs anchors sync` does with it — verify and
//! index — then looks up 100,000 of its paths as a narinfo request would, and
//! prints `seconds peak_rss_kib set_file microseconds_per_lookup`.

use std::io::Write;
use std::time::Instant;

use anchor_registry::{
    Anchor, AnchorName, ContentId, ImportProfile, MappingData, MappingSetBuilder, NarHash,
    Registry, SecretKey, SetKind, Source, StorePath, StorePathHash,
};
use gateway::store::index::Index;

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["gen", n, dir] => generate(n.parse()?, std::path::Path::new(dir)),
        ["run", dir] => run(std::path::Path::new(dir)),
        _ => anyhow::bail!("usage: bench_sync gen N DIR | bench_sync run DIR"),
    }
}

fn generate(n: u64, dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let key = SecretKey::generate("bench-anchor")?;
    let name = AnchorName::parse("bench-anchor")?;
    let cid = ContentId::parse("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")?;

    let set_path = dir.join("set.jsonl");
    let mut builder = MappingSetBuilder::first(SetKind::Anchor, name.clone());
    for i in 0..n {
        let mut digest = [0u8; 20];
        digest[..8].copy_from_slice(&i.to_le_bytes());
        let hash = StorePathHash::from_digest(digest);
        let path = StorePath::from_parts(hash, &format!("pkg-{i}"))?;
        let data = MappingData {
            path,
            nar_hash: NarHash::digest(&i.to_le_bytes()),
            nar_size: 1000 + i,
            references: Default::default(),
            deriver: None,
            ca: None,
            cid,
            profile: ImportProfile::unixfs_v1_2025(),
        };
        builder.insert(data.sign(&key));
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(&set_path)?);
    builder.write(&key, 1, u64::from(u32::MAX), &mut out)?;
    out.flush()?;
    drop(out);
    drop(builder);

    let mut registry = Registry::init(vec![key.public()], 1, u64::from(u32::MAX))?;
    registry.add_anchor(Anchor {
        key: key.public(),
        name,
        note: None,
        sources: vec![Source::parse(&set_path.display().to_string())?],
    })?;
    registry.sign(&key);
    std::fs::write(dir.join("registry.json"), registry.render())?;
    Ok(())
}

fn run(dir: &std::path::Path) -> anyhow::Result<()> {
    let set_path = dir.join("set.jsonl");
    let registry = Registry::parse(&std::fs::read_to_string(dir.join("registry.json"))?)?;
    let _ = std::fs::remove_file(dir.join("index.redb"));
    let index = Index::open(&dir.join("index.redb"))?;
    let started = Instant::now();
    let file = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&set_path)?);
    let outcome = gateway::trust::sync::verify_and_index(
        &index,
        &registry,
        SetKind::Anchor,
        "bench-anchor",
        file,
    )?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!("{outcome:?}");
    let entries = match outcome {
        gateway::trust::sync::Indexed::Accepted { entries, .. } => entries,
        gateway::trust::sync::Indexed::Unchanged { .. } => {
            anyhow::bail!("a fresh index held the set")
        }
    };
    const LOOKUPS: u64 = 100_000;
    let started = Instant::now();
    for n in 0..LOOKUPS {
        // Spread over the whole set, in no useful order for the page cache.
        let i = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % entries;
        let mut digest = [0u8; 20];
        digest[..8].copy_from_slice(&i.to_le_bytes());
        let found = index.assertions(&StorePathHash::from_digest(digest), 2)?;
        anyhow::ensure!(found.len() == 1, "path {i} not found");
    }
    let lookup_us = started.elapsed().as_secs_f64() * 1e6 / LOOKUPS as f64;
    println!(
        "{secs:.3} {} {} {lookup_us:.1}",
        peak_rss_kib(),
        set_path.display()
    );
    Ok(())
}
