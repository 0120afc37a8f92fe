//! Simulated storage faults, for tests of the failure paths (a disk that
//! fills up, an fsync or a rename that fails) without a real full disk.
//!
//! A fault registered for a directory applies to every file the writers of
//! [`crate::io`] create, sync or rename under it, until its guard is dropped;
//! tests that use distinct temporary directories cannot disturb each other.
//! Nothing is registered in normal use, and then the writers pay one atomic
//! load per file.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A storage fault to simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Writes fail with `kind` once `bytes` bytes in all were written to
    /// files under the directory (`StorageFull` simulates a full disk).
    Write {
        /// Bytes that still succeed, over all files under the directory.
        bytes: u64,
        /// The error the write after them gets.
        kind: io::ErrorKind,
    },
    /// Every fsync of a file under the directory fails with `kind`.
    Sync {
        /// The error.
        kind: io::ErrorKind,
    },
    /// Renaming something to a path under the directory fails with `kind`.
    Rename {
        /// The error.
        kind: io::ErrorKind,
    },
}

struct Entry {
    id: u64,
    dir: PathBuf,
    fault: Fault,
    written: Arc<AtomicU64>,
}

static ANY: AtomicBool = AtomicBool::new(false);
static NEXT_ID: AtomicU64 = AtomicU64::new(0);
static FAULTS: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

fn faults() -> MutexGuard<'static, Vec<Entry>> {
    // A test that panicked while holding the lock left the list intact.
    FAULTS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps a fault registered; dropping it removes the fault.
#[derive(Debug)]
#[must_use = "the fault is removed when the guard is dropped"]
pub struct Injected {
    id: u64,
}

impl Drop for Injected {
    fn drop(&mut self) {
        faults().retain(|e| e.id != self.id);
    }
}

/// Simulates `fault` for files under `dir` until the guard is dropped.
pub fn inject(dir: &Path, fault: Fault) -> Injected {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    faults().push(Entry {
        id,
        dir: dir.to_path_buf(),
        fault,
        written: Arc::new(AtomicU64::new(0)),
    });
    ANY.store(true, Ordering::Release);
    Injected { id }
}

fn find<T>(path: &Path, f: impl Fn(&Entry) -> Option<T>) -> Option<T> {
    if !ANY.load(Ordering::Acquire) {
        return None;
    }
    faults()
        .iter()
        .filter(|e| path.starts_with(&e.dir))
        .find_map(f)
}

fn injected(kind: io::ErrorKind, what: &str) -> io::Error {
    io::Error::new(
        kind,
        format!("{} (simulated {what} fault)", io::Error::from(kind)),
    )
}

/// The write budget of a file about to be created at `path`, if a write
/// fault covers it.
pub(crate) fn write_budget(path: &Path) -> Option<Budget> {
    find(path, |e| match e.fault {
        Fault::Write { bytes, kind } => Some(Budget {
            limit: bytes,
            kind,
            written: Arc::clone(&e.written),
        }),
        _ => None,
    })
}

/// The error an fsync of `path` gets, if a sync fault covers it.
pub(crate) fn sync_error(path: &Path) -> Option<io::Error> {
    find(path, |e| match e.fault {
        Fault::Sync { kind } => Some(injected(kind, "fsync")),
        _ => None,
    })
}

/// The error a rename to `path` gets, if a rename fault covers it.
pub(crate) fn rename_error(path: &Path) -> Option<io::Error> {
    find(path, |e| match e.fault {
        Fault::Rename { kind } => Some(injected(kind, "rename")),
        _ => None,
    })
}

/// Bytes that may still be written under a faulty directory.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: u64,
    kind: io::ErrorKind,
    written: Arc<AtomicU64>,
}

impl Budget {
    /// How many of `len` bytes may be written now (0: the write fails),
    /// counted as written.
    pub(crate) fn take(&self, len: usize) -> io::Result<usize> {
        let mut done = self.written.load(Ordering::Relaxed);
        loop {
            let allowed = self.limit.saturating_sub(done).min(len as u64);
            if allowed == 0 && len > 0 {
                return Err(injected(self.kind, "write"));
            }
            match self.written.compare_exchange(
                done,
                done + allowed,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(allowed as usize),
                Err(now) => done = now,
            }
        }
    }
}
