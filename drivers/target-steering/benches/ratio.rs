//! Interleaved lock-vs-lock comparison of `pick_raw` + `complete_raw` throughput: the same cases
//! as `benches/pick.rs`, but seqcount, spinlock and mutex take turns in short slices, round after
//! round, and the ratios are taken within each round. Slow drifts of a noisy machine (a VM
//! whose vCPUs the host schedules as it likes) then hit all three alike and cancel out of the
//! ratios, which criterion's one-case-after-another runs cannot do.
//!
//! Run: `cargo bench -p target-steering --bench ratio` (about 25 s; a name argument filters
//! cases, e.g. `-- in_flight_8`); smoke test: `cargo bench -p target-steering --bench ratio --
//! --test`.

#[cfg(not(loom))]
mod common;

fn main() {
    #[cfg(not(loom))]
    compare::main();
}

#[cfg(not(loom))]
mod compare {
    use std::time::Duration;

    use target_steering::{LockKind, Policy, Steering};

    use crate::common::{LOCKS, NQUEUES, run, sharing};

    struct Case {
        group: &'static str,
        shared: bool,
        threads: usize,
        depth: usize,
    }

    fn cases() -> Vec<Case> {
        let mut cases = Vec::new();
        for (shared, threads) in [(true, 1), (true, 2), (true, 4), (false, 2), (false, 4)] {
            cases.push(Case {
                group: "pick_complete",
                shared,
                threads,
                depth: 1,
            });
        }
        for threads in [1, 2, 4] {
            cases.push(Case {
                group: "in_flight_8",
                shared: true,
                threads,
                depth: 8,
            });
        }
        cases
    }

    fn quantile(v: &[f64], q: f64) -> f64 {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * q).round() as usize]
    }

    /// Iterations per thread that take about `slice` for this steering and case.
    fn calibrate(st: &Steering, c: &Case, slice: Duration) -> u64 {
        let mut iters = 1_000u64;
        loop {
            let t = run(st, c.threads, c.shared, c.depth, iters);
            if t >= slice / 8 || iters >= 1 << 32 {
                let scale = slice.as_secs_f64() / t.as_secs_f64().max(1e-9);
                return ((iters as f64 * scale) as u64).max(1);
            }
            iters *= 4;
        }
    }

    pub fn main() {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let quick = args.iter().any(|a| a == "--test");
        let filter: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
        let (rounds, slice) = if quick {
            (1, Duration::from_millis(2))
        } else {
            (25, Duration::from_millis(40))
        };
        println!(
            "{} rounds of {slice:?} slices per lock kind, kinds interleaved; Melem/s is the \
             median over rounds, ratios are medians of per-round ratios [25th-75th percentile]",
            rounds
        );
        println!(
            "{:<34} {:>9} {:>9} {:>9}  {:<24} {:<24}",
            "case", "seqcount", "spinlock", "mutex", "seqcount/spinlock", "seqcount/mutex"
        );
        for c in cases() {
            let name = format!("{}/{}/{}thr", c.group, sharing(c.shared), c.threads);
            if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
                continue;
            }
            let steerings: Vec<Steering> = LOCKS
                .iter()
                .map(|&lock| {
                    Steering::new(Policy::PerTarget, lock, NQUEUES, 8).with_pick_counts(false)
                })
                .collect();
            let iters: Vec<u64> = steerings.iter().map(|s| calibrate(s, &c, slice)).collect();
            let mut thr = vec![Vec::new(); LOCKS.len()];
            for round in 0..rounds {
                for k in 0..LOCKS.len() {
                    let i = (round + k) % LOCKS.len(); // rotate who goes first
                    let t = run(&steerings[i], c.threads, c.shared, c.depth, iters[i]);
                    thr[i].push((c.threads as u64 * iters[i]) as f64 / t.as_secs_f64() / 1e6);
                }
            }
            let ratio = |other: usize| -> Vec<f64> {
                thr[0].iter().zip(&thr[other]).map(|(s, o)| s / o).collect()
            };
            let fmt = |r: Vec<f64>| {
                format!(
                    "{:.2} [{:.2}-{:.2}]",
                    quantile(&r, 0.5),
                    quantile(&r, 0.25),
                    quantile(&r, 0.75)
                )
            };
            let spin = ratio(1);
            let mutex = ratio(2);
            debug_assert_eq!(LOCKS[1], LockKind::Spinlock);
            println!(
                "{:<34} {:>9.1} {:>9.1} {:>9.1}  {:<24} {:<24}",
                name,
                quantile(&thr[0], 0.5),
                quantile(&thr[1], 0.5),
                quantile(&thr[2], 0.5),
                fmt(spin),
                fmt(mutex)
            );
        }
    }
}
