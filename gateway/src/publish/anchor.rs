//! The anchor side: signing mappings of store paths this node has pinned into
//! the anchor's working set, and publishing that set as the next version of
//! its signed, hash-chained mapping set.
//!
//! Files under `<data-dir>/anchor/<key name>/`: `working.jsonl` (one
//! canonical mapping per line, what the next version will contain),
//! `published.header` (the signed header line of the last version written,
//! which the next version chains to) and, only while a publish is under
//! way, `pending.jsonl` (the whole signed set being published).
//!
//! Why publishing goes through `pending.jsonl`: two different signed sets
//! with one version are a fork, and every gateway that saw both records it
//! against the anchor. A publish therefore never signs a version it might
//! already have let out. Each step is an atomic replace (or a removal) with
//! the file and its directory synced, so the order below holds across a
//! power loss too, and the steps run in this order:
//!
//! 1. sign version N in memory, chained to the last version signed;
//! 2. write the signed bytes to `pending.jsonl`;
//! 3. write N's header line to `published.header`;
//! 4. write the same bytes to `out`;
//! 5. remove `pending.jsonl`.
//!
//! A crash before 2 leaves nothing on disk: the bytes never existed outside
//! the process, so the next run may sign another N. From 2 until 5 is done,
//! `pending.jsonl` holds N, and the next publish starts by finishing it:
//! it repeats steps 2–5 with exactly those bytes (each step is idempotent),
//! so N can only ever reach `out` as those bytes. It then returns N if N
//! already holds the working set and has not expired; otherwise it signs
//! N + 1 chained to N, as any publish would. After 5, `published.header`
//! holds N and the next version is N + 1. A temporary file an interrupted
//! atomic write leaves behind is never renamed into place or read.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anchor_registry::{
    AnchorName, ContentAddress, ContentId, ImportProfile, Mapping, MappingData, MappingSetBuilder,
    NarInfo, SecretKey, SetKind, SignedHeader,
};
use anyhow::{bail, Context, Result};

use crate::publish::pin::Pinner;
use crate::util::fs::{remove_durably, write_durably};

/// A key whose name cannot be used as a file or directory name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key name `{name}` cannot name a file: it must be a single path component, without `/` and neither `.` nor `..`")]
pub struct KeyNameError {
    pub name: String,
}

/// `name`, checked to be usable as one path component. Key names already
/// exclude `:`, whitespace and control characters (NUL among them); a path
/// also needs them free of `/` and other than `.` and `..`, or a key named
/// `../x` would write outside the directory meant for it.
pub fn key_file_name(name: &str) -> Result<&str, KeyNameError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(KeyNameError {
            name: name.to_owned(),
        });
    }
    Ok(name)
}

/// Where an anchor key's working files live: `<data-dir>/anchor/<key name>`.
pub fn anchor_dir(data_dir: &Path, key: &SecretKey) -> Result<PathBuf, KeyNameError> {
    Ok(data_dir.join("anchor").join(key_file_name(key.name())?))
}

/// The mapping an anchor signs for a path it has pinned under `cid`.
pub fn mapping_for(narinfo: &NarInfo, cid: &str, key: &SecretKey) -> Result<Mapping> {
    let data = MappingData {
        path: narinfo.store_path.clone(),
        nar_hash: narinfo.nar_hash,
        nar_size: narinfo.nar_size,
        references: narinfo.references.iter().cloned().collect(),
        deriver: narinfo.deriver.clone(),
        ca: narinfo
            .ca
            .as_deref()
            .map(ContentAddress::parse)
            .transpose()
            .context("the store reported an unusable content address")?,
        cid: ContentId::parse(cid).context("the node produced an unusable CID")?,
        profile: ImportProfile::unixfs_v1_2025(),
    };
    Ok(data.sign(key))
}

/// Reads the working set (empty when none yet).
pub fn read_working(dir: &Path) -> Result<Vec<Mapping>> {
    let path = dir.join("working.jsonl");
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("while opening {}", path.display())),
    };
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        let mapping = Mapping::parse_canonical(line.as_bytes(), &mut scratch)
            .with_context(|| format!("{} line {}: invalid mapping", path.display(), n + 1))?;
        out.push(mapping);
    }
    Ok(out)
}

/// Adds (or replaces, by store path) mappings in the working set.
pub fn add_to_working(dir: &Path, mappings: Vec<Mapping>) -> Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut by_hash = std::collections::BTreeMap::new();
    for m in read_working(dir)?.into_iter().chain(mappings) {
        by_hash.insert(*m.path().hash(), m);
    }
    let mut text = Vec::new();
    for m in by_hash.values() {
        text.extend_from_slice(m.to_canonical_string().as_bytes());
        text.push(b'\n');
    }
    crate::util::fs::write_atomically(&dir.join("working.jsonl"), &text)?;
    Ok(by_hash.len())
}

/// Pins store paths like [`Pinner::pin_store_paths`] and signs a mapping of
/// each into the working set of `key`'s anchor; returns the paths signed.
pub async fn sign(
    pinner: &Pinner,
    data_dir: &Path,
    paths: &[String],
    closure: bool,
    key: &SecretKey,
) -> Result<Vec<String>> {
    let dir = anchor_dir(data_dir, key)?;
    let mut mappings = Vec::new();
    let infos = crate::publish::pin::path_infos(paths, closure).await?;
    pinner.start_pinning(&infos);
    for info in infos {
        let pinned = pinner.pin_store_path(info.clone()).await?;
        mappings.push(mapping_for(&info, &pinned.cid, key)?);
    }
    let signed = mappings.iter().map(|m| m.path().to_string()).collect();
    add_to_working(&dir, mappings)?;
    Ok(signed)
}

/// The signed header line of the last version finished, if any.
const HEADER_FILE: &str = "published.header";
/// The whole signed set of a publish under way (see the module docs).
const PENDING_FILE: &str = "pending.jsonl";

/// Writes the next version of the anchor's set to `out`: every working
/// mapping, chained to the last version published from this directory.
/// A publish interrupted earlier is finished first, byte for byte; when
/// that version already holds the working set (and is unexpired) it is the
/// one written and returned (see the module docs).
pub fn publish(
    data_dir: &Path,
    key: &SecretKey,
    name: Option<&str>,
    kind: SetKind,
    expires_in: u64,
    out: &Path,
) -> Result<SignedHeader> {
    publish_with(data_dir, key, name, kind, expires_in, out, &mut |_| Ok(()))
}

/// The durable steps of a publish, in order; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// The signed set is in `pending.jsonl`.
    Pending,
    /// Its header line is in `published.header`.
    Header,
    /// The set is in `out`.
    Out,
    /// `pending.jsonl` is gone.
    Cleared,
}

/// A signed set that is not yet known to have reached `out`.
struct Pending {
    bytes: Vec<u8>,
    header: SignedHeader,
    entries: Vec<Mapping>,
}

/// [`publish`], calling `after` once each step is durable; an error from it
/// stops the publish right there, as a crash would (tests inject them).
fn publish_with(
    data_dir: &Path,
    key: &SecretKey,
    name: Option<&str>,
    kind: SetKind,
    expires_in: u64,
    out: &Path,
    after: &mut dyn FnMut(Step) -> Result<()>,
) -> Result<SignedHeader> {
    let dir = anchor_dir(data_dir, key)?;
    let mappings = read_working(&dir)?;
    let header_file = dir.join(HEADER_FILE);
    let pending_file = dir.join(PENDING_FILE);
    let previous = read_header(&header_file)?;
    let pending = read_pending(&pending_file, previous.as_ref(), key)?;
    if mappings.is_empty() && pending.is_none() {
        bail!(
            "nothing to publish: the working set of {} is empty (sign paths first)",
            key.name()
        );
    }
    let anchor = AnchorName::parse(name.unwrap_or(key.name()))
        .context("the anchor name (the key's name unless --name is given) is not valid")?;
    let last = pending.as_ref().map(|p| &p.header).or(previous.as_ref());
    if let Some(last) = last {
        if last.header().anchor != anchor || last.header().kind != kind {
            bail!(
                "{} was published as {} {}; use that name or a fresh data directory",
                key.name(),
                last.header().kind,
                last.header().anchor
            );
        }
    }
    let mut builder = match last {
        Some(last) => MappingSetBuilder::next_after(last),
        None => MappingSetBuilder::first(kind, anchor),
    };
    builder.extend(mappings);
    let now = crate::util::time::now()?;
    if let Some(pending) = pending {
        persist(&dir, &pending.bytes, &pending.header, out, after)?;
        let current = builder.iter().eq(pending.entries.iter());
        if current && pending.header.header().expires > now {
            return Ok(pending.header);
        }
        if builder.is_empty() {
            bail!(
                "nothing more to publish: finished the interrupted version {} of {}, and its working set is empty",
                pending.header.header().version,
                key.name()
            );
        }
    }
    let mut bytes = Vec::new();
    let header = builder.write(key, now, now.saturating_add(expires_in), &mut bytes)?;
    persist(&dir, &bytes, &header, out, after)?;
    std::io::stdout().flush()?;
    Ok(header)
}

/// Steps 2–5 of the module docs for one signed set. Repeating them with the
/// same bytes is harmless, which is how an interrupted publish is finished.
fn persist(
    dir: &Path,
    bytes: &[u8],
    header: &SignedHeader,
    out: &Path,
    after: &mut dyn FnMut(Step) -> Result<()>,
) -> Result<()> {
    let pending_file = dir.join(PENDING_FILE);
    write_durably(&pending_file, bytes)?;
    after(Step::Pending)?;
    let mut line = header.line().as_bytes().to_vec();
    if line.last() != Some(&b'\n') {
        line.push(b'\n');
    }
    write_durably(&dir.join(HEADER_FILE), &line)?;
    after(Step::Header)?;
    write_durably(out, bytes)?;
    after(Step::Out)?;
    remove_durably(&pending_file)?;
    after(Step::Cleared)?;
    Ok(())
}

/// The header of the last version finished, if any.
fn read_header(path: &Path) -> Result<Option<SignedHeader>> {
    match std::fs::read(path) {
        Ok(line) => Ok(Some(
            SignedHeader::parse(line.trim_ascii_end())
                .with_context(|| format!("corrupt {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("while reading {}", path.display())),
    }
}

/// The set of an interrupted publish, if any, checked to be one this key
/// signed as `previous` itself (interrupted after step 3) or as the version
/// right after it (interrupted before).
fn read_pending(
    path: &Path,
    previous: Option<&SignedHeader>,
    key: &SecretKey,
) -> Result<Option<Pending>, PendingError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PendingError::Unreadable {
                path: path.to_owned(),
                source,
            })
        }
    };
    let mut entries = Vec::new();
    let header = anchor_registry::read_set(&bytes[..], |m| entries.push(m)).map_err(|source| {
        PendingError::Invalid {
            path: path.to_owned(),
            source: Box::new(source),
        }
    })?;
    let h = header.header();
    let mismatch = |reason| PendingError::Mismatch {
        path: path.to_owned(),
        version: h.version,
        reason,
    };
    if h.key != key.public() {
        return Err(mismatch(format!(
            "it is signed by {}, not {}",
            h.key,
            key.public()
        )));
    }
    let follows = match previous {
        None => h.version == 1,
        Some(p) => {
            *p == header || (h.version == p.header().version + 1 && h.previous == Some(*p.digest()))
        }
    };
    if !follows {
        return Err(mismatch(match previous {
            None => "no version was published before it".to_owned(),
            Some(p) => format!(
                "it neither is nor follows version {} in {HEADER_FILE}",
                p.header().version
            ),
        }));
    }
    Ok(Some(Pending {
        bytes,
        header,
        entries,
    }))
}

/// Why the set of an interrupted publish cannot be finished. It is never
/// replaced silently: it may already be out, and signing another set with
/// its version would be a fork.
#[derive(Debug, thiserror::Error)]
pub enum PendingError {
    #[error("cannot read the interrupted publish in {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the interrupted publish in {} is not a valid signed set: {source}", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: Box<anchor_registry::SetError>,
    },
    #[error("the interrupted publish in {} (version {version}) does not belong here: {reason}; if that version never left this machine, remove the file", path.display())]
    Mismatch {
        path: PathBuf,
        version: u64,
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use anchor_registry::testing::{key, mapping};
    use anchor_registry::StorePath;

    use super::*;

    const STEPS: [Step; 4] = [Step::Pending, Step::Header, Step::Out, Step::Cleared];

    /// A distinct valid store path per `n` (below 32).
    fn store_path(n: usize) -> StorePath {
        const NIX32: &str = "0123456789abcdfghijklmnpqrsvwxyz";
        let c = &NIX32[n..=n];
        StorePath::parse(&format!(
            "/nix/store/{c}a6626fva3fhh8mbc88bv9z4aa4agqch-p{n}"
        ))
        .unwrap()
    }

    /// An anchor's data directory, a working set of `paths` mappings, and
    /// numbered `out` files so every set a publish writes stays inspectable.
    struct World {
        tmp: tempfile::TempDir,
        key: SecretKey,
        paths: usize,
        outs: usize,
        /// Every signed set seen on disk, by version, with its bytes.
        seen: BTreeMap<u64, (Vec<u8>, SignedHeader)>,
    }

    impl World {
        fn new(key: SecretKey) -> Self {
            Self {
                tmp: tempfile::tempdir().unwrap(),
                key,
                paths: 0,
                outs: 0,
                seen: BTreeMap::new(),
            }
        }

        fn data_dir(&self) -> PathBuf {
            self.tmp.path().join("data")
        }

        fn dir(&self) -> PathBuf {
            anchor_dir(&self.data_dir(), &self.key).unwrap()
        }

        fn sign_one_more(&mut self) {
            let m = mapping(&self.key, store_path(self.paths), &[self.paths as u8]);
            self.paths += 1;
            add_to_working(&self.dir(), vec![m]).unwrap();
        }

        /// One publish run to a fresh `out`, failing after `crash` as a
        /// crash would; then checks every file on disk.
        fn publish(&mut self, expires_in: u64, crash: Option<Step>) -> Result<SignedHeader> {
            self.outs += 1;
            let out = self.tmp.path().join(format!("out-{}.jsonl", self.outs));
            let result = publish_with(
                &self.data_dir(),
                &self.key,
                None,
                SetKind::Anchor,
                expires_in,
                &out,
                &mut |step| match crash {
                    Some(at) if at == step => bail!("crash after {step:?}"),
                    _ => Ok(()),
                },
            );
            self.observe();
            result
        }

        /// Records every set file present; any two with one version must be
        /// byte-identical, and `published.header` must be one of them.
        fn observe(&mut self) {
            let mut files = vec![self.dir().join(PENDING_FILE)];
            files.extend((1..=self.outs).map(|n| self.tmp.path().join(format!("out-{n}.jsonl"))));
            for file in files {
                let Ok(bytes) = std::fs::read(&file) else {
                    continue;
                };
                let header = anchor_registry::read_set(&bytes[..], |_| {}).unwrap();
                let version = header.header().version;
                match self.seen.get(&version) {
                    Some((earlier, _)) => assert!(
                        *earlier == bytes,
                        "fork: two different sets with version {version} ({})",
                        file.display()
                    ),
                    None => {
                        self.seen.insert(version, (bytes, header));
                    }
                }
            }
            if let Some(header) = read_header(&self.dir().join(HEADER_FILE)).unwrap() {
                let (_, set) = &self.seen[&header.header().version];
                assert_eq!(
                    *set, header,
                    "published.header is not the set of its version"
                );
            }
        }

        /// The versions seen run 1, 2, … each chained to the one before.
        fn assert_one_chain(&self) {
            let mut previous: Option<&SignedHeader> = None;
            for (n, (version, (_, header))) in self.seen.iter().enumerate() {
                assert_eq!(
                    *version,
                    n as u64 + 1,
                    "versions skip: {:?}",
                    self.seen.keys()
                );
                assert_eq!(header.header().previous, previous.map(|p| *p.digest()));
                previous = Some(header);
            }
        }

        fn newest(&self) -> &SignedHeader {
            &self.seen.values().next_back().unwrap().1
        }
    }

    #[test]
    fn a_crash_after_any_step_never_forks_a_version() {
        for first in STEPS {
            for second in [
                None,
                Some(Step::Pending),
                Some(Step::Header),
                Some(Step::Out),
            ] {
                for grow_before_rerun in [false, true] {
                    let mut w = World::new(key("alpha-1"));
                    w.sign_one_more();
                    w.publish(3600, None).unwrap();
                    w.sign_one_more();
                    w.publish(3600, Some(first)).unwrap_err();
                    if grow_before_rerun {
                        w.sign_one_more();
                    }
                    // Another expiry makes a freshly signed set differ from
                    // the interrupted one: re-signing would show as a fork.
                    if second.is_some() {
                        let _ = w.publish(7200, second);
                    }
                    let rerun = w.publish(10800, None).unwrap();
                    assert_eq!(&rerun, w.newest(), "{first:?} then {second:?}");
                    assert!(
                        !w.dir().join(PENDING_FILE).exists(),
                        "a finished publish leaves no pending set"
                    );
                    if first != Step::Cleared && !grow_before_rerun {
                        assert_eq!(
                            rerun.header().version,
                            2,
                            "the interrupted version is finished"
                        );
                    }
                    w.sign_one_more();
                    let next = w.publish(3600, None).unwrap();
                    assert_eq!(next.header().version, rerun.header().version + 1);
                    assert_eq!(next.header().previous, Some(*rerun.digest()));
                    assert_eq!(next.header().count, w.paths as u64);
                    w.assert_one_chain();
                }
            }
        }
    }

    #[test]
    fn a_finished_interrupted_publish_is_written_to_the_new_out() {
        let mut w = World::new(key("alpha-1"));
        w.sign_one_more();
        w.publish(3600, Some(Step::Pending)).unwrap_err();
        let pending = std::fs::read(w.dir().join(PENDING_FILE)).unwrap();
        let header = w.publish(7200, None).unwrap();
        assert_eq!(header.header().version, 1);
        let out = w.tmp.path().join(format!("out-{}.jsonl", w.outs));
        assert_eq!(std::fs::read(out).unwrap(), pending);
    }

    #[test]
    fn an_expired_interrupted_publish_is_finished_then_superseded() {
        let mut w = World::new(key("alpha-1"));
        w.sign_one_more();
        w.publish(0, Some(Step::Header)).unwrap_err();
        let header = w.publish(3600, None).unwrap();
        assert_eq!(header.header().version, 2);
        assert_eq!(header.header().previous, Some(*w.seen[&1].1.digest()));
        w.assert_one_chain();
    }

    #[test]
    fn a_pending_set_signed_by_another_key_is_refused() {
        let mut w = World::new(SecretKey::from_seed("alpha-1", [1; 32]).unwrap());
        w.sign_one_more();
        w.publish(3600, Some(Step::Pending)).unwrap_err();
        w.key = SecretKey::from_seed("alpha-1", [2; 32]).unwrap();
        let err = w.publish(3600, None).unwrap_err();
        assert!(
            matches!(
                err.downcast_ref(),
                Some(PendingError::Mismatch { version: 1, .. })
            ),
            "{err:#}"
        );
        assert!(err.to_string().contains("signed by"), "{err}");
    }

    #[test]
    fn a_pending_set_that_does_not_follow_the_header_is_refused() {
        let mut w = World::new(key("alpha-1"));
        w.sign_one_more();
        w.publish(3600, Some(Step::Out)).unwrap_err();
        let stale = std::fs::read(w.dir().join(PENDING_FILE)).unwrap();
        w.publish(3600, None).unwrap();
        w.sign_one_more();
        w.publish(3600, None).unwrap();
        std::fs::write(w.dir().join(PENDING_FILE), stale).unwrap();
        let err = w.publish(3600, None).unwrap_err();
        assert!(
            matches!(
                err.downcast_ref(),
                Some(PendingError::Mismatch { version: 1, .. })
            ),
            "{err:#}"
        );
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn a_damaged_pending_set_is_refused_not_replaced() {
        let mut w = World::new(key("alpha-1"));
        w.sign_one_more();
        let pending = w.dir().join(PENDING_FILE);
        std::fs::write(&pending, b"not a set\n").unwrap();
        let out = w.tmp.path().join("out.jsonl");
        let err = publish(&w.data_dir(), &w.key, None, SetKind::Anchor, 60, &out).unwrap_err();
        assert!(
            matches!(err.downcast_ref(), Some(PendingError::Invalid { .. })),
            "{err:#}"
        );
        assert!(!out.exists(), "nothing was published");
        assert_eq!(std::fs::read(&pending).unwrap(), b"not a set\n");
    }

    #[test]
    fn key_names_that_are_not_one_path_component_are_refused() {
        let data = Path::new("/data");
        for name in ["../x", "a/b", "/abs", ".", "..", "x/"] {
            let key = SecretKey::from_seed(name, [3; 32]).expect("a valid key name");
            let err = anchor_dir(data, &key).unwrap_err();
            assert_eq!(err.name, name);
            let text = err.to_string();
            assert!(text.contains(&format!("`{name}`")), "{text}");
            assert!(text.contains("single path component"), "{text}");
        }
    }

    #[test]
    fn ordinary_key_names_name_their_directory() {
        let key = key("cache.example.org-1");
        let dir = anchor_dir(Path::new("/data"), &key).unwrap();
        assert_eq!(dir, Path::new("/data/anchor/cache.example.org-1"));
        assert_eq!(key_file_name("..hidden-1"), Ok("..hidden-1"));
    }

    #[test]
    fn publishing_under_a_bad_key_name_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let key = SecretKey::from_seed("../escape", [4; 32]).unwrap();
        let out = tmp.path().join("out.jsonl");
        let err = publish(tmp.path(), &key, Some("ok"), SetKind::Anchor, 60, &out).unwrap_err();
        assert!(err.downcast_ref::<KeyNameError>().is_some(), "{err:#}");
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
