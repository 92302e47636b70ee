//! Partition tables: GPT first (read through the `gpt` crate, as Redox's `partitionlib` does),
//! then the four primary entries of an MBR, on disks with 512- or 4096-byte logical blocks;
//! the read-only byte reader over the block device that the `gpt` crate reads through; and the
//! checks that keep every partition inside its disk.
//!
//! Numbering (the `M` of `/NpM`): from 0, in table order, over the entries that are in use
//! and valid. GPT: entries whose type GUID is not nil. MBR: primary entries with a non-zero
//! type and length, except the protective-GPT type `0xEE` and extended containers (`0x05`,
//! `0x0F`, `0x85`), then the logical partitions of the first extended container in the order
//! of its EBR chain (Linux calls them 5, 6, ...; here they follow the primaries). An entry
//! that starts or ends outside the disk (a logical one: outside its container) is left out
//! (and logged), so a partition never reaches past its disk.
//!
//! The EBR chain is device data too: each link must point inside the container, the walk
//! stops at a link it has seen (a cycle) and after `MAX_LOGICAL` partitions or
//! `MAX_EBR_READS` sectors, whichever comes first.
//!
//! Device data is untrusted: the `gpt` crate asserts on an entry size other than 128 and
//! would read any number of entries, so both headers are checked for those fields before the
//! crate sees them, and the crate runs under `catch_unwind` as a last line of defence.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};

use gpt::disk::LogicalBlockSize;

use crate::io::{Geometry, read_at};
use crate::{BlockDevice, Error, Result};

/// Entry-array length above which a GPT is refused (sgdisk and most tools write 128; the
/// spec's minimum is 16 KiB of entries). Bounds what a corrupt or hostile header makes us read.
pub const MAX_GPT_ENTRIES: u32 = 4096;

/// Most logical partitions read from one extended container (Linux's own cap is in the
/// same range; a chain longer than this is corrupt or hostile).
pub const MAX_LOGICAL: usize = 128;
/// Most EBR sectors read while walking one chain (bounds the I/O a hostile chain costs).
const MAX_EBR_READS: usize = 2 * MAX_LOGICAL;

/// MBR partition types of extended containers (CHS, LBA, Linux).
fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0F | 0x85)
}

/// Which kind of table a disk has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableKind {
    /// A GUID partition table.
    Gpt,
    /// An MBR with primary partitions.
    Mbr,
    /// No partition table found (or none that could be used).
    None,
}

/// One partition, in blocks of its disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    /// First block.
    pub start: u64,
    /// Length in blocks (never 0).
    pub blocks: u64,
}

/// A disk's partition table as the scheme uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionTable {
    /// Where the partitions came from.
    pub kind: TableKind,
    /// The partitions, indexed by partition number.
    pub partitions: Vec<Partition>,
}

impl PartitionTable {
    fn none() -> Self {
        Self {
            kind: TableKind::None,
            partitions: Vec::new(),
        }
    }
}

/// Reads the partition table of `disk`, whose whole-disk geometry is `geo`.
///
/// `Ok` with [`TableKind::None`] when there is no usable table; `Err` only for a device error
/// (so that a transient failure is not remembered as "no partitions").
pub(crate) fn read_table<D: BlockDevice + ?Sized>(
    dev: &D,
    disk: usize,
    geo: &Geometry,
) -> Result<PartitionTable> {
    if let Some(table) = read_gpt(dev, disk, geo)? {
        return Ok(table);
    }
    read_mbr(dev, disk, geo)
}

/// The GPT of the disk, if it has a usable one.
fn read_gpt<D: BlockDevice + ?Sized>(
    dev: &D,
    disk: usize,
    geo: &Geometry,
) -> Result<Option<PartitionTable>> {
    let lb = match geo.block_size {
        512 => LogicalBlockSize::Lb512,
        4096 => LogicalBlockSize::Lb4096,
        _ => return Ok(None),
    };
    let blocks = geo.size / geo.block_size;
    if blocks < 3 {
        return Ok(None);
    }
    // Both places the crate looks for a header: block 1 and the last block.
    let mut any_signature = false;
    for lba in [1, blocks - 1] {
        let mut hdr = [0u8; 92];
        read_exact(dev, disk, geo, lba * geo.block_size, &mut hdr)?;
        if &hdr[..8] != b"EFI PART" {
            continue;
        }
        any_signature = true;
        let num_parts = le_u32(&hdr, 80);
        let part_size = le_u32(&hdr, 84);
        if part_size != 128 || num_parts > MAX_GPT_ENTRIES {
            log::warn!(
                "disk {disk}: GPT header at block {lba} has {num_parts} entries of {part_size} \
                 bytes (expected 128-byte entries, at most {MAX_GPT_ENTRIES}); ignoring the GPT"
            );
            return Ok(None);
        }
    }
    if !any_signature {
        return Ok(None);
    }

    let mut reader = DiskReader {
        dev,
        disk,
        geo: *geo,
        pos: 0,
        error: None,
    };
    let opened = catch_unwind(AssertUnwindSafe(|| {
        gpt::GptConfig::new()
            .writable(false)
            .logical_block_size(lb)
            .open_from_device(&mut reader)
            .map(|g| g.partitions().clone())
    }));
    if let Some(e) = reader.error {
        return Err(e);
    }
    let entries = match opened {
        Ok(Ok(entries)) => entries,
        Ok(Err(e)) => {
            log::warn!("disk {disk}: unusable GPT: {e}");
            return Ok(None);
        }
        Err(_) => {
            log::error!("disk {disk}: the gpt crate panicked on this disk's table; ignoring it");
            return Ok(None);
        }
    };
    let partitions = entries
        .iter()
        .filter(|(_, p)| p.is_used())
        .filter_map(|(&n, p)| {
            let part = p
                .last_lba
                .checked_sub(p.first_lba)
                .and_then(|len| len.checked_add(1))
                .map(|len| Partition {
                    start: p.first_lba,
                    blocks: len,
                });
            checked(disk, "GPT", n, part, blocks)
        })
        .collect();
    Ok(Some(PartitionTable {
        kind: TableKind::Gpt,
        partitions,
    }))
}

/// The primary partitions of the disk's MBR, if it has one.
fn read_mbr<D: BlockDevice + ?Sized>(
    dev: &D,
    disk: usize,
    geo: &Geometry,
) -> Result<PartitionTable> {
    if geo.size < 512 {
        return Ok(PartitionTable::none());
    }
    let mut mbr = [0u8; 512];
    read_exact(dev, disk, geo, 0, &mut mbr)?;
    if mbr[510..512] != [0x55, 0xAA] {
        return Ok(PartitionTable::none());
    }
    let entry = |i: usize| &mbr[446 + 16 * i..446 + 16 * (i + 1)];
    // A boot sector without a partition table (a FAT volume, say) has the signature too;
    // a real MBR has status 0x00 or 0x80 in every entry.
    if (0..4).any(|i| !matches!(entry(i)[0], 0x00 | 0x80)) {
        return Ok(PartitionTable::none());
    }
    let blocks = geo.size / geo.block_size;
    let mut partitions = Vec::new();
    let mut extended = None;
    for i in 0..4 {
        let e = entry(i);
        let kind = e[4];
        let start = u64::from(le_u32(e, 8));
        let len = u64::from(le_u32(e, 12));
        if kind == 0 || len == 0 || kind == 0xEE {
            continue;
        }
        let part = Some(Partition { start, blocks: len });
        if is_extended(kind) {
            // The first container only (a second one is not valid MBR usage).
            if extended.is_none() {
                extended = checked(disk, "MBR extended", i as u32 + 1, part, blocks);
            }
            continue;
        }
        if let Some(p) = checked(disk, "MBR", i as u32 + 1, part, blocks) {
            partitions.push(p);
        }
    }
    if let Some(container) = extended {
        read_logical(dev, disk, geo, container, &mut partitions)?;
    }
    let kind = if partitions.is_empty() {
        TableKind::None
    } else {
        TableKind::Mbr
    };
    Ok(PartitionTable { kind, partitions })
}

/// Walks the EBR chain of the extended partition `container` and appends its logical
/// partitions. Each EBR's first entry is a logical partition, its start relative to that EBR;
/// its second entry links to the next EBR, relative to the container's start (0: the end).
fn read_logical<D: BlockDevice + ?Sized>(
    dev: &D,
    disk: usize,
    geo: &Geometry,
    container: Partition,
    partitions: &mut Vec<Partition>,
) -> Result<()> {
    let end = container.start + container.blocks;
    let mut seen: Vec<u64> = Vec::new();
    let mut ebr = container.start;
    let mut found = 0usize;
    for _ in 0..MAX_EBR_READS {
        if seen.contains(&ebr) {
            log::warn!("disk {disk}: the EBR chain loops back to block {ebr}; stopping there");
            break;
        }
        seen.push(ebr);
        let mut sector = [0u8; 512];
        read_exact(dev, disk, geo, ebr * geo.block_size, &mut sector)?;
        if sector[510..512] != [0x55, 0xAA] {
            log::warn!("disk {disk}: no EBR signature at block {ebr}; stopping the chain");
            break;
        }
        let entry = |i: usize| &sector[446 + 16 * i..446 + 16 * (i + 1)];
        let (e0, e1) = (entry(0), entry(1));
        let len = u64::from(le_u32(e0, 12));
        if e0[4] != 0 && len > 0 {
            // Inside the container (and so inside the disk), after its EBR.
            let part = ebr
                .checked_add(u64::from(le_u32(e0, 8)))
                .filter(|&s| s > ebr)
                .map(|start| Partition { start, blocks: len });
            let number = partitions.len() as u32 + 1;
            if let Some(p) = checked(disk, "EBR", number, part, end) {
                partitions.push(p);
                found += 1;
                if found == MAX_LOGICAL {
                    log::warn!("disk {disk}: more than {MAX_LOGICAL} logical partitions");
                    break;
                }
            }
        }
        let next = u64::from(le_u32(e1, 8));
        if !is_extended(e1[4]) || next == 0 {
            break;
        }
        match container.start.checked_add(next).filter(|&n| n < end) {
            Some(n) => ebr = n,
            None => {
                log::warn!("disk {disk}: EBR link to block +{next} leaves its container");
                break;
            }
        }
    }
    Ok(())
}

/// `part` if it is non-empty and inside a disk of `disk_blocks` blocks; logs and drops it
/// otherwise.
fn checked(
    disk: usize,
    table: &str,
    entry: u32,
    part: Option<Partition>,
    disk_blocks: u64,
) -> Option<Partition> {
    let ok = part.filter(|p| {
        p.blocks > 0
            && p.start > 0
            && p.start
                .checked_add(p.blocks)
                .is_some_and(|end| end <= disk_blocks)
    });
    if ok.is_none() {
        log::warn!(
            "disk {disk}: {table} entry {entry} ({part:?}) is empty or outside the disk of \
             {disk_blocks} blocks; leaving it out"
        );
    }
    ok
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

/// Reads exactly `buf.len()` bytes at `offset` (inside the disk).
fn read_exact<D: BlockDevice + ?Sized>(
    dev: &D,
    disk: usize,
    geo: &Geometry,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    let n = read_at(dev, disk, geo, offset, buf)?;
    if n != buf.len() {
        return Err(Error::new(syscall::error::EIO));
    }
    Ok(())
}

/// A read-only, seekable byte view of a whole disk for the `gpt` crate. Reads go through the
/// scheme's own byte-granular reader; the first device error is kept in `error` so that the
/// caller reports the errno instead of "no table".
struct DiskReader<'a, D: ?Sized> {
    dev: &'a D,
    disk: usize,
    geo: Geometry,
    pos: u64,
    error: Option<Error>,
}

impl<D: ?Sized> std::fmt::Debug for DiskReader<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskReader")
            .field("disk", &self.disk)
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl<D: BlockDevice + ?Sized> Read for DiskReader<'_, D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match read_at(self.dev, self.disk, &self.geo, self.pos, buf) {
            Ok(n) => {
                self.pos += n as u64; // n <= size - pos
                Ok(n)
            }
            Err(e) => {
                self.error.get_or_insert(e);
                Err(io::Error::other(format!("disk {}: {e}", self.disk)))
            }
        }
    }
}

impl<D: BlockDevice + ?Sized> Seek for DiskReader<'_, D> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.geo.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(self.pos)
    }
}

impl<D: ?Sized> Write for DiskReader<'_, D> {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the partition-table reader is read-only",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
