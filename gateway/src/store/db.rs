//! A redb database that outlives a failed write. After an I/O error (a
//! full disk, most often) redb refuses every later transaction of that
//! handle with "Previous I/O error occurred. Please close and re-open the
//! database.", so a gateway that once ran out of space stayed unable to
//! pin, index or upload until it was restarted. [`Db`] closes and reopens
//! the file instead (redb then repairs it from its last commit), and
//! carries on.
//!
//! # Goals
//! - A write after the disk has room again succeeds in the running
//!   process: its transaction finds the handle broken and reopens it first.
//! - Reads recover too: a commit that failed on I/O marks the handle for
//!   reopening before the next read or write, not only the next write.
//! - Call sites keep redb's API: [`Db::begin_write`] and
//!   [`Db::begin_read`] return redb's transactions (the write one wrapped
//!   only to watch its commit), failing with redb's `StorageError`.
//!
//! # Non-goals
//! - Retrying the write that failed: its caller reports the I/O error
//!   (a full disk says so), and the next write finds the database whole.
//! - Recovering from damage redb's repair cannot fix.

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{
    Builder, CommitError, Database, DatabaseError, ReadTransaction, StorageError, TransactionError,
    WriteTransaction,
};

use crate::util::sync::lock;

/// How long a reopen waits for transactions still open on the old handle
/// (they hold its file lock).
const REOPEN_WAIT: Duration = Duration::from_secs(5);

/// A redb database reopened after an I/O error; see the module docs.
pub struct Db {
    path: PathBuf,
    /// redb's page cache limit, in bytes, kept for reopens (redb's own
    /// default is 1 GiB, too much for a gateway that must stay small).
    cache_bytes: usize,
    handle: RwLock<Handle>,
    /// Serialises reopens: the first thread to see the broken handle
    /// reopens it, the others then use the new one.
    reopening: Mutex<()>,
}

struct Handle {
    /// `None` while a reopen is under way or after one failed (the next
    /// transaction tries again).
    db: Option<Arc<Database>>,
    /// Counts reopens, so a thread that saw a broken handle does not
    /// reopen one another thread already replaced.
    generation: u64,
    /// A commit failed on I/O: reopen before the next transaction.
    broken: bool,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("path", &self.path).finish()
    }
}

impl Db {
    /// Opens or creates the database at `path`, caching at most
    /// `cache_bytes` of its pages in memory.
    pub fn create(path: &Path, cache_bytes: usize) -> Result<Self, DatabaseError> {
        let db = open(path, cache_bytes)?;
        Ok(Self {
            path: path.to_path_buf(),
            cache_bytes,
            handle: RwLock::new(Handle {
                db: Some(Arc::new(db)),
                generation: 0,
                broken: false,
            }),
            reopening: Mutex::new(()),
        })
    }

    /// Begins a write transaction, reopening the database first if an
    /// earlier I/O error left it refusing writes.
    pub fn begin_write(&self) -> Result<Write<'_>, StorageError> {
        let (db, generation) = self.current()?;
        let tx = match db.begin_write().map_err(storage) {
            Err(StorageError::PreviousIo) => {
                drop(db);
                self.reopen(generation)?;
                let (db, generation) = self.current()?;
                return Ok(Write {
                    tx: db.begin_write().map_err(storage)?,
                    db: self,
                    generation,
                });
            }
            other => other?,
        };
        Ok(Write {
            tx,
            db: self,
            generation,
        })
    }

    /// Begins a read transaction (on a reopened database if a commit
    /// failed on I/O since the last one).
    pub fn begin_read(&self) -> Result<ReadTransaction, StorageError> {
        let (db, _) = self.current()?;
        db.begin_read().map_err(storage)
    }

    /// The open handle and its generation, reopening a broken one.
    fn current(&self) -> Result<(Arc<Database>, u64), StorageError> {
        loop {
            let generation = {
                let handle = self.handle.read().unwrap_or_else(|p| p.into_inner());
                match &handle.db {
                    Some(db) if !handle.broken => return Ok((db.clone(), handle.generation)),
                    _ => handle.generation,
                }
            };
            self.reopen(generation)?;
        }
    }

    fn mark_broken(&self, generation: u64) {
        let mut handle = self.handle.write().unwrap_or_else(|p| p.into_inner());
        if handle.generation == generation {
            handle.broken = true;
        }
    }

    /// Closes and reopens the database, unless another thread already
    /// replaced the handle of `generation`.
    fn reopen(&self, generation: u64) -> Result<(), StorageError> {
        let _only_one = lock(&self.reopening);
        let old = {
            let mut handle = self.handle.write().unwrap_or_else(|p| p.into_inner());
            if handle.generation != generation {
                return Ok(());
            }
            handle.db.take()
        };
        // Its file lock goes with the last transaction still open on it.
        drop(old);
        let deadline = Instant::now() + REOPEN_WAIT;
        let opened = loop {
            match open(&self.path, self.cache_bytes) {
                Err(DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => break other,
            }
        };
        let mut handle = self.handle.write().unwrap_or_else(|p| p.into_inner());
        match opened {
            Ok(db) => {
                handle.db = Some(Arc::new(db));
                handle.generation += 1;
                handle.broken = false;
                tracing::warn!(
                    path = %self.path.display(),
                    "reopened the database after an I/O error"
                );
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    path = %self.path.display(),
                    error = %e,
                    "could not reopen the database after an I/O error; the next transaction tries again"
                );
                Err(match e {
                    DatabaseError::Storage(e) => e,
                    other => StorageError::Io(std::io::Error::other(format!(
                        "reopening after an I/O error: {other}"
                    ))),
                })
            }
        }
    }
}

fn open(path: &Path, cache_bytes: usize) -> Result<Database, DatabaseError> {
    Builder::new().set_cache_size(cache_bytes).create(path)
}

/// Beginning a transaction fails only in storage (redb's other variant,
/// a read transaction still in use, comes from closing one); as
/// `StorageError` the call sites' conversions stay, and the `Result` small.
fn storage(e: TransactionError) -> StorageError {
    match e {
        TransactionError::Storage(e) => e,
        other => StorageError::Io(std::io::Error::other(other.to_string())),
    }
}

/// A write transaction of a [`Db`]: redb's, whose commit marks the
/// database for reopening when it fails on I/O.
pub struct Write<'a> {
    tx: WriteTransaction,
    db: &'a Db,
    generation: u64,
}

impl std::fmt::Debug for Write<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Write").field("db", &self.db.path).finish()
    }
}

impl Write<'_> {
    /// Commits, as [`WriteTransaction::commit`].
    pub fn commit(self) -> Result<(), CommitError> {
        let result = self.tx.commit();
        if let Err(CommitError::Storage(StorageError::Io(_) | StorageError::PreviousIo)) = &result {
            self.db.mark_broken(self.generation);
        }
        result
    }
}

impl Deref for Write<'_> {
    type Target = WriteTransaction;

    fn deref(&self) -> &WriteTransaction {
        &self.tx
    }
}

impl DerefMut for Write<'_> {
    fn deref_mut(&mut self) -> &mut WriteTransaction {
        &mut self.tx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::TableDefinition;

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    fn put(db: &Db, k: u64, v: u64) {
        let tx = db.begin_write().unwrap();
        tx.open_table(T).unwrap().insert(k, v).unwrap();
        tx.commit().unwrap();
    }

    fn get(db: &Db, k: u64) -> Option<u64> {
        let tx = db.begin_read().unwrap();
        let t = tx.open_table(T).unwrap();
        t.get(k).unwrap().map(|v| v.value())
    }

    #[test]
    fn a_broken_handle_is_reopened_and_keeps_what_was_committed() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::create(&dir.path().join("x.redb"), 1 << 20).unwrap();
        put(&db, 1, 10);
        // What a commit failing on I/O does.
        db.mark_broken(0);
        put(&db, 2, 20);
        assert_eq!((get(&db, 1), get(&db, 2)), (Some(10), Some(20)));
        assert_eq!(db.handle.read().unwrap().generation, 1);
        // A stale mark from the old handle does not reopen the new one.
        db.mark_broken(0);
        put(&db, 3, 30);
        assert_eq!(db.handle.read().unwrap().generation, 1);
    }

    #[test]
    fn a_reopen_waits_for_transactions_on_the_old_handle() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::create(&dir.path().join("x.redb"), 1 << 20).unwrap());
        put(&db, 1, 10);
        db.mark_broken(0);
        let db2 = db.clone();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            let old = db2.handle.read().unwrap().db.clone().unwrap();
            let read = old.begin_read().unwrap();
            drop(old);
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            drop(read);
        });
        rx.recv().unwrap();
        put(&db, 2, 20);
        reader.join().unwrap();
        assert_eq!(get(&db, 2), Some(20));
    }
}
