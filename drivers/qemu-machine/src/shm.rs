//! Guest RAM as a shared file: creating it (in `/dev/shm` when possible), mapping it into this
//! process with `MAP_SHARED`, and unmapping and deleting it again.
//!
//! QEMU is started with `memory-backend-file,share=on,mem-path=<this file>`, so QEMU and this
//! process map the same page-cache pages: a byte written here is at once visible to the device
//! model, and the other way round. Guest-physical address `X` (below the low-RAM size) is file
//! offset `X`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// File-name prefix of RAM files this crate creates in `/dev/shm`.
const SHM_PREFIX: &str = "qemu-machine-";
/// File-name suffix of RAM files.
const SHM_SUFFIX: &str = ".ram";
/// The shared-memory directory, used when it exists, is writable and has room.
const SHM_DIR: &str = "/dev/shm";

/// Distinguishes machines launched by one process.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// The guest RAM file and this process's shared mapping of it.
#[derive(Debug)]
pub(crate) struct RamMapping {
    path: PathBuf,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this struct; the raw pointer is only handed
// out as an address (see `ptr`), and all accesses through it are the accessor's responsibility
// (the `Platform` contract: raw pointer / volatile / atomic accesses only).
unsafe impl Send for RamMapping {}
// SAFETY: as above; `&RamMapping` gives no access to the bytes, only their address.
unsafe impl Sync for RamMapping {}

impl RamMapping {
    /// Creates a new RAM file of `len` bytes (in `/dev/shm` when it exists, is writable and has
    /// room for it, else in `fallback_dir`) and maps it shared into this process.
    pub(crate) fn create(len: usize, fallback_dir: &Path) -> io::Result<RamMapping> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "RAM size must not be 0",
            ));
        }
        remove_stale_shm_files();
        let name = unique_name();
        let shm = Path::new(SHM_DIR);
        let mut candidates = Vec::new();
        if dir_has_room(shm, len as u64) {
            candidates.push(shm.join(&name));
        }
        candidates.push(fallback_dir.join(&name));

        let mut last_err = None;
        for path in candidates {
            match create_file(&path, len as u64) {
                Ok(file) => {
                    return match map_file(&file, len) {
                        Ok(ptr) => Ok(RamMapping { path, ptr, len }),
                        Err(e) => {
                            let _ = fs::remove_file(&path);
                            Err(e)
                        }
                    };
                }
                Err(e) => {
                    log::debug!("cannot create RAM file {}: {e}", path.display());
                    last_err = Some(io::Error::new(
                        e.kind(),
                        format!("creating RAM file {}: {e}", path.display()),
                    ));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("no place for the RAM file")))
    }

    /// Path of the RAM file (what QEMU's `mem-path` names).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Start of the mapping: file offset 0, guest-physical address 0.
    pub(crate) fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length of the mapping in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for RamMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what `mmap` returned in `map_file`, the mapping has not
        // been unmapped before (only here), and the owner (`QemuMachine`) drops us only after
        // every `Arc` to the machine, and so every user of the DMA window, is gone.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            log::warn!("munmap of guest RAM failed: {}", io::Error::last_os_error());
        }
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                log::warn!("cannot remove RAM file {}: {e}", self.path.display());
            }
            _ => {}
        }
    }
}

fn unique_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{SHM_PREFIX}{}-{}-{nanos:08x}{SHM_SUFFIX}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

fn create_file(path: &Path, len: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    if let Err(e) = file.set_len(len) {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(file)
}

fn map_file(file: &File, len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: a fresh shared mapping chosen by the kernel (addr = NULL) of a file we just sized
    // to `len` bytes: it overlaps nothing of ours. The fd may be closed afterwards; the mapping
    // keeps the file's pages alive.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))
}

/// A sealed memfd mapped shared into this process: the memory of one shared window.
///
/// Sealed against shrinking and growing (and against changing the seals), so a client handed
/// the fd cannot truncate it — which would turn every access of this process's mapping (and
/// QEMU's) into SIGBUS.
#[derive(Debug)]
pub(crate) struct SealedMemfd {
    fd: std::os::fd::OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: as for `RamMapping`: plain shared memory handed out only as an address.
unsafe impl Send for SealedMemfd {}
// SAFETY: as above.
unsafe impl Sync for SealedMemfd {}

impl SealedMemfd {
    /// Creates, sizes, seals and maps a memfd of `len` bytes.
    pub(crate) fn create(name: &str, len: usize) -> io::Result<SealedMemfd> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
        // SAFETY: memfd_create with a valid NUL-terminated name; the returned fd (if any) is
        // new and owned by us from here.
        let raw = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let file = File::from(fd);
        file.set_len(len as u64)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl(F_ADD_SEALS) on a memfd we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let ptr = map_file(&file, len)?;
        Ok(SealedMemfd {
            fd: file.into(),
            ptr,
            len,
        })
    }

    /// The memfd (QEMU opens it as `/proc/<pid>/fd/<n>`).
    pub(crate) fn fd(&self) -> &std::os::fd::OwnedFd {
        &self.fd
    }

    /// Start of this process's mapping.
    pub(crate) fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for SealedMemfd {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are what `mmap` returned; unmapped only here, after QEMU (the
        // only other user besides clients, whose own mappings are theirs) is dead.
        if unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) } != 0 {
            log::warn!(
                "munmap of a shared window failed: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// True when `dir` is a writable directory whose filesystem has `len` bytes free. On tmpfs the
/// file is sparse, and touching a page beyond the filesystem's capacity would be a SIGBUS, so a
/// too-small `/dev/shm` (64 MiB in many containers) is skipped.
fn dir_has_room(dir: &Path, len: u64) -> bool {
    let Ok(c_path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::access(c_path.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return false;
    }
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is valid and NUL-terminated; `st` is a valid, writable statvfs.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return false;
    }
    let free = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
    free >= len
}

/// Removes RAM files in `/dev/shm` left behind by processes of this crate that no longer exist
/// (a daemon killed with SIGKILL cannot clean up; tmpfs pages would otherwise stay allocated).
fn remove_stale_shm_files() {
    let Ok(entries) = fs::read_dir(SHM_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name
            .strip_prefix(SHM_PREFIX)
            .and_then(|r| r.strip_suffix(SHM_SUFFIX))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid <= 0 || pid as u32 == std::process::id() {
            continue;
        }
        if !process_alive(pid) {
            log::info!("removing stale RAM file {name} of dead process {pid}");
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// True when process `pid` exists and is not a zombie (a killed daemon whose parent has not
/// reaped it yet has cleaned nothing up either).
fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 sends nothing; it only checks whether the process exists.
    let exists = unsafe { libc::kill(pid, 0) } == 0
        || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    if !exists {
        return false;
    }
    // /proc/PID/stat is "PID (COMM) STATE ..."; COMM may contain ')', so use the last one.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_none_or(|state| state != "Z" && state != "X"),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_map_write_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let ram = RamMapping::create(1 << 20, dir.path()).unwrap();
        let path = ram.path().to_path_buf();
        assert!(path.exists());
        // SAFETY: offset 4096 + 4 bytes is inside the 1 MiB mapping.
        unsafe {
            ram.ptr()
                .as_ptr()
                .add(4096)
                .cast::<u32>()
                .write_volatile(0x1234_5678)
        };
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 1 << 20);
        assert_eq!(&bytes[4096..4100], &0x1234_5678u32.to_ne_bytes());
        drop(ram);
        assert!(!path.exists());
    }

    #[test]
    fn liveness() {
        assert!(process_alive(std::process::id() as i32));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Exited but not yet reaped: a zombie counts as dead.
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!process_alive(pid));
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }
}
