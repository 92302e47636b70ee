//! Split-phase block I/O: submit a read or write now, collect its result later, without a
//! thread blocked on it in between (for a server thread that multiplexes many requests, like
//! the shared-memory IPC poller).
//!
//! Only the simplest request qualifies: one SCSI command (whole blocks, at most the disk's
//! maximum transfer) whose buffer the device reaches in place (`hal::is_device_visible`), or,
//! for any other buffer, one that fits the command slot's own data buffer: then the data is
//! copied ("bounced") through the slot, by the submitter for a write and by the owner's `poll`
//! (or `finish_blocking`) for a read, as the blocking path copies.
//! Everything else, and every result other than a clean full transfer, goes through the
//! blocking machinery: [`AsyncIo::finish_blocking`] runs what `ScsiHost::block_io` does after
//! a submission (the recovery ladder on a timeout, the bounded retry of retryable errors).
//!
//! Life of a command (each step by the token's owner unless said otherwise):
//! 1. [`ScsiHost::submit_async`] picks the route (the steering pick stays held), takes a free
//!    slot without waiting, installs the owner's [`CompletionWaker`] in the slot and submits.
//!    Any reason not to (no free slot, queue out of service, buffer not device-visible, ...)
//!    returns `None`: the caller uses the blocking `ScsiHost::read`/`write` instead.
//! 2. The completion thread answers the slot (`RequestQueue::drain` → `finish_locked`; or a
//!    device reset / shutdown fails it) and calls the waker instead of the slot's condvar.
//! 3. The owner calls [`AsyncIo::poll`]: `Pending` (not answered), `Done` (full transfer: the
//!    slot and the route are given back; the token is settled), or `Slow` (anything else: an
//!    error, a short transfer; the decoded result is kept in the token).
//! 4. On `Slow`, or once [`AsyncIo::deadline`] passed, the owner hands the token to a thread
//!    that may block and calls [`AsyncIo::finish_blocking`].
//!
//! Every command is answered exactly once: by `poll` returning `Done`, or by
//! `finish_blocking`. A token dropped unsettled gives its slot up as `SlotGuard::drop` does
//! (orphaned while the device holds it: freed only when the device returns it) and ends its
//! route after that.
//!
//! Concurrency: a token is used by one thread at a time (it is `Send`, not `Sync`). Its slot
//! state is protected by the slot's mutex in `queue.rs`; the token itself holds only plain
//! values (slot and route indices) and an `Arc` of the host, which keeps the queue alive.

use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Instant;

use crate::disk::Disk;
use crate::error::DriverError;
use crate::hal;
use crate::host::{Data, RouteId, ScsiHost, Transferred, rw_cdb};
use crate::queue::{DataDir, SlotId};

pub use crate::queue::CompletionWaker;

/// Where an asynchronous command stands (see [`AsyncIo::poll`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsyncPoll {
    /// Still with the device.
    Pending,
    /// Completed with the full transfer; the token is settled (nothing more to do).
    Done,
    /// Needs [`AsyncIo::finish_blocking`] (on a thread that may block).
    Slow,
}

/// One asynchronous single-command read or write in flight (module docs). Owns its slot and
/// its steering route; settles them exactly once.
pub struct AsyncIo {
    host: Arc<ScsiHost>,
    /// The command's slot; `None` once settled.
    slot: Option<SlotId>,
    /// The steering pick; ended once, after the last use of its queue. `None` once ended.
    route: Option<RouteId>,
    /// The queue the route picked (`route.queue()`, kept for after it ended).
    queue: usize,
    lun: [u8; 8],
    write: bool,
    lba: u64,
    /// The caller's buffer (see `ScsiHost::submit_async`'s contract).
    buf: NonNull<u8>,
    len: usize,
    /// The device moves the data through the slot's own buffer, not `buf` (which it cannot
    /// reach): a read's data is copied to `buf` once the command completed.
    bounce: bool,
    block_size: usize,
    /// When the command is overdue (submission + command timeout).
    deadline: Instant,
    /// The decoded first result, kept by `poll` when it was not a clean full transfer.
    outcome: Option<Result<Transferred, DriverError>>,
}

// SAFETY: `buf` is a plain address of memory the submitter lent for the command's lifetime
// (the contract of `ScsiHost::submit_async`), not tied to any thread; everything else is Send.
unsafe impl Send for AsyncIo {}

impl std::fmt::Debug for AsyncIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncIo")
            .field("queue", &self.queue)
            .field("write", &self.write)
            .field("lba", &self.lba)
            .field("len", &self.len)
            .field("settled", &self.slot.is_none())
            .finish_non_exhaustive()
    }
}

impl ScsiHost {
    /// Submits one whole-block read (`write == false`: the device fills `buf`) or write of
    /// `len` bytes at block `lba` of `disk` and returns at once with its token, or `None` when
    /// the request does not qualify now (module docs) and must go through
    /// [`ScsiHost::read`]/[`ScsiHost::write`]. `waker` is called (from the completion thread)
    /// when the command is answered.
    ///
    /// # Safety
    /// `len` bytes at `buf` must stay valid, and not be accessed by this process (a write's
    /// buffer may be read), until the token is settled: [`AsyncIo::poll`] returned
    /// [`AsyncPoll::Done`], or [`AsyncIo::finish_blocking`] returned. If the token is dropped
    /// unsettled, the device may still write the buffer later: the memory must then stay
    /// mapped and unused for as long as the device may (a registered DMA window stays mapped
    /// for the platform's lifetime).
    pub unsafe fn submit_async(
        self: &Arc<Self>,
        disk: &Disk,
        lba: u64,
        buf: NonNull<u8>,
        len: usize,
        write: bool,
        waker: &Arc<dyn CompletionWaker>,
    ) -> Option<AsyncIo> {
        let bs = disk.block_size as usize;
        if (write && disk.readonly)
            || bs == 0
            || len == 0
            || !len.is_multiple_of(bs)
            || len > disk.max_transfer_bytes
        {
            return None;
        }
        let blocks = (len / bs) as u64;
        if lba.checked_add(blocks).is_none_or(|end| end > disk.blocks) {
            return None;
        }
        let bounce = !hal::is_device_visible(buf.as_ptr(), len);
        let cdb = rw_cdb(write, lba, blocks).ok()?;
        let route = self.pick_route(disk);
        let queue_index = route.queue();
        let queue = self.queue_at(queue_index);
        if bounce && len > queue.data_cap() {
            self.end_route(route);
            return None;
        }
        let mut slot = match queue.try_acquire() {
            Ok(Some(slot)) => slot,
            // No free slot now, or the queue is out of service: the blocking path waits (or
            // fails) as it does for every command.
            Ok(None) | Err(_) => {
                self.end_route(route);
                return None;
            }
        };
        let dir = if write { DataDir::Out } else { DataDir::In };
        let submitted = if bounce {
            // SAFETY: `buf..buf + len` is valid and not accessed by anyone else until the
            // token settles (this function's contract); it is only read here.
            let out = write.then(|| unsafe { std::slice::from_raw_parts(buf.as_ptr(), len) });
            self.fill(&mut slot, &disk.lun_field, cdb.as_slice(), out);
            slot.set_waker(Some(waker.clone()));
            slot.submit(dir, len)
        } else {
            self.fill(&mut slot, &disk.lun_field, cdb.as_slice(), None);
            slot.set_waker(Some(waker.clone()));
            // SAFETY: `buf..buf + len` is valid and lent to the device until the token settles
            // (this function's contract); for a write the device only reads it
            // (DataDir::Out); it lies in a registered DMA window (checked above).
            unsafe {
                let data = std::slice::from_raw_parts_mut(buf.as_ptr(), len);
                slot.submit_external(dir, data)
            }
        };
        if let Err(e) = submitted {
            log::debug!("asynchronous submission on queue {queue_index} refused: {e}");
            // Orphaned if the chain went out (then the machine is gone: nothing writes the
            // buffer any more), freed otherwise; the route ends after the slot is given up.
            drop(slot);
            self.end_route(route);
            return None;
        }
        let slot = slot.detach();
        Some(AsyncIo {
            host: self.clone(),
            slot: Some(slot),
            route: Some(route),
            queue: queue_index,
            lun: disk.lun_field,
            write,
            lba,
            buf,
            len,
            bounce,
            block_size: bs,
            deadline: Instant::now() + self.host_config().command_timeout,
            outcome: None,
        })
    }

    /// A device-visible, zeroed buffer of at least `len` bytes from the host's own DMA memory
    /// (for in-process zero-copy I/O and tests). It must outlive every command using it.
    pub fn alloc_dma_buffer(&self, len: usize) -> Option<hal::DmaPages> {
        self.dma_arena().alloc(len)
    }
}

impl AsyncIo {
    /// Checks, without blocking, whether the command was answered (module docs, step 3),
    /// draining the queue's used ring itself if not yet. Cheap when nothing came: a slot lock
    /// and a queue lock with a look at the used index.
    pub fn poll(&mut self) -> AsyncPoll {
        if self.outcome.is_some() {
            return AsyncPoll::Slow;
        }
        let Some(id) = self.slot.take() else {
            return AsyncPoll::Done;
        };
        let queue = self.host.queue_at(self.queue);
        let mut slot = queue.reattach(id);
        let mut answer = slot.try_result();
        if answer.is_none() && queue.drain() > 0 {
            // Not answered yet, but the used ring had entries: an owner that polls before the
            // completion thread got to them (e.g. the shared-memory poller's deadline scan)
            // collects its completion without waiting for the interrupt. `drain` answers every
            // popped slot as the completion thread would (wakers included).
            answer = slot.try_result();
        }
        let outcome = match answer {
            None => {
                self.slot = Some(slot.detach());
                return AsyncPoll::Pending;
            }
            Some(Ok(used)) => self.host.decode(&slot, used as usize, false, self.len),
            Some(Err(e)) => Err(e.into()),
        };
        if matches!(outcome, Ok(Transferred(n)) if n == self.len) {
            self.bounce_in(&slot, self.len);
            // Settled: the slot goes back to the free list, then the route ends.
            drop(slot);
            self.end_route();
            return AsyncPoll::Done;
        }
        self.outcome = Some(outcome);
        self.slot = Some(slot.detach());
        AsyncPoll::Slow
    }

    /// Settles the command, blocking as long as that takes: waits for its answer until the
    /// deadline, then recovers it (ABORT TASK, resets) as every command is; retries a
    /// retryable error through a slot buffer with the bounded retry policy. `Ok` after the
    /// full transfer. What `ScsiHost::block_io` does for one command after submitting it.
    pub fn finish_blocking(mut self) -> Result<(), DriverError> {
        let Some(id) = self.slot.take() else {
            return Ok(());
        };
        let host = self.host.clone();
        let queue = host.queue_at(self.queue);
        let mut slot = queue.reattach(id);
        let first = match self.outcome.take() {
            Some(first) => first,
            None => {
                let left = self.deadline.saturating_duration_since(Instant::now());
                host.wait_used(&mut slot, left)
                    .and_then(|(used, recovered)| host.decode(&slot, used, recovered, self.len))
            }
        };
        if let Ok(Transferred(n)) = first {
            self.bounce_in(&slot, n.min(self.len));
        }
        let (buf, len, write) = (self.buf, self.len, self.write);
        let data = move || {
            // SAFETY: the buffer is lent to this command until it settles (the contract of
            // `submit_async`); `settle` asks for it only to retry, after the device answered
            // the first attempt (so it no longer touches the buffer) and gave its slot up.
            let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_ptr(), len) };
            if write {
                Data::Out(bytes)
            } else {
                Data::In(bytes)
            }
        };
        let result = host.settle(
            queue,
            &self.lun,
            self.write,
            self.lba,
            self.len,
            first,
            slot,
            data,
            self.block_size,
        );
        // After the last use of the queue (`settle` retries on it).
        self.end_route();
        result
    }

    /// When the command is overdue: past it, hand the token to [`AsyncIo::finish_blocking`],
    /// which recovers it.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether the token is settled (its slot and route given back).
    pub fn is_settled(&self) -> bool {
        self.slot.is_none()
    }

    /// For a bounced read that completed: copies the first `n` bytes the device wrote into
    /// the slot's buffer to the caller's.
    fn bounce_in(&self, slot: &crate::queue::SlotGuard<'_>, n: usize) {
        if !self.bounce || self.write {
            return;
        }
        let (_, data) = slot.response();
        let n = n.min(data.len()).min(self.len);
        // SAFETY: the caller's buffer is valid for `len` bytes and accessed by nobody else
        // until the token settles (`submit_async`'s contract); the device never saw it.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.buf.as_ptr(), n) };
        dst.copy_from_slice(&data[..n]);
    }

    fn end_route(&mut self) {
        if let Some(route) = self.route.take() {
            self.host.end_route(route);
        }
    }
}

impl Drop for AsyncIo {
    fn drop(&mut self) {
        if let Some(id) = self.slot.take() {
            // As `SlotGuard::drop`: orphaned while the device holds it, freed otherwise.
            drop(self.host.queue_at(self.queue).reattach(id));
        }
        self.end_route();
    }
}
