//! The device side of a split virtqueue (virtio 1.2 §2.7): taking chains from the available
//! ring, walking and validating their descriptors, and putting used elements.
//!
//! The checks are those of a careful device (QEMU's `virtqueue_pop` does the same ones): a
//! descriptor index past the queue, a chain longer than the queue (a loop), a buffer outside
//! DMA memory, a device-readable buffer after a device-writable one, an indirect descriptor that
//! was not negotiated, an available index that ran ahead by more than the queue size. Each is a
//! fault of the driver and is reported as such, never dereferenced.

use std::collections::BTreeSet;

use crate::dma::{DmaFault, DmaMemory};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;

/// One virtqueue as the device sees it.
#[derive(Clone, Debug)]
pub struct DevQueue {
    /// Largest size the device accepts.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// `queue_enable`.
    pub enabled: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// MSI-X vector (stored, unused: INTx only).
    pub msix: u16,
    /// Next available-ring entry to take.
    pub last_avail: u16,
    /// Next used-ring index to publish.
    pub used_idx: u16,
    /// Heads the device took and has not returned.
    pub held: BTreeSet<u16>,
}

impl DevQueue {
    /// A queue at reset.
    pub fn new(max_size: u16) -> DevQueue {
        DevQueue {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            avail: 0,
            used: 0,
            msix: 0xffff,
            last_avail: 0,
            used_idx: 0,
            held: BTreeSet::new(),
        }
    }

    /// Checks the ring addresses and size when the driver enables the queue.
    pub fn validate(&self, dma: &DmaMemory) -> Result<(), String> {
        let n = usize::from(self.size);
        if n == 0 || !n.is_power_of_two() || self.size > self.max_size {
            return Err(format!("queue size {} (max {})", self.size, self.max_size));
        }
        if !self.desc.is_multiple_of(16)
            || !self.avail.is_multiple_of(2)
            || !self.used.is_multiple_of(4)
        {
            return Err(format!(
                "misaligned rings: desc {:#x} avail {:#x} used {:#x}",
                self.desc, self.avail, self.used
            ));
        }
        let parts = [
            (self.desc, 16 * n, "descriptor table"),
            (self.avail, 6 + 2 * n, "available ring"),
            (self.used, 6 + 8 * n, "used ring"),
        ];
        for (addr, len, what) in parts {
            if !dma.contains(addr, len) {
                return Err(format!("{what} at {addr:#x}+{len:#x} outside DMA memory"));
            }
        }
        Ok(())
    }

    /// The available ring's flags (bit 0: no interrupt wanted).
    pub fn avail_flags(&self, dma: &DmaMemory) -> Result<u16, DmaFault> {
        dma.read_u16(self.avail)
    }

    /// Takes the next available chain head, if any.
    pub fn pop_avail(&mut self, dma: &DmaMemory) -> Result<Option<u16>, String> {
        let idx = dma.load_u16_acquire(self.avail + 2).map_err(|e| e.0)?;
        let pending = idx.wrapping_sub(self.last_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(format!(
                "available index {idx} is {pending} ahead of {} (queue size {})",
                self.last_avail, self.size
            ));
        }
        let slot = u64::from(self.last_avail % self.size);
        let head = dma.read_u16(self.avail + 4 + 2 * slot).map_err(|e| e.0)?;
        if head >= self.size {
            return Err(format!("available head {head} >= queue size {}", self.size));
        }
        if !self.held.insert(head) {
            return Err(format!(
                "head {head} made available while the device holds it"
            ));
        }
        self.last_avail = self.last_avail.wrapping_add(1);
        Ok(Some(head))
    }

    /// Walks and validates the chain at `head`.
    pub fn walk(&self, dma: &DmaMemory, head: u16) -> Result<Chain, String> {
        let mut chain = Chain {
            head,
            readable: Vec::new(),
            writable: Vec::new(),
        };
        let mut i = head;
        for _ in 0..self.size {
            let at = self.desc + 16 * u64::from(i);
            let addr = dma.read_u64(at).map_err(|e| e.0)?;
            let len = dma.read_u32(at + 8).map_err(|e| e.0)?;
            let flags = dma.read_u16(at + 12).map_err(|e| e.0)?;
            let next = dma.read_u16(at + 14).map_err(|e| e.0)?;
            if flags & DESC_F_INDIRECT != 0 {
                return Err(format!("descriptor {i}: INDIRECT was not negotiated"));
            }
            if !dma.contains(addr, len as usize) {
                return Err(format!(
                    "descriptor {i}: buffer {addr:#x}+{len:#x} outside DMA memory"
                ));
            }
            if flags & DESC_F_WRITE != 0 {
                chain.writable.push((addr, len));
            } else if !chain.writable.is_empty() {
                return Err(format!(
                    "descriptor {i}: device-readable after device-writable"
                ));
            } else {
                chain.readable.push((addr, len));
            }
            if flags & DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            if next >= self.size {
                return Err(format!("descriptor {i}: next {next} >= queue size"));
            }
            i = next;
        }
        Err(format!("chain at {head} is longer than the queue (a loop)"))
    }

    /// Puts a used element and publishes the new index.
    pub fn push_used(&mut self, dma: &DmaMemory, id: u32, len: u32) -> Result<(), DmaFault> {
        let slot = u64::from(self.used_idx % self.size.max(1));
        let at = self.used + 4 + 8 * slot;
        let mut e = [0u8; 8];
        e[..4].copy_from_slice(&id.to_le_bytes());
        e[4..].copy_from_slice(&len.to_le_bytes());
        dma.write(at, &e)?;
        self.used_idx = self.used_idx.wrapping_add(1);
        dma.store_u16_release(self.used + 2, self.used_idx)?;
        if let Ok(h) = u16::try_from(id) {
            self.held.remove(&h);
        }
        Ok(())
    }

    /// Advances the published used index by `extra` without writing elements.
    pub fn jump_used(&mut self, dma: &DmaMemory, extra: u16) -> Result<(), DmaFault> {
        self.used_idx = self.used_idx.wrapping_add(extra);
        dma.store_u16_release(self.used + 2, self.used_idx)
    }
}

/// A validated descriptor chain: device-readable buffers, then device-writable ones.
#[derive(Clone, Debug)]
pub struct Chain {
    /// Head descriptor index.
    pub head: u16,
    /// (address, length) of each device-readable buffer, in order.
    pub readable: Vec<(u64, u32)>,
    /// (address, length) of each device-writable buffer, in order.
    pub writable: Vec<(u64, u32)>,
}

impl Chain {
    /// Total device-readable bytes.
    pub fn readable_len(&self) -> usize {
        self.readable.iter().map(|&(_, l)| l as usize).sum()
    }

    /// Total device-writable bytes.
    pub fn writable_len(&self) -> usize {
        self.writable.iter().map(|&(_, l)| l as usize).sum()
    }

    /// All device-readable bytes, concatenated.
    pub fn gather(&self, dma: &DmaMemory) -> Result<Vec<u8>, DmaFault> {
        let mut v = vec![0u8; self.readable_len()];
        let mut at = 0;
        for &(addr, len) in &self.readable {
            let len = len as usize;
            dma.read(addr, &mut v[at..at + len])?;
            at += len;
        }
        Ok(v)
    }

    /// Writes `data` at logical offset `offset` of the device-writable buffers (clipped to
    /// them); returns the bytes written.
    pub fn scatter(&self, dma: &DmaMemory, offset: usize, data: &[u8]) -> Result<usize, DmaFault> {
        let mut skip = offset;
        let mut src = data;
        let mut written = 0;
        for &(addr, len) in &self.writable {
            let len = len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(src.len());
            dma.write(addr + skip as u64, &src[..n])?;
            written += n;
            src = &src[n..];
            skip = 0;
            if src.is_empty() {
                break;
            }
        }
        Ok(written)
    }
}
