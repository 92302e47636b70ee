//! Opening: the root listing, access-mode rules, O_STAT / O_DIRECTORY / O_CREAT handling,
//! handle ids, closed handles, fstat/fsize/fpath, and disks that disappear.

use std::collections::HashSet;
use std::sync::Arc;

use syscall::error::{EBADF, EEXIST, EIO, EISDIR, ENODEV, ENOENT, ENOTDIR, EROFS};
use syscall::flag::{
    MODE_DIR, MODE_FILE, MODE_PERM, MODE_TYPE, O_CREAT, O_DIRECTORY, O_EXCL, O_RDONLY, O_RDWR,
    O_STAT, O_TRUNC, O_WRONLY,
};

use super::fixture::Op;
use super::{NAME, ctx, errno, scheme};
use crate::DiskScheme;

fn read_all(s: &DiskScheme<super::fixture::MemDevice>, id: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 3];
    loop {
        let n = s.read(id, out.len() as u64, &mut buf).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn root_listing() {
    let (s, dev) = scheme(&[(512, 8, false), (4096, 8, true), (512, 1, false)]);
    for (path, flags) in [
        ("", O_RDONLY | O_DIRECTORY),
        ("/", O_RDONLY | O_DIRECTORY),
        ("", O_RDONLY),
        ("/", O_RDONLY),
    ] {
        let id = s.open(path, flags, &ctx()).unwrap();
        assert_eq!(read_all(&s, id), b"0\n1\n2\n");
        let mut buf = [0u8; 16];
        assert_eq!(s.read(id, 2, &mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"1\n2\n");
        assert_eq!(s.read(id, 6, &mut buf).unwrap(), 0);
        assert_eq!(s.read(id, u64::MAX, &mut buf).unwrap(), 0);
        assert_eq!(s.read(id, 0, &mut []).unwrap(), 0);
        assert_eq!(errno(s.write(id, 0, b"x")), EBADF);
        assert_eq!(errno(s.write(id, 0, b"")), EBADF);
        s.fsync(id).unwrap();
        let st = s.fstat(id).unwrap();
        assert_eq!(st.st_mode & MODE_TYPE, MODE_DIR);
        assert_eq!(st.st_mode & MODE_PERM, 0o555);
        assert_eq!(st.st_size, 6);
        assert_eq!(s.fsize(id).unwrap(), 6);
        assert_eq!(s.fpath(id).unwrap(), "disk.virtio-scsi:");
        s.close(id).unwrap();
    }
    // The listing only read (partition tables), once per disk: the tables are cached.
    let calls = dev.calls();
    assert!(calls.iter().all(|c| c.op == Op::Read), "{calls:?}");
    dev.clear_calls();
    let id = s.open("", O_RDONLY, &ctx()).unwrap();
    assert_eq!(read_all(&s, id), b"0\n1\n2\n");
    assert!(dev.calls().is_empty(), "tables were not cached");
}

#[test]
fn root_listing_is_a_snapshot_and_can_be_empty() {
    let (s, dev) = scheme(&[]);
    let id = s.open("", O_RDONLY | O_DIRECTORY, &ctx()).unwrap();
    assert_eq!(read_all(&s, id), b"");
    assert_eq!(s.fsize(id).unwrap(), 0);
    dev.add_disk(512, 4, false);
    assert_eq!(read_all(&s, id), b"", "listing of an open handle changed");
    let id2 = s.open("", O_RDONLY, &ctx()).unwrap();
    assert_eq!(read_all(&s, id2), b"0\n");
}

#[test]
fn root_refuses_write_access() {
    let (s, _) = scheme(&[(512, 8, false)]);
    assert_eq!(errno(s.open("", O_WRONLY, &ctx())), EISDIR);
    assert_eq!(errno(s.open("/", O_RDWR | O_DIRECTORY, &ctx())), EISDIR);
    assert_eq!(
        errno(s.open("", O_RDONLY | O_CREAT | O_EXCL, &ctx())),
        EEXIST
    );
    // O_STAT ignores the access mode.
    let id = s.open("", O_STAT | O_RDWR, &ctx()).unwrap();
    assert_eq!(s.fsize(id).unwrap(), 2);
    assert_eq!(errno(s.read(id, 0, &mut [0; 4])), EBADF);
    assert_eq!(errno(s.fsync(id)), EBADF);
}

#[test]
fn open_errors() {
    let (s, dev) = scheme(&[(512, 8, false), (512, 8, true)]);
    assert_eq!(errno(s.open("2", O_RDONLY, &ctx())), ENOENT);
    assert_eq!(errno(s.open("/99", O_RDWR, &ctx())), ENOENT);
    assert_eq!(errno(s.open("x", O_RDONLY, &ctx())), ENOENT);
    assert_eq!(errno(s.open("00", O_RDONLY, &ctx())), ENOENT);
    assert_eq!(errno(s.open("-1", O_RDONLY, &ctx())), ENOENT);
    assert_eq!(
        errno(s.open("99999999999999999999999", O_RDONLY, &ctx())),
        ENOENT
    );
    // No partition table on these disks.
    assert_eq!(errno(s.open("0p0", O_RDONLY, &ctx())), ENOENT);
    assert_eq!(errno(s.open("/0p1", O_RDONLY, &ctx())), ENOENT);
    assert_eq!(errno(s.open("0", O_RDONLY | O_DIRECTORY, &ctx())), ENOTDIR);
    assert_eq!(errno(s.open("0", O_STAT | O_DIRECTORY, &ctx())), ENOTDIR);
    assert_eq!(
        errno(s.open("0", O_RDWR | O_CREAT | O_EXCL, &ctx())),
        EEXIST
    );
    assert_eq!(errno(s.open("1", O_WRONLY, &ctx())), EROFS);
    assert_eq!(errno(s.open("1", O_RDWR, &ctx())), EROFS);
    // O_CREAT alone and O_TRUNC are ignored on an existing disk.
    let id = s.open("0", O_RDWR | O_CREAT | O_TRUNC, &ctx()).unwrap();
    assert_eq!(s.fsize(id).unwrap(), 8 * 512);
    // Nothing wrote; only the partition lookups read.
    assert!(dev.calls().iter().all(|c| c.op == Op::Read));
}

#[test]
fn zero_block_size_is_eio_not_a_panic() {
    let (s, _) = scheme(&[(0, 8, false)]);
    assert_eq!(errno(s.open("0", O_RDONLY, &ctx())), EIO);
}

#[test]
fn access_modes() {
    let (s, dev) = scheme(&[(512, 8, false), (512, 8, true)]);
    let mut buf = [0u8; 10];

    let ro = s.open("0", O_RDONLY, &ctx()).unwrap();
    assert_eq!(s.read(ro, 1, &mut buf).unwrap(), 10);
    assert_eq!(errno(s.write(ro, 1, b"abc")), EBADF);
    assert_eq!(errno(s.write(ro, 1, b"")), EBADF);
    s.fsync(ro).unwrap();

    let wo = s.open("/0", O_WRONLY, &ctx()).unwrap();
    assert_eq!(errno(s.read(wo, 1, &mut buf)), EBADF);
    assert_eq!(errno(s.read(wo, 1, &mut [])), EBADF);
    assert_eq!(s.write(wo, 1, b"abc").unwrap(), 3);
    s.fsync(wo).unwrap();

    let rw = s.open("0", O_RDWR, &ctx()).unwrap();
    assert_eq!(s.write(rw, 700, b"hello").unwrap(), 5);
    assert_eq!(s.read(rw, 700, &mut buf[..5]).unwrap(), 5);
    assert_eq!(&buf[..5], b"hello");

    // No access bits: neither read nor write.
    let none = s.open("0", 0, &ctx()).unwrap();
    assert_eq!(errno(s.read(none, 0, &mut buf)), EBADF);
    assert_eq!(errno(s.write(none, 0, b"x")), EBADF);

    // A read-only disk opens read-only and stat-only.
    let ro1 = s.open("1", O_RDONLY, &ctx()).unwrap();
    assert_eq!(s.read(ro1, 0, &mut buf).unwrap(), 10);
    assert_eq!(errno(s.write(ro1, 0, b"x")), EBADF);
    let st1 = s.open("1", O_STAT | O_RDWR, &ctx()).unwrap();
    assert_eq!(s.fstat(st1).unwrap().st_mode, MODE_FILE | 0o444);

    // O_STAT: no I/O, no fsync, but fstat/fsize/fpath.
    dev.clear_calls();
    let st = s.open("0", O_STAT, &ctx()).unwrap();
    let st_rw = s.open("0", O_STAT | O_RDWR, &ctx()).unwrap();
    for id in [st, st_rw] {
        assert_eq!(errno(s.read(id, 0, &mut buf)), EBADF);
        assert_eq!(errno(s.write(id, 0, b"x")), EBADF);
        assert_eq!(errno(s.fsync(id)), EBADF);
        assert_eq!(s.fsize(id).unwrap(), 4096);
        assert_eq!(s.fstat(id).unwrap().st_mode, MODE_FILE | 0o644);
        assert_eq!(s.fpath(id).unwrap(), "disk.virtio-scsi:0");
    }
    assert!(
        dev.calls().is_empty(),
        "O_STAT handles did I/O: {:?}",
        dev.calls()
    );
}

#[test]
fn disk_turning_readonly_after_open_refuses_writes() {
    let (s, dev) = scheme(&[(512, 8, false)]);
    let id = s.open("0", O_RDWR, &ctx()).unwrap();
    dev.set_readonly(0, true);
    dev.clear_calls();
    assert_eq!(errno(s.write(id, 0, b"x")), EROFS);
    assert_eq!(errno(s.write(id, 512, &[0; 512])), EROFS);
    assert!(dev.calls().is_empty());
    assert_eq!(s.fstat(id).unwrap().st_mode, MODE_FILE | 0o444);
}

#[test]
fn fstat_fsize_fpath_of_disks() {
    let (s, _) = scheme(&[(512, 100, false), (4096, 10, false)]);
    let a = s.open("0", O_RDONLY, &ctx()).unwrap();
    let st = s.fstat(a).unwrap();
    assert_eq!(st.st_mode, MODE_FILE | 0o644);
    assert_eq!(st.st_size, 51_200);
    assert_eq!(st.st_blksize, 512);
    assert_eq!(st.st_blocks, 100);
    assert_eq!(st.st_nlink, 1);
    assert_eq!((st.st_uid, st.st_gid), (0, 0));
    assert_eq!(s.fsize(a).unwrap(), 51_200);
    assert_eq!(s.fpath(a).unwrap(), format!("{NAME}:0"));

    let b = s.open("/1", O_RDONLY, &ctx()).unwrap();
    let st = s.fstat(b).unwrap();
    assert_eq!(st.st_size, 40_960);
    assert_eq!(st.st_blksize, 4096);
    // Logical blocks, as Redox's driver-block reports them.
    assert_eq!(st.st_blocks, 10);
    assert_eq!(s.fpath(b).unwrap(), "disk.virtio-scsi:1");
    assert_ne!(s.fstat(a).unwrap().st_ino, st.st_ino);
}

#[test]
fn handle_ids_start_at_one_and_are_never_reused() {
    let (s, _) = scheme(&[(512, 8, false)]);
    let mut seen = HashSet::new();
    let mut last = 0;
    for i in 0..100 {
        let id = s
            .open(if i % 2 == 0 { "0" } else { "" }, O_RDONLY, &ctx())
            .unwrap();
        assert!(id > last, "ids must grow: {id} after {last}");
        assert!(seen.insert(id));
        last = id;
        if i % 3 == 0 {
            s.close(id).unwrap();
        }
    }
    assert!(!seen.contains(&0));
    assert_eq!(*seen.iter().min().unwrap(), 1);
}

#[test]
fn closed_and_unknown_handles_are_ebadf() {
    let (s, dev) = scheme(&[(512, 8, false)]);
    let id = s.open("0", O_RDWR, &ctx()).unwrap();
    let root = s.open("", O_RDONLY, &ctx()).unwrap();
    s.close(id).unwrap();
    s.close(root).unwrap();
    dev.clear_calls();
    for bad in [id, root, 0, 12345, usize::MAX] {
        assert_eq!(errno(s.read(bad, 0, &mut [0; 4])), EBADF);
        assert_eq!(errno(s.read(bad, 0, &mut [])), EBADF);
        assert_eq!(errno(s.write(bad, 0, b"abcd")), EBADF);
        assert_eq!(errno(s.fsync(bad)), EBADF);
        assert_eq!(errno(s.fstat(bad)), EBADF);
        assert_eq!(errno(s.fsize(bad)), EBADF);
        assert_eq!(errno(s.fpath(bad)), EBADF);
        assert_eq!(errno(s.caller(bad)), EBADF);
        assert_eq!(errno(s.close(bad)), EBADF);
    }
    assert!(dev.calls().is_empty());
    assert_eq!(s.handles.len(), 0);
}

#[test]
fn caller_is_kept_in_the_handle() {
    let dev = super::fixture::MemDevice::new(&[(512, 8, false)]);
    let s = DiskScheme::with_access(NAME, dev, crate::AccessPolicy::root_only().allow_uid(1000));
    let who = crate::CallerCtx {
        uid: 1000,
        gid: 100,
        pid: 7,
    };
    let id = s.open("0", O_RDONLY, &who).unwrap();
    assert_eq!(s.caller(id).unwrap(), who);
}

#[test]
fn disappeared_disk_is_enodev() {
    let (s, dev) = scheme(&[(512, 8, false), (512, 8, false)]);
    let id = s.open("1", O_RDWR, &ctx()).unwrap();
    let st = s.open("1", O_STAT, &ctx()).unwrap();
    dev.remove_last_disk();
    dev.clear_calls();
    assert_eq!(errno(s.read(id, 0, &mut [0; 4])), ENODEV);
    assert_eq!(errno(s.write(id, 0, b"abcd")), ENODEV);
    assert_eq!(errno(s.fsync(id)), ENODEV);
    assert_eq!(errno(s.fstat(id)), ENODEV);
    assert_eq!(errno(s.fsize(id)), ENODEV);
    assert_eq!(errno(s.fstat(st)), ENODEV);
    // Zero-length I/O does not look at the device.
    assert_eq!(s.read(id, 0, &mut []).unwrap(), 0);
    assert_eq!(s.write(id, 0, b"").unwrap(), 0);
    assert_eq!(s.fpath(id).unwrap(), "disk.virtio-scsi:1");
    assert_eq!(errno(s.open("1", O_RDONLY, &ctx())), ENOENT);
    assert!(
        dev.calls()
            .iter()
            .all(|c| c.op != Op::Write && c.op != Op::Read)
    );
    s.close(id).unwrap();
    s.close(st).unwrap();
}

#[test]
fn fsync_flushes_the_right_disk() {
    let (s, dev) = scheme(&[(512, 8, false), (512, 8, false)]);
    let id = s.open("1", O_RDWR, &ctx()).unwrap();
    s.write(id, 3, b"data").unwrap();
    dev.clear_calls();
    s.fsync(id).unwrap();
    let calls = dev.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!((calls[0].op, calls[0].disk), (Op::Flush, 1));
    assert_eq!(dev.flushes.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn scheme_accessors() {
    let (s, dev) = scheme(&[(512, 8, false)]);
    assert_eq!(s.name(), NAME);
    assert!(Arc::ptr_eq(s.device(), &dev));
}
