//! The server half of the shared-memory transport (layout and doorbells: [`crate::shm`]).
//!
//! Owns: the [`ArenaProvider`] contract (device-visible memory for client arenas) and a memfd
//! implementation of it, per-connection session set-up (ring memfd, doorbells, the arena), the
//! per-connection poller thread (adaptive spin, then sleep on the doorbell), validation of
//! every submission copied out of shared memory, the shared pool of shm workers that call the
//! scheme with slices of the arena (zero-copy when the arena is DMA memory), completion
//! posting, and the session's teardown (wait for in-flight requests, recycle the arena).
//!
//! No heap allocation per request: the poller, the job queue ([`JobQueue`], a ring allocated
//! once) and the workers move only plain values and `Arc` clones; each connection's request
//! slots are a fixed table allocated at set-up.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use block_scheme::{BlockDevice, CallerCtx, DiskScheme};
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
    pub(crate) jobs: Arc<JobQueue>,
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

/// A job for an shm worker: plain values and two `Arc` clones (no allocation).
pub(crate) struct ShmJob {
    shm: Arc<ShmConn>,
    conn: Arc<Conn>,
    slot: u16,
    req: ShmReq,
}

/// An arena range in use by a request in flight.
#[derive(Clone, Copy, Default)]
struct SlotRange {
    busy: bool,
    /// The request writes into the arena (a read from the disk).
    writes_arena: bool,
    start: usize,
    end: usize,
}

/// Completion-side bookkeeping of one session, under one mutex.
struct Book {
    /// CQEs published (private copy; the shared `cq_tail` is only ever written from it).
    cq_tail: u32,
    in_flight: u32,
    /// Fixed table, one entry per request slot.
    slots: Box<[SlotRange]>,
    /// Free slot indices (capacity = slots; push/pop never allocate).
    free: Vec<u16>,
}

/// One connection's shared-memory session.
pub(crate) struct ShmConn {
    conn_id: u64,
    ring: Ring,
    arena: NonNull<u8>,
    arena_len: usize,
    recycle: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    info: ShmInfo,
    /// The client rings it; the poller sleeps on it.
    server_bell: OwnedFd,
    /// The server rings it when the client sleeps.
    client_bell: OwnedFd,
    /// Private: stop requests and "room again" from workers.
    wake: OwnedFd,
    stop: AtomicBool,
    /// The poller sleeps because every request slot is in use.
    poller_waits_room: AtomicBool,
    book: Mutex<Book>,
    idle_cv: Condvar,
    spin_max: Duration,
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
    let (ring_fd, ring, server_bell, client_bell, wake) = match made {
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
    let session = Arc::new(ShmConn {
        conn_id: conn.id,
        ring,
        arena: ptr,
        arena_len,
        recycle: Mutex::new(Some(recycle)),
        info,
        server_bell,
        client_bell,
        wake,
        stop: AtomicBool::new(false),
        poller_waits_room: AtomicBool::new(false),
        book: Mutex::new(Book {
            cq_tail: 0,
            in_flight: 0,
            slots: vec![SlotRange::default(); n].into_boxed_slice(),
            free: (0..n as u16).rev().collect(),
        }),
        idle_cv: Condvar::new(),
        spin_max: svc.spin,
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
    /// before it closes the connection's handles.
    pub(crate) fn shutdown(mut self) {
        let s = &self.shm;
        s.stop.store(true, Ordering::SeqCst);
        shm::kick(s.wake.as_fd());
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

impl ShmConn {
    fn give_back(&self) {
        let r = lock(&self.recycle).take();
        if let Some(r) = r {
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

    /// Completes the request in `slot` (called by the worker that ran it).
    fn complete(&self, slot: u16, user_data: u64, res: i32) {
        let mut b = lock(&self.book);
        if let Some(s) = b.slots.get_mut(slot as usize) {
            s.busy = false;
        }
        b.free.push(slot);
        b.in_flight = b.in_flight.saturating_sub(1);
        self.post(&mut b, user_data, res);
        let idle = b.in_flight == 0;
        drop(b);
        if idle {
            self.idle_cv.notify_all();
        }
        self.wake_client();
        // The poller may sleep waiting for a free slot: it set the flag before re-checking
        // `in_flight` under the book lock, so either it saw our decrement or we see its flag.
        if self.poller_waits_room.swap(false, Ordering::SeqCst) {
            shm::kick(self.wake.as_fd());
        }
    }

    /// One pass: consume every SQE that has room. `sq_head` and `admitted` are the poller's
    /// private counters (never read back from shared memory).
    fn pass(
        &self,
        conn: &Arc<Conn>,
        me: &Arc<ShmConn>,
        jobs: &JobQueue,
        sq_head: &mut u32,
        admitted: &mut u32,
    ) -> Pass {
        let entries = self.info.sq_entries;
        let mut progress = false;
        loop {
            let tail = self.ring.word(off::SQ_TAIL).load(Ordering::Acquire);
            let pending = tail.wrapping_sub(*sq_head);
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
            let room = admitted.wrapping_sub(cq_head) < self.info.cq_entries;
            if !room || b.in_flight >= self.info.max_in_flight {
                return if progress {
                    Pass::Progress
                } else {
                    Pass::Idle { blocked: true }
                };
            }
            // Copy the entry out once; everything below looks only at the copy.
            let e = self.ring.read_sqe(*sq_head);
            *sq_head = sq_head.wrapping_add(1);
            *admitted = admitted.wrapping_add(1);
            progress = true;
            self.ring
                .word(off::SQ_HEAD)
                .store(*sq_head, Ordering::Release);
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
            if let Some(s) = b.slots.get_mut(slot as usize) {
                *s = SlotRange {
                    busy: true,
                    writes_arena,
                    start,
                    end,
                };
            }
            b.in_flight += 1;
            drop(b);
            let job = ShmJob {
                shm: me.clone(),
                conn: conn.clone(),
                slot,
                req,
            };
            if let Err(job) = jobs.push(job) {
                job.shm
                    .complete(job.slot, job.req.user_data, -syscall::error::ESHUTDOWN);
                return Pass::Closed;
            }
        }
    }

    /// Whether a pass would find work now (cheap; for spinning and the pre-sleep re-check).
    fn has_work(&self, sq_head: u32, admitted: u32, blocked: bool) -> bool {
        let tail = self.ring.word(off::SQ_TAIL).load(Ordering::Acquire);
        if tail == sq_head {
            return false;
        }
        if !blocked {
            return true;
        }
        let cq_head = self.ring.word(off::CQ_HEAD).load(Ordering::Acquire);
        admitted.wrapping_sub(cq_head) < self.info.cq_entries
            && lock(&self.book).in_flight < self.info.max_in_flight
    }
}

/// The per-connection poller: consumes submissions, spins briefly when idle, then sleeps on
/// the doorbell (lost-wake-up-free: see [`crate::shm`]).
fn poll_loop(s: &Arc<ShmConn>, conn: &Arc<Conn>, jobs: &JobQueue) {
    let mut sq_head = 0u32;
    let mut admitted = 0u32;
    // Adaptive spin budget: doubles when spinning found work, halves when it did not.
    let min_spin = Duration::from_micros(1).min(s.spin_max);
    let mut spin = s.spin_max / 4;
    loop {
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        let blocked = match s.pass(conn, s, jobs, &mut sq_head, &mut admitted) {
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
        // Spin.
        let t0 = Instant::now();
        let mut found = false;
        let mut i = 0u32;
        while t0.elapsed() < spin {
            if s.has_work(sq_head, admitted, blocked) || s.stop.load(Ordering::Relaxed) {
                found = true;
                break;
            }
            i = i.wrapping_add(1);
            if i.is_multiple_of(64) {
                thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
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
        fence(Ordering::SeqCst);
        if s.has_work(sq_head, admitted, blocked) || s.stop.load(Ordering::SeqCst) {
            sleeping.store(0, Ordering::Relaxed);
            s.poller_waits_room.store(false, Ordering::Relaxed);
            continue;
        }
        let mut fds = [
            PollFd::new(&s.server_bell, PollFlags::IN),
            PollFd::new(&s.wake, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                error!("connection {}: poll on doorbells failed: {e}", s.conn_id);
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
        shm::drain(s.server_bell.as_fd());
        shm::drain(s.wake.as_fd());
        sleeping.store(0, Ordering::Relaxed);
        s.poller_waits_room.store(false, Ordering::Relaxed);
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
    while let Some(job) = rx.pop(me) {
        let res = catch_unwind(AssertUnwindSafe(|| execute(scheme, &job))).unwrap_or_else(|_| {
            error!(
                "connection {}: shared-memory request panicked in the scheme; completing with EIO",
                job.shm.conn_id
            );
            -EIO
        });
        job.shm.complete(job.slot, job.req.user_data, res);
    }
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
