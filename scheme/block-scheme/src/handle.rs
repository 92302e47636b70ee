//! Open handles: what each one refers to, what it may do, who opened it, and the table that
//! maps handle ids to them (ids from 1, never reused within one scheme's lifetime).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use syscall::error::{EBADF, EMFILE, Error};

use crate::{CallerCtx, Result};

/// What a handle refers to.
#[derive(Debug)]
pub(crate) enum Target {
    /// The root directory; the listing is taken when the handle is opened, so reads at any
    /// offset see one consistent text for the handle's lifetime.
    Root { listing: Vec<u8> },
    /// A whole disk, by index into [`crate::BlockDevice::disks`].
    Disk { disk: usize },
    /// Partition `part` of `disk`, as it was when opened: `blocks` blocks from block `start`.
    /// I/O checks that the disk's current table still has it (else `ENODEV`).
    Partition {
        disk: usize,
        part: usize,
        start: u64,
        blocks: u64,
    },
}

/// One open handle. Immutable once created; shared as `Arc<Handle>` so an operation can
/// keep using it after the table lock is released (and even after a concurrent `close`,
/// which only removes the table entry).
#[derive(Debug)]
pub(crate) struct Handle {
    pub(crate) target: Target,
    /// Opened with read access (`O_RDONLY` or `O_RDWR`, and not `O_STAT`).
    pub(crate) can_read: bool,
    /// Opened with write access (`O_WRONLY` or `O_RDWR`, and not `O_STAT`).
    pub(crate) can_write: bool,
    /// Opened with `O_STAT`: fstat/fsize/fpath/close only, no I/O and no fsync.
    pub(crate) stat_only: bool,
    /// Who opened it (for logs; access was checked at open).
    pub(crate) ctx: CallerCtx,
    /// The disk and kind this I/O handle holds in the whole-disk/partition exclusion
    /// (`None` for the root and `O_STAT` handles); released exactly once, at close.
    pub(crate) holds: Option<(usize, crate::access::Holder)>,
}

/// The handle table.
#[derive(Debug)]
pub(crate) struct HandleTable {
    /// The next id to hand out. Starts at 1 and only grows (checked, never wraps), so an id is
    /// never reused and 0 is never valid.
    next_id: AtomicUsize,
    /// Open handles by id. Invariant: the lock is held only for a map lookup, insert or remove
    /// — never during device I/O (callers clone the `Arc` out). Those operations leave the map
    /// consistent even if a panic poisons the mutex, so poisoning is recovered with
    /// `into_inner`.
    map: Mutex<HashMap<usize, Arc<Handle>>>,
}

impl HandleTable {
    pub(crate) fn new() -> Self {
        Self {
            next_id: AtomicUsize::new(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<usize, Arc<Handle>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores `handle` under a fresh id. `EMFILE` if the id space is exhausted.
    pub(crate) fn insert(&self, handle: Handle) -> Result<usize> {
        let id = self
            .next_id
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1))
            .map_err(|_| Error::new(EMFILE))?;
        self.map().insert(id, Arc::new(handle));
        Ok(id)
    }

    /// The handle with this id; `EBADF` if unknown or closed.
    pub(crate) fn get(&self, id: usize) -> Result<Arc<Handle>> {
        self.map().get(&id).cloned().ok_or(Error::new(EBADF))
    }

    /// Removes the handle; `EBADF` if unknown or already closed.
    pub(crate) fn remove(&self, id: usize) -> Result<Arc<Handle>> {
        self.map().remove(&id).ok_or(Error::new(EBADF))
    }

    /// Number of open handles (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> Handle {
        Handle {
            target: Target::Root {
                listing: Vec::new(),
            },
            can_read: true,
            can_write: false,
            stat_only: false,
            ctx: CallerCtx::default(),
            holds: None,
        }
    }

    #[test]
    fn poisoned_table_keeps_working() {
        let table = Arc::new(HandleTable::new());
        let a = table.insert(root()).unwrap();
        let t = table.clone();
        let r = std::thread::spawn(move || {
            let _guard = t.map.lock();
            panic!("poison the handle table");
        })
        .join();
        assert!(r.is_err());
        assert!(table.map.is_poisoned());
        assert!(table.get(a).is_ok());
        let b = table.insert(root()).unwrap();
        assert!(b > a);
        table.remove(a).unwrap();
        assert_eq!(table.get(a).unwrap_err().errno, EBADF);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn exhausted_ids_are_emfile_not_reuse() {
        let table = HandleTable::new();
        table.next_id.store(usize::MAX - 1, Ordering::Relaxed);
        assert_eq!(table.insert(root()).unwrap(), usize::MAX - 1);
        assert_eq!(table.insert(root()).unwrap_err().errno, EMFILE);
        assert_eq!(table.insert(root()).unwrap_err().errno, EMFILE);
    }
}
