//! Concurrency: unaligned writers sharing blocks, concurrency of disjoint writes and
//! serialization of overlapping ones, no handle-table lock during device I/O, concurrent
//! open/close, and a device that panics mid-write.

use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use syscall::flag::{O_RDONLY, O_RDWR, O_WRONLY};

use super::fixture::{Op, initial_byte};
use super::{ctx, scheme};

/// `threads` writers, each owning the stripes `k` with `k % threads == t` of an unaligned
/// region spanning several blocks, so every block is shared by several writers and most
/// writes are read-modify-write of shared blocks. Before each write a writer checks its
/// stripe still holds what it last wrote (nobody else may touch it); at the end the disk must
/// hold exactly each writer's last bytes and the bytes around the region must be unchanged.
fn shared_block_writers(bs: u32, threads: usize, stripe: usize, rounds: usize, delay_us: u64) {
    let blocks = 8u64;
    let b = u64::from(bs);
    let (s, dev) = scheme(&[(bs, blocks, false)]);
    // The device sleeps (or yields, for 0) between reading data and returning it.
    dev.set_delay_us(delay_us);
    let s = Arc::new(s);
    let (start, end) = (b / 2 + 3, 5 * b + 11);
    let stripes: Vec<(u64, usize)> = (start..end)
        .step_by(stripe)
        .map(|o| (o, stripe.min((end - o) as usize)))
        .collect();
    let val = |t: usize, r: usize, k: usize| (t * 31 + r * 7 + k * 13 + 1) as u8;
    let shared = s.open("0", O_RDWR, &ctx()).unwrap();

    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (s, stripes) = (s.clone(), stripes.clone());
            thread::spawn(move || {
                // Half the writers use their own handle, half share one.
                let id = if t % 2 == 0 {
                    s.open("0", O_RDWR, &ctx()).unwrap()
                } else {
                    shared
                };
                for r in 0..rounds {
                    for (k, &(o, len)) in stripes.iter().enumerate() {
                        if k % threads != t {
                            continue;
                        }
                        let mut cur = vec![0; len];
                        assert_eq!(s.read(id, o, &mut cur), Ok(len));
                        let want: Vec<u8> = if r == 0 {
                            (o..o + len as u64).map(initial_byte).collect()
                        } else {
                            vec![val(t, r - 1, k); len]
                        };
                        assert!(
                            cur == want,
                            "writer {t} round {r}: stripe {k} at {o} was changed by someone else"
                        );
                        assert_eq!(s.write(id, o, &vec![val(t, r, k); len]), Ok(len));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("writer failed");
    }

    let size = (blocks * b) as usize;
    let mut want: Vec<u8> = (0..size as u64).map(initial_byte).collect();
    for (k, &(o, len)) in stripes.iter().enumerate() {
        let o = o as usize;
        want[o..o + len].fill(val(k % threads, rounds - 1, k));
    }
    let got = dev.contents(0, 0, size);
    if let Some(i) = (0..size).find(|&i| got[i] != want[i]) {
        panic!("byte {i}: got {} want {}", got[i], want[i]);
    }
    assert_eq!(s.range_lock(0).held_count(), 0);
}

#[test]
fn concurrent_unaligned_writers_512() {
    shared_block_writers(512, 8, 7, 25, 0);
    shared_block_writers(512, 4, 300, 30, 20);
}

#[test]
fn concurrent_unaligned_writers_4096() {
    shared_block_writers(4096, 8, 61, 6, 0);
    shared_block_writers(4096, 3, 1500, 30, 20);
}

/// Runs two writes at once with a hook that holds each device write until the other one is
/// also inside the device (or `wait` passes); returns the most writes seen inside at once.
fn max_concurrent_writes(a: (u64, usize), b: (u64, usize), wait: Duration) -> usize {
    let (s, dev) = scheme(&[(512, 64, false)]);
    let s = Arc::new(s);
    let inside = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    {
        let (inside, max) = (inside.clone(), max.clone());
        dev.set_hook(Some(Arc::new(move |op, _, _| {
            if op != Op::Write {
                return;
            }
            let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
            max.fetch_max(now, Ordering::SeqCst);
            let t0 = Instant::now();
            // Both have been inside at once: done. Otherwise give the other time to come in.
            while max.load(Ordering::SeqCst) < 2 && t0.elapsed() < wait {
                thread::sleep(Duration::from_millis(1));
            }
            inside.fetch_sub(1, Ordering::SeqCst);
        })));
    }
    let writers: Vec<_> = [a, b]
        .into_iter()
        .map(|(o, len)| {
            let s = s.clone();
            thread::spawn(move || {
                let id = s.open("0", O_WRONLY, &ctx()).unwrap();
                assert_eq!(s.write(id, o, &vec![9; len]), Ok(len));
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    max.load(Ordering::SeqCst)
}

#[test]
fn disjoint_writes_run_concurrently() {
    let wait = Duration::from_secs(5);
    // Aligned, different blocks.
    assert_eq!(max_concurrent_writes((0, 512), (4096, 1024), wait), 2);
    // Unaligned but in different blocks.
    assert_eq!(max_concurrent_writes((10, 20), (600, 20), wait), 2);
}

#[test]
fn overlapping_writes_are_serialized() {
    let wait = Duration::from_millis(150);
    // Same block, disjoint bytes (RMW).
    assert_eq!(max_concurrent_writes((10, 20), (100, 20), wait), 1);
    // Aligned writes overlapping by one block.
    assert_eq!(max_concurrent_writes((0, 1024), (512, 1024), wait), 1);
}

#[test]
fn no_handle_table_lock_during_device_io() {
    let (s, dev) = scheme(&[(512, 64, false)]);
    let s = Arc::new(s);
    let entered = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    {
        let (entered, release) = (entered.clone(), release.clone());
        dev.set_hook(Some(Arc::new(move |op, _, lba| {
            if op == Op::Read && lba == 0 {
                entered.store(true, Ordering::SeqCst);
                let t0 = Instant::now();
                while !release.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(5) {
                    thread::sleep(Duration::from_millis(1));
                }
            }
        })));
    }
    let id = s.open("0", O_RDWR, &ctx()).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (s, done) = (s.clone(), done.clone());
        thread::spawn(move || {
            let mut buf = [0; 512];
            assert_eq!(s.read(id, 0, &mut buf), Ok(512));
            done.store(true, Ordering::SeqCst);
        })
    };
    while !entered.load(Ordering::SeqCst) {
        thread::yield_now();
    }
    // While that read is stuck in the device, everything else keeps working.
    let other = s.open("0", O_RDWR, &ctx()).unwrap();
    s.fstat(id).unwrap();
    s.fpath(id).unwrap();
    assert_eq!(s.write(other, 4096, b"abc"), Ok(3));
    assert_eq!(s.read(other, 4096, &mut [0; 3]), Ok(3));
    s.close(other).unwrap();
    // Closing the busy handle does not wait for or break the read in flight.
    s.close(id).unwrap();
    assert!(
        !done.load(Ordering::SeqCst),
        "the blocked read finished early"
    );
    release.store(true, Ordering::SeqCst);
    reader.join().unwrap();
}

#[test]
fn concurrent_open_close_gives_unique_ids() {
    let (s, _) = scheme(&[(512, 8, false), (4096, 8, true)]);
    let s = Arc::new(s);
    let all = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (s, all) = (s.clone(), all.clone());
            thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..500 {
                    let path = ["0", "1", ""][(t + i) % 3];
                    let id = s.open(path, O_RDONLY, &ctx()).unwrap();
                    mine.push(id);
                    s.fsize(id).unwrap();
                    s.close(id).unwrap();
                }
                all.lock().unwrap().extend(mine);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let all = all.lock().unwrap();
    let unique: HashSet<_> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len());
    assert!(!unique.contains(&0));
    assert_eq!(s.handles.len(), 0);
}

#[test]
fn device_panic_mid_write_leaves_the_scheme_working() {
    let (s, dev) = scheme(&[(512, 16, false)]);
    let id = s.open("0", O_RDWR, &ctx()).unwrap();
    let armed = Arc::new(AtomicBool::new(true));
    {
        let armed = armed.clone();
        dev.set_hook(Some(Arc::new(move |op, _, _| {
            if op == Op::Write && armed.swap(false, Ordering::SeqCst) {
                panic!("device panics inside write_blocks");
            }
        })));
    }
    let r = catch_unwind(AssertUnwindSafe(|| s.write(id, 100, &[1; 1000])));
    assert!(r.is_err());
    // The range was released during unwinding; the same range can be written again.
    assert_eq!(s.range_lock(0).held_count(), 0);
    assert_eq!(s.write(id, 100, &[2; 1000]), Ok(1000));
    assert_eq!(dev.contents(0, 100, 1000), vec![2; 1000]);
    s.fstat(id).unwrap();
    s.close(id).unwrap();
}
