//! A fake virtio-scsi machine for tests: a `platform::Platform` that emulates, in process, a
//! PCI bus with QEMU's modern virtio-scsi function (1af4:1048) and the SCSI disks behind it,
//! and that can be told to misbehave in every way a hostile device can.
//!
//! What it emulates:
//! - PCI config space ([`pci`]): vendor/device/class, BAR sizing of a 32-bit BAR1 and a 64-bit
//!   BAR4, memory decoding, and the capability list with the virtio vendor capabilities
//!   (common, ISR, device, notify, PCI-config) where QEMU puts them.
//! - The virtio-pci common configuration (feature select, status with reset and FEATURES_OK
//!   checks, queue select/size/enable/notify_off/desc/driver/device), the ISR register
//!   (read-to-clear, deasserting INTx), the virtio-scsi device configuration (num_queues,
//!   seg_max, max_sectors, cmd_per_lun, event_info_size, sense_size, cdb_size, max_channel,
//!   max_target, max_lun; sense_size and cdb_size driver-writable).
//! - DMA memory ([`dma`]): a heap window the driver carves rings and buffers from.
//! - The device side of split virtqueues ([`virtq`]) with a careful device's checks.
//! - A SCSI target with in-memory disks ([`scsi`]).
//!
//! The misbehaviour plan ([`faults::FaultPlan`]) covers config values, capabilities, BAR sizes,
//! negotiation, used-ring ids/lengths/indices, response and sense lengths, residuals, status
//! and response bytes, random payloads, commands that never complete or complete twice,
//! DEVICE_NEEDS_RESET, and the machine dying. [`machine::FakeStats`] records what happened,
//! including anything the driver did wrong (`driver_faults`) and MMIO outside every BAR.

pub mod dma;
pub mod faults;
pub mod machine;
pub mod pci;
pub mod scsi;
pub mod virtq;

pub use faults::{
    CapKind, CapOverride, CommandFault, CommandFaults, ConfigFaults, FaultPlan, PciFaults,
    TmfFaults, TransportFaults,
};
pub use machine::{FakeMachine, FakeSpec, FakeStats, OFFERED_FEATURES, UsedLen};
pub use scsi::DiskSpec;
