//! Per-target steering state protected by a seqcount — DESIGN.md §3, the seed algorithm — with
//! its invariants and memory-ordering argument written next to the data.

use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use crate::sync::{AtomicUsize, Backoff, StatCounter, fence};

/// The steering state of one SCSI target (one slot of `Steering`; the caller cache-pads it).
///
/// # What the fields mean
///
/// * `reqs` counts the target's in-flight requests: +1 at the start of `pick`, −1 in
///   `complete`. The request whose increment takes it from 0 to 1 is the *writer* of this
///   "epoch" (the stretch of time during which `reqs` stays above 0); every other request of
///   the epoch is a *reader*.
/// * `req_vq` is the request queue the target is on. A new target starts on queue 0.
/// * `seq` is a sequence counter: even = `req_vq` is stable, odd = the epoch's writer is in its
///   section and may be replacing `req_vq`.
///
/// # Invariants
///
/// 1. All in-flight requests of the target are on one request queue (the point of steering:
///    the device then sees a target's commands in submission order on one virtqueue).
/// 2. A reader never returns a queue that a concurrent writer is replacing.
/// 3. `req_vq` and `seq` are written only by the epoch's writer, inside its section. There is at
///    most one writer at a time: a new writer needs `reqs` to go 0 → 1, which cannot happen
///    while the previous writer's request is still counted. So writers never race each other.
/// 4. Decrements of `reqs` are never concurrent with writes of `req_vq` that matter: before the
///    decrement `reqs` is ≥ 1, so no new writer can start; after it the completing request no
///    longer uses `req_vq` (`complete` is called after the caller's last use of the queue), so
///    a new epoch may change it. Hence `complete` is a bare `fetch_sub`, outside any section.
/// 5. While a request is in flight, `req_vq` (read stably) equals the queue that request got.
///    (The writer of the epoch either set it, or kept it because readers had already joined; no
///    other writer can run until the request completes.) `Steering::check_invariant` tests
///    exactly this on live traffic.
///
/// # Memory ordering (how Rust atomics implement the above)
///
/// * `reqs.fetch_add(1, Acquire)` at the start of `pick`, `reqs.fetch_sub(1, Release)` in
///   `complete`. Every modification of `reqs` is a read-modify-write, so every later RMW extends
///   the release sequence of an earlier `Release` decrement: the new writer (whose increment
///   read 0) thereby *happens after* every completion of the previous epoch, hence after the
///   previous writer's last `seq`/`req_vq` stores. That is why the writer may read `seq` and
///   `req_vq` with `Relaxed` loads (it sees the latest values: nobody else writes them), and
///   why the caller's last use of the queue happens before the next epoch changes it.
/// * Writer, first bump: `seq.store(s + 1, Relaxed)` followed by `fence(Release)`. The fence
///   does two jobs:
///   - (standard seqlock) it orders the odd `seq` before the later relaxed `req_vq` store: a
///     reader whose relaxed load of `req_vq` sees the new value, and that then executes its
///     `fence(Acquire)`, synchronizes with this fence, so its re-check of `seq` sees at least
///     `s + 1` and it retries instead of returning a value read mid-update. Without the fence
///     the `req_vq` store could become visible before `seq` turned odd.
///   - (the re-check) it orders the odd `seq` before the re-check RMW on `reqs` below. This
///     is the job the algorithm cannot do without (see "Reader" for the first one).
/// * Writer, re-check: `reqs.fetch_add(0, Relaxed)`, an RMW, not a load. An RMW reads the
///   *latest* value in `reqs`'s modification order, which splits every reader R of the epoch
///   into two cases:
///   - R's increment comes before the re-check: the re-check sees `reqs > 1` (unless R has
///     already completed, in which case R no longer uses a queue), and the writer keeps the
///     old `req_vq` — whatever R reads (before, during or after the section) is that value.
///   - R's increment comes after the re-check: it reads the value written by the re-check or
///     by a later RMW, i.e. something in the release sequence the re-check heads; with the
///     writer's `fence(Release)` before the re-check and R's `Acquire` increment, the fence
///     synchronizes with R's increment. So R's loads of `seq` see at least the odd `s + 1`:
///     R waits for the writer and then reads the new `req_vq`.
///
///   A plain load cannot split the cases: "writer stores `seq`, then loads `reqs`" against
///   "reader RMWs `reqs`, then loads `seq`" is the store-buffering pattern, and both loads may
///   see the old values — the writer installs a new queue while a reader returns the old one
///   (the loom model shows it: flaw `PlainLoadRecheck`). The other cure is a `SeqCst` fence on
///   both sides, which would put a full barrier on every reader's path; the RMW puts it only
///   on the writer (on x86 both the RMW and the readers' increment are one `lock xadd`).
/// * Writer, last bump: `seq.store(s + 2, Release)`. A reader whose `Acquire` load of `seq`
///   reads this value sees the `req_vq` written before it.
/// * Reader: `s1 = seq.load(Acquire)`; if odd, wait; `q = req_vq.load(Relaxed)`;
///   `fence(Acquire)`; `s2 = seq.load(Relaxed)`; return `q` if `s1 == s2`. The acquire load
///   pairs with the writer's last bump; the fence makes the re-check see any bump that came
///   before a `req_vq` store which the relaxed load observed (see the first bump). The loads
///   themselves can be relaxed-after-fence because all ordering comes from the fence.
///
///   Of all the orderings here, only this fence and re-check are not load-bearing *given the
///   RMW re-check of the writer*: by the case split above, a reader that reads the pre-bump
///   `seq` is one the writer keeps the old queue for, so it cannot observe a replaced
///   `req_vq` at all. (The loom model passes with the fence deleted, and fails with any other
///   ordering above weakened to `Relaxed` or the writer's fence deleted.) It stays: it is the
///   standard seqcount read, it keeps readers correct on their own should the writer side
///   change, and on x86 it costs one more load of a line already in cache (an acquire fence
///   emits no instruction there).
/// * `req_vq` is an atomic even though the seqcount already tells a reader whether its value is
///   consistent: in Rust a racy non-atomic read is undefined behaviour even if its result is
///   discarded, and a relaxed word-sized load costs the same as a plain one.
/// * Statistics counters are `Relaxed` and order nothing (see `sync::StatCounter`).
///
/// # Why readers cannot livelock, though they spin and the writer can be preempted
///
/// A reader waits only while `seq` is odd or has changed under it. `seq` changes only in the
/// epoch writer's section, which is a fixed, short sequence of instructions that never waits for
/// anyone (no loop, no lock, no dependence on readers), so once the writer runs again it
/// finishes. After its last bump `seq` cannot change again while the reader is in flight (a new
/// writer needs `reqs` to reach 0, and the reader is counted in it), so the reader's next try
/// succeeds. At most one writer exists per target (invariant 3), so readers never wait for one
/// another and no cycle of waiting is possible. The only wait is for a preempted writer to be
/// scheduled again, which is why readers yield after a short spin instead of spinning on.
///
/// `seq` is a `usize` and wraps. A reader could be fooled only if `seq` went all the way round
/// (2^(bits−1) sections) between its two loads; while it is in flight at most one section (its
/// epoch's) can run at all.
pub(crate) struct SeqTarget {
    reqs: AtomicUsize,
    seq: AtomicUsize,
    req_vq: AtomicUsize,
    /// Times a reader had to try again (odd `seq`, or `seq` changed during the read).
    retries: StatCounter,
    /// Writer sections that found readers already joined and kept the previous queue.
    kept: StatCounter,
    /// Writer sections that moved the target to a different queue.
    changes: StatCounter,
}

/// Compile-time switches for the loom model's deliberately broken variants. Production code is
/// only ever instantiated with [`Faithful`], so the `if F::...` tests below are constants and
/// vanish: no runtime branch on the hot path.
pub(crate) trait Flavor {
    /// Keep the previous queue when the writer's re-check finds readers already joined.
    const KEEP_ON_RECHECK: bool = true;
    /// The writer makes `seq` odd, then even again, around its section.
    const WRITER_BUMPS_SEQ: bool = true;
    /// The writer's re-check is an RMW (`fetch_add(0)`) rather than a plain load.
    const RECHECK_IS_RMW: bool = true;
}

/// DESIGN.md §3 as written (its "if reqs > 1" done as an RMW, see "Writer, re-check").
pub(crate) struct Faithful;
impl Flavor for Faithful {}

impl SeqTarget {
    pub(crate) fn new() -> Self {
        SeqTarget {
            reqs: AtomicUsize::new(0),
            seq: AtomicUsize::new(0),
            req_vq: AtomicUsize::new(0),
            retries: StatCounter::new(0),
            kept: StatCounter::new(0),
            changes: StatCounter::new(0),
        }
    }

    /// Picks the queue for a new request of this target submitted on `cpu`.
    #[inline]
    pub(crate) fn pick<F: Flavor>(&self, nqueues: usize, cpu: usize) -> usize {
        if self.reqs.fetch_add(1, Acquire) > 0 {
            // Others are in flight: join them on their queue.
            self.read_req_vq()
        } else {
            // We took `reqs` from 0 to 1: we are this epoch's only writer.
            self.write_req_vq::<F>(cpu % nqueues)
        }
    }

    /// The reader side: a stable read of `req_vq`.
    #[inline]
    fn read_req_vq(&self) -> usize {
        let mut backoff = Backoff::new();
        loop {
            let s1 = self.seq.load(Acquire);
            if s1 & 1 == 0 {
                let q = self.req_vq.load(Relaxed);
                fence(Acquire);
                if self.seq.load(Relaxed) == s1 {
                    return q;
                }
            }
            // The writer is in (or just went through) its section; see the livelock note on
            // `SeqTarget`.
            self.retries.fetch_add(1, Relaxed);
            backoff.snooze();
        }
    }

    /// The writer side: the epoch's writer decides the queue.
    #[inline]
    fn write_req_vq<F: Flavor>(&self, wanted: usize) -> usize {
        // Only writers store `seq` and `req_vq`, and the previous writer's stores happen
        // before this point (through `reqs`, see above): relaxed loads see the latest values.
        let s = self.seq.load(Relaxed);
        debug_assert!(
            s & 1 == 0 || !F::WRITER_BUMPS_SEQ,
            "two seqcount writers at once"
        );
        if F::WRITER_BUMPS_SEQ {
            self.seq.store(s.wrapping_add(1), Relaxed); // odd: section begins
        }
        fence(Release); // odd `seq` before the re-check and before the `req_vq` store
        let reqs = if F::RECHECK_IS_RMW {
            self.reqs.fetch_add(0, Relaxed) // the latest count, see "Writer, re-check"
        } else {
            self.reqs.load(Relaxed)
        };
        let old = self.req_vq.load(Relaxed);
        let q = if F::KEEP_ON_RECHECK && reqs > 1 {
            // A reader slipped in between our increment and our re-check and may already use
            // `old` (it may have read it before `seq` turned odd): keep it.
            self.kept.fetch_add(1, Relaxed);
            old
        } else {
            if wanted != old {
                self.req_vq.store(wanted, Relaxed);
                self.changes.fetch_add(1, Relaxed);
            }
            wanted
        };
        if F::WRITER_BUMPS_SEQ {
            self.seq.store(s.wrapping_add(2), Release); // even: section ends, publishes `req_vq`
        }
        q
    }

    /// A request of this target completed (after the caller's last use of its queue).
    #[inline]
    pub(crate) fn complete(&self) {
        let before = self.reqs.fetch_sub(1, Release);
        debug_assert!(before > 0, "complete without a matching pick");
    }

    /// The target's queue, read stably. Meaningful as a check only while the caller has a
    /// request of this target in flight (invariant 5).
    pub(crate) fn current(&self) -> usize {
        self.read_req_vq()
    }

    /// (reader retries, writer keeps, queue changes)
    pub(crate) fn stats(&self) -> (u64, u64, u64) {
        (
            self.retries.load(Relaxed),
            self.kept.load(Relaxed),
            self.changes.load(Relaxed),
        )
    }
}

/// The loom model's broken variants (see `crate::Flaw`).
#[cfg(loom)]
pub(crate) mod flawed {
    use super::Flavor;

    /// Always installs the writer's own queue, even when readers already joined.
    pub(crate) struct NoKeepOnRecheck;
    impl Flavor for NoKeepOnRecheck {
        const KEEP_ON_RECHECK: bool = false;
    }

    /// The writer never makes `seq` odd, so readers cannot see a section in progress.
    pub(crate) struct NoSeqBumps;
    impl Flavor for NoSeqBumps {
        const WRITER_BUMPS_SEQ: bool = false;
    }

    /// The re-check is a plain relaxed load (store-buffering race with joining readers).
    pub(crate) struct PlainLoadRecheck;
    impl Flavor for PlainLoadRecheck {
        const RECHECK_IS_RMW: bool = false;
    }
}
