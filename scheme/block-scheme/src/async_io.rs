//! Asynchronous whole-block reads and writes through the scheme: a server thread that
//! multiplexes many requests (the shared-memory IPC poller) starts a request and collects its
//! result later, without a thread blocked on it in between.
//!
//! Two layers:
//! - the device's [`AsyncBlockIo`] (one per request slot of a server, from
//!   [`crate::BlockDevice::async_io`]): split-phase submission of one whole-block command;
//! - the scheme's [`AsyncSlot`], which wraps it with what the scheme guarantees for every
//!   read and write ([`crate::DiskScheme::submit_async`]): handle access mode, the partition
//!   window, `EROFS`, and for writes the disk's range lock held until the write settles and
//!   the partition-table cache told after a whole-disk write.
//!
//! Only requests that need no byte-level work qualify: block-aligned, wholly inside the
//! region, at most [`crate::MAX_IO_CHUNK`] bytes, a write whose range is free now. For any
//! other, `submit_async` answers "not started" and the caller uses
//! [`crate::DiskScheme::read`]/[`crate::DiskScheme::write`], whose results are the same.
//!
//! Concurrency: an `AsyncSlot` is used by one thread at a time (it is `Send`); a server moves
//! it to another thread to finish it blocking. The [`IoWaker`] is called from the device's
//! completion context (see its rules).

use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Instant;

use crate::Result;
use crate::range_lock::OwnedRangeGuard;
use crate::tables::TableCache;

/// Told when a command submitted through an [`AsyncBlockIo`] is answered. Called from the
/// device's completion thread, possibly with driver locks held: it must not block and must
/// not call back into the scheme or the device (set a flag, ring an eventfd).
pub trait IoWaker: Send + Sync + 'static {
    /// A command of the slot this waker belongs to has a result (poll it).
    fn wake(&self);
}

/// The caller's buffer of an asynchronous request: `len` bytes at `ptr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsyncBuf {
    /// First byte.
    pub ptr: NonNull<u8>,
    /// Length in bytes.
    pub len: usize,
}

/// Where an asynchronous request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsyncPoll {
    /// Not answered yet.
    Pending,
    /// Completed with the whole transfer (`len` bytes); the slot is free for the next request.
    Done,
    /// Needs `finish_blocking` (an error, a short transfer, a retry...), on a thread that may
    /// block.
    Slow,
}

/// Split-phase whole-block I/O of a device: one command at a time per value. Implemented by
/// devices that can submit without blocking (the daemon's driver); see
/// [`crate::BlockDevice::async_io`].
pub trait AsyncBlockIo: Send {
    /// Starts a read (`write == false`: the device fills `buf`) or a write of `buf` at block
    /// `lba` of `disk`; `buf.len` is a non-zero multiple of the block size and the range lies
    /// inside the disk (the scheme checked both). `Ok(true)`: started; `Ok(false)`: this
    /// request cannot be started without blocking (the caller uses
    /// [`crate::BlockDevice::read_blocks`]/[`crate::BlockDevice::write_blocks`]); `Err`: the
    /// request fails with that errno. Only called while no command of this value is in flight.
    ///
    /// # Safety
    /// `buf` must stay valid and not be accessed by the caller until the command settles
    /// ([`AsyncBlockIo::poll`] returned [`AsyncPoll::Done`] or
    /// [`AsyncBlockIo::finish_blocking`] returned). If the value is dropped before, the device
    /// may still write the buffer: the memory must stay mapped and unused as long as it may.
    unsafe fn submit(&mut self, disk: usize, lba: u64, buf: AsyncBuf, write: bool) -> Result<bool>;

    /// Checks without blocking whether the command was answered. After `Done` the command is
    /// settled; after `Slow`, call [`AsyncBlockIo::finish_blocking`].
    fn poll(&mut self) -> AsyncPoll;

    /// Settles the command, blocking as long as that takes (waiting for the answer, recovering
    /// a command past its deadline, retrying). `Ok` after the whole transfer.
    fn finish_blocking(&mut self) -> Result<()>;

    /// When the command in flight is overdue: past it, call
    /// [`AsyncBlockIo::finish_blocking`] (it recovers the command). `None` if none is in
    /// flight or the device keeps no deadline.
    fn deadline(&self) -> Option<Instant>;

    /// Whether commands on buffers inside `mem` can be started at all (e.g. the device reaches
    /// that memory in place). A server asks once for its whole buffer area and skips
    /// `submit` for memory that can never qualify. The default: yes.
    fn reaches(&self, mem: AsyncBuf) -> bool {
        let _ = mem;
        true
    }
}

/// One request slot for asynchronous I/O through a scheme ([`crate::DiskScheme::async_slot`],
/// [`crate::DiskScheme::submit_async`]). Holds, while a request is in flight, what the scheme
/// guarantees for it; gives it back when the request settles.
pub struct AsyncSlot {
    io: Box<dyn AsyncBlockIo>,
    /// A request was started and has not settled yet.
    busy: bool,
    /// A write's block range in the disk's range lock, released when it settles.
    held: Option<OwnedRangeGuard>,
    /// A write through a whole-disk handle: the disk whose partition-table cache is told
    /// when it settles (it may have rewritten the table, even if it failed).
    note_disk: Option<usize>,
    tables: Arc<TableCache>,
}

impl std::fmt::Debug for AsyncSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncSlot")
            .field("busy", &self.busy)
            .field("held", &self.held)
            .field("note_disk", &self.note_disk)
            .finish_non_exhaustive()
    }
}

impl AsyncSlot {
    pub(crate) fn new(io: Box<dyn AsyncBlockIo>, tables: Arc<TableCache>) -> Self {
        AsyncSlot {
            io,
            busy: false,
            held: None,
            note_disk: None,
            tables,
        }
    }

    /// Whether a request was started and has not settled.
    pub fn is_busy(&self) -> bool {
        self.busy
    }

    /// Checks without blocking whether the request was answered (see [`AsyncPoll`]). A slot
    /// with nothing in flight answers `Done`.
    pub fn poll(&mut self) -> AsyncPoll {
        if !self.busy {
            return AsyncPoll::Done;
        }
        let p = self.io.poll();
        if p == AsyncPoll::Done {
            self.settle();
        }
        p
    }

    /// Settles the request, blocking as long as that takes; `Ok` after the whole transfer.
    /// Call after [`AsyncSlot::poll`] said `Slow`, or past the deadline.
    pub fn finish_blocking(&mut self) -> Result<()> {
        if !self.busy {
            return Ok(());
        }
        let r = self.io.finish_blocking();
        self.settle();
        r
    }

    /// Whether requests on buffers inside `mem` can ever start (see [`AsyncBlockIo::reaches`]).
    pub fn reaches(&self, mem: AsyncBuf) -> bool {
        self.io.reaches(mem)
    }

    /// When the request in flight is overdue (see [`AsyncBlockIo::deadline`]).
    pub fn deadline(&self) -> Option<Instant> {
        if self.busy { self.io.deadline() } else { None }
    }

    pub(crate) fn start(&mut self, held: Option<OwnedRangeGuard>, note_disk: Option<usize>) {
        self.busy = true;
        self.held = held;
        self.note_disk = note_disk;
    }

    pub(crate) fn device_io(&mut self) -> &mut dyn AsyncBlockIo {
        &mut *self.io
    }

    /// The request settled: its range is released, then the table cache learns of a
    /// whole-disk write (the order of the blocking path's `DiskScheme::write`).
    fn settle(&mut self) {
        self.busy = false;
        self.held = None;
        if let Some(disk) = self.note_disk.take() {
            self.tables.note_write(disk);
        }
    }
}
