//! Modern virtio-pci transport over the platform HAL.
//!
//! Owns: finding the virtio-scsi function on PCI (scanning bus 0, or the one function the
//! platform names), assigning its memory BARs and enabling it (there is no firmware or kernel to
//! do it — or, when the platform says firmware did, using the BARs where they are), parsing the
//! virtio vendor capabilities, and the `virtio_drivers::transport::Transport` implementation
//! whose register accesses go through [`Platform`] instead of pointers.
//!
//! Why not `virtio_drivers::transport::pci::PciTransport`: it reaches registers through
//! `Hal::mmio_phys_to_virt` pointers (we have none: MMIO is a platform call), and its `notify`
//! writes `queue_select` and reads `queue_notify_off` on every kick, which races between
//! per-CPU queues. Here each queue's notify address is computed once at `queue_set` and
//! [`Notifier`] kicks with one posted write and no `queue_select`. PCI enumeration and BAR
//! sizing do come from `virtio_drivers::transport::pci::bus`.

use std::sync::Arc;

use platform::{MmioWindow, PciAddress, Platform, PlatformError, Width};
use virtio_drivers::transport::pci::bus::{
    BarInfo, Command, ConfigurationAccess, DeviceFunction, MemoryBarType, PciRoot,
};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error as VirtioError, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// PCI vendor id of virtio devices.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// Transitional virtio-scsi device id.
pub const VIRTIO_SCSI_TRANSITIONAL: u16 = 0x1004;
/// Modern virtio-scsi device id (0x1040 + device type 8).
pub const VIRTIO_SCSI_MODERN: u16 = 0x1048;

// virtio_pci_common_cfg register offsets (virtio 1.2 §4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

// virtio_pci_cap cfg_type values.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
/// PCI capability id of vendor-specific capabilities.
const PCI_CAP_VENDOR: u8 = 0x09;

/// Why the transport could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A platform access failed.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// No virtio-scsi function was found on bus 0 (or at the function the platform names).
    #[error("no virtio-scsi PCI device (1af4:1048 or 1af4:1004) on bus 0")]
    NotFound,
    /// The device's PCI setup makes no sense.
    #[error("virtio-scsi at {0}: {1}")]
    BadDevice(PciAddress, String),
}

/// `ConfigurationAccess` for `virtio_drivers`' PCI code, over the platform.
struct PlatformCam(Arc<dyn Platform>);

impl ConfigurationAccess for PlatformCam {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        let dev = PciAddress {
            bus: df.bus,
            device: df.device,
            function: df.function,
        };
        // A failed read looks like an absent device, as on real hardware; the caller checks
        // platform health before trusting what it found.
        self.0.pci_read32(dev, offset).unwrap_or(u32::MAX)
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        let dev = PciAddress {
            bus: df.bus,
            device: df.device,
            function: df.function,
        };
        if let Err(e) = self.0.pci_write32(dev, offset, data) {
            log::warn!("PCI config write {dev} +{offset:#x} failed: {e}");
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PlatformCam(self.0.clone())
    }
}

/// One virtio structure (common, notify, ISR, device config) located in a BAR.
#[derive(Clone, Copy, Debug)]
struct Region {
    addr: u64,
    len: u32,
}

/// Kicks one queue: a posted 16-bit write of the queue index to its cached notify address.
#[derive(Clone)]
pub struct Notifier {
    platform: Arc<dyn Platform>,
    addr: u64,
    queue: u16,
}

impl Notifier {
    /// Tells the device that queue `queue` has new buffers.
    pub fn notify(&self) -> Result<(), PlatformError> {
        self.platform
            .mmio_write_posted(self.addr, Width::U16, u64::from(self.queue))
    }
}

/// The modern virtio-pci transport of one device.
pub struct PciTransport {
    platform: Arc<dyn Platform>,
    dev: PciAddress,
    common: Region,
    isr: Region,
    device_cfg: Option<Region>,
    notify: Region,
    notify_multiplier: u32,
    /// Cached notify address per queue index, filled by `queue_set`.
    notify_addrs: Vec<Option<u64>>,
    /// Device address of each queue's used ring, recorded by `queue_set` (the driver reads the
    /// raw used-ring ids itself: `VirtQueue::peek_used` truncates them to 16 bits).
    used_rings: Vec<Option<u64>>,
}

impl PciTransport {
    /// Finds the first virtio-scsi function on bus 0 (or takes the one the platform names),
    /// assigns its memory BARs inside the platform's MMIO window (or reads them when the
    /// platform says they are preassigned), enables memory decoding and bus mastering, and
    /// parses its virtio capabilities.
    pub fn probe(platform: Arc<dyn Platform>) -> Result<Self, TransportError> {
        let mut root = PciRoot::new(PlatformCam(platform.clone()));
        let is_scsi = |vendor: u16, device: u16| {
            vendor == VIRTIO_VENDOR
                && matches!(device, VIRTIO_SCSI_MODERN | VIRTIO_SCSI_TRANSITIONAL)
        };
        let function = match platform.pci_function() {
            // The platform gives one function: check it, do not scan (a function other than
            // .0 would be missed by a scan when the platform hides function 0).
            Some(dev) => {
                let function = DeviceFunction {
                    bus: dev.bus,
                    device: dev.device,
                    function: dev.function,
                };
                let id = PlatformCam(platform.clone()).read_word(function, 0);
                platform.health()?;
                let (vendor, device) = (id as u16, (id >> 16) as u16);
                if !is_scsi(vendor, device) {
                    return Err(TransportError::BadDevice(
                        dev,
                        format!("is {vendor:04x}:{device:04x}, not virtio-scsi"),
                    ));
                }
                log::info!("virtio-scsi at {dev}: {vendor:04x}:{device:04x}");
                function
            }
            None => {
                let found = root
                    .enumerate_bus(0)
                    .find(|(_, info)| is_scsi(info.vendor_id, info.device_id));
                platform.health()?;
                let (function, info) = found.ok_or(TransportError::NotFound)?;
                log::info!(
                    "virtio-scsi at {}: {info}",
                    PciAddress {
                        bus: function.bus,
                        device: function.device,
                        function: function.function,
                    }
                );
                function
            }
        };
        let dev = PciAddress {
            bus: function.bus,
            device: function.device,
            function: function.function,
        };
        let bad = |m: String| TransportError::BadDevice(dev, m);

        // Assign every memory BAR, naturally aligned, from the platform's MMIO window; or, when
        // firmware or a kernel has placed them, take their addresses as they are.
        let preassigned = platform.bars_preassigned();
        let window = platform.mmio_window();
        let mut bar_addrs = [None::<(u64, u64)>; 6];
        let mut next = window.base;
        let mut index = 0u8;
        while index < 6 {
            let bar = root
                .bar_info(function, index)
                .map_err(|e| bad(format!("BAR{index}: {e}")))?;
            let step = if bar.as_ref().is_some_and(BarInfo::takes_two_entries) {
                2
            } else {
                1
            };
            if let Some(BarInfo::Memory {
                address_type,
                address,
                size,
                ..
            }) = bar
            {
                let addr = if preassigned {
                    if address == 0 {
                        return Err(bad(format!(
                            "BAR{index} ({size:#x} bytes) has no address: firmware did not assign it"
                        )));
                    }
                    address
                } else {
                    let addr = place(&window, &mut next, size)
                        .ok_or_else(|| bad(format!("BAR{index} of {size} bytes does not fit")))?;
                    match address_type {
                        MemoryBarType::Width64 => root.set_bar_64(function, index, addr),
                        _ => {
                            let addr32 = u32::try_from(addr)
                                .map_err(|_| bad(format!("32-bit BAR{index} above 4 GiB")))?;
                            root.set_bar_32(function, index, addr32)
                        }
                    }
                    addr
                };
                bar_addrs[usize::from(index)] = Some((addr, size));
                log::debug!("virtio-scsi BAR{index}: {size:#x} bytes at {addr:#x}");
            }
            index += step;
        }
        if preassigned {
            // Memory decoding only, keeping every other bit (the INTx mask belongs to whoever
            // handles the line, e.g. the kernel's uio_pci_generic). Bus mastering waits for the
            // reset below.
            let (_, command) = root.get_status_command(function);
            root.set_command(function, command | Command::MEMORY_SPACE);
        } else {
            root.set_command(
                function,
                Command::MEMORY_SPACE | Command::BUS_MASTER, // INTx stays enabled (bit 10 clear)
            );
        }

        // Walk the vendor capabilities.
        let cam = PlatformCam(platform.clone());
        let (mut common, mut isr, mut device_cfg, mut notify) = (None, None, None, None);
        let mut notify_multiplier = 0;
        // A broken device can make the list a cycle: visit each offset once, and at most the
        // 48 dword-aligned slots that config space has after the header.
        let mut seen = [false; 256];
        for cap in root.capabilities(function).take(48) {
            if std::mem::replace(&mut seen[usize::from(cap.offset)], true) {
                log::warn!(
                    "virtio-scsi at {dev}: capability list loops at {:#x}",
                    cap.offset
                );
                break;
            }
            if cap.id != PCI_CAP_VENDOR {
                continue;
            }
            let w0 = cam.read_word(function, cap.offset);
            let cfg_type = (w0 >> 24) as u8;
            let w1 = cam.read_word(function, cap.offset.wrapping_add(4));
            let bar = (w1 & 0xff) as usize;
            let offset = cam.read_word(function, cap.offset.wrapping_add(8));
            let length = cam.read_word(function, cap.offset.wrapping_add(12));
            let Some(Some((base, bar_size))) = bar_addrs.get(bar).copied() else {
                continue; // PCI config access capability (type 5) or a BAR we do not map
            };
            // The structure must lie inside its BAR, or its accesses would hit whatever else
            // is mapped there.
            if u64::from(offset) + u64::from(length) > bar_size {
                return Err(bad(format!(
                    "virtio structure type {cfg_type} at BAR{bar}+{offset:#x} (+{length:#x}) is \
                     outside the {bar_size:#x}-byte BAR"
                )));
            }
            let region = Region {
                addr: base + u64::from(offset),
                len: length,
            };
            match cfg_type {
                CAP_COMMON if common.is_none() => common = Some(region),
                CAP_ISR if isr.is_none() => isr = Some(region),
                CAP_DEVICE if device_cfg.is_none() => device_cfg = Some(region),
                CAP_NOTIFY if notify.is_none() => {
                    notify = Some(region);
                    notify_multiplier = cam.read_word(function, cap.offset.wrapping_add(16));
                }
                _ => {}
            }
        }
        platform.health()?;
        let common = common.ok_or_else(|| bad("no common config capability".into()))?;
        let isr = isr.ok_or_else(|| bad("no ISR capability".into()))?;
        let notify = notify.ok_or_else(|| bad("no notify capability".into()))?;
        if common.len < 0x38 {
            return Err(bad(format!("common config is {} bytes", common.len)));
        }
        if isr.len < 1 || notify.len < 2 {
            return Err(bad("ISR or notify structure is empty".into()));
        }
        if preassigned {
            // A device that was in use before (another driver, an earlier run of this one) may
            // still hold queues in memory that is no longer its own, and would write completions
            // there as soon as it may master the bus again: reset it first (virtio 1.2
            // §4.1.4.3.2: write 0, wait until it reads 0), then enable bus mastering.
            reset_device(platform.as_ref(), common.addr).map_err(bad)?;
            let (_, command) = root.get_status_command(function);
            root.set_command(
                function,
                command | Command::MEMORY_SPACE | Command::BUS_MASTER,
            );
        }
        Ok(PciTransport {
            platform,
            dev,
            common,
            isr,
            device_cfg,
            notify,
            notify_multiplier,
            notify_addrs: Vec::new(),
            used_rings: Vec::new(),
        })
    }

    /// PCI address of the device.
    pub fn pci_address(&self) -> PciAddress {
        self.dev
    }

    /// Number of virtqueues the device has.
    pub fn num_queues(&self) -> u16 {
        self.read(NUM_QUEUES, Width::U16) as u16
    }

    /// The notifier of `queue`, once `queue_set` has run for it.
    pub fn notifier(&self, queue: u16) -> Option<Notifier> {
        let addr = (*self.notify_addrs.get(usize::from(queue))?)?;
        Some(Notifier {
            platform: self.platform.clone(),
            addr,
            queue,
        })
    }

    /// Device address of `queue`'s used ring, once `queue_set` has run for it.
    pub fn used_ring(&self, queue: u16) -> Option<u64> {
        *self.used_rings.get(usize::from(queue))?
    }

    /// Reads and clears the ISR status; this deasserts the INTx line.
    pub fn isr_reader(&self) -> IsrReader {
        IsrReader {
            platform: self.platform.clone(),
            addr: self.isr.addr,
        }
    }

    fn read(&self, reg: u64, width: Width) -> u64 {
        match self.platform.mmio_read(self.common.addr + reg, width) {
            Ok(v) => v,
            Err(e) => {
                log::debug!("common cfg read {reg:#x}: {e}");
                // What a vanished PCI device reads as.
                u64::MAX >> (64 - 8 * width.bytes())
            }
        }
    }

    fn write(&mut self, reg: u64, width: Width, value: u64) {
        if let Err(e) = self
            .platform
            .mmio_write(self.common.addr + reg, width, value)
        {
            log::debug!("common cfg write {reg:#x}: {e}");
        }
    }
}

/// Writes 0 to `device_status` of the common configuration at `common` and waits (up to a
/// second) until the device reads back 0.
fn reset_device(platform: &dyn Platform, common: u64) -> Result<(), String> {
    let status = common + DEVICE_STATUS;
    platform
        .mmio_write(status, Width::U8, 0)
        .map_err(|e| format!("reset: {e}"))?;
    for _ in 0..1000 {
        match platform.mmio_read(status, Width::U8) {
            Ok(0) => return Ok(()),
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
            Err(e) => return Err(format!("reset: {e}")),
        }
    }
    Err("device status did not read 0 within a second of the reset".into())
}

/// Bump-places a naturally aligned BAR of `size` bytes inside `window`.
fn place(window: &MmioWindow, next: &mut u64, size: u64) -> Option<u64> {
    if size == 0 || !size.is_power_of_two() {
        return None;
    }
    let addr = next.checked_add(size - 1)? & !(size - 1);
    let end = addr.checked_add(size)?;
    if end > window.base.checked_add(window.len)? {
        return None;
    }
    *next = end;
    Some(addr)
}

/// Reads the ISR register (acknowledging the interrupt) without holding the transport.
#[derive(Clone)]
pub struct IsrReader {
    platform: Arc<dyn Platform>,
    addr: u64,
}

impl IsrReader {
    /// Reads and clears the ISR status.
    pub fn read(&self) -> Result<InterruptStatus, PlatformError> {
        let v = self.platform.mmio_read(self.addr, Width::U8)?;
        Ok(InterruptStatus::from_bits_retain(v as u32))
    }
}

impl Transport for PciTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::ScsiHost
    }

    fn read_device_features(&mut self) -> u64 {
        self.write(DEVICE_FEATURE_SELECT, Width::U32, 0);
        let lo = self.read(DEVICE_FEATURE, Width::U32);
        self.write(DEVICE_FEATURE_SELECT, Width::U32, 1);
        let hi = self.read(DEVICE_FEATURE, Width::U32);
        lo | (hi << 32)
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.write(DRIVER_FEATURE_SELECT, Width::U32, 0);
        self.write(DRIVER_FEATURE, Width::U32, driver_features & 0xffff_ffff);
        self.write(DRIVER_FEATURE_SELECT, Width::U32, 1);
        self.write(DRIVER_FEATURE, Width::U32, driver_features >> 32);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.write(QUEUE_SELECT, Width::U16, u64::from(queue));
        self.read(QUEUE_SIZE, Width::U16) as u32
    }

    fn notify(&mut self, queue: u16) {
        match self.notifier(queue) {
            Some(n) => {
                if let Err(e) = n.notify() {
                    log::warn!("notify queue {queue}: {e}");
                }
            }
            None => log::warn!("notify of queue {queue}, which is not set up"),
        }
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_truncate(self.read(DEVICE_STATUS, Width::U8) as u32)
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.write(DEVICE_STATUS, Width::U8, u64::from(status.bits() & 0xff));
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {
        // Legacy only; the modern PCI transport has no such register.
    }

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.write(QUEUE_SELECT, Width::U16, u64::from(queue));
        self.write(QUEUE_SIZE, Width::U16, u64::from(size));
        self.write(QUEUE_DESC, Width::U64, descriptors);
        self.write(QUEUE_DRIVER, Width::U64, driver_area);
        self.write(QUEUE_DEVICE, Width::U64, device_area);
        let off = self.read(QUEUE_NOTIFY_OFF, Width::U16);
        let offset = off * u64::from(self.notify_multiplier);
        let addr = if offset + 2 <= u64::from(self.notify.len) {
            Some(self.notify.addr + offset)
        } else {
            log::error!(
                "queue {queue}: notify offset {offset:#x} outside the {}-byte notify region",
                self.notify.len
            );
            None
        };
        let i = usize::from(queue);
        if self.notify_addrs.len() <= i {
            self.notify_addrs.resize(i + 1, None);
        }
        self.notify_addrs[i] = addr;
        if self.used_rings.len() <= i {
            self.used_rings.resize(i + 1, None);
        }
        self.used_rings[i] = Some(device_area);
        self.write(QUEUE_ENABLE, Width::U16, 1);
    }

    fn queue_unset(&mut self, queue: u16) {
        // Modern PCI cannot disable one queue; a device reset disables them all.
        if let Some(a) = self.notify_addrs.get_mut(usize::from(queue)) {
            *a = None;
        }
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.write(QUEUE_SELECT, Width::U16, u64::from(queue));
        self.read(QUEUE_ENABLE, Width::U16) == 1
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.isr_reader().read().unwrap_or(InterruptStatus::empty())
    }

    fn read_config_generation(&self) -> u32 {
        self.read(CONFIG_GENERATION, Width::U8) as u32
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, VirtioError> {
        let region = self.device_cfg.ok_or(VirtioError::ConfigSpaceMissing)?;
        let size = size_of::<T>();
        if offset + size > region.len as usize {
            return Err(VirtioError::ConfigSpaceTooSmall);
        }
        let mut bytes = vec![0u8; size];
        let mut at = 0;
        while at < size {
            let width = access_width(offset + at, size - at);
            let addr = region.addr + (offset + at) as u64;
            let v = self
                .platform
                .mmio_read(addr, width)
                .map_err(|_| VirtioError::IoError)?;
            bytes[at..at + width.bytes()].copy_from_slice(&v.to_le_bytes()[..width.bytes()]);
            at += width.bytes();
        }
        T::read_from_bytes(&bytes).map_err(|_| VirtioError::IoError)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> Result<(), VirtioError> {
        let region = self.device_cfg.ok_or(VirtioError::ConfigSpaceMissing)?;
        let bytes = value.as_bytes();
        if offset + bytes.len() > region.len as usize {
            return Err(VirtioError::ConfigSpaceTooSmall);
        }
        let mut at = 0;
        while at < bytes.len() {
            let width = access_width(offset + at, bytes.len() - at);
            let mut word = [0u8; 8];
            word[..width.bytes()].copy_from_slice(&bytes[at..at + width.bytes()]);
            let addr = region.addr + (offset + at) as u64;
            self.platform
                .mmio_write(addr, width, u64::from_le_bytes(word))
                .map_err(|_| VirtioError::IoError)?;
            at += width.bytes();
        }
        Ok(())
    }
}

/// The widest naturally aligned access (at most 32 bits, as virtio config allows) at `offset`
/// with `left` bytes to go.
fn access_width(offset: usize, left: usize) -> Width {
    if offset.is_multiple_of(4) && left >= 4 {
        Width::U32
    } else if offset.is_multiple_of(2) && left >= 2 {
        Width::U16
    } else {
        Width::U8
    }
}
