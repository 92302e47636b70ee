//! The scheme's view of the host: `block_scheme::BlockDevice` over `virtio_scsi::ScsiHost`.
//! Disk numbers are the host's discovery order (target, then LUN). Driver errors become Redox
//! errno values here, after their full text is logged.

use std::sync::Arc;

use block_scheme::{BlockDevice, DiskInfo, Error, Result};
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

    fn stats(&self) -> String {
        self.host.stats().to_string()
    }
}
