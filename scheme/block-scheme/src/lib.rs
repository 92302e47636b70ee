//! The `disk.*` block scheme with Redox conventions.
//!
//! Owns: path parsing, handles, byte-granular reads and writes over block devices
//! (read-modify-write for unaligned edges), fsync/fstat/fsize/fpath, and errno values from
//! `redox_syscall`. It knows nothing of SCSI or virtio: it sees disks through [`BlockDevice`].
//! The transport (Redox scheme socket or the host IPC) calls [`DiskScheme`].
//!
//! # Paths
//! Inside the scheme: `""` or `"/"` is the root directory, `"N"` / `"/N"` disk `N`, `"NpM"` /
//! `"/NpM"` partition `M` of disk `N` (parsed, but `ENOENT` until partitions are implemented).
//! Numbers are canonical decimal (no sign, no leading zeros); anything else is `ENOENT`.
//! [`DiskScheme::fpath`] returns `"disk.virtio-scsi:"` for the root and `"disk.virtio-scsi:N"`
//! for a disk, as Redox's `storage/driver-block` does.
//!
//! # I/O semantics (byte-granular, at any offset and length)
//! - **Reads**: a read at or after the end of the device returns `Ok(0)` (end of file); a read
//!   crossing the end is truncated at the end and returns the shorter count.
//! - **Writes**: a non-empty write at or after the end fails with `ENOSPC`; a write crossing
//!   the end writes the bytes that fit and returns that shorter count (a short write is never
//!   silent: the count says exactly what was written). The caller's next write, at the end,
//!   gets `ENOSPC`.
//! - **Zero-length** reads and writes return `Ok(0)` without touching the device, at any
//!   offset (also past the end), after the handle's access-mode check.
//! - **Errors**: a device error fails the whole call with the device's errno; a failed write
//!   never reports any byte as written (blocks before the failing device call may already
//!   hold the new data, as after any failed write). A read-only disk refuses writes with
//!   `EROFS`. A disk that disappeared (`disks()` shorter than the handle's index) gives
//!   `ENODEV`. Offsets up to `u64::MAX` are handled with checked arithmetic.
//! - **fsync** calls [`BlockDevice::flush`] (SYNCHRONIZE CACHE): when it returns `Ok`, every
//!   write that completed before it is on the backend.
//!
//! Why these end-of-device rules: Redox's shared block code (`redox-os/drivers`,
//! `storage/driver-block/src/lib.rs`, `DiskWrapper::read`/`write` and `DiskScheme::read`/`write`)
//! does no end-of-device check for a whole disk: it truncates the offset down to a block,
//! refuses lengths that are not a block multiple with `EINVAL`, and passes the request to the
//! driver, whose behaviour differs (`lived` returns `EINVAL`, `virtio-blkd` asserts on the
//! device status and so panics, `ahcid`/`nvmed` send the command and report what the device
//! says); for a partition it returns `EOVERFLOW` only when the start block is past the
//! partition and does not truncate a request that crosses its end. That is not a behaviour to
//! copy, so we follow the POSIX/Linux block-device behaviour instead (Linux `block/fops.c`,
//! `blkdev_read_iter`: `pos >= size` → 0, else truncate; `blkdev_write_iter`: `pos >= size` →
//! `-ENOSPC`, else truncate to the end).
//!
//! # Concurrency
//! Every method takes `&self` and may be called from many threads at once. The handle table
//! lock is never held during device I/O. Reads take no lock. Every write holds the
//! block-aligned byte range it touches in a per-disk range lock (module `range_lock`) while it
//! writes: overlapping writes are serialized (so read-modify-write of a shared edge block
//! never changes a neighbour's bytes, and two overlapping writes never interleave), writes to
//! disjoint blocks proceed concurrently. A request larger than [`MAX_IO_CHUNK`] is split into
//! several device calls of at most that size.
//!
//! # Permissions (not enforced yet)
//! Redox's `driver-block` refuses every open by a uid other than 0 with `EACCES`. This crate
//! does not enforce anything yet: the caller's [`CallerCtx`] is stored in each handle and
//! `DiskScheme::check_access` is the single place where the rule will go.

mod handle;
mod io;
mod path;
mod range_lock;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use syscall::error::{EBADF, EEXIST, EISDIR, ENODEV, ENOENT, ENOTDIR, EROFS};
use syscall::flag::{
    MODE_DIR, MODE_FILE, O_CREAT, O_DIRECTORY, O_EXCL, O_RDONLY, O_STAT, O_WRONLY,
};

use handle::{Handle, HandleTable, Target};
use io::Geometry;
use range_lock::RangeLock;

pub use io::MAX_IO_CHUNK;
pub use path::{SchemePath, parse_path, split_scheme_path};

pub use syscall::error::Error;
pub use syscall::{data::Stat, flag};

/// Result with a Redox errno.
pub type Result<T> = std::result::Result<T, Error>;

/// What the scheme needs to know about one disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Logical block size in bytes (512 or 4096 typically; always a power of two >= 512).
    pub block_size: u32,
    /// Number of logical blocks.
    pub blocks: u64,
    /// The disk refuses writes (write-protected medium or configured read-only).
    pub readonly: bool,
}

/// The disks behind the scheme. Implemented by the driver (through the daemon) over real
/// hardware. Every method may be called from many threads at once.
pub trait BlockDevice: Send + Sync + 'static {
    /// The disks, indexed by disk number (`/0`, `/1`, ...).
    fn disks(&self) -> Vec<DiskInfo>;
    /// Reads whole blocks starting at `lba`; `buf.len()` is a non-zero multiple of the block
    /// size and the range is inside the disk. Either fills all of `buf` or returns an error.
    fn read_blocks(&self, disk: usize, lba: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes whole blocks starting at `lba`, same rules. Either writes all or returns an error.
    fn write_blocks(&self, disk: usize, lba: u64, buf: &[u8]) -> Result<()>;
    /// Makes every completed write durable on the backend (SYNCHRONIZE CACHE).
    fn flush(&self, disk: usize) -> Result<()>;
    /// Driver counters as text, one `name value` item per line (for `vscsi stats`).
    fn stats(&self) -> String {
        String::new()
    }
}

/// Who is calling: from the kernel (Redox) or the socket peer's credentials (host).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallerCtx {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id.
    pub pid: u32,
}

/// The block scheme: paths, handles and byte-granular I/O over one [`BlockDevice`].
///
/// All methods take `&self`; share it between server threads (e.g. in an `Arc`).
pub struct DiskScheme<D: BlockDevice> {
    /// Scheme name, e.g. `disk.virtio-scsi`.
    name: String,
    device: Arc<D>,
    handles: HandleTable,
    /// One write range lock per disk index, created on first write. Entries are never removed
    /// (at most one per disk index ever seen), so a lock outlives every write that uses it.
    /// This map's mutex is held only to look up or insert an entry, never while waiting for a
    /// range or during I/O; poisoning is recovered with `into_inner`.
    range_locks: Mutex<HashMap<usize, Arc<RangeLock>>>,
}

impl<D: BlockDevice> std::fmt::Debug for DiskScheme<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskScheme")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<D: BlockDevice> DiskScheme<D> {
    /// A scheme named `name` (e.g. `"disk.virtio-scsi"`) over `device`.
    pub fn new(name: &str, device: Arc<D>) -> Self {
        Self {
            name: name.to_owned(),
            device,
            handles: HandleTable::new(),
            range_locks: Mutex::new(HashMap::new()),
        }
    }

    /// The scheme name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device behind the scheme.
    pub fn device(&self) -> &Arc<D> {
        &self.device
    }

    /// Opens `path` (relative to the scheme root, see [`parse_path`]) and returns a handle id.
    ///
    /// Access mode from `flags`: `O_RDONLY`, `O_WRONLY`, `O_RDWR` (`O_ACCMODE` bits; with none
    /// of them the handle can neither read nor write). `O_STAT` opens a handle for
    /// fstat/fsize/fpath only, whatever the access mode. Errors: `ENOENT` for a malformed path,
    /// a missing disk or any partition (not implemented yet); `EISDIR` for the root with write
    /// access; `ENOTDIR` for a disk with `O_DIRECTORY`; `EROFS` for a read-only disk with write
    /// access (not with `O_STAT`); `EEXIST` for `O_CREAT | O_EXCL` (everything in the scheme
    /// already exists; `O_CREAT` alone is ignored, `O_TRUNC` too: a disk has a fixed size).
    pub fn open(&self, path: &str, flags: usize, ctx: &CallerCtx) -> Result<usize> {
        let target = parse_path(path)?;
        self.check_access(target, flags, ctx)?;
        let stat_only = flags & O_STAT == O_STAT;
        let can_read = !stat_only && flags & O_RDONLY == O_RDONLY;
        let can_write = !stat_only && flags & O_WRONLY == O_WRONLY;
        let exclusive_create = flags & (O_CREAT | O_EXCL) == O_CREAT | O_EXCL;

        let target = match target {
            SchemePath::Root => {
                if can_write {
                    return Err(Error::new(EISDIR));
                }
                if exclusive_create {
                    return Err(Error::new(EEXIST));
                }
                Target::Root {
                    listing: self.listing().into_bytes(),
                }
            }
            SchemePath::Disk(disk) => {
                let disks = self.device.disks();
                let info = disks.get(disk).ok_or(Error::new(ENOENT))?;
                if flags & O_DIRECTORY == O_DIRECTORY {
                    return Err(Error::new(ENOTDIR));
                }
                if exclusive_create {
                    return Err(Error::new(EEXIST));
                }
                let geo = Geometry::of(info)?;
                if can_write && geo.readonly {
                    return Err(Error::new(EROFS));
                }
                // Later (partitions): a whole-disk open conflicts with an open partition of
                // the same disk and vice versa (ENOLCK), as in Redox's driver-block.
                Target::Disk { disk }
            }
            // Partitions come later: parsed, but nothing exists yet.
            SchemePath::Partition { .. } => return Err(Error::new(ENOENT)),
        };
        self.handles.insert(Handle {
            target,
            can_read,
            can_write,
            stat_only,
            ctx: *ctx,
        })
    }

    /// Reads into `buf` at byte `offset`; see the crate docs for end-of-device behaviour.
    /// The root handle reads its listing text. `EBADF` for an unknown/closed handle or one
    /// without read access.
    pub fn read(&self, id: usize, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let handle = self.handles.get(id)?;
        if !handle.can_read {
            return Err(Error::new(EBADF));
        }
        match handle.target {
            Target::Root { ref listing } => {
                let src = usize::try_from(offset)
                    .ok()
                    .and_then(|o| listing.get(o..))
                    .unwrap_or(&[]);
                let n = src.len().min(buf.len());
                buf[..n].copy_from_slice(&src[..n]);
                Ok(n)
            }
            Target::Disk { disk } => {
                if buf.is_empty() {
                    return Ok(0);
                }
                let geo = self.geometry(disk)?;
                io::read_at(&*self.device, disk, &geo, offset, buf)
            }
        }
    }

    /// Writes `buf` at byte `offset`; see the crate docs for end-of-device behaviour.
    /// `EBADF` for an unknown/closed handle, the root, or a handle without write access;
    /// `EROFS` if the disk is read-only.
    pub fn write(&self, id: usize, offset: u64, buf: &[u8]) -> Result<usize> {
        let handle = self.handles.get(id)?;
        if !handle.can_write {
            return Err(Error::new(EBADF));
        }
        match handle.target {
            Target::Root { .. } => Err(Error::new(EBADF)),
            Target::Disk { disk } => {
                if buf.is_empty() {
                    return Ok(0);
                }
                let geo = self.geometry(disk)?;
                let lock = self.range_lock(disk);
                io::write_at(&*self.device, disk, &geo, &lock, offset, buf)
            }
        }
    }

    /// Makes every write that completed before this call durable ([`BlockDevice::flush`]).
    /// `Ok` without device I/O for the root; `EBADF` for an `O_STAT` handle.
    pub fn fsync(&self, id: usize) -> Result<()> {
        let handle = self.handles.get(id)?;
        if handle.stat_only {
            return Err(Error::new(EBADF));
        }
        match handle.target {
            Target::Root { .. } => Ok(()),
            Target::Disk { disk } => {
                self.geometry(disk)?;
                self.device.flush(disk).inspect_err(|e| {
                    log::warn!("disk {disk}: flush failed: {e}");
                })
            }
        }
    }

    /// Status of the handle's target.
    ///
    /// Root: `MODE_DIR | 0o555`, `st_size` = listing length, `st_nlink` 2, `st_ino` 1.
    /// Disk: `MODE_FILE | 0o644` (`0o444` if read-only), `st_size` = bytes,
    /// `st_blksize` = logical block size, `st_blocks` = number of logical blocks
    /// (`size / block size`, as Redox's driver-block reports it — not 512-byte units unless
    /// the block size is 512), `st_nlink` 1, `st_ino` = disk index + 2.
    /// `st_uid`/`st_gid` are 0, times are 0.
    pub fn fstat(&self, id: usize) -> Result<Stat> {
        let handle = self.handles.get(id)?;
        // st_uid/st_gid stay 0 (root), times 0.
        let mut stat = Stat::default();
        match handle.target {
            Target::Root { ref listing } => {
                stat.st_mode = MODE_DIR | 0o555;
                stat.st_size = listing.len() as u64;
                stat.st_nlink = 2;
                stat.st_ino = 1;
            }
            Target::Disk { disk } => {
                let geo = self.geometry(disk)?;
                let perm = if geo.readonly { 0o444 } else { 0o644 };
                stat.st_mode = MODE_FILE | perm;
                stat.st_size = geo.size;
                stat.st_blksize = u32::try_from(geo.block_size).unwrap_or(u32::MAX);
                stat.st_blocks = geo.size / geo.block_size;
                stat.st_nlink = 1;
                stat.st_ino = u64::try_from(disk).map_or(u64::MAX, |d| d.saturating_add(2));
            }
        }
        Ok(stat)
    }

    /// Size in bytes: the listing length for the root, the disk size for a disk.
    pub fn fsize(&self, id: usize) -> Result<u64> {
        let handle = self.handles.get(id)?;
        match handle.target {
            Target::Root { ref listing } => Ok(listing.len() as u64),
            Target::Disk { disk } => Ok(self.geometry(disk)?.size),
        }
    }

    /// The handle's path, Redox style: `"disk.virtio-scsi:"` for the root,
    /// `"disk.virtio-scsi:N"` for disk N (as `storage/driver-block` formats it). Works even if
    /// the disk has disappeared.
    pub fn fpath(&self, id: usize) -> Result<String> {
        let handle = self.handles.get(id)?;
        let target = match handle.target {
            Target::Root { .. } => SchemePath::Root,
            Target::Disk { disk } => SchemePath::Disk(disk),
        };
        Ok(format!("{}:{}", self.name, path::format_path(target)))
    }

    /// Closes the handle; its id is never handed out again. `EBADF` if unknown or already
    /// closed. Operations already running on the handle finish normally.
    pub fn close(&self, id: usize) -> Result<()> {
        self.handles.remove(id).map(drop)
    }

    /// Who opened handle `id` (for logs and, later, permission checks).
    pub fn caller(&self, id: usize) -> Result<CallerCtx> {
        Ok(self.handles.get(id)?.ctx)
    }

    /// Access-control hook: the one place where who may open what will be decided.
    ///
    /// Not enforced yet: everyone may open everything. Redox's driver-block refuses every
    /// caller whose uid is not 0 with `EACCES`; the plan is to do the same here (and possibly
    /// allow a configured group read access), based on `ctx`, the target and the access mode
    /// in `flags`.
    fn check_access(&self, _target: SchemePath, _flags: usize, _ctx: &CallerCtx) -> Result<()> {
        Ok(())
    }

    /// The root listing: one line per disk (`"0\n1\n"`); partitions (`"0p0"`) come later.
    fn listing(&self) -> String {
        (0..self.device.disks().len())
            .map(|d| format!("{d}\n"))
            .collect()
    }

    /// The current geometry of `disk`; `ENODEV` if the disk is gone.
    fn geometry(&self, disk: usize) -> Result<Geometry> {
        let disks = self.device.disks();
        let info = disks.get(disk).ok_or(Error::new(ENODEV))?;
        Geometry::of(info)
    }

    /// The write range lock of `disk` (created on first use).
    fn range_lock(&self, disk: usize) -> Arc<RangeLock> {
        let mut locks = self
            .range_locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        locks
            .entry(disk)
            .or_insert_with(|| Arc::new(RangeLock::new()))
            .clone()
    }
}
