//! The loom model of target steering: every interleaving (and every value the memory model lets
//! a load return) of 2 and 3 threads picking and completing requests of one target from
//! different CPUs, checking that requests in flight together share a queue and that a reader
//! never returns a queue a concurrent writer is replacing. Also shows the model catching
//! deliberately broken writers (`Flaw`).
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p target-steering --release --test loom`
//! (`LOOM_MAX_PREEMPTIONS=N` overrides the default bound of 3.)
#![cfg(loom)]

use std::sync::Arc as StdArc;
use std::sync::atomic::{AtomicUsize as StdAtomicUsize, Ordering};

use loom::sync::Arc;
use loom::thread;
use target_steering::{Flaw, LockKind, Policy, Steering, Tracker};

/// Queues: 4, so CPUs 1, 2 and 3 each want a queue of their own, all different from queue 0
/// where a new target starts. Any writer that wrongly installs its queue is then visible.
const NQUEUES: usize = 4;

struct World {
    steering: Steering,
    tracker: Tracker,
}

fn world(lock: LockKind) -> Arc<World> {
    Arc::new(World {
        steering: Steering::new(Policy::PerTarget, lock, NQUEUES, 1).with_pick_counts(false),
        tracker: Tracker::new(),
    })
}

/// One request of target 0 from `cpu`: pick, check while in flight, complete.
///
/// Two checks, both of which only ever report real violations:
/// * the `Tracker` (a mutex-protected record of the queue in flight) panics if this pick's queue
///   differs from that of another request still in flight;
/// * `check_invariant_raw` re-reads the target's queue while this request is in flight; it
///   differs from ours only if a writer replaced the queue under a request using it, which is
///   also how "a reader returned a queue a concurrent writer is replacing" shows up.
fn request(w: &World, cpu: usize, flaw: Option<Flaw>) {
    let q = match flaw {
        None => w.steering.pick_raw(0, cpu),
        Some(flaw) => w.steering.pick_raw_flawed(flaw, 0, cpu),
    };
    assert!(q < NQUEUES);
    w.tracker.begin(0, q);
    if let Err(violation) = w.steering.check_invariant_raw(0, q) {
        panic!("{violation}");
    }
    w.tracker.end(0);
    w.steering.complete_raw(0);
}

/// Runs `body` under loom with the default preemption bound (3) and reports how many
/// executions it explored.
fn check(name: &str, body: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    let runs = StdArc::new(StdAtomicUsize::new(0));
    let counter = runs.clone();
    let start = std::time::Instant::now();
    builder.check(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        body();
    });
    eprintln!(
        "{name}: {} executions in {:.2?}",
        runs.load(Ordering::Relaxed),
        start.elapsed()
    );
}

/// `threads` threads (the model's main thread is one of them), thread i on CPU i + 1, each
/// doing `requests` requests one after the other.
fn run(threads: usize, requests: usize, lock: LockKind, flaw: Option<Flaw>) {
    let w = world(lock);
    let handles: Vec<_> = (1..threads)
        .map(|i| {
            let w = w.clone();
            thread::spawn(move || {
                for _ in 0..requests {
                    request(&w, i + 1, flaw);
                }
            })
        })
        .collect();
    for _ in 0..requests {
        request(&w, 1, flaw);
    }
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(w.tracker.in_flight(0), 0);
}

#[test]
fn seqcount_two_threads() {
    check("seqcount_two_threads", || {
        run(2, 1, LockKind::Seqcount, None)
    });
}

/// Two epochs per thread: the second writer must see the first one's `seq` and `req_vq`.
#[test]
fn seqcount_two_threads_two_requests_each() {
    check("seqcount_two_threads_two_requests_each", || {
        run(2, 2, LockKind::Seqcount, None)
    });
}

#[test]
fn seqcount_three_threads() {
    check("seqcount_three_threads", || {
        run(3, 1, LockKind::Seqcount, None)
    });
}

/// One thread keeps two requests in flight at once (the second always joins the first) while
/// another thread comes and goes.
#[test]
fn seqcount_overlapping_requests_on_one_thread() {
    check("seqcount_overlapping_requests_on_one_thread", || {
        let w = world(LockKind::Seqcount);
        let w2 = w.clone();
        let other = thread::spawn(move || request(&w2, 2, None));
        let s = &w.steering;
        let a = s.pick_raw(0, 1);
        w.tracker.begin(0, a);
        let b = s.pick_raw(0, 3);
        w.tracker.begin(0, b);
        assert_eq!(a, b);
        w.tracker.end(0);
        s.complete_raw(0);
        w.tracker.end(0);
        s.complete_raw(0);
        other.join().unwrap();
    });
}

#[test]
fn spinlock_two_threads() {
    check("spinlock_two_threads", || {
        run(2, 1, LockKind::Spinlock, None)
    });
}

#[test]
fn mutex_two_threads() {
    check("mutex_two_threads", || run(2, 1, LockKind::Mutex, None));
}

// The model can fail: each broken writer below is caught.

/// Without "if reqs > 1 inside the writer section, keep the previous queue": a reader that
/// incremented `reqs` just after the writer and read the old queue before the writer's odd
/// bump is left on the old queue while the writer installs its own.
#[test]
#[should_panic(expected = "steering invariant violated")]
fn flawed_no_keep_on_recheck_is_caught() {
    check("flawed_no_keep_on_recheck_is_caught", || {
        run(2, 1, LockKind::Seqcount, Some(Flaw::NoKeepOnRecheck))
    });
}

/// Without the writer's `seq` bumps: a reader that joins after the writer's re-check reads the
/// old queue while the writer is about to replace it.
#[test]
#[should_panic(expected = "steering invariant violated")]
fn flawed_no_seq_bumps_is_caught() {
    check("flawed_no_seq_bumps_is_caught", || {
        run(2, 1, LockKind::Seqcount, Some(Flaw::NoSeqBumps))
    });
}

/// The re-check as a plain load: store buffering lets the writer miss a reader's increment
/// while the reader misses the writer's odd `seq`.
#[test]
#[should_panic(expected = "steering invariant violated")]
fn flawed_plain_load_recheck_is_caught() {
    check("flawed_plain_load_recheck_is_caught", || {
        run(2, 1, LockKind::Seqcount, Some(Flaw::PlainLoadRecheck))
    });
}
