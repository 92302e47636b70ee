//! The multi-threaded pick+complete loop shared by the `pick` (criterion) and `ratio`
//! (interleaved comparison) benchmarks.

use std::hint::black_box;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use target_steering::{LockKind, Steering};

/// Request queues in every benchmark: threads 0..4 ("CPUs") each want a queue of their own.
pub const NQUEUES: usize = 4;

/// The per-target lock kinds compared.
pub const LOCKS: [LockKind; 3] = [LockKind::Seqcount, LockKind::Spinlock, LockKind::Mutex];

/// `threads` threads (thread i submitting "on CPU i", so writers want different queues) each
/// run `iters` pick+complete pairs while keeping `depth - 1` other requests of their target in
/// flight; all threads use target 0 if `shared`, else target i. Returns the wall time from the
/// first thread's start to the last thread's end (not the longest per-thread time: with more
/// threads than CPUs a thread may only start once another has finished).
pub fn run(st: &Steering, threads: usize, shared: bool, depth: usize, iters: u64) -> Duration {
    let barrier = Barrier::new(threads);
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|i| {
                let barrier = &barrier;
                s.spawn(move || {
                    let target = if shared { 0 } else { i as u8 };
                    let cpu = i;
                    for _ in 1..depth {
                        st.pick_raw(target, cpu);
                    }
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        black_box(st.pick_raw(black_box(target), cpu));
                        st.complete_raw(target);
                    }
                    let end = Instant::now();
                    for _ in 1..depth {
                        st.complete_raw(target);
                    }
                    (start, end)
                })
            })
            .collect();
        let spans: Vec<(Instant, Instant)> =
            workers.into_iter().map(|w| w.join().unwrap()).collect();
        let first = spans.iter().map(|s| s.0).min().unwrap();
        let last = spans.iter().map(|s| s.1).max().unwrap();
        last - first
    })
}

/// "shared" or "distinct" (targets).
pub fn sharing(shared: bool) -> &'static str {
    if shared { "shared" } else { "distinct" }
}
