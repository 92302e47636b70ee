//! virtio-scsi driver for a userspace driver server.
//!
//! Layers, bottom up: [`hal`] (device-visible memory for `virtio_drivers`), [`transport`]
//! (modern virtio-pci over the platform HAL), [`wire`] (virtio-scsi request and response
//! formats), [`queue`] (one request virtqueue with its fixed slots), [`host`] (device bring-up,
//! command execution and block I/O), [`async_io`] (split-phase submission of single-command
//! reads and writes, for servers that poll) and [`disk`] (what a logical unit is and how it is
//! probed).
//! The only way to the OS is the `platform::Platform` trait.

pub mod async_io;
pub mod control;
pub mod disk;
pub mod error;
pub mod events;
pub mod hal;
pub mod host;
pub mod queue;
pub mod transport;
pub mod wire;

pub use async_io::{AsyncIo, AsyncPoll, CompletionWaker};
pub use disk::Disk;
pub use error::DriverError;
pub use host::{HostConfig, HostStats, ScsiHost};
pub use target_steering::{LockKind, Policy};
