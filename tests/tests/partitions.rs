//! The completed block scheme against QEMU's virtio-scsi device: partition tables made by
//! standard tools (`sgdisk` for GPT on 512-byte disks, `fdisk -b 4096` for GPT on 4096-byte
//! disks, `sfdisk` for MBR), I/O bounded at partition edges, tables re-read after a rewrite through the whole
//! disk, whole-disk/partition exclusion across connections, access modes, permissions from
//! the socket's mode and the peer's credentials, and the daemon as a service (config file,
//! systemd readiness, clean stop). The oracle is the image file, and for the partition layout
//! `fdisk -l` (util-linux's own reading of the table).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use syscall::error::{EBADF, ENOENT, ENOLCK, EROFS};
use vscsi_ipc::{Client, ClientError, OpenFlags};
use vscsi_tests::{Daemon, DaemonBuilder, Rng, TestDisk, bin, run_tool};

const MIB: u64 = 1 << 20;
const SCHEME: &str = "disk.virtio-scsi";

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vscsi-part-")
        .tempdir()
        .expect("temp dir")
}

/// `(start, size)` of each partition, in sectors of `sector` bytes, as util-linux's `fdisk -l`
/// reads the table of `image` (sfdisk 2.38 cannot be told a sector size; fdisk can).
fn layout(image: &Path, sector: u32) -> Vec<(u64, u64)> {
    let path = image.display().to_string();
    let ss = sector.to_string();
    let list = run_tool(
        "fdisk",
        &["-b", &ss, "-l", "-o", "Device,Start,Sectors", &path],
        "",
    );
    list.lines()
        .filter(|l| l.starts_with(&path))
        .filter_map(|l| {
            let mut cols = l.split_whitespace().skip(1);
            Some((cols.next()?.parse().ok()?, cols.next()?.parse().ok()?))
        })
        .collect()
}

fn errno<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Option<i32> {
    r.err().and_then(|e| e.errno())
}

/// A 512-byte-sector GPT by sgdisk: two adjacent partitions and one after a gap.
fn sgdisk_gpt(disk: &TestDisk) {
    let p = disk.path.display().to_string();
    run_tool("sgdisk", &["--zap-all", &p], "");
    run_tool(
        "sgdisk",
        &[
            "-n",
            "1:2048:+8M",
            "-n",
            "2:0:+4M",
            "-n",
            "3:32M:0",
            "-t",
            "1:8300",
            &p,
        ],
        "",
    );
}

/// Checks partition `m` of disk `n` (block size `bs`, layout from fdisk) end to end.
fn check_partition(c: &Client, n: usize, m: usize, disk: &TestDisk, bs: u64, part: (u64, u64)) {
    let (start, blocks) = part;
    let (first, size) = (start * bs, blocks * bs);
    let path = format!("{SCHEME}:/{n}p{m}");
    let h = c
        .open(&path, OpenFlags::READ_WRITE)
        .expect("open partition");
    let st = c.stat(&h).expect("stat");
    assert_eq!(st.size, size, "{path} size");
    assert_eq!(u64::from(st.block_size), bs, "{path} block size");
    assert_eq!(c.fpath(&h).expect("fpath"), format!("{SCHEME}:{n}p{m}"));

    // Offset 0 of the partition is its first byte on the disk.
    let mut buf = vec![0u8; 8192];
    c.read_exact_at(&h, 0, &mut buf).expect("read start");
    assert!(buf == disk.read_image(first, 8192), "{path}: start");

    // The neighbours (one block each side) must never change.
    let before = disk.read_image(first - bs, bs as usize);
    let after_len = bs.min(disk_len(disk) - (first + size)) as usize;
    let after = disk.read_image(first + size, after_len);

    let mut rng = Rng::new(n as u64 * 10 + m as u64);
    // A write crossing the end writes what fits and reports that count.
    let data = rng.bytes(10_000);
    let n_written = c.write_at(&h, size - 777, &data).expect("write across end");
    assert_eq!(n_written, 777, "{path}: short write count");
    assert!(disk.read_image(first + size - 777, 777) == data[..777]);
    // At the end: nothing fits.
    assert!(c.write_at(&h, size, &data).is_err(), "{path}: write at end");
    assert!(c.write_all_at(&h, size - 1, &data).is_err());
    // Reads stop at the end.
    assert_eq!(c.read_at(&h, size, &mut buf).expect("read at end"), 0);
    assert_eq!(c.read_at(&h, size - 100, &mut buf).expect("read end"), 100);
    assert!(buf[..100] == disk.read_image(first + size - 100, 100)[..]);
    // Unaligned writes at the start and in the middle.
    for (off, len) in [(0u64, 1000usize), (bs + 3, 5000), (size / 2 + 1, 70_001)] {
        let data = rng.bytes(len);
        c.write_all_at(&h, off, &data).expect("write inside");
        assert!(disk.read_image(first + off, len) == data, "{path} at {off}");
    }
    assert!(
        disk.read_image(first - bs, bs as usize) == before,
        "{path}: block before"
    );
    assert!(
        disk.read_image(first + size, after_len) == after,
        "{path}: block after"
    );
    c.sync(&h).expect("sync");
    c.close(h).expect("close");
}

fn disk_len(disk: &TestDisk) -> u64 {
    std::fs::metadata(&disk.path).expect("image").len()
}

#[test]
fn gpt_and_mbr_partitions_are_bounded_windows_on_their_disks() {
    let dir = tmp();
    let d0 = TestDisk::create(dir.path(), "gpt512.img", 48 * MIB, 11);
    sgdisk_gpt(&d0);
    let d1 = TestDisk::create(dir.path(), "gpt4k.img", 24 * MIB, 12).block_size(4096);
    // GPT on 4096-byte sectors: fdisk's commands (g: new GPT; n: new partition, number,
    // first sector, size; w: write), since sgdisk and sfdisk 2.38 assume 512 for a file.
    run_tool(
        "fdisk",
        &["-b", "4096", &d1.path.display().to_string()],
        "g\nn\n1\n256\n+4M\nn\n2\n1280\n+4M\nn\n3\n3072\n\nw\n",
    );
    let d2 = TestDisk::create(dir.path(), "mbr.img", 16 * MIB, 13);
    run_tool(
        "sfdisk",
        &[&d2.path.display().to_string()],
        "label: dos\nstart=2048, size=8192, type=83\nstart=10240, type=c\n",
    );
    let daemon = DaemonBuilder::new(dir.path())
        .disk(&d0)
        .disk(&d1)
        .disk(&d2)
        .start();
    let c = daemon.client();

    let tables = [
        (layout(&d0.path, 512), &d0, 512u64),
        (layout(&d1.path, 4096), &d1, 4096),
        (layout(&d2.path, 512), &d2, 512),
    ];
    assert_eq!(tables[0].0.len(), 3);
    assert_eq!(tables[1].0.len(), 3);
    assert_eq!(tables[2].0.len(), 2);
    let mut want = Vec::new();
    for (n, (parts, _, _)) in tables.iter().enumerate() {
        want.push(n.to_string());
        want.extend((0..parts.len()).map(|m| format!("{n}p{m}")));
    }
    assert_eq!(c.list(SCHEME).expect("list"), want);

    for (n, (parts, disk, bs)) in tables.iter().enumerate() {
        for (m, &part) in parts.iter().enumerate() {
            check_partition(&c, n, m, disk, *bs, part);
        }
        let missing = format!("{SCHEME}:/{n}p{}", parts.len());
        assert_eq!(errno(c.open(&missing, OpenFlags::READ)), Some(ENOENT));
    }
    // The tables are intact after all that (nothing wrote outside its partition).
    assert_eq!(layout(&d0.path, 512), tables[0].0);
    assert_eq!(layout(&d1.path, 4096), tables[1].0);
    assert_eq!(layout(&d2.path, 512), tables[2].0);
}

/// Logical partitions in an MBR extended container (sfdisk's sda5, sda6) follow the primaries
/// (`0p1`, `0p2` after `0p0`), each a bounded window on its disk.
#[test]
fn mbr_logical_partitions_are_read_from_the_ebr_chain() {
    let dir = tmp();
    let disk = TestDisk::create(dir.path(), "logical.img", 32 * MIB, 31);
    run_tool(
        "sfdisk",
        &[&disk.path.display().to_string()],
        "label: dos\nstart=2048, size=8192, type=83\nstart=10240, size=40960, type=5\n\
         start=12288, size=8192, type=83\nstart=22528, size=16384, type=c\n",
    );
    // fdisk lists sda1, sda2 (the container), sda5, sda6.
    let mut parts = layout(&disk.path, 512);
    assert_eq!(parts.len(), 4, "{parts:?}");
    let container = parts.remove(1);
    assert_eq!(container, (10240, 40960));
    let daemon = DaemonBuilder::new(dir.path()).disk(&disk).start();
    let c = daemon.client();
    assert_eq!(
        c.list(SCHEME).expect("list"),
        vec!["0", "0p0", "0p1", "0p2"]
    );
    for (m, &part) in parts.iter().enumerate() {
        check_partition(&c, 0, m, &disk, 512, part);
    }
    // The EBRs (one block before each logical partition's data, inside the container) are
    // intact: the table reads the same afterwards.
    let mut again = layout(&disk.path, 512);
    again.remove(1);
    assert_eq!(again, parts);
}

#[test]
fn a_table_written_through_the_whole_disk_is_read_again() {
    let dir = tmp();
    let disk = TestDisk::create(dir.path(), "blank.img", 48 * MIB, 21);
    let daemon = DaemonBuilder::new(dir.path()).disk(&disk).start();
    let c = daemon.client();
    assert_eq!(c.list(SCHEME).expect("list"), vec!["0"]);

    // Partition a scratch copy with sgdisk, then copy its table areas through /0.
    let scratch = TestDisk::create(dir.path(), "scratch.img", 48 * MIB, 22);
    sgdisk_gpt(&scratch);
    let len = disk_len(&scratch);
    let head = scratch.read_image(0, 34 * 512);
    let tail = scratch.read_image(len - 33 * 512, 33 * 512);
    let whole = c
        .open(&format!("{SCHEME}:/0"), OpenFlags::READ_WRITE)
        .expect("open whole disk");
    c.write_all_at(&whole, 0, &head).expect("write primary GPT");
    c.write_all_at(&whole, len - 33 * 512, &tail)
        .expect("write backup GPT");
    // While the whole disk is open, its partitions cannot be.
    assert_eq!(
        errno(c.open(&format!("{SCHEME}:/0p0"), OpenFlags::READ)),
        Some(ENOLCK)
    );
    c.close(whole).expect("close");

    let parts = layout(&disk.path, 512);
    assert_eq!(parts, layout(&scratch.path, 512));
    assert_eq!(
        c.list(SCHEME).expect("list"),
        vec!["0", "0p0", "0p1", "0p2"]
    );
    check_partition(&c, 0, 1, &disk, 512, parts[1]);
}

#[test]
fn locks_modes_and_readonly_disks_across_connections() {
    let dir = tmp();
    let rw = TestDisk::create(dir.path(), "rw.img", 48 * MIB, 31);
    sgdisk_gpt(&rw);
    let ro = TestDisk::create(dir.path(), "ro.img", 48 * MIB, 32).readonly();
    sgdisk_gpt(&ro);
    let daemon = DaemonBuilder::new(dir.path()).disk(&rw).disk(&ro).start();
    let a = daemon.client();
    let b = daemon.client();
    let p = |s: &str| format!("{SCHEME}:/{s}");

    // A partition open on one connection locks the whole disk for every connection.
    let a0 = a.open(&p("0p0"), OpenFlags::READ).expect("open 0p0");
    let a1 = a.open(&p("0p1"), OpenFlags::READ_WRITE).expect("open 0p1");
    let b1 = b
        .open(&p("0p1"), OpenFlags::READ)
        .expect("same partition twice");
    for flags in [OpenFlags::READ, OpenFlags::READ_WRITE, OpenFlags::WRITE] {
        assert_eq!(errno(b.open(&p("0"), flags)), Some(ENOLCK));
        assert_eq!(errno(a.open(&p("0"), flags)), Some(ENOLCK));
    }
    // stat opens (O_STAT) are not I/O handles and still work.
    assert_eq!(b.stat_path(&p("0")).expect("stat").size, 48 * MIB);
    // The other disk is independent.
    let whole1 = b.open(&p("1"), OpenFlags::READ).expect("open disk 1");
    assert_eq!(errno(a.open(&p("1p0"), OpenFlags::READ)), Some(ENOLCK));
    b.close(whole1).expect("close");

    a.close(a0).expect("close");
    a.close(a1).expect("close");
    assert_eq!(errno(b.open(&p("0"), OpenFlags::READ)), Some(ENOLCK));
    b.close(b1).expect("close");
    // All partition handles closed: the whole disk opens, and now locks out partitions.
    let bw = b.open(&p("0"), OpenFlags::READ_WRITE).expect("whole disk");
    assert_eq!(errno(a.open(&p("0p2"), OpenFlags::READ)), Some(ENOLCK));
    // A connection that goes away releases its handles.
    drop(b);
    let _ = bw;
    let mut opened = None;
    for _ in 0..100 {
        match a.open(&p("0p2"), OpenFlags::READ) {
            Ok(h) => {
                opened = Some(h);
                break;
            }
            Err(e) => assert_eq!(e.errno(), Some(ENOLCK)),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let h = opened.expect("partition opens once the other connection is gone");

    // Read-only handles cannot write, and nothing reaches the image.
    let before = rw.read_image(0, 64 * 1024);
    let e = a.write_at(&h, 0, b"nope").expect_err("write on O_RDONLY");
    assert_eq!(e.errno(), Some(EBADF));
    assert!(rw.read_image(0, 64 * 1024) == before);

    // A read-only disk refuses write opens of its partitions, reads them fine.
    let parts = layout(&ro.path, 512);
    for flags in [OpenFlags::READ_WRITE, OpenFlags::WRITE] {
        assert_eq!(errno(a.open(&p("1p0"), flags)), Some(EROFS));
    }
    let r = a.open(&p("1p0"), OpenFlags::READ).expect("read-only open");
    let mut buf = vec![0u8; 4096];
    a.read_exact_at(&r, 4096, &mut buf).expect("read");
    assert!(buf == ro.read_image(parts[0].0 * 512 + 4096, 4096));
}

/// Runs the `vscsi` CLI as `uid`/`gid` (needs root).
fn vscsi_as(daemon: &Daemon, uid: u32, gid: u32, args: &[&str]) -> std::process::Output {
    Command::new(bin("vscsi"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .output()
        .expect("run vscsi as another user")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn permissions_come_from_the_socket_mode_and_the_peer_credentials() {
    let dir = tmp();
    // Other users must reach the socket inside the test directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod test dir");
    let disk = TestDisk::create(dir.path(), "perm.img", 8 * MIB, 41);
    sgdisk_gpt_small(&disk);
    let am_root = rustix::process::geteuid().is_root();

    // Default: socket 0660, disks for uid 0 and the daemon's own user.
    let state_a = dir.path().join("a");
    std::fs::create_dir(&state_a).expect("dir a");
    std::fs::set_permissions(&state_a, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let daemon = DaemonBuilder::new(&state_a).disk(&disk).start();
    let meta = std::fs::metadata(&daemon.socket).expect("socket");
    assert_eq!(meta.mode() & 0o777, 0o660, "default socket mode");
    let own = daemon.client();
    let h = own
        .open(&format!("{SCHEME}:/0p0"), OpenFlags::READ)
        .expect("the daemon's own user may open");
    own.close(h).expect("close");
    if am_root {
        let out = vscsi_as(&daemon, 65534, 65534, &["ls"]);
        assert!(
            !out.status.success(),
            "nobody connected through a 0660 socket"
        );
        assert!(
            stderr(&out).to_lowercase().contains("permission denied")
                || stderr(&out).contains("EACCES"),
            "{}",
            stderr(&out)
        );
    }
    drop(daemon);

    // An open socket, with uid 65533 and gid 4242 allowed.
    let state_b = dir.path().join("b");
    std::fs::create_dir(&state_b).expect("dir b");
    std::fs::set_permissions(&state_b, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let daemon = DaemonBuilder::new(&state_b)
        .disk(&disk)
        .arg("--socket-mode")
        .arg("0666")
        .arg("--allow-uid")
        .arg("65533")
        .arg("--allow-gid")
        .arg("4242")
        .start();
    let meta = std::fs::metadata(&daemon.socket).expect("socket");
    assert_eq!(meta.mode() & 0o777, 0o666, "--socket-mode");
    // The policy is logged (on stderr, which is read apart from the `ready` line on stdout).
    let logged = |o: &str| {
        o.lines().any(|l| {
            l.contains("disks may be opened by: uid 0")
                && l.contains("uid 65533")
                && l.contains("gid 4242")
        })
    };
    for _ in 0..100 {
        if logged(&daemon.output()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(logged(&daemon.output()), "policy log: {}", daemon.output());
    if !am_root {
        eprintln!("not root: the parts that run the client as other users need root");
        return;
    }
    let read = [
        "read",
        "disk.virtio-scsi:/0p0",
        "--offset",
        "0",
        "--length",
        "16",
    ];
    // Refused: neither the uid nor the gid is allowed, whatever is opened.
    for args in [&read[..], &["ls"], &["stat", "disk.virtio-scsi:/0"]] {
        let out = vscsi_as(&daemon, 65534, 65534, args);
        assert!(!out.status.success(), "{args:?} by nobody succeeded");
        assert!(
            stderr(&out).contains("EACCES"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert_eq!(stderr(&out).trim_end().lines().count(), 1);
    }
    // Allowed by uid, and by gid.
    let parts = layout(&disk.path, 512);
    for (uid, gid) in [(65533, 65533), (65534, 4242)] {
        let out = vscsi_as(&daemon, uid, gid, &read);
        assert!(out.status.success(), "{uid}/{gid}: {}", stderr(&out));
        assert!(out.stdout == disk.read_image(parts[0].0 * 512, 16));
    }
}

/// A small GPT (for an 8 MiB disk).
fn sgdisk_gpt_small(disk: &TestDisk) {
    let p = disk.path.display().to_string();
    run_tool("sgdisk", &["--zap-all", &p], "");
    run_tool("sgdisk", &["-n", "1:2048:+2M", "-n", "2:0:0", &p], "");
}

#[test]
fn config_file_systemd_readiness_and_clean_stop() {
    let dir = tmp();
    let disk = TestDisk::create(dir.path(), "svc.img", 8 * MIB, 51).block_size(4096);
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let config = dir.path().join("virtio-scsid.toml");
    std::fs::write(
        &config,
        format!(
            "# as a packaged daemon would have it\ndisk = [{:?}]\nqueues = 2\n\
             socket-mode = \"0640\"\nallow-gid = [4242]\nworkers = 8\n",
            disk.arg()
        ),
    )
    .expect("config");
    let mut daemon = DaemonBuilder::new(dir.path())
        .arg("--config")
        .arg(&config.display().to_string())
        .arg("--socket-mode")
        .arg("0600")
        .env("NOTIFY_SOCKET", &notify_path.display().to_string())
        .start();
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).expect("READY notification");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.starts_with("READY=1\n"), "{msg}");
    assert!(msg.contains("STATUS=serving 1 disk(s)"), "{msg}");

    // The disk came from the file, the socket mode from the command line (overriding it).
    let meta = std::fs::metadata(&daemon.socket).expect("socket");
    assert_eq!(meta.mode() & 0o777, 0o600);
    let c = daemon.client();
    let h = c
        .open(&format!("{SCHEME}:/0"), OpenFlags::READ_WRITE)
        .expect("open");
    let st = c.stat(&h).expect("stat");
    assert_eq!((st.size, st.block_size), (8 * MIB, 4096));
    let data = Rng::new(5).bytes(300_000);
    c.write_all_at(&h, 12_345, &data).expect("write");

    // SIGTERM: STOPPING=1, drain, flush, exit 0, data in the image.
    let status = daemon.signal_and_wait(libc::SIGTERM, Duration::from_secs(60));
    assert!(status.success(), "{status:?}\n{}", daemon.output());
    let n = notify.recv(&mut buf).expect("STOPPING notification");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(daemon.output().contains("flushed"), "{}", daemon.output());
    assert!(disk.read_image(12_345, data.len()) == data);

    // A bad setting is one clear error and exit status 2.
    std::fs::write(&config, "queues = 4\nbogus-setting = 1\n").expect("config");
    let out = Command::new(bin("virtio-scsid"))
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run daemon");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bogus-setting"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
