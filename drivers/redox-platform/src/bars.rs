//! The BAR window: how the Redox backend lets the driver "assign" its device's memory BARs
//! without moving them.
//!
//! The driver (`virtio-scsi`'s `PciTransport::probe`) sizes each BAR and places it in the
//! platform's MMIO window, as on bare hardware. On Redox the firmware and `pcid` have already
//! placed the BARs, and other software may rely on where they are, so the backend never writes
//! the real BAR registers: it answers the driver's config accesses to the six BAR registers
//! from a shadow that behaves like real BARs (size masks, type bits, 64-bit pairs), and
//! translates MMIO addresses inside the driver's chosen BAR addresses to offsets in the real
//! BARs, which are mapped into the process. Everything here is plain arithmetic, unit-tested
//! on any host.

/// What the hardware has in one BAR (decoded once, at start-up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RealBar {
    /// Physical address the firmware assigned.
    pub phys: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// An I/O-space BAR (bit 0 set) rather than memory.
    pub io: bool,
    /// A 64-bit memory BAR (it also occupies the next register).
    pub wide: bool,
    /// The read-only low bits of the register (type and prefetchable flags).
    pub flags: u32,
}

/// Decodes the raw BAR registers of a function and their sizing masks (what each register
/// reads back after all-ones was written to it) into the real BARs. Index `i` holds BAR `i`;
/// the upper half of a 64-bit BAR is `None`.
pub fn decode(raw: [u32; 6], masks: [u32; 6]) -> [Option<RealBar>; 6] {
    let mut out = [None; 6];
    let mut i = 0;
    while i < 6 {
        let (r, m) = (raw[i], masks[i]);
        if r & 1 == 1 {
            let size_mask = m & !0x3;
            if size_mask != 0 {
                let size = u64::from((!size_mask & 0xFFFF).wrapping_add(1));
                out[i] = Some(RealBar {
                    phys: u64::from(r & !0x3),
                    size,
                    io: true,
                    wide: false,
                    flags: r & 0x3,
                });
            }
            i += 1;
            continue;
        }
        let wide = (r >> 1) & 0x3 == 0x2 && i < 5;
        let (phys, size_mask) = if wide {
            let phys = u64::from(r & !0xF) | (u64::from(raw[i + 1]) << 32);
            let mask = u64::from(m & !0xF) | (u64::from(masks[i + 1]) << 32);
            (phys, mask)
        } else {
            (
                u64::from(r & !0xF),
                u64::from(m & !0xF) | 0xFFFF_FFFF_0000_0000,
            )
        };
        if size_mask & 0xFFFF_FFFF != 0 || (wide && size_mask != 0) {
            let size = (!size_mask).wrapping_add(1);
            if size != 0 {
                out[i] = Some(RealBar {
                    phys,
                    size,
                    io: false,
                    wide,
                    flags: r & 0xF,
                });
            }
        }
        i += if wide { 2 } else { 1 };
    }
    out
}

/// The driver's view of the six BAR registers of its function.
///
/// Invariant: `regs[i]` is what a real BAR would hold after the same writes: the writable
/// address bits of `bars[i]` (`!(size - 1)`), plus its read-only flag bits; for the upper
/// register of a 64-bit BAR, the writable upper address bits. Registers of absent BARs read 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BarShadow {
    bars: [Option<RealBar>; 6],
    regs: [u32; 6],
}

impl BarShadow {
    /// A shadow that starts out with the real addresses (what the driver would read first).
    pub fn new(bars: [Option<RealBar>; 6]) -> Self {
        let mut regs = [0u32; 6];
        for (i, bar) in bars.iter().enumerate() {
            if let Some(b) = bar {
                regs[i] = (b.phys as u32 & !low_mask(b)) | b.flags;
                if b.wide && i < 5 {
                    regs[i + 1] = (b.phys >> 32) as u32;
                }
            }
        }
        Self { bars, regs }
    }

    /// The real BARs.
    pub fn bars(&self) -> &[Option<RealBar>; 6] {
        &self.bars
    }

    /// Reads BAR register `index` (0..6).
    pub fn read(&self, index: usize) -> u32 {
        self.regs.get(index).copied().unwrap_or(0)
    }

    /// Writes BAR register `index`, keeping only what a real BAR would keep.
    pub fn write(&mut self, index: usize, value: u32) {
        if index >= 6 {
            return;
        }
        if let Some(b) = self.bars[index] {
            self.regs[index] = (value & !low_mask(&b) & size_mask_low(&b)) | b.flags;
        } else if index > 0
            && let Some(b) = self.bars[index - 1].filter(|b| b.wide)
        {
            self.regs[index] = value & ((!(b.size - 1)) >> 32) as u32;
        }
    }

    /// The address the driver has given BAR `index` (what a device would decode).
    pub fn assigned(&self, index: usize) -> Option<u64> {
        let b = self.bars.get(index).copied().flatten()?;
        let low = u64::from(self.regs[index] & !low_mask(&b));
        let high = if b.wide && index < 5 {
            u64::from(self.regs[index + 1]) << 32
        } else {
            0
        };
        Some(high | low)
    }

    /// Which memory BAR the driver-side range `[addr, addr + len)` lies in, and the offset in
    /// it; `None` if it is not wholly inside one memory BAR as the driver placed it.
    pub fn translate(&self, addr: u64, len: u64) -> Option<(usize, u64)> {
        (0..6).find_map(|i| {
            let b = self.bars[i].filter(|b| !b.io)?;
            let base = self.assigned(i)?;
            let off = addr.checked_sub(base)?;
            let end = off.checked_add(len)?;
            (end <= b.size).then_some((i, off))
        })
    }
}

/// The read-only low bits of a BAR register.
fn low_mask(b: &RealBar) -> u32 {
    if b.io { 0x3 } else { 0xF }
}

/// The writable bits of the low register, from the BAR's size.
fn size_mask_low(b: &RealBar) -> u32 {
    !((b.size.max(1) - 1) as u32)
}

/// The `0xCF8` address of a dword of PCI configuration space (mechanism #1).
pub fn cf8_address(bus: u8, device: u8, function: u8, offset: u8) -> u32 {
    0x8000_0000
        | (u32::from(bus) << 16)
        | (u32::from(device & 0x1F) << 11)
        | (u32::from(function & 0x7) << 8)
        | u32::from(offset & 0xFC)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's modern virtio-scsi-pci: BAR1 4 KiB 32-bit memory (MSI-X), BAR4 16 KiB 64-bit
    /// prefetchable memory above 4 GiB; plus an I/O BAR0 as a transitional device has.
    fn qemu_like() -> BarShadow {
        let raw = [0xC001, 0xFEBD_1000, 0, 0, 0x0000_000C, 0x0000_0008];
        let masks = [0xFFFF_FFC1, 0xFFFF_F000, 0, 0, 0xFFFF_C00C, 0xFFFF_FFFF];
        let bars = decode(raw, masks);
        assert_eq!(
            bars[0],
            Some(RealBar {
                phys: 0xC000,
                size: 64,
                io: true,
                wide: false,
                flags: 1
            })
        );
        assert_eq!(
            bars[1].map(|b| (b.phys, b.size, b.wide)),
            Some((0xFEBD_1000, 4096, false))
        );
        assert_eq!(
            bars[4].map(|b| (b.phys, b.size, b.wide, b.flags)),
            Some((0x8_0000_0000, 16384, true, 0xC))
        );
        assert_eq!((bars[2], bars[3], bars[5]), (None, None, None));
        BarShadow::new(bars)
    }

    #[test]
    fn sizing_and_assignment_behave_like_real_bars() {
        let mut s = qemu_like();
        // First read: the real addresses.
        assert_eq!(s.read(1), 0xFEBD_1000);
        assert_eq!((s.read(4), s.read(5)), (0x0000_000C, 0x8));
        // Sizing: all ones reads back the size mask with the flags.
        s.write(1, 0xFFFF_FFFF);
        assert_eq!(s.read(1), 0xFFFF_F000);
        s.write(4, 0xFFFF_FFFF);
        s.write(5, 0xFFFF_FFFF);
        assert_eq!((s.read(4), s.read(5)), (0xFFFF_C00C, 0xFFFF_FFFF));
        s.write(0, 0xFFFF_FFFF);
        assert_eq!(s.read(0), 0xFFFF_FFC1);
        // Empty BARs stay zero.
        s.write(2, 0xFFFF_FFFF);
        assert_eq!(s.read(2), 0);
        // The driver places BAR1 and BAR4 in its window; misaligned low bits are dropped.
        s.write(1, 0xC000_0000);
        s.write(4, 0xC000_4000 | 0x123);
        s.write(5, 0);
        assert_eq!(s.assigned(1), Some(0xC000_0000));
        assert_eq!(s.assigned(4), Some(0xC000_4000));
        assert_eq!(s.read(4), 0xC000_400C);
        // Translation into the real BARs, whole accesses only.
        assert_eq!(s.translate(0xC000_0000, 4), Some((1, 0)));
        assert_eq!(s.translate(0xC000_0FFC, 4), Some((1, 0xFFC)));
        assert_eq!(s.translate(0xC000_0FFE, 4), None, "crosses the end of BAR1");
        assert_eq!(s.translate(0xC000_4000 + 0x3000, 2), Some((4, 0x3000)));
        assert_eq!(s.translate(0xC000_8000, 1), None);
        assert_eq!(s.translate(0xBFFF_FFFF, 1), None);
        assert_eq!(s.translate(u64::MAX, 8), None);
        // I/O BARs are never MMIO.
        assert_eq!(s.translate(0xC000, 1), None);
        // Out-of-range registers are harmless.
        s.write(9, 1);
        assert_eq!(s.read(9), 0);
    }

    #[test]
    fn garbage_registers_decode_without_panicking() {
        for raw0 in [0u32, 1, 0x4, 0x6, 0xFFFF_FFFF, 0x8000_0004] {
            for mask in [0u32, 0xFFFF_FFFF, 0x1, 0xF, 0xFFFF_FFF4] {
                let bars = decode([raw0; 6], [mask; 6]);
                let mut s = BarShadow::new(bars);
                for i in 0..6 {
                    s.write(i, 0xFFFF_FFFF);
                    let _ = s.read(i);
                    let _ = s.assigned(i);
                }
                let _ = s.translate(0, u64::MAX);
            }
        }
    }

    #[test]
    fn config_addresses() {
        assert_eq!(cf8_address(0, 1, 0, 0x10), 0x8000_0810);
        assert_eq!(cf8_address(2, 31, 7, 0xFF), 0x8002_FFFC);
    }
}
