//! [`LinuxPlatform`]: the `Platform` of one PCI function bound to `uio_pci_generic`.
//! See the crate documentation for the design.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use platform::{
    DmaWindow, IrqWait, MmioWindow, PciAddress, Platform, PlatformError, Result, Width,
};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::{Mode, OFlags};
use rustix::mm::{MapFlags, ProtFlags};

use crate::bind::{Sysfs, UIO_DRIVER};
use crate::hugepages::HugeWindow;
use crate::mmio::{self, BarRange};
use crate::{Bdf, Error, resource};

/// Config register holding the command (low half) and status (high half) registers.
const COMMAND_STATUS: u8 = 0x04;
/// Status register bit 3 (bit 19 of the dword): the function's INTx is asserted.
const STATUS_INTERRUPT: u32 = 1 << (16 + 3);
/// Command register bit 2: bus master enable.
const COMMAND_BUS_MASTER: u32 = 1 << 2;
/// Command register bit 10: INTx disable (the mask `uio_pci_generic` sets in its handler).
const COMMAND_INTX_DISABLE: u32 = 1 << 10;
/// How often `health` looks at the device at most (it is called on every request).
const HEALTH_INTERVAL_MS: u64 = 100;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One memory BAR mapped from sysfs `resourceN`, unmapped on drop.
struct BarMap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: device registers shared by the process's threads; every access is one volatile
// read or write, and the device defines what concurrent accesses mean.
unsafe impl Send for BarMap {}
// SAFETY: as above.
unsafe impl Sync for BarMap {}

impl BarMap {
    fn map(path: &Path, len: u64) -> std::result::Result<Self, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(Error::io(format!("opening {}", path.display())))?;
        let len = usize::try_from(len)
            .map_err(|_| Error::Setup(format!("{} is too large", path.display())))?
            .next_multiple_of(4096);
        // SAFETY: a new shared mapping of the BAR at an address the kernel picks (it aliases
        // nothing); it is only accessed with volatile reads and writes inside `len`.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &file,
                0,
            )
        }
        .map_err(|e| Error::io(format!("mapping {}", path.display()))(e.into()))?;
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| Error::Setup(format!("mapping {} returned null", path.display())))?;
        Ok(BarMap { ptr, len })
    }
}

impl Drop for BarMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no access is in flight (the
        // platform is being dropped).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A virtio-scsi PCI function of this Linux machine, driven from userspace.
///
/// Threads: every method may be called from any thread. `wait_irq` holds a lock on the UIO
/// device while it waits, so concurrent waiters take turns (each returns on its own interrupt
/// or timeout); the driver has one waiter, its completion thread.
pub struct LinuxPlatform {
    bdf: Bdf,
    dev: PciAddress,
    uio_path: PathBuf,
    /// `/sys/bus/pci/devices/BDF/config`.
    config: File,
    /// Mapped memory BARs, and where each is on the bus (same order).
    bars: Vec<BarMap>,
    ranges: Vec<BarRange>,
    /// `/dev/uioN`, non-blocking.
    uio: Mutex<File>,
    /// Set once the device is found gone; `gone_why` says why.
    gone: AtomicBool,
    gone_why: Mutex<Option<String>>,
    /// Milliseconds since `epoch` of the last presence check by `health`.
    checked_at: AtomicU64,
    epoch: Instant,
    /// The CPUs this process may run on, ascending.
    cpus: Vec<usize>,
    /// Last: freed only after the fields above (the UIO device among them) are closed.
    dma: HugeWindow,
}

impl LinuxPlatform {
    /// Opens PCI function `bdf`, which must be bound to `uio_pci_generic` (see
    /// [`crate::bind_uio`]): maps its memory BARs, opens its UIO device and allocates
    /// `dma_bytes` (rounded up to 2 MiB) of physically contiguous DMA memory. Needs root.
    pub fn open(bdf: Bdf, dma_bytes: usize) -> std::result::Result<Self, Error> {
        let sysfs = Sysfs::system();
        let driver = sysfs.current_driver(&bdf)?;
        if driver.as_deref() != Some(UIO_DRIVER) {
            return Err(Error::Setup(format!(
                "PCI {bdf} is bound to {}, not {UIO_DRIVER} (bind it first)",
                driver.as_deref().unwrap_or("no driver")
            )));
        }
        let dir = sysfs.device(&bdf);
        // The UIO device first, so its descriptor number is below the DMA memfd's.
        let uio_path = sysfs.wait_uio(&bdf)?;
        let uio: OwnedFd = rustix::fs::open(
            &uio_path,
            OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(format!("opening {}", uio_path.display()))(e.into()))?;
        let uio = File::from(uio);
        let config_path = dir.join("config");
        let config = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&config_path)
            .map_err(Error::io(format!("opening {}", config_path.display())))?;
        let mut id = [0u8; 4];
        config
            .read_exact_at(&mut id, 0)
            .map_err(Error::io(format!("reading {}", config_path.display())))?;
        if u32::from_le_bytes(id) == u32::MAX {
            return Err(Error::Setup(format!(
                "PCI {bdf} reads all-ones: it is gone"
            )));
        }

        let res_path = dir.join("resource");
        let text = std::fs::read_to_string(&res_path)
            .map_err(Error::io(format!("reading {}", res_path.display())))?;
        let resources = resource::parse(&text)
            .map_err(|e| Error::Setup(format!("{}: {e}", res_path.display())))?;
        let mut bars = Vec::new();
        let mut ranges = Vec::new();
        for (index, r) in resources.iter().enumerate() {
            let Some(r) = r.filter(resource::Resource::is_memory) else {
                continue;
            };
            bars.push(BarMap::map(&dir.join(format!("resource{index}")), r.len())?);
            ranges.push(BarRange {
                index,
                bus: r.start,
                len: r.len(),
            });
            log::info!(
                "PCI {bdf} BAR{index}: {:#x} bytes at {:#x}",
                r.len(),
                r.start
            );
        }

        let dma = HugeWindow::allocate(dma_bytes, uio.as_fd())?;
        log::info!(
            "PCI {bdf}: {} MiB of DMA memory at physical {:#x}, interrupts through {}",
            dma.len() >> 20,
            dma.phys(),
            uio_path.display()
        );
        let cpus = match rustix::thread::sched_getaffinity(None) {
            Ok(set) => (0..rustix::thread::CpuSet::MAX_CPU)
                .filter(|&c| set.is_set(c))
                .collect(),
            Err(e) => {
                log::warn!("sched_getaffinity: {e}; assuming one CPU");
                vec![0]
            }
        };
        Ok(LinuxPlatform {
            bdf,
            dev: bdf.pci_address(),
            uio_path,
            config,
            bars,
            ranges,
            uio: Mutex::new(uio),
            gone: AtomicBool::new(false),
            gone_why: Mutex::new(None),
            checked_at: AtomicU64::new(0),
            epoch: Instant::now(),
            cpus,
            dma,
        })
    }

    /// The function this platform drives.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// Its UIO device.
    pub fn uio_path(&self) -> &Path {
        &self.uio_path
    }

    fn mark_gone(&self, why: String) -> PlatformError {
        let mut g = lock(&self.gone_why);
        if g.is_none() {
            log::error!("PCI {}: {why}", self.bdf);
            *g = Some(why);
        }
        self.gone.store(true, Ordering::SeqCst);
        PlatformError::Gone(format!("PCI {}: {}", self.bdf, g.as_deref().unwrap_or("")))
    }

    fn gone_error(&self) -> Option<PlatformError> {
        if !self.gone.load(Ordering::Acquire) {
            return None;
        }
        let why = lock(&self.gone_why).clone().unwrap_or_default();
        Some(PlatformError::Gone(format!("PCI {}: {why}", self.bdf)))
    }

    /// Reads a config dword of our function; a failed read means the function is gone.
    fn config_read(&self, offset: u8) -> Result<u32> {
        let mut b = [0u8; 4];
        match self.config.read_exact_at(&mut b, u64::from(offset & 0xFC)) {
            Ok(()) => Ok(u32::from_le_bytes(b)),
            Err(e) => Err(self.mark_gone(format!("config read: {e}"))),
        }
    }

    /// Checks that the function still answers (vendor/device id not all-ones).
    fn check_present(&self) -> Result<()> {
        match self.config_read(0)? {
            u32::MAX => Err(self.mark_gone("config space reads all-ones (removed)".into())),
            _ => Ok(()),
        }
    }

    /// The mapped address of bus address `[addr, addr + width)`.
    fn reg(&self, addr: u64, width: Width) -> Result<*mut u8> {
        let (i, off) =
            mmio::translate(&self.ranges, addr, width.bytes() as u64).ok_or_else(|| {
                PlatformError::Invalid(format!("MMIO {addr:#x} ({width:?}) is in no mapped BAR"))
            })?;
        // In bounds: translate checked off + width <= the BAR's length <= the mapping's.
        Ok(self.bars[i].ptr.as_ptr().wrapping_add(off))
    }

    /// Waits for the INTx line; see `Platform::wait_irq`.
    fn wait_line(&self, uio: &mut File, timeout: Option<Duration>) -> Result<IrqWait> {
        // Forget interrupts counted before now: if the line is still up, the status bit says
        // so below; if not, they were handled already.
        let mut count = [0u8; 4];
        match uio.read(&mut count) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(self.mark_gone(format!("{}: {e}", self.uio_path.display()))),
        }
        let cs = self.config_read(COMMAND_STATUS)?;
        if cs == u32::MAX {
            return Err(self.mark_gone("config space reads all-ones (removed)".into()));
        }
        if cs & STATUS_INTERRUPT != 0 {
            return Ok(IrqWait::Asserted);
        }
        // Unmask: uio_pci_generic masked the line in its handler (command bit 10) and has no
        // `irqcontrol` (writing to /dev/uioN is ENOSYS), so userspace clears the bit through
        // config space, as Documentation/driver-api/uio-howto.rst shows. A 16-bit write of the
        // command register alone (the status half has write-1-to-clear bits). A line raised
        // since the status read interrupts as soon as it is unmasked.
        if cs & COMMAND_INTX_DISABLE != 0 {
            let command = (cs & 0xFFFF & !COMMAND_INTX_DISABLE) as u16;
            self.config
                .write_all_at(&command.to_le_bytes(), u64::from(COMMAND_STATUS))
                .map_err(|e| self.mark_gone(format!("unmasking INTx: {e}")))?;
        }
        let ts = timeout.map(|t| {
            Timespec::try_from(t).unwrap_or(Timespec {
                tv_sec: i64::MAX,
                tv_nsec: 0,
            })
        });
        let mut fds = [PollFd::new(&*uio, PollFlags::IN)];
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(0) => Ok(IrqWait::TimedOut),
            Ok(_) => {
                let revents = fds[0].revents();
                if revents.intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL) {
                    return Err(
                        self.mark_gone(format!("{} reports {revents:?}", self.uio_path.display()))
                    );
                }
                match uio.read(&mut count) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => {
                        return Err(self.mark_gone(format!("{}: {e}", self.uio_path.display())));
                    }
                }
                Ok(IrqWait::Asserted)
            }
            // A signal: a wake-up like a timeout (the caller loops).
            Err(rustix::io::Errno::INTR) => Ok(IrqWait::TimedOut),
            Err(e) => Err(self.mark_gone(format!("poll {}: {e}", self.uio_path.display()))),
        }
    }
}

impl Drop for LinuxPlatform {
    fn drop(&mut self) {
        // Stop the device's DMA before the memory goes: clear bus mastering. (The driver has
        // reset the device already when it shut down cleanly; this covers the rest.)
        if !self.gone.load(Ordering::SeqCst)
            && let Ok(cs) = self.config_read(COMMAND_STATUS)
        {
            let command = (cs & 0xFFFF) & !COMMAND_BUS_MASTER;
            let _ = self
                .config
                .write_all_at(&(command as u16).to_le_bytes(), u64::from(COMMAND_STATUS));
        }
    }
}

impl Platform for LinuxPlatform {
    fn pci_read32(&self, dev: PciAddress, offset: u8) -> Result<u32> {
        if let Some(e) = self.gone_error() {
            return Err(e);
        }
        if dev != self.dev {
            // No other function exists for this platform.
            return Ok(u32::MAX);
        }
        self.config_read(offset)
    }

    fn pci_write32(&self, dev: PciAddress, offset: u8, value: u32) -> Result<()> {
        if let Some(e) = self.gone_error() {
            return Err(e);
        }
        if dev != self.dev {
            return Err(PlatformError::Invalid(format!(
                "config write to {dev}: this platform has only {}",
                self.bdf
            )));
        }
        self.config
            .write_all_at(&value.to_le_bytes(), u64::from(offset & 0xFC))
            .map_err(|e| self.mark_gone(format!("config write: {e}")))
    }

    fn mmio_read(&self, addr: u64, width: Width) -> Result<u64> {
        let p = self.reg(addr, width)?;
        // SAFETY: `p` is inside a mapped BAR and aligned to `width` (checked by `reg`); a
        // device register is read with volatile accesses. A 64-bit register is read as two
        // 32-bit halves, low first (virtio 1.2 §4.1.3.1: drivers use 32-bit accesses for
        // 64-bit fields; a PCI device need not accept 64-bit ones).
        let v = unsafe {
            match width {
                Width::U8 => u64::from(p.read_volatile()),
                Width::U16 => u64::from(p.cast::<u16>().read_volatile()),
                Width::U32 => u64::from(p.cast::<u32>().read_volatile()),
                Width::U64 => {
                    let lo = p.cast::<u32>().read_volatile();
                    let hi = p.add(4).cast::<u32>().read_volatile();
                    u64::from(lo) | (u64::from(hi) << 32)
                }
            }
        };
        Ok(v)
    }

    fn mmio_write(&self, addr: u64, width: Width, value: u64) -> Result<()> {
        self.mmio_write_posted(addr, width, value)?;
        // Wait for the write to complete: a read from the same device is not passed by the
        // posted write (PCI ordering). The driver writes only registers whose reads have no
        // side effects (virtio common and device configuration).
        let flush = match width {
            Width::U64 => Width::U32,
            w => w,
        };
        self.mmio_read(addr, flush).map(drop)
    }

    fn mmio_write_posted(&self, addr: u64, width: Width, value: u64) -> Result<()> {
        let p = self.reg(addr, width)?;
        // Rings and buffers written before this (ordinary stores to DMA memory) must be
        // visible to the device before it sees the register write.
        fence(Ordering::SeqCst);
        // SAFETY: as for `mmio_read`; the value is truncated to the access width, and a
        // 64-bit register is written as two 32-bit halves, low first.
        unsafe {
            match width {
                Width::U8 => p.write_volatile(value as u8),
                Width::U16 => p.cast::<u16>().write_volatile(value as u16),
                Width::U32 => p.cast::<u32>().write_volatile(value as u32),
                Width::U64 => {
                    p.cast::<u32>().write_volatile(value as u32);
                    p.add(4).cast::<u32>().write_volatile((value >> 32) as u32);
                }
            }
        }
        Ok(())
    }

    fn port_read(&self, port: u16, _width: Width) -> Result<u32> {
        Err(PlatformError::Invalid(format!(
            "port {port:#x}: this platform has no port I/O (the driver uses memory BARs)"
        )))
    }

    fn port_write(&self, port: u16, _width: Width, _value: u32) -> Result<()> {
        Err(PlatformError::Invalid(format!(
            "port {port:#x}: this platform has no port I/O (the driver uses memory BARs)"
        )))
    }

    fn dma_window(&self) -> DmaWindow {
        DmaWindow {
            device_addr: self.dma.phys(),
            cpu_ptr: self.dma.ptr(),
            len: self.dma.len(),
        }
    }

    fn mmio_window(&self) -> MmioWindow {
        // Unused: the BARs are preassigned.
        MmioWindow { base: 0, len: 0 }
    }

    fn bars_preassigned(&self) -> bool {
        true
    }

    fn pci_function(&self) -> Option<PciAddress> {
        Some(self.dev)
    }

    /// If the status register shows the line asserted, returns at once; otherwise unmasks it
    /// (config space) and polls the UIO device until `uio_pci_generic`'s handler counts an
    /// interrupt (and masks the line again) or the timeout passes. An `Asserted` may be
    /// spurious (an interrupt the driver already handled); the driver copes.
    fn wait_irq(&self, timeout: Option<Duration>) -> Result<IrqWait> {
        if let Some(e) = self.gone_error() {
            return Err(e);
        }
        let mut uio = lock(&self.uio);
        self.wait_line(&mut uio, timeout)
    }

    fn cpu_count(&self) -> usize {
        self.cpus.len().max(1)
    }

    fn current_cpu(&self) -> usize {
        let cpu = rustix::thread::sched_getcpu();
        self.cpus
            .iter()
            .position(|&c| c == cpu)
            .unwrap_or(cpu % self.cpu_count())
    }

    fn health(&self) -> Result<()> {
        if let Some(e) = self.gone_error() {
            return Err(e);
        }
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.checked_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= HEALTH_INTERVAL_MS
            && self
                .checked_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.check_present()?;
        }
        Ok(())
    }

    // alloc_shared_window: left at the trait's default (`Invalid`; the IPC falls back to
    // copies). A client's arena would be a hugetlb memfd handed to the client, and a holder of
    // that descriptor can punch holes in it (fallocate needs only write access, which the
    // client's writable mapping needs too; only F_SEAL_WRITE stops it, and that forbids the
    // mapping): the freed hugepages would go back to the kernel while the device, with no
    // IOMMU, may still write to their physical addresses. So no client gets DMA memory here.
}
