//! In-memory `BlockDevice` test fixture: sparse block storage with a deterministic initial
//! pattern, a record of every call, injectable errors, an optional hook inside each call (for
//! concurrency tests) and assertions of the trait's preconditions on every call. Discard and
//! write zeroes are there when switched on (discarded blocks read back as [`DISCARDED`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{BlockDevice, DiskIdentity, DiskInfo, Error, Result};

/// What every byte of a discarded block reads back as (not zero: a discard promises nothing).
pub(crate) const DISCARDED: u8 = 0xD5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Read,
    Write,
    Flush,
    /// `len` is the bytes discarded.
    Discard,
    /// `len` is the bytes zeroed.
    WriteZeroes,
}

/// One recorded device call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Call {
    pub op: Op,
    pub disk: usize,
    pub lba: u64,
    pub len: usize,
    /// The fixture returned an injected error.
    pub failed: bool,
}

/// An injected error: the first `skip` matching calls succeed, the next `times` fail.
#[derive(Clone, Copy, Debug)]
struct Fault {
    op: Op,
    skip: usize,
    times: usize,
    errno: i32,
}

/// Called inside every read/write (before data moves), outside the fixture's locks.
pub(crate) type Hook = Arc<dyn Fn(Op, usize, u64) + Send + Sync>;

/// The initial content of byte `pos` of every disk: a fixed pseudo-random pattern, so data at
/// a wrong offset never matches by accident.
pub(crate) fn initial_byte(pos: u64) -> u8 {
    (pos.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

struct MemDisk {
    info: DiskInfo,
    /// What `BlockDevice::generation` reports.
    generation: u64,
    /// Written blocks; absent blocks hold the initial pattern.
    blocks: HashMap<u64, Box<[u8]>>,
}

impl MemDisk {
    fn block(&self, lba: u64) -> Box<[u8]> {
        let bs = u64::from(self.info.block_size);
        match self.blocks.get(&lba) {
            Some(b) => b.clone(),
            None => (0..bs).map(|i| initial_byte(lba * bs + i)).collect(),
        }
    }
}

pub(crate) struct MemDevice {
    disks: Mutex<Vec<Arc<Mutex<MemDisk>>>>,
    calls: Mutex<Vec<Call>>,
    faults: Mutex<Vec<Fault>>,
    hook: Mutex<Option<Hook>>,
    /// Microseconds to sleep inside each read/write between reading the storage and
    /// returning (0 = just yield), widening race windows.
    delay_us: AtomicU64,
    pub flushes: AtomicUsize,
    /// `can_discard` answers this (and `discard` works only then).
    can_discard: AtomicBool,
    /// `write_zeroes` works (else it is `EOPNOTSUPP`).
    has_write_zeroes: AtomicBool,
}

impl MemDevice {
    /// Disks given as `(block_size, blocks, readonly)`.
    pub(crate) fn new(disks: &[(u32, u64, bool)]) -> Arc<Self> {
        let dev = Self {
            disks: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            hook: Mutex::new(None),
            delay_us: AtomicU64::new(0),
            flushes: AtomicUsize::new(0),
            can_discard: AtomicBool::new(false),
            has_write_zeroes: AtomicBool::new(false),
        };
        for &(bs, blocks, ro) in disks {
            dev.add_disk(bs, blocks, ro);
        }
        Arc::new(dev)
    }

    pub(crate) fn add_disk(&self, block_size: u32, blocks: u64, readonly: bool) {
        self.disks
            .lock()
            .unwrap()
            .push(Arc::new(Mutex::new(MemDisk {
                info: DiskInfo {
                    block_size,
                    blocks,
                    readonly,
                },
                generation: 0,
                blocks: HashMap::new(),
            })));
    }

    pub(crate) fn remove_last_disk(&self) {
        self.disks.lock().unwrap().pop();
    }

    pub(crate) fn set_readonly(&self, disk: usize, readonly: bool) {
        self.disk(disk).lock().unwrap().info.readonly = readonly;
    }

    /// Changes the block count (the medium was resized).
    pub(crate) fn set_blocks(&self, disk: usize, blocks: u64) {
        self.disk(disk).lock().unwrap().info.blocks = blocks;
    }

    /// Changes what `generation` reports (the medium was changed).
    pub(crate) fn set_generation(&self, disk: usize, generation: u64) {
        self.disk(disk).lock().unwrap().generation = generation;
    }

    /// Puts `data` at byte `start` of `disk`, directly into storage (no call recorded).
    pub(crate) fn set_contents(&self, disk: usize, start: u64, data: &[u8]) {
        let d = self.disk(disk);
        let mut d = d.lock().unwrap();
        let bs = u64::from(d.info.block_size);
        let mut pos = start;
        let mut rest = data;
        while !rest.is_empty() {
            let lba = pos / bs;
            let mut block = d.block(lba);
            let i = (pos % bs) as usize;
            let n = (block.len() - i).min(rest.len());
            block[i..i + n].copy_from_slice(&rest[..n]);
            d.blocks.insert(lba, block);
            rest = &rest[n..];
            pos += n as u64;
        }
    }

    /// Switches discard (`can_discard`, `discard`) on or off.
    pub(crate) fn set_discard(&self, on: bool) {
        self.can_discard.store(on, Ordering::SeqCst);
    }

    /// Switches the device's write-zeroes command on or off.
    pub(crate) fn set_write_zeroes(&self, on: bool) {
        self.has_write_zeroes.store(on, Ordering::SeqCst);
    }

    pub(crate) fn set_delay_us(&self, us: u64) {
        self.delay_us.store(us, Ordering::Relaxed);
    }

    pub(crate) fn set_hook(&self, hook: Option<Hook>) {
        *self.hook.lock().unwrap() = hook;
    }

    /// Fail `times` calls of `op` with `errno`, after letting `skip` of them succeed.
    pub(crate) fn fail(&self, op: Op, skip: usize, times: usize, errno: i32) {
        self.faults.lock().unwrap().push(Fault {
            op,
            skip,
            times,
            errno,
        });
    }

    pub(crate) fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub(crate) fn clear_calls(&self) {
        self.calls.lock().unwrap().clear();
    }

    /// Bytes `[start, start + len)` of `disk`, read directly from storage.
    pub(crate) fn contents(&self, disk: usize, start: u64, len: usize) -> Vec<u8> {
        let d = self.disk(disk);
        let d = d.lock().unwrap();
        let bs = u64::from(d.info.block_size);
        let mut out = Vec::with_capacity(len);
        let mut pos = start;
        while out.len() < len {
            let block = d.block(pos / bs);
            let i = (pos % bs) as usize;
            let n = (block.len() - i).min(len - out.len());
            out.extend_from_slice(&block[i..i + n]);
            pos += n as u64;
        }
        out
    }

    fn disk(&self, disk: usize) -> Arc<Mutex<MemDisk>> {
        self.disks
            .lock()
            .unwrap()
            .get(disk)
            .cloned()
            .unwrap_or_else(|| panic!("device called for missing disk {disk}"))
    }

    /// Records the call, asserts the preconditions, runs the hook, applies injected faults.
    fn enter(&self, op: Op, disk: usize, lba: u64, len: usize) -> Result<Arc<Mutex<MemDisk>>> {
        let d = self.disk(disk);
        if op != Op::Flush {
            let info = d.lock().unwrap().info.clone();
            let bs = info.block_size as usize;
            assert!(len > 0, "{op:?} of zero length at lba {lba}");
            assert_eq!(
                len % bs,
                0,
                "{op:?} of {len} bytes is not whole blocks of {bs}"
            );
            let n = (len / bs) as u64;
            let end = lba.checked_add(n).expect("lba + blocks overflows");
            assert!(
                end <= info.blocks,
                "{op:?} of blocks {lba}..{end} outside disk of {} blocks",
                info.blocks
            );
            if matches!(op, Op::Write | Op::Discard | Op::WriteZeroes) {
                assert!(!info.readonly, "{op:?} on a read-only disk");
            }
        }
        let failed = {
            let mut faults = self.faults.lock().unwrap();
            let mut errno = None;
            for f in faults.iter_mut().filter(|f| f.op == op) {
                if f.skip > 0 {
                    f.skip -= 1;
                } else if f.times > 0 {
                    f.times -= 1;
                    errno = Some(f.errno);
                    break;
                }
            }
            errno
        };
        self.calls.lock().unwrap().push(Call {
            op,
            disk,
            lba,
            len,
            failed: failed.is_some(),
        });
        let hook = self.hook.lock().unwrap().clone();
        if let Some(hook) = hook {
            hook(op, disk, lba);
        }
        match failed {
            Some(errno) => Err(Error::new(errno)),
            None => Ok(d),
        }
    }

    fn pause(&self) {
        match self.delay_us.load(Ordering::Relaxed) {
            0 => std::thread::yield_now(),
            us => std::thread::sleep(Duration::from_micros(us)),
        }
    }
}

impl BlockDevice for MemDevice {
    fn disks(&self) -> Vec<DiskInfo> {
        self.disks
            .lock()
            .unwrap()
            .iter()
            .map(|d| d.lock().unwrap().info.clone())
            .collect()
    }

    fn read_blocks(&self, disk: usize, lba: u64, buf: &mut [u8]) -> Result<()> {
        let d = self.enter(Op::Read, disk, lba, buf.len())?;
        let copy: Vec<Box<[u8]>> = {
            let d = d.lock().unwrap();
            let bs = d.info.block_size as usize;
            (0..(buf.len() / bs) as u64)
                .map(|i| d.block(lba + i))
                .collect()
        };
        // Data read, not yet returned: a racing writer's RMW window opens here.
        self.pause();
        for (chunk, block) in buf.chunks_mut(copy[0].len()).zip(copy) {
            chunk.copy_from_slice(&block);
        }
        Ok(())
    }

    fn write_blocks(&self, disk: usize, lba: u64, buf: &[u8]) -> Result<()> {
        let d = self.enter(Op::Write, disk, lba, buf.len())?;
        self.pause();
        let mut d = d.lock().unwrap();
        let bs = d.info.block_size as usize;
        for (i, chunk) in buf.chunks(bs).enumerate() {
            d.blocks.insert(lba + i as u64, chunk.into());
        }
        Ok(())
    }

    fn flush(&self, disk: usize) -> Result<()> {
        self.enter(Op::Flush, disk, 0, 0)?;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn can_discard(&self, _disk: usize) -> bool {
        self.can_discard.load(Ordering::SeqCst)
    }

    fn discard(&self, disk: usize, lba: u64, blocks: u64) -> Result<()> {
        assert!(
            self.can_discard.load(Ordering::SeqCst),
            "discard on a device that said it cannot"
        );
        let bs = self.disk(disk).lock().unwrap().info.block_size as usize;
        let len = usize::try_from(blocks).unwrap() * bs;
        let d = self.enter(Op::Discard, disk, lba, len)?;
        let mut d = d.lock().unwrap();
        for b in lba..lba + blocks {
            d.blocks.insert(b, vec![DISCARDED; bs].into());
        }
        Ok(())
    }

    fn write_zeroes(&self, disk: usize, lba: u64, blocks: u64) -> Result<()> {
        if !self.has_write_zeroes.load(Ordering::SeqCst) {
            return Err(Error::new(syscall::error::EOPNOTSUPP));
        }
        let bs = self.disk(disk).lock().unwrap().info.block_size as usize;
        let len = usize::try_from(blocks).unwrap() * bs;
        let d = self.enter(Op::WriteZeroes, disk, lba, len)?;
        let mut d = d.lock().unwrap();
        for b in lba..lba + blocks {
            d.blocks.insert(b, vec![0; bs].into());
        }
        Ok(())
    }

    fn identity(&self, disk: usize) -> Option<DiskIdentity> {
        (disk == 0).then(|| DiskIdentity {
            vendor: "MEM".into(),
            product: "FIXTURE DISK".into(),
            revision: "1".into(),
            serial: Some("SER0".into()),
            wwn: None,
            target: 0,
            lun: 0,
        })
    }

    fn generation(&self, disk: usize) -> u64 {
        self.disks
            .lock()
            .unwrap()
            .get(disk)
            .map_or(0, |d| d.lock().unwrap().generation)
    }
}
