//! Request-queue steering for a multi-queue virtio-scsi host: which request virtqueue a new SCSI
//! command goes to. Owns the policies (`PerTarget`, the seed of DESIGN.md §3; `PerCpu`, what
//! blk-mq Linux does; `Single`, the baseline), the per-target lock choice used by `PerTarget`
//! (seqcount, or a spinlock / mutex for benchmarking), statistics, and the invariant checks.
//!
//! ```
//! use target_steering::{LockKind, Policy, Steering};
//!
//! let steering = Steering::new(Policy::PerTarget, LockKind::Seqcount, 4, 8);
//! let first = steering.pick(3, 2); // target 3, submitted on CPU 2: moves to queue 2
//! let second = steering.pick(3, 1); // joins the request in flight
//! assert_eq!((first.queue(), second.queue()), (2, 2));
//! drop((first, second)); // completes both
//! assert_eq!(steering.pick(3, 1).queue(), 1); // idle target: follows the CPU
//! ```
//!
//! Targets at or beyond `ntargets` do not panic: they share one overflow slot. All of them then
//! steer together, which still keeps every single target's requests on one queue (the
//! invariant is per target; sharing the state only makes it coarser).

use std::fmt;
use std::str::FromStr;

use core::sync::atomic::Ordering::Relaxed;
use crossbeam_utils::CachePadded;

mod invariant;
mod locked;
mod seqcount;
mod sync;

pub use invariant::{InvariantViolation, Tracked, Tracker};

use locked::{MutexTarget, SpinTarget};
use seqcount::{Faithful, SeqTarget};
use sync::StatCounter;

/// The most targets a `Steering` keeps separate state for (a virtio-scsi target id is a `u8`).
pub const MAX_TARGETS: usize = 256;

/// How a request queue is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// All in-flight requests of a target on one queue; an idle target moves to the queue of the
    /// CPU that submits its next request (DESIGN.md §3, the seed).
    #[default]
    PerTarget,
    /// Queue = submitting CPU mod number of queues, no per-target state (blk-mq Linux).
    PerCpu,
    /// Always queue 0 (the baseline).
    Single,
}

impl Policy {
    /// The names accepted by `FromStr` and printed by `Display`.
    pub const NAMES: [&'static str; 3] = ["per-target", "per-cpu", "single"];

    fn name(self) -> &'static str {
        match self {
            Policy::PerTarget => "per-target",
            Policy::PerCpu => "per-cpu",
            Policy::Single => "single",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Policy, ParseError> {
        match s {
            "per-target" => Ok(Policy::PerTarget),
            "per-cpu" => Ok(Policy::PerCpu),
            "single" => Ok(Policy::Single),
            _ => Err(ParseError {
                what: "steering policy",
                input: s.to_string(),
                expected: &Policy::NAMES,
            }),
        }
    }
}

/// What protects the per-target state of `Policy::PerTarget`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LockKind {
    /// Lock-free readers, one writer per target (the seed).
    #[default]
    Seqcount,
    /// A test-and-test-and-set spinlock around {reqs, req_vq} (Linux before the seqcount
    /// patch). For benchmarking.
    Spinlock,
    /// A `std::sync::Mutex`. For benchmarking.
    Mutex,
}

impl LockKind {
    /// The names accepted by `FromStr` and printed by `Display`.
    pub const NAMES: [&'static str; 3] = ["seqcount", "spinlock", "mutex"];

    fn name(self) -> &'static str {
        match self {
            LockKind::Seqcount => "seqcount",
            LockKind::Spinlock => "spinlock",
            LockKind::Mutex => "mutex",
        }
    }
}

impl fmt::Display for LockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LockKind {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<LockKind, ParseError> {
        match s {
            "seqcount" => Ok(LockKind::Seqcount),
            "spinlock" => Ok(LockKind::Spinlock),
            "mutex" => Ok(LockKind::Mutex),
            _ => Err(ParseError {
                what: "lock kind",
                input: s.to_string(),
                expected: &LockKind::NAMES,
            }),
        }
    }
}

/// An unknown `Policy` or `LockKind` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    what: &'static str,
    input: String,
    expected: &'static [&'static str],
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown {} {:?} (expected one of: {})",
            self.what,
            self.input,
            self.expected.join(", ")
        )
    }
}

impl std::error::Error for ParseError {}

/// Counters since construction. Cheap relaxed counters, read without stopping traffic, so the
/// numbers are only approximately simultaneous.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SteeringStats {
    /// Seqcount readers that had to try again (found the writer mid-section), all targets.
    pub seq_retries: u64,
    /// Seqcount writers whose re-check found readers already joined, so kept the old queue.
    pub writer_kept: u64,
    /// Times each target (index = target id, `ntargets` entries) moved to a different queue.
    pub changes_per_target: Vec<u64>,
    /// Queue changes of the shared slot for targets at or beyond `ntargets`.
    pub overflow_changes: u64,
    /// Picks per queue (`nqueues` entries); all zero when pick counting is off.
    pub picks_per_queue: Vec<u64>,
}

/// The per-policy state.
enum Targets {
    PerCpu,
    Single,
    Seqcount(Box<[CachePadded<SeqTarget>]>),
    Spinlock(Box<[CachePadded<SpinTarget>]>),
    Mutex(Box<[CachePadded<MutexTarget>]>),
}

/// Chooses a request queue for each new request. `Send + Sync`: share it (`&` or `Arc`) between
/// all submitting and completing threads.
pub struct Steering {
    policy: Policy,
    lock: LockKind,
    nqueues: usize,
    ntargets: usize,
    count_picks: bool,
    targets: Targets,
    picks: Box<[CachePadded<StatCounter>]>,
}

impl fmt::Debug for Steering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Steering")
            .field("policy", &self.policy)
            .field("lock", &self.lock)
            .field("nqueues", &self.nqueues)
            .field("ntargets", &self.ntargets)
            .field("count_picks", &self.count_picks)
            .finish_non_exhaustive()
    }
}

fn slots<T>(n: usize, new: impl Fn() -> T) -> Box<[CachePadded<T>]> {
    (0..n).map(|_| CachePadded::new(new())).collect()
}

impl Steering {
    /// A steering for `nqueues` request queues (numbered from 0) and targets `0..ntargets`
    /// (at most [`MAX_TARGETS`]; more is clamped, see the crate doc for targets beyond it).
    /// `lock` only matters for `Policy::PerTarget`. Pick counting is on.
    ///
    /// # Panics
    /// If `nqueues` is 0.
    pub fn new(policy: Policy, lock: LockKind, nqueues: usize, ntargets: usize) -> Steering {
        assert!(
            nqueues >= 1,
            "a virtio-scsi device has at least one request queue"
        );
        let ntargets = ntargets.min(MAX_TARGETS);
        // One more slot than targets for the overflow, unless every u8 is a target already.
        let nslots = (ntargets + 1).min(MAX_TARGETS);
        let targets = match (policy, lock) {
            (Policy::PerCpu, _) => Targets::PerCpu,
            (Policy::Single, _) => Targets::Single,
            (Policy::PerTarget, LockKind::Seqcount) => {
                Targets::Seqcount(slots(nslots, SeqTarget::new))
            }
            (Policy::PerTarget, LockKind::Spinlock) => {
                Targets::Spinlock(slots(nslots, SpinTarget::new))
            }
            (Policy::PerTarget, LockKind::Mutex) => Targets::Mutex(slots(nslots, MutexTarget::new)),
        };
        Steering {
            policy,
            lock,
            nqueues,
            ntargets,
            count_picks: true,
            targets,
            picks: slots(nqueues, || StatCounter::new(0)),
        }
    }

    /// Turns counting picks per queue on or off (on by default). The count is one relaxed
    /// increment per pick on a per-queue cache line; with many threads submitting to the same
    /// queue that line is contended, so the benchmarks turn it off.
    pub fn with_pick_counts(mut self, enabled: bool) -> Steering {
        self.count_picks = enabled;
        self
    }

    /// The policy chosen at construction.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The lock kind chosen at construction (only used by `Policy::PerTarget`).
    pub fn lock_kind(&self) -> LockKind {
        self.lock
    }

    /// The number of request queues.
    pub fn nqueues(&self) -> usize {
        self.nqueues
    }

    /// The number of targets with their own state.
    pub fn ntargets(&self) -> usize {
        self.ntargets
    }

    /// Picks the queue for a new request to `target` submitted on `cpu`; the returned guard
    /// calls `complete` on drop (after the caller's last use of the queue).
    #[inline]
    pub fn pick(&self, target: u8, cpu: usize) -> Picked<'_> {
        Picked {
            steering: self,
            target,
            queue: self.pick_raw(target, cpu),
        }
    }

    /// Like [`Steering::pick`] without the guard: every call must be matched by exactly one
    /// [`Steering::complete_raw`] for the same target, after the last use of the queue.
    #[inline]
    pub fn pick_raw(&self, target: u8, cpu: usize) -> usize {
        let q = match &self.targets {
            Targets::PerCpu => cpu % self.nqueues,
            Targets::Single => 0,
            Targets::Seqcount(t) => t[slot(t, target)].pick::<Faithful>(self.nqueues, cpu),
            Targets::Spinlock(t) => t[slot(t, target)].pick(self.nqueues, cpu),
            Targets::Mutex(t) => t[slot(t, target)].pick(self.nqueues, cpu),
        };
        self.count(q);
        q
    }

    /// A request of `target` picked with [`Steering::pick_raw`] completed.
    #[inline]
    pub fn complete_raw(&self, target: u8) {
        match &self.targets {
            Targets::PerCpu | Targets::Single => {}
            Targets::Seqcount(t) => t[slot(t, target)].complete(),
            Targets::Spinlock(t) => t[slot(t, target)].complete(),
            Targets::Mutex(t) => t[slot(t, target)].complete(),
        }
    }

    #[inline]
    fn count(&self, q: usize) {
        if self.count_picks {
            self.picks[q].fetch_add(1, Relaxed);
        }
    }

    /// Checks the steering invariant for a request in flight: under `Policy::PerTarget` the
    /// target's current queue (read consistently) must be the one `picked` got, since no other
    /// queue can be installed while a request of the target is in flight; under
    /// `Policy::Single` it must be 0. Always `Ok` under `Policy::PerCpu`, which spreads a
    /// target's requests by design. Cheap enough for live traffic (a seqcount read).
    pub fn check_invariant(&self, picked: &Picked<'_>) -> Result<(), InvariantViolation> {
        self.check_invariant_raw(picked.target, picked.queue)
    }

    /// [`Steering::check_invariant`] for a request picked with [`Steering::pick_raw`], which
    /// must still be in flight (not yet completed); otherwise the answer means nothing.
    pub fn check_invariant_raw(&self, target: u8, queue: usize) -> Result<(), InvariantViolation> {
        let current = match &self.targets {
            Targets::PerCpu => return Ok(()),
            Targets::Single => 0,
            Targets::Seqcount(t) => t[slot(t, target)].current(),
            Targets::Spinlock(t) => t[slot(t, target)].current(),
            Targets::Mutex(t) => t[slot(t, target)].current(),
        };
        if current == queue {
            Ok(())
        } else {
            Err(InvariantViolation {
                target,
                in_flight_queue: current,
                picked_queue: queue,
                in_flight: 0,
            })
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> SteeringStats {
        let mut stats = SteeringStats {
            picks_per_queue: self.picks.iter().map(|c| c.load(Relaxed)).collect(),
            ..SteeringStats::default()
        };
        let changes: Vec<u64> = match &self.targets {
            Targets::PerCpu | Targets::Single => vec![0; self.ntargets],
            Targets::Seqcount(t) => t
                .iter()
                .map(|t| {
                    let (retries, kept, changes) = t.stats();
                    stats.seq_retries += retries;
                    stats.writer_kept += kept;
                    changes
                })
                .collect(),
            Targets::Spinlock(t) => t.iter().map(|t| t.changes()).collect(),
            Targets::Mutex(t) => t.iter().map(|t| t.changes()).collect(),
        };
        stats.overflow_changes = changes.get(self.ntargets).copied().unwrap_or(0);
        stats.changes_per_target = changes;
        stats.changes_per_target.truncate(self.ntargets);
        stats
    }
}

/// The slot of `target`: its own, or the last (overflow) one.
#[inline]
fn slot<T>(slots: &[T], target: u8) -> usize {
    usize::from(target).min(slots.len() - 1)
}

/// A request in flight: the queue it was steered to. Dropping it completes the request, so drop
/// it after the last use of the queue (it is `Send`: a completion thread may drop it).
#[must_use = "dropping the guard completes the request at once"]
#[derive(Debug)]
pub struct Picked<'a> {
    steering: &'a Steering,
    target: u8,
    queue: usize,
}

impl Picked<'_> {
    /// The request queue (0-based index among the request queues).
    #[inline]
    pub fn queue(&self) -> usize {
        self.queue
    }

    /// The target the request is for.
    #[inline]
    pub fn target(&self) -> u8 {
        self.target
    }
}

impl Drop for Picked<'_> {
    #[inline]
    fn drop(&mut self) {
        self.steering.complete_raw(self.target);
    }
}

/// Deliberately broken versions of the seqcount algorithm, for the loom model to show that it
/// catches them (only with `--cfg loom`).
#[cfg(loom)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flaw {
    /// The writer does not keep the previous queue when its re-check finds readers joined.
    NoKeepOnRecheck,
    /// The writer does not make `seq` odd (and even again) around its section.
    NoSeqBumps,
    /// The writer's re-check of `reqs` is a plain load instead of an RMW.
    PlainLoadRecheck,
}

#[cfg(loom)]
impl Steering {
    /// `pick_raw` with a flawed seqcount writer (`Policy::PerTarget` + `LockKind::Seqcount`
    /// only). Complete with `complete_raw`.
    pub fn pick_raw_flawed(&self, flaw: Flaw, target: u8, cpu: usize) -> usize {
        use seqcount::flawed::*;
        let Targets::Seqcount(t) = &self.targets else {
            panic!("pick_raw_flawed needs PerTarget + Seqcount");
        };
        let t = &t[slot(t, target)];
        let q = match flaw {
            Flaw::NoKeepOnRecheck => t.pick::<NoKeepOnRecheck>(self.nqueues, cpu),
            Flaw::NoSeqBumps => t.pick::<NoSeqBumps>(self.nqueues, cpu),
            Flaw::PlainLoadRecheck => t.pick::<PlainLoadRecheck>(self.nqueues, cpu),
        };
        self.count(q);
        q
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn types_are_send_and_sync() {
        assert_send_sync::<Steering>();
        assert_send_sync::<Picked<'static>>();
        assert_send_sync::<Tracker>();
        assert_send_sync::<Tracked<'static>>();
    }

    #[test]
    fn overflow_targets_share_the_last_slot() {
        let s = Steering::new(Policy::PerTarget, LockKind::Seqcount, 4, 2);
        let a = s.pick(2, 1);
        let b = s.pick(200, 3); // same overflow slot: joins `a`
        assert_eq!((a.queue(), b.queue()), (1, 1));
        let c = s.pick(1, 3); // own slot
        assert_eq!(c.queue(), 3);
        drop((a, b, c));
        let st = s.stats();
        assert_eq!(st.changes_per_target, vec![0, 1]);
        assert_eq!(st.overflow_changes, 1);
        assert_eq!(st.picks_per_queue, vec![0, 2, 0, 1]);
    }

    #[test]
    fn all_256_targets_have_their_own_slot() {
        let s = Steering::new(Policy::PerTarget, LockKind::Spinlock, 3, 1000);
        assert_eq!(s.ntargets(), MAX_TARGETS);
        let a = s.pick(255, 1);
        let b = s.pick(254, 2);
        assert_eq!((a.queue(), b.queue()), (1, 2));
        assert_eq!(s.stats().overflow_changes, 0);
    }

    #[test]
    fn zero_targets_all_share_one_slot() {
        let s = Steering::new(Policy::PerTarget, LockKind::Mutex, 2, 0);
        let a = s.pick(0, 1);
        let b = s.pick(9, 0);
        assert_eq!((a.queue(), b.queue()), (1, 1));
    }

    #[test]
    #[should_panic(expected = "at least one request queue")]
    fn zero_queues_panics() {
        let _ = Steering::new(Policy::PerCpu, LockKind::Seqcount, 0, 1);
    }
}
