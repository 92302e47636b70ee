//! The driver's split-phase block I/O (`ScsiHost::submit_async`, `AsyncIo`) on the fake
//! machine: clean round trips collected by polling after the waker fired; a command that
//! never completes, past its deadline, settled by `finish_blocking` through the recovery
//! ladder; a device reset and a host shutdown with tokens in flight (answered exactly once,
//! through the slow path); a dropped token orphaning its slot until the device gives it back;
//! requests that do not qualify leaving nothing behind.

mod common;

use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{host_config, pattern, record_panics, start, with_watchdog};
use fake_virtio_scsi::{CommandFault, CommandFaults, FakeMachine, FakeSpec, FaultPlan};
use virtio_scsi::hal::DmaPages;
use virtio_scsi::{AsyncIo, AsyncPoll, CompletionWaker, DriverError, HostConfig, ScsiHost};

const BS: usize = 512;
const LEN: usize = 4096;

/// Counts wake-ups and lets a test wait for them.
#[derive(Default)]
struct Bell {
    count: Mutex<usize>,
    cv: Condvar,
}

impl CompletionWaker for Bell {
    fn wake(&self) {
        *self.count.lock().unwrap() += 1;
        self.cv.notify_all();
    }
}

impl Bell {
    fn count(&self) -> usize {
        *self.count.lock().unwrap()
    }

    /// Waits until at least `n` wake-ups happened (panics after 10 s).
    fn wait_for(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut c = self.count.lock().unwrap();
        while *c < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "only {} of {n} wake-ups", *c);
            c = self.cv.wait_timeout(c, left).unwrap().0;
        }
    }
}

/// The `n` commands after the plan is set never complete (until a TMF or a reset).
fn never_complete(n: u64) -> FaultPlan {
    FaultPlan {
        commands: CommandFaults {
            by_index: (0..n).map(|i| (i, CommandFault::NeverComplete)).collect(),
            ..CommandFaults::default()
        },
        ..FaultPlan::default()
    }
}

struct Rig {
    fake: Arc<FakeMachine>,
    host: Arc<ScsiHost>,
    disk: Arc<virtio_scsi::Disk>,
    bell: Arc<Bell>,
    waker: Arc<dyn CompletionWaker>,
    /// Device-visible memory for the buffers: `LEN` bytes per piece.
    mem: DmaPages,
}

fn rig(cfg: HostConfig, pieces: usize) -> Rig {
    record_panics();
    let (fake, host) = start(FakeSpec::default(), cfg);
    let host = host.expect("host starts");
    let disk = host.disk(0).expect("disk 0");
    assert_eq!(disk.block_size as usize, BS);
    let mem = host.alloc_dma_buffer(pieces * LEN).expect("DMA buffer");
    let bell = Arc::new(Bell::default());
    let waker: Arc<dyn CompletionWaker> = bell.clone();
    Rig {
        fake,
        host,
        disk,
        bell,
        waker,
        mem,
    }
}

impl Rig {
    fn piece(&self, i: usize) -> NonNull<u8> {
        assert!((i + 1) * LEN <= self.mem.len());
        // SAFETY: inside the allocation (checked above).
        unsafe { self.mem.cpu_ptr().add(i * LEN) }
    }

    // The bytes are DMA memory shared with the device, not owned by the rig: a `&mut` view
    // of a piece is valid while no command of the test uses it.
    #[allow(clippy::mut_from_ref)]
    fn bytes(&self, i: usize) -> &mut [u8] {
        // SAFETY: the piece lies in the allocation, and tests only touch a piece while no
        // command of theirs uses it.
        unsafe { std::slice::from_raw_parts_mut(self.piece(i).as_ptr(), LEN) }
    }

    /// Submits a read or write of piece `i` at `lba`.
    fn submit(&self, i: usize, lba: u64, write: bool) -> Option<AsyncIo> {
        // SAFETY: the piece is device-visible memory that outlives the rig's commands, and
        // the tests do not touch it until the command settles.
        unsafe {
            self.host
                .submit_async(&self.disk, lba, self.piece(i), LEN, write, &self.waker)
        }
    }

    fn lba(i: usize) -> u64 {
        (1 + i * 11) as u64
    }

    fn medium(&self, lba: u64) -> Vec<u8> {
        self.fake
            .disk_read(self.disk.target, self.disk.lun, lba * BS as u64, LEN)
            .expect("medium")
    }
}

fn cfg(timeout: Duration) -> HostConfig {
    HostConfig {
        check_steering: true,
        ..host_config(timeout)
    }
}

#[test]
fn round_trips_collected_after_the_waker() {
    let r = rig(cfg(Duration::from_secs(5)), 16);
    let n = 8;
    for i in 0..n {
        let data = pattern(i as u64, 0, LEN);
        r.bytes(i).copy_from_slice(&data);
    }
    let mut tokens: Vec<AsyncIo> = (0..n)
        .map(|i| r.submit(i, Rig::lba(i), true).expect("a write qualifies"))
        .collect();
    r.bell.wait_for(n);
    for t in &mut tokens {
        assert_eq!(t.poll(), AsyncPoll::Done);
        assert!(t.is_settled());
        assert_eq!(t.poll(), AsyncPoll::Done, "settled stays settled");
    }
    drop(tokens);
    for i in 0..n {
        assert_eq!(
            r.medium(Rig::lba(i)),
            pattern(i as u64, 0, LEN),
            "write {i}"
        );
    }
    // Read back into the other pieces.
    let mut tokens: Vec<AsyncIo> = (0..n)
        .map(|i| {
            r.submit(n + i, Rig::lba(i), false)
                .expect("a read qualifies")
        })
        .collect();
    r.bell.wait_for(2 * n);
    for t in &mut tokens {
        assert_eq!(t.poll(), AsyncPoll::Done);
    }
    for (i, t) in tokens.into_iter().enumerate() {
        t.finish_blocking().expect("settled: nothing left to do");
        assert_eq!(r.bytes(n + i), &pattern(i as u64, 0, LEN)[..], "read {i}");
    }
    assert_eq!(r.bell.count(), 2 * n, "one wake-up per command");
    let stats = r.host.stats();
    assert_eq!(stats.invariant_violations, 0);
    assert_eq!(stats.timeouts, 0);
    r.host.shutdown();
}

/// Buffers the device cannot reach (ordinary heap memory) are bounced through the command
/// slot: written data is copied in at submission, read data copied out when the token is
/// polled (or finished), and the medium is the judge.
#[test]
fn heap_buffers_are_bounced_through_the_slot() {
    let r = rig(cfg(Duration::from_secs(5)), 1);
    let n = 6;
    let mut bufs: Vec<Vec<u8>> = (0..n).map(|i| pattern(100 + i as u64, 0, LEN)).collect();
    let mut tokens: Vec<AsyncIo> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| {
            let p = NonNull::new(b.as_mut_ptr()).unwrap();
            // SAFETY: `bufs` outlives the tokens and is not touched until they settle.
            unsafe {
                r.host
                    .submit_async(&r.disk, Rig::lba(i), p, LEN, true, &r.waker)
                    .expect("a heap buffer that fits a slot qualifies")
            }
        })
        .collect();
    r.bell.wait_for(n);
    for t in &mut tokens {
        assert_eq!(t.poll(), AsyncPoll::Done);
    }
    drop(tokens);
    for i in 0..n {
        assert_eq!(r.medium(Rig::lba(i)), pattern(100 + i as u64, 0, LEN));
    }
    let mut back: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; LEN]).collect();
    let tokens: Vec<AsyncIo> = back
        .iter_mut()
        .enumerate()
        .map(|(i, b)| {
            let p = NonNull::new(b.as_mut_ptr()).unwrap();
            // SAFETY: `back` outlives the tokens and is read only after they settle.
            unsafe {
                r.host
                    .submit_async(&r.disk, Rig::lba(i), p, LEN, false, &r.waker)
                    .expect("a heap read that fits a slot qualifies")
            }
        })
        .collect();
    r.bell.wait_for(2 * n);
    // Half settled by `poll`, half by `finish_blocking` (both copy the data out).
    for (i, mut t) in tokens.into_iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(t.poll(), AsyncPoll::Done);
        } else {
            t.finish_blocking().expect("read");
        }
    }
    for (i, b) in back.iter().enumerate() {
        assert_eq!(b, &pattern(100 + i as u64, 0, LEN), "read {i}");
    }
    r.host.shutdown();
}

#[test]
fn what_does_not_qualify_leaves_nothing_behind() {
    let r = rig(cfg(Duration::from_secs(5)), 64);
    let cap = r.host.queues()[0].data_cap();
    let mut heap = vec![0u8; cap + BS];
    let heap_ptr = NonNull::new(heap.as_mut_ptr()).unwrap();
    let disk = r.disk.clone();
    // SAFETY (all four): nothing is submitted for these (asserted), so no buffer is lent.
    unsafe {
        let too_big = r
            .host
            .submit_async(&disk, 0, heap_ptr, cap + BS, false, &r.waker);
        assert!(
            too_big.is_none(),
            "heap memory (not device-visible) larger than a slot cannot be bounced"
        );
        let partial = r
            .host
            .submit_async(&disk, 0, r.piece(0), 100, false, &r.waker);
        assert!(partial.is_none(), "not whole blocks");
        let past_end =
            r.host
                .submit_async(&disk, disk.blocks - 1, r.piece(0), LEN, false, &r.waker);
        assert!(past_end.is_none(), "crosses the end");
        let empty = r.host.submit_async(&disk, 0, r.piece(0), 0, true, &r.waker);
        assert!(empty.is_none(), "empty");
    }
    // Every slot is still free: the whole queue depth can be submitted at once.
    let depth = r.host.queues()[0].depth();
    let tokens: Vec<AsyncIo> = (0..depth)
        .map(|i| r.submit(i, i as u64 * 8, false).expect("a free slot"))
        .collect();
    assert!(r.submit(depth, 0, false).is_none(), "no free slot: not now");
    r.bell.wait_for(depth);
    for mut t in tokens {
        assert_eq!(t.poll(), AsyncPoll::Done);
    }
    assert_eq!(r.host.stats().invariant_violations, 0);
    r.host.shutdown();
}

#[test]
fn overdue_command_is_recovered_by_finish_blocking() {
    let timeout = Duration::from_millis(300);
    let r = rig(cfg(timeout), 4);
    r.fake.set_plan(never_complete(1));
    let t0 = Instant::now();
    let mut t = r.submit(0, 3, false).expect("qualifies");
    assert!(t.deadline() >= t0 + timeout && t.deadline() <= Instant::now() + timeout);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(t.poll(), AsyncPoll::Pending);
    while Instant::now() < t.deadline() {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Past the deadline nothing happens by itself; the owner hands it to a blocking thread.
    assert_eq!(t.poll(), AsyncPoll::Pending);
    let host = r.host.clone();
    let res = with_watchdog("finish", Duration::from_secs(20), move || {
        t.finish_blocking()
    })
    .expect("finish_blocking returns");
    assert!(
        matches!(res, Err(DriverError::TimedOut(_))),
        "an aborted command reports the timeout: {res:?}"
    );
    let stats = host.stats();
    assert_eq!(stats.timeouts, 1);
    assert!(stats.tmfs >= 1, "the recovery ladder ran");
    // The queue works on: a fresh command goes through the fast path.
    let mut t = r.submit(1, 3, false).expect("qualifies");
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.poll() == AsyncPoll::Pending {
        assert!(
            Instant::now() < deadline,
            "the fresh command never completed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(t.is_settled());
    assert_eq!(r.bytes(1), &r.medium(3)[..]);
    assert_eq!(host.stats().invariant_violations, 0);
    host.shutdown();
}

#[test]
fn device_reset_answers_tokens_in_flight_and_the_slow_path_retries_them() {
    let r = rig(cfg(Duration::from_secs(10)), 8);
    let n = 4;
    r.fake.set_plan(never_complete(n as u64));
    for i in 0..n {
        r.bytes(i).copy_from_slice(&pattern(100 + i as u64, 0, LEN));
    }
    let mut tokens: Vec<AsyncIo> = (0..n)
        .map(|i| r.submit(i, Rig::lba(i), true).expect("qualifies"))
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    for t in &mut tokens {
        assert_eq!(t.poll(), AsyncPoll::Pending);
    }
    let woken = r.bell.count();
    r.host
        .reset_device("test: reset with tokens in flight")
        .expect("reset");
    // Each token is answered exactly once (by the reset), and told.
    r.bell.wait_for(woken + n);
    for t in &mut tokens {
        assert_eq!(t.poll(), AsyncPoll::Slow, "dropped by the reset: retry it");
    }
    for t in tokens {
        t.finish_blocking().expect("retried after the reset");
    }
    for i in 0..n {
        assert_eq!(
            r.medium(Rig::lba(i)),
            pattern(100 + i as u64, 0, LEN),
            "write {i}"
        );
    }
    let stats = r.host.stats();
    assert_eq!(stats.resets, 1);
    assert_eq!(stats.timeouts, 0);
    assert_eq!(stats.invariant_violations, 0);
    assert_eq!(r.bell.count(), woken + n, "no second answer");
    r.host.shutdown();
}

#[test]
fn shutdown_fails_tokens_in_flight() {
    let r = rig(cfg(Duration::from_secs(10)), 4);
    r.fake.set_plan(never_complete(2));
    let mut a = r.submit(0, 8, false).expect("qualifies");
    let mut b = r.submit(1, 16, true).expect("qualifies");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(a.poll(), AsyncPoll::Pending);
    r.host.shutdown();
    r.bell.wait_for(2);
    assert_eq!(a.poll(), AsyncPoll::Slow);
    assert_eq!(b.poll(), AsyncPoll::Slow);
    let res = with_watchdog("finish", Duration::from_secs(20), move || {
        (a.finish_blocking(), b.finish_blocking())
    })
    .expect("finish_blocking returns at once on a host that is down");
    assert!(res.0.is_err() && res.1.is_err(), "{res:?}");
    assert!(
        r.submit(2, 8, false).is_none(),
        "a host that is down takes nothing"
    );
}

#[test]
fn dropped_token_orphans_its_slot_until_the_device_gives_it_back() {
    let r = rig(cfg(Duration::from_secs(10)), 64);
    let depth = r.host.queues()[0].depth();
    assert!(depth < 64);
    r.fake.set_plan(never_complete(1));
    let held = r.submit(0, 0, false).expect("qualifies");
    drop(held);
    // One slot stays with the device: one fewer can be in flight.
    let tokens: Vec<AsyncIo> = (0..depth - 1)
        .map(|i| r.submit(1 + i, i as u64 * 8, false).expect("a free slot"))
        .collect();
    assert!(
        r.submit(depth, 0, false).is_none(),
        "the orphaned slot must not be reused while the device holds it"
    );
    r.bell.wait_for(depth - 1);
    for mut t in tokens {
        assert_eq!(t.poll(), AsyncPoll::Done);
    }
    // The reset takes the command back from the device: the slot is free again.
    r.host
        .reset_device("test: take the orphan back")
        .expect("reset");
    let tokens: Vec<AsyncIo> = (0..depth)
        .map(|i| {
            r.submit(1 + i, i as u64 * 8, false)
                .expect("every slot is free")
        })
        .collect();
    for mut t in tokens {
        let deadline = Instant::now() + Duration::from_secs(10);
        let p = loop {
            match t.poll() {
                AsyncPoll::Pending if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                p => break p,
            }
        };
        // The first command after a reset may see its UNIT ATTENTION: the slow path retries.
        if p != AsyncPoll::Done {
            t.finish_blocking().expect("settles");
        }
    }
    assert_eq!(r.host.stats().invariant_violations, 0);
    r.host.shutdown();
}

/// Polls `t` (and the host, as an owner that busy-polls does) until it settles; panics after
/// 10 s.
fn poll_until_done(host: &ScsiHost, t: &mut AsyncIo) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        host.busy_poll();
        match t.poll() {
            AsyncPoll::Done => return,
            AsyncPoll::Pending => assert!(Instant::now() < deadline, "never completed"),
            AsyncPoll::Slow => panic!("a clean command took the slow path"),
        }
        std::hint::spin_loop();
    }
}

/// Busy polling by owners (`begin_busy_poll` / `busy_poll` / `end_busy_poll`): while anyone
/// polls, the device raises no interrupt for request-queue completions and the polls collect
/// them (wakers called); one poller ending while another still polls changes nothing; a
/// completion posted after the last poll is collected by the last `end_busy_poll`, which turns
/// interrupts back on. The medium is the judge of every write.
#[test]
fn owner_busy_polling_collects_completions_without_interrupts() {
    let r = rig(
        HostConfig {
            // The completion thread's own polling stays out of the way while owners poll.
            poll: Duration::from_millis(20),
            ..cfg(Duration::from_secs(5))
        },
        4,
    );
    r.host.begin_busy_poll();
    r.host.begin_busy_poll();
    let before = r.fake.stats().interrupts;
    for i in 0..3 {
        r.bytes(i).copy_from_slice(&pattern(40 + i as u64, 0, LEN));
        let mut t = r.submit(i, Rig::lba(i), true).expect("a write qualifies");
        poll_until_done(&r.host, &mut t);
        assert_eq!(r.medium(Rig::lba(i)), pattern(40 + i as u64, 0, LEN));
    }
    assert_eq!(r.bell.count(), 3, "the polls called the wakers");
    assert_eq!(
        r.fake.stats().interrupts,
        before,
        "no interrupt while owners poll"
    );
    // One of the two pollers stops: interrupts stay off for the other.
    assert_eq!(r.host.end_busy_poll(), 0);
    r.bytes(3).fill(0);
    let completions = r.fake.stats().completions;
    let mut t = r.submit(3, Rig::lba(0), false).expect("a read qualifies");
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.fake.stats().completions == completions {
        assert!(Instant::now() < deadline, "the device never answered");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        r.fake.stats().interrupts,
        before,
        "posted with interrupts off"
    );
    // The last poller ends: interrupts on, and what was posted meanwhile is collected (by its
    // drain, or by the completion thread's periodic look if that came first).
    r.host.end_busy_poll();
    r.bell.wait_for(4);
    assert_eq!(t.poll(), AsyncPoll::Done);
    assert_eq!(r.bytes(3), &pattern(40, 0, LEN)[..]);
    // Interrupts are back: the next command raises one and completes without any poll.
    let t = r.submit(0, Rig::lba(1), false).expect("a read qualifies");
    r.bell.wait_for(5);
    assert!(
        r.fake.stats().interrupts > before,
        "interrupts are on again"
    );
    t.finish_blocking().expect("clean read");
    assert_eq!(r.bytes(0), &pattern(41, 0, LEN)[..]);
    assert_eq!(r.host.stats().timeouts, 0);
    r.host.shutdown();
}
