//! The server half of the shared-memory transport (layout and doorbells: [`crate::shm`]).
//!
//! Owns: the [`ArenaProvider`] contract (device-visible memory for client arenas) and a memfd
//! implementation of it, per-connection session set-up (ring memfd, doorbells, the arena), the
//! per-connection poller thread (adaptive spin, then sleep on the doorbell), validation of
//! every submission copied out of shared memory, the asynchronous fast path, the shared pool
//! of shm workers that call the scheme with slices of the arena (zero-copy when the arena is
//! DMA memory), completion posting, and the session's teardown (wait for in-flight requests,
//! recycle the arena).
//!
//! # Fast path (no worker)
//! When the device has split-phase I/O ([`block_scheme::BlockDevice::async_io`]), each request
//! slot of a session owns an [`AsyncSlot`]. The poller starts an eligible READ or WRITE itself
//! ([`DiskScheme::submit_async`]: aligned whole blocks, inside the region, range free now) and
//! goes on; the device's completion thread calls the slot's [`SlotWaker`], which sets the
//! slot's bit in the session's [`PollerBell`] and rings the poller's private eventfd only if the
//! poller said it sleeps. The poller then polls the answered slots, posts their completions
//! and wakes the client (only if it sleeps, as for every completion). Requests that are not
//! eligible, FSYNC, and fast requests that end in anything but a clean full transfer or pass
//! their deadline (the device's command timeout) go to the shm workers, which finish them
//! blocking (the driver's recovery and retries). A request is answered exactly once: by the
//! poller (`Done`) or by the worker it was handed to.
//!
//! No heap allocation per request: the poller, the job queue ([`JobQueue`], a ring allocated
//! once) and the workers move only plain values, `Arc` clones and the slots' `AsyncSlot`s
//! (allocated at set-up, moved, never reallocated); each connection's request slots are a
//! fixed table allocated at set-up.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use block_scheme::{AsyncBuf, AsyncPoll, AsyncSlot, BlockDevice, CallerCtx, DiskScheme, IoWaker};
use log::{debug, error, warn};
use rustix::event::{PollFd, PollFlags, poll};
use syscall::error::{EBADF, EBUSY, EFAULT, EINVAL, EIO, ENOSYS};

use crate::protocol::MAX_PAYLOAD;
use crate::server::{Conn, lock};
use crate::shm::{
    self, Cqe, MAX_RING_ENTRIES, Mapping, RING_MAGIC, RING_VERSION, Ring, ShmInfo, Sqe, off, op,
};

/// Device-visible memory for client arenas. The daemon implements it over its platform
/// (on QEMU: a memory window plugged at run time); [`MemfdArenas`] is a plain-memory one.
pub trait ArenaProvider: Send + Sync + 'static {
    /// A new arena of at least `len` bytes for the connection of `client`.
    ///
    /// Contract:
    /// - `fd` maps the whole arena from offset 0 and is what the client gets (the server
    ///   closes its copy after sending it). It must be sealed against shrinking
    ///   (`F_SEAL_SHRINK`, see [`shm::sealed_memfd`]): a client able to truncate the file would
    ///   make every other mapping of it fault (SIGBUS). The server refuses unsealed fds.
    /// - `ptr..ptr + len` is this process's read-write mapping of the same memory; it stays
    ///   mapped until `recycle` has been called. The server never unmaps it.
    /// - The memory holds nothing of another client: new, or zeroed and recycled only to a
    ///   client with the same uid as its previous holder (an ended client may keep its
    ///   mapping — it cannot be revoked — and the uid is the boundary Linux enforces anyway).
    /// - `recycle` is called once, after the connection ended and no request uses the memory.
    fn alloc(&self, len: usize, client: &CallerCtx) -> io::Result<ArenaMem>;
}

/// One arena, as an [`ArenaProvider`] hands it out.
pub struct ArenaMem {
    /// The descriptor for the client (sealed against shrinking).
    pub fd: OwnedFd,
    /// The server's mapping of the arena.
    pub ptr: NonNull<u8>,
    /// Arena bytes (at least what was asked).
    pub len: usize,
    /// Gives the arena back; called once when the connection is gone.
    pub recycle: Box<dyn FnOnce() + Send>,
}

// SAFETY: ArenaMem describes memory that stays mapped until `recycle` runs (the provider's
// contract); the pointer is only dereferenced under the session's slot discipline (see
// `ShmConn::arena_slice`), from whichever thread holds the session.
unsafe impl Send for ArenaMem {}

impl std::fmt::Debug for ArenaMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArenaMem")
            .field("fd", &self.fd)
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Arenas in fresh sealed memfds (not device memory: the driver bounces them). For tests, and
/// for platforms without shareable DMA windows. Counts live arenas for tests.
#[derive(Debug, Default)]
pub struct MemfdArenas {
    live: Arc<std::sync::atomic::AtomicUsize>,
}

impl MemfdArenas {
    /// A provider.
    pub fn new() -> MemfdArenas {
        MemfdArenas::default()
    }

    /// Arenas handed out and not yet recycled.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }
}

impl ArenaProvider for MemfdArenas {
    fn alloc(&self, len: usize, _client: &CallerCtx) -> io::Result<ArenaMem> {
        let len = len.max(1).div_ceil(4096) * 4096;
        let fd = shm::sealed_memfd("vscsi-arena", len)?;
        let map = Mapping::map(fd.as_fd(), len)?;
        let ptr = map.ptr();
        let live = self.live.clone();
        live.fetch_add(1, Ordering::SeqCst);
        Ok(ArenaMem {
            fd,
            ptr,
            len,
            recycle: Box::new(move || {
                drop(map);
                live.fetch_sub(1, Ordering::SeqCst);
            }),
        })
    }
}

/// Shared-memory settings of a running server.
pub(crate) struct ShmService {
    pub(crate) provider: Arc<dyn ArenaProvider>,
    pub(crate) arena_bytes: usize,
    pub(crate) max_in_flight: u32,
    pub(crate) spin: Duration,
    /// `ServerConfig::shm_poll`.
    pub(crate) poll: Duration,
    pub(crate) jobs: Arc<JobQueue>,
    /// The scheme, for the pollers' fast path; `None`: every request goes to the workers.
    pub(crate) scheme: Option<Arc<dyn AsyncScheme>>,
}

/// What the poller needs of the scheme for the fast path, without its device type (the
/// poller is not generic): [`DiskScheme::async_slot`] and [`DiskScheme::submit_async`].
pub(crate) trait AsyncScheme: Send + Sync {
    /// See [`DiskScheme::async_slot`].
    fn async_slot(&self, waker: Arc<dyn IoWaker>) -> Option<AsyncSlot>;
    /// See [`DiskScheme::submit_async`].
    ///
    /// # Safety
    /// As [`DiskScheme::submit_async`].
    unsafe fn submit_async(
        &self,
        slot: &mut AsyncSlot,
        id: usize,
        write: bool,
        offset: u64,
        buf: AsyncBuf,
    ) -> block_scheme::Result<bool>;
    /// The device's [`BlockDevice::begin_busy_poll`].
    fn begin_busy_poll(&self) -> bool;
    /// The device's [`BlockDevice::busy_poll`].
    fn busy_poll(&self) -> usize;
    /// The device's [`BlockDevice::end_busy_poll`].
    fn end_busy_poll(&self);
}

impl<D: BlockDevice> AsyncScheme for DiskScheme<D> {
    fn async_slot(&self, waker: Arc<dyn IoWaker>) -> Option<AsyncSlot> {
        DiskScheme::async_slot(self, waker)
    }

    unsafe fn submit_async(
        &self,
        slot: &mut AsyncSlot,
        id: usize,
        write: bool,
        offset: u64,
        buf: AsyncBuf,
    ) -> block_scheme::Result<bool> {
        // SAFETY: the caller's contract is this one's.
        unsafe { DiskScheme::submit_async(self, slot, id, write, offset, buf) }
    }

    fn begin_busy_poll(&self) -> bool {
        self.device().begin_busy_poll()
    }

    fn busy_poll(&self) -> usize {
        self.device().busy_poll()
    }

    fn end_busy_poll(&self) {
        self.device().end_busy_poll();
    }
}

/// One busy-polling episode of a poller: ended (the device's interrupts back) when dropped,
/// however the poller leaves it.
struct BusyPolling<'a>(&'a dyn AsyncScheme);

impl<'a> BusyPolling<'a> {
    fn begin(scheme: &'a dyn AsyncScheme) -> Option<Self> {
        scheme.begin_busy_poll().then_some(BusyPolling(scheme))
    }
}

impl Drop for BusyPolling<'_> {
    fn drop(&mut self) {
        self.0.end_busy_poll();
    }
}

struct QueueState {
    jobs: VecDeque<ShmJob>,
    cap: usize,
    /// Idle workers (index, thread), the most recently idle last: woken LIFO, so the few
    /// workers a pipeline needs stay hot and the rest stay asleep. Capacity = workers.
    idle: Vec<(usize, Thread)>,
    /// Whether worker `i` is in `idle`.
    in_idle: Vec<bool>,
    blocked_producers: usize,
    closed: bool,
}

/// The bounded queue from pollers to shm workers. Its ring and lists are allocated once;
/// pushing and popping never allocate, and a thread is woken only when one sleeps (so a busy
/// pipeline makes no wake-up system calls).
pub(crate) struct JobQueue {
    state: Mutex<QueueState>,
    not_full: Condvar,
}

impl JobQueue {
    /// A queue of `cap` jobs for `workers` workers (indices `0..workers`).
    pub(crate) fn new(cap: usize, workers: usize) -> JobQueue {
        let cap = cap.max(1);
        JobQueue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::with_capacity(cap),
                cap,
                idle: Vec::with_capacity(workers),
                in_idle: vec![false; workers],
                blocked_producers: 0,
                closed: false,
            }),
            not_full: Condvar::new(),
        }
    }

    /// Queues a job, waiting while the queue is full; gives it back if the queue is closed.
    // The job comes back by value: boxing it would allocate per request.
    #[allow(clippy::result_large_err)]
    fn push(&self, job: ShmJob) -> Result<(), ShmJob> {
        let mut st = lock(&self.state);
        while st.jobs.len() >= st.cap && !st.closed {
            st.blocked_producers += 1;
            st = self.not_full.wait(st).unwrap_or_else(|e| e.into_inner());
            st.blocked_producers -= 1;
        }
        if st.closed {
            return Err(job);
        }
        st.jobs.push_back(job);
        let wake = st.idle.pop().map(|(i, t)| {
            if let Some(f) = st.in_idle.get_mut(i) {
                *f = false;
            }
            t
        });
        drop(st);
        if let Some(t) = wake {
            t.unpark();
        }
        Ok(())
    }

    /// The next job for worker `me`; `None` once the queue is closed and empty.
    fn pop(&self, me: usize) -> Option<ShmJob> {
        let mut st = lock(&self.state);
        loop {
            if let Some(j) = st.jobs.pop_front() {
                if st.in_idle.get(me) == Some(&true) {
                    // Woken spuriously while listed idle: unlist, so no push wakes a busy
                    // worker (rare; retain does not allocate).
                    st.in_idle[me] = false;
                    st.idle.retain(|&(i, _)| i != me);
                }
                let wake = st.blocked_producers > 0;
                drop(st);
                if wake {
                    self.not_full.notify_one();
                }
                return Some(j);
            }
            if st.closed {
                return None;
            }
            if st.in_idle.get(me) == Some(&false) {
                st.in_idle[me] = true;
                // Within capacity (one entry per worker): no allocation.
                st.idle.push((me, thread::current()));
            }
            drop(st);
            // A push that took us off the idle list unparks us (the token is kept if it
            // comes first); spurious returns just loop.
            thread::park();
            st = lock(&self.state);
        }
    }

    /// Stops the workers once the queue is empty, and refuses new jobs.
    pub(crate) fn close(&self) {
        let mut st = lock(&self.state);
        st.closed = true;
        let idle = std::mem::take(&mut st.idle);
        st.in_idle.iter_mut().for_each(|f| *f = false);
        drop(st);
        for (_, t) in idle {
            t.unpark();
        }
        self.not_full.notify_all();
    }
}

/// A validated request, as the poller hands it to a worker.
#[derive(Clone, Copy, Debug)]
struct ShmReq {
    op: u8,
    handle: u64,
    offset: u64,
    buf: usize,
    len: usize,
    user_data: u64,
}

/// A job for an shm worker: plain values, two `Arc` clones and, for a fast request to
/// finish blocking, its slot's `AsyncSlot` (moved, not allocated).
pub(crate) struct ShmJob {
    shm: Arc<ShmConn>,
    conn: Arc<Conn>,
    slot: u16,
    req: ShmReq,
    /// A fast-path request already started on this `AsyncSlot`: the worker only finishes it
    /// ([`AsyncSlot::finish_blocking`]) and gives the `AsyncSlot` back with the completion.
    started: Option<AsyncSlot>,
}

/// An arena range in use by a request in flight.
#[derive(Clone, Copy, Default)]
struct SlotRange {
    busy: bool,
    /// The request writes into the arena (a read from the disk).
    writes_arena: bool,
    start: usize,
    end: usize,
    /// The request runs on the fast path and the poller collects it (its `AsyncSlot` is in
    /// `Book::ios`); false once handed to a worker.
    fast: bool,
    /// The request's `user_data` (for the fast path's completion).
    user_data: u64,
    /// The connection's handle the request names (a Close waits for its requests).
    handle: u64,
}

/// Completion-side bookkeeping of one session, under one mutex.
///
/// Lock order: `book` before the driver's locks (the poller polls and settles `AsyncSlot`s
/// under it); the device's completion thread never takes it (its wakers touch only atomics
/// and the eventfd).
struct Book {
    /// CQEs published (private copy; the shared `cq_tail` is only ever written from it).
    cq_tail: u32,
    in_flight: u32,
    /// Fixed table, one entry per request slot.
    slots: Box<[SlotRange]>,
    /// Free slot indices (capacity = slots; push/pop never allocate).
    free: Vec<u16>,
    /// Per request slot, its `AsyncSlot` for the fast path (all `None` without one). Taken
    /// out while the poller starts a request on it (outside this lock) and while a worker
    /// finishes one blocking (given back with the completion).
    ios: Box<[Option<AsyncSlot>]>,
    /// Closes waiting for a handle's requests ([`ShmConn::wait_handle_quiet`]): while above
    /// 0, every completion notifies `idle_cv`.
    handle_waiters: usize,
}

/// The poller's wake-up for fast-path completions: its private eventfd (also rung to stop it
/// and when a worker frees a slot it waits for) and which slots were answered.
///
/// Protocol (the doorbell rule of [`crate::shm`], with `armed` as the sleeping flag): a waker
/// sets its slot's bit in `done`, then, if `armed`, swaps it to false and rings `fd`. The
/// poller sets `armed`, then (both `SeqCst`) re-checks `done`, and sleeps only if every word
/// is 0; so either it sees the bit or the waker sees `armed` and rings. A completion while the
/// poller is awake costs two atomics and no system call.
struct PollerBell {
    fd: OwnedFd,
    /// The poller sleeps (or is about to) with fast requests in flight.
    armed: AtomicBool,
    /// One bit per request slot, set when its fast request was answered; the poller takes
    /// them with `swap(0)`. A bit may be stale (the slot's request was handed to a worker);
    /// polling such a slot is harmless.
    done: Box<[AtomicU64]>,
}

impl PollerBell {
    fn any_done(&self) -> bool {
        self.done.iter().any(|w| w.load(Ordering::SeqCst) != 0)
    }
}

/// The waker of one request slot's `AsyncSlot` (made at set-up).
struct SlotWaker {
    bell: Arc<PollerBell>,
    index: usize,
}

impl IoWaker for SlotWaker {
    fn wake(&self) {
        if let Some(word) = self.bell.done.get(self.index / 64) {
            word.fetch_or(1 << (self.index % 64), Ordering::SeqCst);
        }
        if self.bell.armed.load(Ordering::SeqCst) && self.bell.armed.swap(false, Ordering::SeqCst) {
            shm::kick(self.bell.fd.as_fd());
        }
    }
}

/// One connection's shared-memory session.
pub(crate) struct ShmConn {
    conn_id: u64,
    ring: Ring,
    arena: NonNull<u8>,
    arena_len: usize,
    recycle: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Set when finishing a started request panicked: its command may have been left with
    /// the device (an orphaned slot whose buffer is in the arena), so the arena is never
    /// recycled (leaked instead: `give_back`).
    arena_tainted: AtomicBool,
    info: ShmInfo,
    /// The client rings it; the poller sleeps on it.
    server_bell: OwnedFd,
    /// The server rings it when the client sleeps.
    client_bell: OwnedFd,
    /// Private: stop requests, "room again" from workers, fast-path completions.
    bell: Arc<PollerBell>,
    /// The scheme, when the fast path is on for this session.
    scheme: Option<Arc<dyn AsyncScheme>>,
    stop: AtomicBool,
    /// The poller sleeps because every request slot is in use.
    poller_waits_room: AtomicBool,
    book: Mutex<Book>,
    idle_cv: Condvar,
    spin_max: Duration,
    /// `ServerConfig::shm_poll` (0: no busy polling of the device).
    poll_max: Duration,
}

// SAFETY: the raw arena pointer is the only non-Send/Sync field; the arena stays mapped until
// `recycle` runs (after the session is idle and stopped), and its bytes are reached only
// through `arena_slice`/`arena_slice_mut` under the slot discipline described there.
unsafe impl Send for ShmConn {}
// SAFETY: as above.
unsafe impl Sync for ShmConn {}

/// What the reader thread keeps of a session: the session and its poller.
pub(crate) struct ShmHandle {
    shm: Arc<ShmConn>,
    poller: Option<thread::JoinHandle<()>>,
}

impl ShmHandle {
    /// The session (to wait for a handle's requests outside the connection's lock).
    pub(crate) fn session(&self) -> Arc<ShmConn> {
        self.shm.clone()
    }
}

/// Why set-up failed: an errno for the client and a line for the log.
pub(crate) struct SetupError {
    pub(crate) errno: i32,
    pub(crate) why: String,
}

fn setup_err(errno: i32, why: impl Into<String>) -> SetupError {
    SetupError {
        errno,
        why: why.into(),
    }
}

fn io_errno(e: &io::Error) -> i32 {
    match e.raw_os_error() {
        Some(n) if n > 0 && n < 4096 => n,
        _ => syscall::error::ENOMEM,
    }
}

/// Creates a session for `conn`: arena, ring, doorbells, poller. Returns what the reply
/// needs (info and the four descriptors, in the order of [`crate::shm`]) and the handle.
pub(crate) fn setup(
    svc: &ShmService,
    conn: &Arc<Conn>,
    arena_bytes: u64,
) -> Result<(ShmInfo, Vec<OwnedFd>, ShmHandle), SetupError> {
    let want = if arena_bytes == 0 {
        svc.arena_bytes
    } else {
        usize::try_from(arena_bytes)
            .unwrap_or(usize::MAX)
            .min(svc.arena_bytes)
    };
    let want = want.max(4096).div_ceil(4096) * 4096;
    let arena = svc
        .provider
        .alloc(want, &conn.ctx)
        .map_err(|e| setup_err(io_errno(&e), format!("no arena of {want} bytes: {e}")))?;
    // From here on, a failure must give the arena back.
    let ArenaMem {
        fd: arena_fd,
        ptr,
        len: arena_len,
        recycle,
    } = arena;
    let fail = |recycle: Box<dyn FnOnce() + Send>, e: SetupError| {
        recycle();
        Err(e)
    };
    if arena_len < want {
        return fail(
            recycle,
            setup_err(EIO, format!("provider gave {arena_len} bytes for {want}")),
        );
    }
    if !shm::is_shrink_sealed(arena_fd.as_fd()) {
        return fail(
            recycle,
            setup_err(
                EIO,
                "the arena fd is not sealed against shrinking (F_SEAL_SHRINK); a client could \
                 truncate it and crash the server (SIGBUS): use a sealed memfd",
            ),
        );
    }
    match rustix::fs::fstat(&arena_fd) {
        Ok(st) if u64::try_from(st.st_size).is_ok_and(|s| s >= arena_len as u64) => {}
        Ok(st) => {
            return fail(
                recycle,
                setup_err(
                    EIO,
                    format!("arena file is {} bytes, less than {arena_len}", st.st_size),
                ),
            );
        }
        Err(e) => return fail(recycle, setup_err(EIO, format!("arena fstat: {e}"))),
    }
    let entries = svc
        .max_in_flight
        .max(1)
        .next_power_of_two()
        .min(MAX_RING_ENTRIES);
    let max_in_flight = svc.max_in_flight.clamp(1, entries);
    let ring_len = shm::ring_len(entries, entries);
    let made = (|| -> io::Result<(OwnedFd, Ring, OwnedFd, OwnedFd, OwnedFd)> {
        let ring_fd = shm::sealed_memfd("vscsi-ring", ring_len)?;
        let ring = Ring::new(Mapping::map(ring_fd.as_fd(), ring_len)?, entries, entries)?;
        Ok((
            ring_fd,
            ring,
            shm::new_doorbell()?,
            shm::new_doorbell()?,
            shm::new_doorbell()?,
        ))
    })();
    let (ring_fd, ring, server_bell, client_bell, wake_fd) = match made {
        Ok(m) => m,
        Err(e) => {
            return fail(
                recycle,
                setup_err(io_errno(&e), format!("ring set-up: {e}")),
            );
        }
    };
    let dups = (|| -> io::Result<(OwnedFd, OwnedFd)> {
        Ok((server_bell.try_clone()?, client_bell.try_clone()?))
    })();
    let (sb_dup, cb_dup) = match dups {
        Ok(d) => d,
        Err(e) => return fail(recycle, setup_err(io_errno(&e), format!("dup: {e}"))),
    };
    ring.word(off::MAGIC)
        .store(u32::from_le_bytes(RING_MAGIC), Ordering::Relaxed);
    ring.word(off::VERSION)
        .store(RING_VERSION, Ordering::Relaxed);
    ring.word(off::SQ_ENTRIES).store(entries, Ordering::Relaxed);
    ring.word(off::CQ_ENTRIES).store(entries, Ordering::Relaxed);
    ring.word(off::SQES)
        .store(shm::RING_HEADER_LEN as u32, Ordering::Relaxed);
    ring.word(off::CQES).store(
        (shm::RING_HEADER_LEN + entries as usize * shm::SQE_LEN) as u32,
        Ordering::Release,
    );
    let info = ShmInfo {
        version: RING_VERSION,
        sq_entries: entries,
        cq_entries: entries,
        max_in_flight,
        ring_len: ring_len as u64,
        arena_len: arena_len as u64,
        max_io: arena_len.min(MAX_PAYLOAD) as u32,
    };
    let n = max_in_flight as usize;
    let bell = Arc::new(PollerBell {
        fd: wake_fd,
        armed: AtomicBool::new(false),
        done: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
    });
    // The fast path: one `AsyncSlot` per request slot, or none at all (also when the device
    // cannot reach this arena in place: no request could ever start).
    let mut ios: Vec<Option<AsyncSlot>> = Vec::with_capacity(n);
    let whole_arena = AsyncBuf {
        ptr,
        len: arena_len,
    };
    if let Some(scheme) = &svc.scheme {
        for index in 0..n {
            let waker = Arc::new(SlotWaker {
                bell: bell.clone(),
                index,
            });
            match scheme.async_slot(waker) {
                Some(io) if io.reaches(whole_arena) => ios.push(Some(io)),
                _ => break,
            }
        }
    }
    if ios.len() < n {
        ios.clear();
        ios.resize_with(n, || None);
    }
    let fast = svc
        .scheme
        .clone()
        .filter(|_| ios.iter().all(Option::is_some));
    let session = Arc::new(ShmConn {
        conn_id: conn.id,
        ring,
        arena: ptr,
        arena_len,
        recycle: Mutex::new(Some(recycle)),
        arena_tainted: AtomicBool::new(false),
        info,
        server_bell,
        client_bell,
        bell,
        scheme: fast,
        stop: AtomicBool::new(false),
        poller_waits_room: AtomicBool::new(false),
        book: Mutex::new(Book {
            cq_tail: 0,
            in_flight: 0,
            slots: vec![SlotRange::default(); n].into_boxed_slice(),
            free: (0..n as u16).rev().collect(),
            ios: ios.into_boxed_slice(),
            handle_waiters: 0,
        }),
        idle_cv: Condvar::new(),
        spin_max: svc.spin,
        poll_max: svc.poll,
    });
    let (s2, c2, jobs) = (session.clone(), conn.clone(), svc.jobs.clone());
    let poller = thread::Builder::new()
        .name(format!("vscsi-shm-poll-{}", conn.id))
        .stack_size(256 << 10)
        .spawn(move || poll_loop(&s2, &c2, &jobs))
        .map_err(|e| setup_err(io_errno(&e), format!("poller thread: {e}")))?;
    let fds = vec![ring_fd, arena_fd, sb_dup, cb_dup];
    Ok((
        info,
        fds,
        ShmHandle {
            shm: session,
            poller: Some(poller),
        },
    ))
}

impl ShmHandle {
    /// Ends the session: stops the poller, waits until no request is in flight, marks the ring
    /// closed, wakes the client and gives the arena back. Called by the connection's teardown
    /// before it closes the connection's handles. The stopping poller hands its fast requests
    /// to the workers (which settle them, recovering any the device holds), so no request,
    /// and no device access to the arena, outlives the wait.
    pub(crate) fn shutdown(mut self) {
        let s = &self.shm;
        s.stop.store(true, Ordering::SeqCst);
        shm::kick(s.bell.fd.as_fd());
        if let Some(p) = self.poller.take() {
            let _ = p.join();
        }
        let mut b = lock(&s.book);
        while b.in_flight > 0 {
            b = s.idle_cv.wait(b).unwrap_or_else(|e| e.into_inner());
        }
        drop(b);
        s.ring.word(off::CLOSED).store(1, Ordering::SeqCst);
        shm::kick(s.client_bell.as_fd());
        s.give_back();
        debug!("connection {}: shared-memory session ended", s.conn_id);
    }
}

impl Drop for ShmConn {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// The poller's outcome of one pass over the submission ring.
enum Pass {
    /// Consumed at least one entry.
    Progress,
    /// Nothing to do: the ring is empty, or (`blocked`) entries wait for a free slot.
    Idle { blocked: bool },
    /// The client broke the ring's rules; end the session.
    Violation(&'static str),
    /// The worker pool is gone (server stopping).
    Closed,
}

/// How an attempt to start a request on the fast path went; the `AsyncSlot` comes back in
/// every case.
enum Fast {
    /// Started; collect it by polling (with its deadline, if the device keeps one).
    Started(AsyncSlot, Option<Instant>),
    /// Not eligible now: the workers run it as usual.
    NotStarted(AsyncSlot),
    /// Refused before any I/O, with this errno (what a worker would have answered).
    Refused(AsyncSlot, i32),
}

/// The poller's private state (allocated once when it starts).
struct PollerState {
    /// SQEs consumed (never read back from shared memory).
    sq_head: u32,
    /// SQEs admitted (each gets exactly one CQE).
    admitted: u32,
    /// Fast requests started and neither completed nor handed to a worker.
    fast_in_flight: u32,
    /// No fast request in flight is overdue before this instant (a lower bound, recomputed
    /// when it passes); `None` when none is in flight.
    earliest: Option<Instant>,
    /// Calls of `reap` with fast requests in flight (for how often it reads the clock).
    reaps: u32,
    /// Slots whose fast request goes to a worker: a bitmap filled under the book lock and
    /// emptied after it is released (pushing a job may wait).
    slow: Box<[u64]>,
}

impl ShmConn {
    fn give_back(&self) {
        let r = lock(&self.recycle).take();
        if let Some(r) = r {
            if self.arena_tainted.load(Ordering::SeqCst) {
                error!(
                    "connection {}: a request panicked while the device may still hold it; \
                     its arena is leaked, not recycled",
                    self.conn_id
                );
                // Not called and not dropped: the memory stays mapped and is never handed
                // out again, so a late device write cannot reach another client.
                std::mem::forget(r);
                return;
            }
            r();
        }
    }

    /// The arena bytes of a validated request, shared.
    ///
    /// # Safety
    /// `(start, len)` must have been validated against `arena_len` and registered in the book
    /// as in flight (with no overlapping in-flight range that writes the arena), and the
    /// caller must drop the slice before completing that request.
    unsafe fn arena_slice(&self, start: usize, len: usize) -> &[u8] {
        // SAFETY: per the contract, the range is inside the arena mapping, which stays mapped
        // until `recycle` (only after every request completed). No `&mut` to these bytes
        // exists in this process meanwhile (the overlap check). The client may change them
        // concurrently from its own process; u8 has no invalid values, and the scheme and
        // the driver only move these bytes, never derive control or addresses from them.
        unsafe { std::slice::from_raw_parts(self.arena.as_ptr().add(start), len) }
    }

    /// The arena bytes of a validated request, exclusive.
    ///
    /// # Safety
    /// As [`ShmConn::arena_slice`], and the range overlaps no other in-flight range at all.
    #[allow(clippy::mut_from_ref)]
    unsafe fn arena_slice_mut(&self, start: usize, len: usize) -> &mut [u8] {
        // SAFETY: as in `arena_slice`; the overlap check at admission guarantees no other
        // reference in this process to any of these bytes while the request is in flight.
        unsafe { std::slice::from_raw_parts_mut(self.arena.as_ptr().add(start), len) }
    }

    /// Checks a copied-out SQE; returns the request or the errno to complete it with.
    fn validate(&self, e: &Sqe) -> Result<ShmReq, i32> {
        if e.flags != 0 || e.reserved16 != 0 || e.reserved != [0; 3] {
            return Err(EINVAL);
        }
        let req = |buf: usize, len: usize| ShmReq {
            op: e.opcode,
            handle: e.handle,
            offset: e.offset,
            buf,
            len,
            user_data: e.user_data,
        };
        match e.opcode {
            op::READ | op::WRITE => {
                let len = e.len as usize;
                if len == 0 || len > self.info.max_io as usize {
                    return Err(EINVAL);
                }
                if e.offset.checked_add(len as u64).is_none() {
                    return Err(EINVAL);
                }
                let start = usize::try_from(e.buf).map_err(|_| EFAULT)?;
                match start.checked_add(len) {
                    Some(end) if end <= self.arena_len => Ok(req(start, len)),
                    _ => Err(EFAULT),
                }
            }
            op::FSYNC => {
                if e.len != 0 || e.offset != 0 || e.buf != 0 {
                    return Err(EINVAL);
                }
                Ok(req(0, 0))
            }
            _ => Err(ENOSYS),
        }
    }

    /// Writes one CQE under the book lock and publishes it.
    fn post(&self, b: &mut Book, user_data: u64, res: i32) {
        self.ring.write_cqe(
            b.cq_tail,
            &Cqe {
                user_data,
                res,
                flags: 0,
            },
        );
        b.cq_tail = b.cq_tail.wrapping_add(1);
        // Release: the CQE's bytes are visible before the new tail.
        self.ring
            .word(off::CQ_TAIL)
            .store(b.cq_tail, Ordering::Release);
    }

    /// Wakes the client if it said it sleeps (see the doorbell protocol in [`crate::shm`]).
    fn wake_client(&self) {
        fence(Ordering::SeqCst);
        if self
            .ring
            .word(off::CLIENT_SLEEPING)
            .swap(0, Ordering::SeqCst)
            != 0
        {
            shm::kick(self.client_bell.as_fd());
        }
    }

    /// Frees request slot `slot` under the book lock (its request is answered).
    /// Waits until no request of this session naming the connection's `handle` is in flight
    /// (a Close: the scheme handle, and what it holds, such as a whole-disk or partition
    /// exclusion, is released only after them, as the socket's requests are waited for). The
    /// closing handle gives no new request a start (it names no scheme handle any more), so
    /// the wait ends when the device answered those in flight (or their recovery ended).
    /// Returns early only if finishing one of them panicked (its slot may never come back).
    pub(crate) fn wait_handle_quiet(&self, handle: u64) {
        let mut b = lock(&self.book);
        b.handle_waiters += 1;
        while b.slots.iter().any(|s| s.busy && s.handle == handle)
            && !self.arena_tainted.load(Ordering::SeqCst)
        {
            b = self
                .idle_cv
                .wait_timeout(b, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        b.handle_waiters -= 1;
    }

    fn free_slot(b: &mut Book, slot: u16) {
        if let Some(s) = b.slots.get_mut(usize::from(slot)) {
            s.busy = false;
            s.fast = false;
        }
        b.free.push(slot);
        b.in_flight = b.in_flight.saturating_sub(1);
    }

    /// Completes the request in `slot` (called by the worker that ran it, or by the poller for
    /// a request it refused); `io` is the slot's `AsyncSlot` if the request had it.
    fn complete(&self, slot: u16, user_data: u64, res: i32, io: Option<AsyncSlot>) {
        let mut b = lock(&self.book);
        if let Some(io) = io
            && let Some(entry) = b.ios.get_mut(usize::from(slot))
        {
            *entry = Some(io);
        }
        Self::free_slot(&mut b, slot);
        self.post(&mut b, user_data, res);
        let notify = b.in_flight == 0 || b.handle_waiters > 0;
        drop(b);
        if notify {
            self.idle_cv.notify_all();
        }
        self.wake_client();
        // The poller may sleep waiting for a free slot: it set the flag before re-checking
        // `in_flight` under the book lock, so either it saw our decrement or we see its flag.
        if self.poller_waits_room.swap(false, Ordering::SeqCst) {
            shm::kick(self.bell.fd.as_fd());
        }
    }

    /// Tries to start a validated READ or WRITE on the fast path (on `io`, its slot's
    /// `AsyncSlot`, already registered in the book as in flight).
    fn start_fast(&self, conn: &Conn, mut io: AsyncSlot, req: &ShmReq) -> Fast {
        let Some(scheme) = &self.scheme else {
            return Fast::NotStarted(io);
        };
        let Some(slot) = conn.slot(req.handle) else {
            return Fast::Refused(io, EBADF);
        };
        // Held while the request starts, as a worker holds it for its scheme call.
        let guard = slot.read().unwrap_or_else(|e| e.into_inner());
        let Some(id) = *guard else {
            return Fast::Refused(io, EBADF);
        };
        // SAFETY: `req.buf + req.len <= arena_len` (validated), inside the arena mapping.
        let ptr = unsafe { self.arena.add(req.buf) };
        let buf = AsyncBuf { ptr, len: req.len };
        // SAFETY: the range is validated and registered in the book as in flight (with the
        // overlap check of admission) until the request completes, and it completes only
        // after it settled: the poller posts it after `poll` said Done, a worker after
        // `finish_blocking` returned. The arena stays mapped until `recycle`, which runs after
        // every request completed (the teardown waits for them, and the stopping poller hands
        // its fast requests to the workers instead of dropping them).
        match unsafe { scheme.submit_async(&mut io, id, req.op == op::WRITE, req.offset, buf) } {
            Ok(true) => {
                let deadline = io.deadline();
                Fast::Started(io, deadline)
            }
            Ok(false) => Fast::NotStarted(io),
            Err(e) => Fast::Refused(io, e.errno.clamp(1, 4095)),
        }
    }

    /// One pass: consume every SQE that has room.
    fn pass(
        &self,
        conn: &Arc<Conn>,
        me: &Arc<ShmConn>,
        jobs: &JobQueue,
        st: &mut PollerState,
    ) -> Pass {
        let entries = self.info.sq_entries;
        let mut progress = false;
        loop {
            let tail = self.ring.word(off::SQ_TAIL).load(Ordering::Acquire);
            let pending = tail.wrapping_sub(st.sq_head);
            if pending > entries {
                return Pass::Violation("sq_tail is more than the ring size ahead");
            }
            if pending == 0 {
                return if progress {
                    Pass::Progress
                } else {
                    Pass::Idle { blocked: false }
                };
            }
            // Loaded after sq_tail: a reap the client did before publishing is visible.
            let cq_head = self.ring.word(off::CQ_HEAD).load(Ordering::Acquire);
            let mut b = lock(&self.book);
            if b.cq_tail.wrapping_sub(cq_head) > self.info.cq_entries {
                return Pass::Violation("cq_head is outside the published completions");
            }
            let room = st.admitted.wrapping_sub(cq_head) < self.info.cq_entries;
            if !room || b.in_flight >= self.info.max_in_flight {
                return if progress {
                    Pass::Progress
                } else {
                    Pass::Idle { blocked: true }
                };
            }
            // Copy the entry out once; everything below looks only at the copy.
            let e = self.ring.read_sqe(st.sq_head);
            st.sq_head = st.sq_head.wrapping_add(1);
            st.admitted = st.admitted.wrapping_add(1);
            progress = true;
            self.ring
                .word(off::SQ_HEAD)
                .store(st.sq_head, Ordering::Release);
            let req = match self.validate(&e) {
                Ok(r) => r,
                Err(errno) => {
                    self.post(&mut b, e.user_data, -errno);
                    drop(b);
                    self.wake_client();
                    continue;
                }
            };
            let (start, end) = (req.buf, req.buf + req.len);
            let writes_arena = req.op == op::READ;
            let conflict = req.len > 0
                && b.slots.iter().any(|s| {
                    s.busy && (s.writes_arena || writes_arena) && s.start < end && start < s.end
                });
            if conflict {
                self.post(&mut b, e.user_data, -EBUSY);
                drop(b);
                self.wake_client();
                continue;
            }
            let Some(slot) = b.free.pop() else {
                // in_flight < max_in_flight guarantees a free slot; be safe anyway.
                self.post(&mut b, e.user_data, -EBUSY);
                drop(b);
                self.wake_client();
                continue;
            };
            let index = usize::from(slot);
            if let Some(s) = b.slots.get_mut(index) {
                *s = SlotRange {
                    busy: true,
                    writes_arena,
                    start,
                    end,
                    fast: false,
                    user_data: req.user_data,
                    handle: req.handle,
                };
            }
            b.in_flight += 1;
            // The fast path, for reads and writes when the session has it: started outside
            // the book lock (submission may make a system call).
            let io = if matches!(req.op, op::READ | op::WRITE) {
                b.ios.get_mut(index).and_then(Option::take)
            } else {
                None
            };
            drop(b);
            if let Some(io) = io {
                let io = match self.start_fast(conn, io, &req) {
                    Fast::Started(io, deadline) => {
                        let mut b = lock(&self.book);
                        if let Some(entry) = b.ios.get_mut(index) {
                            *entry = Some(io);
                        }
                        if let Some(s) = b.slots.get_mut(index) {
                            s.fast = true;
                        }
                        drop(b);
                        st.fast_in_flight += 1;
                        if let Some(d) = deadline {
                            st.earliest = Some(st.earliest.map_or(d, |e| e.min(d)));
                        }
                        continue;
                    }
                    Fast::Refused(io, errno) => {
                        self.complete(slot, req.user_data, -errno, Some(io));
                        continue;
                    }
                    Fast::NotStarted(io) => io,
                };
                let mut b = lock(&self.book);
                if let Some(entry) = b.ios.get_mut(index) {
                    *entry = Some(io);
                }
            }
            let job = ShmJob {
                shm: me.clone(),
                conn: conn.clone(),
                slot,
                req,
                started: None,
            };
            if let Err(job) = jobs.push(job) {
                job.shm.complete(
                    job.slot,
                    job.req.user_data,
                    -syscall::error::ESHUTDOWN,
                    None,
                );
                return Pass::Closed;
            }
        }
    }

    /// Collects answered fast requests: posts the completions of clean ones (waking the client
    /// once), frees their slots, and hands the others to the workers; once `st.earliest` has
    /// passed, also checks every fast request's deadline and hands the overdue ones over.
    /// Returns whether anything was collected or handed over.
    fn reap(
        &self,
        conn: &Arc<Conn>,
        me: &Arc<ShmConn>,
        jobs: &JobQueue,
        st: &mut PollerState,
    ) -> bool {
        if st.fast_in_flight == 0 {
            // Only stale bits can be set (requests handed over): clear them.
            for word in self.bell.done.iter() {
                if word.load(Ordering::Relaxed) != 0 {
                    word.store(0, Ordering::SeqCst);
                }
            }
            st.earliest = None;
            return false;
        }
        // The clock (a system call where it is not the TSC) only when the bell brought
        // nothing (e.g. the poller woke for the earliest deadline) or every `CLOCK_EVERY`
        // reaps: deadlines are seconds away, completions come every few microseconds.
        st.reaps = st.reaps.wrapping_add(1);
        let now = st
            .earliest
            .filter(|_| st.reaps.is_multiple_of(CLOCK_EVERY) || !self.bell.any_done())
            .map(|_| Instant::now());
        let scan_all = matches!((st.earliest, now), (Some(e), Some(n)) if n >= e);
        let mut next_earliest: Option<Instant> = None;
        let mut posted = false;
        let mut handed = false;
        let mut book = None;
        for (w, word) in self.bell.done.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::SeqCst);
            if scan_all {
                bits = u64::MAX;
            }
            while bits != 0 {
                let index = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let b: &mut MutexGuard<'_, Book> = book.get_or_insert_with(|| lock(&self.book));
                let Some(range) = b.slots.get(index).copied() else {
                    break;
                };
                if !range.busy || !range.fast {
                    continue;
                }
                let Some(io) = b.ios.get_mut(index).and_then(Option::as_mut) else {
                    continue;
                };
                let hand_over = match io.poll() {
                    AsyncPoll::Done => {
                        st.fast_in_flight = st.fast_in_flight.saturating_sub(1);
                        // Slot indices fit u16 (max_in_flight <= MAX_RING_ENTRIES).
                        Self::free_slot(b, index as u16);
                        let len = range.end - range.start;
                        self.post(b, range.user_data, count(len, len));
                        posted = true;
                        false
                    }
                    AsyncPoll::Slow => true,
                    AsyncPoll::Pending => match (io.deadline(), now) {
                        (Some(d), Some(now)) if scan_all && d <= now => true,
                        (Some(d), _) => {
                            next_earliest = Some(next_earliest.map_or(d, |e| e.min(d)));
                            false
                        }
                        (None, _) => false,
                    },
                };
                if hand_over {
                    st.fast_in_flight = st.fast_in_flight.saturating_sub(1);
                    if let Some(s) = b.slots.get_mut(index) {
                        s.fast = false;
                    }
                    if let Some(word) = st.slow.get_mut(index / 64) {
                        *word |= 1 << (index % 64);
                    }
                    handed = true;
                }
            }
        }
        if scan_all || st.fast_in_flight == 0 {
            // Every pending deadline was looked at (or none is left).
            st.earliest = next_earliest.filter(|_| st.fast_in_flight > 0);
        }
        if let Some(b) = book {
            let notify = b.in_flight == 0 || (posted && b.handle_waiters > 0);
            drop(b);
            if notify {
                self.idle_cv.notify_all();
            }
        }
        if posted {
            self.wake_client();
        }
        if handed {
            for w in 0..st.slow.len() {
                let mut bits = std::mem::take(&mut st.slow[w]);
                while bits != 0 {
                    let index = w * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    self.hand_over(conn, me, jobs, index);
                }
            }
        }
        posted || handed
    }

    /// Gives the fast request of slot `index` (no longer marked fast) to a worker, which
    /// settles it blocking; if the pool is gone, settles it here.
    fn hand_over(&self, conn: &Arc<Conn>, me: &Arc<ShmConn>, jobs: &JobQueue, index: usize) {
        let (io, range) = {
            let mut b = lock(&self.book);
            let io = b.ios.get_mut(index).and_then(Option::take);
            (io, b.slots.get(index).copied().unwrap_or_default())
        };
        let Some(io) = io else {
            error!(
                "connection {}: fast request in slot {index} has no I/O slot",
                self.conn_id
            );
            return;
        };
        let job = ShmJob {
            shm: me.clone(),
            conn: conn.clone(),
            // Slot indices fit u16 (max_in_flight <= MAX_RING_ENTRIES).
            slot: index as u16,
            req: ShmReq {
                op: if range.writes_arena {
                    op::READ
                } else {
                    op::WRITE
                },
                handle: 0,
                offset: 0,
                buf: range.start,
                len: range.end - range.start,
                user_data: range.user_data,
            },
            started: Some(io),
        };
        if let Err(mut job) = jobs.push(job) {
            run_started(&mut job);
        }
    }

    /// Hands every fast request still in flight to the workers (the poller is stopping: it
    /// will not collect them).
    fn hand_over_all(&self, conn: &Arc<Conn>, me: &Arc<ShmConn>, jobs: &JobQueue) {
        let n = lock(&self.book).slots.len();
        for index in 0..n {
            let fast = {
                let mut b = lock(&self.book);
                match b.slots.get_mut(index) {
                    Some(s) if s.busy && s.fast => {
                        s.fast = false;
                        true
                    }
                    _ => false,
                }
            };
            if fast {
                self.hand_over(conn, me, jobs, index);
            }
        }
    }

    /// With fast requests in flight and nothing else to do: polls the device for their
    /// completions (interrupts off meanwhile) until a pass would find work (`true`), or for
    /// `poll_max` (`false`: then the poller sleeps until a waker rings, as without polling).
    /// Saves, per completion, the interrupt, the completion thread's wake-up and this
    /// thread's.
    fn busy_poll_device(&self, st: &PollerState, blocked: bool) -> bool {
        let Some(scheme) = self.scheme.as_deref().filter(|_| !self.poll_max.is_zero()) else {
            return false;
        };
        let Some(_polling) = BusyPolling::begin(scheme) else {
            return false;
        };
        shm::spin_until(self.poll_max, || {
            // Completions ring the bell (`has_work`), as from the completion thread.
            scheme.busy_poll();
            self.has_work(st, blocked) || self.stop.load(Ordering::Relaxed)
        })
    }

    /// Whether a pass would find work now (cheap; for spinning and the pre-sleep re-check).
    fn has_work(&self, st: &PollerState, blocked: bool) -> bool {
        if st.fast_in_flight > 0 && self.bell.any_done() {
            return true;
        }
        let tail = self.ring.word(off::SQ_TAIL).load(Ordering::Acquire);
        if tail == st.sq_head {
            return false;
        }
        if !blocked {
            return true;
        }
        let cq_head = self.ring.word(off::CQ_HEAD).load(Ordering::Acquire);
        st.admitted.wrapping_sub(cq_head) < self.info.cq_entries
            && lock(&self.book).in_flight < self.info.max_in_flight
    }
}

/// `reap` reads the clock (for overdue requests) at least once per this many calls.
const CLOCK_EVERY: u32 = 32;

/// The per-connection poller: consumes submissions, starts and collects fast requests, spins
/// briefly when idle, then sleeps on the doorbell and its bell (lost-wake-up-free: see
/// [`crate::shm`] and [`PollerBell`]). However it ends, it hands its fast requests in flight
/// to the workers, so the session's teardown waits for them like for any request.
fn poll_loop(s: &Arc<ShmConn>, conn: &Arc<Conn>, jobs: &JobQueue) {
    let n = s.info.max_in_flight as usize;
    let mut st = PollerState {
        sq_head: 0,
        admitted: 0,
        fast_in_flight: 0,
        earliest: None,
        reaps: 0,
        slow: vec![0; n.div_ceil(64)].into_boxed_slice(),
    };
    let run = catch_unwind(AssertUnwindSafe(|| run_poller(s, conn, jobs, &mut st)));
    if run.is_err() {
        error!(
            "connection {}: shared-memory poller panicked; closing the connection",
            s.conn_id
        );
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
    }
    s.hand_over_all(conn, s, jobs);
}

fn run_poller(s: &Arc<ShmConn>, conn: &Arc<Conn>, jobs: &JobQueue, st: &mut PollerState) {
    // Adaptive spin budget: doubles when spinning found work, halves when it did not.
    let min_spin = Duration::from_micros(1).min(s.spin_max);
    let mut spin = s.spin_max / 4;
    loop {
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        let reaped = s.reap(conn, s, jobs, st);
        let blocked = match s.pass(conn, s, jobs, st) {
            Pass::Progress => continue,
            Pass::Idle { blocked } => blocked,
            Pass::Violation(why) => {
                warn!(
                    "connection {} (pid {}): shared-memory ring: {why}; closing it",
                    s.conn_id, conn.ctx.pid
                );
                // The reader thread sees the socket end and tears the session down.
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
                return;
            }
            Pass::Closed => return,
        };
        if reaped {
            continue;
        }
        if st.fast_in_flight > 0 && s.busy_poll_device(st, blocked) {
            continue;
        }
        let found = shm::spin_until(spin, || {
            s.has_work(st, blocked) || s.stop.load(Ordering::Relaxed)
        });
        if found {
            spin = (spin * 2).clamp(min_spin, s.spin_max);
            continue;
        }
        spin = (spin / 2).max(min_spin).min(s.spin_max);
        // Sleep: publish the flags, re-check, then block.
        let sleeping = s.ring.word(off::SERVER_SLEEPING);
        sleeping.store(1, Ordering::SeqCst);
        if blocked {
            s.poller_waits_room.store(true, Ordering::SeqCst);
        }
        let fast = st.fast_in_flight > 0;
        if fast {
            s.bell.armed.store(true, Ordering::SeqCst);
        }
        fence(Ordering::SeqCst);
        let unarm = || {
            sleeping.store(0, Ordering::Relaxed);
            s.poller_waits_room.store(false, Ordering::Relaxed);
            s.bell.armed.store(false, Ordering::Relaxed);
        };
        if s.has_work(st, blocked) || s.stop.load(Ordering::SeqCst) {
            unarm();
            continue;
        }
        // With fast requests in flight, wake up for the earliest deadline (then `reap` hands
        // the overdue ones to the workers, which recover them).
        let timeout = st.earliest.filter(|_| fast).and_then(|e| {
            rustix::event::Timespec::try_from(e.saturating_duration_since(Instant::now())).ok()
        });
        let mut fds = [
            PollFd::new(&s.server_bell, PollFlags::IN),
            PollFd::new(&s.bell.fd, PollFlags::IN),
        ];
        match poll(&mut fds, timeout.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                error!("connection {}: poll on doorbells failed: {e}", s.conn_id);
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
        shm::drain(s.server_bell.as_fd());
        shm::drain(s.bell.fd.as_fd());
        unarm();
    }
}

/// Starts `n` shm workers (at least one).
pub(crate) fn spawn_workers<D: BlockDevice>(
    scheme: &Arc<DiskScheme<D>>,
    rx: &Arc<JobQueue>,
    n: usize,
) -> io::Result<Vec<thread::JoinHandle<()>>> {
    let mut v = Vec::with_capacity(n.max(1));
    for i in 0..n.max(1) {
        let (scheme, rx) = (scheme.clone(), rx.clone());
        match thread::Builder::new()
            .name(format!("vscsi-shm-worker-{i}"))
            .spawn(move || worker(&scheme, &rx, i))
        {
            Ok(h) => v.push(h),
            Err(e) if !v.is_empty() => {
                warn!("could only start {} of {n} shm workers: {e}", v.len());
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(v)
}

fn worker<D: BlockDevice>(scheme: &DiskScheme<D>, rx: &JobQueue, me: usize) {
    while let Some(mut job) = rx.pop(me) {
        if job.started.is_some() {
            run_started(&mut job);
            continue;
        }
        let res = catch_unwind(AssertUnwindSafe(|| execute(scheme, &job))).unwrap_or_else(|_| {
            error!(
                "connection {}: shared-memory request panicked in the scheme; completing with EIO",
                job.shm.conn_id
            );
            // Its command may still be with the device, on a buffer in the arena.
            job.shm.arena_tainted.store(true, Ordering::SeqCst);
            -EIO
        });
        job.shm.complete(job.slot, job.req.user_data, res, None);
    }
}

/// Settles a fast request a poller handed over (blocking) and completes it, giving its
/// `AsyncSlot` back.
fn run_started(job: &mut ShmJob) {
    let len = job.req.len;
    let res = catch_unwind(AssertUnwindSafe(|| match job.started.as_mut() {
        Some(io) => match io.finish_blocking() {
            Ok(()) => count(len, len),
            Err(e) => -(e.errno.clamp(1, 4095)),
        },
        None => -EIO,
    }))
    .unwrap_or_else(|_| {
        error!(
            "connection {}: finishing a shared-memory request panicked; completing with EIO",
            job.shm.conn_id
        );
        job.shm.arena_tainted.store(true, Ordering::SeqCst);
        -EIO
    });
    let io = job.started.take();
    job.shm.complete(job.slot, job.req.user_data, res, io);
}

fn count(n: usize, len: usize) -> i32 {
    if n > len {
        error!("scheme transferred {n} bytes for a {len}-byte request");
        return -EIO;
    }
    // len <= max_io <= i32::MAX (checked at admission).
    i32::try_from(n).unwrap_or(-EIO)
}

fn execute<D: BlockDevice>(scheme: &DiskScheme<D>, job: &ShmJob) -> i32 {
    let r = job.req;
    let Some(slot) = job.conn.slot(r.handle) else {
        return -EBADF;
    };
    let guard = slot.read().unwrap_or_else(|e| e.into_inner());
    let Some(id) = *guard else {
        return -EBADF;
    };
    let res = match r.op {
        op::READ => {
            // SAFETY: validated and registered at admission (exclusive: a read overlaps no
            // other in-flight range); the slice is dropped before `complete`.
            let buf = unsafe { job.shm.arena_slice_mut(r.buf, r.len) };
            scheme.read(id, r.offset, buf).map(|n| count(n, r.len))
        }
        op::WRITE => {
            // SAFETY: validated and registered at admission (no in-flight read overlaps it);
            // the slice is dropped before `complete`.
            let buf = unsafe { job.shm.arena_slice(r.buf, r.len) };
            scheme.write(id, r.offset, buf).map(|n| count(n, r.len))
        }
        op::FSYNC => scheme.fsync(id).map(|()| 0),
        _ => Ok(-ENOSYS),
    };
    res.unwrap_or_else(|e| -(e.errno.clamp(1, 4095)))
}
