//! The synchronization primitives the steering code is written against: `std`'s in a normal
//! build, `loom`'s under `--cfg loom`, so that the loom model (tests/loom.rs) explores exactly
//! the production code. Also the spin-then-yield wait used by seqcount readers and the spinlock.

#[cfg(loom)]
pub(crate) use loom::sync::Mutex;
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicUsize, fence};

#[cfg(not(loom))]
pub(crate) use std::sync::Mutex;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicUsize, fence};

/// Statistics counters. They are not part of any synchronization protocol (every access is
/// `Relaxed`, nothing is ordered by them, nobody decides anything from them), so they stay
/// `std` atomics even under loom: modelling them would only multiply the interleavings loom
/// explores without checking anything.
pub(crate) type StatCounter = std::sync::atomic::AtomicU64;

/// How many exponential spin steps (1, 2, 4, … 64 `spin_loop` hints, 127 in all — a few
/// microseconds) a waiter makes before it starts yielding its CPU.
const SPIN_STEPS: u32 = 7;

/// Waiting for another thread that is inside a short critical section (a seqcount writer, a
/// spinlock holder).
///
/// In the kernel that thread runs with interrupts off and cannot be preempted, so spinning is
/// always short. In userspace it can be preempted in the middle of its section; spinning then
/// only burns the waiter's time slice while the thread it waits for is not running (on this
/// 2-core machine with 4 threads that is common). So: spin briefly (the usual case, the other
/// thread is running and finishes within nanoseconds), then `yield_now` so the scheduler can
/// run the preempted thread.
///
/// Under loom every wait is a `loom::thread::yield_now`, which tells the model checker that
/// this thread cannot make progress until another one runs (without it a spin loop would be an
/// unbounded number of interleavings).
///
/// Loom cannot model two threads spin-waiting on a third (its scheduler may alternate between
/// the two waiters forever: tokio-rs/loom issue #53), so under loom a wait that has failed
/// `MODEL_WAIT_LIMIT` times stops further exploration of that execution (`loom::skip_branch`,
/// after which the default schedule runs the thread everyone waits for). This loses no
/// outcome: a failed wait iteration only loads (and bumps an unmodelled statistics counter), so
/// deleting it from an execution leaves a valid execution with the same results, and such an
/// execution with fewer failed iterations is among those explored.
pub(crate) struct Backoff {
    #[cfg(not(loom))]
    spin: crossbeam_utils::Backoff,
    #[cfg(not(loom))]
    steps: u32,
    #[cfg(loom)]
    waits: u32,
}

#[cfg(loom)]
const MODEL_WAIT_LIMIT: u32 = 3;

impl Backoff {
    #[inline]
    pub(crate) fn new() -> Self {
        Backoff {
            #[cfg(not(loom))]
            spin: crossbeam_utils::Backoff::new(),
            #[cfg(not(loom))]
            steps: 0,
            #[cfg(loom)]
            waits: 0,
        }
    }

    /// Waits a little: a short, growing spin at first, then a `yield_now` each call.
    #[inline]
    pub(crate) fn snooze(&mut self) {
        #[cfg(not(loom))]
        {
            if self.steps < SPIN_STEPS {
                self.spin.spin();
                self.steps += 1;
            } else {
                std::thread::yield_now();
            }
        }
        #[cfg(loom)]
        {
            let _ = SPIN_STEPS;
            self.waits += 1;
            if self.waits == MODEL_WAIT_LIMIT {
                loom::skip_branch();
            }
            loom::thread::yield_now();
        }
    }
}
