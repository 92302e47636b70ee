//! The Redox side of the backend (compiled only for `target_os = "redox"`): kernel schemes
//! and x86 port I/O behind the `Platform` trait. See the crate documentation for the design.

use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use event::{EventFlags, EventQueue};
use libredox::Fd;
use libredox::call::{MmapArgs, mmap};
use libredox::flag::{
    MAP_PRIVATE, MAP_SHARED, O_CLOEXEC, O_NONBLOCK, O_RDWR, PROT_READ, PROT_WRITE,
};
use platform::{
    DmaWindow, IrqWait, MmioWindow, PciAddress, Platform, PlatformError, Result, Width,
};
use syscall::data::TimeSpec;

use crate::bars::{BarShadow, RealBar, cf8_address, decode};

/// PCI ids of virtio-scsi: transitional and modern.
const VIRTIO_VENDOR: u16 = 0x1af4;
const VIRTIO_SCSI_IDS: [u16; 2] = [0x1004, 0x1048];
/// Where the driver is told it may place BARs: bus addresses that only this backend ever
/// sees (translated to the real BARs), below 4 GiB so 32-bit BARs fit.
const VIRTUAL_BAR_WINDOW: MmioWindow = MmioWindow {
    base: 0xC000_0000,
    len: 0x1000_0000,
};
const PAGE: usize = 4096;

fn gone(what: &str, e: impl std::fmt::Display) -> PlatformError {
    PlatformError::Gone(format!("{what}: {e}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Port I/O; needs the rights [`acquire_port_io`] gets.
mod port {
    use std::arch::asm;

    pub(super) fn outl(port: u16, value: u32) {
        // SAFETY: `out` to an I/O port this process was granted access to (acquire_port_io
        // at start-up); it touches no memory.
        unsafe {
            asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
        }
    }
    pub(super) fn inl(port: u16) -> u32 {
        let v: u32;
        // SAFETY: as for `outl`.
        unsafe {
            asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags))
        }
        v
    }
    pub(super) fn outw(port: u16, value: u16) {
        // SAFETY: as for `outl`.
        unsafe {
            asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
        }
    }
    pub(super) fn inw(port: u16) -> u16 {
        let v: u16;
        // SAFETY: as for `outl`.
        unsafe {
            asm!("in ax, dx", out("ax") v, in("dx") port, options(nomem, nostack, preserves_flags))
        }
        v
    }
    pub(super) fn outb(port: u16, value: u8) {
        // SAFETY: as for `outl`.
        unsafe {
            asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
        }
    }
    pub(super) fn inb(port: u16) -> u8 {
        let v: u8;
        // SAFETY: as for `outl`.
        unsafe {
            asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
        }
        v
    }
}

unsafe extern "C" {
    /// relibc: the calling thread's file descriptor in the kernel's process scheme.
    fn redox_cur_thrfd_v0() -> usize;
}

/// Asks the kernel for I/O-port rights for this process (the process scheme's `Iopl` verb).
fn acquire_port_io() -> Result<()> {
    // SAFETY: relibc's accessor, no arguments, returns an fd number it owns.
    let thread_fd = unsafe { redox_cur_thrfd_v0() };
    let kernel_fd = libredox::call::dup(thread_fd, b"open_via_dup")
        .map(Fd::new)
        .map_err(|e| gone("process scheme", e))?;
    let verb = [syscall::ProcSchemeVerb::Iopl as u64];
    let res = kernel_fd.call_rw(&mut [], syscall::CallFlags::empty(), &verb);
    res.map(drop).map_err(|e| gone("I/O port rights", e))
}

/// A mapping of physical memory (a BAR, or the DMA region), unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory (or device registers) shared by all threads of the
// process; every access goes through volatile reads/writes by the caller, which serialises
// as the device requires.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of physical memory at `phys`, uncacheable (device registers).
    fn physical(phys: u64, len: usize) -> Result<Self> {
        let fd = Fd::open("/scheme/memory/physical@uc", O_CLOEXEC | O_RDWR, 0)
            .map_err(|e| gone("/scheme/memory/physical@uc", e))?;
        let len = len.next_multiple_of(PAGE);
        let args = MmapArgs {
            addr: std::ptr::null_mut(),
            length: len,
            prot: PROT_READ | PROT_WRITE,
            flags: MAP_SHARED,
            fd: fd.raw(),
            offset: phys,
        };
        // SAFETY: maps device memory the kernel checks we may map; the result is only used
        // through volatile accesses inside `len`.
        let ptr = unsafe { mmap(args) }.map_err(|e| gone("mmap of a BAR", e))?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| gone("mmap", "null"))?;
        Ok(Self { ptr, len })
    }

    /// Allocates `len` bytes of zeroed, physically contiguous, write-back memory for DMA.
    fn dma(len: usize) -> Result<Self> {
        let path = "/scheme/memory/zeroed@wb?phys_contiguous";
        let fd = Fd::open(path, O_CLOEXEC | O_RDWR, 0).map_err(|e| gone(path, e))?;
        let len = len.next_multiple_of(PAGE);
        let args = MmapArgs {
            addr: std::ptr::null_mut(),
            length: len,
            prot: PROT_READ | PROT_WRITE,
            flags: MAP_PRIVATE,
            fd: fd.raw(),
            offset: 0,
        };
        // SAFETY: fresh anonymous memory for this process only.
        let ptr = unsafe { mmap(args) }.map_err(|e| gone("mmap of DMA memory", e))?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| gone("mmap", "null"))?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `mmap` returned; nothing uses it after drop (the
        // platform owns its mappings for its whole lifetime).
        let _ = unsafe { libredox::call::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The bus address of process memory at `virt` (the kernel's translation handle).
fn translate(virt: usize) -> Result<u64> {
    let fd = Fd::open("/scheme/memory/translation", O_CLOEXEC, 0)
        .map_err(|e| gone("/scheme/memory/translation", e))?;
    let mut buf = virt.to_ne_bytes();
    fd.call_rw(&mut buf, syscall::CallFlags::empty(), &[])
        .map_err(|e| gone("address translation", e))?;
    Ok(usize::from_ne_bytes(buf) as u64)
}

/// The INTx line: the irq scheme's file, a timer, and the event queue that waits on both.
struct Irq {
    line: u8,
    fd: Fd,
    timer: Fd,
    queue: EventQueue<usize>,
    /// The last interrupt count read, written back (which unmasks the line) at the next wait,
    /// after the driver has read the ISR (which lowers the line).
    pending_ack: Option<[u8; 8]>,
}

const EV_IRQ: usize = 0;
const EV_TIMER: usize = 1;

impl Irq {
    fn open(line: u8) -> Result<Self> {
        let path = format!("/scheme/irq/{line}");
        let fd = Fd::open(&path, O_CLOEXEC | O_RDWR | O_NONBLOCK, 0).map_err(|e| gone(&path, e))?;
        let tpath = format!("/scheme/time/{}", syscall::flag::CLOCK_MONOTONIC);
        let timer = Fd::open(&tpath, O_CLOEXEC | O_RDWR, 0).map_err(|e| gone(&tpath, e))?;
        let queue = EventQueue::new().map_err(|e| gone("event queue", e))?;
        queue
            .subscribe(fd.raw(), EV_IRQ, EventFlags::READ)
            .map_err(|e| gone("irq events", e))?;
        queue
            .subscribe(timer.raw(), EV_TIMER, EventFlags::READ)
            .map_err(|e| gone("timer events", e))?;
        Ok(Self {
            line,
            fd,
            timer,
            queue,
            pending_ack: None,
        })
    }

    fn now(&self) -> Result<TimeSpec> {
        let mut ts = TimeSpec::default();
        self.timer.read(&mut ts).map_err(|e| gone("timer", e))?;
        Ok(ts)
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<IrqWait> {
        if let Some(ack) = self.pending_ack.take() {
            self.fd.write(&ack).map_err(|e| gone("irq ack", e))?;
        }
        let deadline = match timeout {
            Some(t) => {
                let now = self.now()?;
                let nanos = i64::from(now.tv_nsec) + i64::from(t.subsec_nanos());
                let deadline = TimeSpec {
                    tv_sec: now
                        .tv_sec
                        .saturating_add(i64::try_from(t.as_secs()).unwrap_or(i64::MAX))
                        .saturating_add(nanos / 1_000_000_000),
                    tv_nsec: (nanos % 1_000_000_000) as i32,
                };
                self.timer.write(&deadline).map_err(|e| gone("timer", e))?;
                Some(deadline)
            }
            None => None,
        };
        loop {
            // Already asserted (or asserted while we set up)?
            let mut count = [0u8; 8];
            match self.fd.read(&mut count) {
                Ok(8) => {
                    self.pending_ack = Some(count);
                    return Ok(IrqWait::Asserted);
                }
                Ok(_) => {}
                Err(e) if e.is_wouldblock() => {}
                Err(e) => return Err(gone(&format!("irq {}", self.line), e)),
            }
            if let Some(d) = deadline {
                let now = self.now()?;
                if (now.tv_sec, now.tv_nsec) >= (d.tv_sec, d.tv_nsec) {
                    return Ok(IrqWait::TimedOut);
                }
            }
            let ev = self
                .queue
                .next_event()
                .map_err(|e| gone("event queue", e))?;
            if ev.user_data == EV_TIMER && deadline.is_none() {
                continue;
            }
        }
    }
}

/// The virtio-scsi function of this machine, reached through Redox's schemes.
pub struct RedoxPlatform {
    dev: PciAddress,
    /// Serialises `0xCF8`/`0xCFC` pairs.
    config: Mutex<()>,
    /// The driver's view of the BAR registers.
    shadow: Mutex<BarShadow>,
    /// The real memory BARs, mapped (by BAR index).
    maps: [Option<Mapping>; 6],
    dma: Mapping,
    dma_bus: u64,
    irq: Mutex<Irq>,
}

impl RedoxPlatform {
    /// Finds the first virtio-scsi function on bus 0, maps its BARs, allocates `dma_bytes` of
    /// DMA memory and opens its interrupt line.
    pub fn discover(dma_bytes: usize) -> Result<Self> {
        acquire_port_io()?;
        let config_lock = Mutex::new(());
        let cfg = |d: u8, f: u8, off: u8| {
            let _g = lock(&config_lock);
            port::outl(0xCF8, cf8_address(0, d, f, off));
            port::inl(0xCFC)
        };
        let mut found = None;
        'scan: for d in 0..32u8 {
            for f in 0..8u8 {
                let id = cfg(d, f, 0);
                let (vendor, device) = (id as u16, (id >> 16) as u16);
                if vendor == 0xFFFF {
                    if f == 0 {
                        break;
                    }
                    continue;
                }
                if vendor == VIRTIO_VENDOR && VIRTIO_SCSI_IDS.contains(&device) {
                    found = Some(PciAddress {
                        bus: 0,
                        device: d,
                        function: f,
                    });
                    break 'scan;
                }
                let multi = (cfg(d, f, 0x0C) >> 16) & 0x80 != 0;
                if f == 0 && !multi {
                    break;
                }
            }
        }
        let dev = found.ok_or_else(|| gone("PCI", "no virtio-scsi function on bus 0"))?;
        let rw = |off: u8, value: Option<u32>| {
            let _g = lock(&config_lock);
            port::outl(0xCF8, cf8_address(dev.bus, dev.device, dev.function, off));
            match value {
                Some(v) => {
                    port::outl(0xCFC, v);
                    v
                }
                None => port::inl(0xCFC),
            }
        };

        // Size the BARs with decoding off (as firmware does), then restore everything.
        let command = rw(0x04, None);
        rw(0x04, Some(command & !0x3));
        let mut raw = [0u32; 6];
        let mut masks = [0u32; 6];
        for i in 0..6u8 {
            let off = 0x10 + 4 * i;
            raw[usize::from(i)] = rw(off, None);
            rw(off, Some(0xFFFF_FFFF));
            masks[usize::from(i)] = rw(off, None);
            rw(off, Some(raw[usize::from(i)]));
        }
        rw(0x04, Some(command));
        let bars = decode(raw, masks);
        let mut maps: [Option<Mapping>; 6] = Default::default();
        for (i, bar) in bars.iter().enumerate() {
            if let Some(RealBar {
                phys,
                size,
                io: false,
                ..
            }) = *bar
            {
                let len = usize::try_from(size).map_err(|_| gone("BAR", "too large"))?;
                maps[i] = Some(Mapping::physical(phys, len)?);
                log::info!("virtio-scsi {dev} BAR{i}: {size:#x} bytes at {phys:#x}");
            }
        }
        let line = rw(0x3C, None) as u8;
        if line == 0 || line == 0xFF {
            return Err(gone("PCI", format!("{dev} has no legacy interrupt line")));
        }
        let irq = Irq::open(line)?;
        let dma = Mapping::dma(dma_bytes)?;
        let dma_bus = translate(dma.ptr.as_ptr() as usize)?;
        log::info!(
            "virtio-scsi {dev}: IRQ {line}, {} KiB of DMA memory at bus address {dma_bus:#x}",
            dma.len / 1024
        );
        Ok(Self {
            dev,
            config: config_lock,
            shadow: Mutex::new(BarShadow::new(bars)),
            maps,
            dma,
            dma_bus,
            irq: Mutex::new(irq),
        })
    }

    /// The function this platform drives.
    pub fn pci_address(&self) -> PciAddress {
        self.dev
    }

    /// The mapped address of driver-side MMIO `[addr, addr + width)`.
    fn mmio_ptr(&self, addr: u64, width: Width) -> Result<*mut u8> {
        let len = width.bytes() as u64;
        let (bar, off) = lock(&self.shadow)
            .translate(addr, len)
            .ok_or_else(|| PlatformError::Invalid(format!("MMIO {addr:#x} is in no BAR")))?;
        let map = self.maps[bar]
            .as_ref()
            .ok_or_else(|| PlatformError::Invalid(format!("BAR{bar} is not mapped")))?;
        let off = usize::try_from(off).map_err(|_| PlatformError::Invalid("offset".into()))?;
        if off % width.bytes() != 0 || off + width.bytes() > map.len {
            return Err(PlatformError::Invalid(format!("MMIO {addr:#x} misaligned")));
        }
        // In bounds of the mapping (checked above).
        Ok(map.ptr.as_ptr().wrapping_add(off))
    }

    fn config_access(&self, dev: PciAddress, offset: u8, value: Option<u32>) -> u32 {
        let _g = lock(&self.config);
        port::outl(
            0xCF8,
            cf8_address(dev.bus, dev.device, dev.function, offset),
        );
        match value {
            Some(v) => {
                port::outl(0xCFC, v);
                v
            }
            None => port::inl(0xCFC),
        }
    }
}

/// BAR register index of a config offset (0x10..=0x24), if it is one.
fn bar_index(offset: u8) -> Option<usize> {
    (0x10..=0x24)
        .contains(&offset)
        .then(|| usize::from((offset - 0x10) / 4))
}

impl Platform for RedoxPlatform {
    fn pci_read32(&self, dev: PciAddress, offset: u8) -> Result<u32> {
        if dev == self.dev
            && let Some(i) = bar_index(offset & 0xFC)
        {
            return Ok(lock(&self.shadow).read(i));
        }
        Ok(self.config_access(dev, offset & 0xFC, None))
    }

    fn pci_write32(&self, dev: PciAddress, offset: u8, value: u32) -> Result<()> {
        if dev != self.dev {
            return Err(PlatformError::Invalid(format!(
                "config write to {dev}, which is not this driver's function"
            )));
        }
        if let Some(i) = bar_index(offset & 0xFC) {
            lock(&self.shadow).write(i, value);
            return Ok(());
        }
        self.config_access(dev, offset & 0xFC, Some(value));
        Ok(())
    }

    fn mmio_read(&self, addr: u64, width: Width) -> Result<u64> {
        let p = self.mmio_ptr(addr, width)?;
        // SAFETY: `p` is inside a mapped BAR, aligned to `width` (checked by mmio_ptr);
        // device registers are read with one volatile access of the requested width.
        let v = unsafe {
            match width {
                Width::U8 => u64::from(p.read_volatile()),
                Width::U16 => u64::from(p.cast::<u16>().read_volatile()),
                Width::U32 => u64::from(p.cast::<u32>().read_volatile()),
                Width::U64 => p.cast::<u64>().read_volatile(),
            }
        };
        Ok(v)
    }

    fn mmio_write(&self, addr: u64, width: Width, value: u64) -> Result<()> {
        let p = self.mmio_ptr(addr, width)?;
        // SAFETY: as for `mmio_read`; the value is truncated to the access width.
        unsafe {
            match width {
                Width::U8 => p.write_volatile(value as u8),
                Width::U16 => p.cast::<u16>().write_volatile(value as u16),
                Width::U32 => p.cast::<u32>().write_volatile(value as u32),
                Width::U64 => p.cast::<u64>().write_volatile(value),
            }
        }
        Ok(())
    }

    fn mmio_write_posted(&self, addr: u64, width: Width, value: u64) -> Result<()> {
        // Uncacheable MMIO writes are posted by the hardware already, in program order.
        self.mmio_write(addr, width, value)
    }

    fn port_read(&self, port: u16, width: Width) -> Result<u32> {
        Ok(match width {
            Width::U8 => u32::from(port::inb(port)),
            Width::U16 => u32::from(port::inw(port)),
            Width::U32 => port::inl(port),
            Width::U64 => return Err(PlatformError::Invalid("64-bit port access".into())),
        })
    }

    fn port_write(&self, port: u16, width: Width, value: u32) -> Result<()> {
        match width {
            Width::U8 => port::outb(port, value as u8),
            Width::U16 => port::outw(port, value as u16),
            Width::U32 => port::outl(port, value),
            Width::U64 => return Err(PlatformError::Invalid("64-bit port access".into())),
        }
        Ok(())
    }

    fn dma_window(&self) -> DmaWindow {
        DmaWindow {
            device_addr: self.dma_bus,
            cpu_ptr: self.dma.ptr,
            len: self.dma.len,
        }
    }

    fn mmio_window(&self) -> MmioWindow {
        VIRTUAL_BAR_WINDOW
    }

    fn wait_irq(&self, timeout: Option<Duration>) -> Result<IrqWait> {
        lock(&self.irq).wait(timeout)
    }

    fn cpu_count(&self) -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    fn current_cpu(&self) -> usize {
        // Redox has no getcpu; per-target steering does not need it, per-CPU degrades to
        // queue 0.
        0
    }

    fn health(&self) -> Result<()> {
        Ok(())
    }
}
