//! The shared-memory transport's common ground: the ring layout (a public contract, like
//! [`crate::protocol`]), the setup description sent over the socket, and the small pieces both
//! sides use at the shared-memory boundary (mappings, ring accessors, eventfd doorbells,
//! sealed memfds, passing file descriptors over the socket).
//!
//! # Overview
//! After Hello, a client may send `ShmSetup` (opcode 11) on its socket. The server answers with
//! a [`ShmInfo`] payload and, attached to that reply frame (SCM_RIGHTS), four descriptors in
//! this order: the **ring** memfd, the **arena** fd, the **server doorbell** eventfd (the client
//! writes it to wake the server) and the **client doorbell** eventfd (the server writes it to
//! wake the client). Both sides map the ring and the arena (each whole, from offset 0,
//! `MAP_SHARED`, read-write). Open, close, fstat and the rest stay on the socket; the socket
//! also stays the session's lifeline: when it closes, the session ends.
//!
//! The arena is device-visible memory on a real platform: a read or write whose buffer lies in
//! the arena moves between the device and the client's memory with no copy.
//!
//! # Ring memory (all integers little-endian, control words are naturally aligned `u32`)
//! ```text
//! offset  field            written by  meaning
//!    0    magic "VSHM"     server      informational
//!    4    version = 1      server
//!    8    sq_entries       server      power of two
//!   12    cq_entries       server      power of two
//!   16    sqes_off         server      = 4096
//!   20    cqes_off         server      = 4096 + sq_entries * 64
//!   64    sq_tail          client      SQEs published (free-running, wraps at 2^32)
//!  128    sq_head          server      SQEs consumed (informational for the client)
//!  192    cq_tail          server      CQEs published
//!  256    cq_head          client      CQEs consumed
//!  320    server_sleeping  server=1, client swaps to 0 before kicking the server doorbell
//!  384    client_sleeping  client=1, server swaps to 0 before kicking the client doorbell
//!  448    closed           server      1 once the server ended the session
//! 4096    SQE array        client      sq_entries × 64 bytes
//!  ...    CQE array        server      cq_entries × 16 bytes
//! ```
//! Each control word has its own 64-byte cache line. Entry `i` of a ring is at index
//! `i & (entries - 1)`.
//!
//! Submission entry (64 bytes):
//! ```text
//!  0  u8   opcode     1 read, 2 write, 3 fsync
//!  1  u8   flags      0
//!  2  u16  reserved   0
//!  4  u32  len        read/write: 1..=max_io bytes; fsync: 0
//!  8  u64  user_data  echoed in the completion
//! 16  u64  handle     a handle id this connection opened on the socket
//! 24  u64  offset     byte offset on the disk (fsync: 0)
//! 32  u64  buf        byte offset of the data in the arena (fsync: 0); buf + len <= arena_len
//! 40  ..   reserved   0 (24 bytes)
//! ```
//! Completion entry (16 bytes): `u64 user_data`, `i32 res` (bytes transferred, or `-errno`),
//! `u32 flags` (0).
//!
//! # Rules
//! - Outstanding requests (submitted and not yet reaped) must never exceed `sq_entries`
//!   (= `cq_entries`), so neither ring can overflow. The server runs at most `max_in_flight`
//!   at a time and leaves further SQEs in the ring until some complete.
//! - The server copies each SQE out of shared memory once and checks the copy: a bad opcode
//!   (`ENOSYS`), non-zero reserved fields or flags, a zero or too large length, a range outside
//!   the arena or an overflowing offset (`EINVAL`/`EFAULT`), a handle the connection does not
//!   own (`EBADF`), an arena range overlapping a read in flight (`EBUSY`) complete with an
//!   error. Indices that cannot be right (`sq_tail` more than `sq_entries` ahead of what the
//!   server consumed, `cq_head` outside the published range) end the session: the server
//!   closes the socket. Either way other connections are unaffected.
//! - Reads and writes follow the scheme's semantics (short counts at the end of the device).
//!
//! # Doorbells (no system call per request while both sides are busy)
//! Each side, before it sleeps, publishes "I sleep" and re-checks its ring; the other side,
//! after publishing new entries, checks the flag and kicks the eventfd only if it is set:
//! ```text
//! sleeper:  store(my_sleeping, 1); fence(SeqCst); if ring has work { store(my_sleeping, 0) }
//!           else { poll(my_doorbell) ; drain it; store(my_sleeping, 0) }
//! producer: publish entries (Release store of the tail); fence(SeqCst);
//!           if swap(peer_sleeping, 0) == 1 { write(peer_doorbell, 1) }
//! ```
//! Why no wake-up is lost: the two fences are totally ordered. If the sleeper's fence comes
//! first, the producer's later `swap` sees the flag (the store precedes that fence) and kicks;
//! if the producer's fence comes first, the sleeper's re-check, after its fence, sees the tail
//! published before the producer's fence. In both cases the sleeper either sees the work or is
//! kicked. Spurious kicks only cost one extra loop. Before sleeping, each side spins briefly
//! (adaptively) so a busy pipeline never reaches the system calls.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, eventfd};
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Ring layout version.
pub const RING_VERSION: u32 = 1;
/// Ring magic, "VSHM".
pub const RING_MAGIC: [u8; 4] = *b"VSHM";
/// Bytes of the ring header (the SQE array starts here).
pub const RING_HEADER_LEN: usize = 4096;
/// Bytes per submission entry.
pub const SQE_LEN: usize = 64;
/// Bytes per completion entry.
pub const CQE_LEN: usize = 16;
/// Largest ring (entries) either side accepts.
pub const MAX_RING_ENTRIES: u32 = 4096;
/// Number of descriptors attached to the ShmSetup reply.
pub const SETUP_FDS: usize = 4;
/// Bytes of the [`ShmInfo`] payload.
pub const SHM_INFO_LEN: usize = 40;

/// Offsets of the control words in the ring header.
pub mod off {
    /// "VSHM".
    pub const MAGIC: usize = 0;
    /// Layout version.
    pub const VERSION: usize = 4;
    /// SQ entries.
    pub const SQ_ENTRIES: usize = 8;
    /// CQ entries.
    pub const CQ_ENTRIES: usize = 12;
    /// Byte offset of the SQE array.
    pub const SQES: usize = 16;
    /// Byte offset of the CQE array.
    pub const CQES: usize = 20;
    /// SQ tail (client).
    pub const SQ_TAIL: usize = 64;
    /// SQ head (server).
    pub const SQ_HEAD: usize = 128;
    /// CQ tail (server).
    pub const CQ_TAIL: usize = 192;
    /// CQ head (client).
    pub const CQ_HEAD: usize = 256;
    /// Server sleeps on its doorbell.
    pub const SERVER_SLEEPING: usize = 320;
    /// Client sleeps on its doorbell.
    pub const CLIENT_SLEEPING: usize = 384;
    /// Server ended the session.
    pub const CLOSED: usize = 448;
}

/// Submission opcodes.
pub mod op {
    /// Read from the disk into the arena.
    pub const READ: u8 = 1;
    /// Write from the arena to the disk.
    pub const WRITE: u8 = 2;
    /// Flush the disk.
    pub const FSYNC: u8 = 3;
}

/// Total ring bytes for the given entry counts (page-rounded).
pub fn ring_len(sq_entries: u32, cq_entries: u32) -> usize {
    let raw = RING_HEADER_LEN + sq_entries as usize * SQE_LEN + cq_entries as usize * CQE_LEN;
    raw.div_ceil(4096) * 4096
}

/// A submission entry, as plain values (copied out of or into shared memory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe {
    /// [`op`] code.
    pub opcode: u8,
    /// Must be 0.
    pub flags: u8,
    /// Must be 0.
    pub reserved16: u16,
    /// Bytes to transfer.
    pub len: u32,
    /// Echoed in the completion.
    pub user_data: u64,
    /// Handle id.
    pub handle: u64,
    /// Disk byte offset.
    pub offset: u64,
    /// Arena byte offset.
    pub buf: u64,
    /// Must be 0.
    pub reserved: [u64; 3],
}

impl Sqe {
    /// The entry as 8 little-endian words.
    pub fn to_words(&self) -> [u64; 8] {
        let w0 = u64::from(self.opcode)
            | u64::from(self.flags) << 8
            | u64::from(self.reserved16) << 16
            | u64::from(self.len) << 32;
        [
            w0,
            self.user_data,
            self.handle,
            self.offset,
            self.buf,
            self.reserved[0],
            self.reserved[1],
            self.reserved[2],
        ]
    }

    /// The entry from 8 words (no checks; see the server's validation).
    pub fn from_words(w: [u64; 8]) -> Sqe {
        Sqe {
            opcode: w[0] as u8,
            flags: (w[0] >> 8) as u8,
            reserved16: (w[0] >> 16) as u16,
            len: (w[0] >> 32) as u32,
            user_data: w[1],
            handle: w[2],
            offset: w[3],
            buf: w[4],
            reserved: [w[5], w[6], w[7]],
        }
    }
}

/// A completion entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe {
    /// From the SQE.
    pub user_data: u64,
    /// Bytes, or `-errno`.
    pub res: i32,
    /// Must be 0.
    pub flags: u32,
}

impl Cqe {
    /// As 2 words.
    pub fn to_words(&self) -> [u64; 2] {
        [
            self.user_data,
            u64::from(self.res as u32) | u64::from(self.flags) << 32,
        ]
    }

    /// From 2 words.
    pub fn from_words(w: [u64; 2]) -> Cqe {
        Cqe {
            user_data: w[0],
            res: w[1] as u32 as i32,
            flags: (w[1] >> 32) as u32,
        }
    }
}

/// What the ShmSetup reply tells the client (its payload, [`SHM_INFO_LEN`] bytes):
/// `u32 version, u32 sq_entries, u32 cq_entries, u32 max_in_flight, u64 ring_len,
/// u64 arena_len, u32 max_io, u32 reserved`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmInfo {
    /// Ring layout version ([`RING_VERSION`]).
    pub version: u32,
    /// SQ entries (power of two).
    pub sq_entries: u32,
    /// CQ entries (power of two, = sq_entries).
    pub cq_entries: u32,
    /// Requests the server runs at once for this connection.
    pub max_in_flight: u32,
    /// Bytes of the ring memfd.
    pub ring_len: u64,
    /// Bytes of the arena.
    pub arena_len: u64,
    /// Largest `len` of one SQE.
    pub max_io: u32,
}

impl ShmInfo {
    /// Encodes the payload.
    pub fn encode(&self) -> [u8; SHM_INFO_LEN] {
        let mut b = [0u8; SHM_INFO_LEN];
        b[0..4].copy_from_slice(&self.version.to_le_bytes());
        b[4..8].copy_from_slice(&self.sq_entries.to_le_bytes());
        b[8..12].copy_from_slice(&self.cq_entries.to_le_bytes());
        b[12..16].copy_from_slice(&self.max_in_flight.to_le_bytes());
        b[16..24].copy_from_slice(&self.ring_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.arena_len.to_le_bytes());
        b[32..36].copy_from_slice(&self.max_io.to_le_bytes());
        b
    }

    /// Decodes and checks the payload (what a client must not take on trust).
    pub fn decode(b: &[u8]) -> Result<ShmInfo, String> {
        if b.len() != SHM_INFO_LEN {
            return Err(format!(
                "shm info is {} bytes, expected {SHM_INFO_LEN}",
                b.len()
            ));
        }
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let i = ShmInfo {
            version: u32_at(0),
            sq_entries: u32_at(4),
            cq_entries: u32_at(8),
            max_in_flight: u32_at(12),
            ring_len: u64_at(16),
            arena_len: u64_at(24),
            max_io: u32_at(32),
        };
        if i.version != RING_VERSION {
            return Err(format!("ring layout version {} not supported", i.version));
        }
        let ok_entries = |n: u32| n.is_power_of_two() && n <= MAX_RING_ENTRIES;
        if !ok_entries(i.sq_entries) || i.cq_entries != i.sq_entries {
            return Err(format!(
                "bad ring sizes (sq {}, cq {})",
                i.sq_entries, i.cq_entries
            ));
        }
        if i.max_in_flight == 0 || i.max_in_flight > i.sq_entries {
            return Err(format!("bad max_in_flight {}", i.max_in_flight));
        }
        if i.ring_len != ring_len(i.sq_entries, i.cq_entries) as u64 || u32_at(36) != 0 {
            return Err("ring length does not match the layout".into());
        }
        if i.arena_len == 0 || i.arena_len > isize::MAX as u64 {
            return Err(format!("bad arena length {}", i.arena_len));
        }
        if i.max_io == 0 || u64::from(i.max_io) > i.arena_len || i.max_io > i32::MAX as u32 {
            return Err(format!("bad max_io {}", i.max_io));
        }
        Ok(i)
    }
}

/// A read-write shared mapping of a whole file descriptor; unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is an address range of shared memory owned by this value; every access
// through it goes through the accessors below (atomics or volatile copies) or through slices
// whose aliasing rules are stated at their creation. Moving or sharing the owner between
// threads does not change what the memory is.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0, shared and read-write. The file must be at least
    /// `len` bytes long and must not shrink while mapped (seal it), or accesses fault.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let size = rustix::fs::fstat(fd)?.st_size;
        if u64::try_from(size).map_or(true, |s| s < len as u64) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("file is {size} bytes, expected at least {len}"),
            ));
        }
        // SAFETY: a fresh mapping chosen by the kernel (null hint) aliases nothing in this
        // process; the fd is valid for the call.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }?;
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null pointer"))?;
        Ok(Mapping { ptr, len })
    }

    /// Start of the mapping.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: `map` refuses 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range and nothing else refers to it any more (every
        // user holds the Mapping, directly or through an Arc, while it uses it).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Typed access to a mapped ring. Every access is an atomic or a volatile copy: the peer may
/// write any of it at any time, so nothing read here is trusted before it is checked.
pub struct Ring {
    map: Mapping,
    sq_entries: u32,
    cq_entries: u32,
}

impl Ring {
    /// Wraps a mapping of `ring_len(sq_entries, cq_entries)` bytes (checked).
    pub fn new(map: Mapping, sq_entries: u32, cq_entries: u32) -> io::Result<Ring> {
        if !sq_entries.is_power_of_two()
            || !cq_entries.is_power_of_two()
            || sq_entries > MAX_RING_ENTRIES
            || cq_entries > MAX_RING_ENTRIES
            || map.len() < ring_len(sq_entries, cq_entries)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "ring mapping does not fit the layout",
            ));
        }
        Ok(Ring {
            map,
            sq_entries,
            cq_entries,
        })
    }

    /// SQ entries.
    pub fn sq_entries(&self) -> u32 {
        self.sq_entries
    }

    /// CQ entries.
    pub fn cq_entries(&self) -> u32 {
        self.cq_entries
    }

    /// The control word at `offset` (one of [`off`]).
    pub fn word(&self, offset: usize) -> &AtomicU32 {
        let offset = offset.min(RING_HEADER_LEN - 4) & !3;
        // SAFETY: offset is 4-aligned and inside the header, which is inside the mapping
        // (checked in `new`); the mapping is page-aligned, so the address is aligned for
        // AtomicU32, which has the layout of u32 and accepts any bit pattern. The mapping
        // lives as long as `self`. Both processes touch control words only atomically.
        unsafe { &*self.map.ptr().as_ptr().add(offset).cast::<AtomicU32>() }
    }

    fn words_at(&self, byte_off: usize) -> *mut u64 {
        // Callers pass offsets of whole entries inside the arrays (index masked), so the
        // pointer is 8-aligned and in bounds. wrapping_add keeps this function safe.
        self.map.ptr().as_ptr().wrapping_add(byte_off).cast::<u64>()
    }

    fn sqe_off(&self, index: u32) -> usize {
        RING_HEADER_LEN + (index & (self.sq_entries - 1)) as usize * SQE_LEN
    }

    fn cqe_off(&self, index: u32) -> usize {
        RING_HEADER_LEN
            + self.sq_entries as usize * SQE_LEN
            + (index & (self.cq_entries - 1)) as usize * CQE_LEN
    }

    /// Copies SQE `index` (masked) out of shared memory, once.
    pub fn read_sqe(&self, index: u32) -> Sqe {
        let p = self.words_at(self.sqe_off(index));
        let mut w = [0u64; 8];
        for (i, slot) in w.iter_mut().enumerate() {
            // SAFETY: the SQE lies inside the mapping (masked index, size checked in `new`),
            // 8-aligned; volatile because the peer may change it concurrently (we take
            // whatever value each word has, and check the copy afterwards).
            *slot = unsafe { p.add(i).read_volatile() };
        }
        Sqe::from_words(w)
    }

    /// Writes SQE `index` (masked).
    pub fn write_sqe(&self, index: u32, sqe: &Sqe) {
        let p = self.words_at(self.sqe_off(index));
        for (i, w) in sqe.to_words().into_iter().enumerate() {
            // SAFETY: as in `read_sqe`; a plain value store into shared memory.
            unsafe { p.add(i).write_volatile(w) };
        }
    }

    /// Copies CQE `index` (masked) out of shared memory, once.
    pub fn read_cqe(&self, index: u32) -> Cqe {
        let p = self.words_at(self.cqe_off(index));
        // SAFETY: as in `read_sqe`, for the CQE array.
        let w = unsafe { [p.read_volatile(), p.add(1).read_volatile()] };
        Cqe::from_words(w)
    }

    /// Writes CQE `index` (masked).
    pub fn write_cqe(&self, index: u32, cqe: &Cqe) {
        let p = self.words_at(self.cqe_off(index));
        let [a, b] = cqe.to_words();
        // SAFETY: as in `read_cqe`.
        unsafe {
            p.write_volatile(a);
            p.add(1).write_volatile(b);
        }
    }
}

/// Whether spinning before sleeping is worth it here: only when this process may run on at
/// least 4 CPUs. With fewer, a spinning poller or client takes the CPU from the threads that
/// would produce the work it waits for (the device model, the workers), and throughput drops
/// (measured on a 2-CPU machine with QEMU: spinning cost up to a fifth of the IOPS).
pub fn spin_worthwhile() -> bool {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let n = *CPUS.get_or_init(|| {
        rustix::thread::sched_getaffinity(None)
            .map(|s| s.count() as usize)
            .unwrap_or(1)
    });
    n >= 4
}

/// Spins until `done()` is true (`true`) or `budget` is spent (`false`; at once for a zero
/// budget), reading the clock sparingly ([`ClockPacer`]) and yielding the CPU at each reading.
pub(crate) fn spin_until(budget: Duration, mut done: impl FnMut() -> bool) -> bool {
    if budget.is_zero() {
        return false;
    }
    let t0 = Instant::now();
    let mut pacer = ClockPacer::new();
    loop {
        if done() {
            return true;
        }
        if pacer.due() {
            if t0.elapsed() >= budget {
                return false;
            }
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// When a spinning loop reads the clock to see whether its budget is spent: after 32 empty
/// rounds, then after twice as many each time, up to every 4096 rounds. Where the clock is not
/// the TSC (hpet in many virtual machines) each reading is a system call and an emulated
/// device access (`inproc-bench --clock-cost` measures it; `scripts/bench-guest.sh` prints it
/// for its guest), more than a round of a spinning loop; the growing step keeps a loop's
/// readings logarithmic in its length while overshooting the budget by at most about as long
/// again.
#[derive(Debug)]
pub(crate) struct ClockPacer {
    round: u32,
    next: u32,
    step: u32,
}

impl ClockPacer {
    pub(crate) fn new() -> Self {
        ClockPacer {
            round: 0,
            next: 32,
            step: 32,
        }
    }

    /// Counts one round; `true` when this one should read the clock.
    pub(crate) fn due(&mut self) -> bool {
        self.round = self.round.wrapping_add(1);
        if self.round < self.next {
            return false;
        }
        self.next = self.next.saturating_add(self.step);
        self.step = (self.step * 2).min(4096);
        true
    }
}

/// A non-blocking, close-on-exec eventfd.
pub fn new_doorbell() -> io::Result<OwnedFd> {
    Ok(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?)
}

/// Rings a doorbell. Never blocks; a saturated counter (EAGAIN) already means "wake up".
pub fn kick(fd: BorrowedFd<'_>) {
    loop {
        match rustix::io::write(fd, &1u64.to_ne_bytes()) {
            Err(rustix::io::Errno::INTR) => {}
            _ => return,
        }
    }
}

/// Clears a doorbell's counter without blocking.
pub fn drain(fd: BorrowedFd<'_>) {
    let mut b = [0u8; 8];
    loop {
        match rustix::io::read(fd, &mut b) {
            Err(rustix::io::Errno::INTR) => {}
            _ => return,
        }
    }
}

/// A close-on-exec memfd of `len` bytes, sealed so that nobody (including a client it is
/// passed to) can shrink or grow it (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`). Shrinking a
/// file another process has mapped makes that process fault (SIGBUS) on access, so every fd a
/// server hands to a client must be sealed like this.
///
/// For QEMU, such a memfd can back guest memory: pass
/// `mem-path=/proc/<this pid>/fd/<fd>,share=on` to `memory-backend-file` (QEMU opens the same
/// file; the seals stay in force).
pub fn sealed_memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, len as u64)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(fd)
}

/// Whether `fd` is sealed against shrinking (so a holder cannot make its mappings fault).
pub fn is_shrink_sealed(fd: BorrowedFd<'_>) -> bool {
    rustix::fs::fcntl_get_seals(fd).is_ok_and(|s| s.contains(SealFlags::SHRINK))
}

/// Sends all of `data` on a stream socket, the descriptors attached to its first byte.
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(SETUP_FDS))];
    let mut ctl = SendAncillaryBuffer::new(&mut space);
    if fds.len() > SETUP_FDS || !ctl.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors",
        ));
    }
    let mut sent = loop {
        match rustix::net::sendmsg(sock, &[IoSlice::new(data)], &mut ctl, SendFlags::NOSIGNAL) {
            Ok(0) if !data.is_empty() => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    while sent < data.len() {
        match rustix::net::send(sock, &data[sent..], SendFlags::NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes and any descriptors attached to them (at most
/// [`SETUP_FDS`]; close-on-exec). Returns the byte count (0 at end of stream).
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(SETUP_FDS))];
    let mut ctl = RecvAncillaryBuffer::new(&mut space);
    let msg = loop {
        match rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(buf)],
            &mut ctl,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(m) => break m,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds = Vec::new();
    for m in ctl.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = m {
            fds.extend(it);
        }
    }
    Ok((msg.bytes, fds))
}

/// Borrows a slice of owned fds.
pub(crate) fn borrow_all(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(AsFd::as_fd).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_pacer_reads_logarithmically_then_every_4096() {
        let mut p = ClockPacer::new();
        let due: Vec<u32> = (1..=20_000).filter(|_| p.due()).collect();
        assert_eq!(
            &due[..9],
            &[32, 64, 128, 256, 512, 1024, 2048, 4096, 8192],
            "doubling gaps"
        );
        assert!(due[9..].windows(2).all(|w| w[1] - w[0] == 4096), "{due:?}");
        assert_eq!(due.len(), 11);
    }

    #[test]
    fn sqe_and_cqe_round_trip() {
        let s = Sqe {
            opcode: 2,
            flags: 7,
            reserved16: 0xbeef,
            len: 0x1234_5678,
            user_data: u64::MAX - 3,
            handle: 42,
            offset: 1 << 40,
            buf: 4096,
            reserved: [1, 2, 3],
        };
        assert_eq!(Sqe::from_words(s.to_words()), s);
        let c = Cqe {
            user_data: 99,
            res: -22,
            flags: 5,
        };
        assert_eq!(Cqe::from_words(c.to_words()), c);
    }

    #[test]
    fn info_round_trip_and_checks() {
        let i = ShmInfo {
            version: RING_VERSION,
            sq_entries: 64,
            cq_entries: 64,
            max_in_flight: 32,
            ring_len: ring_len(64, 64) as u64,
            arena_len: 1 << 20,
            max_io: 1 << 20,
        };
        assert_eq!(ShmInfo::decode(&i.encode()), Ok(i));
        let mut bad = i;
        bad.sq_entries = 63;
        assert!(ShmInfo::decode(&bad.encode()).is_err());
        let mut bad = i;
        bad.max_io = (1 << 20) + 1;
        assert!(ShmInfo::decode(&bad.encode()).is_err());
        let mut bad = i;
        bad.max_in_flight = 65;
        assert!(ShmInfo::decode(&bad.encode()).is_err());
        assert!(ShmInfo::decode(&i.encode()[..39]).is_err());
    }

    #[test]
    fn sealed_memfd_cannot_shrink_and_ring_accessors_work() {
        let fd = sealed_memfd("t", ring_len(8, 8)).unwrap();
        assert!(is_shrink_sealed(fd.as_fd()));
        assert!(rustix::fs::ftruncate(&fd, 0).is_err());
        let ring = Ring::new(Mapping::map(fd.as_fd(), ring_len(8, 8)).unwrap(), 8, 8).unwrap();
        let s = Sqe {
            opcode: 1,
            len: 4096,
            user_data: 7,
            ..Sqe::default()
        };
        ring.write_sqe(9, &s); // index 9 is slot 1
        assert_eq!(ring.read_sqe(1), s);
        let c = Cqe {
            user_data: 7,
            res: 4096,
            flags: 0,
        };
        ring.write_cqe(15, &c);
        assert_eq!(ring.read_cqe(7), c);
        ring.word(off::SQ_TAIL)
            .store(5, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            ring.word(off::SQ_TAIL)
                .load(std::sync::atomic::Ordering::SeqCst),
            5
        );
    }
}
