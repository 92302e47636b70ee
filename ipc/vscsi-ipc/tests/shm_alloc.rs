//! Proves the shared-memory path does no heap allocation per request in steady state: a
//! counting global allocator, an in-process server over a null device, and a client running
//! reads and writes at queue depth 32 from arena buffers. Allocations are counted separately
//! for the client's thread and for every other thread (the server's: accept loop, connection
//! reader and writer, the session's poller, the shm workers); both must be 0 per request.
//!
//! The null device has split-phase I/O (`BlockDevice::async_io`), completed by its own
//! "completion thread" (the device's, exempt like the device's `disks()`), so all the
//! server's paths run in steady state: requests the poller starts and collects itself,
//! requests the device declines (every 4th: the workers run them), and started requests that
//! need the slow path (every 8th: a worker finishes them blocking).
//!
//! `BlockDevice::disks()` returns a `Vec` by contract and the scheme calls it on every read
//! and write (to check the disk still exists and get its geometry): that allocation belongs to
//! the scheme/driver interface, not to the IPC, so the test device exempts it and the test
//! reports it on its own line. A plain `main` (harness = false), so no test-runner threads
//! allocate behind our back.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use block_scheme::{AsyncBlockIo, AsyncBuf, AsyncPoll, BlockDevice, DiskInfo, DiskScheme, IoWaker};
use vscsi_ipc::{Client, MemfdArenas, OpenFlags, Server, ServerConfig};

static SERVER_ALLOCS: AtomicU64 = AtomicU64::new(0);
static CLIENT_ALLOCS: AtomicU64 = AtomicU64::new(0);
static DISKS_CALLS: AtomicU64 = AtomicU64::new(0);
/// Requests the device ran through its split-phase path: collected by polling, finished
/// blocking, declined.
static FAST_DONE: AtomicU64 = AtomicU64::new(0);
static SLOW_DONE: AtomicU64 = AtomicU64::new(0);
static DECLINED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Allocations on this thread are not counted (the device's `disks()`).
    static EXEMPT: Cell<bool> = const { Cell::new(false) };
    /// This is the client's thread.
    static CLIENT: Cell<bool> = const { Cell::new(false) };
}

struct Counting;

/// Sizes of the last few counted server-side allocations (for the failure message).
static LAST_SIZES: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

static MEASURING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static SEEN: AtomicU64 = AtomicU64::new(0);

fn count_size(size: usize) {
    if EXEMPT.try_with(Cell::get).unwrap_or(true) || CLIENT.try_with(Cell::get).unwrap_or(false) {
        return;
    }
    if MEASURING.load(Ordering::Relaxed) {
        let i = SEEN.fetch_add(1, Ordering::Relaxed) as usize;
        if let Some(a) = LAST_SIZES.get(i) {
            a.store(size as u64, Ordering::Relaxed);
        }
    }
}

fn count() {
    // try_with: during thread teardown the slots may be gone; do not count then.
    if EXEMPT.try_with(Cell::get).unwrap_or(true) {
        return;
    }
    if CLIENT.try_with(Cell::get).unwrap_or(false) {
        CLIENT_ALLOCS.fetch_add(1, Ordering::Relaxed);
    } else {
        SERVER_ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; counting touches only
// atomics and const-initialized thread-locals without destructors (no allocation, no
// re-entrancy).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count_size(l.size());
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count_size(n);
        count();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A 1 GiB disk that stores nothing (like QEMU's null-co), with split-phase I/O answered by
/// its completion thread.
struct NullDevice {
    complete: Mutex<SyncSender<Arc<Pending>>>,
}

/// One command of a `NullIo`, shared with the completion thread.
struct Pending {
    done: AtomicBool,
    waker: Arc<dyn IoWaker>,
}

/// The device's completion thread: answers each command and tells its waker.
fn completion_thread(rx: Receiver<Arc<Pending>>) {
    EXEMPT.with(|e| e.set(true));
    for p in rx {
        p.done.store(true, Ordering::Release);
        p.waker.wake();
    }
}

struct NullIo {
    pending: Arc<Pending>,
    complete: SyncSender<Arc<Pending>>,
    busy: bool,
    /// Commands seen (every 4th declined, every 8th started one takes the slow path).
    n: u64,
    slow: bool,
}

impl AsyncBlockIo for NullIo {
    unsafe fn submit(
        &mut self,
        _: usize,
        lba: u64,
        buf: AsyncBuf,
        write: bool,
    ) -> block_scheme::Result<bool> {
        self.n += 1;
        if self.n.is_multiple_of(4) {
            DECLINED.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        if !write {
            // SAFETY: the buffer is lent to this command (non-empty: whole blocks).
            unsafe { *buf.ptr.as_ptr() = lba as u8 };
        }
        self.pending.done.store(false, Ordering::Relaxed);
        self.busy = true;
        self.slow = self.n % 8 == 1;
        if self.complete.send(self.pending.clone()).is_err() {
            panic!("the null device's completion thread is gone");
        }
        Ok(true)
    }

    fn poll(&mut self) -> AsyncPoll {
        if !self.busy {
            return AsyncPoll::Done;
        }
        if !self.pending.done.load(Ordering::Acquire) {
            return AsyncPoll::Pending;
        }
        if self.slow {
            return AsyncPoll::Slow;
        }
        self.busy = false;
        FAST_DONE.fetch_add(1, Ordering::Relaxed);
        AsyncPoll::Done
    }

    fn finish_blocking(&mut self) -> block_scheme::Result<()> {
        while !self.pending.done.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        self.busy = false;
        SLOW_DONE.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn deadline(&self) -> Option<Instant> {
        self.busy.then(|| Instant::now() + Duration::from_secs(30))
    }
}

impl BlockDevice for NullDevice {
    fn async_io(&self, waker: Arc<dyn IoWaker>) -> Option<Box<dyn AsyncBlockIo>> {
        let complete = self.complete.lock().unwrap().clone();
        Some(Box::new(NullIo {
            pending: Arc::new(Pending {
                done: AtomicBool::new(false),
                waker,
            }),
            complete,
            busy: false,
            n: 0,
            slow: false,
        }))
    }

    fn disks(&self) -> Vec<DiskInfo> {
        DISKS_CALLS.fetch_add(1, Ordering::Relaxed);
        EXEMPT.with(|e| e.set(true));
        let v = vec![DiskInfo {
            block_size: 512,
            blocks: 2 << 20,
            readonly: false,
        }];
        EXEMPT.with(|e| e.set(false));
        v
    }
    fn read_blocks(&self, _: usize, lba: u64, buf: &mut [u8]) -> block_scheme::Result<()> {
        buf[0] = lba as u8;
        Ok(())
    }
    fn write_blocks(&self, _: usize, _: u64, _: &[u8]) -> block_scheme::Result<()> {
        Ok(())
    }
    fn flush(&self, _: usize) -> block_scheme::Result<()> {
        Ok(())
    }
}

/// Runs `n` requests at queue depth `depth` (alternating reads and writes, 4 KiB, random
/// aligned offsets), reusing the same arena buffers.
fn run(
    c: &Client,
    h: &vscsi_ipc::Handle,
    bufs: &mut Vec<vscsi_ipc::ArenaBuf>,
    out: &mut Vec<vscsi_ipc::Completion>,
    n: u64,
    depth: usize,
) {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut issued = 0u64;
    let mut done = 0u64;
    let mut inflight = 0usize;
    while done < n {
        while inflight < depth && issued < n {
            let b = bufs.pop().expect("a free buffer");
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x % (1 << 18)) * 4096;
            let r = if issued.is_multiple_of(2) {
                c.prep_read(h, at, b)
            } else {
                c.prep_write(h, at, b)
            };
            if r.is_err() {
                panic!("prep failed");
            }
            issued += 1;
            inflight += 1;
        }
        c.submit().expect("submit");
        c.reap(1, Some(Duration::from_secs(10)), out).expect("reap");
        for comp in out.drain(..) {
            assert!(matches!(comp.result, Ok(4096)), "request failed");
            bufs.push(comp.buf.expect("buffer back"));
            inflight -= 1;
            done += 1;
        }
    }
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("alloc.sock");
    let (tx, rx) = sync_channel(256);
    std::thread::spawn(move || completion_thread(rx));
    let device = NullDevice {
        complete: Mutex::new(tx),
    };
    let scheme = Arc::new(DiskScheme::new("disk.virtio-scsi", Arc::new(device)));
    let mut config = ServerConfig::new(&path);
    config.workers = 8;
    config.arena = Some(Arc::new(MemfdArenas::new()));
    config.arena_bytes = 4 << 20;
    let server = Server::bind(config, scheme).expect("bind");
    let stop = server.shutdown_handle();
    let t = std::thread::spawn(move || server.run());

    CLIENT.with(|c| c.set(true));
    let c = Client::connect_shm(&path, 0).expect("connect");
    let h = c.open("/0", OpenFlags::READ_WRITE).expect("open");
    let depth = 32;
    let mut bufs: Vec<_> = (0..depth)
        .map(|_| c.alloc_buf(4096).expect("buf"))
        .collect();
    let mut out = Vec::with_capacity(depth);

    // Warm up: one-time, per-thread or grow-once state (the scheme's range-lock list, lazily
    // created thread handles, ...) reaches its steady size, with every worker both busy and
    // idle at least once (the queue-depth-1 phase and the pause).
    run(&c, &h, &mut bufs, &mut out, 20_000, depth);
    run(&c, &h, &mut bufs, &mut out, 2_000, 1);
    std::thread::sleep(Duration::from_millis(100));
    run(&c, &h, &mut bufs, &mut out, 20_000, depth);
    let n = 100_000u64;
    let (s0, c0, d0) = (
        SERVER_ALLOCS.load(Ordering::SeqCst),
        CLIENT_ALLOCS.load(Ordering::SeqCst),
        DISKS_CALLS.load(Ordering::SeqCst),
    );
    let paths0 = [&FAST_DONE, &SLOW_DONE, &DECLINED].map(|c| c.load(Ordering::SeqCst));
    MEASURING.store(true, Ordering::SeqCst);
    run(&c, &h, &mut bufs, &mut out, n, depth);
    MEASURING.store(false, Ordering::SeqCst);
    let (s1, c1, d1) = (
        SERVER_ALLOCS.load(Ordering::SeqCst),
        CLIENT_ALLOCS.load(Ordering::SeqCst),
        DISKS_CALLS.load(Ordering::SeqCst),
    );
    println!("shm_alloc: {n} requests at queue depth {depth} (4 KiB, half reads, half writes)");
    println!("  server-side allocations: {}", s1 - s0);
    if s1 > s0 {
        let sizes: Vec<u64> = LAST_SIZES
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .collect();
        println!("  sizes of the server-side allocations: {sizes:?}");
    }
    println!("  client-side allocations: {}", c1 - c0);
    let paths = [&FAST_DONE, &SLOW_DONE, &DECLINED].map(|c| c.load(Ordering::SeqCst));
    let [fast, slow, declined] = [0, 1, 2].map(|i| paths[i] - paths0[i]);
    println!(
        "  requests collected by the poller: {fast}, finished by a worker after starting: \
         {slow}, declined by the device (run by a worker): {declined}"
    );
    println!(
        "  (exempt) BlockDevice::disks() Vec allocations made by the scheme: {} ({:.2} per request)",
        d1 - d0,
        (d1 - d0) as f64 / n as f64
    );
    drop(bufs);
    drop(h);
    drop(c);
    stop.shutdown();
    t.join().expect("server thread").expect("server");
    assert_eq!(s1 - s0, 0, "the server allocated in steady state");
    assert_eq!(c1 - c0, 0, "the client allocated in steady state");
    assert!(
        fast > 0 && slow > 0 && declined > 0,
        "every server path ran in steady state"
    );
    println!("shm_alloc: ok");
}
