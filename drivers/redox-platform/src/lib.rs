//! `Platform` backend for Redox OS: the driver process reaches its virtio-scsi function the way
//! Redox drivers do, through kernel schemes — PCI configuration space through I/O ports
//! `0xCF8`/`0xCFC` (I/O-port rights from the kernel's process scheme), the function's BARs
//! mapped from `/scheme/memory/physical@uc`, DMA memory from
//! `/scheme/memory/zeroed@wb?phys_contiguous` with its bus address from
//! `/scheme/memory/translation`, and the INTx line from `/scheme/irq/N`, waited on with a
//! `redox_event` queue together with a `/scheme/time` timer for timeouts.
//!
//! The driver assigns BARs itself; here the real BARs stay where firmware and `pcid` put them
//! and the driver's assignment is a translation (module [`bars`], pure and tested on any host).
//! The Redox-only part (module `sys`) is compiled only for `target_os = "redox"`; this
//! repository type-checks it with `cargo check --target x86_64-unknown-redox` (it cannot be
//! linked or run here: that needs relibc and a Redox machine).
//!
//! Where this differs from Redox's own drivers: they get their function, BARs and IRQ from
//! `pcid` over the `PCID_CLIENT_CHANNEL` that `pcid-spawner` passes (`pcid_interface`, a crate
//! of the Redox drivers repository, not published on crates.io); this backend finds the
//! function itself (the first 1af4:1004/1af4:1048 on bus 0, as the driver does) and takes the
//! legacy IRQ line from configuration register 0x3C. Configuration accesses use mechanism #1
//! under a process-local lock, which is safe next to `pcid` when `pcid` uses ECAM (the q35
//! machine has MCFG).

pub mod bars;

#[cfg(target_os = "redox")]
mod sys;

#[cfg(target_os = "redox")]
pub use sys::RedoxPlatform;
