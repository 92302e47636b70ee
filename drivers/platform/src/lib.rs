//! The "syscall HAL": the small set of capabilities a microkernel gives a driver process, and
//! all that the virtio-scsi driver may use of the operating system.
//!
//! A backend implements [`Platform`] for one way of reaching the hardware: the QEMU machine
//! (`qemu-machine` crate: qtest socket + shared guest RAM), and later Redox (physmap/irq schemes)
//! or Linux (VFIO/UIO). The driver never touches anything else, so it runs unchanged on each.
//!
//! Errors: every access can fail (a machine that died, a broken transport). A failed access
//! returns [`PlatformError`]; the driver turns that into an error for the request, never a panic.

use std::fmt;
use std::ptr::NonNull;
use std::time::Duration;

/// Why a platform access failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PlatformError {
    /// The machine (or the kernel's device) is gone: every later access fails too.
    #[error("machine is gone: {0}")]
    Gone(String),
    /// The backend's transport answered something it should not have.
    #[error("platform protocol error: {0}")]
    Protocol(String),
    /// An argument the backend cannot honour (address outside a window, bad width).
    #[error("invalid platform access: {0}")]
    Invalid(String),
}

/// Result of a platform access.
pub type Result<T> = std::result::Result<T, PlatformError>;

/// Width of a port or MMIO access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// 8 bits.
    U8,
    /// 16 bits.
    U16,
    /// 32 bits.
    U32,
    /// 64 bits.
    U64,
}

impl Width {
    /// Size of the access in bytes.
    pub fn bytes(self) -> usize {
        match self {
            Width::U8 => 1,
            Width::U16 => 2,
            Width::U32 => 4,
            Width::U64 => 8,
        }
    }
}

/// A PCI function's address (bus, device, function).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    /// Bus number.
    pub bus: u8,
    /// Device number, 0..32.
    pub device: u8,
    /// Function number, 0..8.
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// A window of memory that both the CPU (this process) and the device can reach.
///
/// `device_addr` is what goes into descriptors; `cpu_ptr` is where this process sees the same
/// bytes. The device may read or write any byte of it at any time it has been handed a
/// descriptor for it, so the driver only ever accesses it through raw pointers or volatile or
/// atomic operations, never through long-lived references.
#[derive(Clone, Copy, Debug)]
pub struct DmaWindow {
    /// Address of the first byte as the device sees it.
    pub device_addr: u64,
    /// Address of the first byte as this process sees it.
    pub cpu_ptr: NonNull<u8>,
    /// Length in bytes.
    pub len: usize,
}

// SAFETY: a DmaWindow is only a description (addresses and a length); any access through
// `cpu_ptr` is unsafe and the accessing code is responsible for synchronisation.
unsafe impl Send for DmaWindow {}
// SAFETY: as above, sharing the description shares no access.
unsafe impl Sync for DmaWindow {}

/// A window of device-visible memory that can be handed to another process: `fd` maps the
/// whole window (offset 0 = `window.device_addr`) and nothing else.
#[derive(Debug)]
pub struct SharedWindow {
    /// The window as this process and the device see it.
    pub window: DmaWindow,
    /// A file descriptor of exactly this window's memory.
    pub fd: std::os::fd::OwnedFd,
}

/// A region of the bus address space where the driver may place a device's memory BARs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioWindow {
    /// First bus address.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What [`Platform::wait_irq`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqWait {
    /// The device's interrupt line is asserted.
    Asserted,
    /// The timeout passed with the line deasserted.
    TimedOut,
}

/// Everything the driver may use of the OS. All methods take `&self` and are safe to call from
/// any thread; ordering between calls from one thread is program order.
pub trait Platform: Send + Sync + 'static {
    /// Reads a 32-bit PCI configuration register (`offset` is dword-aligned).
    fn pci_read32(&self, dev: PciAddress, offset: u8) -> Result<u32>;
    /// Writes a 32-bit PCI configuration register (`offset` is dword-aligned).
    fn pci_write32(&self, dev: PciAddress, offset: u8, value: u32) -> Result<()>;

    /// Reads device memory (a BAR) at bus address `addr`.
    fn mmio_read(&self, addr: u64, width: Width) -> Result<u64>;
    /// Writes device memory and waits until the write has reached the device.
    fn mmio_write(&self, addr: u64, width: Width, value: u64) -> Result<()>;
    /// Writes device memory without waiting for it to complete (a posted write, like a PCIe
    /// memory write). Writes from one thread reach the device in order, and before any later
    /// non-posted access from that thread. Used for queue notifications on the hot path.
    fn mmio_write_posted(&self, addr: u64, width: Width, value: u64) -> Result<()>;

    /// Reads an I/O port.
    fn port_read(&self, port: u16, width: Width) -> Result<u32>;
    /// Writes an I/O port.
    fn port_write(&self, port: u16, width: Width, value: u32) -> Result<()>;

    /// The device-visible memory this driver may carve into rings and buffers.
    fn dma_window(&self) -> DmaWindow;
    /// Where the driver may assign memory BARs (unused when [`Platform::bars_preassigned`]).
    fn mmio_window(&self) -> MmioWindow;

    /// Whether the device's memory BARs already hold the bus addresses to use (assigned by
    /// firmware or a kernel, as inside a Linux machine): the driver then reads them and leaves
    /// them where they are instead of placing them in [`Platform::mmio_window`]. The default,
    /// `false`, is a machine with nothing else on it: the driver assigns the BARs itself.
    fn bars_preassigned(&self) -> bool {
        false
    }

    /// The one PCI function this platform gives the driver, when the platform is built for a
    /// single function (then config reads of every other address answer all-ones). `None`, the
    /// default: the driver scans bus 0 for its device.
    fn pci_function(&self) -> Option<PciAddress> {
        None
    }

    /// Waits until the device's (INTx) interrupt line is asserted, or `timeout` passes.
    /// Returns at once if it is asserted now. The driver acknowledges at the device (virtio ISR
    /// read), which deasserts the line; this call never spins.
    fn wait_irq(&self, timeout: Option<Duration>) -> Result<IrqWait>;

    /// Number of CPUs the driver's threads may run on.
    fn cpu_count(&self) -> usize;
    /// The CPU the calling thread runs on now, `0..cpu_count()`.
    fn current_cpu(&self) -> usize;

    /// `Ok` while the machine works; the error that ended it otherwise.
    fn health(&self) -> Result<()>;

    /// A new window of device-visible memory, separate from [`Platform::dma_window`] and from
    /// every other such window, with a file descriptor that maps exactly it (for a client's
    /// zero-copy arena). It stays valid as long as the platform. Backends that cannot do this
    /// return `Invalid`.
    fn alloc_shared_window(&self, len: usize) -> Result<SharedWindow> {
        let _ = len;
        Err(PlatformError::Invalid(
            "this platform has no shareable DMA windows".into(),
        ))
    }
}
