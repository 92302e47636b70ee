//! Host IPC for the block scheme: serves a [`block_scheme::DiskScheme`] over a Unix stream
//! socket and lets clients use it.
//!
//! Owns: the wire protocol ([`protocol`], a public contract), the socket server ([`server`],
//! called by the `virtio-scsid` daemon), the client library ([`client`], used by the `vscsi`
//! CLI and other storage clients) and the zero-copy shared-memory transport beside the socket
//! ([`shm`]: ring layout and doorbells; [`shm_server`]; [`shm_client`]). On Redox the same scheme is served through the kernel's
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
//!
//! The shared-memory transport ([`shm`]; the server needs an [`ArenaProvider`] in
//! [`ServerConfig::arena`]): requests go through rings in shared memory, data through an arena
//! the device can reach, so reads and writes from arena buffers are never copied, and many
//! requests need no system call while both sides are busy:
//! ```no_run
//! use std::time::Duration;
//! use vscsi_ipc::{Client, OpenFlags};
//! let client = Client::connect_shm(vscsi_ipc::default_socket_path(), 16 << 20)?;
//! let disk = client.open("disk.virtio-scsi:/0", OpenFlags::READ)?;
//! for i in 0..32u64 {
//!     let buf = client.alloc_buf(4096)?; // in the arena
//!     client.prep_read(&disk, i * 4096, buf)?; // queued
//! }
//! client.submit()?; // one doorbell (or none if the server is polling)
//! let mut done = Vec::with_capacity(32);
//! while done.len() < 32 {
//!     client.reap(1, Some(Duration::from_secs(10)), &mut done)?;
//! }
//! for c in done {
//!     let n = c.result?; // bytes read; the data is in c.buf
//!     assert_eq!(n, c.buf.as_ref().map_or(0, |b| b.len()));
//! }
//! # Ok::<(), vscsi_ipc::ClientError>(())
//! ```

pub mod client;
pub mod errno;
pub mod protocol;
pub mod server;
pub mod shm;
pub mod shm_client;
pub mod shm_server;

pub use client::{Client, ClientError, DiskDetails, DiskIdentity, Handle, OpenFlags, Stat};
pub use errno::{errno_name, errno_text};
pub use server::{Server, ServerConfig, ShutdownHandle, default_socket_path};
pub use shm_client::{ArenaBuf, Completion, PrepError, Ticket};
pub use shm_server::{ArenaMem, ArenaProvider, MemfdArenas};
