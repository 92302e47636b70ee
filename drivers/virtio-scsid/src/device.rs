//! The scheme's view of the host: `block_scheme::BlockDevice` over `virtio_scsi::ScsiHost`.
//! Disk numbers are the host's discovery order (target, then LUN). Driver errors become Redox
//! errno values here, after their full text is logged. Also the disks' identity (INQUIRY and
//! VPD data the driver probed), discard (`ScsiHost::discard`: UNMAP or WRITE SAME with UNMAP)
//! and write zeroes (`ScsiHost::write_zeroes`: WRITE SAME(16) without UNMAP). Split-phase
//! I/O ([`BlockDevice::async_io`]) is the driver's `ScsiHost::submit_async`: one token per
//! request slot at a time, kept in a [`HostIo`].

use std::sync::Arc;
use std::time::Instant;

use block_scheme::{
    AsyncBlockIo, AsyncBuf, AsyncPoll, BlockDevice, DiskIdentity, DiskInfo, Error, IoWaker, Result,
};
use syscall::error::{ENODEV, EOPNOTSUPP, EROFS};
use virtio_scsi::disk::Discard;
use virtio_scsi::{AsyncIo, CompletionWaker, DriverError, ScsiHost};

/// The block devices of one host.
pub struct HostDevices {
    host: Arc<ScsiHost>,
    /// Targets configured read-only on the daemon's command line.
    readonly_targets: Arc<[u8]>,
}

impl HostDevices {
    /// Wraps `host`; disks on `readonly_targets` refuse writes even if the device would take them.
    pub fn new(host: Arc<ScsiHost>, readonly_targets: Vec<u8>) -> Self {
        HostDevices {
            host,
            readonly_targets: readonly_targets.into(),
        }
    }

    fn disk(&self, index: usize) -> Result<Arc<virtio_scsi::Disk>> {
        self.host
            .disk(index)
            .ok_or(Error::new(syscall::error::ENODEV))
    }
}

/// What a removed disk's number reports: no blocks (absent to the scheme).
const ABSENT: DiskInfo = DiskInfo {
    block_size: 512,
    blocks: 0,
    readonly: true,
};

impl HostDevices {
    fn info(&self, d: &virtio_scsi::Disk) -> DiskInfo {
        DiskInfo {
            block_size: d.block_size,
            blocks: d.blocks,
            readonly: d.readonly || self.readonly_targets.contains(&d.target),
        }
    }
}

fn errno(op: &str, disk: usize, e: DriverError) -> Error {
    log::warn!("{op} on disk {disk}: {e}");
    Error::new(e.errno())
}

impl BlockDevice for HostDevices {
    fn disks(&self) -> Vec<DiskInfo> {
        // Disk numbers are the host's: stable across hotplug. A removed disk keeps its number
        // with no blocks (and the host answers ENODEV for it).
        self.host
            .disk_slots()
            .iter()
            .map(|slot| match slot {
                Some(d) => self.info(d),
                None => ABSENT,
            })
            .collect()
    }

    fn disk_info(&self, disk: usize) -> Option<DiskInfo> {
        // No allocation: this is on every read and write.
        match self.host.disk(disk) {
            Some(d) => Some(self.info(&d)),
            None => (disk < self.host.disk_count()).then_some(ABSENT),
        }
    }

    fn generation(&self, _disk: usize) -> u64 {
        self.host.disk_generation()
    }

    fn read_blocks(&self, disk: usize, lba: u64, buf: &mut [u8]) -> Result<()> {
        let d = self.disk(disk)?;
        self.host
            .read(&d, lba, buf)
            .map_err(|e| errno("read", disk, e))
    }

    fn write_blocks(&self, disk: usize, lba: u64, buf: &[u8]) -> Result<()> {
        let d = self.disk(disk)?;
        if self.readonly_targets.contains(&d.target) {
            return Err(Error::new(syscall::error::EROFS));
        }
        self.host
            .write(&d, lba, buf)
            .map_err(|e| errno("write", disk, e))
    }

    fn flush(&self, disk: usize) -> Result<()> {
        let d = self.disk(disk)?;
        self.host.flush(&d).map_err(|e| errno("flush", disk, e))
    }

    fn can_discard(&self, disk: usize) -> bool {
        self.host.disk(disk).is_some_and(|d| {
            !d.readonly && !self.readonly_targets.contains(&d.target) && d.discard != Discard::None
        })
    }

    fn discard(&self, disk: usize, lba: u64, blocks: u64) -> Result<()> {
        let d = self.disk(disk)?;
        if d.readonly || self.readonly_targets.contains(&d.target) {
            return Err(Error::new(EROFS));
        }
        if d.discard == Discard::None {
            return Err(Error::new(EOPNOTSUPP));
        }
        self.host
            .discard(&d, lba, blocks)
            .map_err(|e| errno("discard", disk, e))
    }

    fn write_zeroes(&self, disk: usize, lba: u64, blocks: u64) -> Result<()> {
        let d = self.disk(disk)?;
        if d.readonly || self.readonly_targets.contains(&d.target) {
            return Err(Error::new(EROFS));
        }
        match self.host.write_zeroes(&d, lba, blocks) {
            // The scheme writes zero buffers instead; nothing to log.
            Err(DriverError::Unsupported(_)) => Err(Error::new(EOPNOTSUPP)),
            r => r.map_err(|e| errno("write zeroes", disk, e)),
        }
    }

    fn identity(&self, disk: usize) -> Option<DiskIdentity> {
        let d = self.host.disk(disk)?;
        Some(DiskIdentity {
            vendor: d.vendor.clone(),
            product: d.product.clone(),
            revision: d.revision.clone(),
            serial: d.serial.clone(),
            wwn: d.wwn.clone(),
            target: u32::from(d.target),
            lun: u32::from(d.lun),
        })
    }

    fn stats(&self) -> String {
        self.host.stats().to_string()
    }

    fn begin_busy_poll(&self) -> bool {
        self.host.begin_busy_poll();
        true
    }

    fn busy_poll(&self) -> usize {
        self.host.busy_poll()
    }

    fn end_busy_poll(&self) {
        self.host.end_busy_poll();
    }

    fn async_io(&self, waker: Arc<dyn IoWaker>) -> Option<Box<dyn AsyncBlockIo>> {
        Some(Box::new(HostIo {
            host: self.host.clone(),
            readonly_targets: self.readonly_targets.clone(),
            waker: Arc::new(Waker(waker)),
            token: None,
        }))
    }
}

/// The scheme's waker as the driver's (made once per request slot, at set-up).
struct Waker(Arc<dyn IoWaker>);

impl CompletionWaker for Waker {
    fn wake(&self) {
        self.0.wake();
    }
}

/// One request slot of split-phase I/O: at most one driver token at a time. Used by one
/// thread at a time (the scheme's `AsyncSlot` that owns it moves between a server's poller
/// and its workers).
struct HostIo {
    host: Arc<ScsiHost>,
    readonly_targets: Arc<[u8]>,
    waker: Arc<dyn CompletionWaker>,
    /// The command in flight (with its disk number and direction, for the log); `None` when
    /// settled.
    token: Option<(AsyncIo, usize, bool)>,
}

impl AsyncBlockIo for HostIo {
    unsafe fn submit(&mut self, disk: usize, lba: u64, buf: AsyncBuf, write: bool) -> Result<bool> {
        if self.token.is_some() {
            return Ok(false);
        }
        let d = self.host.disk(disk).ok_or(Error::new(ENODEV))?;
        if write && (d.readonly || self.readonly_targets.contains(&d.target)) {
            return Err(Error::new(EROFS));
        }
        // SAFETY: the buffer contract of `AsyncBlockIo::submit` is `submit_async`'s: valid and
        // untouched until the token settles (`poll` → Done, or `finish_blocking` returned),
        // and kept mapped if the token is dropped unsettled.
        let token = unsafe {
            self.host
                .submit_async(&d, lba, buf.ptr, buf.len, write, &self.waker)
        };
        self.token = token.map(|t| (t, disk, write));
        Ok(self.token.is_some())
    }

    fn poll(&mut self) -> AsyncPoll {
        let Some((t, _, _)) = self.token.as_mut() else {
            return AsyncPoll::Done;
        };
        match t.poll() {
            virtio_scsi::AsyncPoll::Pending => AsyncPoll::Pending,
            virtio_scsi::AsyncPoll::Slow => AsyncPoll::Slow,
            virtio_scsi::AsyncPoll::Done => {
                self.token = None;
                AsyncPoll::Done
            }
        }
    }

    fn finish_blocking(&mut self) -> Result<()> {
        let Some((t, disk, write)) = self.token.take() else {
            return Ok(());
        };
        let op = if write { "write" } else { "read" };
        t.finish_blocking().map_err(|e| errno(op, disk, e))
    }

    fn deadline(&self) -> Option<Instant> {
        self.token.as_ref().map(|(t, _, _)| t.deadline())
    }

    // `reaches`: the default (yes). Buffers the device cannot reach in place are bounced
    // through the command slot by the driver (`ScsiHost::submit_async`), as the blocking path
    // copies them: the `--pci` plain-memory arenas take the fast path too.
}
