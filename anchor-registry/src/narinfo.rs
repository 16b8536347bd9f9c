//! The two text files of a Nix binary cache: `<hash>.narinfo` (one store path's
//! metadata and signatures) and `nix-cache-info`. Parsing accepts what Nix
//! writes and reads; rendering is byte-identical to what Nix writes.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::hash::{HashError, NarHash, Sha256Hash};
use crate::keys::{fingerprint, KeyError, PublicKey, SecretKey, Signature};
use crate::store_path::{excerpt, StorePath, StorePathError};

/// Why a narinfo or nix-cache-info was refused; line numbers count from 1.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NarInfoError {
    #[error("line {line}: `{text}` is not a `Key: value` line")]
    NotAField { line: usize, text: String },
    #[error("line {line}: field {field} appears a second time")]
    Duplicate { line: usize, field: &'static str },
    #[error("required field {field} is missing")]
    Missing { field: &'static str },
    #[error("line {line}: field {field} is empty")]
    Empty { line: usize, field: &'static str },
    #[error("line {line}: field {field}: {source}")]
    StorePath {
        line: usize,
        field: &'static str,
        source: StorePathError,
    },
    #[error("line {line}: field {field}: {source}")]
    Hash {
        line: usize,
        field: &'static str,
        source: HashError,
    },
    #[error("line {line}: field Sig: {source}")]
    Signature { line: usize, source: KeyError },
    #[error("line {line}: field {field}: `{value}` is not a decimal number in range")]
    Number {
        line: usize,
        field: &'static str,
        value: String,
    },
    #[error("line {line}: field NarSize is 0: a NAR is never empty")]
    ZeroNarSize { line: usize },
}

/// One `Key: value` line: its number, key and value.
struct Field<'a> {
    line: usize,
    key: &'a str,
    value: &'a str,
}

/// Splits text into `Key: value` fields, skipping blank lines. The value is what
/// follows the first ':' and one optional space (Nix always writes the space,
/// even before an empty value).
fn fields(s: &str) -> impl Iterator<Item = Result<Field<'_>, NarInfoError>> {
    s.split('\n')
        .enumerate()
        .filter(|(_, text)| !text.is_empty())
        .map(|(i, text)| {
            let line = i + 1;
            let (key, value) = text
                .split_once(':')
                .ok_or_else(|| NarInfoError::NotAField {
                    line,
                    text: excerpt(text),
                })?;
            let value = value.strip_prefix(' ').unwrap_or(value);
            Ok(Field { line, key, value })
        })
}

/// Stores a field's value, refusing a second occurrence.
fn set_once<T>(
    slot: &mut Option<T>,
    value: T,
    field: &'static str,
    line: usize,
) -> Result<(), NarInfoError> {
    if slot.is_some() {
        return Err(NarInfoError::Duplicate { line, field });
    }
    *slot = Some(value);
    Ok(())
}

/// Decimal digits only (no sign, no spaces), as Nix's `string2Int` for sizes.
fn parse_number<T: FromStr>(
    value: &str,
    field: &'static str,
    line: usize,
) -> Result<T, NarInfoError> {
    let err = || NarInfoError::Number {
        line,
        field,
        value: excerpt(value),
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    value.parse().map_err(|_| err())
}

fn parse_hash(value: &str, field: &'static str, line: usize) -> Result<Sha256Hash, NarInfoError> {
    Sha256Hash::parse(value).map_err(|source| NarInfoError::Hash {
        line,
        field,
        source,
    })
}

/// A store path's entry in a binary cache. Only `store_path`, `nar_hash`,
/// `nar_size` and `references` are signed (see [`fingerprint`]). String fields
/// must not contain newlines: they are rendered verbatim on one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// Where the (possibly compressed) NAR is, relative to the cache root.
    pub url: String,
    /// Absent means bzip2 to Nix; nixpfs always writes `none`.
    pub compression: Option<String>,
    pub file_hash: Option<Sha256Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    /// In file order; Nix writes them sorted.
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub sigs: Vec<Signature>,
    /// Content address (`fixed:…`, `text:…`), kept verbatim.
    pub ca: Option<String>,
}

impl NarInfo {
    /// Reads a narinfo as Nix does: unknown keys are ignored, `Sig` may repeat,
    /// any other repeated key is an error. `StorePath`, `URL`, `NarHash` and a
    /// non-zero `NarSize` are required; `Deriver: unknown-deriver` means none.
    pub fn parse(s: &str) -> Result<Self, NarInfoError> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut sigs = Vec::new();
        let mut ca = None;

        for field in fields(s) {
            let Field { line, key, value } = field?;
            let path_err = |field| {
                move |source| NarInfoError::StorePath {
                    line,
                    field,
                    source,
                }
            };
            match key {
                "StorePath" => {
                    let path = StorePath::parse(value).map_err(path_err("StorePath"))?;
                    set_once(&mut store_path, path, "StorePath", line)?;
                }
                "URL" => {
                    if value.is_empty() {
                        return Err(NarInfoError::Empty { line, field: "URL" });
                    }
                    set_once(&mut url, value.to_owned(), "URL", line)?;
                }
                "Compression" => set_once(&mut compression, value.to_owned(), "Compression", line)?,
                "FileHash" => set_once(
                    &mut file_hash,
                    parse_hash(value, "FileHash", line)?,
                    "FileHash",
                    line,
                )?,
                "FileSize" => set_once(
                    &mut file_size,
                    parse_number(value, "FileSize", line)?,
                    "FileSize",
                    line,
                )?,
                "NarHash" => set_once(
                    &mut nar_hash,
                    parse_hash(value, "NarHash", line)?,
                    "NarHash",
                    line,
                )?,
                "NarSize" => {
                    let size: u64 = parse_number(value, "NarSize", line)?;
                    if size == 0 {
                        return Err(NarInfoError::ZeroNarSize { line });
                    }
                    set_once(&mut nar_size, size, "NarSize", line)?;
                }
                "References" => {
                    let refs = value
                        .split(' ')
                        .filter(|r| !r.is_empty())
                        .map(StorePath::from_base_name)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(path_err("References"))?;
                    set_once(&mut references, refs, "References", line)?;
                }
                "Deriver" => {
                    let drv = match value {
                        "unknown-deriver" => None,
                        base => Some(StorePath::from_base_name(base).map_err(path_err("Deriver"))?),
                    };
                    set_once(&mut deriver, drv, "Deriver", line)?;
                }
                "Sig" => sigs.push(
                    Signature::parse(value)
                        .map_err(|source| NarInfoError::Signature { line, source })?,
                ),
                "CA" => set_once(
                    &mut ca,
                    Some(value.to_owned()).filter(|v| !v.is_empty()),
                    "CA",
                    line,
                )?,
                _ => {}
            }
        }

        Ok(Self {
            store_path: store_path.ok_or(NarInfoError::Missing { field: "StorePath" })?,
            url: url.ok_or(NarInfoError::Missing { field: "URL" })?,
            compression,
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::Missing { field: "NarHash" })?,
            nar_size: nar_size.ok_or(NarInfoError::Missing { field: "NarSize" })?,
            references: references.unwrap_or_default(),
            deriver: deriver.flatten(),
            sigs,
            ca: ca.flatten(),
        })
    }

    /// The text Nix signs and verifies for this path.
    pub fn fingerprint(&self) -> String {
        fingerprint(
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Signs the fingerprint with `key`; any earlier signature by a key of the
    /// same name is dropped, so re-signing never piles up stale signatures.
    pub fn sign(&mut self, key: &SecretKey) {
        let sig = key.sign(self.fingerprint().as_bytes());
        self.sigs.retain(|s| s.name() != key.name());
        self.sigs.push(sig);
    }

    /// True if some signature by `key` (matched by name) covers this narinfo.
    pub fn verify(&self, key: &PublicKey) -> bool {
        let fp = self.fingerprint();
        self.sigs.iter().any(|sig| key.verify(fp.as_bytes(), sig))
    }
}

/// Nix's field order; `References:` is written even when empty.
impl fmt::Display for NarInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StorePath: {}", self.store_path)?;
        writeln!(f, "URL: {}", self.url)?;
        if let Some(c) = &self.compression {
            writeln!(f, "Compression: {c}")?;
        }
        if let Some(h) = &self.file_hash {
            writeln!(f, "FileHash: {h}")?;
        }
        if let Some(s) = self.file_size {
            writeln!(f, "FileSize: {s}")?;
        }
        writeln!(f, "NarHash: {}", self.nar_hash)?;
        writeln!(f, "NarSize: {}", self.nar_size)?;
        f.write_str("References: ")?;
        for (i, r) in self.references.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(&r.base_name())?;
        }
        f.write_str("\n")?;
        if let Some(d) = &self.deriver {
            writeln!(f, "Deriver: {}", d.base_name())?;
        }
        for sig in &self.sigs {
            writeln!(f, "Sig: {sig}")?;
        }
        if let Some(ca) = &self.ca {
            writeln!(f, "CA: {ca}")?;
        }
        Ok(())
    }
}

impl FromStr for NarInfo {
    type Err = NarInfoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A cache's `nix-cache-info`: which store it serves and how Nix should rank it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheInfo {
    pub store_dir: String,
    /// Whether Nix may ask for many narinfos up front (e.g. `nix-env -qa`).
    pub want_mass_query: bool,
    /// Lower is preferred; Nix's default for HTTP caches is 50.
    pub priority: Option<u32>,
}

impl CacheInfo {
    /// Reads `nix-cache-info`. As in Nix, values are trimmed, unknown keys are
    /// ignored and `WantMassQuery` is true only for `1`; `StoreDir` is required.
    pub fn parse(s: &str) -> Result<Self, NarInfoError> {
        let mut store_dir = None;
        let mut want_mass_query = None;
        let mut priority = None;
        for field in fields(s) {
            let Field { line, key, value } = field?;
            let value = value.trim();
            match key {
                "StoreDir" => {
                    if value.is_empty() {
                        return Err(NarInfoError::Empty {
                            line,
                            field: "StoreDir",
                        });
                    }
                    set_once(&mut store_dir, value.to_owned(), "StoreDir", line)?;
                }
                "WantMassQuery" => {
                    set_once(&mut want_mass_query, value == "1", "WantMassQuery", line)?
                }
                "Priority" => set_once(
                    &mut priority,
                    parse_number(value, "Priority", line)?,
                    "Priority",
                    line,
                )?,
                _ => {}
            }
        }
        Ok(Self {
            store_dir: store_dir.ok_or(NarInfoError::Missing { field: "StoreDir" })?,
            want_mass_query: want_mass_query.unwrap_or(false),
            priority,
        })
    }
}

impl fmt::Display for CacheInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StoreDir: {}", self.store_dir)?;
        writeln!(f, "WantMassQuery: {}", u8::from(self.want_mass_query))?;
        if let Some(p) = self.priority {
            writeln!(f, "Priority: {p}")?;
        }
        Ok(())
    }
}

impl FromStr for CacheInfo {
    type Err = NarInfoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store_path::StorePathHash;
    use proptest::prelude::*;

    // Written by Nix 2.8: `nix-store --generate-binary-cache-key fixture-key-1`,
    // `nix-instantiate` of a two-derivation file into a chroot store, `nix store
    // sign --derivation -r`, `nix copy --derivation --to file://…?compression=none`.
    const NIX_SECRET: &str =
        "fixture-key-1:CLSTtsnU80ofljPduL4L4/RRO2T2yiX5lGNRCoYIC9Ra51A0kRkAXMs6O9QwWMAL4ZbLwmKrh+vs4dEWZxkxYA==";
    const NIX_PUBLIC: &str = "fixture-key-1:WudQNJEZAFzLOjvUMFjAC+GWy8Jiq4fr7OHRFmcZMWA=";
    const NIX_TOP: &str = "StorePath: /nix/store/l62vb0kkpp2k5yxp3638xscs7lmqn5sj-top.drv
URL: nar/1rbg7r8ydi0y26aqzpns7hajgr6sdb6my5hyyps9ib87bjxmyd2b.nar
Compression: none
FileHash: sha256:1rbg7r8ydi0y26aqzpns7hajgr6sdb6my5hyyps9ib87bjxmyd2b
FileSize: 472
NarHash: sha256:1rbg7r8ydi0y26aqzpns7hajgr6sdb6my5hyyps9ib87bjxmyd2b
NarSize: 472
References: 2al1bij22scf6znn9zp7y98f8z4xpf00-dep.drv
Sig: fixture-key-1:xvIttoA148ULYMtfEpqC717AfSv7CXCfFzG5/+1jjuOQAYkV8dgj6jvo3017flP7gGUpcIBldC053Ue+zXgBAA==
CA: text:sha256:1prympb0fmm81yq7g5i477p3blhzq1hzs7c99xbqgwdyd1ncpxbr
";
    const NIX_LEAF: &str = "StorePath: /nix/store/2al1bij22scf6znn9zp7y98f8z4xpf00-dep.drv
URL: nar/1hsx6nm5wpy7y9xfsqszq7sjarin2bcnpkbbwj70mxc9l2f5ncmi.nar
Compression: none
FileHash: sha256:1hsx6nm5wpy7y9xfsqszq7sjarin2bcnpkbbwj70mxc9l2f5ncmi
FileSize: 360
NarHash: sha256:1hsx6nm5wpy7y9xfsqszq7sjarin2bcnpkbbwj70mxc9l2f5ncmi
NarSize: 360
References: 
Sig: fixture-key-1:XLk8idrhyjUGl9mojgBE4dT3asxZK56bvNs7l0+5jxtIpXaad/Q9B22l3f1/YXXYOH2XkWl4qg+ywVlt7Z+rBg==
CA: text:sha256:0337hvpjvqsvgkz7lnjzxgnnw1mbvf73lx5m3pcv4p4v880pf51g
";
    // `nix path-info --json` of the top path: SRI NarHash.
    const NIX_TOP_SRI: &str = "sha256-SzRfu1wHrZj09R4WX81q2uQnFTza3o+VER7E5lE+b+U=";

    const MINIMAL: &str = "StorePath: /nix/store/2al1bij22scf6znn9zp7y98f8z4xpf00-dep.drv
URL: nar/x.nar
NarHash: sha256:1hsx6nm5wpy7y9xfsqszq7sjarin2bcnpkbbwj70mxc9l2f5ncmi
NarSize: 360
";

    fn replace_line(text: &str, key: &str, line: &str) -> String {
        text.lines()
            .map(|l| if l.starts_with(key) { line } else { l })
            .map(|l| format!("{l}\n"))
            .collect()
    }

    #[test]
    fn parses_and_renders_nix_narinfos_byte_for_byte() {
        for text in [NIX_TOP, NIX_LEAF] {
            let info = NarInfo::parse(text).unwrap();
            assert_eq!(info.to_string(), text);
        }
        let top = NarInfo::parse(NIX_TOP).unwrap();
        assert_eq!(top.store_path.name(), "top.drv");
        assert_eq!(top.compression.as_deref(), Some("none"));
        assert_eq!(top.file_size, Some(472));
        assert_eq!(top.nar_size, 472);
        assert_eq!(top.nar_hash, Sha256Hash::parse(NIX_TOP_SRI).unwrap());
        assert_eq!(top.references.len(), 1);
        assert_eq!(
            top.references[0].to_string(),
            "/nix/store/2al1bij22scf6znn9zp7y98f8z4xpf00-dep.drv"
        );
        assert_eq!(top.deriver, None);
        assert_eq!(top.sigs.len(), 1);
        assert!(top
            .ca
            .as_deref()
            .is_some_and(|ca| ca.starts_with("text:sha256:")));
        assert!(NarInfo::parse(NIX_LEAF).unwrap().references.is_empty());
    }

    #[test]
    fn nix_signatures_verify_and_our_key_reproduces_them() {
        let public = PublicKey::parse(NIX_PUBLIC).unwrap();
        let secret = SecretKey::parse(NIX_SECRET).unwrap();
        assert_eq!(secret.public(), public);
        for text in [NIX_TOP, NIX_LEAF] {
            let info = NarInfo::parse(text).unwrap();
            assert!(info.verify(&public), "{text}");
            let mut ours = info.clone();
            ours.sign(&secret);
            assert_eq!(ours.sigs, info.sigs, "ed25519 is deterministic");
        }
    }

    #[test]
    fn verify_fails_when_signed_fields_change() {
        let public = PublicKey::parse(NIX_PUBLIC).unwrap();
        let info = NarInfo::parse(NIX_TOP).unwrap();
        let mut size = info.clone();
        size.nar_size += 1;
        let mut hash = info.clone();
        hash.nar_hash = Sha256Hash::digest(b"other");
        let mut refs = info.clone();
        refs.references.clear();
        for tampered in [size, hash, refs] {
            assert!(!tampered.verify(&public));
        }
        // URL, compression and CA are not signed: rewriting the URL keeps it valid.
        let mut url = info.clone();
        url.url = "nar/bafyexample.nar".into();
        assert!(url.verify(&public));
    }

    #[test]
    fn sign_replaces_a_signature_by_the_same_key_name() {
        let secret = SecretKey::parse(NIX_SECRET).unwrap();
        let other = SecretKey::generate("other-1").unwrap();
        let mut info = NarInfo::parse(NIX_TOP).unwrap();
        info.nar_size += 1;
        info.sign(&other);
        info.sign(&secret);
        assert_eq!(info.sigs.len(), 2);
        assert!(info.verify(&secret.public()));
        assert!(info.verify(&other.public()));
        assert!(!info.verify(&SecretKey::generate("fixture-key-1").unwrap().public()));
    }

    #[test]
    fn accepts_minimal_and_old_style_narinfos() {
        let info = NarInfo::parse(MINIMAL).unwrap();
        assert_eq!(info.compression, None);
        assert!(info.references.is_empty());
        assert!(info.sigs.is_empty());
        // Base16 NarHash, unknown keys, no space after an empty References, no final newline.
        let hex = info.nar_hash.to_hex();
        let old = format!(
            "StorePath: {}\nURL: u\nNarHash: sha256:{hex}\nNarSize: 360\nSystem: x86_64-linux\nReferences:\nDeriver: unknown-deriver",
            info.store_path
        );
        let parsed = NarInfo::parse(&old).unwrap();
        assert_eq!(parsed.nar_hash, info.nar_hash);
        assert_eq!(parsed.deriver, None);
        assert!(parsed.references.is_empty());
    }

    #[test]
    fn rejects_missing_required_fields() {
        for (key, field) in [
            ("StorePath", "StorePath"),
            ("URL", "URL"),
            ("NarHash", "NarHash"),
            ("NarSize", "NarSize"),
        ] {
            let text: String = MINIMAL
                .lines()
                .filter(|l| !l.starts_with(key))
                .map(|l| format!("{l}\n"))
                .collect();
            assert_eq!(NarInfo::parse(&text), Err(NarInfoError::Missing { field }));
        }
    }

    #[test]
    fn rejects_duplicate_fields_naming_the_line() {
        let text = format!("{NIX_TOP}NarSize: 1\n");
        assert_eq!(
            NarInfo::parse(&text),
            Err(NarInfoError::Duplicate {
                line: 11,
                field: "NarSize"
            })
        );
        let text = format!("{NIX_TOP}References: \n");
        assert!(matches!(
            NarInfo::parse(&text),
            Err(NarInfoError::Duplicate {
                field: "References",
                ..
            })
        ));
    }

    #[test]
    fn rejects_bad_field_values_naming_line_and_field() {
        let cases = [
            ("StorePath", "StorePath: /nix/store/bad"),
            ("NarHash", "NarHash: sha256:zzz"),
            ("NarSize", "NarSize: -1"),
            ("NarSize", "NarSize: 0"),
            ("NarSize", "NarSize: 99999999999999999999999"),
            ("FileSize", "FileSize: 1 2"),
            ("References", "References: notapath"),
            ("Sig", "Sig: nocolon"),
            ("URL", "URL: "),
        ];
        for (key, line) in cases {
            let text = replace_line(NIX_TOP, key, line);
            let err = NarInfo::parse(&text).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(key), "{msg}");
            assert!(msg.starts_with("line "), "{msg}");
        }
        assert!(matches!(
            NarInfo::parse("StorePath /nix/store/x\n"),
            Err(NarInfoError::NotAField { line: 1, .. })
        ));
    }

    #[test]
    fn cache_info_round_trips_and_reads_what_nix_copy_writes() {
        let info = CacheInfo {
            store_dir: "/nix/store".into(),
            want_mass_query: true,
            priority: Some(40),
        };
        let text = info.to_string();
        assert_eq!(
            text,
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
        );
        assert_eq!(CacheInfo::parse(&text).unwrap(), info);
        // `nix copy --to file://…` writes only StoreDir.
        let nix = CacheInfo::parse("StoreDir: /nix/store\n").unwrap();
        assert_eq!(
            nix,
            CacheInfo {
                store_dir: "/nix/store".into(),
                want_mass_query: false,
                priority: None
            }
        );
    }

    #[test]
    fn cache_info_rejects_bad_input() {
        assert_eq!(
            CacheInfo::parse("WantMassQuery: 1\n"),
            Err(NarInfoError::Missing { field: "StoreDir" })
        );
        assert!(matches!(
            CacheInfo::parse("StoreDir: /nix/store\nPriority: high\n"),
            Err(NarInfoError::Number {
                line: 2,
                field: "Priority",
                ..
            })
        ));
        assert!(matches!(
            CacheInfo::parse("StoreDir: /a\nStoreDir: /b\n"),
            Err(NarInfoError::Duplicate {
                line: 2,
                field: "StoreDir"
            })
        ));
    }

    fn store_path() -> impl Strategy<Value = StorePath> {
        (any::<[u8; 20]>(), "[A-Za-z0-9+_?=-][A-Za-z0-9+._?=-]{0,30}")
            .prop_map(|(d, n)| StorePath::from_parts(StorePathHash::from_digest(d), &n).unwrap())
    }

    fn sha256() -> impl Strategy<Value = Sha256Hash> {
        any::<[u8; 32]>().prop_map(Sha256Hash::from_bytes)
    }

    fn signature() -> impl Strategy<Value = Signature> {
        ("[a-z0-9.-]{1,20}", any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(name, a, b)| {
            let bytes: Vec<u8> = a.into_iter().chain(b).collect();
            Signature::parse(&format!(
                "{name}:{}",
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
            ))
            .unwrap()
        })
    }

    /// A value on one line: no newline, no leading space (the separator's).
    fn line_value() -> impl Strategy<Value = String> {
        "[!-~][ -~]{0,40}"
    }

    prop_compose! {
        fn narinfo()(
            store_path in store_path(),
            url in line_value(),
            compression in proptest::option::of(line_value()),
            file_hash in proptest::option::of(sha256()),
            file_size in proptest::option::of(any::<u64>()),
            nar_hash in sha256(),
            nar_size in 1u64..,
            references in proptest::collection::vec(store_path(), 0..5),
            deriver in proptest::option::of(store_path()),
            sigs in proptest::collection::vec(signature(), 0..3),
            ca in proptest::option::of(line_value()),
        ) -> NarInfo {
            NarInfo { store_path, url, compression, file_hash, file_size, nar_hash, nar_size, references, deriver, sigs, ca }
        }
    }

    proptest! {
        #[test]
        fn narinfo_render_parse_round_trips(info in narinfo()) {
            let text = info.to_string();
            prop_assert_eq!(NarInfo::parse(&text).unwrap(), info.clone());
            prop_assert_eq!(text.parse::<NarInfo>().unwrap().to_string(), text);
        }

        #[test]
        fn signed_narinfo_verifies_and_tampering_fails(mut info in narinfo(), seed in any::<[u8; 32]>()) {
            let sk = SecretKey::from_seed("k-1", seed).unwrap();
            info.sign(&sk);
            let reparsed = NarInfo::parse(&info.to_string()).unwrap();
            prop_assert!(reparsed.verify(&sk.public()));
            let mut tampered = reparsed;
            tampered.nar_size = tampered.nar_size.wrapping_add(1).max(1);
            prop_assert!(!tampered.verify(&sk.public()));
        }

        #[test]
        fn cache_info_round_trips(
            store_dir in "/[!-~]{1,40}",
            want_mass_query in any::<bool>(),
            priority in proptest::option::of(any::<u32>()),
        ) {
            let info = CacheInfo { store_dir, want_mass_query, priority };
            prop_assert_eq!(CacheInfo::parse(&info.to_string()).unwrap(), info);
        }

        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = NarInfo::parse(&s);
            let _ = CacheInfo::parse(&s);
        }

        #[test]
        fn parse_never_panics_on_narinfo_shaped_lines(
            lines in proptest::collection::vec(
                (prop::sample::select(vec!["StorePath", "URL", "NarHash", "NarSize", "References", "Deriver", "Sig", "CA", "FileSize", "FileHash"]), "\\PC{0,80}"),
                0..12,
            )
        ) {
            let text: String = lines.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
            let _ = NarInfo::parse(&text);
        }
    }
}
