//! The scheme's view of the host: `block_scheme::BlockDevice` over `virtio_scsi::ScsiHost`.
//! Disk numbers are the host's discovery order (target, then LUN). Driver errors become Redox
//! errno values here, after their full text is logged. Also the disks' identity (INQUIRY and
//! VPD data the driver probed), discard (`ScsiHost::discard`: UNMAP or WRITE SAME with UNMAP)
//! and write zeroes (`ScsiHost::write_zeroes`: WRITE SAME(16) without UNMAP).

use std::sync::Arc;

use block_scheme::{BlockDevice, DiskIdentity, DiskInfo, Error, Result};
use syscall::error::{EOPNOTSUPP, EROFS};
use virtio_scsi::disk::Discard;
use virtio_scsi::{DriverError, ScsiHost};

/// The block devices of one host.
pub struct HostDevices {
    host: Arc<ScsiHost>,
    /// Targets configured read-only on the daemon's command line.
    readonly_targets: Vec<u8>,
}

impl HostDevices {
    /// Wraps `host`; disks on `readonly_targets` refuse writes even if the device would take them.
    pub fn new(host: Arc<ScsiHost>, readonly_targets: Vec<u8>) -> Self {
        HostDevices {
            host,
            readonly_targets,
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
}
