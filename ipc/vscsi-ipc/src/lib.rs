//! Host IPC for the block scheme: serves a [`block_scheme::DiskScheme`] over a Unix stream
//! socket and lets clients use it.
//!
//! Owns: the wire protocol ([`protocol`], a public contract), the socket server ([`server`],
//! called by the `virtio-scsid` daemon) and the client library ([`client`], used by the `vscsi`
//! CLI and other storage clients). On Redox the same scheme is served through the kernel's
//! scheme interface instead; this crate is the host (Linux) transport.
//!
//! Serving (the daemon):
//! ```no_run
//! # use std::sync::Arc;
//! # fn demo<D: block_scheme::BlockDevice>(device: Arc<D>) -> std::io::Result<()> {
//! use vscsi_ipc::{Server, ServerConfig, default_socket_path};
//! let scheme = Arc::new(block_scheme::DiskScheme::new("disk.virtio-scsi", device));
//! let server = Server::bind(ServerConfig::new(default_socket_path()), scheme)?;
//! let stop = server.shutdown_handle(); // give to the signal-handling thread: stop.shutdown()
//! server.run()?; // returns after stop.shutdown(), with every handle closed
//! # drop(stop); Ok(()) }
//! ```
//!
//! Using it (a client):
//! ```no_run
//! use vscsi_ipc::{Client, OpenFlags};
//! let client = Client::connect_default()?;
//! let disk = client.open("disk.virtio-scsi:/0", OpenFlags::READ_WRITE)?;
//! let mut sector = vec![0u8; 512];
//! client.read_exact_at(&disk, 0, &mut sector)?;
//! client.write_all_at(&disk, 4096, b"hello")?;
//! client.sync(&disk)?;
//! client.close(disk)?;
//! # Ok::<(), vscsi_ipc::ClientError>(())
//! ```

pub mod client;
pub mod errno;
pub mod protocol;
pub mod server;

pub use client::{Client, ClientError, Handle, OpenFlags, Stat};
pub use errno::{errno_name, errno_text};
pub use server::{Server, ServerConfig, ShutdownHandle, default_socket_path};
