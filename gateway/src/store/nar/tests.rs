//! Round trips through real directories, and properties of dump, parse,
//! validate and restore together, checked against an independent model.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use anchor_registry::NarHash;
use proptest::prelude::*;

use super::*;

/// A filesystem tree as NAR sees it; directories keep entries in byte order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tree {
    File { executable: bool, contents: Vec<u8> },
    Link(Vec<u8>),
    Dir(BTreeMap<Vec<u8>, Tree>),
}

/// One NAR string (length, bytes, zero padding), written straight from the
/// format description rather than through the encoder.
pub(super) fn s(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(bytes);
    out.resize(out.len().next_multiple_of(8), 0);
    out
}

/// The NAR of `tree`, written straight from the format description.
fn model_nar(tree: &Tree) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend(s(bytes));
    }
    fn node(out: &mut Vec<u8>, tree: &Tree) {
        put(out, b"(");
        put(out, b"type");
        match tree {
            Tree::File {
                executable,
                contents,
            } => {
                put(out, b"regular");
                if *executable {
                    put(out, b"executable");
                    put(out, b"");
                }
                put(out, b"contents");
                put(out, contents);
            }
            Tree::Link(target) => {
                put(out, b"symlink");
                put(out, b"target");
                put(out, target);
            }
            Tree::Dir(entries) => {
                put(out, b"directory");
                for (name, child) in entries {
                    put(out, b"entry");
                    put(out, b"(");
                    put(out, b"name");
                    put(out, name);
                    put(out, b"node");
                    node(out, child);
                    put(out, b")");
                }
            }
        }
        put(out, b")");
    }
    let mut out = Vec::new();
    put(&mut out, b"nix-archive-1");
    node(&mut out, tree);
    out
}

fn build(path: &Path, tree: &Tree) {
    match tree {
        Tree::File {
            executable,
            contents,
        } => {
            fs::write(path, contents).expect("write");
            let mode = if *executable { 0o700 } else { 0o600 };
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
        }
        Tree::Link(target) => symlink(OsStr::from_bytes(target), path).expect("symlink"),
        Tree::Dir(entries) => {
            fs::create_dir(path).expect("mkdir");
            for (name, child) in entries {
                build(&path.join(OsStr::from_bytes(name)), child);
            }
        }
    }
}

/// Rebuilds the tree from parser events, to check what `parse` reports.
type NamedDir = (Option<Vec<u8>>, BTreeMap<Vec<u8>, Tree>);

#[derive(Default)]
struct Collect {
    stack: Vec<NamedDir>,
    file: Option<(Option<Vec<u8>>, bool, Vec<u8>)>,
    root: Option<Tree>,
}

impl Collect {
    fn finish(&mut self, name: Option<Vec<u8>>, tree: Tree) {
        match (name, self.stack.last_mut()) {
            (Some(name), Some((_, entries))) => {
                entries.insert(name, tree);
            }
            _ => self.root = Some(tree),
        }
    }
}

impl NarSink for Collect {
    fn directory(&mut self, name: Option<&[u8]>) -> Result<(), NarError> {
        self.stack.push((name.map(<[u8]>::to_vec), BTreeMap::new()));
        Ok(())
    }
    fn end_directory(&mut self) -> Result<(), NarError> {
        let (name, entries) = self.stack.pop().expect("open directory");
        self.finish(name, Tree::Dir(entries));
        Ok(())
    }
    fn regular(&mut self, name: Option<&[u8]>, executable: bool, _: u64) -> Result<(), NarError> {
        self.file = Some((name.map(<[u8]>::to_vec), executable, Vec::new()));
        Ok(())
    }
    fn contents(&mut self, chunk: &[u8]) -> Result<(), NarError> {
        self.file
            .as_mut()
            .expect("open file")
            .2
            .extend_from_slice(chunk);
        Ok(())
    }
    fn end_regular(&mut self) -> Result<(), NarError> {
        let (name, executable, contents) = self.file.take().expect("open file");
        self.finish(
            name,
            Tree::File {
                executable,
                contents,
            },
        );
        Ok(())
    }
    fn symlink(&mut self, name: Option<&[u8]>, target: &[u8]) -> Result<(), NarError> {
        self.finish(name.map(<[u8]>::to_vec), Tree::Link(target.to_vec()));
        Ok(())
    }
}

fn dump_bytes(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    dump(path, &mut out).expect("dump");
    out
}

fn sha256(bytes: &[u8]) -> NarHash {
    NarHash::digest(bytes)
}

/// dump → restore → dump must give the same bytes, and every way of hashing
/// must agree with sha256 of those bytes.
fn assert_round_trip(src: &Path) -> Vec<u8> {
    let nar = dump_bytes(src);
    let expected = NarSummary {
        nar_hash: sha256(&nar),
        nar_size: nar.len() as u64,
    };
    assert_eq!(validate(nar.as_slice()).expect("validate"), expected);
    assert_eq!(hash_path(src).expect("hash_path"), expected);
    let scratch = tempfile::tempdir().expect("tempdir");
    let dest = scratch.path().join("restored");
    assert_eq!(restore(nar.as_slice(), &dest).expect("restore"), expected);
    assert_eq!(dump_bytes(&dest), nar);
    nar
}

fn file(contents: &[u8]) -> Tree {
    Tree::File {
        executable: false,
        contents: contents.to_vec(),
    }
}

fn sample_tree() -> Tree {
    let mut nested = BTreeMap::new();
    nested.insert(b"deep".to_vec(), Tree::Dir(BTreeMap::new()));
    nested.insert(b"data".to_vec(), file(&vec![0xa5; 3 * CHUNK + 5]));
    let mut root = BTreeMap::new();
    root.insert(b"hello".to_vec(), file(b"hello\n"));
    root.insert(b"empty".to_vec(), file(b""));
    root.insert(
        b"run".to_vec(),
        Tree::File {
            executable: true,
            contents: b"#!/bin/sh\necho hi\n".to_vec(),
        },
    );
    root.insert(b"to-hello".to_vec(), Tree::Link(b"hello".to_vec()));
    root.insert(
        b"dangling".to_vec(),
        Tree::Link(b"../no/such/file".to_vec()),
    );
    root.insert(b"long".to_vec(), Tree::Link(vec![b'x'; 4000]));
    root.insert(b"empty-dir".to_vec(), Tree::Dir(BTreeMap::new()));
    root.insert(b"nested".to_vec(), Tree::Dir(nested));
    root.insert(b"caf\xe9 latin-1".to_vec(), file(b"not utf-8 name"));
    root.insert(b"\xff\xfe".to_vec(), file(b""));
    root.insert(b"\xc3\xa4".to_vec(), file(b"utf-8 name"));
    Tree::Dir(root)
}

#[test]
fn sample_tree_round_trips_and_matches_the_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    let tree = sample_tree();
    build(&src, &tree);
    let nar = assert_round_trip(&src);
    assert_eq!(nar, model_nar(&tree));
    let mut collect = Collect::default();
    parse(nar.as_slice(), &mut collect).expect("parse");
    assert_eq!(collect.root, Some(tree));
}

#[test]
fn single_file_symlink_and_empty_dir_round_trip_as_roots() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, tree) in [
        ("file", file(b"hello\n")),
        ("empty", file(b"")),
        ("link", Tree::Link(b"/nix/store/dangling".to_vec())),
        ("dir", Tree::Dir(BTreeMap::new())),
    ] {
        let src = dir.path().join(name);
        build(&src, &tree);
        assert_eq!(assert_round_trip(&src), model_nar(&tree), "{name}");
    }
}

#[test]
fn restore_writes_symlinks_raw_without_following_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut entries = BTreeMap::new();
    entries.insert(b"escape".to_vec(), Tree::Link(b"../../outside".to_vec()));
    let nar = model_nar(&Tree::Dir(entries));
    let dest = dir.path().join("a").join("out");
    fs::create_dir(dir.path().join("a")).expect("mkdir");
    restore(nar.as_slice(), &dest).expect("restore");
    assert_eq!(
        fs::read_link(dest.join("escape")).expect("readlink"),
        Path::new("../../outside")
    );
    assert!(!dir.path().join("outside").exists());
}

#[test]
fn pull_reader_through_tee_hashes_like_validate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    build(&src, &sample_tree());
    let mut tee = Sha256Tee::new(NarReader::new(&src));
    let mut bytes = Vec::new();
    tee.read_to_end(&mut bytes).expect("read");
    let (_, summary) = tee.into_parts();
    assert_eq!(summary, validate(bytes.as_slice()).expect("validate"));
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        any::<u8>().prop_filter("no / or NUL", |b| *b != b'/' && *b != 0),
        1..12,
    )
    .prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

fn tree() -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(executable, contents)| Tree::File {
                executable,
                contents
            }),
        proptest::collection::vec(any::<u8>().prop_filter("no NUL", |b| *b != 0), 1..200)
            .prop_map(Tree::Link),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        proptest::collection::btree_map(name(), inner, 0..6).prop_map(Tree::Dir)
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    Word(usize, u64),
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len().max(1);
        match *m {
            Mutation::Flip(i, x) => {
                if let Some(b) = bytes.get_mut(i % len) {
                    *b ^= x.max(1);
                }
            }
            Mutation::Insert(i, x) => bytes.insert(i % (bytes.len() + 1), x),
            Mutation::Delete(i) => {
                if !bytes.is_empty() {
                    bytes.remove(i % len);
                }
            }
            Mutation::Truncate(i) => bytes.truncate(i % len),
            Mutation::Word(i, w) => {
                let at = (i % len) & !7;
                if at + 8 <= bytes.len() {
                    bytes[at..at + 8].copy_from_slice(&w.to_le_bytes());
                }
            }
        }
    }
    bytes
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, x)| Mutation::Insert(i, x)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
        (
            any::<usize>(),
            prop_oneof![0u64..300, any::<u64>(), Just(u64::MAX), Just(1 << 60)]
        )
            .prop_map(|(i, w)| Mutation::Word(i, w)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_trees_dump_like_the_model_and_round_trip(tree in tree()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        build(&src, &tree);
        let nar = assert_round_trip(&src);
        prop_assert_eq!(&nar, &model_nar(&tree));
        let mut collect = Collect::default();
        parse(nar.as_slice(), &mut collect).expect("parse");
        prop_assert_eq!(collect.root, Some(tree));
    }

    #[test]
    fn mutated_nars_never_panic_and_accepted_ones_are_canonical(
        tree in tree(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let bytes = mutate(model_nar(&tree), &mutations);
        if let Ok(summary) = validate(bytes.as_slice()) {
            prop_assert_eq!(summary.nar_hash, sha256(&bytes));
            let dir = tempfile::tempdir().expect("tempdir");
            let dest = dir.path().join("out");
            restore(bytes.as_slice(), &dest).expect("restore what validate accepted");
            prop_assert_eq!(dump_bytes(&dest), bytes);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = validate(bytes.as_slice());
    }

    #[test]
    fn arbitrary_bytes_after_magic_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut input = model_nar(&file(b""))[..24].to_vec();
        input.extend(bytes);
        let _ = validate(input.as_slice());
    }
}
