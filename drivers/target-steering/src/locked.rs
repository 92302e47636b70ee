//! Lock-based per-target steering state, for benchmarking against the seqcount: a
//! test-and-test-and-set spinlock around {reqs, req_vq} (what Linux had before "replace target
//! spinlock with seqcount") and a `std` mutex.
//!
//! Invariants are those of `SeqTarget` (src/seqcount.rs); here they hold simply because the
//! increment of `reqs` and the read or write of `req_vq` happen together under the lock, so all
//! picks of a target are totally ordered. As in Linux, `complete` decrements `reqs` outside the
//! lock: before the decrement no new writer can start (`reqs` ≥ 1); after it the request no
//! longer uses the queue.
//!
//! Memory ordering: the lock's `Acquire`/`Release` orders everything inside it between holders,
//! so `req_vq` is accessed `Relaxed`. The increment is `Acquire` and the decrement `Release` so
//! that a new writer (increment from 0) happens after the previous epoch's completions, i.e.
//! after the callers' last use of the old queue — the same contract as the seqcount.

use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use crate::sync::{AtomicBool, AtomicUsize, Backoff, Mutex, StatCounter};

/// Per-target state guarded by a test-and-test-and-set spinlock.
pub(crate) struct SpinTarget {
    /// Held while `reqs` is incremented and `req_vq` read or written.
    locked: AtomicBool,
    /// In-flight requests of the target (incremented under the lock, decremented outside).
    reqs: AtomicUsize,
    /// The target's request queue; only accessed under `locked`.
    req_vq: AtomicUsize,
    /// Times the writer moved the target to a different queue.
    changes: StatCounter,
}

impl SpinTarget {
    pub(crate) fn new() -> Self {
        SpinTarget {
            locked: AtomicBool::new(false),
            reqs: AtomicUsize::new(0),
            req_vq: AtomicUsize::new(0),
            changes: StatCounter::new(0),
        }
    }

    #[inline]
    fn lock(&self) {
        let mut backoff = Backoff::new();
        loop {
            // Test (a shared read, no cache-line ping-pong while held), then test-and-set. A
            // compare-exchange rather than a swap: a failed attempt writes nothing (loom's
            // partial modification order also cannot place a failed swap's `true` correctly
            // against the holder's unlock, and would spin forever).
            if !self.locked.load(Relaxed)
                && self
                    .locked
                    .compare_exchange(false, true, Acquire, Relaxed)
                    .is_ok()
            {
                return;
            }
            // The holder may be preempted in userspace: spin briefly, then yield.
            backoff.snooze();
        }
    }

    #[inline]
    fn unlock(&self) {
        self.locked.store(false, Release);
    }

    #[inline]
    pub(crate) fn pick(&self, nqueues: usize, cpu: usize) -> usize {
        self.lock();
        let q = if self.reqs.fetch_add(1, Acquire) > 0 {
            self.req_vq.load(Relaxed)
        } else {
            let wanted = cpu % nqueues;
            if self.req_vq.load(Relaxed) != wanted {
                self.req_vq.store(wanted, Relaxed);
                self.changes.fetch_add(1, Relaxed);
            }
            wanted
        };
        self.unlock();
        q
    }

    #[inline]
    pub(crate) fn complete(&self) {
        let before = self.reqs.fetch_sub(1, Release);
        debug_assert!(before > 0, "complete without a matching pick");
    }

    pub(crate) fn current(&self) -> usize {
        self.lock();
        let q = self.req_vq.load(Relaxed);
        self.unlock();
        q
    }

    pub(crate) fn changes(&self) -> u64 {
        self.changes.load(Relaxed)
    }
}

/// Per-target state guarded by a `std` (or, under loom, loom's) mutex.
pub(crate) struct MutexTarget {
    /// In-flight requests of the target (incremented under the mutex, decremented outside).
    reqs: AtomicUsize,
    /// The target's request queue.
    req_vq: Mutex<usize>,
    /// Times the writer moved the target to a different queue.
    changes: StatCounter,
}

impl MutexTarget {
    pub(crate) fn new() -> Self {
        MutexTarget {
            reqs: AtomicUsize::new(0),
            req_vq: Mutex::new(0),
            changes: StatCounter::new(0),
        }
    }

    #[inline]
    pub(crate) fn pick(&self, nqueues: usize, cpu: usize) -> usize {
        // Nothing panics while the guard is held, so poisoning cannot happen; take the value
        // anyway rather than propagate a panic into the I/O path.
        let mut req_vq = self.req_vq.lock().unwrap_or_else(|e| e.into_inner());
        if self.reqs.fetch_add(1, Acquire) > 0 {
            *req_vq
        } else {
            let wanted = cpu % nqueues;
            if *req_vq != wanted {
                *req_vq = wanted;
                self.changes.fetch_add(1, Relaxed);
            }
            wanted
        }
    }

    #[inline]
    pub(crate) fn complete(&self) {
        let before = self.reqs.fetch_sub(1, Release);
        debug_assert!(before > 0, "complete without a matching pick");
    }

    pub(crate) fn current(&self) -> usize {
        *self.req_vq.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn changes(&self) -> u64 {
        self.changes.load(Relaxed)
    }
}
