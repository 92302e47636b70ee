//! `Platform` backend for a virtio-scsi PCI function of the Linux machine the driver runs in
//! (a guest, like SPDK does it): the daemon owns the function from userspace.
//!
//! - **Binding** ([`bind_uio`], [`rebind_kernel`], [`unbind`]): the function is handed to the
//!   kernel's `uio_pci_generic` through `driver_override` and `drivers_probe`, and back.
//! - **Config space**: `/sys/bus/pci/devices/BDF/config` (pread/pwrite). Every other PCI
//!   address reads all-ones, so the driver sees exactly one function
//!   ([`platform::Platform::pci_function`]).
//! - **BARs**: firmware and the kernel have placed them ([`platform::Platform::bars_preassigned`]);
//!   each memory BAR is mapped from `resourceN` and bus addresses are translated into the
//!   mappings (module [`mmio`]).
//! - **DMA memory**: one physically contiguous window of 2 MiB hugepages, located through
//!   `/proc/self/pagemap` (module [`pagemap`] for the pure part, `hugepages` for the syscalls).
//!   There is no IOMMU: device address = physical address. Needs root.
//! - **Interrupts**: the INTx line through `/dev/uioN`: `uio_pci_generic` counts an interrupt
//!   and masks the line (command register bit 10) in its handler; the platform unmasks it by
//!   clearing that bit through config space (the driver has no `irqcontrol`, so writing to
//!   `/dev/uioN` is `ENOSYS`).
//!
//! The pure parts (BDF and sysfs `resource` parsing, pagemap decoding, the contiguous-run
//! finder, bus-address translation) are unit-tested on any host; the rest is Linux-only and
//! exercised by booting a Linux guest.

pub mod bdf;
pub mod mmio;
pub mod pagemap;
pub mod resource;

#[cfg(target_os = "linux")]
mod bind;
#[cfg(target_os = "linux")]
mod hugepages;
#[cfg(target_os = "linux")]
mod linux;

pub use bdf::Bdf;
#[cfg(target_os = "linux")]
pub use bind::{bind_uio, current_driver, rebind_kernel, unbind};
#[cfg(target_os = "linux")]
pub use linux::LinuxPlatform;

/// Why setting up the platform (or binding a function) failed. The messages are meant for the
/// operator: each says what was tried and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file under /sys, /proc or /dev could not be used.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The machine or the device is not as needed.
    #[error("{0}")]
    Setup(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
