//! The client half of the shared-memory transport (layout and doorbells: [`crate::shm`]).
//!
//! Owns: the arena allocator and [`ArenaBuf`] (buffers inside the arena: reads and writes from
//! them reach the device with no copy), the submission side (slots, tickets, batching, the
//! doorbell), reaping and checking completions (the server is not trusted either: every index,
//! `user_data` and result read from the completion ring is checked), and the synchronous
//! waits `read_at`/`write_at` use when the session is on.
//!
//! A session is used through [`crate::Client`]: `alloc_buf`, `prep_read`/`prep_write`/
//! `prep_fsync` (queue one request each), `submit` (publish the queued ones; one system call
//! at most, and none while the server is busy) and `reap` (collect completions).
//!
//! Buffers move into a request and come back in its [`Completion`], so the program cannot touch
//! a buffer the server is reading or writing. Completions are delivered to whoever waits for
//! them: `reap` returns those of `prep_*` requests, the synchronous calls take their own.

use std::collections::VecDeque;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use syscall::error::{EAGAIN, EINVAL, ENOMEM};

use crate::client::ClientError;
use crate::shm::{self, Mapping, Ring, ShmInfo, Sqe, off, op};

/// Allocation granule of the arena (and alignment of every [`ArenaBuf`]).
pub const ARENA_ALIGN: usize = 4096;
/// Longest a waiting client spins on the completion ring before sleeping (adaptive below; no
/// spinning at all on machines with few CPUs, see [`shm::spin_worthwhile`]).
const CLIENT_SPIN_MAX: Duration = Duration::from_micros(30);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// First-fit free list of arena ranges, sorted by start, coalesced.
struct FreeList {
    free: Vec<(usize, usize)>,
}

impl FreeList {
    fn alloc(&mut self, size: usize) -> Option<usize> {
        let i = self.free.iter().position(|&(_, len)| len >= size)?;
        let (start, len) = self.free[i];
        if len == size {
            self.free.remove(i);
        } else {
            self.free[i] = (start + size, len - size);
        }
        Some(start)
    }

    fn release(&mut self, start: usize, size: usize) {
        let i = self.free.partition_point(|&(s, _)| s < start);
        self.free.insert(i, (start, size));
        // Merge with the next, then with the previous.
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }
}

/// The arena mapping and its allocator (shared by the session and every buffer).
pub(crate) struct Arena {
    map: Mapping,
    free: Mutex<FreeList>,
}

impl Arena {
    fn new(map: Mapping) -> Arena {
        let usable = map.len() / ARENA_ALIGN * ARENA_ALIGN;
        Arena {
            map,
            free: Mutex::new(FreeList {
                free: if usable > 0 {
                    vec![(0, usable)]
                } else {
                    Vec::new()
                },
            }),
        }
    }
}

/// A buffer inside this client's arena: `len` bytes (at most its capacity), 4 KiB-aligned.
/// Reads and writes submitted from it move between the device and this memory directly.
/// Derefs to `[u8]`; freed when dropped.
pub struct ArenaBuf {
    arena: Arc<Arena>,
    off: usize,
    cap: usize,
    len: usize,
}

impl ArenaBuf {
    /// Bytes in the buffer (what a read or write from it transfers).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether `len` is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes reserved in the arena.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length (at most the capacity; larger values are clamped).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.cap);
    }

    /// Offset of the buffer in the arena.
    pub fn arena_offset(&self) -> usize {
        self.off
    }
}

impl Deref for ArenaBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: [off, off + cap) is inside the mapping (allocator invariant) and belongs to
        // this buffer alone; the mapping lives as long as the Arc. While a request uses the
        // buffer the library holds it, so the program cannot look at bytes the server writes.
        unsafe { std::slice::from_raw_parts(self.arena.map.ptr().as_ptr().add(self.off), self.len) }
    }
}

impl DerefMut for ArenaBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the slice the only one in this process.
        unsafe {
            std::slice::from_raw_parts_mut(self.arena.map.ptr().as_ptr().add(self.off), self.len)
        }
    }
}

impl Drop for ArenaBuf {
    fn drop(&mut self) {
        lock(&self.arena.free).release(self.off, self.cap);
    }
}

impl std::fmt::Debug for ArenaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArenaBuf")
            .field("offset", &self.off)
            .field("len", &self.len)
            .field("capacity", &self.cap)
            .finish()
    }
}

/// Identifies a queued request; its [`Completion`] carries the same ticket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket(u64);

impl Ticket {
    /// The value (the SQE's `user_data`).
    pub fn id(self) -> u64 {
        self.0
    }
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The request's ticket.
    pub ticket: Ticket,
    /// Bytes read or written (short only at the end of the device; 0 for fsync), or the error.
    pub result: Result<usize, ClientError>,
    /// The buffer of a read or write, back to the caller (a read's data is in it).
    pub buf: Option<ArenaBuf>,
}

/// A request that could not be queued, with its buffer back.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct PrepError {
    /// Why.
    pub error: ClientError,
    /// The buffer the request would have used.
    pub buf: Option<ArenaBuf>,
}

impl From<PrepError> for ClientError {
    fn from(e: PrepError) -> ClientError {
        e.error
    }
}

enum Waiter {
    /// `reap` collects it.
    Async,
    /// A synchronous call waits for it on this thread.
    Sync(Thread),
}

enum SlotState {
    Free,
    InFlight {
        generation: u32,
        op: u8,
        len: u32,
        buf: Option<ArenaBuf>,
        waiter: Waiter,
    },
    Done {
        generation: u32,
        res: Result<usize, ClientError>,
        buf: Option<ArenaBuf>,
        sync: bool,
    },
}

struct Slots {
    table: Vec<SlotState>,
    gens: Vec<u32>,
    free: Vec<u16>,
    /// Finished `prep_*` requests, in completion order (capacity = slots).
    done_async: VecDeque<u16>,
    /// Synchronous waiters in flight (to hand over the reaper role).
    sync_waiting: usize,
    /// `prep_*` requests queued and not yet returned by `reap`.
    async_out: usize,
}

struct Sq {
    /// Next SQE index to fill (private; published with `submit`).
    tail: u32,
    published: u32,
}

/// One client's shared-memory session.
pub(crate) struct Session {
    ring: Ring,
    arena: Arc<Arena>,
    info: ShmInfo,
    server_bell: OwnedFd,
    client_bell: OwnedFd,
    sq: Mutex<Sq>,
    slots: Mutex<Slots>,
    /// CQ head (private copy); holding it is the reaper role.
    cq: Mutex<u32>,
    spin: Mutex<Duration>,
    broken: AtomicBool,
}

/// What went wrong with the server's side of the ring (the session is then unusable).
fn broken(msg: impl Into<String>) -> ClientError {
    ClientError::Protocol(msg.into())
}

impl Session {
    /// Maps the ring and the arena from the four descriptors of the ShmSetup reply.
    pub(crate) fn new(info: ShmInfo, fds: Vec<OwnedFd>) -> io::Result<Session> {
        let [ring_fd, arena_fd, server_bell, client_bell]: [OwnedFd; 4] = fds
            .try_into()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "expected 4 descriptors"))?;
        let ring_len = usize::try_from(info.ring_len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "ring too large"))?;
        let arena_len = usize::try_from(info.arena_len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "arena too large"))?;
        // A file the peer could shrink would make our accesses fault (SIGBUS).
        if !shm::is_shrink_sealed(ring_fd.as_fd()) || !shm::is_shrink_sealed(arena_fd.as_fd()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the server's ring or arena is not sealed against shrinking",
            ));
        }
        let ring = Ring::new(
            Mapping::map(ring_fd.as_fd(), ring_len)?,
            info.sq_entries,
            info.cq_entries,
        )?;
        let arena = Arena::new(Mapping::map(arena_fd.as_fd(), arena_len)?);
        let n = info.sq_entries as usize;
        Ok(Session {
            ring,
            arena: Arc::new(arena),
            info,
            server_bell,
            client_bell,
            sq: Mutex::new(Sq {
                tail: 0,
                published: 0,
            }),
            slots: Mutex::new(Slots {
                table: (0..n).map(|_| SlotState::Free).collect(),
                gens: vec![0; n],
                free: (0..n as u16).rev().collect(),
                done_async: VecDeque::with_capacity(n),
                sync_waiting: 0,
                async_out: 0,
            }),
            cq: Mutex::new(0),
            spin: Mutex::new(if shm::spin_worthwhile() {
                CLIENT_SPIN_MAX / 2
            } else {
                Duration::ZERO
            }),
            broken: AtomicBool::new(false),
        })
    }

    /// A descriptor that wakes sleepers (for the connection's reader thread when it dies).
    pub(crate) fn bell(&self) -> io::Result<OwnedFd> {
        self.client_bell.try_clone()
    }

    pub(crate) fn info(&self) -> &ShmInfo {
        &self.info
    }

    pub(crate) fn alloc_buf(&self, len: usize) -> Result<ArenaBuf, ClientError> {
        if len == 0 || len > self.arena.map.len() {
            return Err(ClientError::from_errno(if len == 0 {
                EINVAL
            } else {
                ENOMEM
            }));
        }
        let cap = len.div_ceil(ARENA_ALIGN) * ARENA_ALIGN;
        let off = lock(&self.arena.free)
            .alloc(cap)
            .ok_or_else(|| ClientError::from_errno(ENOMEM))?;
        Ok(ArenaBuf {
            arena: self.arena.clone(),
            off,
            cap,
            len,
        })
    }

    fn check_broken(&self) -> Result<(), ClientError> {
        if self.broken.load(Ordering::Acquire) {
            return Err(broken("the shared-memory session is broken"));
        }
        if self.ring.word(off::CLOSED).load(Ordering::Acquire) != 0 {
            return Err(ClientError::Disconnected);
        }
        Ok(())
    }

    /// Queues one request (not visible to the server before `submit`).
    pub(crate) fn prep(
        &self,
        opcode: u8,
        handle: u64,
        offset: u64,
        buf: Option<ArenaBuf>,
        sync: bool,
    ) -> Result<Ticket, PrepError> {
        let fail = |error, buf| Err(PrepError { error, buf });
        if let Err(e) = self.check_broken() {
            return fail(e, buf);
        }
        let (len, at) = match &buf {
            Some(b) => {
                if !Arc::ptr_eq(&b.arena, &self.arena)
                    || b.is_empty()
                    || b.len() > self.info.max_io as usize
                {
                    return fail(ClientError::from_errno(EINVAL), buf);
                }
                (b.len() as u32, b.off as u64)
            }
            None => (0, 0),
        };
        let mut slots = lock(&self.slots);
        let Some(slot) = slots.free.pop() else {
            drop(slots);
            // Every slot is in use: reap first.
            return fail(ClientError::from_errno(EAGAIN), buf);
        };
        let i = slot as usize;
        let generation = slots.gens[i].wrapping_add(1);
        slots.gens[i] = generation;
        let user_data = u64::from(generation) << 16 | u64::from(slot);
        slots.table[i] = SlotState::InFlight {
            generation,
            op: opcode,
            len,
            buf,
            waiter: if sync {
                Waiter::Sync(thread::current())
            } else {
                Waiter::Async
            },
        };
        if sync {
            slots.sync_waiting += 1;
        } else {
            slots.async_out += 1;
        }
        // Taking the SQ lock under the slots lock keeps SQ order = slot order (harmless
        // either way; the lock order slots → sq is the only one used).
        let mut sq = lock(&self.sq);
        drop(slots);
        self.ring.write_sqe(
            sq.tail,
            &Sqe {
                opcode,
                len,
                user_data,
                handle,
                offset,
                buf: at,
                ..Sqe::default()
            },
        );
        sq.tail = sq.tail.wrapping_add(1);
        Ok(Ticket(user_data))
    }

    /// Publishes every queued request and wakes the server if it sleeps. Returns how many.
    pub(crate) fn submit(&self) -> Result<usize, ClientError> {
        self.check_broken()?;
        let mut sq = lock(&self.sq);
        let n = sq.tail.wrapping_sub(sq.published) as usize;
        if n == 0 {
            return Ok(0);
        }
        // Release: the SQEs' bytes are visible before the new tail.
        self.ring
            .word(off::SQ_TAIL)
            .store(sq.tail, Ordering::Release);
        sq.published = sq.tail;
        drop(sq);
        fence(Ordering::SeqCst);
        if self
            .ring
            .word(off::SERVER_SLEEPING)
            .swap(0, Ordering::SeqCst)
            != 0
        {
            shm::kick(self.server_bell.as_fd());
        }
        Ok(n)
    }

    /// Marks the session broken and wakes every waiter.
    fn break_session(&self, e: ClientError) -> ClientError {
        self.broken.store(true, Ordering::Release);
        shm::kick(self.client_bell.as_fd());
        let slots = lock(&self.slots);
        for s in &slots.table {
            if let SlotState::InFlight {
                waiter: Waiter::Sync(t),
                ..
            } = s
            {
                t.unpark();
            }
        }
        e
    }

    /// Consumes every published CQE (caller holds the reaper role: `head`). Returns how many.
    fn drain_cq(&self, head: &mut u32) -> Result<usize, ClientError> {
        let tail = self.ring.word(off::CQ_TAIL).load(Ordering::Acquire);
        let avail = tail.wrapping_sub(*head);
        if avail > self.info.cq_entries {
            return Err(self.break_session(broken(format!(
                "completion ring tail {tail} is {avail} entries ahead of head {head}"
            ))));
        }
        for _ in 0..avail {
            let c = self.ring.read_cqe(*head);
            *head = head.wrapping_add(1);
            // Publish the head before the slot can be reused (see the room rule in `shm`).
            self.ring.word(off::CQ_HEAD).store(*head, Ordering::Release);
            if let Err(e) = self.dispatch(c.user_data, c.res, c.flags) {
                return Err(self.break_session(e));
            }
        }
        Ok(avail as usize)
    }

    /// Checks one completion and hands it to its waiter.
    fn dispatch(&self, user_data: u64, res: i32, flags: u32) -> Result<(), ClientError> {
        let slot = (user_data & 0xFFFF) as usize;
        let generation = (user_data >> 16) as u32;
        if flags != 0 || user_data >> 48 != 0 {
            return Err(broken(format!(
                "bad completion (user_data {user_data:#x}, flags {flags})"
            )));
        }
        let mut slots = lock(&self.slots);
        let Some(state) = slots.table.get_mut(slot) else {
            return Err(broken(format!("completion for unknown slot {slot}")));
        };
        let (op, len, buf, waiter) = match std::mem::replace(state, SlotState::Free) {
            SlotState::InFlight {
                generation: g,
                op,
                len,
                buf,
                waiter,
            } if g == generation => (op, len, buf, waiter),
            other => {
                *state = other;
                return Err(broken(format!(
                    "completion for slot {slot} generation {generation}, which is not in flight"
                )));
            }
        };
        let result = if res < 0 {
            let errno = res.checked_neg().unwrap_or(i32::MAX);
            if errno >= 4096 {
                return Err(broken(format!("completion result {res} is not an errno")));
            }
            Err(ClientError::from_errno(errno))
        } else {
            let n = res as u32;
            let ok = match op {
                op::FSYNC => n == 0,
                _ => n <= len,
            };
            if !ok {
                return Err(broken(format!(
                    "completion says {n} bytes for a {len}-byte request"
                )));
            }
            Ok(n as usize)
        };
        let sync = matches!(waiter, Waiter::Sync(_));
        *state = SlotState::Done {
            generation,
            res: result,
            buf,
            sync,
        };
        match waiter {
            Waiter::Sync(t) => t.unpark(),
            Waiter::Async => slots.done_async.push_back(slot as u16),
        }
        Ok(())
    }

    /// Frees a finished slot and returns its completion.
    fn take(slots: &mut Slots, slot: usize) -> Option<Completion> {
        let state = slots.table.get_mut(slot)?;
        if !matches!(state, SlotState::Done { .. }) {
            return None;
        }
        let SlotState::Done {
            generation,
            res,
            buf,
            sync,
        } = std::mem::replace(state, SlotState::Free)
        else {
            return None;
        };
        if sync {
            slots.sync_waiting = slots.sync_waiting.saturating_sub(1);
        } else {
            slots.async_out = slots.async_out.saturating_sub(1);
        }
        slots.free.push(slot as u16);
        Some(Completion {
            ticket: Ticket(u64::from(generation) << 16 | slot as u64),
            result: res,
            buf,
        })
    }

    /// Waits (holding the reaper role) until the completion ring has entries, `timeout`
    /// passes, or the session ends: spin adaptively, then sleep on the doorbell. The clock is
    /// read only while spinning, and then only now and then: where it is not the TSC (hpet in
    /// many guests) each reading is a system call and an emulated device access.
    fn wait_cq(&self, head: u32, timeout: Option<Duration>, dead: &dyn Fn() -> bool) {
        let has = || self.ring.word(off::CQ_TAIL).load(Ordering::Acquire) != head;
        let spin = *lock(&self.spin);
        if shm::spin_until(spin, has) {
            *lock(&self.spin) = (spin * 2).min(CLIENT_SPIN_MAX);
            return;
        }
        if !spin.is_zero() {
            *lock(&self.spin) = (spin / 2).max(Duration::from_micros(1));
        }
        let sleeping = self.ring.word(off::CLIENT_SLEEPING);
        sleeping.store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if has() || self.check_broken().is_err() || dead() {
            sleeping.store(0, Ordering::Relaxed);
            return;
        }
        let timeout = timeout.map(|left| Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        });
        let mut fds = [PollFd::new(&self.client_bell, PollFlags::IN)];
        let _ = poll(&mut fds, timeout.as_ref());
        shm::drain(self.client_bell.as_fd());
        sleeping.store(0, Ordering::Relaxed);
    }

    /// Collects finished `prep_*` requests into `out` until it got at least `min` (at most
    /// what is outstanding), or the timeout passed. Returns how many it added.
    pub(crate) fn reap(
        &self,
        min: usize,
        timeout: Option<Duration>,
        out: &mut Vec<Completion>,
        dead: &dyn Fn() -> Option<ClientError>,
    ) -> Result<usize, ClientError> {
        // Set when the first wait starts (the clock is read only if there is waiting to do).
        let mut deadline: Option<Instant> = None;
        let mut got = 0;
        loop {
            got += self.take_done(out);
            let outstanding = lock(&self.slots).async_out;
            // Never wait for more than can come.
            if got >= min.min(got + outstanding) {
                return Ok(got);
            }
            if let Some(e) = dead() {
                return Err(e);
            }
            self.check_broken()?;
            // What is left of the timeout: all of it before the first wait.
            let mut left = || match (timeout, deadline) {
                (None, _) => None,
                (Some(t), None) => {
                    deadline = Some(Instant::now() + t);
                    Some(t)
                }
                (Some(_), Some(d)) => Some(d.saturating_duration_since(Instant::now())),
            };
            match self.cq.try_lock() {
                Ok(mut head) => {
                    // The ring is always looked at once, even with no time to wait.
                    let mut timed_out = false;
                    if self.drain_cq(&mut head)? == 0 {
                        match left() {
                            Some(l) if l.is_zero() => timed_out = true,
                            l => {
                                self.wait_cq(*head, l, &|| dead().is_some());
                                self.drain_cq(&mut head)?;
                            }
                        }
                    }
                    drop(head);
                    self.hand_over();
                    if timed_out {
                        return Ok(got + self.take_done(out));
                    }
                }
                Err(TryLockError::Poisoned(p)) => {
                    let mut head = p.into_inner();
                    self.drain_cq(&mut head)?;
                }
                // Another thread reaps; it queues our completions and the doorbell wakes it.
                Err(TryLockError::WouldBlock) => {
                    if left().is_some_and(|l| l.is_zero()) {
                        return Ok(got + self.take_done(out));
                    }
                    thread::park_timeout(Duration::from_micros(200));
                }
            }
        }
    }

    /// Moves the finished `prep_*` requests queued for reaping into `out`; returns how many.
    fn take_done(&self, out: &mut Vec<Completion>) -> usize {
        let mut slots = lock(&self.slots);
        let mut n = 0;
        while let Some(s) = slots.done_async.pop_front() {
            if let Some(c) = Self::take(&mut slots, s as usize) {
                out.push(c);
                n += 1;
            }
        }
        n
    }

    /// After leaving the reaper role: wake synchronous waiters so one of them takes it.
    fn hand_over(&self) {
        let slots = lock(&self.slots);
        if slots.sync_waiting == 0 {
            return;
        }
        for s in &slots.table {
            if let SlotState::InFlight {
                waiter: Waiter::Sync(t),
                ..
            } = s
            {
                t.unpark();
            }
        }
    }

    /// Waits for the synchronous request `t` (queued with `sync`) and returns its completion.
    pub(crate) fn wait_sync(
        &self,
        t: Ticket,
        dead: &dyn Fn() -> Option<ClientError>,
    ) -> Result<Completion, ClientError> {
        let slot = (t.0 & 0xFFFF) as usize;
        loop {
            if let Some(c) = Self::take(&mut lock(&self.slots), slot) {
                return Ok(c);
            }
            if let Some(e) = dead() {
                return Err(e);
            }
            self.check_broken()?;
            match self.cq.try_lock() {
                Ok(mut head) => {
                    if self.drain_cq(&mut head)? == 0 {
                        let mine_done = || {
                            matches!(
                                lock(&self.slots).table.get(slot),
                                Some(SlotState::Done { .. })
                            )
                        };
                        if !mine_done() {
                            // Bounded: the connection's death is noticed within it too.
                            self.wait_cq(*head, Some(Duration::from_millis(50)), &|| {
                                dead().is_some()
                            });
                            self.drain_cq(&mut head)?;
                        }
                    }
                    drop(head);
                    self.hand_over();
                }
                Err(TryLockError::Poisoned(p)) => {
                    let mut head = p.into_inner();
                    self.drain_cq(&mut head)?;
                }
                Err(TryLockError::WouldBlock) => thread::park_timeout(Duration::from_millis(1)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_list_first_fit_and_coalescing() {
        let mut f = FreeList {
            free: vec![(0, 10 * ARENA_ALIGN)],
        };
        let a = f.alloc(2 * ARENA_ALIGN).unwrap();
        let b = f.alloc(3 * ARENA_ALIGN).unwrap();
        let c = f.alloc(5 * ARENA_ALIGN).unwrap();
        assert_eq!((a, b, c), (0, 2 * ARENA_ALIGN, 5 * ARENA_ALIGN));
        assert!(f.alloc(ARENA_ALIGN).is_none());
        f.release(b, 3 * ARENA_ALIGN);
        f.release(a, 2 * ARENA_ALIGN);
        assert_eq!(f.free, vec![(0, 5 * ARENA_ALIGN)]);
        f.release(c, 5 * ARENA_ALIGN);
        assert_eq!(f.free, vec![(0, 10 * ARENA_ALIGN)]);
    }
}
