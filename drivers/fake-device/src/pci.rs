//! PCI configuration space of the fake: a q35-like host bridge at 00:00.0 and the modern
//! virtio-scsi function (1af4:1048, class 01/00) with a 32-bit BAR1 (the MSI-X table in QEMU)
//! and a 64-bit BAR4 holding the four virtio structures, located by vendor capabilities laid
//! out the way QEMU lays them out (common 0x0000, ISR 0x1000, device 0x2000, notify 0x3000 with
//! multiplier 4). BAR sizing (write all ones, read the mask back) works as on hardware.

use crate::faults::{CapKind, PciFaults};

/// Offsets of the virtio structures inside BAR4 (what the device really decodes).
pub const COMMON_OFF: u64 = 0x0000;
/// ISR status.
pub const ISR_OFF: u64 = 0x1000;
/// Device configuration.
pub const DEVICE_OFF: u64 = 0x2000;
/// Notifications.
pub const NOTIFY_OFF: u64 = 0x3000;
/// Size of each structure's slice of the BAR.
pub const STRUCT_LEN: u64 = 0x1000;
/// True size of BAR4.
pub const BAR4_SIZE: u64 = 0x4000;
/// True size of BAR1.
pub const BAR1_SIZE: u64 = 0x1000;
/// Notify offset multiplier.
pub const NOTIFY_MULTIPLIER: u32 = 4;

const VENDOR: u32 = 0x1af4;
const DEVICE: u32 = 0x1048;
const CAP_START: u8 = 0x40;

/// Command register bit: memory space decoding.
pub const CMD_MEMORY: u16 = 1 << 1;

/// The config space and BAR state of the virtio function.
pub struct PciFunction {
    faults: PciFaults,
    command: u16,
    bar1: u32,
    bar4_lo: u32,
    bar4_hi: u32,
    /// Capability area, bytes 0x40..0x100 of config space.
    caps: [u8; 256],
    cap_ptr: u8,
}

impl PciFunction {
    /// A fresh function (BARs unassigned, decoding off) shaped by `faults`.
    pub fn new(faults: PciFaults) -> Self {
        let mut f = PciFunction {
            faults,
            command: 0,
            bar1: 0,
            bar4_lo: 0,
            bar4_hi: 0,
            caps: [0; 256],
            cap_ptr: 0,
        };
        f.build_caps();
        f
    }

    fn build_caps(&mut self) {
        // (kind, cfg_type, true offset, true length)
        let all = [
            (CapKind::Common, 1u8, COMMON_OFF as u32, STRUCT_LEN as u32),
            (CapKind::Isr, 3, ISR_OFF as u32, STRUCT_LEN as u32),
            (CapKind::Device, 4, DEVICE_OFF as u32, STRUCT_LEN as u32),
            (CapKind::Notify, 2, NOTIFY_OFF as u32, STRUCT_LEN as u32),
        ];
        let mut at = CAP_START;
        let mut prev_next: Option<usize> = None;
        let mut first = None;
        for (kind, cfg_type, offset, length) in all {
            if self.faults.missing.contains(&kind) {
                continue;
            }
            let o = self.faults.caps.get(&kind).cloned().unwrap_or_default();
            let len: u8 = if kind == CapKind::Notify { 20 } else { 16 };
            let base = usize::from(at);
            let c = &mut self.caps;
            c[base] = 0x09; // vendor-specific
            c[base + 1] = 0; // next, patched below
            c[base + 2] = len;
            c[base + 3] = cfg_type;
            c[base + 4] = o.bar.unwrap_or(4);
            c[base + 5] = 0;
            c[base + 8..base + 12].copy_from_slice(&o.offset.unwrap_or(offset).to_le_bytes());
            c[base + 12..base + 16].copy_from_slice(&o.length.unwrap_or(length).to_le_bytes());
            if kind == CapKind::Notify {
                let m = self.faults.notify_multiplier.unwrap_or(NOTIFY_MULTIPLIER);
                c[base + 16..base + 20].copy_from_slice(&m.to_le_bytes());
            }
            if let Some(p) = prev_next {
                self.caps[p] = at;
            }
            first.get_or_insert(at);
            prev_next = Some(base + 1);
            at += 24;
        }
        // A PCI config access capability (cfg_type 5) closes the list, as in QEMU; the driver
        // must skip it (no BAR of ours is 0..5 = 0 and it has no use for it).
        let base = usize::from(at);
        self.caps[base] = 0x09;
        self.caps[base + 2] = 20;
        self.caps[base + 3] = 5;
        if let Some(p) = prev_next {
            self.caps[p] = at;
        }
        first.get_or_insert(at);
        if self.faults.cyclic_list {
            self.caps[base + 1] = first.unwrap_or(CAP_START);
        }
        self.cap_ptr = first.unwrap_or(0);
    }

    /// Reset to power-on state (BARs unassigned, decoding off).
    pub fn reset(&mut self) {
        self.command = 0;
        self.bar1 = 0;
        self.bar4_lo = 0;
        self.bar4_hi = 0;
    }

    fn bar4_mask(&self) -> u64 {
        self.faults
            .bar4_sizing
            .unwrap_or(!(BAR4_SIZE - 1) | u64::from(self.bar4_flags()))
    }

    fn bar4_flags(&self) -> u32 {
        self.faults.bar4_flags.unwrap_or(0b0100) & 0xf
    }

    /// Reads a config dword.
    pub fn read32(&self, offset: u8) -> u32 {
        match offset {
            0x00 => (DEVICE << 16) | VENDOR,
            0x04 => {
                let status: u32 = if self.cap_ptr != 0 { 0x0010 } else { 0 };
                (status << 16) | u32::from(self.command)
            }
            0x08 => 0x0100_0001, // class 01 (storage), subclass 00, prog-if 00, revision 1
            0x0c => 0,           // header type 0, single function
            0x14 => (self.bar1 & !(BAR1_SIZE as u32 - 1)) & 0xffff_fff0,
            0x20 => {
                let mask = self.bar4_mask() as u32;
                (self.bar4_lo & mask & 0xffff_fff0) | self.bar4_flags()
            }
            0x24 => {
                let mask = (self.bar4_mask() >> 32) as u32;
                self.bar4_hi & mask
            }
            0x2c => (0x0008 << 16) | VENDOR, // subsystem: virtio device type 8
            0x34 => u32::from(self.cap_ptr),
            0x3c => 0x0000_010b, // INTA#, line 11
            o if o >= CAP_START => {
                let b = usize::from(o);
                u32::from_le_bytes([
                    self.caps[b],
                    self.caps[b + 1],
                    self.caps[b + 2],
                    self.caps[b + 3],
                ])
            }
            _ => 0,
        }
    }

    /// Writes a config dword.
    pub fn write32(&mut self, offset: u8, value: u32) {
        match offset {
            0x04 => self.command = value as u16 & 0x0547,
            0x14 => self.bar1 = value,
            0x20 => self.bar4_lo = value,
            0x24 => self.bar4_hi = value,
            _ => {}
        }
    }

    /// Where BAR4 decodes now: `(base, size)`, if memory decoding is on and the BAR is sane.
    pub fn bar4(&self) -> Option<(u64, u64)> {
        if self.command & CMD_MEMORY == 0 || self.bar4_flags() & 1 != 0 {
            return None;
        }
        let mask = self.bar4_mask() & !0xf;
        let size = (!mask).wrapping_add(1);
        if size == 0 || !size.is_power_of_two() {
            return None;
        }
        let base = ((u64::from(self.bar4_hi) << 32) | u64::from(self.bar4_lo)) & mask;
        base.checked_add(size)?;
        Some((base, size))
    }

    /// Where BAR1 decodes now.
    pub fn bar1(&self) -> Option<(u64, u64)> {
        if self.command & CMD_MEMORY == 0 {
            return None;
        }
        let base = u64::from(self.bar1 & !(BAR1_SIZE as u32 - 1) & 0xffff_fff0);
        Some((base, BAR1_SIZE))
    }
}

/// Config space of the host bridge at 00:00.0 (q35's 8086:29c0), so enumeration has something
/// to skip.
pub fn host_bridge_read32(offset: u8) -> u32 {
    match offset {
        0x00 => 0x29c0_8086,
        0x08 => 0x0600_0000,
        _ => 0,
    }
}
