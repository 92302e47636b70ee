//! Test support: an in-memory `BlockDevice` (with optional delays and a gate to hold requests)
//! and a server running on a socket in a temporary directory.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread;
use std::time::Duration;

use block_scheme::{BlockDevice, DiskInfo, DiskScheme};
use vscsi_ipc::{Server, ServerConfig, ShutdownHandle};

pub const SCHEME: &str = "disk.virtio-scsi";

pub struct MemDisk {
    pub block_size: u32,
    pub data: RwLock<Vec<u8>>,
    pub readonly: bool,
}

/// An in-memory device. Reads of blocks whose LBA is `slow_lba` mod 8 sleep a little (to
/// force out-of-order completion); reads touching `gate_lba` on disk 0 wait until the gate
/// is opened.
pub struct MemDevice {
    pub disks: Vec<MemDisk>,
    pub slow: bool,
    pub gate_lba: Option<u64>,
    gate: Mutex<bool>,
    gate_cv: Condvar,
    pub gated_waiting: AtomicU64,
    pub flushes: AtomicU64,
}

impl MemDevice {
    pub fn new(sizes: &[(u32, u64)]) -> MemDevice {
        MemDevice {
            disks: sizes
                .iter()
                .enumerate()
                .map(|(d, &(bs, blocks))| {
                    let len = (u64::from(bs) * blocks) as usize;
                    MemDisk {
                        block_size: bs,
                        data: RwLock::new(pattern(d as u64, 0, len)),
                        readonly: false,
                    }
                })
                .collect(),
            slow: false,
            gate_lba: None,
            gate: Mutex::new(false),
            gate_cv: Condvar::new(),
            gated_waiting: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        }
    }

    pub fn open_gate(&self) {
        *self.gate.lock().unwrap() = true;
        self.gate_cv.notify_all();
    }

    pub fn disk_bytes(&self, disk: usize, off: usize, len: usize) -> Vec<u8> {
        self.disks[disk].data.read().unwrap()[off..off + len].to_vec()
    }
}

/// Deterministic content: byte at absolute offset `o` of disk `d`.
pub fn pattern(d: u64, start: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let o = start + i;
            (o.wrapping_mul(31) ^ (o >> 9) ^ d.wrapping_mul(101)) as u8
        })
        .collect()
}

impl BlockDevice for MemDevice {
    fn disks(&self) -> Vec<DiskInfo> {
        self.disks
            .iter()
            .map(|d| DiskInfo {
                block_size: d.block_size,
                blocks: d.data.read().unwrap().len() as u64 / u64::from(d.block_size),
                readonly: d.readonly,
            })
            .collect()
    }

    fn read_blocks(&self, disk: usize, lba: u64, buf: &mut [u8]) -> block_scheme::Result<()> {
        let d = &self.disks[disk];
        let bs = u64::from(d.block_size);
        let nblocks = buf.len() as u64 / bs;
        if let Some(g) = self.gate_lba
            && disk == 0
            && lba <= g
            && g < lba + nblocks
        {
            self.gated_waiting.fetch_add(1, Ordering::SeqCst);
            let mut open = self.gate.lock().unwrap();
            while !*open {
                open = self.gate_cv.wait(open).unwrap();
            }
        }
        if self.slow && lba % 8 == 3 {
            thread::sleep(Duration::from_millis(3));
        }
        let off = (lba * bs) as usize;
        let data = d.data.read().unwrap();
        buf.copy_from_slice(&data[off..off + buf.len()]);
        Ok(())
    }

    fn write_blocks(&self, disk: usize, lba: u64, buf: &[u8]) -> block_scheme::Result<()> {
        let d = &self.disks[disk];
        if self.slow && lba % 8 == 5 {
            thread::sleep(Duration::from_millis(2));
        }
        let off = (lba * u64::from(d.block_size)) as usize;
        d.data.write().unwrap()[off..off + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self, _disk: usize) -> block_scheme::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub scheme: Arc<DiskScheme<MemDevice>>,
    pub device: Arc<MemDevice>,
    pub shutdown: ShutdownHandle,
    pub thread: Option<thread::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub fn start(device: MemDevice) -> TestServer {
        Self::start_with(device, |_| {})
    }

    pub fn start_with(device: MemDevice, tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vscsi.sock");
        let device = Arc::new(device);
        let scheme = Arc::new(DiskScheme::new(SCHEME, device.clone()));
        let mut config = ServerConfig::new(&path);
        config.workers = 16;
        tweak(&mut config);
        let server = Server::bind(config, scheme.clone()).unwrap();
        let shutdown = server.shutdown_handle();
        let thread = thread::spawn(move || server.run());
        TestServer {
            dir,
            path,
            scheme,
            device,
            shutdown,
            thread: Some(thread),
        }
    }

    pub fn stop(&mut self) -> std::io::Result<()> {
        self.shutdown.shutdown();
        match self.thread.take() {
            Some(t) => t.join().unwrap(),
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.device.open_gate();
        let _ = self.stop();
    }
}
