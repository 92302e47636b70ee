//! The event queue: hotplug (TRANSPORT_RESET with RESCAN or REMOVED), parameter changes
//! (e.g. CAPACITY DATA HAS CHANGED) and "events missed".
//!
//! Buffers stay posted: every delivered event is copied out and its buffer goes straight back
//! on the ring. The completion thread only pops (`drain`); acting on an event (probing a LUN
//! sends commands, which need the completion thread) happens on the host's event thread.
//! Event contents come from the device and are untrusted: every field is range-checked and an
//! event that makes no sense is logged and dropped.

use virtio_drivers::queue::VirtQueue;

use crate::hal::{DmaArena, DmaPages, ShmHal};
use crate::transport::{Notifier, PciTransport};

/// Descriptors of the event queue.
pub const EVENT_QUEUE_SIZE: usize = 64;
/// Event buffers kept posted.
const BUFFERS: usize = 16;
/// Bytes of one buffer (the spec's event is 16 bytes; `event_info_size` may ask for more).
const BUFFER_BYTES: usize = 64;

const T_NO_EVENT: u32 = 0;
const T_TRANSPORT_RESET: u32 = 1;
const T_PARAM_CHANGE: u32 = 3;
const T_EVENTS_MISSED: u32 = 0x8000_0000;
const EVT_RESET_RESCAN: u32 = 1;
const EVT_RESET_REMOVED: u32 = 2;

/// A decoded event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A LUN appeared (or may have): probe it.
    Rescan {
        /// Target id.
        target: u8,
        /// LUN.
        lun: u16,
    },
    /// A LUN went away.
    Removed {
        /// Target id.
        target: u8,
        /// LUN.
        lun: u16,
    },
    /// A LUN's parameters changed (ASC/ASCQ say which, e.g. 2A/09 capacity).
    ParamChange {
        /// Target id.
        target: u8,
        /// LUN.
        lun: u16,
        /// Additional sense code.
        asc: u8,
        /// Its qualifier.
        ascq: u8,
    },
    /// The device dropped events: everything must be rescanned.
    Missed,
}

/// Decodes one event buffer (at least 16 bytes); `None` for NO_EVENT and nonsense.
pub fn decode(b: &[u8]) -> Option<Event> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let event = word(0)?;
    let lun = b.get(4..12)?;
    let reason = word(12)?;
    if event & T_EVENTS_MISSED != 0 {
        return Some(Event::Missed);
    }
    // The LUN field: 1, target, then the flat-space LUN (QEMU masks it with 0x3fff).
    let addr = || -> Option<(u8, u16)> {
        if lun[0] != 1 {
            return None;
        }
        let l = (u16::from(lun[2]) << 8 | u16::from(lun[3])) & 0x3fff;
        Some((lun[1], l))
    };
    match event {
        T_NO_EVENT => None,
        T_TRANSPORT_RESET => {
            let (target, lun) = addr()?;
            match reason {
                EVT_RESET_RESCAN => Some(Event::Rescan { target, lun }),
                EVT_RESET_REMOVED => Some(Event::Removed { target, lun }),
                // RESET_HARD and unknown reasons: the LUN may have changed in any way.
                _ => Some(Event::Rescan { target, lun }),
            }
        }
        T_PARAM_CHANGE => {
            let (target, lun) = addr()?;
            Some(Event::ParamChange {
                target,
                lun,
                asc: reason as u8,
                ascq: (reason >> 8) as u8,
            })
        }
        other => {
            log::debug!("ignoring virtio-scsi event {other:#x}");
            None
        }
    }
}

/// The event virtqueue with its posted buffers.
pub struct EventQueue {
    vq: VirtQueue<ShmHal, EVENT_QUEUE_SIZE>,
    used_ids: crate::queue::UsedIds,
    /// The device returned a chain we never gave it: only a reset brings the queue back.
    broken: bool,
    mem: DmaPages,
    notifier: Notifier,
    /// Buffer index of each posted chain, by token.
    posted: [Option<usize>; EVENT_QUEUE_SIZE],
}

impl EventQueue {
    /// Sets up queue 1 and posts every buffer.
    pub fn new(transport: &mut PciTransport, arena: &DmaArena) -> Result<Self, String> {
        let vq = {
            let _scope = arena.scope();
            VirtQueue::new(transport, 1, false, false).map_err(|e| format!("event queue: {e}"))?
        };
        let mem = arena
            .alloc(BUFFERS * BUFFER_BYTES)
            .ok_or("event queue: out of DMA memory")?;
        let notifier = transport
            .notifier(1)
            .ok_or("event queue: no notify address")?;
        let used_ids = crate::queue::UsedIds::new(transport, arena, 1, EVENT_QUEUE_SIZE)?;
        let mut q = EventQueue {
            vq,
            used_ids,
            broken: false,
            mem,
            notifier,
            posted: [None; EVENT_QUEUE_SIZE],
        };
        q.post_all()?;
        Ok(q)
    }

    /// A fresh ring after a device reset, with every buffer posted again.
    pub fn reinit(&mut self, transport: &mut PciTransport, arena: &DmaArena) -> Result<(), String> {
        let _scope = arena.scope();
        self.vq =
            VirtQueue::new(transport, 1, false, false).map_err(|e| format!("event queue: {e}"))?;
        self.used_ids = crate::queue::UsedIds::new(transport, arena, 1, EVENT_QUEUE_SIZE)?;
        self.broken = false;
        self.posted = [None; EVENT_QUEUE_SIZE];
        self.post_all()
    }

    /// Buffer `i`.
    ///
    /// # Safety
    /// One slice of a buffer at a time, while the caller holds the queue exclusively.
    unsafe fn buffer<'a>(&self, i: usize) -> &'a mut [u8] {
        // SAFETY: buffer `i < BUFFERS` lies inside `mem`; exclusivity by the caller's contract.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.mem.cpu_ptr().as_ptr().add(i * BUFFER_BYTES),
                BUFFER_BYTES,
            )
        }
    }

    fn post(&mut self, i: usize) -> Result<(), String> {
        // SAFETY: exclusive (`&mut self`), and buffer `i` is not posted (it was just popped or
        // never posted).
        let buf = unsafe { self.buffer(i) };
        buf.fill(0);
        // SAFETY: the buffer is DMA memory owned by this queue, not accessed by us until the
        // device returns it (`drain`).
        let token = unsafe { self.vq.add(&[], &mut [buf]) }.map_err(|e| e.to_string())?;
        match self.posted.get_mut(usize::from(token)) {
            Some(p) => *p = Some(i),
            None => return Err("bad token".into()),
        }
        Ok(())
    }

    fn post_all(&mut self) -> Result<(), String> {
        for i in 0..BUFFERS {
            self.post(i)?;
        }
        self.notifier.notify().map_err(|e| e.to_string())
    }

    /// Whether the device broke the queue (a reset restores it).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Pops every delivered event, re-posts its buffer, and returns the events.
    pub fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        let mut reposted = false;
        while !self.broken
            && let Some(token) = self.vq.peek_used()
        {
            let Some(Some(i)) = self
                .used_ids
                .matches(token)
                .then(|| self.posted.get(usize::from(token)).copied())
                .flatten()
            else {
                log::error!(
                    "event queue: device returned unknown descriptor {:#x}",
                    self.used_ids.next_id()
                );
                self.broken = true;
                break;
            };
            // SAFETY: exclusive (`&mut self`); the device returned this buffer.
            let buf = unsafe { self.buffer(i) };
            let mut copy = [0u8; 16];
            copy.copy_from_slice(&buf[..16]);
            // SAFETY: the chain with this token was added with exactly this buffer.
            let popped = unsafe { self.vq.pop_used(token, &[], &mut [buf]) };
            self.posted[usize::from(token)] = None;
            self.used_ids.advance();
            if let Ok(len) = popped
                && len as usize >= 16
                && let Some(e) = decode(&copy)
            {
                out.push(e);
            }
            if let Err(e) = self.post(i) {
                log::error!("event queue: re-posting a buffer failed: {e}");
            }
            reposted = true;
        }
        if reposted && let Err(e) = self.notifier.notify() {
            log::warn!("event queue notify: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: u32, lun: [u8; 8], reason: u32) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&event.to_le_bytes());
        b[4..12].copy_from_slice(&lun);
        b[12..16].copy_from_slice(&reason.to_le_bytes());
        b
    }

    #[test]
    fn decodes_events_and_rejects_nonsense() {
        let lun = [1, 3, 0x40, 2, 0, 0, 0, 0];
        assert_eq!(
            decode(&ev(1, lun, 1)),
            Some(Event::Rescan { target: 3, lun: 2 })
        );
        assert_eq!(
            decode(&ev(1, lun, 2)),
            Some(Event::Removed { target: 3, lun: 2 })
        );
        assert_eq!(
            decode(&ev(3, lun, 0x092a)),
            Some(Event::ParamChange {
                target: 3,
                lun: 2,
                asc: 0x2a,
                ascq: 0x09
            })
        );
        assert_eq!(decode(&ev(0x8000_0001, lun, 1)), Some(Event::Missed));
        assert_eq!(decode(&ev(0, lun, 0)), None);
        assert_eq!(decode(&ev(1, [9, 3, 0x40, 2, 0, 0, 0, 0], 1)), None);
        assert_eq!(decode(&ev(77, lun, 0)), None);
        assert_eq!(decode(&[1, 0, 0]), None);
    }
}
