//! Criterion benchmark of `pick_raw` + `complete_raw` throughput: seqcount vs spinlock vs mutex
//! per-target state, 1/2/4 threads, all threads on one shared target or each on its own; the
//! same with 8 requests kept in flight per thread (the seqcount's lock-free reader path); and
//! the three policies side by side. Pick counting is off except where named.
//!
//! Run: `cargo bench -p target-steering --bench pick` (about 90 s);
//! smoke test: `cargo bench -p target-steering --bench pick -- --test`.
//!
//! On a small VM the multi-threaded cases vary by tens of percent from run to run (the cost is
//! cross-core cache-line traffic, which depends on where and when the host runs the vCPUs), and
//! criterion measures the cases one after another; for the lock-vs-lock ratios prefer
//! `benches/ratio.rs`, which interleaves them.

#[cfg(not(loom))]
mod common;

#[cfg(not(loom))]
mod bench {
    use std::time::Duration;

    use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
    use target_steering::{LockKind, Policy, Steering};

    use crate::common::{LOCKS, NQUEUES, run, sharing};

    /// One pick+complete at a time per thread: at one thread every pick is the 0 → 1 writer.
    fn pick_complete(c: &mut Criterion) {
        let mut g = c.benchmark_group("pick_complete");
        for shared in [true, false] {
            for threads in [1, 2, 4] {
                if threads == 1 && !shared {
                    continue; // the same as shared
                }
                g.throughput(Throughput::Elements(threads as u64));
                for lock in LOCKS {
                    let st =
                        Steering::new(Policy::PerTarget, lock, NQUEUES, 8).with_pick_counts(false);
                    let id = BenchmarkId::new(format!("{lock}/{}", sharing(shared)), threads);
                    g.bench_function(id, |b| {
                        b.iter_custom(|iters| run(&st, threads, shared, 1, iters))
                    });
                }
            }
        }
        g.finish();
    }

    /// 8 requests in flight per thread on one shared target: (after the first) every pick
    /// joins, i.e. the seqcount's reader path.
    fn in_flight_8(c: &mut Criterion) {
        let mut g = c.benchmark_group("in_flight_8");
        for threads in [1, 2, 4] {
            g.throughput(Throughput::Elements(threads as u64));
            for lock in LOCKS {
                let st = Steering::new(Policy::PerTarget, lock, NQUEUES, 8).with_pick_counts(false);
                let id = BenchmarkId::new(format!("{lock}/shared"), threads);
                g.bench_function(id, |b| {
                    b.iter_custom(|iters| run(&st, threads, true, 8, iters))
                });
            }
        }
        g.finish();
    }

    /// The policies at 2 threads on one shared target, and the cost of pick counting.
    fn policies(c: &mut Criterion) {
        let mut g = c.benchmark_group("policy");
        let threads = 2;
        g.throughput(Throughput::Elements(threads as u64));
        let cases = [
            ("per-cpu", Policy::PerCpu, false),
            ("single", Policy::Single, false),
            ("per-target", Policy::PerTarget, false),
            ("per-target+pick-counts", Policy::PerTarget, true),
        ];
        for (name, policy, counts) in cases {
            let st = Steering::new(policy, LockKind::Seqcount, NQUEUES, 8).with_pick_counts(counts);
            g.bench_function(BenchmarkId::new(name, threads), |b| {
                b.iter_custom(|iters| run(&st, threads, true, 1, iters))
            });
        }
        g.finish();
    }

    fn config() -> Criterion {
        Criterion::default()
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .sample_size(50)
    }

    criterion_group! {
        name = benches;
        config = config();
        targets = pick_complete, in_flight_8, policies
    }

    pub fn main() {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
}

fn main() {
    #[cfg(not(loom))]
    bench::main();
}
