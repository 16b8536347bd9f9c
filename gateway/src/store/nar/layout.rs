//! Where a NAR's bytes come from: a [`NarLayout`] lists, in NAR order,
//! the framing bytes the encoder made up ([`Segment::Literal`]) and the
//! ranges it read from the tree's regular files ([`Segment::File`]), with a
//! [`FileStamp`] of each file as it was opened. Recorded while a
//! [`NarReader`](super::NarReader) streams, it lets the NAR be rebuilt from
//! the tree later, in any slice, without a copy of the file contents.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;

/// What identifies one version of a file on disk: the same path may hold
/// other bytes only if one of these changed. `ctime` cannot be set back
/// from userspace (short of changing the clock), so a write, `chmod`,
/// rename over, or `touch -d` all show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mode: u32,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl FileStamp {
    /// The stamp of a file's metadata (from `fstat` on the open file).
    pub fn of(meta: &Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mode: meta.mode(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// What differs between `self` (as recorded) and `now`, if anything,
    /// in words for a log line or a report.
    pub fn change(&self, now: &FileStamp) -> Option<&'static str> {
        if (self.dev, self.ino) != (now.dev, now.ino) {
            Some("was replaced (other inode)")
        } else if self.size != now.size {
            Some("changed size")
        } else if self.mtime != now.mtime {
            Some("was modified (mtime)")
        } else if self.ctime != now.ctime || self.mode != now.mode {
            Some("was changed (ctime)")
        } else {
            None
        }
    }
}

/// One regular file of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutFile {
    /// Path below the NAR's root as raw bytes; empty when the root is the
    /// file itself.
    pub rel: Vec<u8>,
    pub stamp: FileStamp,
}

/// A run of NAR bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Framing the encoder produced (tokens, names, symlink targets,
    /// lengths, padding).
    Literal(Vec<u8>),
    /// `len` bytes of file `file` (an index into [`NarLayout::files`])
    /// from `offset`.
    File { file: u32, offset: u64, len: u64 },
}

impl Segment {
    /// NAR bytes this segment stands for.
    pub fn len(&self) -> u64 {
        match self {
            Segment::Literal(b) => b.len() as u64,
            Segment::File { len, .. } => *len,
        }
    }

    /// Whether the segment stands for no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A whole NAR as framing and file ranges, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NarLayout {
    pub files: Vec<LayoutFile>,
    pub segments: Vec<Segment>,
}

impl NarLayout {
    /// Notes a file the encoder opened; its contents are then recorded
    /// with [`file_bytes`](Self::file_bytes) under the returned index.
    pub(super) fn open_file(&mut self, rel: Vec<u8>, meta: &Metadata) -> u32 {
        self.files.push(LayoutFile {
            rel,
            stamp: FileStamp::of(meta),
        });
        // A tree with 4 billion files is not a store path anyone pins; the
        // index saturates rather than wraps.
        u32::try_from(self.files.len() - 1).unwrap_or(u32::MAX)
    }

    /// Appends framing bytes, merged into the previous literal run.
    pub(super) fn literal(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if let Some(Segment::Literal(last)) = self.segments.last_mut() {
            last.extend_from_slice(bytes);
        } else {
            self.segments.push(Segment::Literal(bytes.to_vec()));
        }
    }

    /// Appends `len` bytes read from `file` at `offset`, merged into the
    /// previous range when it continues it.
    pub(super) fn file_bytes(&mut self, file: u32, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Some(Segment::File {
            file: f,
            offset: o,
            len: l,
        }) = self.segments.last_mut()
        {
            if *f == file && *o + *l == offset {
                *l += len;
                return;
            }
        }
        self.segments.push(Segment::File { file, offset, len });
    }

    /// Bytes of the whole NAR.
    pub fn nar_size(&self) -> u64 {
        self.segments.iter().map(Segment::len).sum()
    }

    /// The layout cut into consecutive pieces of `size` bytes (the last one
    /// shorter): the segments of each piece, split where a cut falls inside
    /// one. A `size` of 0 yields nothing.
    pub fn cut(&self, size: u64) -> Vec<Vec<Segment>> {
        let mut out = Vec::new();
        if size == 0 {
            return out;
        }
        let mut piece = Vec::new();
        let mut room = size;
        for seg in &self.segments {
            let mut seg = seg.clone();
            while !seg.is_empty() {
                let take = seg.len().min(room);
                let (head, tail) = split(seg, take);
                piece.push(head);
                room -= take;
                seg = tail;
                if room == 0 {
                    out.push(std::mem::take(&mut piece));
                    room = size;
                }
            }
        }
        if !piece.is_empty() {
            out.push(piece);
        }
        out
    }
}

/// `seg` split after `at` bytes.
fn split(seg: Segment, at: u64) -> (Segment, Segment) {
    match seg {
        Segment::Literal(mut bytes) => {
            // `at` is at most the literal's length, which fits in usize.
            let tail = bytes.split_off(usize::try_from(at).unwrap_or(bytes.len()));
            (Segment::Literal(bytes), Segment::Literal(tail))
        }
        Segment::File { file, offset, len } => (
            Segment::File {
                file,
                offset,
                len: at,
            },
            Segment::File {
                file,
                offset: offset + at,
                len: len - at,
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(b: &[u8]) -> Segment {
        Segment::Literal(b.to_vec())
    }

    fn file(offset: u64, len: u64) -> Segment {
        Segment::File {
            file: 0,
            offset,
            len,
        }
    }

    #[test]
    fn runs_merge_and_cuts_split_inside_segments() {
        let mut l = NarLayout::default();
        l.literal(b"ab");
        l.literal(b"c");
        l.file_bytes(0, 0, 4);
        l.file_bytes(0, 4, 3);
        l.literal(b"de");
        assert_eq!(l.segments, vec![lit(b"abc"), file(0, 7), lit(b"de")]);
        assert_eq!(l.nar_size(), 12);
        assert_eq!(
            l.cut(5),
            vec![
                vec![lit(b"abc"), file(0, 2)],
                vec![file(2, 5)],
                vec![lit(b"de")],
            ]
        );
        assert!(l.cut(0).is_empty());
        assert_eq!(l.cut(12).len(), 1);
    }
}
