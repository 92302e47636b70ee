//! Asynchronous requests through the scheme (`DiskScheme::submit_async`): the checks a read or
//! write gets (access mode, root, region, `EROFS`, `ENODEV`), what falls back to the blocking
//! path, the partition window, the write range lock held until the request settles, and the
//! partition-table cache told after a whole-disk write. The device is the fixture wrapped with
//! a split-phase layer whose commands run when polled (or are held, or need the slow path).

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use syscall::error::{EBADF, ENODEV, EROFS};
use syscall::flag::{O_RDONLY, O_RDWR, O_WRONLY};

use super::fixture::{MemDevice, initial_byte};
use super::{ctx, errno};
use crate::{
    AsyncBlockIo, AsyncBuf, AsyncPoll, AsyncSlot, BlockDevice, DiskInfo, DiskScheme, IoWaker,
    MAX_IO_CHUNK, Result,
};

/// How the split-phase layer behaves, and what it saw.
#[derive(Default)]
struct Ctl {
    /// Commands stay pending while set.
    hold: AtomicBool,
    /// Commands answer `Slow` (then run in `finish_blocking`).
    slow: AtomicBool,
    /// `submit` answers "not now".
    refuse: AtomicBool,
    /// `(disk, lba, len, write)` of every command started.
    started: Mutex<Vec<(usize, u64, usize, bool)>>,
}

/// The fixture with split-phase I/O.
struct AsyncMem {
    dev: Arc<MemDevice>,
    ctl: Arc<Ctl>,
}

impl BlockDevice for AsyncMem {
    fn disks(&self) -> Vec<DiskInfo> {
        self.dev.disks()
    }
    fn read_blocks(&self, disk: usize, lba: u64, buf: &mut [u8]) -> Result<()> {
        self.dev.read_blocks(disk, lba, buf)
    }
    fn write_blocks(&self, disk: usize, lba: u64, buf: &[u8]) -> Result<()> {
        self.dev.write_blocks(disk, lba, buf)
    }
    fn flush(&self, disk: usize) -> Result<()> {
        self.dev.flush(disk)
    }
    fn generation(&self, disk: usize) -> u64 {
        self.dev.generation(disk)
    }
    fn async_io(&self, waker: Arc<dyn IoWaker>) -> Option<Box<dyn AsyncBlockIo>> {
        Some(Box::new(MemIo {
            dev: self.dev.clone(),
            ctl: self.ctl.clone(),
            _waker: waker,
            cmd: None,
        }))
    }
}

struct MemIo {
    dev: Arc<MemDevice>,
    ctl: Arc<Ctl>,
    _waker: Arc<dyn IoWaker>,
    cmd: Option<(usize, u64, AsyncBuf, bool)>,
}

// SAFETY: the buffer pointer is lent by the test for the command's lifetime.
unsafe impl Send for MemIo {}

impl MemIo {
    fn run(&mut self) -> Result<()> {
        let Some((disk, lba, buf, write)) = self.cmd.take() else {
            return Ok(());
        };
        // SAFETY: lent until the command settles (now).
        let bytes = unsafe { std::slice::from_raw_parts_mut(buf.ptr.as_ptr(), buf.len) };
        if write {
            self.dev.write_blocks(disk, lba, bytes)
        } else {
            self.dev.read_blocks(disk, lba, bytes)
        }
    }
}

impl AsyncBlockIo for MemIo {
    unsafe fn submit(&mut self, disk: usize, lba: u64, buf: AsyncBuf, write: bool) -> Result<bool> {
        assert!(self.cmd.is_none(), "submit while a command is in flight");
        if self.ctl.refuse.load(Ordering::SeqCst) {
            return Ok(false);
        }
        self.ctl
            .started
            .lock()
            .unwrap()
            .push((disk, lba, buf.len, write));
        self.cmd = Some((disk, lba, buf, write));
        Ok(true)
    }

    fn poll(&mut self) -> AsyncPoll {
        if self.cmd.is_none() {
            return AsyncPoll::Done;
        }
        if self.ctl.hold.load(Ordering::SeqCst) {
            return AsyncPoll::Pending;
        }
        if self.ctl.slow.load(Ordering::SeqCst) {
            return AsyncPoll::Slow;
        }
        match self.run() {
            Ok(()) => AsyncPoll::Done,
            Err(_) => AsyncPoll::Slow,
        }
    }

    fn finish_blocking(&mut self) -> Result<()> {
        while self.ctl.hold.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.run()
    }

    fn deadline(&self) -> Option<Instant> {
        self.cmd.map(|_| Instant::now() + Duration::from_secs(30))
    }
}

struct NoWake;
impl IoWaker for NoWake {
    fn wake(&self) {}
}

fn setup(disks: &[(u32, u64, bool)]) -> (DiskScheme<AsyncMem>, Arc<MemDevice>, Arc<Ctl>) {
    let dev = MemDevice::new(disks);
    let ctl = Arc::new(Ctl::default());
    let s = DiskScheme::new(
        super::NAME,
        Arc::new(AsyncMem {
            dev: dev.clone(),
            ctl: ctl.clone(),
        }),
    );
    (s, dev, ctl)
}

fn slot(s: &DiskScheme<AsyncMem>) -> AsyncSlot {
    s.async_slot(Arc::new(NoWake))
        .expect("the device has split-phase I/O")
}

fn buf(v: &mut [u8]) -> AsyncBuf {
    AsyncBuf {
        ptr: NonNull::new(v.as_mut_ptr()).unwrap(),
        len: v.len(),
    }
}

/// `submit_async` on a buffer that outlives the request (every test settles before it drops
/// the buffer).
fn submit(
    s: &DiskScheme<AsyncMem>,
    slot: &mut AsyncSlot,
    id: usize,
    write: bool,
    offset: u64,
    b: &mut [u8],
) -> Result<bool> {
    // SAFETY: the tests keep `b` alive and untouched until the request settles.
    unsafe { s.submit_async(slot, id, write, offset, buf(b)) }
}

#[test]
fn a_device_without_split_phase_io_gives_no_slot() {
    let (s, _) = super::scheme(&[(512, 64, false)]);
    assert!(s.async_slot(Arc::new(NoWake)).is_none());
}

#[test]
fn reads_and_writes_round_trip() {
    let (s, dev, ctl) = setup(&[(512, 1024, false)]);
    let id = s.open("0", O_RDWR, &ctx()).unwrap();
    let mut slot = slot(&s);
    let mut data = vec![0xA5u8; 4096];
    assert_eq!(submit(&s, &mut slot, id, true, 8192, &mut data), Ok(true));
    assert!(slot.is_busy());
    assert!(slot.deadline().is_some());
    assert_eq!(
        submit(&s, &mut slot, id, false, 0, &mut [0u8; 512]),
        Ok(false),
        "a busy slot takes nothing"
    );
    assert_eq!(slot.poll(), AsyncPoll::Done);
    assert!(!slot.is_busy() && slot.deadline().is_none());
    assert_eq!(dev.contents(0, 8192, 4096), data);
    let mut back = vec![0u8; 4096];
    assert_eq!(submit(&s, &mut slot, id, false, 8192, &mut back), Ok(true));
    assert_eq!(slot.poll(), AsyncPoll::Done);
    assert_eq!(back, data);
    // The slow path settles too.
    ctl.slow.store(true, Ordering::SeqCst);
    let mut more = vec![0x3Cu8; 1024];
    assert_eq!(submit(&s, &mut slot, id, true, 512, &mut more), Ok(true));
    assert_eq!(slot.poll(), AsyncPoll::Slow);
    assert_eq!(slot.finish_blocking(), Ok(()));
    assert!(!slot.is_busy());
    assert_eq!(dev.contents(0, 512, 1024), more);
    assert_eq!(
        *ctl.started.lock().unwrap(),
        vec![
            (0, 16, 4096, true),
            (0, 16, 4096, false),
            (0, 1, 1024, true)
        ]
    );
}

#[test]
fn same_checks_and_errors_as_blocking_io() {
    let (s, dev, ctl) = setup(&[(512, 1024, false), (4096, 64, false)]);
    let mut slot = slot(&s);
    let mut b = vec![0u8; 4096];
    let ro = s.open("0", O_RDONLY, &ctx()).unwrap();
    let wo = s.open("0", O_WRONLY, &ctx()).unwrap();
    let root = s.open("", O_RDONLY, &ctx()).unwrap();
    // Access mode and unknown handles: EBADF.
    assert_eq!(errno(submit(&s, &mut slot, ro, true, 0, &mut b)), EBADF);
    assert_eq!(errno(submit(&s, &mut slot, wo, false, 0, &mut b)), EBADF);
    assert_eq!(errno(submit(&s, &mut slot, 9999, false, 0, &mut b)), EBADF);
    // The root reads its listing on the blocking path.
    assert_eq!(submit(&s, &mut slot, root, false, 0, &mut b), Ok(false));
    // Not whole blocks inside the region: the blocking path (which does RMW, or clamps).
    for (offset, len) in [(1u64, 4096usize), (0, 1000), (1024 * 512 - 512, 1024)] {
        assert_eq!(
            submit(&s, &mut slot, ro, false, offset, &mut b[..len]),
            Ok(false),
            "{offset}+{len}"
        );
    }
    assert_eq!(submit(&s, &mut slot, ro, false, 1 << 40, &mut b), Ok(false));
    let mut big = vec![0u8; MAX_IO_CHUNK + 512];
    assert_eq!(submit(&s, &mut slot, ro, false, 0, &mut big), Ok(false));
    // 4096-byte blocks: 512-aligned is not enough.
    let d1 = s.open("1", O_RDWR, &ctx()).unwrap();
    assert_eq!(submit(&s, &mut slot, d1, false, 512, &mut b), Ok(false));
    assert_eq!(submit(&s, &mut slot, d1, false, 4096, &mut b), Ok(true));
    assert_eq!(slot.poll(), AsyncPoll::Done);
    // Read-only disk (after open): EROFS, reads still go.
    dev.set_readonly(0, true);
    assert_eq!(errno(submit(&s, &mut slot, wo, true, 0, &mut b)), EROFS);
    dev.set_readonly(0, false);
    // A device that cannot start now: the blocking path.
    ctl.refuse.store(true, Ordering::SeqCst);
    assert_eq!(submit(&s, &mut slot, wo, true, 0, &mut b), Ok(false));
    ctl.refuse.store(false, Ordering::SeqCst);
    // A disk that is gone: ENODEV.
    dev.remove_last_disk();
    assert_eq!(errno(submit(&s, &mut slot, d1, false, 0, &mut b)), ENODEV);
    assert!(!slot.is_busy());
    assert_eq!(
        ctl.started.lock().unwrap().len(),
        1,
        "only the one that qualified"
    );
}

#[test]
fn partition_window_translates_blocks() {
    let (s, dev, ctl) = setup(&[(512, 4096, false)]);
    // MBR: one partition at block 100, 200 blocks.
    let mut mbr = [0u8; 512];
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&100u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&200u32.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    dev.set_contents(0, 0, &mbr);
    let p = s.open("0p0", O_RDWR, &ctx()).unwrap();
    let mut slot = slot(&s);
    let mut b = vec![7u8; 1024];
    assert_eq!(submit(&s, &mut slot, p, true, 2048, &mut b), Ok(true));
    assert_eq!(slot.poll(), AsyncPoll::Done);
    assert_eq!(ctl.started.lock().unwrap()[0], (0, 104, 1024, true));
    assert_eq!(dev.contents(0, 104 * 512, 1024), b);
    // The partition's last blocks qualify; one block past its end does not.
    assert_eq!(
        submit(&s, &mut slot, p, false, 199 * 512, &mut b[..512]),
        Ok(true)
    );
    assert_eq!(slot.poll(), AsyncPoll::Done);
    assert_eq!(
        submit(&s, &mut slot, p, false, 199 * 512, &mut b),
        Ok(false)
    );
    assert_eq!(
        b[..512].to_vec(),
        (0..512)
            .map(|i| initial_byte(299 * 512 + i))
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_write_holds_its_range_until_it_settles() {
    let (s, dev, ctl) = setup(&[(512, 1024, false)]);
    let s = Arc::new(s);
    let id = s.open("0", O_RDWR, &ctx()).unwrap();
    let mut a = slot(&s);
    let mut b = slot(&s);
    ctl.hold.store(true, Ordering::SeqCst);
    let mut first = vec![1u8; 2048];
    assert_eq!(submit(&s, &mut a, id, true, 4096, &mut first), Ok(true));
    assert_eq!(a.poll(), AsyncPoll::Pending);
    // An overlapping asynchronous write does not wait: the blocking path takes it.
    let mut second = vec![2u8; 512];
    assert_eq!(submit(&s, &mut b, id, true, 5120, &mut second), Ok(false));
    // Reads take no lock; disjoint writes go.
    assert_eq!(submit(&s, &mut b, id, false, 4096, &mut second), Ok(true));
    ctl.hold.store(false, Ordering::SeqCst);
    assert_eq!(b.poll(), AsyncPoll::Done);
    ctl.hold.store(true, Ordering::SeqCst);
    assert_eq!(submit(&s, &mut b, id, true, 6144, &mut second), Ok(true));
    // A blocking write overlapping the held range (an unaligned one: read-modify-write of
    // the block the first write holds) waits until the first settles.
    let done = Arc::new(AtomicBool::new(false));
    let t = {
        let (s, done) = (s.clone(), done.clone());
        std::thread::spawn(move || {
            let n = s.write(id, 4096 + 2047, &[9u8]).unwrap();
            done.store(true, Ordering::SeqCst);
            n
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!done.load(Ordering::SeqCst), "the blocking write must wait");
    ctl.hold.store(false, Ordering::SeqCst);
    assert_eq!(a.poll(), AsyncPoll::Done);
    assert_eq!(t.join().unwrap(), 1);
    assert_eq!(b.poll(), AsyncPoll::Done);
    let mut want = vec![1u8; 2048];
    want[2047] = 9;
    assert_eq!(dev.contents(0, 4096, 2048), want);
    // Released: the range can be written asynchronously again.
    assert_eq!(submit(&s, &mut a, id, true, 4096, &mut first), Ok(true));
    assert_eq!(a.poll(), AsyncPoll::Done);
}

#[test]
fn whole_disk_write_refreshes_the_partition_table() {
    let (s, _dev, _ctl) = setup(&[(512, 4096, false)]);
    let id = s.open("0", O_RDWR, &ctx()).unwrap();
    assert!(s.partition_table(0).unwrap().partitions.is_empty());
    let mut mbr = vec![0u8; 512];
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&64u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&64u32.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    let mut slot = slot(&s);
    assert_eq!(submit(&s, &mut slot, id, true, 0, &mut mbr), Ok(true));
    assert_eq!(slot.poll(), AsyncPoll::Done);
    let table = s.partition_table(0).unwrap();
    assert_eq!(table.partitions.len(), 1, "the cache saw the write");
    assert_eq!(table.partitions[0].start, 64);
}
