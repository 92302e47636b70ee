//! A RAM-disk server for trying the `vscsi` CLI and the client library without QEMU:
//! `cargo run -p vscsi-ipc --example mem_server -- [SOCKET] [DISK_MIB...]`
//! (default socket: `default_socket_path()`, default disks: one of 64 MiB). Ctrl-C stops it
//! uncleanly; the next start replaces the stale socket. The shared-memory transport is on,
//! with arenas in plain memfds (`vscsi bench --ipc shm` works against it).

use std::sync::{Arc, RwLock};

use block_scheme::{BlockDevice, DiskInfo, DiskScheme};
use vscsi_ipc::{MemfdArenas, Server, ServerConfig, default_socket_path};

struct RamDisks(Vec<RwLock<Vec<u8>>>);

impl BlockDevice for RamDisks {
    fn disks(&self) -> Vec<DiskInfo> {
        self.0
            .iter()
            .map(|d| DiskInfo {
                block_size: 512,
                blocks: d.read().unwrap_or_else(|e| e.into_inner()).len() as u64 / 512,
                readonly: false,
            })
            .collect()
    }
    fn read_blocks(&self, disk: usize, lba: u64, buf: &mut [u8]) -> block_scheme::Result<()> {
        let d = self.0[disk].read().unwrap_or_else(|e| e.into_inner());
        let off = lba as usize * 512;
        buf.copy_from_slice(&d[off..off + buf.len()]);
        Ok(())
    }
    fn write_blocks(&self, disk: usize, lba: u64, buf: &[u8]) -> block_scheme::Result<()> {
        let mut d = self.0[disk].write().unwrap_or_else(|e| e.into_inner());
        let off = lba as usize * 512;
        d[off..off + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self, _disk: usize) -> block_scheme::Result<()> {
        Ok(())
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let socket = args.next().map_or_else(default_socket_path, Into::into);
    let mut sizes: Vec<usize> = args.filter_map(|a| a.parse().ok()).collect();
    if sizes.is_empty() {
        sizes.push(64);
    }
    let disks = RamDisks(
        sizes
            .iter()
            .map(|m| RwLock::new(vec![0; m << 20]))
            .collect(),
    );
    let scheme = Arc::new(DiskScheme::new("disk.virtio-scsi", Arc::new(disks)));
    let mut config = ServerConfig::new(&socket);
    config.arena = Some(Arc::new(MemfdArenas::new()));
    let server = Server::bind(config, scheme)?;
    eprintln!("serving disk.virtio-scsi on {}", socket.display());
    server.run()
}
