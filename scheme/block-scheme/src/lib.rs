//! The `disk.*` block scheme with Redox conventions.
//!
//! Owns: path parsing, handles, byte-granular reads and writes over block devices
//! (read-modify-write for unaligned edges), fsync/fstat/fsize/fpath, and errno values from
//! `redox_syscall`. It knows nothing of SCSI or virtio: it sees disks through [`BlockDevice`].
//! The transport (Redox scheme socket or the host IPC) calls [`DiskScheme`].
//!
//! # Paths
//! Inside the scheme: `""` or `"/"` is the root directory, `"N"` / `"/N"` disk `N`, `"NpM"` /
//! `"/NpM"` partition `M` (from 0) of disk `N`. Numbers are canonical decimal (no sign, no
//! leading zeros); anything else is `ENOENT`. [`DiskScheme::fpath`] returns
//! `"disk.virtio-scsi:"` for the root, `"disk.virtio-scsi:N"` for a disk and
//! `"disk.virtio-scsi:NpM"` for a partition, as Redox's `storage/driver-block` does. The root
//! lists every disk followed by its partitions, one name a line (`"0\n0p0\n0p1\n1\n"`).
//!
//! # Partitions
//! GPT first, then MBR primary partitions, for 512- and 4096-byte blocks (module
//! `partitions`). A partition handle is a window on its disk: offsets are relative to the
//! partition's first byte and every end-of-device rule below applies at the partition's end,
//! so I/O through a partition never reaches a neighbour. Tables are read on first use and
//! re-read when the disk changes (size, block size, [`BlockDevice::generation`], or any write
//! through a whole-disk handle). A partition handle whose partition no longer has the same
//! start and length after such a change gets `ENODEV`.
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
//!   `EROFS`. A disk that disappeared (`disks()` shorter than the handle's index, or the
//!   disk reported with 0 blocks) gives `ENODEV`. Offsets up to `u64::MAX` are handled with
//!   checked arithmetic.
//! - **fsync** calls [`BlockDevice::flush`] (SYNCHRONIZE CACHE): when it returns `Ok`, every
//!   write that completed before it is on the backend.
//! - **Discard** ([`DiskScheme::discard`]) takes whole blocks only: an offset or length that is
//!   not a multiple of the block size is `EINVAL` (never rounded, so no byte outside the range
//!   can be lost), and so is a range that does not lie wholly inside the disk or partition
//!   (as Linux's `BLKDISCARD`). A read-only disk gives `EROFS`, a device that cannot discard
//!   `EOPNOTSUPP`. What discarded blocks read back as is the device's business (zeroes, the old
//!   data, or anything else) until they are written again.
//! - **Write zeroes** ([`DiskScheme::write_zeroes`]) is a write of zero bytes at any offset and
//!   length, with the write rules above (end of device, `EROFS`, range lock, edge blocks
//!   read-modify-written). Whole blocks go to [`BlockDevice::write_zeroes`] (WRITE SAME on the
//!   host) when the device has it, else zero buffers are written.
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
//! block-aligned byte range it touches in a per-disk range lock (module `range_lock`, in
//! disk-absolute bytes) while it writes: overlapping writes are serialized (so
//! read-modify-write of a shared edge block never changes a neighbour's bytes, and two
//! overlapping writes never interleave), writes to disjoint blocks proceed concurrently. A
//! request larger than [`MAX_IO_CHUNK`] is split into several device calls of at most that
//! size.
//!
//! # Locks and permissions (as Redox's `driver-block`)
//! - Every open is checked against the scheme's [`AccessPolicy`] first (`EACCES`); the
//!   default, [`AccessPolicy::root_only`], is Redox's rule (uid 0 only).
//! - A whole-disk I/O handle and a partition I/O handle of the same disk exclude each other:
//!   opening one while the other kind is open is `ENOLCK`. Any number of handles of one kind
//!   may be open together. `O_STAT` handles do no I/O and take no part in this (a deliberate
//!   difference: `driver-block` counts them too, which only makes `stat` fail spuriously).
//! - A handle opened without write access cannot write (`EBADF`); a read-only disk, and its
//!   partitions, refuse opens with write access (`EROFS`).

mod access;
mod async_io;
mod handle;
mod io;
pub mod partitions;
mod path;
mod range_lock;
mod tables;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use syscall::error::{EACCES, EBADF, EEXIST, EISDIR, ENODEV, ENOENT, ENOTDIR, EOPNOTSUPP, EROFS};
use syscall::flag::{
    MODE_DIR, MODE_FILE, O_CREAT, O_DIRECTORY, O_EXCL, O_RDONLY, O_STAT, O_WRONLY,
};

use access::{Holder, OpenCounts};
pub use async_io::{AsyncBlockIo, AsyncBuf, AsyncPoll, AsyncSlot, IoWaker};
use handle::{Handle, HandleTable, Target};
use io::Geometry;
use range_lock::RangeLock;
use tables::TableCache;

pub use access::AccessPolicy;
pub use partitions::{Partition, PartitionTable, TableKind};

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

/// Who a disk is, as the device describes itself (on the host: SCSI INQUIRY and its VPD pages).
/// For people and tools (`vscsi ls`/`stat`); the I/O path never needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskIdentity {
    /// Vendor (SCSI INQUIRY T10 vendor identification), e.g. `QEMU`.
    pub vendor: String,
    /// Product (INQUIRY product identification), e.g. `QEMU HARDDISK`.
    pub product: String,
    /// Product revision level.
    pub revision: String,
    /// Unit serial number (VPD page 0x80), if the device has one.
    pub serial: Option<String>,
    /// World wide name (VPD page 0x83, NAA or EUI-64, as `0x` + hex), if the device has one.
    pub wwn: Option<String>,
    /// Where the disk is on its bus: the SCSI target id.
    pub target: u32,
    /// Where the disk is on its bus: the logical unit number.
    pub lun: u32,
}

/// The disks behind the scheme. Implemented by the driver (through the daemon) over real
/// hardware. Every method may be called from many threads at once.
pub trait BlockDevice: Send + Sync + 'static {
    /// The disks, indexed by disk number (`/0`, `/1`, ...). A disk reported with 0 blocks is
    /// absent (e.g. unplugged, its number kept for its return): not listed, not openable.
    fn disks(&self) -> Vec<DiskInfo>;
    /// Disk number `disk` alone (what `disks()[disk]` would say). The I/O path asks this on
    /// every read and write, so implementations should answer without allocating; the default
    /// goes through `disks()`.
    fn disk_info(&self, disk: usize) -> Option<DiskInfo> {
        self.disks().get(disk).cloned()
    }
    /// Reads whole blocks starting at `lba`; `buf.len()` is a non-zero multiple of the block
    /// size and the range is inside the disk. Either fills all of `buf` or returns an error.
    fn read_blocks(&self, disk: usize, lba: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes whole blocks starting at `lba`, same rules. Either writes all or returns an error.
    fn write_blocks(&self, disk: usize, lba: u64, buf: &[u8]) -> Result<()>;
    /// Makes every completed write durable on the backend (SYNCHRONIZE CACHE).
    fn flush(&self, disk: usize) -> Result<()>;
    /// Whether [`BlockDevice::discard`] can work on `disk` (the device offers a discard
    /// command and the disk is writable). The default: no.
    fn can_discard(&self, _disk: usize) -> bool {
        false
    }
    /// Discards `blocks` (> 0) whole blocks from `lba`, a range inside the disk: the device may
    /// deallocate them; what they read back as afterwards is the device's business. Either
    /// the whole range was handed to the device or an error is returned. The default:
    /// `EOPNOTSUPP`.
    fn discard(&self, _disk: usize, _lba: u64, _blocks: u64) -> Result<()> {
        Err(Error::new(EOPNOTSUPP))
    }
    /// Writes zeroes to `blocks` (> 0) whole blocks from `lba`, a range inside the disk,
    /// without a data buffer (WRITE SAME). Afterwards they read back as zeroes. `EOPNOTSUPP`
    /// (the default) when the device has no such command: the scheme then writes zero buffers
    /// with [`BlockDevice::write_blocks`].
    fn write_zeroes(&self, _disk: usize, _lba: u64, _blocks: u64) -> Result<()> {
        Err(Error::new(EOPNOTSUPP))
    }
    /// Who `disk` is (vendor, product, serial, WWN, bus address), if the device says. Not on
    /// the I/O path, so it may allocate. The default: `None`.
    fn identity(&self, _disk: usize) -> Option<DiskIdentity> {
        None
    }
    /// Driver counters as text, one `name value` item per line (for `vscsi stats`).
    fn stats(&self) -> String {
        String::new()
    }
    /// A slot for split-phase whole-block I/O ([`AsyncBlockIo`]), if the device can submit
    /// without blocking; `waker` is told when a command submitted through it is answered.
    /// Servers ask once per request slot when they set up (not per request). The default:
    /// `None`, every request goes through [`BlockDevice::read_blocks`] and
    /// [`BlockDevice::write_blocks`].
    fn async_io(&self, _waker: Arc<dyn IoWaker>) -> Option<Box<dyn AsyncBlockIo>> {
        None
    }
    /// Starts busy polling for split-phase I/O: until the matching
    /// [`BlockDevice::end_busy_poll`] the device may stop interrupting for completions, and
    /// the caller calls [`BlockDevice::busy_poll`] continually instead (for a server thread
    /// that would otherwise sleep until its wakers ring). `false`: the device has no such
    /// mode (the default) and the caller waits for its wakers.
    fn begin_busy_poll(&self) -> bool {
        false
    }
    /// Collects the completions the device has posted now (answering their requests, calling
    /// their wakers); returns how many. Never blocks. Only between begin and end.
    fn busy_poll(&self) -> usize {
        0
    }
    /// Ends one [`BlockDevice::begin_busy_poll`] that returned `true`: interrupts come back
    /// (once no one else polls) and nothing posted meanwhile is lost.
    fn end_busy_poll(&self) {}
    /// A number that changes whenever the medium of `disk` may have changed in a way its size
    /// does not show (a new medium, a hot-swapped LUN, a capacity-changed unit attention).
    /// The scheme re-reads a disk's partition table when this, its block size or its block
    /// count changes. The default never changes.
    fn generation(&self, _disk: usize) -> u64 {
        0
    }
}

/// Disk `disk` if it is present: listed by `disks()` with at least one block. A device keeps
/// a removed disk's number by reporting it with no blocks (so numbers stay stable across
/// hotplug); such a disk is absent: not listed, `ENOENT` to open, `ENODEV` for open handles.
fn present(disks: &[DiskInfo], disk: usize) -> Option<&DiskInfo> {
    disks.get(disk).filter(|d| d.blocks > 0)
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
    /// Who may open.
    access: AccessPolicy,
    /// Whole-disk vs partition exclusion (`ENOLCK`).
    opens: OpenCounts,
    /// Partition tables, re-read when a disk changes (shared with asynchronous writes, which
    /// note themselves when they settle).
    tables: Arc<TableCache>,
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
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

impl<D: BlockDevice> DiskScheme<D> {
    /// A scheme named `name` (e.g. `"disk.virtio-scsi"`) over `device`, with Redox's access
    /// rule ([`AccessPolicy::root_only`]).
    pub fn new(name: &str, device: Arc<D>) -> Self {
        Self::with_access(name, device, AccessPolicy::root_only())
    }

    /// A scheme named `name` over `device` that lets the callers `access` permits open.
    pub fn with_access(name: &str, device: Arc<D>, access: AccessPolicy) -> Self {
        Self {
            name: name.to_owned(),
            device,
            handles: HandleTable::new(),
            access,
            opens: OpenCounts::default(),
            tables: Arc::new(TableCache::default()),
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

    /// Who may open.
    pub fn access(&self) -> &AccessPolicy {
        &self.access
    }

    /// Opens `path` (relative to the scheme root, see [`parse_path`]) and returns a handle id.
    ///
    /// Access mode from `flags`: `O_RDONLY`, `O_WRONLY`, `O_RDWR` (`O_ACCMODE` bits; with none
    /// of them the handle can neither read nor write). `O_STAT` opens a handle for
    /// fstat/fsize/fpath only, whatever the access mode. Errors, in the order checked:
    /// `EACCES` for a caller the access policy refuses (for any path); `ENOENT` for a
    /// malformed path, a missing disk or a missing partition; `EISDIR` for the root with write
    /// access; `ENOTDIR` for a disk or partition with `O_DIRECTORY`; `EEXIST` for
    /// `O_CREAT | O_EXCL` (everything in the scheme already exists; `O_CREAT` alone is
    /// ignored, `O_TRUNC` too: a disk has a fixed size); `EROFS` for a read-only disk (or a
    /// partition of one) with write access (not with `O_STAT`); `ENOLCK` for a whole disk
    /// while one of its partitions is open, or a partition while its whole disk is open (not
    /// with `O_STAT`); a device errno if the partition table could not be read.
    pub fn open(&self, path: &str, flags: usize, ctx: &CallerCtx) -> Result<usize> {
        let target = parse_path(path)?;
        self.check_access(target, flags, ctx)?;
        let stat_only = flags & O_STAT == O_STAT;
        let can_read = !stat_only && flags & O_RDONLY == O_RDONLY;
        let can_write = !stat_only && flags & O_WRONLY == O_WRONLY;
        let exclusive_create = flags & (O_CREAT | O_EXCL) == O_CREAT | O_EXCL;
        let refuse_dir_and_create = || {
            if flags & O_DIRECTORY == O_DIRECTORY {
                return Err(Error::new(ENOTDIR));
            }
            if exclusive_create {
                return Err(Error::new(EEXIST));
            }
            Ok(())
        };

        let (target, holder) = match target {
            SchemePath::Root => {
                if can_write {
                    return Err(Error::new(EISDIR));
                }
                if exclusive_create {
                    return Err(Error::new(EEXIST));
                }
                let listing = self.listing().into_bytes();
                (Target::Root { listing }, None)
            }
            SchemePath::Disk(disk) => {
                let disks = self.device.disks();
                let info = present(&disks, disk).ok_or(Error::new(ENOENT))?;
                refuse_dir_and_create()?;
                let geo = Geometry::of(info)?;
                if can_write && geo.readonly {
                    return Err(Error::new(EROFS));
                }
                (Target::Disk { disk }, Some((disk, Holder::Whole)))
            }
            SchemePath::Partition { disk, part } => {
                let disks = self.device.disks();
                let info = present(&disks, disk).ok_or(Error::new(ENOENT))?;
                let geo = Geometry::of(info)?;
                let table = self.tables.get(&*self.device, disk, info, &geo)?;
                let p = *table.partitions.get(part).ok_or(Error::new(ENOENT))?;
                refuse_dir_and_create()?;
                if can_write && geo.readonly {
                    return Err(Error::new(EROFS));
                }
                let target = Target::Partition {
                    disk,
                    part,
                    start: p.start,
                    blocks: p.blocks,
                };
                (target, Some((disk, Holder::Partition)))
            }
        };
        // O_STAT handles do no I/O and take no part in the whole-disk/partition exclusion.
        let holds = holder.filter(|_| !stat_only);
        if let Some((disk, holder)) = holds {
            self.opens.acquire(disk, holder)?;
        }
        self.handles
            .insert(Handle {
                target,
                can_read,
                can_write,
                stat_only,
                ctx: *ctx,
                holds,
            })
            .inspect_err(|_| {
                if let Some((disk, holder)) = holds {
                    self.opens.release(disk, holder);
                }
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
        if let Target::Root { ref listing } = handle.target {
            let src = usize::try_from(offset)
                .ok()
                .and_then(|o| listing.get(o..))
                .unwrap_or(&[]);
            let n = src.len().min(buf.len());
            buf[..n].copy_from_slice(&src[..n]);
            return Ok(n);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let (disk, geo) = self.region(&handle.target)?;
        io::read_at(&*self.device, disk, &geo, offset, buf)
    }

    /// Writes `buf` at byte `offset`; see the crate docs for end-of-device behaviour.
    /// `EBADF` for an unknown/closed handle, the root, or a handle without write access;
    /// `EROFS` if the disk is read-only.
    pub fn write(&self, id: usize, offset: u64, buf: &[u8]) -> Result<usize> {
        self.modify(id, buf.is_empty(), 0, |disk, geo, lock| {
            io::write_at(&*self.device, disk, geo, lock, offset, buf)
        })
    }

    /// Runs an operation that changes the handle's region, `op(disk, region, range lock)`:
    /// `EBADF` for an unknown/closed handle, the root, or a handle without write access; then
    /// `nothing` (no device I/O) when `is_empty`. Afterwards a whole-disk handle tells the
    /// partition-table cache that the table may have changed (even if `op` failed part way).
    fn modify<T>(
        &self,
        id: usize,
        is_empty: bool,
        nothing: T,
        op: impl FnOnce(usize, &Geometry, &RangeLock) -> Result<T>,
    ) -> Result<T> {
        let handle = self.handles.get(id)?;
        if !handle.can_write {
            return Err(Error::new(EBADF));
        }
        if let Target::Root { .. } = handle.target {
            return Err(Error::new(EBADF));
        }
        if is_empty {
            return Ok(nothing);
        }
        let (disk, geo) = self.region(&handle.target)?;
        let lock = self.range_lock(disk);
        let result = op(disk, &geo, &lock);
        if let Target::Disk { .. } = handle.target {
            self.tables.note_write(disk);
        }
        result
    }

    /// A request slot for [`DiskScheme::submit_async`], if the device has split-phase I/O
    /// ([`BlockDevice::async_io`]); `waker` is told when a request started on it is answered.
    /// For set-up time (one per request slot of a server), not per request.
    pub fn async_slot(&self, waker: Arc<dyn IoWaker>) -> Option<AsyncSlot> {
        self.device
            .async_io(waker)
            .map(|io| AsyncSlot::new(io, self.tables.clone()))
    }

    /// Starts a read (`write == false`, into `buf`) or write (from `buf`) of `buf.len` bytes at
    /// byte `offset` of handle `id` on `slot`, without waiting for it (see "Asynchronous
    /// requests" in the crate docs). `Ok(true)`: started, collect it with [`AsyncSlot::poll`]
    /// (and [`AsyncSlot::finish_blocking`]); a settled request transferred all `buf.len`
    /// bytes. `Ok(false)`: not started, because it needs more than whole-block I/O (unaligned,
    /// crossing or past the end of the region, longer than [`MAX_IO_CHUNK`]), its range is
    /// being written, `slot` is busy, or the device cannot start it now: call
    /// [`DiskScheme::read`]/[`DiskScheme::write`] instead. `Err`: what those would fail with
    /// before any I/O (`EBADF` for an unknown handle or one without the access, `ENODEV`,
    /// `EROFS`), or the device's refusal.
    ///
    /// # Safety
    /// `buf` must be valid for the access, and must not be accessed by the caller until the
    /// request settles ([`AsyncSlot::poll`] returned [`AsyncPoll::Done`], or
    /// [`AsyncSlot::finish_blocking`] returned). If the slot is dropped before, the device may
    /// still write the buffer: the memory must then stay mapped and unused as long as it may.
    pub unsafe fn submit_async(
        &self,
        slot: &mut AsyncSlot,
        id: usize,
        write: bool,
        offset: u64,
        buf: AsyncBuf,
    ) -> Result<bool> {
        if slot.is_busy() {
            return Ok(false);
        }
        let handle = self.handles.get(id)?;
        let allowed = if write {
            handle.can_write
        } else {
            handle.can_read
        };
        if !allowed {
            return Err(Error::new(EBADF));
        }
        if let Target::Root { .. } = handle.target {
            return Ok(false);
        }
        if buf.len == 0 || buf.len > MAX_IO_CHUNK {
            return Ok(false);
        }
        let (disk, geo) = self.region(&handle.target)?;
        if write && geo.readonly {
            return Err(Error::new(EROFS));
        }
        let Some(lba) = geo.whole_blocks(offset, buf.len) else {
            return Ok(false);
        };
        let held = if write {
            let start = geo.base * geo.block_size + offset;
            match self
                .range_lock(disk)
                .try_lock_owned(start, start + buf.len as u64)
            {
                Some(held) => Some(held),
                None => return Ok(false),
            }
        } else {
            None
        };
        // SAFETY: the buffer contract is this function's; the range is whole blocks inside
        // the disk (`whole_blocks`, within the region, which lies inside the disk).
        if !unsafe { slot.device_io().submit(disk, lba, buf, write)? } {
            return Ok(false);
        }
        let note_disk = match handle.target {
            Target::Disk { disk } if write => Some(disk),
            _ => None,
        };
        slot.start(held, note_disk);
        Ok(true)
    }

    /// Makes every write that completed before this call durable ([`BlockDevice::flush`]),
    /// for a partition by flushing its disk. `Ok` without device I/O for the root; `EBADF`
    /// for an `O_STAT` handle.
    pub fn fsync(&self, id: usize) -> Result<()> {
        let handle = self.handles.get(id)?;
        if handle.stat_only {
            return Err(Error::new(EBADF));
        }
        if let Target::Root { .. } = handle.target {
            return Ok(());
        }
        let (disk, _) = self.region(&handle.target)?;
        self.device.flush(disk).inspect_err(|e| {
            log::warn!("disk {disk}: flush failed: {e}");
        })
    }

    /// Discards `len` bytes at byte `offset` of the handle's disk or partition (see the crate
    /// docs): both must be multiples of the block size and the range must lie inside the
    /// region, else `EINVAL`. `Ok` without device I/O for `len == 0`. Errors, in the order
    /// checked: `EBADF` for an unknown/closed handle, the root, or a handle without write
    /// access; `ENODEV` for a disk or partition that is gone; `EROFS` for a read-only disk;
    /// `EINVAL` for a range that is unaligned or not inside the region; `EOPNOTSUPP` when the
    /// device cannot discard ([`BlockDevice::can_discard`]); then the device's errno. The
    /// blocks are held in the disk's range lock while they are discarded, as for a write.
    pub fn discard(&self, id: usize, offset: u64, len: u64) -> Result<()> {
        self.modify(id, len == 0, (), |disk, geo, lock| {
            io::discard_at(&*self.device, disk, geo, lock, offset, len)
        })
    }

    /// Writes `len` zero bytes at byte `offset`: a write (every write rule applies: end of
    /// device, access, `EROFS`, the range lock, edge blocks read-modify-written) whose data
    /// are zeroes. Whole blocks go to [`BlockDevice::write_zeroes`] when the device has it,
    /// else zero buffers are written. Returns the bytes zeroed, short only when the range
    /// crosses the end.
    pub fn write_zeroes(&self, id: usize, offset: u64, len: u64) -> Result<u64> {
        self.modify(id, len == 0, 0, |disk, geo, lock| {
            io::write_zeroes_at(&*self.device, disk, geo, lock, offset, len)
        })
    }

    /// Who the handle's disk is ([`BlockDevice::identity`]; a partition's is its disk's).
    /// `Ok(None)` for the root and for a device that does not say. Works on `O_STAT` handles;
    /// `ENODEV` if the disk is gone.
    pub fn identity(&self, id: usize) -> Result<Option<DiskIdentity>> {
        let handle = self.handles.get(id)?;
        if let Target::Root { .. } = handle.target {
            return Ok(None);
        }
        let (disk, _) = self.region(&handle.target)?;
        Ok(self.device.identity(disk))
    }

    /// Whether [`DiskScheme::discard`] can work on the handle's disk: the disk is writable and
    /// the device can discard. `false` for the root. Works on `O_STAT` handles (it says what
    /// the disk can do, not what this handle may do).
    pub fn can_discard(&self, id: usize) -> Result<bool> {
        let handle = self.handles.get(id)?;
        if let Target::Root { .. } = handle.target {
            return Ok(false);
        }
        let (disk, geo) = self.region(&handle.target)?;
        Ok(!geo.readonly && self.device.can_discard(disk))
    }

    /// Status of the handle's target.
    ///
    /// Root: `MODE_DIR | 0o555`, `st_size` = listing length, `st_nlink` 2, `st_ino` 1.
    /// Disk or partition: `MODE_FILE | 0o644` (`0o444` if read-only), `st_size` = bytes,
    /// `st_blksize` = logical block size, `st_blocks` = number of logical blocks
    /// (`size / block size`, as Redox's driver-block reports it — not 512-byte units unless
    /// the block size is 512), `st_nlink` 1; `st_ino` = disk index + 2 for a disk, and
    /// `(disk + 2) << 32 | (partition + 1)` for a partition (distinct for indices below
    /// 2^32). `st_uid`/`st_gid` are 0, times are 0.
    pub fn fstat(&self, id: usize) -> Result<Stat> {
        let handle = self.handles.get(id)?;
        // st_uid/st_gid stay 0 (root), times 0.
        let mut stat = Stat::default();
        if let Target::Root { ref listing } = handle.target {
            stat.st_mode = MODE_DIR | 0o555;
            stat.st_size = listing.len() as u64;
            stat.st_nlink = 2;
            stat.st_ino = 1;
            return Ok(stat);
        }
        let (disk, geo) = self.region(&handle.target)?;
        let perm = if geo.readonly { 0o444 } else { 0o644 };
        stat.st_mode = MODE_FILE | perm;
        stat.st_size = geo.size;
        stat.st_blksize = u32::try_from(geo.block_size).unwrap_or(u32::MAX);
        stat.st_blocks = geo.size / geo.block_size;
        stat.st_nlink = 1;
        let disk_ino = u64::try_from(disk).map_or(u64::MAX, |d| d.saturating_add(2));
        stat.st_ino = match handle.target {
            Target::Partition { part, .. } => {
                let part = u64::try_from(part).map_or(u64::MAX, |p| p.saturating_add(1));
                (disk_ino << 32) | (part & 0xFFFF_FFFF)
            }
            _ => disk_ino,
        };
        Ok(stat)
    }

    /// Size in bytes: the listing length for the root, the disk or partition size otherwise.
    pub fn fsize(&self, id: usize) -> Result<u64> {
        let handle = self.handles.get(id)?;
        match handle.target {
            Target::Root { ref listing } => Ok(listing.len() as u64),
            ref t => Ok(self.region(t)?.1.size),
        }
    }

    /// The handle's path, Redox style: `"disk.virtio-scsi:"` for the root,
    /// `"disk.virtio-scsi:N"` for disk N, `"disk.virtio-scsi:NpM"` for partition M of disk N
    /// (as `storage/driver-block` formats them). Works even if the disk has disappeared.
    pub fn fpath(&self, id: usize) -> Result<String> {
        let handle = self.handles.get(id)?;
        let target = match handle.target {
            Target::Root { .. } => SchemePath::Root,
            Target::Disk { disk } => SchemePath::Disk(disk),
            Target::Partition { disk, part, .. } => SchemePath::Partition { disk, part },
        };
        Ok(format!("{}:{}", self.name, path::format_path(target)))
    }

    /// Closes the handle; its id is never handed out again. `EBADF` if unknown or already
    /// closed. Operations already running on the handle finish normally. Closing the last
    /// whole-disk (or partition) handle of a disk lets partitions (or the whole disk) open.
    pub fn close(&self, id: usize) -> Result<()> {
        let handle = self.handles.remove(id)?;
        if let Some((disk, holder)) = handle.holds {
            self.opens.release(disk, holder);
        }
        Ok(())
    }

    /// Who opened handle `id` (for logs).
    pub fn caller(&self, id: usize) -> Result<CallerCtx> {
        Ok(self.handles.get(id)?.ctx)
    }

    /// The partition table of `disk` (read now if the cache has none for the disk's current
    /// state). `ENOENT` if there is no such disk.
    pub fn partition_table(&self, disk: usize) -> Result<Arc<PartitionTable>> {
        let disks = self.device.disks();
        let info = present(&disks, disk).ok_or(Error::new(ENOENT))?;
        let geo = Geometry::of(info)?;
        self.tables.get(&*self.device, disk, info, &geo)
    }

    /// Access-control hook: the one place where who may open what is decided. Every path
    /// and mode is governed by the scheme's [`AccessPolicy`] (Redox's `driver-block` refuses
    /// every caller whose uid is not 0 with `EACCES`, whatever they open).
    fn check_access(&self, target: SchemePath, flags: usize, ctx: &CallerCtx) -> Result<()> {
        if self.access.permits(ctx) {
            return Ok(());
        }
        log::info!(
            "refused open of {:?} (flags {flags:#x}) by uid {} gid {} pid {}: only {} may open",
            path::format_path(target),
            ctx.uid,
            ctx.gid,
            ctx.pid,
            self.access
        );
        Err(Error::new(EACCES))
    }

    /// The root listing: for each disk a line with its number, then one line per partition
    /// (`"0\n0p0\n0p1\n1\n"`). A disk whose partition table cannot be read right now is
    /// listed without partitions.
    fn listing(&self) -> String {
        let disks = self.device.disks();
        let mut out = String::new();
        for (d, info) in disks.iter().enumerate() {
            if info.blocks == 0 {
                continue; // absent (a removed LUN keeps its number)
            }
            out.push_str(&format!("{d}\n"));
            let table = Geometry::of(info)
                .and_then(|geo| self.tables.get(&*self.device, d, info, &geo))
                .inspect_err(|e| log::warn!("disk {d}: partition table unreadable: {e}"));
            if let Ok(table) = table {
                for p in 0..table.partitions.len() {
                    out.push_str(&format!("{d}p{p}\n"));
                }
            }
        }
        out
    }

    /// The disk and the current geometry of an I/O target: the whole disk, or the
    /// partition's window on it. `ENODEV` if the disk is gone, or if the partition is no
    /// longer in the disk's table with the start and length it was opened with.
    fn region(&self, target: &Target) -> Result<(usize, Geometry)> {
        match *target {
            Target::Root { .. } => Err(Error::new(EBADF)),
            Target::Disk { disk } => {
                let info = self
                    .device
                    .disk_info(disk)
                    .filter(|d| d.blocks > 0)
                    .ok_or(Error::new(ENODEV))?;
                Ok((disk, Geometry::of(&info)?))
            }
            Target::Partition {
                disk,
                part,
                start,
                blocks,
            } => {
                let info = self
                    .device
                    .disk_info(disk)
                    .filter(|d| d.blocks > 0)
                    .ok_or(Error::new(ENODEV))?;
                let geo = Geometry::of(&info)?;
                let table = self.tables.get(&*self.device, disk, &info, &geo)?;
                let same = table.partitions.get(part) == Some(&Partition { start, blocks });
                let region = geo.region(start, blocks).filter(|_| same);
                region.map(|g| (disk, g)).ok_or_else(|| {
                    log::warn!("disk {disk}: partition {part} changed or vanished under a handle");
                    Error::new(ENODEV)
                })
            }
        }
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
