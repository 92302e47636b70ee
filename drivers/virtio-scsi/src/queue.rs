//! One request virtqueue: its ring (a `virtio_drivers::queue::VirtQueue`), a fixed pool of
//! request slots in DMA memory, submission and completion.
//!
//! A slot is the DMA memory of one command: request header, response, and a data buffer of
//! `data_cap` bytes. Slots are allocated once at start-up; nothing is allocated per request.
//!
//! Concurrency rules (each written next to the data too):
//! - `QueueInner` (ring, free list, token table) is behind `RequestQueue::inner`. It is held only
//!   to add a chain or to pop used chains, never while waiting and never with another queue's lock.
//! - A slot's state (and its completion waker) is behind its own `SlotSync::state`. Lock
//!   order: `inner` before a slot's `state` (the completion path); a waiter holds only its
//!   slot's `state`.
//! - A completed command wakes exactly one kind of owner: the slot's [`CompletionWaker`] if
//!   one is installed (an asynchronous owner that polls, see `crate::async_io`), else the
//!   slot's condvar (a blocking owner). A blocking wait removes the waker first. Wakers are
//!   called with `inner` and the slot's `state` held, so they must only flip flags or ring an
//!   eventfd: never block, never call back into the driver.
//! - The notify (an MMIO posted write) happens after `inner` is released.
//! - A slot whose command is in flight is never reused until the device has returned it in the
//!   used ring, even if its submitter gave up waiting (`Orphaned`): the device may still write to
//!   its buffers, and a reused buffer must never receive a stale command's data.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use virtio_drivers::queue::VirtQueue;

use crate::hal::{DmaArena, DmaPages, ShmHal};
use crate::transport::Notifier;
use crate::wire::{REQ_HEADER_LEN, RESP_HEADER_LEN};

/// Descriptors per virtqueue. QEMU's request queues hold 256 (`virtqueue_size`); 128 is
/// plenty at 3 descriptors per command and keeps the rings small.
pub const QUEUE_SIZE: usize = 128;
/// Descriptors one command uses: request header, response, and one data buffer (the data
/// buffer is physically contiguous, so one segment always satisfies `seg_max`).
pub const DESC_PER_CMD: usize = 3;
/// How long a new command waits for the device reset that restores a broken queue.
const RESET_WAIT: Duration = Duration::from_secs(10);
/// Offset of the response inside a slot's first page.
const RESP_OFFSET: usize = 1024;
/// Offset of the data buffer inside a slot.
const DATA_OFFSET: usize = 4096;

/// Direction of a command's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataDir {
    /// No data.
    None,
    /// Device to driver (reads).
    In,
    /// Driver to device (writes).
    Out,
}

/// Why a queue operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The queue was declared broken (a device answer that made no sense, or the machine died).
    #[error("request queue {queue} is out of service: {reason}")]
    Broken {
        /// Virtqueue index.
        queue: u16,
        /// What happened.
        reason: String,
    },
    /// A device reset dropped the command before it completed (the device did not run it to
    /// the end; running it again is safe: reads and writes of whole blocks are idempotent).
    #[error("request queue {queue}: command dropped by a {reason}")]
    Reset {
        /// Virtqueue index.
        queue: u16,
        /// Why the device was reset.
        reason: String,
    },
    /// The command did not complete in time (the slot stays reserved until the device returns it).
    #[error("command timed out after {0:?}")]
    Timeout(Duration),
    /// The device returned a used length larger than the buffers it was given.
    #[error("device reported {used} bytes written into {capacity} bytes of buffers")]
    BadUsedLength {
        /// Length from the used ring.
        used: u32,
        /// What the chain could hold.
        capacity: usize,
    },
}

/// Where a slot is in its life.
#[derive(Debug)]
enum SlotState {
    /// In the free list.
    Free,
    /// Held by a [`SlotGuard`], not submitted.
    Owned,
    /// Submitted; the owner waits for it.
    InFlight,
    /// Completed with this used length, or failed.
    Done(Result<u32, QueueError>),
    /// Submitted, but the owner stopped waiting: free it when the device returns it.
    Orphaned,
}

/// Told when an asynchronously owned slot's command is answered (see the module rules:
/// called under the queue and slot locks, so it must not block or re-enter the driver).
pub trait CompletionWaker: Send + Sync {
    /// The command of the slot this waker was installed on has a result now.
    fn wake(&self);
}

/// What a slot's mutex protects.
struct SlotCell {
    state: SlotState,
    /// Installed by an asynchronous owner before submission ([`SlotGuard::set_waker`]);
    /// taken (and called) when the command is answered, cleared when the owner blocks, gives
    /// the slot up, or the slot is freed. While it is set, completion does not signal `done`.
    waker: Option<Arc<dyn CompletionWaker>>,
}

struct SlotSync {
    /// Protected by itself; see the module rules for lock order.
    state: Mutex<SlotCell>,
    /// Signalled when the command is answered and no waker is installed.
    done: Condvar,
}

/// The DMA memory of one slot. Fixed after start-up.
struct SlotMem {
    mem: DmaPages,
}

/// Lengths of a chain in flight, to rebuild its buffer list when it is popped.
#[derive(Clone, Copy, Debug)]
struct Chain {
    slot: u16,
    req_len: usize,
    resp_len: usize,
    /// The data buffer: the slot's own, or (zero-copy) a caller's buffer inside a registered
    /// DMA window.
    data_ptr: *mut u8,
    data_len: usize,
    dir: DataDir,
}

// SAFETY: a Chain is a record of addresses and lengths; it is only dereferenced under the
// rules of `RequestQueue::buffers`.
unsafe impl Send for Chain {}

/// The buffer list of one chain: device-readable (`inputs`) then device-writable (`outputs`).
struct ChainBuffers<'a> {
    inputs: [&'a [u8]; 2],
    n_in: usize,
    outputs: [&'a mut [u8]; 2],
    n_out: usize,
}

/// Reads the raw 32-bit id of the next used element of a ring, which
/// `VirtQueue::peek_used` truncates to 16 bits (a hostile id of 0x10001 would pass as 1).
/// Tracks the ring position itself: one `advance` per popped element.
pub struct UsedIds {
    ring: NonNull<u8>,
    size: usize,
    next: u16,
}

// SAFETY: a pointer into device-visible memory, only read with volatile reads by the holder
// of the queue it belongs to.
unsafe impl Send for UsedIds {}

impl UsedIds {
    /// For queue `queue` of `size` entries, whose ring `transport` just set up.
    pub fn new(
        transport: &crate::transport::PciTransport,
        arena: &DmaArena,
        queue: u16,
        size: usize,
    ) -> Result<Self, String> {
        let dev = transport
            .used_ring(queue)
            .ok_or_else(|| format!("virtqueue {queue}: no used ring"))?;
        let ring = arena
            .cpu_ptr_of(dev, 6 + 8 * size)
            .ok_or_else(|| format!("virtqueue {queue}: used ring outside DMA memory"))?;
        Ok(UsedIds {
            ring,
            size,
            next: 0,
        })
    }

    /// The raw id of the next used element. Call only after `peek_used` said one is there
    /// (its acquire load of the used index orders this read after the device's write).
    pub fn next_id(&self) -> u32 {
        let at = 4 + 8 * (usize::from(self.next) % self.size);
        // SAFETY: `at + 4 <= 4 + 8 * size`, inside the ring checked in `new`; the element
        // was published by the device; a volatile read of a u32 at a 4-aligned address of
        // DMA memory is what a driver does with a ring the device writes.
        let raw = unsafe { std::ptr::read_volatile(self.ring.as_ptr().add(at).cast::<u32>()) };
        u32::from_le(raw)
    }

    /// One element popped.
    pub fn advance(&mut self) {
        self.next = self.next.wrapping_add(1);
    }

    /// Whether the next used element's raw id is exactly `token` (a valid 16-bit head).
    pub fn matches(&self, token: u16) -> bool {
        self.next_id() == u32::from(token)
    }
}

/// Everything behind the queue lock.
struct QueueInner {
    vq: VirtQueue<ShmHal, QUEUE_SIZE>,
    used_ids: UsedIds,
    /// Free slots.
    free: Vec<u16>,
    /// Chain in flight by head descriptor index (the token `VirtQueue::add` returned).
    chains: [Option<Chain>; QUEUE_SIZE],
    /// Set once: the queue takes no more commands.
    broken: Option<String>,
    /// Broken by the device, and a device reset (which brings the queue back) is coming:
    /// new commands wait for it instead of failing.
    awaiting_reset: bool,
}

/// Per-queue counters.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Commands submitted.
    pub submitted: std::sync::atomic::AtomicU64,
    /// Commands completed (used ring entries popped).
    pub completed: std::sync::atomic::AtomicU64,
    /// Notifications sent.
    pub kicks: std::sync::atomic::AtomicU64,
}

/// A request queue.
pub struct RequestQueue {
    index: u16,
    notifier: Notifier,
    /// The ring and slot bookkeeping.
    inner: Mutex<QueueInner>,
    /// Signalled when a slot returns to the free list.
    slot_freed: Condvar,
    slots: Vec<SlotSync>,
    mem: Vec<SlotMem>,
    req_len: usize,
    resp_len: usize,
    data_cap: usize,
    /// Chains the device holds now (set under `inner`'s lock: +1 when a chain is added, -1
    /// when it is popped, 0 when a reset takes them all back). Read without the lock by the
    /// completion thread to decide whether busy polling can find anything.
    in_flight: AtomicUsize,
    /// Counters.
    pub stats: QueueStats,
}

/// A [`SlotGuard`] taken apart so that it can be owned without borrowing its queue (an
/// asynchronous command's token keeps the host, hence the queue, alive itself). Turn it back
/// into a guard with [`RequestQueue::reattach`] on the same queue; dropping it instead leaks
/// the slot (never reused: safe, but the queue has one slot fewer), so owners always
/// reattach.
#[derive(Debug)]
#[must_use = "a detached slot is only given back through RequestQueue::reattach"]
pub(crate) struct SlotId {
    slot: u16,
    submitted: bool,
    lun: [u8; 8],
    tag: u64,
}

/// Exclusive use of one slot between [`RequestQueue::acquire`] and the end of the command.
pub struct SlotGuard<'q> {
    queue: &'q RequestQueue,
    slot: u16,
    submitted: bool,
    /// The LUN field and tag of the command in this slot (for task management).
    pub lun: [u8; 8],
    /// See `lun`.
    pub tag: u64,
}

impl RequestQueue {
    /// Creates the queue's ring (which also programs it into the device through `transport`)
    /// and `slots` request slots with `data_cap` data bytes each, all inside `arena`.
    pub fn new(
        transport: &mut crate::transport::PciTransport,
        arena: &DmaArena,
        index: u16,
        cdb_size: usize,
        sense_size: usize,
        data_cap: usize,
    ) -> Result<Self, String> {
        let _scope = arena.scope();
        let vq = VirtQueue::<ShmHal, QUEUE_SIZE>::new(transport, index, false, false)
            .map_err(|e| format!("virtqueue {index}: {e}"))?;
        let notifier = transport
            .notifier(index)
            .ok_or_else(|| format!("virtqueue {index}: no notify address"))?;
        let used_ids = UsedIds::new(transport, arena, index, QUEUE_SIZE)?;
        let nslots = QUEUE_SIZE / DESC_PER_CMD;
        let req_len = REQ_HEADER_LEN + cdb_size;
        let resp_len = RESP_HEADER_LEN + sense_size;
        if req_len > RESP_OFFSET || RESP_OFFSET + resp_len > DATA_OFFSET {
            return Err(format!(
                "cdb_size {cdb_size} / sense_size {sense_size} too large"
            ));
        }
        let mut mem = Vec::with_capacity(nslots);
        for _ in 0..nslots {
            let m = arena
                .alloc(DATA_OFFSET + data_cap)
                .ok_or_else(|| format!("virtqueue {index}: out of DMA memory for slots"))?;
            mem.push(SlotMem { mem: m });
        }
        Ok(RequestQueue {
            index,
            notifier,
            inner: Mutex::new(QueueInner {
                vq,
                used_ids,
                free: (0..nslots as u16).rev().collect(),
                chains: [None; QUEUE_SIZE],
                broken: None,
                awaiting_reset: false,
            }),
            slot_freed: Condvar::new(),
            slots: (0..nslots)
                .map(|_| SlotSync {
                    state: Mutex::new(SlotCell {
                        state: SlotState::Free,
                        waker: None,
                    }),
                    done: Condvar::new(),
                })
                .collect(),
            mem,
            req_len,
            resp_len,
            data_cap,
            in_flight: AtomicUsize::new(0),
            stats: QueueStats::default(),
        })
    }

    /// Virtqueue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Bytes of data one command can carry.
    pub fn data_cap(&self) -> usize {
        self.data_cap
    }

    /// Number of slots (commands in flight at most).
    pub fn depth(&self) -> usize {
        self.slots.len()
    }

    fn lock(&self) -> MutexGuard<'_, QueueInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot_state(&self, slot: u16) -> MutexGuard<'_, SlotCell> {
        self.slots[usize::from(slot)]
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Answers the command in `slot` (whose cell `st` is locked, state `InFlight`): records
    /// `result` and wakes the owner (its waker, else the condvar; see the module rules).
    fn answer(&self, slot: u16, st: &mut SlotCell, result: Result<u32, QueueError>) {
        st.state = SlotState::Done(result);
        match st.waker.take() {
            Some(w) => w.wake(),
            None => self.slots[usize::from(slot)].done.notify_all(),
        }
    }

    /// Turns a detached slot back into its guard.
    pub(crate) fn reattach(&self, id: SlotId) -> SlotGuard<'_> {
        SlotGuard {
            queue: self,
            slot: id.slot,
            submitted: id.submitted,
            lun: id.lun,
            tag: id.tag,
        }
    }

    fn broken_error(&self, reason: &str) -> QueueError {
        QueueError::Broken {
            queue: self.index,
            reason: reason.to_string(),
        }
    }

    /// Takes a free slot, waiting while all are in use.
    pub fn acquire(&self) -> Result<SlotGuard<'_>, QueueError> {
        let mut inner = self.lock();
        let reset_deadline = Instant::now() + RESET_WAIT;
        loop {
            if inner.broken.is_some() && inner.awaiting_reset {
                // The reset that restores the queue is on its way: wait for it (bounded).
                let now = Instant::now();
                if now < reset_deadline {
                    inner = self
                        .slot_freed
                        .wait_timeout(inner, reset_deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    continue;
                }
            }
            if let Some(reason) = &inner.broken {
                return Err(self.broken_error(reason));
            }
            if let Some(slot) = inner.free.pop() {
                self.slot_state(slot).state = SlotState::Owned;
                return Ok(SlotGuard {
                    queue: self,
                    slot,
                    submitted: false,
                    lun: [0; 8],
                    tag: 0,
                });
            }
            inner = self
                .slot_freed
                .wait(inner)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Takes a free slot if one is available now.
    pub fn try_acquire(&self) -> Result<Option<SlotGuard<'_>>, QueueError> {
        let mut inner = self.lock();
        if let Some(reason) = &inner.broken {
            return Err(self.broken_error(reason));
        }
        Ok(inner.free.pop().map(|slot| {
            self.slot_state(slot).state = SlotState::Owned;
            SlotGuard {
                queue: self,
                slot,
                submitted: false,
                lun: [0; 8],
                tag: 0,
            }
        }))
    }

    fn ptr(&self, slot: u16, offset: usize) -> NonNull<u8> {
        let base = self.mem[usize::from(slot)].mem.cpu_ptr();
        // SAFETY: offsets used are inside the slot's allocation (checked in `new`).
        unsafe { base.add(offset) }
    }

    /// Rebuilds the buffer lists of a chain (no allocation: fixed arrays plus counts). The
    /// slices point into DMA memory.
    ///
    /// # Safety
    /// The chain's slot must not be accessed by anyone else while the slices live (true for a
    /// chain being added under the queue lock by its owner, or popped after the device
    /// returned it), and the caller picks a lifetime `'a` no longer than that.
    unsafe fn buffers<'a>(&self, c: &Chain) -> ChainBuffers<'a> {
        // SAFETY: each range lies inside the slot's DMA allocation (request header at 0,
        // response at RESP_OFFSET, data at DATA_OFFSET with data_len <= data_cap), the ranges do
        // not overlap, and by the caller's contract nothing else accesses them meanwhile.
        unsafe {
            let req = std::slice::from_raw_parts(self.ptr(c.slot, 0).as_ptr(), c.req_len);
            let resp =
                std::slice::from_raw_parts_mut(self.ptr(c.slot, RESP_OFFSET).as_ptr(), c.resp_len);
            let data_ptr = c.data_ptr;
            let mut b = ChainBuffers {
                inputs: [req, &[]],
                n_in: 1,
                outputs: [resp, &mut []],
                n_out: 1,
            };
            match c.dir {
                DataDir::Out if c.data_len > 0 => {
                    b.inputs[1] = std::slice::from_raw_parts(data_ptr, c.data_len);
                    b.n_in = 2;
                }
                DataDir::In if c.data_len > 0 => {
                    b.outputs[1] = std::slice::from_raw_parts_mut(data_ptr, c.data_len);
                    b.n_out = 2;
                }
                _ => {}
            }
            b
        }
    }

    /// Pops every used chain, hands each result to its slot, and returns how many were popped.
    /// A used entry that does not match a chain in flight breaks the queue: its commands fail
    /// and it takes no more (the device is not trustworthy any more; a reset is the way back).
    pub fn drain(&self) -> usize {
        let mut popped = 0;
        let mut inner = self.lock();
        while let Some(token) = inner.vq.peek_used() {
            let chain = (usize::from(token) < QUEUE_SIZE && inner.used_ids.matches(token))
                .then(|| inner.chains[usize::from(token)])
                .flatten();
            let Some(chain) = chain else {
                let reason = format!(
                    "device returned unknown descriptor id {:#x}",
                    inner.used_ids.next_id()
                );
                log::error!("queue {}: {reason}", self.index);
                // Its commands stay in flight until the device reset that this triggers (the
                // device may still be using their buffers); `reinit` then fails them.
                self.break_locked(&mut inner, reason, false);
                break;
            };
            let popped_len = {
                // SAFETY: the device returned this chain (it is in the used ring), so it no
                // longer touches the buffers, and the owner is waiting, not accessing them.
                let mut b = unsafe { self.buffers(&chain) };
                // SAFETY: these are exactly the buffers that were added with this token.
                unsafe {
                    inner
                        .vq
                        .pop_used(token, &b.inputs[..b.n_in], &mut b.outputs[..b.n_out])
                }
            };
            inner.chains[usize::from(token)] = None;
            inner.used_ids.advance();
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            popped += 1;
            // The spec's used length counts bytes written into device-writable buffers, but
            // QEMU (hw/scsi/virtio-scsi.c) reports response + data size in both directions, so
            // the bound is the response plus the data buffer whatever its direction. Data
            // amounts come from the response's residual, never from this length.
            let capacity = chain.resp_len + chain.data_len;
            let result = match popped_len {
                Ok(len) if (len as usize) <= capacity => Ok(len),
                Ok(len) => Err(QueueError::BadUsedLength {
                    used: len,
                    capacity,
                }),
                Err(e) => Err(self.broken_error(&format!("pop_used: {e}"))),
            };
            self.finish_locked(&mut inner, chain.slot, result);
        }
        drop(inner);
        if popped > 0 {
            self.stats
                .completed
                .fetch_add(popped as u64, std::sync::atomic::Ordering::Relaxed);
        }
        popped
    }

    /// Records the result of `slot`'s command, waking its owner or freeing an orphan.
    fn finish_locked(&self, inner: &mut QueueInner, slot: u16, result: Result<u32, QueueError>) {
        let mut st = self.slot_state(slot);
        match st.state {
            SlotState::Orphaned => {
                st.state = SlotState::Free;
                st.waker = None;
                inner.free.push(slot);
                self.slot_freed.notify_one();
            }
            SlotState::InFlight => self.answer(slot, &mut st, result),
            // Already answered (a broken queue failed it): exactly once.
            SlotState::Done(_) | SlotState::Owned | SlotState::Free => {}
        }
    }

    /// Takes the queue out of service; with `fail_in_flight`, also answers every command in
    /// flight with an error (their slots stay reserved until the device returns them or is
    /// reset: it might still write into them).
    fn break_locked(&self, inner: &mut QueueInner, reason: String, fail_in_flight: bool) {
        if inner.broken.is_none() {
            inner.broken = Some(reason.clone());
        }
        // Broken by the device: a reset follows. Failed for good (machine gone, shut down):
        // nothing follows, and waiters must give up now.
        inner.awaiting_reset = !fail_in_flight;
        if !fail_in_flight {
            self.slot_freed.notify_all();
            return;
        }
        for c in inner.chains.iter().flatten() {
            let mut st = self.slot_state(c.slot);
            if matches!(st.state, SlotState::InFlight) {
                self.answer(c.slot, &mut st, Err(self.broken_error(&reason)));
            }
        }
        self.slot_freed.notify_all();
    }

    /// After a device reset (the device dropped every command and forgot the ring): fails each
    /// command in flight exactly once, frees the slots of commands nobody waits for any more,
    /// and programs a fresh ring into the device. Commands submitted later use the new ring.
    pub fn reinit(
        &self,
        transport: &mut crate::transport::PciTransport,
        arena: &DmaArena,
        reason: &str,
    ) -> Result<(), String> {
        let mut inner = self.lock();
        let mut slots = [0u16; QUEUE_SIZE];
        let mut n = 0;
        for chain in inner.chains.iter_mut() {
            if let Some(c) = chain.take() {
                slots[n] = c.slot;
                n += 1;
            }
        }
        self.in_flight.store(0, Ordering::Relaxed);
        for &slot in &slots[..n] {
            let dropped = QueueError::Reset {
                queue: self.index,
                reason: reason.to_string(),
            };
            self.finish_locked(&mut inner, slot, Err(dropped));
        }
        let _scope = arena.scope();
        inner.vq = VirtQueue::<ShmHal, QUEUE_SIZE>::new(transport, self.index, false, false)
            .map_err(|e| format!("virtqueue {}: {e}", self.index))?;
        inner.used_ids = UsedIds::new(transport, arena, self.index, QUEUE_SIZE)?;
        inner.broken = None;
        inner.awaiting_reset = false;
        self.slot_freed.notify_all();
        Ok(())
    }

    /// Chains the device holds now (a hint: it may change right after the call).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Turns the device's used-buffer notifications (interrupts) for this queue on or off
    /// (virtio 1.2 §2.7.10: VIRTQ_AVAIL_F_NO_INTERRUPT, a hint the device may ignore). Off
    /// while the completion thread busy-polls; whoever turns them back on must drain once more
    /// afterwards, since a completion in between raised none.
    pub fn set_interrupts(&self, on: bool) {
        self.lock().vq.set_dev_notify(on);
    }

    /// Whether the queue was taken out of service.
    pub fn is_broken(&self) -> bool {
        self.lock().broken.is_some()
    }

    /// Takes the queue out of service and fails every command in flight at once (the machine
    /// died or the host shuts down: nothing will touch their buffers any more).
    pub fn fail_all(&self, reason: &str) {
        let mut inner = self.lock();
        self.break_locked(&mut inner, reason.to_string(), true);
    }
}

impl SlotGuard<'_> {
    /// The request header area (`REQ_HEADER_LEN + cdb_size` bytes) and the data buffer
    /// (`data_cap` bytes) of this slot, for filling before submission.
    pub fn buffers_mut(&mut self) -> (&mut [u8], &mut [u8]) {
        let q = self.queue;
        // SAFETY: the slot is Owned by this guard and not submitted, so neither the device (it
        // has no descriptor for it) nor another thread accesses it; the ranges are inside the
        // slot's allocation and disjoint; the borrow of `self` keeps them unique.
        unsafe {
            (
                std::slice::from_raw_parts_mut(q.ptr(self.slot, 0).as_ptr(), q.req_len),
                std::slice::from_raw_parts_mut(q.ptr(self.slot, DATA_OFFSET).as_ptr(), q.data_cap),
            )
        }
    }

    /// Puts the command on the ring and notifies the device if it wants notifications.
    /// `data_len` bytes of the data buffer go in direction `dir`.
    pub fn submit(&mut self, dir: DataDir, data_len: usize) -> Result<(), QueueError> {
        let q = self.queue;
        let data_len = if dir == DataDir::None {
            0
        } else {
            data_len.min(q.data_cap)
        };
        let data_ptr = q.ptr(self.slot, DATA_OFFSET).as_ptr();
        self.submit_chain(dir, data_ptr, data_len)
    }

    /// Like [`SlotGuard::submit`], but the data buffer is the caller's `data` (zero-copy): the
    /// device reads or writes it directly.
    ///
    /// # Safety
    /// `data` must lie inside a DMA window registered with [`crate::hal::DmaArena`], and must
    /// stay valid and unaccessed by this process until [`SlotGuard::wait`] returned a result
    /// (if the guard is dropped before, the device may still write it later: the caller must
    /// then keep the memory alive and not reuse it until the queue returns the chain).
    pub unsafe fn submit_external(
        &mut self,
        dir: DataDir,
        data: &mut [u8],
    ) -> Result<(), QueueError> {
        let len = if dir == DataDir::None { 0 } else { data.len() };
        self.submit_chain(dir, data.as_mut_ptr(), len)
    }

    fn submit_chain(
        &mut self,
        dir: DataDir,
        data_ptr: *mut u8,
        data_len: usize,
    ) -> Result<(), QueueError> {
        let q = self.queue;
        let chain = Chain {
            slot: self.slot,
            req_len: q.req_len,
            resp_len: q.resp_len,
            data_ptr,
            data_len,
            dir,
        };
        let notify = {
            let mut inner = q.lock();
            if let Some(reason) = &inner.broken {
                return Err(q.broken_error(reason));
            }
            let token = {
                // SAFETY: the slot is owned by this guard; the slices live only during `add`.
                let mut b = unsafe { q.buffers(&chain) };
                // SAFETY: the buffers are DMA memory that stays valid and untouched by us until
                // the chain is popped (`drain`), the only place that frees the slot again.
                unsafe { inner.vq.add(&b.inputs[..b.n_in], &mut b.outputs[..b.n_out]) }
            }
            .map_err(|e| q.broken_error(&format!("add: {e}")))?;
            match inner.chains.get_mut(usize::from(token)) {
                Some(entry) => *entry = Some(chain),
                None => return Err(q.broken_error("virtqueue returned a bad token")),
            }
            q.in_flight.fetch_add(1, Ordering::Relaxed);
            q.slot_state(self.slot).state = SlotState::InFlight;
            self.submitted = true;
            inner.vq.should_notify()
        };
        q.stats
            .submitted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if notify {
            q.stats
                .kicks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Err(e) = q.notifier.notify() {
                q.fail_all(&e.to_string());
                return Err(q.broken_error(&e.to_string()));
            }
        }
        Ok(())
    }

    /// Waits for the submitted command; returns the used length. After `Err(Timeout)` the slot
    /// stays reserved until the device returns it.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<u32, QueueError> {
        let q = self.queue;
        let sync = &q.slots[usize::from(self.slot)];
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = q.slot_state(self.slot);
        // A blocking owner is woken through the condvar: no waker may take its signal.
        st.waker = None;
        loop {
            if let Some(result) = self.take_done(&mut st) {
                return result;
            }
            match deadline {
                None => st = sync.done.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(QueueError::Timeout(timeout.unwrap_or_default()));
                    }
                    st = sync
                        .done
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// The result of the command if it was answered (the slot is then owned again and can be
    /// read with [`SlotGuard::response`]).
    fn take_done(&mut self, st: &mut SlotCell) -> Option<Result<u32, QueueError>> {
        if !matches!(st.state, SlotState::Done(_)) {
            return None;
        }
        match std::mem::replace(&mut st.state, SlotState::Owned) {
            SlotState::Done(result) => {
                self.submitted = false;
                Some(result)
            }
            other => {
                st.state = other;
                None
            }
        }
    }

    /// Installs (or with `None` removes) the waker told when this slot's command is answered.
    /// Install it before [`SlotGuard::submit_external`]/[`SlotGuard::submit`], so no answer
    /// can come before it.
    pub fn set_waker(&mut self, waker: Option<Arc<dyn CompletionWaker>>) {
        self.queue.slot_state(self.slot).waker = waker;
    }

    /// The submitted command's result if it was answered, without waiting (`None`: still with
    /// the device). Like [`SlotGuard::wait`], a result is returned once.
    pub fn try_result(&mut self) -> Option<Result<u32, QueueError>> {
        let q = self.queue;
        let mut st = q.slot_state(self.slot);
        self.take_done(&mut st)
    }

    /// Takes the guard apart (see [`SlotId`]); the slot stays in its state.
    pub(crate) fn detach(self) -> SlotId {
        let id = SlotId {
            slot: self.slot,
            submitted: self.submitted,
            lun: self.lun,
            tag: self.tag,
        };
        // Not dropped: the slot is not freed or orphaned; `reattach` gives it a guard again.
        std::mem::forget(self);
        id
    }

    /// The response area and data buffer after completion.
    pub fn response(&self) -> (&[u8], &[u8]) {
        let q = self.queue;
        // SAFETY: the command completed (or was never submitted): the device no longer
        // accesses the slot and the guard owns it.
        unsafe {
            (
                std::slice::from_raw_parts(q.ptr(self.slot, RESP_OFFSET).as_ptr(), q.resp_len),
                std::slice::from_raw_parts(q.ptr(self.slot, DATA_OFFSET).as_ptr(), q.data_cap),
            )
        }
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let q = self.queue;
        let mut inner = q.lock();
        let mut st = q.slot_state(self.slot);
        // Nobody polls for this slot any more.
        st.waker = None;
        match st.state {
            // Still with the device: it frees the slot when it comes back.
            SlotState::InFlight => st.state = SlotState::Orphaned,
            _ => {
                st.state = SlotState::Free;
                inner.free.push(self.slot);
                q.slot_freed.notify_one();
            }
        }
    }
}
