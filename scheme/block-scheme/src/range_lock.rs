//! Per-disk byte-range write lock: every write holds the (block-aligned) byte range it touches
//! for as long as it writes, so a read-modify-write of a shared edge block can never lose a
//! neighbour's bytes, while writes to disjoint blocks run concurrently. An asynchronous write
//! (one that outlives the call that started it) holds its range with an [`OwnedRangeGuard`],
//! taken only if no wait is needed.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// A set of held, pairwise disjoint byte ranges of one disk.
///
/// Design: a plain list behind one mutex plus a condition variable. The list holds one entry
/// per write in flight on the disk, so it stays short (bounded by the number of server
/// threads) and a linear overlap scan is cheaper than any tree. A writer whose range overlaps
/// a held one sleeps on the condition variable until some range is released, then re-checks.
/// There is no FIFO fairness among writers to overlapping ranges (a writer can in principle be
/// overtaken repeatedly); writes to disjoint ranges never wait for each other.
#[derive(Debug, Default)]
pub(crate) struct RangeLock {
    /// The ranges `[start, end)` (bytes, aligned out to whole blocks by the caller) currently
    /// held by writers.
    ///
    /// Invariant: no entry is empty (`start < end`) and no two entries overlap. An entry is
    /// pushed only after a scan under this mutex found no overlap, and removed exactly once by
    /// its [`RangeGuard`]'s `Drop` (which also runs when a writer unwinds from a panic in the
    /// device). The critical sections only scan, push and remove, so a poisoned mutex cannot
    /// hold a broken list: poisoning is recovered with `into_inner`.
    held: Mutex<Vec<(u64, u64)>>,
    /// Signalled (notify_all) whenever a range is released.
    released: Condvar,
}

/// Proof that a byte range is held; releases it when dropped.
#[derive(Debug)]
pub(crate) struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

/// A held byte range that owns (an `Arc` of) its lock, for a write that outlives the call
/// that started it; releases the range when dropped, like [`RangeGuard`].
#[derive(Debug)]
pub(crate) struct OwnedRangeGuard {
    lock: Arc<RangeLock>,
    range: (u64, u64),
}

impl RangeLock {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn list(&self) -> MutexGuard<'_, Vec<(u64, u64)>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks until `[start, end)` overlaps no held range, then holds it. An empty range
    /// (`start >= end`) conflicts with nothing and is not recorded.
    pub(crate) fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        if start >= end {
            return RangeGuard {
                lock: self,
                range: (start, start),
            };
        }
        let mut held = self.list();
        while held.iter().any(|&(s, e)| s < end && start < e) {
            held = self
                .released
                .wait(held)
                .unwrap_or_else(PoisonError::into_inner);
        }
        held.push((start, end));
        RangeGuard {
            lock: self,
            range: (start, end),
        }
    }

    /// Holds `[start, end)` (non-empty) if it overlaps no held range now; `None` (nothing
    /// held) if taking it would have to wait. Never blocks beyond the list's mutex.
    pub(crate) fn try_lock_owned(
        self: &Arc<Self>,
        start: u64,
        end: u64,
    ) -> Option<OwnedRangeGuard> {
        if start >= end {
            return None;
        }
        let mut held = self.list();
        if held.iter().any(|&(s, e)| s < end && start < e) {
            return None;
        }
        // At most one entry per write in flight: the list grows to its peak once, then
        // pushing reuses its capacity.
        held.push((start, end));
        Some(OwnedRangeGuard {
            lock: self.clone(),
            range: (start, end),
        })
    }

    /// Releases a range taken by `lock` or `try_lock_owned` (exactly once, by its guard).
    fn release(&self, range: (u64, u64)) {
        let (start, end) = range;
        if start >= end {
            return;
        }
        let mut held = self.list();
        // Entries are disjoint and non-empty, so exactly one equals ours.
        if let Some(i) = held.iter().position(|&r| r == range) {
            held.swap_remove(i);
        } else {
            log::error!("range lock: released range {start}..{end} was not held");
        }
        drop(held);
        self.released.notify_all();
    }

    /// Number of ranges held right now (for tests).
    #[cfg(test)]
    pub(crate) fn held_count(&self) -> usize {
        self.list().len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.lock.release(self.range);
    }
}

impl Drop for OwnedRangeGuard {
    fn drop(&mut self) {
        self.lock.release(self.range);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn disjoint_ranges_do_not_block() {
        let l = RangeLock::new();
        let a = l.lock(0, 512);
        let b = l.lock(512, 1024);
        let c = l.lock(4096, 8192);
        assert_eq!(l.held_count(), 3);
        drop((a, b, c));
        assert_eq!(l.held_count(), 0);
    }

    #[test]
    fn empty_range_is_not_recorded() {
        let l = RangeLock::new();
        let _a = l.lock(0, 512);
        let _e = l.lock(100, 100);
        assert_eq!(l.held_count(), 1);
    }

    #[test]
    fn overlapping_range_waits_for_release() {
        let l = Arc::new(RangeLock::new());
        let g = l.lock(0, 1024);
        let entered = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, entered) = (l.clone(), entered.clone());
            std::thread::spawn(move || {
                let _g = l.lock(1023, 2048);
                entered.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !entered.load(Ordering::SeqCst),
            "overlapping lock was granted"
        );
        drop(g);
        t.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
        assert_eq!(l.held_count(), 0);
    }

    #[test]
    fn owned_try_lock_never_waits_and_excludes_blocking_writers() {
        let l = Arc::new(RangeLock::new());
        let g = l.lock(0, 1024);
        assert!(l.try_lock_owned(512, 2048).is_none(), "overlap must refuse");
        assert!(
            l.try_lock_owned(5, 5).is_none(),
            "empty range is not a hold"
        );
        assert_eq!(l.held_count(), 1);
        let o = l.try_lock_owned(1024, 2048).expect("disjoint range");
        assert_eq!(l.held_count(), 2);
        drop(g);
        // A blocking writer waits for the owned guard.
        let entered = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, entered) = (l.clone(), entered.clone());
            std::thread::spawn(move || {
                let _g = l.lock(2047, 4096);
                entered.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst));
        drop(o);
        t.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
        assert_eq!(l.held_count(), 0);
    }

    #[test]
    fn released_on_panic() {
        let l = Arc::new(RangeLock::new());
        let l2 = l.clone();
        let r = std::thread::spawn(move || {
            let _g = l2.lock(0, 512);
            panic!("writer dies while holding the range");
        })
        .join();
        assert!(r.is_err());
        assert_eq!(l.held_count(), 0);
        let _g = l.lock(0, 512);
    }
}
