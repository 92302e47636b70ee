//! One logical unit the host found: its identity (INQUIRY and VPD pages), capacity, limits and
//! write protection, and the probe sequence that learns them.

use std::fmt;

use scsi_commands as scsi;

use crate::error::DriverError;
use crate::host::{Data, ScsiHost, Transferred};
use crate::wire;

/// A direct-access logical unit.
#[derive(Clone, Debug)]
pub struct Disk {
    /// Target id.
    pub target: u8,
    /// Logical unit number.
    pub lun: u16,
    /// The virtio-scsi LUN field addressing it.
    pub lun_field: [u8; 8],
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Number of logical blocks.
    pub blocks: u64,
    /// Writes are refused (the medium is write-protected).
    pub readonly: bool,
    /// INQUIRY vendor.
    pub vendor: String,
    /// INQUIRY product.
    pub product: String,
    /// INQUIRY revision.
    pub revision: String,
    /// Unit serial number (VPD 0x80).
    pub serial: Option<String>,
    /// World wide name from the device identification page (VPD 0x83).
    pub wwn: Option<String>,
    /// Largest transfer of one command in bytes, from `max_sectors` and the Block Limits page.
    pub max_transfer_bytes: usize,
    /// Block Limits page (VPD 0xB0), if the device has it.
    pub block_limits: Option<scsi::BlockLimits>,
    /// How the disk can discard blocks (VPD 0xB2 with the Block Limits page).
    pub discard: Discard,
    /// Medium rotation rate (VPD 0xB1): 1 = non-rotating.
    pub rotation_rate: Option<scsi::inquiry::RotationRate>,
}

impl fmt::Display for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} target {} lun {}: {} blocks of {} bytes{}",
            self.vendor,
            self.product,
            self.revision,
            self.target,
            self.lun,
            self.blocks,
            self.block_size,
            if self.readonly { ", read-only" } else { "" }
        )
    }
}

impl Disk {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_size))
    }

    /// Probes (target, lun): `Ok(None)` when it is not a direct-access block device.
    pub fn probe(host: &ScsiHost, target: u8, lun: u16) -> Result<Option<Disk>, DriverError> {
        let field = wire::lun_field(target, lun);
        let exec = |cdb: scsi::Cdb, buf: &mut [u8]| -> Result<usize, DriverError> {
            host.execute(&field, cdb.as_slice(), Data::In(buf))
                .map(|Transferred(n)| n)
        };

        let mut inq = [0u8; 96];
        let n = exec(scsi::Cdb::inquiry(inq.len() as u16), &mut inq)?;
        let std = scsi::StandardInquiry::parse(&inq[..n])
            .map_err(|e| DriverError::Invalid(format!("INQUIRY: {e}")))?;
        if !std.lu_present() || !std.is_disk() {
            log::debug!(
                "target {target} lun {lun}: {:?} {:?}, not a disk",
                std.qualifier,
                std.device_type
            );
            return Ok(None);
        }

        // TEST UNIT READY: the power-on UNIT ATTENTION is retried by `execute`.
        host.execute(&field, scsi::Cdb::test_unit_ready().as_slice(), Data::None)?;

        let mut pages = Vec::new();
        let mut buf = vec![0u8; 255];
        if let Ok(n) = exec(scsi::Cdb::inquiry_vpd(0x00, 255), &mut buf) {
            pages = scsi::inquiry::parse_vpd_supported_pages(&buf[..n]).unwrap_or_default();
        }
        let vpd = |page: u8| -> Option<Vec<u8>> {
            if !pages.contains(&page) {
                return None;
            }
            let mut b = vec![0u8; 512];
            match exec(scsi::Cdb::inquiry_vpd(page, b.len() as u16), &mut b) {
                Ok(n) => {
                    b.truncate(n);
                    Some(b)
                }
                Err(e) => {
                    log::debug!("VPD {page:#x}: {e}");
                    None
                }
            }
        };
        let serial = vpd(0x80).and_then(|b| scsi::inquiry::parse_vpd_unit_serial(&b).ok());
        let wwn = vpd(0x83).and_then(|b| {
            scsi::inquiry::parse_vpd_device_identification(&b)
                .ok()
                .and_then(|d| d.wwn())
        });
        let block_limits = vpd(0xB0).and_then(|b| scsi::inquiry::parse_vpd_block_limits(&b).ok());
        let provisioning =
            vpd(0xB2).and_then(|b| scsi::inquiry::parse_vpd_logical_block_provisioning(&b).ok());
        let rotation_rate = vpd(0xB1)
            .and_then(|b| scsi::inquiry::parse_vpd_block_device_characteristics(&b).ok())
            .and_then(|c| c.rotation_rate);

        let capacity = read_capacity(&exec)?;
        let readonly = write_protected(&exec);

        let bs = capacity.block_size as usize;
        let mut max = (host.config().max_sectors.max(1) as usize).saturating_mul(512);
        if let Some(blocks) = block_limits.as_ref().and_then(|l| l.max_transfer_length) {
            max = max.min((blocks as usize).saturating_mul(bs));
        }
        let max_transfer_bytes = (max / bs).max(1) * bs;

        Ok(Some(Disk {
            target,
            lun,
            lun_field: field,
            block_size: capacity.block_size,
            blocks: capacity.blocks,
            readonly,
            vendor: std.vendor,
            product: std.product,
            revision: std.revision,
            serial,
            wwn,
            max_transfer_bytes,
            discard: Discard::from_vpd(provisioning.as_ref(), block_limits.as_ref()),
            block_limits,
            rotation_rate,
        }))
    }
}

/// The discard command a disk takes, from its Logical Block Provisioning page: UNMAP when
/// LBPU is set (and Block Limits allows at least one descriptor), else WRITE SAME(16) with the
/// UNMAP bit when LBPWS is set, else none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discard {
    /// The disk cannot discard.
    None,
    /// UNMAP, with at most this many blocks per command.
    Unmap {
        /// Largest LBA count of one UNMAP (from Block Limits; u32::MAX when unlimited).
        max_blocks: u32,
    },
    /// WRITE SAME(16) with UNMAP, at most this many blocks per command.
    WriteSame {
        /// Largest count of one WRITE SAME (from Block Limits, capped to u32).
        max_blocks: u32,
    },
}

impl Discard {
    fn from_vpd(
        lbp: Option<&scsi::inquiry::LogicalBlockProvisioning>,
        limits: Option<&scsi::BlockLimits>,
    ) -> Discard {
        let Some(lbp) = lbp else {
            return Discard::None;
        };
        let cap = |v: Option<u64>| match v {
            Some(0) | None => u32::MAX,
            Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
        };
        let unmap_descriptors = limits.and_then(|l| l.max_unmap_block_descriptor_count);
        if lbp.lbpu && unmap_descriptors != Some(0) {
            return Discard::Unmap {
                max_blocks: cap(limits.and_then(|l| l.max_unmap_lba_count).map(u64::from)),
            };
        }
        if lbp.lbpws {
            return Discard::WriteSame {
                max_blocks: cap(limits.and_then(|l| l.max_write_same_length)),
            };
        }
        Discard::None
    }
}

/// Runs one data-in command on the LUN being probed; returns the bytes received.
type Exec<'a> = dyn Fn(scsi::Cdb, &mut [u8]) -> Result<usize, DriverError> + 'a;

/// READ CAPACITY(16), falling back to (10) when the device rejects (16).
fn read_capacity(exec: &Exec<'_>) -> Result<scsi::Capacity, DriverError> {
    let mut b16 = [0u8; 32];
    match exec(scsi::Cdb::read_capacity16(b16.len() as u32), &mut b16) {
        Ok(n) => {
            return scsi::ReadCapacity16::parse(&b16[..n])
                .and_then(|c| c.capacity())
                .map_err(|e| DriverError::Invalid(format!("READ CAPACITY(16): {e}")));
        }
        Err(e) => log::debug!("READ CAPACITY(16) failed ({e}); trying (10)"),
    }
    let mut b10 = [0u8; 8];
    let n = exec(scsi::Cdb::read_capacity10(), &mut b10)?;
    scsi::ReadCapacity10::parse(&b10[..n])
        .and_then(|c| c.capacity())
        .map_err(|e| DriverError::Invalid(format!("READ CAPACITY(10): {e}")))
}

/// The WP bit of the MODE SENSE(10) header; a device that cannot answer is taken as writable
/// (a write will then fail with DATA PROTECT, which maps to EROFS).
fn write_protected(exec: &Exec<'_>) -> bool {
    let mut b = [0u8; 255];
    let Ok(cdb) = scsi::Cdb::mode_sense10(0x3f, 0, true, b.len() as u16) else {
        return false;
    };
    match exec(cdb, &mut b) {
        Ok(n) => scsi::ModeParameterHeader::parse10(&b[..n])
            .map(|h| h.device_specific & 0x80 != 0)
            .unwrap_or(false),
        Err(e) => {
            log::debug!("MODE SENSE(10) failed: {e}");
            false
        }
    }
}
