//! Test support: an in-memory `BlockDevice` (with optional delays, a gate to hold requests and
//! optional split-phase I/O) and a server running on a socket in a temporary directory.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use block_scheme::{AsyncBlockIo, AsyncBuf, AsyncPoll, BlockDevice, DiskInfo, DiskScheme, IoWaker};
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
    /// Offer split-phase I/O (`BlockDevice::async_io`): commands run at once, or (`slow`
    /// LBAs, or while `async_hold` is set) on a thread of their own; every 5th needs the slow
    /// path. Commands touching `gate_lba` are declined (the blocking path holds them).
    pub async_io: bool,
    /// Asynchronous commands wait while set.
    pub async_hold: AtomicBool,
    /// Asynchronous commands started, and settled through the slow path.
    pub async_started: AtomicU64,
    pub async_slow: AtomicU64,
    /// Set by `TestServer` (split-phase commands need the device after the call).
    me: OnceLock<Weak<MemDevice>>,
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
            async_io: false,
            async_hold: AtomicBool::new(false),
            async_started: AtomicU64::new(0),
            async_slow: AtomicU64::new(0),
            me: OnceLock::new(),
        }
    }

    /// The same, with split-phase I/O.
    pub fn with_async(sizes: &[(u32, u64)]) -> MemDevice {
        MemDevice {
            async_io: true,
            ..MemDevice::new(sizes)
        }
    }

    fn gated(&self, disk: usize, lba: u64, nblocks: u64) -> bool {
        self.gate_lba
            .is_some_and(|g| disk == 0 && lba <= g && g < lba + nblocks)
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

    fn async_io(&self, waker: Arc<dyn IoWaker>) -> Option<Box<dyn AsyncBlockIo>> {
        let dev = self.me.get()?.upgrade()?;
        self.async_io.then(|| {
            Box::new(MemIo {
                dev,
                waker,
                cmd: None,
                n: 0,
            }) as Box<dyn AsyncBlockIo>
        })
    }
}

/// One split-phase command of a `MemIo`.
struct Cmd {
    done: AtomicBool,
    result: Mutex<Option<block_scheme::Result<()>>>,
    /// Settles through the slow path.
    slow: bool,
}

struct MemIo {
    dev: Arc<MemDevice>,
    waker: Arc<dyn IoWaker>,
    cmd: Option<Arc<Cmd>>,
    n: u64,
}

/// Runs a command on the device and answers it.
fn run_cmd(
    dev: &MemDevice,
    disk: usize,
    lba: u64,
    ptr: usize,
    len: usize,
    write: bool,
) -> block_scheme::Result<()> {
    // SAFETY: the buffer is lent to the command until it settles, which is after this.
    let bytes = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
    if write {
        dev.write_blocks(disk, lba, bytes)
    } else {
        dev.read_blocks(disk, lba, bytes)
    }
}

impl AsyncBlockIo for MemIo {
    unsafe fn submit(
        &mut self,
        disk: usize,
        lba: u64,
        buf: AsyncBuf,
        write: bool,
    ) -> block_scheme::Result<bool> {
        assert!(self.cmd.is_none(), "submit while a command is in flight");
        let bs = u64::from(self.dev.disks[disk].block_size);
        if self.dev.gated(disk, lba, buf.len as u64 / bs) {
            return Ok(false);
        }
        self.n += 1;
        self.dev.async_started.fetch_add(1, Ordering::SeqCst);
        let cmd = Arc::new(Cmd {
            done: AtomicBool::new(false),
            result: Mutex::new(None),
            slow: self.n.is_multiple_of(5),
        });
        self.cmd = Some(cmd.clone());
        let delayed = self.dev.async_hold.load(Ordering::SeqCst)
            || (self.dev.slow && (lba % 8 == 3 || lba % 8 == 5));
        let (dev, waker, ptr) = (
            self.dev.clone(),
            self.waker.clone(),
            buf.ptr.as_ptr() as usize,
        );
        let answer = move || {
            let r = run_cmd(&dev, disk, lba, ptr, buf.len, write);
            *cmd.result.lock().unwrap() = Some(r);
            cmd.done.store(true, Ordering::SeqCst);
            waker.wake();
        };
        if delayed {
            let dev = self.dev.clone();
            thread::spawn(move || {
                while dev.async_hold.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(1));
                }
                thread::sleep(Duration::from_millis(2));
                answer();
            });
        } else {
            answer();
        }
        Ok(true)
    }

    fn poll(&mut self) -> AsyncPoll {
        let Some(cmd) = &self.cmd else {
            return AsyncPoll::Done;
        };
        if !cmd.done.load(Ordering::SeqCst) {
            return AsyncPoll::Pending;
        }
        let ok = matches!(*cmd.result.lock().unwrap(), Some(Ok(())));
        if cmd.slow || !ok {
            return AsyncPoll::Slow;
        }
        self.cmd = None;
        AsyncPoll::Done
    }

    fn finish_blocking(&mut self) -> block_scheme::Result<()> {
        let Some(cmd) = self.cmd.take() else {
            return Ok(());
        };
        while !cmd.done.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(1));
        }
        self.dev.async_slow.fetch_add(1, Ordering::SeqCst);
        cmd.result.lock().unwrap().take().unwrap_or(Ok(()))
    }

    fn deadline(&self) -> Option<Instant> {
        self.cmd
            .as_ref()
            .map(|_| Instant::now() + Duration::from_secs(60))
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
        let _ = device.me.set(Arc::downgrade(&device));
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
