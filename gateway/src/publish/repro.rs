//! Reproducibility verdicts: what a rebuilder concluded about each path it
//! rebuilt (persisted in `<data-dir>/repro.json`), and the per-path report a
//! gateway builds from claims, registry anchors' signed mappings and those
//! records. Pure decisions here; I/O only in [`RecordStore`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anchor_registry::{
    Assertion, Mapping, NarHash, PublicKey, Registry, SetKind, StorePath, Vouch,
};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::claims::Claim;
use crate::nix::build::Mode;

/// What the evidence says about one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Independent builds agree: `matches` other builders (for a rebuild
    /// record) or registry anchors (for a gateway report) got the same NarHash.
    Reproduced { matches: usize },
    /// Builds disagree: every NarHash seen, the reference one first.
    Differs { nar_hashes: Vec<NarHash> },
    /// Nothing to compare with, or no build to compare.
    NotChecked { reason: String },
}

impl Verdict {
    fn not_checked(reason: &str) -> Self {
        Verdict::NotChecked {
            reason: reason.to_owned(),
        }
    }
}

/// Someone else's signed statement about a path, as a rebuilder compared it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Party {
    pub kind: SetKind,
    /// The signing key's name.
    pub signer: String,
    pub nar_hash: NarHash,
    pub mapping: Mapping,
}

/// This build's result, signed by the rebuilder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnResult {
    pub nar_hash: NarHash,
    pub nar_size: u64,
    /// Where the bytes were: the output, or `<output>.check`.
    pub built_at: PathBuf,
    pub cid: String,
    /// The rebuilder's signed mapping: evidence whether or not it went into
    /// the working set.
    pub mapping: Mapping,
}

/// One path's rebuild, as the rebuilder concluded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildRecord {
    pub store_path: StorePath,
    pub derivation: String,
    pub key: PublicKey,
    /// Unix seconds.
    pub at: u64,
    pub mode: Mode,
    /// `None` when nothing was built (see the verdict's reason).
    pub result: Option<OwnResult>,
    pub agreeing: Vec<Party>,
    pub disagreeing: Vec<Party>,
    /// Whether the mapping went into the anchor's working set.
    pub signed: bool,
    pub verdict: Verdict,
}

/// Compares our NarHash with everyone else's statements about the path.
/// Our own earlier mappings (they verify under `own`) are skipped; anchor
/// mappings count only from registry anchors, for the set's owner under its
/// registry key; claims count as they are (their signatures were checked on
/// import). A differing claim does not
/// outweigh a match (anyone can claim anything); a differing anchor does.
pub fn judge(
    ours: &NarHash,
    own: &PublicKey,
    assertions: &[Assertion],
    registry: Option<&Registry>,
) -> (Vec<Party>, Vec<Party>, Verdict) {
    let mut agreeing = Vec::new();
    let mut disagreeing = Vec::new();
    for assertion in assertions {
        let mapping = &assertion.mapping;
        if mapping.verify(own).is_ok() {
            continue;
        }
        if assertion.kind == SetKind::Anchor {
            let counted = registry
                .and_then(|r| r.anchor(&assertion.owner))
                .is_some_and(|a| a.key == assertion.key && mapping.verify(&a.key).is_ok());
            if !counted {
                continue;
            }
        }
        let party = Party {
            kind: assertion.kind,
            signer: mapping.signature().name().to_owned(),
            nar_hash: *mapping.nar_hash(),
            mapping: mapping.clone(),
        };
        if party.nar_hash == *ours {
            agreeing.push(party);
        } else {
            disagreeing.push(party);
        }
    }
    let anchor_differs = disagreeing.iter().any(|p| p.kind == SetKind::Anchor);
    let verdict = if !agreeing.is_empty() && !anchor_differs {
        Verdict::Reproduced {
            matches: agreeing.len(),
        }
    } else if !disagreeing.is_empty() {
        let mut nar_hashes = vec![*ours];
        for p in &disagreeing {
            if !nar_hashes.contains(&p.nar_hash) {
                nar_hashes.push(p.nar_hash);
            }
        }
        Verdict::Differs { nar_hashes }
    } else {
        Verdict::not_checked("nobody else claimed or signed this path yet")
    };
    (agreeing, disagreeing, verdict)
}

/// One path as `nixpfs repro` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathReport {
    pub store_path: String,
    pub claims: Vec<Claim>,
    /// Registry anchors on the leading NarHash (the one most anchors signed).
    pub agreeing: Vec<Vouch>,
    /// Registry anchors that signed another NarHash.
    pub disagreeing: Vec<Vouch>,
    pub verdict: Verdict,
    /// This node's own rebuild of the path, if it did one.
    pub rebuilt: Option<RebuildRecord>,
}

/// Builds a path's report. Anchors decide the verdict: two or more on one
/// NarHash with none elsewhere is reproduced, any split differs; with fewer
/// than two anchors this node's own rebuild verdict stands, if any.
pub fn report(
    store_path: String,
    claims: Vec<Claim>,
    vouches: Vec<Vouch>,
    rebuilt: Option<RebuildRecord>,
) -> PathReport {
    let mut by_hash: BTreeMap<NarHash, Vec<Vouch>> = BTreeMap::new();
    for vouch in vouches {
        by_hash
            .entry(*vouch.mapping.nar_hash())
            .or_default()
            .push(vouch);
    }
    let ours = rebuilt
        .as_ref()
        .and_then(|r| r.result.as_ref())
        .map(|r| r.nar_hash);
    let claimed = |hash: &NarHash| claims.iter().filter(|c| c.nar_hash == *hash).count();
    let leading = by_hash
        .iter()
        .max_by_key(|(hash, anchors)| {
            (
                anchors.len(),
                ours == Some(**hash),
                claimed(hash),
                std::cmp::Reverse(**hash),
            )
        })
        .map(|(hash, _)| *hash);
    let mut agreeing = Vec::new();
    let mut disagreeing = Vec::new();
    let mut nar_hashes: Vec<NarHash> = leading.into_iter().collect();
    for (hash, anchors) in by_hash {
        if Some(hash) == leading {
            agreeing = anchors;
        } else {
            nar_hashes.push(hash);
            disagreeing.extend(anchors);
        }
    }
    let verdict = if !disagreeing.is_empty() {
        Verdict::Differs { nar_hashes }
    } else if agreeing.len() >= 2 {
        Verdict::Reproduced {
            matches: agreeing.len(),
        }
    } else if let Some(record) = &rebuilt {
        record.verdict.clone()
    } else if agreeing.is_empty() {
        Verdict::not_checked("no registry anchor signed it")
    } else {
        Verdict::not_checked("only one registry anchor signed it")
    };
    PathReport {
        store_path,
        claims,
        agreeing,
        disagreeing,
        verdict,
        rebuilt,
    }
}

/// How many reported paths have each verdict (`nixpfs status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReproCounts {
    pub paths: usize,
    pub reproduced: usize,
    pub differs: usize,
    pub not_checked: usize,
}

impl ReproCounts {
    pub fn of(reports: &[PathReport]) -> Self {
        let mut counts = Self {
            paths: reports.len(),
            ..Self::default()
        };
        for r in reports {
            match r.verdict {
                Verdict::Reproduced { .. } => counts.reproduced += 1,
                Verdict::Differs { .. } => counts.differs += 1,
                Verdict::NotChecked { .. } => counts.not_checked += 1,
            }
        }
        counts
    }
}

/// The rebuild records of a data directory: one JSON document, the newest
/// record per store path, replaced atomically.
#[derive(Debug, Clone)]
pub struct RecordStore {
    file: PathBuf,
}

impl RecordStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            file: data_dir.join("repro.json"),
        }
    }

    /// Every record, by store path.
    pub fn load(&self) -> Result<BTreeMap<String, RebuildRecord>> {
        match std::fs::read(&self.file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("corrupt rebuild records in {}", self.file.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e).with_context(|| format!("while reading {}", self.file.display())),
        }
    }

    /// Adds or replaces records (by store path).
    pub fn save(&self, records: &[RebuildRecord]) -> Result<()> {
        let mut all = self.load()?;
        for r in records {
            all.insert(r.store_path.to_string(), r.clone());
        }
        crate::util::fs::write_atomically(&self.file, &serde_json::to_vec_pretty(&all)?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anchor_registry::{AnchorName, SecretKey};

    fn key(name: &str) -> SecretKey {
        SecretKey::from_seed(name, [name.len() as u8; 32]).unwrap()
    }

    fn path() -> StorePath {
        StorePath::parse("/nix/store/q0qjd0ilw9h0qfszb204zvpinvhbkprw-nondet").unwrap()
    }

    fn mapping(signer: &SecretKey, nar: &[u8]) -> Mapping {
        anchor_registry::testing::mapping(signer, path(), nar)
    }

    fn assertion(kind: SetKind, signer: &SecretKey, nar: &[u8]) -> Assertion {
        Assertion {
            kind,
            owner: AnchorName::parse(signer.name()).unwrap(),
            key: signer.public(),
            mapping: mapping(signer, nar),
        }
    }

    fn registry(anchors: &[&SecretKey]) -> Registry {
        anchor_registry::testing::one_root_registry(
            anchors
                .iter()
                .map(|a| anchor_registry::testing::anchor(a, a.name(), &["/srv/set.jsonl"])),
            4_000_000_000,
        )
    }

    fn vouch(signer: &SecretKey, nar: &[u8]) -> Vouch {
        Vouch {
            anchor: AnchorName::parse(signer.name()).unwrap(),
            key: signer.public(),
            mapping: mapping(signer, nar),
        }
    }

    #[test]
    fn matching_a_claim_is_reproduced_with_one_match() {
        let me = key("me-1");
        let (_, _, verdict) = judge(
            &NarHash::digest(b"nar"),
            &me.public(),
            &[assertion(SetKind::Claims, &key("alice-1"), b"nar")],
            None,
        );
        assert_eq!(verdict, Verdict::Reproduced { matches: 1 });
    }

    #[test]
    fn a_differing_result_reports_both_nar_hashes() {
        let me = key("me-1");
        let (agreeing, disagreeing, verdict) = judge(
            &NarHash::digest(b"mine"),
            &me.public(),
            &[assertion(SetKind::Claims, &key("alice-1"), b"theirs")],
            None,
        );
        assert!(agreeing.is_empty());
        assert_eq!(disagreeing.len(), 1);
        assert_eq!(
            verdict,
            Verdict::Differs {
                nar_hashes: vec![NarHash::digest(b"mine"), NarHash::digest(b"theirs")]
            }
        );
    }

    #[test]
    fn bad_claims_do_not_outweigh_a_match_but_a_differing_anchor_does() {
        let me = key("me-1");
        let anchor = key("anchor-b");
        let reg = registry(&[&anchor]);
        let mut assertions: Vec<Assertion> = (0..5)
            .map(|i| assertion(SetKind::Claims, &key(&format!("sock{i}-1")), b"forged"))
            .collect();
        assertions.push(assertion(SetKind::Claims, &key("alice-1"), b"nar"));
        let (_, _, verdict) = judge(
            &NarHash::digest(b"nar"),
            &me.public(),
            &assertions,
            Some(&reg),
        );
        assert_eq!(verdict, Verdict::Reproduced { matches: 1 });
        assertions.push(assertion(SetKind::Anchor, &anchor, b"other"));
        let (_, _, verdict) = judge(
            &NarHash::digest(b"nar"),
            &me.public(),
            &assertions,
            Some(&reg),
        );
        assert!(matches!(verdict, Verdict::Differs { .. }), "{verdict:?}");
    }

    #[test]
    fn own_mappings_and_anchors_outside_the_registry_are_ignored() {
        let me = key("me-1");
        let (agreeing, disagreeing, verdict) = judge(
            &NarHash::digest(b"nar"),
            &me.public(),
            &[
                assertion(SetKind::Anchor, &me, b"nar"),
                assertion(SetKind::Anchor, &key("stranger-1"), b"nar"),
            ],
            Some(&registry(&[])),
        );
        assert!(agreeing.is_empty() && disagreeing.is_empty());
        assert!(matches!(verdict, Verdict::NotChecked { .. }));
    }

    #[test]
    fn report_splits_anchors_by_nar_hash() {
        let (a, b, c) = (key("a-1"), key("b-1"), key("c-1"));
        let agreed = report(
            path().to_string(),
            Vec::new(),
            vec![vouch(&a, b"nar"), vouch(&b, b"nar")],
            None,
        );
        assert_eq!(agreed.verdict, Verdict::Reproduced { matches: 2 });
        let split = report(
            path().to_string(),
            Vec::new(),
            vec![vouch(&a, b"one"), vouch(&b, b"two"), vouch(&c, b"two")],
            None,
        );
        assert_eq!(split.agreeing.len(), 2);
        assert_eq!(split.disagreeing.len(), 1);
        assert_eq!(
            split.verdict,
            Verdict::Differs {
                nar_hashes: vec![NarHash::digest(b"two"), NarHash::digest(b"one")]
            }
        );
        let lonely = report(path().to_string(), Vec::new(), vec![vouch(&a, b"x")], None);
        assert!(matches!(lonely.verdict, Verdict::NotChecked { .. }));
        let counts = ReproCounts::of(&[agreed, split, lonely]);
        assert_eq!(
            (
                counts.paths,
                counts.reproduced,
                counts.differs,
                counts.not_checked
            ),
            (3, 1, 1, 1)
        );
    }

    #[test]
    fn records_round_trip_through_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::new(dir.path());
        assert!(store.load().unwrap().is_empty());
        let me = key("me-1");
        let record = RebuildRecord {
            store_path: path(),
            derivation: "/nix/store/v73qyz82r620bqm2l7yb0fgd6lvfmd5r-nondet.drv".to_owned(),
            key: me.public(),
            at: 1,
            mode: Mode::Checked,
            result: Some(OwnResult {
                nar_hash: NarHash::digest(b"nar"),
                nar_size: 3,
                built_at: PathBuf::from(format!("{}.check", path())),
                cid: "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku".to_owned(),
                mapping: mapping(&me, b"nar"),
            }),
            agreeing: Vec::new(),
            disagreeing: Vec::new(),
            signed: true,
            verdict: Verdict::not_checked("alone"),
        };
        store.save(std::slice::from_ref(&record)).unwrap();
        store.save(std::slice::from_ref(&record)).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[&path().to_string()], record);
    }
}
