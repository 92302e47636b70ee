//! Plain-`std` tests: many threads hammering pick/complete on a few targets under every lock
//! kind with a `Tracker` and `check_invariant` watching; the simple policies; names; stats.
#![cfg(not(loom))]

use std::collections::VecDeque;
use std::sync::{Barrier, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use target_steering::{LockKind, Policy, Steering, Tracked, Tracker};

/// A tiny deterministic PRNG (xorshift64*), so the tests need no extra crate.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) % n
    }
}

const THREADS: usize = 4;
const NTARGETS: u8 = 3;
const NQUEUES: usize = 4;

fn rounds() -> u64 {
    // Debug builds are slow; keep the test within seconds either way.
    if cfg!(debug_assertions) {
        20_000
    } else {
        200_000
    }
}

/// How long each hammer runs (at least `rounds()` steps per thread).
const HAMMER_TIME: Duration = Duration::from_millis(400);

/// Each thread keeps up to 4 requests of random targets in flight, completing the oldest or
/// picking a new one at random, and checks every pick with the tracker and `check_invariant`.
fn hammer(lock: LockKind) {
    let steering = Steering::new(Policy::PerTarget, lock, NQUEUES, usize::from(NTARGETS));
    let tracker = Tracker::new();
    let barrier = Barrier::new(THREADS);
    thread::scope(|s| {
        for cpu in 0..THREADS {
            let (steering, tracker, barrier) = (&steering, &tracker, &barrier);
            s.spawn(move || {
                let mut rng = Rng::new(cpu as u64 + 1);
                let mut in_flight: VecDeque<Tracked<'_>> = VecDeque::new();
                barrier.wait();
                let start = Instant::now();
                let mut step = 0u64;
                while step < rounds() || start.elapsed() < HAMMER_TIME {
                    step += 1;
                    if in_flight.len() == 4 || (!in_flight.is_empty() && rng.below(2) == 0) {
                        in_flight.pop_front();
                    } else {
                        let target = rng.below(u64::from(NTARGETS)) as u8;
                        let t = tracker.pick(steering, target, cpu);
                        assert!(t.queue() < NQUEUES);
                        steering.check_invariant(t.picked()).unwrap();
                        in_flight.push_back(t);
                    }
                }
            });
        }
    });
    for target in 0..NTARGETS {
        assert_eq!(tracker.in_flight(target), 0);
    }
    let stats = steering.stats();
    let picks: u64 = stats.picks_per_queue.iter().sum();
    assert!(picks > 0);
    // Threads run on different CPUs, so idle targets do move between queues.
    assert!(
        stats.changes_per_target.iter().sum::<u64>() > 0,
        "{stats:?}"
    );
    eprintln!("{lock}: {stats:?}");
}

#[test]
fn hammer_seqcount() {
    hammer(LockKind::Seqcount);
}

#[test]
fn hammer_spinlock() {
    hammer(LockKind::Spinlock);
}

#[test]
fn hammer_mutex() {
    hammer(LockKind::Mutex);
}

/// Two threads on one target, one request each at a time: every pick races to be the 0 → 1
/// writer against the other thread joining, the window where "keep the previous queue" and
/// reader retries happen.
#[test]
fn writer_reader_race_on_one_target() {
    let steering = Steering::new(Policy::PerTarget, LockKind::Seqcount, NQUEUES, 1);
    let tracker = Tracker::new();
    let barrier = Barrier::new(2);
    thread::scope(|s| {
        for cpu in [1, 2] {
            let (steering, tracker, barrier) = (&steering, &tracker, &barrier);
            s.spawn(move || {
                barrier.wait();
                let start = Instant::now();
                let mut step = 0u64;
                while step < rounds() || start.elapsed() < HAMMER_TIME {
                    step += 1;
                    let t = tracker.pick(steering, 0, cpu);
                    steering.check_invariant(t.picked()).unwrap();
                }
            });
        }
    });
    let stats = steering.stats();
    // Only the two CPUs' queues are ever used.
    assert_eq!(stats.picks_per_queue[0] + stats.picks_per_queue[3], 0);
    eprintln!("race: {stats:?}");
}

/// The driver's shape: submitters pick, a separate completion thread drops the guards (in an
/// order unrelated to submission), with one shared target and every submitter on another CPU.
#[test]
fn completions_on_another_thread() {
    let steering = Steering::new(Policy::PerTarget, LockKind::Seqcount, NQUEUES, 1);
    let tracker = Tracker::new();
    let n = rounds() / 2;
    thread::scope(|s| {
        let (tx, rx) = mpsc::sync_channel::<Tracked<'_>>(8);
        s.spawn(move || {
            let mut rng = Rng::new(99);
            let mut held = Vec::new();
            for t in rx {
                held.push(t);
                if held.len() > 3 || rng.below(3) == 0 {
                    let i = rng.below(held.len() as u64) as usize;
                    drop(held.swap_remove(i));
                }
            }
        });
        for cpu in 0..2 {
            let (steering, tracker, tx) = (&steering, &tracker, tx.clone());
            s.spawn(move || {
                for _ in 0..n {
                    tx.send(tracker.pick(steering, 0, cpu)).unwrap();
                }
            });
        }
    });
    assert_eq!(tracker.in_flight(0), 0);
}

#[test]
fn per_target_sequential_behaviour() {
    for lock in [LockKind::Seqcount, LockKind::Spinlock, LockKind::Mutex] {
        let s = Steering::new(Policy::PerTarget, lock, 4, 4);
        // A new target starts on queue 0, but its first request moves it to its CPU's queue.
        let a = s.pick(1, 6);
        assert_eq!(a.queue(), 2);
        let b = s.pick(1, 3); // joins
        assert_eq!(b.queue(), 2);
        s.check_invariant(&b).unwrap();
        drop(a);
        let c = s.pick(1, 1); // still joins `b`
        assert_eq!(c.queue(), 2);
        drop((b, c));
        let d = s.pick(1, 1); // idle again: follows the CPU
        assert_eq!(d.queue(), 1);
        drop(d);
        let e = s.pick(1, 5); // 5 % 4 == 1: same queue, not a change
        assert_eq!(e.queue(), 1);
        drop(e);
        let st = s.stats();
        assert_eq!(st.changes_per_target, vec![0, 2, 0, 0], "{lock}");
        assert_eq!(st.picks_per_queue, vec![0, 2, 3, 0], "{lock}");
        assert_eq!(st.seq_retries, 0);
    }
}

#[test]
fn raw_pairs() {
    let s = Steering::new(Policy::PerTarget, LockKind::Seqcount, 2, 1);
    let q = s.pick_raw(0, 1);
    assert_eq!(q, 1);
    assert_eq!(s.pick_raw(0, 0), 1);
    s.check_invariant_raw(0, 1).unwrap();
    assert!(s.check_invariant_raw(0, 0).is_err());
    s.complete_raw(0);
    s.complete_raw(0);
    assert_eq!(s.pick_raw(0, 0), 0);
    s.complete_raw(0);
}

#[test]
fn per_cpu_and_single() {
    for lock in [LockKind::Seqcount, LockKind::Spinlock, LockKind::Mutex] {
        let per_cpu = Steering::new(Policy::PerCpu, lock, 3, 2);
        let single = Steering::new(Policy::Single, lock, 3, 2);
        assert_eq!(per_cpu.policy(), Policy::PerCpu);
        assert_eq!(single.policy(), Policy::Single);
        assert_eq!(per_cpu.nqueues(), 3);
        let mut held = Vec::new();
        for cpu in 0..10 {
            let p = per_cpu.pick(0, cpu);
            assert_eq!(p.queue(), cpu % 3);
            per_cpu.check_invariant(&p).unwrap();
            held.push(p);
            let p = single.pick(0, cpu);
            assert_eq!(p.queue(), 0);
            single.check_invariant(&p).unwrap();
            held.push(p);
        }
        drop(held);
        assert_eq!(per_cpu.stats().picks_per_queue, vec![4, 3, 3]);
        assert_eq!(single.stats().picks_per_queue, vec![10, 0, 0]);
        assert_eq!(per_cpu.stats().changes_per_target, vec![0, 0]);
    }
}

#[test]
fn pick_counting_can_be_turned_off() {
    let s = Steering::new(Policy::PerTarget, LockKind::Seqcount, 2, 1).with_pick_counts(false);
    drop(s.pick(0, 1));
    let st = s.stats();
    assert_eq!(st.picks_per_queue, vec![0, 0]);
    assert_eq!(st.changes_per_target, vec![1]);
}

#[test]
fn names_round_trip() {
    for (name, policy) in ["per-target", "per-cpu", "single"].into_iter().zip([
        Policy::PerTarget,
        Policy::PerCpu,
        Policy::Single,
    ]) {
        assert_eq!(name.parse::<Policy>().unwrap(), policy);
        assert_eq!(policy.to_string(), name);
    }
    for (name, lock) in ["seqcount", "spinlock", "mutex"].into_iter().zip([
        LockKind::Seqcount,
        LockKind::Spinlock,
        LockKind::Mutex,
    ]) {
        assert_eq!(name.parse::<LockKind>().unwrap(), lock);
        assert_eq!(lock.to_string(), name);
    }
    let err = "per_target".parse::<Policy>().unwrap_err().to_string();
    assert!(err.contains("per-target, per-cpu, single"), "{err}");
    assert!("Seqcount".parse::<LockKind>().is_err());
    assert_eq!(Policy::default(), Policy::PerTarget);
    assert_eq!(LockKind::default(), LockKind::Seqcount);
}

#[test]
fn tracker_reports_a_split_target() {
    let tracker = Tracker::new();
    tracker.begin(7, 1);
    tracker.begin(7, 1);
    let err = tracker.try_begin(7, 2).unwrap_err();
    assert_eq!(
        (err.target, err.in_flight_queue, err.picked_queue),
        (7, 1, 2)
    );
    assert_eq!(err.in_flight, 2);
    tracker.begin(8, 2); // another target is independent
    tracker.end(7);
    tracker.end(7);
    tracker.begin(7, 2); // idle target may move
    assert_eq!(tracker.in_flight(7), 1);
}

#[test]
#[should_panic(expected = "steering invariant violated: target 3 picked queue 0")]
fn tracker_panics_on_a_split_target() {
    let tracker = Tracker::new();
    tracker.begin(3, 1);
    tracker.begin(3, 0);
}

#[test]
#[should_panic(expected = "without a begin")]
fn tracker_end_without_begin_panics() {
    Tracker::new().end(0);
}
