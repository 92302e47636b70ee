//! Byte-granular I/O over a region of a block device (a whole disk or one partition):
//! end-of-region clamping, splitting a byte range into an unaligned head block, whole-block
//! middle chunks (at most [`MAX_IO_CHUNK`] bytes per device call) and an unaligned tail block,
//! and read-modify-write of the edge blocks under the disk's [`RangeLock`]; discards of whole
//! blocks and writes of zeroes (a write whose data are zeroes, through the device's
//! write-zeroes command where it has one) under the same lock.

use std::borrow::Cow;

use syscall::error::{EINVAL, EIO, ENOSPC, EOPNOTSUPP, EROFS, Error};

use crate::range_lock::RangeLock;
use crate::{BlockDevice, DiskInfo, Result};

/// The largest byte count passed to one `read_blocks`/`write_blocks` call (rounded down to a
/// whole number of blocks, but at least one block). Larger requests are split into several
/// calls in ascending order. The caller's buffer is handed to the device directly (no copy),
/// so this bounds what one device request may have to pin or bounce (DMA buffers, SCSI
/// transfer length), not memory in this crate. The only scratch memory here is one block for
/// each unaligned edge.
pub const MAX_IO_CHUNK: usize = 1 << 20;

/// The zero buffer whole blocks are written from when the device has no write-zeroes command
/// (one chunk: every fallback write is at most [`MAX_IO_CHUNK`] bytes).
static ZEROES: [u8; MAX_IO_CHUNK] = [0; MAX_IO_CHUNK];

/// The shape of one region (a whole disk, or a partition of it) as the I/O code uses it.
///
/// Every device call for the region is at `base + (offset / block_size)`; offsets are
/// clamped to `size` first, so I/O through a partition's geometry never reaches outside the
/// partition (its neighbours, the partition table or past the disk).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Block size in bytes; never 0.
    pub(crate) block_size: u64,
    /// Addressable size of the region in bytes: `blocks * block_size`, capped at the largest
    /// whole number of blocks that fits in `u64`, so every byte offset below it is
    /// representable and all offset arithmetic below `size` cannot overflow.
    pub(crate) size: u64,
    pub(crate) readonly: bool,
    /// First block of the region on the disk (0 for a whole disk). Invariant (checked by
    /// [`Geometry::region`]): `base * block_size + size` fits in `u64` and is at most the
    /// disk's size.
    pub(crate) base: u64,
}

impl Geometry {
    /// `EIO` for a device that reports a zero block size (a driver bug; never divide by it).
    pub(crate) fn of(info: &DiskInfo) -> Result<Self> {
        let block_size = u64::from(info.block_size);
        if block_size == 0 {
            log::error!("block device reports a block size of 0");
            return Err(Error::new(EIO));
        }
        let blocks = info.blocks.min(u64::MAX / block_size);
        Ok(Self {
            block_size,
            size: blocks * block_size,
            readonly: info.readonly,
            base: 0,
        })
    }

    /// The region of `blocks` blocks from block `start` of this (whole-disk) geometry, or
    /// `None` if any of it lies outside the disk.
    pub(crate) fn region(&self, start: u64, blocks: u64) -> Option<Self> {
        let end = start.checked_add(blocks)?;
        let disk_blocks = self.size / self.block_size;
        if end > disk_blocks || blocks == 0 {
            return None;
        }
        Some(Self {
            block_size: self.block_size,
            size: blocks * self.block_size, // <= self.size
            readonly: self.readonly,
            base: self.base + start, // whole disk: base 0, end <= disk blocks
        })
    }

    /// The device block where `len` bytes at byte `offset` of the region start, if they are
    /// whole blocks (offset and length block-aligned, `len > 0`) wholly inside the region.
    pub(crate) fn whole_blocks(&self, offset: u64, len: usize) -> Option<u64> {
        let len = len as u64;
        let inside = offset.checked_add(len).is_some_and(|end| end <= self.size);
        let aligned = offset.is_multiple_of(self.block_size) && len.is_multiple_of(self.block_size);
        (len > 0 && inside && aligned).then(|| self.abs(offset / self.block_size))
    }

    /// The device block of region-relative block `lba` (cannot overflow for `lba` below the
    /// region's end, by the invariant on `base`).
    fn abs(&self, lba: u64) -> u64 {
        self.base + lba
    }

    /// The block size as `usize` (it came from a `u32`).
    fn bs(&self) -> usize {
        usize::try_from(self.block_size).unwrap_or(usize::MAX)
    }

    /// Whole-block bytes per device call: `MAX_IO_CHUNK` rounded down to blocks, >= 1 block.
    fn chunk(&self) -> usize {
        let bs = self.bs();
        (MAX_IO_CHUNK / bs).max(1).saturating_mul(bs)
    }

    /// How many of `len` bytes at `offset` lie inside the device (0 at or after the end).
    fn clamp(&self, offset: u64, len: usize) -> usize {
        let avail = self.size.saturating_sub(offset);
        // The minimum is at most `len`, so it fits in usize.
        usize::try_from(avail.min(len as u64)).unwrap_or(len)
    }
}

/// One piece of a byte range, in device terms.
enum Piece {
    /// `len` bytes at `in_block` inside block `lba`, not the whole block.
    Partial {
        lba: u64,
        in_block: usize,
        len: usize,
    },
    /// Whole blocks starting at `lba`, `len` bytes (a multiple of the block size).
    Whole { lba: u64, len: usize },
}

/// Splits `[offset, offset + len)` (inside the device) into the next piece to do.
fn next_piece(geo: &Geometry, pos: u64, remaining: usize) -> Piece {
    let bs = geo.block_size;
    let lba = pos / bs;
    // `pos % bs < bs <= u32::MAX`, so it fits in usize.
    let in_block = usize::try_from(pos % bs).unwrap_or(0);
    if in_block != 0 || (remaining as u64) < bs {
        let len = remaining.min(geo.bs() - in_block);
        Piece::Partial { lba, in_block, len }
    } else {
        let whole = remaining - remaining % geo.bs();
        Piece::Whole {
            lba,
            len: whole.min(geo.chunk()),
        }
    }
}

/// Reads `buf.len()` bytes at byte `offset` of the region `geo` of `disk`.
///
/// Returns the bytes read: `buf.len()` inside the device, fewer when the range crosses the
/// end, 0 at or after the end or for an empty `buf` (no device call then). Any device error
/// fails the whole read with that errno (nothing is reported as read).
pub(crate) fn read_at<D: BlockDevice + ?Sized>(
    dev: &D,
    disk: usize,
    geo: &Geometry,
    offset: u64,
    buf: &mut [u8],
) -> Result<usize> {
    let len = geo.clamp(offset, buf.len());
    let buf = &mut buf[..len];
    let mut scratch = Vec::new();
    let (mut pos, mut done) = (offset, 0usize);
    while done < len {
        let n = match next_piece(geo, pos, len - done) {
            Piece::Partial { lba, in_block, len } => {
                scratch.resize(geo.bs(), 0);
                let lba = geo.abs(lba);
                dev.read_blocks(disk, lba, &mut scratch)
                    .inspect_err(|e| log_err("read", disk, lba, e))?;
                buf[done..done + len].copy_from_slice(&scratch[in_block..in_block + len]);
                len
            }
            Piece::Whole { lba, len } => {
                let lba = geo.abs(lba);
                dev.read_blocks(disk, lba, &mut buf[done..done + len])
                    .inspect_err(|e| log_err("read", disk, lba, e))?;
                len
            }
        };
        done += n;
        pos += n as u64; // <= offset + len <= geo.size
    }
    Ok(len)
}

/// Writes `buf` at byte `offset` of the region `geo` of `disk`.
///
/// Returns the bytes written: `buf.len()` inside the device, fewer when the range crosses the
/// end; `ENOSPC` for a non-empty write at or after the end; 0 for an empty `buf` (no device
/// call, no error even past the end); `EROFS` for a read-only disk. The whole block-aligned
/// range is held in `lock` while writing, so edge-block read-modify-write never loses a
/// concurrent writer's neighbouring bytes. Any device error fails the whole write with that
/// errno: nothing is reported as written, although blocks before the failing call may already
/// hold new data (as after any failed write).
pub(crate) fn write_at<D: BlockDevice + ?Sized>(
    dev: &D,
    disk: usize,
    geo: &Geometry,
    lock: &RangeLock,
    offset: u64,
    buf: &[u8],
) -> Result<usize> {
    if buf.is_empty() {
        return Ok(0);
    }
    if geo.readonly {
        return Err(Error::new(EROFS));
    }
    let len = geo.clamp(offset, buf.len());
    if len == 0 {
        return Err(Error::new(ENOSPC));
    }
    let buf = &buf[..len];
    let end = offset + len as u64; // <= geo.size
    let bs = geo.block_size;
    let lock_start = offset - offset % bs;
    // `geo.size` is a multiple of the block size, so rounding `end` up stays <= size.
    let lock_end = end.div_ceil(bs).checked_mul(bs).unwrap_or(geo.size);
    // The lock is per disk, so it takes disk-absolute bytes (the region's start added; the
    // invariant on `base` keeps this in range).
    let region_start = geo.base * bs;
    let _held = lock.lock(region_start + lock_start, region_start + lock_end);

    let mut scratch = Vec::new();
    let (mut pos, mut done) = (offset, 0usize);
    while done < len {
        let n = match next_piece(geo, pos, len - done) {
            Piece::Partial { lba, in_block, len } => {
                scratch.resize(geo.bs(), 0);
                let lba = geo.abs(lba);
                dev.read_blocks(disk, lba, &mut scratch)
                    .inspect_err(|e| log_err("read (for read-modify-write)", disk, lba, e))?;
                scratch[in_block..in_block + len].copy_from_slice(&buf[done..done + len]);
                dev.write_blocks(disk, lba, &scratch)
                    .inspect_err(|e| log_err("write", disk, lba, e))?;
                len
            }
            Piece::Whole { lba, len } => {
                let lba = geo.abs(lba);
                dev.write_blocks(disk, lba, &buf[done..done + len])
                    .inspect_err(|e| log_err("write", disk, lba, e))?;
                len
            }
        };
        done += n;
        pos += n as u64;
    }
    Ok(len)
}

/// Holds the whole blocks around `[offset, end)` of the region in `lock` (disk-absolute bytes;
/// `end <= geo.size`).
fn lock_blocks<'a>(
    geo: &Geometry,
    lock: &'a RangeLock,
    offset: u64,
    end: u64,
) -> crate::range_lock::RangeGuard<'a> {
    let bs = geo.block_size;
    let start = offset - offset % bs;
    // `geo.size` is a multiple of the block size, so rounding `end` up stays <= size.
    let stop = end.div_ceil(bs).checked_mul(bs).unwrap_or(geo.size);
    let region_start = geo.base * bs;
    lock.lock(region_start + start, region_start + stop)
}

/// Discards the whole blocks `[offset, offset + len)` of the region `geo` of `disk` (`len > 0`).
///
/// `EROFS` for a read-only disk; `EINVAL` unless `offset` and `len` are multiples of the block
/// size and the range lies inside the region; `EOPNOTSUPP` if the device cannot discard. The
/// blocks are held in `lock` during the device call, so a discard never overlaps a write.
pub(crate) fn discard_at<D: BlockDevice + ?Sized>(
    dev: &D,
    disk: usize,
    geo: &Geometry,
    lock: &RangeLock,
    offset: u64,
    len: u64,
) -> Result<()> {
    if geo.readonly {
        return Err(Error::new(EROFS));
    }
    let bs = geo.block_size;
    let inside = offset.checked_add(len).is_some_and(|end| end <= geo.size);
    if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) || !inside {
        return Err(Error::new(EINVAL));
    }
    if !dev.can_discard(disk) {
        return Err(Error::new(EOPNOTSUPP));
    }
    let _held = lock_blocks(geo, lock, offset, offset + len);
    let lba = geo.abs(offset / bs);
    dev.discard(disk, lba, len / bs)
        .inspect_err(|e| log_err("discard", disk, lba, e))
}

/// Writes `len` (> 0) zero bytes at byte `offset` of the region `geo` of `disk`: the rules and
/// the result of [`write_at`], with zeroes for data. Partial edge blocks are read, zeroed in
/// part and written back; whole blocks go to [`BlockDevice::write_zeroes`], or, if the device
/// answers `EOPNOTSUPP`, are written from a zero buffer in chunks of at most
/// [`MAX_IO_CHUNK`] bytes.
pub(crate) fn write_zeroes_at<D: BlockDevice + ?Sized>(
    dev: &D,
    disk: usize,
    geo: &Geometry,
    lock: &RangeLock,
    offset: u64,
    len: u64,
) -> Result<u64> {
    if len == 0 {
        return Ok(0);
    }
    if geo.readonly {
        return Err(Error::new(EROFS));
    }
    let len = geo.size.saturating_sub(offset).min(len);
    if len == 0 {
        return Err(Error::new(ENOSPC));
    }
    let end = offset + len; // <= geo.size
    let _held = lock_blocks(geo, lock, offset, end);
    let bs = geo.block_size;
    let mut scratch = Vec::new();
    let mut pos = offset;
    // Whether to ask the device to write zeroes: once it refused, not again in this call.
    let mut device_zeroes = true;
    let mut zero_chunk: Cow<'static, [u8]> = Cow::Borrowed(&[]);
    while pos < end {
        let in_block = pos % bs;
        let lba = pos / bs;
        if in_block != 0 || end - pos < bs {
            // A partial block: read, zero the part, write back.
            let n = (bs - in_block).min(end - pos);
            scratch.resize(geo.bs(), 0);
            let abs = geo.abs(lba);
            dev.read_blocks(disk, abs, &mut scratch)
                .inspect_err(|e| log_err("read (for read-modify-write)", disk, abs, e))?;
            // in_block + n <= bs, which came from a u32.
            let (from, to) = (in_block as usize, (in_block + n) as usize);
            scratch[from..to].fill(0);
            dev.write_blocks(disk, abs, &scratch)
                .inspect_err(|e| log_err("write", disk, abs, e))?;
            pos += n;
            continue;
        }
        let blocks = (end - pos) / bs;
        let abs = geo.abs(lba);
        if device_zeroes {
            match dev.write_zeroes(disk, abs, blocks) {
                Ok(()) => {
                    pos += blocks * bs;
                    continue;
                }
                Err(e) if e.errno == EOPNOTSUPP => device_zeroes = false,
                Err(e) => {
                    log_err("write zeroes", disk, abs, &e);
                    return Err(e);
                }
            }
        }
        // One chunk of zeroes: the static buffer, unless a block is larger than it.
        if zero_chunk.is_empty() {
            zero_chunk = if geo.chunk() <= ZEROES.len() {
                Cow::Borrowed(&ZEROES[..geo.chunk()])
            } else {
                Cow::Owned(vec![0u8; geo.chunk()])
            };
        }
        let n = usize::try_from(blocks * bs)
            .unwrap_or(usize::MAX)
            .min(zero_chunk.len());
        dev.write_blocks(disk, abs, &zero_chunk[..n])
            .inspect_err(|e| log_err("write", disk, abs, e))?;
        pos += n as u64;
    }
    Ok(len)
}

fn log_err(what: &str, disk: usize, lba: u64, e: &Error) {
    log::warn!("disk {disk}: {what} at block {lba} failed: {e}");
}
