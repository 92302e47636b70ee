//! The operation translation on the host, against an in-memory disk with an MBR: what the
//! kernel's openat/read/write/fsync/fstat/fsize/fpath/getdents/fcntl/close become.

use std::sync::{Arc, Mutex};

use block_scheme::{AccessPolicy, BlockDevice, DiskInfo, DiskScheme, Stat};
use syscall::error::{EACCES, EBADF, ENOLCK, ENOTDIR, Error, Result};
use syscall::flag::{MODE_DIR, MODE_FILE, MODE_TYPE, O_DIRECTORY, O_RDONLY, O_RDWR, O_STAT};

use super::{Entry, ROOT_ID, RedoxDisks, caller_ctx};

/// One 512-byte-block disk of 64 blocks in memory, counting flushes.
struct Ram {
    bytes: Mutex<Vec<u8>>,
    flushes: Mutex<usize>,
}

impl BlockDevice for Ram {
    fn disks(&self) -> Vec<DiskInfo> {
        vec![DiskInfo {
            block_size: 512,
            blocks: 64,
            readonly: false,
        }]
    }
    fn read_blocks(&self, _: usize, lba: u64, buf: &mut [u8]) -> Result<()> {
        let b = self.bytes.lock().map_err(|_| Error::new(EBADF))?;
        let at = lba as usize * 512;
        buf.copy_from_slice(&b[at..at + buf.len()]);
        Ok(())
    }
    fn write_blocks(&self, _: usize, lba: u64, buf: &[u8]) -> Result<()> {
        let mut b = self.bytes.lock().map_err(|_| Error::new(EBADF))?;
        let at = lba as usize * 512;
        b[at..at + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self, _: usize) -> Result<()> {
        *self.flushes.lock().map_err(|_| Error::new(EBADF))? += 1;
        Ok(())
    }
}

/// A disk with an MBR holding one partition at blocks 8..40.
fn disks() -> (RedoxDisks<Ram>, Arc<Ram>) {
    let mut bytes = vec![0u8; 64 * 512];
    let e = &mut bytes[446..462];
    e[4] = 0x83;
    e[8..12].copy_from_slice(&8u32.to_le_bytes());
    e[12..16].copy_from_slice(&32u32.to_le_bytes());
    bytes[510] = 0x55;
    bytes[511] = 0xAA;
    let ram = Arc::new(Ram {
        bytes: Mutex::new(bytes),
        flushes: Mutex::new(0),
    });
    let scheme = DiskScheme::new("disk.virtio-scsi", ram.clone());
    (RedoxDisks::new(Arc::new(scheme)), ram)
}

fn root() -> block_scheme::CallerCtx {
    caller_ctx(7, 0, 0)
}

#[test]
fn open_read_write_sync_stat_path_close() {
    let (d, ram) = disks();
    let p = d.openat(ROOT_ID, "0p0", O_RDWR, &root()).expect("openat");
    assert_eq!(d.write(p, b"hello", 510).expect("write"), 5);
    let mut back = [0u8; 5];
    assert_eq!(d.read(p, &mut back, 510).expect("read"), 5);
    assert_eq!(&back, b"hello");
    // The partition starts at block 8 of the disk.
    assert_eq!(
        &ram.bytes.lock().expect("ram")[8 * 512 + 510..8 * 512 + 515],
        b"hello"
    );
    d.fsync(p).expect("fsync");
    assert_eq!(*ram.flushes.lock().expect("flushes"), 1);
    assert_eq!(d.fsize(p).expect("fsize"), 32 * 512);
    let mut st = Stat::default();
    d.fstat(p, &mut st).expect("fstat");
    assert_eq!(st.st_mode & MODE_TYPE, MODE_FILE);
    assert_eq!((st.st_size, st.st_blksize), (32 * 512, 512));
    let mut buf = [0u8; 64];
    let n = d.fpath(p, &mut buf).expect("fpath");
    assert_eq!(&buf[..n], b"disk.virtio-scsi:0p0");
    let mut short = [0u8; 5];
    assert_eq!(d.fpath(p, &mut short).expect("fpath short"), 5);
    assert_eq!(&short, b"disk.");
    assert_eq!(d.fcntl(p, 1, 0).expect("fcntl"), 0);
    // Whole disk vs partition, as driver-block.
    assert_eq!(
        d.openat(ROOT_ID, "/0", O_RDONLY, &root())
            .unwrap_err()
            .errno,
        ENOLCK
    );
    d.on_close(p);
    assert_eq!(d.read(p, &mut back, 0).unwrap_err().errno, EBADF);
    assert_eq!(d.fcntl(p, 1, 0).unwrap_err().errno, EBADF);
    let w = d
        .openat(ROOT_ID, "0", O_RDONLY, &root())
        .expect("whole disk after close");
    d.on_close(w);
    d.on_close(w); // closing twice is harmless
}

#[test]
fn root_directory_and_getdents() {
    let (d, _) = disks();
    let r = d
        .openat(ROOT_ID, "", O_RDONLY | O_DIRECTORY, &root())
        .expect("open root");
    let mut st = Stat::default();
    d.fstat(r, &mut st).expect("fstat");
    assert_eq!(st.st_mode & MODE_TYPE, MODE_DIR);
    let all = d.entries(r, 0).expect("entries");
    assert_eq!(
        all,
        vec![
            Entry {
                inode: 2,
                name: "0".into(),
                next: 1
            },
            Entry {
                inode: (2 << 32) | 1,
                name: "0p0".into(),
                next: 2
            },
        ]
    );
    assert_eq!(d.entries(r, 1).expect("from 1").len(), 1);
    assert!(d.entries(r, 2).expect("past the end").is_empty());
    assert!(d.entries(r, u64::MAX).expect("far past").is_empty());
    // The inode numbers are the ones fstat reports.
    let p = d
        .openat(ROOT_ID, "0p0", O_STAT, &root())
        .expect("stat open");
    d.fstat(p, &mut st).expect("fstat");
    assert_eq!(st.st_ino, all[1].inode);
    // openat relative to an open root handle works; relative to a disk it is ENOTDIR.
    let q = d
        .openat(r, "0", O_STAT, &root())
        .expect("openat from root handle");
    assert_eq!(
        d.openat(q, "0", O_RDONLY, &root()).unwrap_err().errno,
        ENOTDIR
    );
    assert_eq!(d.entries(q, 0).unwrap_err().errno, ENOTDIR);
    // Reading the root gives the same names, one a line.
    let mut text = [0u8; 64];
    let n = d.read(r, &mut text, 0).expect("read root");
    assert_eq!(&text[..n], b"0\n0p0\n");
}

#[test]
fn only_root_by_default_and_what_the_policy_allows() {
    let (d, ram) = disks();
    let user = caller_ctx(usize::MAX, 1000, 1000);
    assert_eq!(user.pid, u32::MAX);
    for path in ["", "0", "0p0"] {
        assert_eq!(
            d.openat(ROOT_ID, path, O_RDONLY, &user).unwrap_err().errno,
            EACCES
        );
    }
    let scheme = DiskScheme::with_access(
        "disk.virtio-scsi",
        ram,
        AccessPolicy::root_only().allow_gid(1000),
    );
    let d = RedoxDisks::new(Arc::new(scheme));
    assert!(d.openat(ROOT_ID, "0p0", O_RDONLY, &user).is_ok());
    assert_eq!(d.scheme().name(), "disk.virtio-scsi");
}
