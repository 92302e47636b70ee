//! The block scheme served through Redox's scheme interface: Redox's scheme operations
//! (`redox-scheme` 0.12's `SchemeSync`: `scheme_root`, `openat`, `read`, `write`, `fsync`,
//! `fstat`, `fsize`, `fpath`, `getdents`, `fcntl`, `on_close`) translated to
//! [`block_scheme::DiskScheme`], and the serving loop (module `serve`, on Redox only) that
//! registers the scheme and answers the kernel's requests, waiting with `redox_event`.
//!
//! The translation ([`RedoxDisks`]) has no Redox-only types in its signatures, so it is built
//! and unit-tested on any host; the `SchemeSync` impl that forwards to it and the loop are
//! compiled only for `target_os = "redox"` (this repository type-checks them with
//! `cargo check --target x86_64-unknown-redox`; they cannot be linked or run without Redox).
//!
//! What the kernel sees, as from Redox's `storage/driver-block`: the scheme root is a
//! directory (`getdents` lists `N` and `NpM`; reading it gives the same names one a line);
//! disks and partitions are positioned files (`NewFdFlags::POSITIONED`: the kernel keeps the
//! file offset and passes it with each read and write); every open is checked with the
//! caller's uid/gid from the kernel (root only by default, as `driver-block`).

use std::sync::Arc;

use block_scheme::{BlockDevice, CallerCtx, DiskScheme, Stat};
use syscall::error::{EBADF, ENOTDIR, Error, Result};

#[cfg(target_os = "redox")]
mod serve;
#[cfg(target_os = "redox")]
pub use serve::serve;

/// The id `scheme_root` returns: the scheme's root directory as an open-at base. Handle ids
/// of the block scheme start at 1, so 0 never collides with one.
pub const ROOT_ID: usize = 0;

/// The caller as the block scheme sees it, from what the kernel says (a pid beyond `u32`
/// saturates; it is only logged).
pub fn caller_ctx(pid: usize, uid: u32, gid: u32) -> CallerCtx {
    CallerCtx {
        uid,
        gid,
        pid: u32::try_from(pid).unwrap_or(u32::MAX),
    }
}

/// One entry of a directory listing, for `getdents`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Inode number (as `fstat` reports for the disk or partition).
    pub inode: u64,
    /// The name inside the scheme: `N` or `NpM`.
    pub name: String,
    /// The opaque offset of the entry after this one.
    pub next: u64,
}

/// Redox's scheme operations over a [`DiskScheme`].
pub struct RedoxDisks<D: BlockDevice> {
    scheme: Arc<DiskScheme<D>>,
}

impl<D: BlockDevice> RedoxDisks<D> {
    /// Serves `scheme`.
    pub fn new(scheme: Arc<DiskScheme<D>>) -> Self {
        Self { scheme }
    }

    /// The scheme served.
    pub fn scheme(&self) -> &Arc<DiskScheme<D>> {
        &self.scheme
    }

    /// `openat(dirfd, path, flags)`: `dirfd` must be the root ([`ROOT_ID`], or an open root
    /// handle), else `ENOTDIR`; `path` is relative to it (`"0"`, `"0p1"`, `""` for the root;
    /// a leading `/` is accepted). `flags` are Redox `O_*` flags, passed on unchanged.
    /// Returns the new handle id.
    pub fn openat(&self, dirfd: usize, path: &str, flags: usize, ctx: &CallerCtx) -> Result<usize> {
        if dirfd != ROOT_ID {
            let st = self.scheme.fstat(dirfd)?;
            if st.st_mode & syscall::flag::MODE_TYPE != syscall::flag::MODE_DIR {
                return Err(Error::new(ENOTDIR));
            }
        }
        self.scheme.open(path, flags, ctx)
    }

    /// `read(id, buf, offset)`.
    pub fn read(&self, id: usize, buf: &mut [u8], offset: u64) -> Result<usize> {
        self.scheme.read(id, offset, buf)
    }

    /// `write(id, buf, offset)`.
    pub fn write(&self, id: usize, buf: &[u8], offset: u64) -> Result<usize> {
        self.scheme.write(id, offset, buf)
    }

    /// `fsync(id)`: SYNCHRONIZE CACHE on the disk (for a partition, its disk).
    pub fn fsync(&self, id: usize) -> Result<()> {
        self.scheme.fsync(id)
    }

    /// `fsize(id)`.
    pub fn fsize(&self, id: usize) -> Result<u64> {
        self.scheme.fsize(id)
    }

    /// `fstat(id, stat)`.
    pub fn fstat(&self, id: usize, stat: &mut Stat) -> Result<()> {
        *stat = self.scheme.fstat(id)?;
        Ok(())
    }

    /// `fpath(id, buf)`: the path (`disk.virtio-scsi:0p1`) copied into `buf`, truncated to it;
    /// returns the bytes copied.
    pub fn fpath(&self, id: usize, buf: &mut [u8]) -> Result<usize> {
        let path = self.scheme.fpath(id)?;
        let n = path.len().min(buf.len());
        buf[..n].copy_from_slice(&path.as_bytes()[..n]);
        Ok(n)
    }

    /// `fcntl(id, cmd, arg)`: accepted and ignored for any open handle (returns 0), as
    /// `driver-block` does; `EBADF` for an unknown one.
    pub fn fcntl(&self, id: usize, _cmd: usize, _arg: usize) -> Result<usize> {
        self.scheme.fsize(id).map(|_| 0).or_else(|e| {
            // A disk that disappeared still has a handle; only unknown ids are EBADF.
            if e.errno == EBADF { Err(e) } else { Ok(0) }
        })
    }

    /// `getdents(id, opaque_offset)`: the root's entries from the `opaque_offset`-th on
    /// (`ENOTDIR` for a disk or partition handle).
    pub fn entries(&self, id: usize, opaque_offset: u64) -> Result<Vec<Entry>> {
        let st = self.scheme.fstat(id)?;
        if st.st_mode & syscall::flag::MODE_TYPE != syscall::flag::MODE_DIR {
            return Err(Error::new(ENOTDIR));
        }
        let mut text = vec![0u8; usize::try_from(st.st_size).unwrap_or(0)];
        let n = self.scheme.read(id, 0, &mut text)?;
        text.truncate(n);
        let text = String::from_utf8_lossy(&text);
        let skip = usize::try_from(opaque_offset).unwrap_or(usize::MAX);
        Ok(text
            .lines()
            .enumerate()
            .skip(skip)
            .map(|(i, name)| Entry {
                inode: inode_of(name),
                name: name.to_string(),
                next: i as u64 + 1,
            })
            .collect())
    }

    /// `on_close(id)`: the kernel dropped its last reference to the handle.
    pub fn on_close(&self, id: usize) {
        if let Err(e) = self.scheme.close(id) {
            log::debug!("close of unknown handle {id}: {e}");
        }
    }
}

/// The inode number `fstat` gives the disk or partition `name` (`N` or `NpM`).
fn inode_of(name: &str) -> u64 {
    let mut parts = name.splitn(2, 'p').map(|s| s.parse::<u64>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(d), None) => d.saturating_add(2),
        (Some(d), Some(p)) => (d.saturating_add(2) << 32) | (p.saturating_add(1) & 0xFFFF_FFFF),
        _ => 0,
    }
}

#[cfg(target_os = "redox")]
mod scheme_sync {
    //! `SchemeSync` for [`RedoxDisks`]: each operation forwards to the translation above.

    use redox_scheme::scheme::SchemeSync;
    use redox_scheme::{CallerCtx, OpenResult};
    use syscall::Stat;
    use syscall::dirent::{DirEntry, DirentBuf, DirentKind};
    use syscall::error::{EINVAL, Result};
    use syscall::schemev2::NewFdFlags;

    use super::{ROOT_ID, RedoxDisks};
    use block_scheme::BlockDevice;

    fn ctx(c: &CallerCtx) -> block_scheme::CallerCtx {
        crate::caller_ctx(c.pid, c.uid, c.gid)
    }

    impl<D: BlockDevice> SchemeSync for RedoxDisks<D> {
        fn scheme_root(&mut self) -> Result<usize> {
            Ok(ROOT_ID)
        }

        fn openat(
            &mut self,
            dirfd: usize,
            path: &str,
            flags: usize,
            _fcntl_flags: u32,
            c: &CallerCtx,
        ) -> Result<OpenResult> {
            let number = RedoxDisks::openat(self, dirfd, path, flags, &ctx(c))?;
            Ok(OpenResult::ThisScheme {
                number,
                flags: NewFdFlags::POSITIONED,
            })
        }

        fn read(
            &mut self,
            id: usize,
            buf: &mut [u8],
            offset: u64,
            _fcntl_flags: u32,
            _c: &CallerCtx,
        ) -> Result<usize> {
            RedoxDisks::read(self, id, buf, offset)
        }

        fn write(
            &mut self,
            id: usize,
            buf: &[u8],
            offset: u64,
            _fcntl_flags: u32,
            _c: &CallerCtx,
        ) -> Result<usize> {
            RedoxDisks::write(self, id, buf, offset)
        }

        fn fsize(&mut self, id: usize, _c: &CallerCtx) -> Result<u64> {
            RedoxDisks::fsize(self, id)
        }

        fn fcntl(&mut self, id: usize, cmd: usize, arg: usize, _c: &CallerCtx) -> Result<usize> {
            RedoxDisks::fcntl(self, id, cmd, arg)
        }

        fn fpath(&mut self, id: usize, buf: &mut [u8], _c: &CallerCtx) -> Result<usize> {
            RedoxDisks::fpath(self, id, buf)
        }

        fn fstat(&mut self, id: usize, stat: &mut Stat, _c: &CallerCtx) -> Result<()> {
            RedoxDisks::fstat(self, id, stat)
        }

        fn fsync(&mut self, id: usize, _c: &CallerCtx) -> Result<()> {
            RedoxDisks::fsync(self, id)
        }

        fn getdents<'buf>(
            &mut self,
            id: usize,
            mut buf: DirentBuf<&'buf mut [u8]>,
            opaque_offset: u64,
        ) -> Result<DirentBuf<&'buf mut [u8]>> {
            for e in self.entries(id, opaque_offset)? {
                let entry = DirEntry {
                    inode: e.inode,
                    next_opaque_id: e.next,
                    name: &e.name,
                    kind: DirentKind::Regular,
                };
                match buf.entry(entry) {
                    Ok(()) => {}
                    // The buffer is full: the kernel asks again from `next`.
                    Err(err) if err.errno == EINVAL => break,
                    Err(err) => return Err(err),
                }
            }
            Ok(buf)
        }

        fn on_close(&mut self, id: usize) {
            RedoxDisks::on_close(self, id);
        }
    }
}

#[cfg(test)]
mod tests;
