//! The control queue: task management functions (ABORT TASK, LOGICAL UNIT RESET, I_T NEXUS
//! RESET) used to recover commands that time out.
//!
//! One TMF at a time (the queue is behind the host's `control` mutex). The caller waits for
//! the answer on the host's interrupt epoch: the completion thread bumps it after every
//! interrupt, and the caller checks the control ring itself, so the completion thread never
//! touches this queue. Each TMF uses its own buffer (round robin over `BUFFERS`), so the late
//! answer of a TMF that timed out never lands in the buffer of a newer one.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use virtio_drivers::queue::VirtQueue;

use crate::hal::{DmaArena, DmaPages, ShmHal};
use crate::transport::{Notifier, PciTransport};

/// Descriptors of the control queue.
pub const CONTROL_QUEUE_SIZE: usize = 64;
/// TMF buffers in rotation.
const BUFFERS: usize = 16;
/// Bytes per TMF buffer: request (24 bytes) at 0, response (1 byte) at 64.
const BUFFER_BYTES: usize = 128;
const RESP_AT: usize = 64;

/// `type` of a task management request.
const T_TMF: u32 = 0;

/// TMF subtypes (virtio 1.2 §5.6.6.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Tmf {
    /// Abort one task (by tag).
    AbortTask = 0,
    /// Reset the logical unit.
    LogicalUnitReset = 5,
    /// Reset the I_T nexus (all LUNs of the target, for this initiator).
    ITNexusReset = 4,
}

/// TMF response codes that mean the function was carried out.
pub fn tmf_succeeded(response: u8) -> bool {
    // FUNCTION_COMPLETE (0) and FUNCTION_SUCCEEDED (10).
    matches!(response, 0 | 10)
}

/// Wakes TMF callers after each interrupt.
#[derive(Default)]
pub struct Epoch {
    count: Mutex<u64>,
    cv: Condvar,
}

impl Epoch {
    /// Called by the completion thread after every wake-up.
    pub fn bump(&self) {
        let mut c = self.count.lock().unwrap_or_else(|p| p.into_inner());
        *c = c.wrapping_add(1);
        self.cv.notify_all();
    }

    fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        let c = self.count.lock().unwrap_or_else(|p| p.into_inner());
        if *c != seen {
            return *c;
        }
        *self
            .cv
            .wait_timeout(c, timeout)
            .unwrap_or_else(|p| p.into_inner())
            .0
    }

    fn now(&self) -> u64 {
        *self.count.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The control virtqueue and its TMF buffers.
pub struct ControlQueue {
    vq: VirtQueue<ShmHal, CONTROL_QUEUE_SIZE>,
    used_ids: crate::queue::UsedIds,
    /// The device returned a chain we never gave it: only a reset brings the queue back.
    broken: bool,
    mem: DmaPages,
    notifier: Notifier,
    /// Buffer index of each chain in flight, by token.
    pending: [Option<usize>; CONTROL_QUEUE_SIZE],
    next: usize,
}

impl ControlQueue {
    /// Sets up queue 0.
    pub fn new(transport: &mut PciTransport, arena: &DmaArena) -> Result<Self, String> {
        let vq = {
            let _scope = arena.scope();
            VirtQueue::new(transport, 0, false, false).map_err(|e| format!("control queue: {e}"))?
        };
        let mem = arena
            .alloc(BUFFERS * BUFFER_BYTES)
            .ok_or("control queue: out of DMA memory")?;
        let notifier = transport
            .notifier(0)
            .ok_or("control queue: no notify address")?;
        let used_ids = crate::queue::UsedIds::new(transport, arena, 0, CONTROL_QUEUE_SIZE)?;
        Ok(ControlQueue {
            vq,
            used_ids,
            broken: false,
            mem,
            notifier,
            pending: [None; CONTROL_QUEUE_SIZE],
            next: 0,
        })
    }

    /// A fresh ring after a device reset (the device forgot the old one).
    pub fn reinit(&mut self, transport: &mut PciTransport, arena: &DmaArena) -> Result<(), String> {
        let _scope = arena.scope();
        self.vq = VirtQueue::new(transport, 0, false, false)
            .map_err(|e| format!("control queue: {e}"))?;
        self.used_ids = crate::queue::UsedIds::new(transport, arena, 0, CONTROL_QUEUE_SIZE)?;
        self.broken = false;
        self.pending = [None; CONTROL_QUEUE_SIZE];
        Ok(())
    }

    /// Whether the device broke the queue (a reset restores it).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Buffer `i`: (request, response).
    ///
    /// # Safety
    /// Only one pair of slices of a buffer may be alive at a time, and only while the caller
    /// holds this queue exclusively (`&mut self` methods call it).
    unsafe fn buffer<'a>(&self, i: usize) -> (&'a mut [u8], &'a mut [u8]) {
        let base = self.mem.cpu_ptr().as_ptr();
        // SAFETY: buffer `i < BUFFERS` lies inside `mem`; its request and response parts do
        // not overlap; by the caller's contract no other slice of it is alive.
        unsafe {
            (
                std::slice::from_raw_parts_mut(base.add(i * BUFFER_BYTES), 24),
                std::slice::from_raw_parts_mut(base.add(i * BUFFER_BYTES + RESP_AT), 1),
            )
        }
    }

    /// Pops every answered chain; returns the response of buffer `want` if it was among them.
    fn reap(&mut self, want: usize) -> Option<u8> {
        let mut got = None;
        while let Some(token) = self.vq.peek_used() {
            let Some(Some(i)) = self
                .used_ids
                .matches(token)
                .then(|| self.pending.get(usize::from(token)).copied())
                .flatten()
            else {
                log::error!(
                    "control queue: device returned unknown descriptor {:#x}",
                    self.used_ids.next_id()
                );
                self.broken = true;
                return got;
            };
            // SAFETY: exclusive access (`&mut self`); these slices end with this iteration.
            let (req, resp) = unsafe { self.buffer(i) };
            // SAFETY: the chain with this token was added with exactly these two buffers.
            let popped = unsafe { self.vq.pop_used(token, &[req], &mut [&mut resp[..]]) };
            self.pending[usize::from(token)] = None;
            self.used_ids.advance();
            if popped.is_ok() && i == want {
                got = Some(resp[0]);
            }
        }
        got
    }

    /// Sends a TMF for `lun` (and the task `tag`, for ABORT TASK) and waits up to `timeout`
    /// for the device's answer: `Some(response code)`, or `None` if it did not answer.
    pub fn tmf(
        &mut self,
        epoch: &Epoch,
        tmf: Tmf,
        lun: &[u8; 8],
        tag: u64,
        timeout: Duration,
    ) -> Option<u8> {
        if self.broken {
            return None;
        }
        let i = self.next;
        self.next = (self.next + 1) % BUFFERS;
        // SAFETY: exclusive access (`&mut self`); buffer `i`'s previous chain, if any, was
        // popped or belongs to a TMF that timed out BUFFERS calls ago (the rotation).
        let (req, resp) = unsafe { self.buffer(i) };
        req[0..4].copy_from_slice(&T_TMF.to_le_bytes());
        req[4..8].copy_from_slice(&(tmf as u32).to_le_bytes());
        req[8..16].copy_from_slice(lun);
        req[16..24].copy_from_slice(&tag.to_le_bytes());
        resp[0] = 0xff;
        // SAFETY: the buffers are DMA memory owned by this queue and not reused for another
        // chain until this one is popped (rotation over BUFFERS, and `pending` records it).
        let token = match unsafe { self.vq.add(&[req], &mut [resp]) } {
            Ok(t) => t,
            Err(e) => {
                log::error!("control queue: {e}");
                return None;
            }
        };
        if let Some(p) = self.pending.get_mut(usize::from(token)) {
            *p = Some(i);
        }
        if self.vq.should_notify()
            && let Err(e) = self.notifier.notify()
        {
            log::error!("control queue notify: {e}");
            return None;
        }
        let deadline = Instant::now() + timeout;
        let mut seen = epoch.now();
        loop {
            if let Some(r) = self.reap(i) {
                return Some(r);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            seen = epoch.wait(seen, (deadline - now).min(Duration::from_millis(50)));
        }
    }
}
