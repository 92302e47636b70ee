//! Host IPC for the block scheme: serves a [`block_scheme::DiskScheme`] over a Unix stream
//! socket and lets clients use it.
//!
//! Owns: the wire protocol ([`protocol`], a public contract), the socket server ([`server`],
//! called by the `virtio-scsid` daemon) and the client library ([`client`], used by the `vscsi`
//! CLI and other storage clients). On Redox the same scheme is served through the kernel's
//! scheme interface instead; this crate is the host (Linux) transport.

pub mod client;
pub mod errno;
pub mod protocol;
pub mod server;

pub use client::{Client, ClientError, Handle, OpenFlags, Stat};
pub use errno::{errno_name, errno_text};
pub use server::{Server, ServerConfig, ShutdownHandle, default_socket_path};
