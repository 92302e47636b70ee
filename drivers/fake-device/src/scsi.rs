//! The SCSI target behind the fake: logical units with in-memory media and the commands the
//! driver uses, answered the way QEMU's scsi-hd answers them (standard and VPD INQUIRY, REPORT
//! LUNS, TEST UNIT READY with a power-on UNIT ATTENTION, READ CAPACITY(10/16), READ/WRITE(10/16),
//! SYNCHRONIZE CACHE(10/16), MODE SENSE(6/10), REQUEST SENSE, START STOP UNIT).
//!
//! Pure command logic: no DMA, no rings. `execute` takes the request's LUN field, CDB, data-out
//! bytes and data-in capacity and returns what a correct device reports.

/// virtio-scsi response codes.
pub mod response {
    /// Completed; look at the status.
    pub const OK: u8 = 0;
    /// The data buffer was too small.
    pub const OVERRUN: u8 = 1;
    /// No such target.
    pub const BAD_TARGET: u8 = 3;
}

/// SCSI status GOOD.
pub const GOOD: u8 = 0x00;
/// SCSI status CHECK CONDITION.
pub const CHECK_CONDITION: u8 = 0x02;
/// SCSI status BUSY.
pub const BUSY: u8 = 0x08;

/// Sense keys used here.
pub mod key {
    /// NOT READY.
    pub const NOT_READY: u8 = 0x2;
    /// MEDIUM ERROR.
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// ILLEGAL REQUEST.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// UNIT ATTENTION.
    pub const UNIT_ATTENTION: u8 = 0x6;
    /// DATA PROTECT.
    pub const DATA_PROTECT: u8 = 0x7;
}

/// One logical unit to emulate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// Target id.
    pub target: u8,
    /// LUN (0..=16383).
    pub lun: u16,
    /// Logical block size (a power of two, 512..=65536).
    pub block_size: u32,
    /// Number of blocks.
    pub blocks: u64,
    /// Write protected.
    pub readonly: bool,
    /// MAXIMUM TRANSFER LENGTH of the Block Limits VPD page, in blocks (0 = not reported).
    pub max_transfer_blocks: u32,
}

impl DiskSpec {
    /// A writable disk at (target, 0).
    pub fn new(target: u8, block_size: u32, blocks: u64) -> Self {
        DiskSpec {
            target,
            lun: 0,
            block_size,
            blocks,
            readonly: false,
            max_transfer_blocks: 0,
        }
    }
}

/// A logical unit and its medium.
pub struct Lu {
    /// What it is.
    pub spec: DiskSpec,
    /// The medium.
    pub data: Vec<u8>,
    /// Pending UNIT ATTENTION (ASC, ASCQ).
    pub unit_attention: Option<(u8, u8)>,
    /// SYNCHRONIZE CACHE commands seen.
    pub flushes: u64,
}

/// What a correct device reports for one command.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// virtio response byte.
    pub response: u8,
    /// SCSI status.
    pub status: u8,
    /// Sense data (fixed format), empty when none.
    pub sense: Vec<u8>,
    /// Data-in bytes to transfer (already cut to the buffer).
    pub data_in: Vec<u8>,
    /// Residual: bytes of the data buffer (in or out) not transferred.
    pub resid: u32,
    /// Whether the command moved data (for lie bookkeeping).
    pub transferred: bool,
    /// The command wrote to the medium.
    pub wrote: bool,
}

impl Outcome {
    fn good(data_in: Vec<u8>, in_cap: usize) -> Outcome {
        let n = data_in.len().min(in_cap);
        let mut data_in = data_in;
        data_in.truncate(n);
        Outcome {
            response: response::OK,
            status: GOOD,
            sense: Vec::new(),
            resid: u32::try_from(in_cap - n).unwrap_or(u32::MAX),
            transferred: n > 0,
            data_in,
            wrote: false,
        }
    }

    /// CHECK CONDITION with fixed-format sense; nothing transferred.
    pub fn check(key: u8, asc: u8, ascq: u8, buffer: usize) -> Outcome {
        Outcome {
            response: response::OK,
            status: CHECK_CONDITION,
            sense: fixed_sense(key, asc, ascq),
            resid: u32::try_from(buffer).unwrap_or(u32::MAX),
            ..Outcome::default()
        }
    }

    fn virtio(response: u8, buffer: usize) -> Outcome {
        Outcome {
            response,
            resid: u32::try_from(buffer).unwrap_or(u32::MAX),
            ..Outcome::default()
        }
    }

    /// Whether the command completed successfully.
    pub fn is_success(&self) -> bool {
        self.response == response::OK && matches!(self.status, GOOD | 0x04)
    }
}

/// 18 bytes of fixed-format, current sense data.
pub fn fixed_sense(key: u8, asc: u8, ascq: u8) -> Vec<u8> {
    let mut s = vec![0u8; 18];
    s[0] = 0x70;
    s[2] = key & 0x0f;
    s[7] = 10;
    s[12] = asc;
    s[13] = ascq;
    s
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([
        b.get(at).copied().unwrap_or(0),
        b.get(at + 1).copied().unwrap_or(0),
    ])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([
        b.get(at).copied().unwrap_or(0),
        b.get(at + 1).copied().unwrap_or(0),
        b.get(at + 2).copied().unwrap_or(0),
        b.get(at + 3).copied().unwrap_or(0),
    ])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// Decodes a virtio-scsi LUN field as QEMU does: byte 0 = 1, byte 1 the target, bytes 2-3 the
/// LUN (flat or peripheral), the rest zero.
pub fn parse_lun_field(f: &[u8; 8]) -> Option<(u8, u16)> {
    if f[0] != 1 || !(f[2] == 0 || (0x40..0x80).contains(&f[2])) || f[4..] != [0; 4] {
        return None;
    }
    Some((f[1], u16::from_be_bytes([f[2], f[3]]) & 0x3fff))
}

/// All logical units of the fake.
pub struct Target {
    /// The units, any order.
    pub lus: Vec<Lu>,
}

impl Target {
    /// Units with zeroed media and a power-on UNIT ATTENTION pending.
    pub fn new(disks: &[DiskSpec]) -> Target {
        Target {
            lus: disks
                .iter()
                .map(|d| {
                    let bytes = d.blocks.saturating_mul(u64::from(d.block_size));
                    Lu {
                        spec: d.clone(),
                        data: vec![0u8; usize::try_from(bytes).unwrap_or(0)],
                        unit_attention: Some((0x29, 0x00)),
                        flushes: 0,
                    }
                })
                .collect(),
        }
    }

    /// After a device reset: every unit reports a bus reset once.
    pub fn bus_reset(&mut self) {
        for lu in &mut self.lus {
            lu.unit_attention.get_or_insert((0x29, 0x02));
        }
    }

    /// Runs one command. `out` is the data-out buffer, `in_cap` the data-in buffer size.
    pub fn execute(
        &mut self,
        lun_field: &[u8; 8],
        cdb: &[u8],
        out: &[u8],
        in_cap: usize,
    ) -> Outcome {
        let buffer = if out.is_empty() { in_cap } else { out.len() };
        let Some((target, lun)) = parse_lun_field(lun_field) else {
            return Outcome::virtio(response::BAD_TARGET, buffer);
        };
        if !self.lus.iter().any(|l| l.spec.target == target) {
            return Outcome::virtio(response::BAD_TARGET, buffer);
        }
        let op = cdb.first().copied().unwrap_or(0xff);
        if op == 0xa0 {
            return self.report_luns(target, cdb, in_cap);
        }
        let Some(lu) = self
            .lus
            .iter_mut()
            .find(|l| l.spec.target == target && l.spec.lun == lun)
        else {
            return match op {
                // INQUIRY on a LUN that is not there: qualifier 011b, type 1Fh.
                0x12 if cdb.get(1).is_some_and(|b| b & 1 == 0) => {
                    let mut d = standard_inquiry();
                    d[0] = 0x7f;
                    let alloc = usize::from(be16(cdb, 3));
                    d.truncate(alloc);
                    Outcome::good(d, in_cap)
                }
                _ => Outcome::check(key::ILLEGAL_REQUEST, 0x25, 0x00, buffer),
            };
        };
        if !matches!(op, 0x12 | 0x03)
            && let Some((asc, ascq)) = lu.unit_attention.take()
        {
            return Outcome::check(key::UNIT_ATTENTION, asc, ascq, buffer);
        }
        let bs = lu.spec.block_size as usize;
        match op {
            0x00 | 0x1b => Outcome::good(Vec::new(), in_cap), // TEST UNIT READY, START STOP
            0x03 => {
                // REQUEST SENSE: no sense pending (UA handled above for INQUIRY only).
                let mut d = fixed_sense(0, 0, 0);
                d.truncate(usize::from(cdb.get(4).copied().unwrap_or(0)));
                Outcome::good(d, in_cap)
            }
            0x12 => inquiry(lu, cdb, in_cap, buffer),
            0x25 => {
                let mut d = Vec::with_capacity(8);
                let last = lu.spec.blocks.saturating_sub(1).min(u64::from(u32::MAX));
                d.extend_from_slice(&(last as u32).to_be_bytes());
                d.extend_from_slice(&lu.spec.block_size.to_be_bytes());
                Outcome::good(d, in_cap)
            }
            0x9e if cdb.get(1).is_some_and(|b| b & 0x1f == 0x10) => {
                let mut d = vec![0u8; 32];
                d[0..8].copy_from_slice(&lu.spec.blocks.saturating_sub(1).to_be_bytes());
                d[8..12].copy_from_slice(&lu.spec.block_size.to_be_bytes());
                d.truncate(be32(cdb, 10) as usize);
                Outcome::good(d, in_cap)
            }
            0x28 | 0x88 | 0x2a | 0x8a => {
                let (lba, blocks) = if op == 0x28 || op == 0x2a {
                    (u64::from(be32(cdb, 2)), u64::from(be16(cdb, 7)))
                } else {
                    (be64(cdb, 2), u64::from(be32(cdb, 10)))
                };
                let write = op == 0x2a || op == 0x8a;
                rw(lu, write, lba, blocks, bs, out, in_cap, buffer)
            }
            0x35 | 0x91 => {
                lu.flushes += 1;
                Outcome::good(Vec::new(), in_cap)
            }
            0x5a | 0x1a => mode_sense(lu, cdb, in_cap),
            _ => Outcome::check(key::ILLEGAL_REQUEST, 0x20, 0x00, buffer),
        }
    }

    fn report_luns(&self, target: u8, cdb: &[u8], in_cap: usize) -> Outcome {
        let mut luns: Vec<u16> = self
            .lus
            .iter()
            .filter(|l| l.spec.target == target)
            .map(|l| l.spec.lun)
            .collect();
        luns.sort_unstable();
        let mut d = vec![0u8; 8];
        d[0..4].copy_from_slice(&((luns.len() * 8) as u32).to_be_bytes());
        for l in luns {
            let mut e = [0u8; 8];
            if l < 256 {
                e[1] = l as u8;
            } else {
                e[0..2].copy_from_slice(&(0x4000 | l).to_be_bytes());
            }
            d.extend_from_slice(&e);
        }
        d.truncate(be32(cdb, 6) as usize);
        Outcome::good(d, in_cap)
    }
}

/// 96 bytes of standard INQUIRY data for a SPC-3 disk.
fn standard_inquiry() -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = 0x00; // connected, direct access
    d[2] = 0x05; // SPC-3
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = 91; // additional length
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(b"FAKE    ");
    d[16..32].copy_from_slice(b"VIRTIO-SCSI DISK");
    d[32..36].copy_from_slice(b"0001");
    d
}

fn inquiry(lu: &Lu, cdb: &[u8], in_cap: usize, buffer: usize) -> Outcome {
    let evpd = cdb.get(1).is_some_and(|b| b & 1 != 0);
    let page = cdb.get(2).copied().unwrap_or(0);
    let alloc = usize::from(be16(cdb, 3));
    let mut d = if !evpd {
        if page != 0 {
            return Outcome::check(key::ILLEGAL_REQUEST, 0x24, 0x00, buffer);
        }
        standard_inquiry()
    } else {
        let body: Vec<u8> = match page {
            0x00 => vec![0x00, 0x80, 0x83, 0xb0, 0xb1],
            0x80 => format!("FAKE{:02x}{:04x}", lu.spec.target, lu.spec.lun).into_bytes(),
            0x83 => {
                // One NAA IEEE registered designator (binary, LU association).
                let mut v = vec![0x01, 0x03, 0x00, 0x08];
                v.extend_from_slice(&[
                    0x50,
                    0x01,
                    0x40,
                    0x5f,
                    0xa4,
                    0x70,
                    lu.spec.target,
                    lu.spec.lun as u8,
                ]);
                v
            }
            0xb0 => {
                let mut v = vec![0u8; 0x3c];
                v[4..8].copy_from_slice(&lu.spec.max_transfer_blocks.to_be_bytes());
                v
            }
            0xb1 => {
                let mut v = vec![0u8; 0x3c];
                v[0..2].copy_from_slice(&1u16.to_be_bytes()); // non-rotating
                v
            }
            _ => return Outcome::check(key::ILLEGAL_REQUEST, 0x24, 0x00, buffer),
        };
        let mut d = vec![0x00, page];
        d.extend_from_slice(&(body.len() as u16).to_be_bytes());
        d.extend_from_slice(&body);
        d
    };
    d.truncate(alloc);
    Outcome::good(d, in_cap)
}

#[allow(clippy::too_many_arguments)]
fn rw(
    lu: &mut Lu,
    write: bool,
    lba: u64,
    blocks: u64,
    bs: usize,
    out: &[u8],
    in_cap: usize,
    buffer: usize,
) -> Outcome {
    if write && lu.spec.readonly {
        return Outcome::check(key::DATA_PROTECT, 0x27, 0x00, buffer);
    }
    if lba
        .checked_add(blocks)
        .is_none_or(|end| end > lu.spec.blocks)
    {
        return Outcome::check(key::ILLEGAL_REQUEST, 0x21, 0x00, buffer);
    }
    let Some(bytes) = usize::try_from(blocks).ok().and_then(|b| b.checked_mul(bs)) else {
        return Outcome::check(key::ILLEGAL_REQUEST, 0x24, 0x00, buffer);
    };
    let at = lba as usize * bs;
    let have = if write { out.len() } else { in_cap };
    if bytes > have {
        // QEMU: a transfer larger than the buffer is an overrun, nothing is done.
        return Outcome::virtio(response::OVERRUN, buffer);
    }
    let resid = u32::try_from(have - bytes).unwrap_or(u32::MAX);
    if write {
        lu.data[at..at + bytes].copy_from_slice(&out[..bytes]);
        Outcome {
            response: response::OK,
            status: GOOD,
            resid,
            transferred: bytes > 0,
            wrote: bytes > 0,
            ..Outcome::default()
        }
    } else {
        Outcome {
            response: response::OK,
            status: GOOD,
            data_in: lu.data[at..at + bytes].to_vec(),
            resid,
            transferred: bytes > 0,
            ..Outcome::default()
        }
    }
}

fn mode_sense(lu: &Lu, cdb: &[u8], in_cap: usize) -> Outcome {
    let ten = cdb.first() == Some(&0x5a);
    let page = cdb.get(2).copied().unwrap_or(0) & 0x3f;
    let mut pages = Vec::new();
    if page == 0x08 || page == 0x3f {
        // Caching page: WCE set.
        let mut p = vec![0u8; 20];
        p[0] = 0x08;
        p[1] = 0x12;
        p[2] = 0x04;
        pages.extend_from_slice(&p);
    }
    let wp = if lu.spec.readonly { 0x80 } else { 0x00 } | 0x10;
    let mut d = if ten {
        let mut h = vec![0u8; 8];
        h[0..2].copy_from_slice(&((6 + pages.len()) as u16).to_be_bytes());
        h[3] = wp;
        h
    } else {
        vec![(3 + pages.len()) as u8, 0, wp, 0]
    };
    d.extend_from_slice(&pages);
    let alloc = if ten {
        usize::from(be16(cdb, 7))
    } else {
        usize::from(cdb.get(4).copied().unwrap_or(0))
    };
    d.truncate(alloc);
    Outcome::good(d, in_cap)
}
