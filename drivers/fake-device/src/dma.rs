//! The fake machine's device-visible memory: one page-aligned heap block that the driver sees
//! through `Platform::dma_window` and the device reaches by bus address.
//!
//! Every device access is bounds-checked against the window (an out-of-window address is what
//! an IOMMU would refuse: it is reported as a fault of the driver, never dereferenced). The
//! driver writes the same bytes concurrently through its own pointers, as with real DMA, so the
//! device side uses raw-pointer copies and atomics only, never references.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use platform::DmaWindow;

/// Page size of the window's alignment.
pub const PAGE: usize = 4096;

/// A device access outside the window or misaligned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmaFault(pub String);

/// The DMA memory block.
pub struct DmaMemory {
    ptr: NonNull<u8>,
    len: usize,
    base: u64,
    layout: Layout,
}

// SAFETY: the block is owned by this value until drop; all accesses go through raw pointers
// (copies and atomics), and concurrent access by the driver is the DMA contract itself.
unsafe impl Send for DmaMemory {}
// SAFETY: as above; `&DmaMemory` only allows raw-pointer accesses that do not create references.
unsafe impl Sync for DmaMemory {}

impl DmaMemory {
    /// Allocates `len` bytes (rounded up to pages, at least one), zeroed, visible to the device
    /// at bus address `base` (rounded down to a page).
    pub fn new(len: usize, base: u64) -> Result<Self, String> {
        let len = len.max(PAGE).div_ceil(PAGE) * PAGE;
        let layout = Layout::from_size_align(len, PAGE).map_err(|e| e.to_string())?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| format!("cannot allocate {len} DMA bytes"))?;
        Ok(DmaMemory {
            ptr,
            len,
            base: base & !(PAGE as u64 - 1),
            layout,
        })
    }

    /// The window as the platform hands it to the driver.
    pub fn window(&self) -> DmaWindow {
        DmaWindow {
            device_addr: self.base,
            cpu_ptr: self.ptr,
            len: self.len,
        }
    }

    /// Offset of `[addr, addr + len)` in the block, if it lies inside.
    fn offset(&self, addr: u64, len: usize) -> Result<usize, DmaFault> {
        let off = addr
            .checked_sub(self.base)
            .and_then(|o| usize::try_from(o).ok());
        match off {
            Some(off) if off.checked_add(len).is_some_and(|end| end <= self.len) => Ok(off),
            _ => Err(DmaFault(format!(
                "DMA access of {len} bytes at {addr:#x} outside the window {:#x}+{:#x}",
                self.base, self.len
            ))),
        }
    }

    /// Copies device memory at `addr` into `out`.
    pub fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), DmaFault> {
        let off = self.offset(addr, out.len())?;
        // SAFETY: `off + out.len() <= self.len` (checked), the block is live, and `out` is a
        // distinct Rust buffer, so the ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    /// Copies `data` into device memory at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaFault> {
        let off = self.offset(addr, data.len())?;
        // SAFETY: bounds checked as in `read`; `data` is a distinct Rust buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(off), data.len())
        };
        Ok(())
    }

    /// Little-endian u16 at `addr` (plain copy).
    pub fn read_u16(&self, addr: u64) -> Result<u16, DmaFault> {
        let mut b = [0u8; 2];
        self.read(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Little-endian u32 at `addr` (plain copy).
    pub fn read_u32(&self, addr: u64) -> Result<u32, DmaFault> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Little-endian u64 at `addr` (plain copy).
    pub fn read_u64(&self, addr: u64) -> Result<u64, DmaFault> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn atomic_u16(&self, addr: u64) -> Result<&AtomicU16, DmaFault> {
        if !addr.is_multiple_of(2) {
            return Err(DmaFault(format!("misaligned ring index at {addr:#x}")));
        }
        let off = self.offset(addr, 2)?;
        // SAFETY: in bounds (checked) and 2-aligned (the block is page-aligned and `addr` even);
        // the memory lives as long as `self`, which bounds the returned reference; the driver
        // accesses ring index fields atomically too.
        Ok(unsafe { AtomicU16::from_ptr(self.ptr.as_ptr().add(off).cast::<u16>()) })
    }

    /// A ring index field, with acquire ordering (pairs with the driver's release store).
    pub fn load_u16_acquire(&self, addr: u64) -> Result<u16, DmaFault> {
        Ok(self.atomic_u16(addr)?.load(Ordering::Acquire))
    }

    /// Publishes a ring index field, with release ordering (the ring entries written before
    /// become visible first).
    pub fn store_u16_release(&self, addr: u64, v: u16) -> Result<(), DmaFault> {
        self.atomic_u16(addr)?.store(v, Ordering::Release);
        Ok(())
    }

    /// Whether `[addr, addr + len)` lies in the window.
    pub fn contains(&self, addr: u64, len: usize) -> bool {
        self.offset(addr, len).is_ok()
    }
}

impl Drop for DmaMemory {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout and not freed before.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}
