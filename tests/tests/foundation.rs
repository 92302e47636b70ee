//! Foundation, end to end against QEMU's virtio-scsi device: two disks (512- and 4096-byte
//! logical blocks), four request queues. Every data check compares with the image file read
//! directly on the host.

use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use syscall::error::{EBADF, ENOENT, EROFS};
use vscsi_ipc::protocol::{Request, read_reply};
use vscsi_ipc::{Client, OpenFlags};
use vscsi_tests::{Daemon, DaemonBuilder, Rng, TestDisk, is_qemu};

const MIB: u64 = 1 << 20;
const DISK_BYTES: u64 = 32 * MIB;

fn two_disks(dir: &std::path::Path) -> (Daemon, TestDisk, TestDisk) {
    let d512 = TestDisk::create(dir, "d512.img", DISK_BYTES, 1);
    let d4k = TestDisk::create(dir, "d4k.img", DISK_BYTES, 2).block_size(4096);
    let daemon = DaemonBuilder::new(dir)
        .disk(&d512)
        .disk(&d4k)
        .arg("--queues")
        .arg("4")
        .start();
    (daemon, d512, d4k)
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vscsi-test-")
        .tempdir()
        .expect("temp dir")
}

#[test]
fn bytes_land_in_the_image_and_the_image_reads_back() {
    let dir = tmp();
    let (daemon, d512, d4k) = two_disks(dir.path());
    let c = daemon.client();
    let mut rng = Rng::new(42);
    for (n, disk, bs) in [(0, &d512, 512u32), (1, &d4k, 4096)] {
        let path = format!("disk.virtio-scsi:/{n}");
        let h = c.open(&path, OpenFlags::READ_WRITE).expect("open disk");
        let st = c.stat(&h).expect("stat");
        assert_eq!(st.size, DISK_BYTES, "{path} size");
        assert_eq!(st.block_size, bs, "{path} block size");
        assert!(!st.is_dir);
        assert_eq!(c.fpath(&h).expect("fpath"), format!("disk.virtio-scsi:{n}"));

        // Driver -> image: aligned, large (split into many commands), and odd-sized.
        for (offset, len) in [
            (0u64, 4096usize),
            (3 * MIB, 5 * MIB as usize),
            (MIB + 77, 100_003),
        ] {
            let data = rng.bytes(len);
            c.write_all_at(&h, offset, &data).expect("write");
            assert!(
                disk.read_image(offset, len) == data,
                "{path}: image differs at {offset}+{len}"
            );
        }
        // Image -> driver.
        for (offset, len) in [(10 * MIB + 123, 300_000usize), (DISK_BYTES - 4096, 4096)] {
            let data = rng.bytes(len);
            disk.write_image(offset, &data);
            let mut back = vec![0u8; len];
            c.read_exact_at(&h, offset, &mut back).expect("read");
            assert!(
                back == data,
                "{path}: driver read differs at {offset}+{len}"
            );
        }
        c.sync(&h).expect("sync");
        c.close(h).expect("close");
    }
    let listing = c.list("disk.virtio-scsi").expect("list");
    assert_eq!(listing, vec!["0".to_string(), "1".to_string()]);
}

#[test]
fn unaligned_writes_keep_neighbouring_bytes() {
    let dir = tmp();
    let (daemon, d512, d4k) = two_disks(dir.path());
    let c = daemon.client();
    let mut rng = Rng::new(7);
    const SPAN: usize = 256 * 1024;
    for (n, disk) in [(0, &d512), (1, &d4k)] {
        let h = c
            .open(&format!("disk.virtio-scsi:/{n}"), OpenFlags::READ_WRITE)
            .expect("open");
        let mut model = disk.read_image(0, SPAN);
        for _ in 0..150 {
            let offset = rng.below(SPAN as u64 - 1) as usize;
            let len = 1 + rng.below(9000.min((SPAN - offset) as u64)) as usize;
            let data = rng.bytes(len);
            c.write_all_at(&h, offset as u64, &data)
                .expect("unaligned write");
            model[offset..offset + len].copy_from_slice(&data);
        }
        assert!(
            disk.read_image(0, SPAN) == model,
            "disk {n}: image differs from the model"
        );
        let mut back = vec![0u8; SPAN];
        c.read_exact_at(&h, 0, &mut back).expect("read back");
        assert!(
            back == model,
            "disk {n}: driver read differs from the model"
        );
        // Unaligned reads.
        for _ in 0..50 {
            let offset = rng.below(SPAN as u64 - 1) as usize;
            let len = 1 + rng.below(20_000.min((SPAN - offset) as u64)) as usize;
            let mut got = vec![0u8; len];
            c.read_exact_at(&h, offset as u64, &mut got)
                .expect("unaligned read");
            assert!(
                got == model[offset..offset + len],
                "disk {n}: unaligned read at {offset}+{len}"
            );
        }
    }
}

#[test]
fn concurrent_clients_writing_inside_the_same_blocks() {
    let dir = tmp();
    let (daemon, d512, d4k) = two_disks(dir.path());
    const CLIENTS: usize = 6;
    const STRIPE: usize = 97; // not a divisor of any block size: stripes share blocks
    const SPAN: usize = 64 * 1024;
    for (n, disk) in [(0usize, &d512), (1, &d4k)] {
        let expected = std::sync::Mutex::new(disk.read_image(0, SPAN));
        std::thread::scope(|s| {
            for k in 0..CLIENTS {
                let client = daemon.client();
                let expected = &expected;
                s.spawn(move || {
                    let h = client
                        .open(&format!("disk.virtio-scsi:/{n}"), OpenFlags::READ_WRITE)
                        .expect("open");
                    let mut rng = Rng::new(100 + k as u64);
                    let mine: Vec<usize> =
                        (0..SPAN / STRIPE).filter(|s| s % CLIENTS == k).collect();
                    for round in 0..3 {
                        for &stripe in &mine {
                            let data = rng.bytes(STRIPE);
                            let at = stripe * STRIPE;
                            client
                                .write_all_at(&h, at as u64, &data)
                                .expect("write stripe");
                            if round == 2 {
                                expected.lock().expect("model")[at..at + STRIPE]
                                    .copy_from_slice(&data);
                            }
                        }
                    }
                });
            }
        });
        let expected = expected.into_inner().expect("model");
        assert!(
            disk.read_image(0, SPAN) == expected,
            "disk {n}: concurrent stripe writers lost or damaged bytes"
        );
    }
}

#[test]
fn bad_requests_get_clear_errors_and_the_daemon_keeps_serving() {
    let dir = tmp();
    let d0 = TestDisk::create(dir.path(), "rw.img", 8 * MIB, 3);
    let ro = TestDisk::create(dir.path(), "ro.img", 8 * MIB, 4).readonly();
    let daemon = DaemonBuilder::new(dir.path()).disk(&d0).disk(&ro).start();
    let c = daemon.client();

    let errno =
        |r: Result<vscsi_ipc::Handle, vscsi_ipc::ClientError>| r.err().and_then(|e| e.errno());
    assert_eq!(
        errno(c.open("disk.virtio-scsi:/9", OpenFlags::READ)),
        Some(ENOENT)
    );
    assert_eq!(
        errno(c.open("disk.virtio-scsi:/x", OpenFlags::READ)),
        Some(ENOENT)
    );
    assert_eq!(
        errno(c.open("disk.virtio-scsi:/0p9", OpenFlags::READ)),
        Some(ENOENT)
    );
    // A read-only disk refuses write opens but reads fine.
    assert_eq!(
        errno(c.open("disk.virtio-scsi:/1", OpenFlags::READ_WRITE)),
        Some(EROFS)
    );
    let h_ro = c
        .open("disk.virtio-scsi:/1", OpenFlags::READ)
        .expect("read-only open");
    let mut buf = vec![0u8; 4096];
    c.read_exact_at(&h_ro, 4096, &mut buf).expect("read ro");
    assert_eq!(buf, ro.read_image(4096, 4096));
    // A read-only handle cannot write.
    let e = c.write_at(&h_ro, 0, b"x").expect_err("write on O_RDONLY");
    assert_eq!(e.errno(), Some(EBADF));

    // Past the end: reads stop at the end (0 at it), writes never reach past it.
    let h = c
        .open("disk.virtio-scsi:/0", OpenFlags::READ_WRITE)
        .expect("open");
    let size = 8 * MIB;
    let mut buf = vec![0u8; 1000];
    assert_eq!(c.read_at(&h, size, &mut buf).expect("read at end"), 0);
    assert_eq!(
        c.read_at(&h, size - 10, &mut buf).expect("read across end"),
        10
    );
    assert_eq!(&buf[..10], &d0.read_image(size - 10, 10)[..]);
    assert!(
        c.read_exact_at(&h, size - 10, &mut buf).is_err(),
        "short read must be an error"
    );
    assert!(
        c.write_all_at(&h, size - 10, &[7u8; 100]).is_err(),
        "short write must be an error"
    );
    assert!(
        c.write_all_at(&h, size + 4096, &[7u8; 100]).is_err(),
        "write past end"
    );

    // A closed handle, and another connection's handle, at the protocol level.
    let mut raw = UnixStream::connect(&daemon.socket).expect("raw connect");
    raw.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let call = |raw: &mut UnixStream, tag: u64, req: Request| {
        raw.write_all(&req.encode(tag)).expect("send");
        let reply = read_reply(raw).expect("reply").expect("not EOF");
        assert_eq!(reply.tag, tag);
        reply
    };
    call(
        &mut raw,
        1,
        Request::Hello {
            client: "test".into(),
        },
    );
    let opened = call(
        &mut raw,
        2,
        Request::Open {
            path: "/0".into(),
            flags: syscall::flag::O_RDONLY as u64,
        },
    );
    assert_eq!(opened.status, 0);
    let id = opened.value;
    assert_eq!(call(&mut raw, 3, Request::Close { handle: id }).status, 0);
    let r = call(
        &mut raw,
        4,
        Request::Read {
            handle: id,
            offset: 0,
            len: 512,
        },
    );
    assert_eq!(r.status, EBADF as u32, "read on a closed handle");
    let r = call(
        &mut raw,
        5,
        Request::Read {
            handle: h.id(),
            offset: 0,
            len: 512,
        },
    );
    assert_eq!(
        r.status, EBADF as u32,
        "read on another connection's handle"
    );
    // Garbage on a connection ends that connection only.
    raw.write_all(&[0xAB; 200]).expect("garbage");
    drop(raw);

    // Still serving.
    let data = b"still alive";
    c.write_all_at(&h, 12345, data).expect("write after errors");
    assert_eq!(d0.read_image(12345, data.len()), data);
}

#[test]
fn sigterm_flushes_and_a_restart_keeps_the_data() {
    let dir = tmp();
    let disk = TestDisk::create(dir.path(), "persist.img", 16 * MIB, 5).block_size(4096);
    let mut rng = Rng::new(9);
    let data = rng.bytes(3 * MIB as usize + 1234);
    {
        let mut daemon = DaemonBuilder::new(dir.path()).disk(&disk).start();
        let c = daemon.client();
        let h = c
            .open("disk.virtio-scsi:/0", OpenFlags::READ_WRITE)
            .expect("open");
        c.write_all_at(&h, 777, &data).expect("write");
        let qemu = daemon.qemu_pid().expect("QEMU pid reported");
        let status = daemon.signal_and_wait(libc::SIGTERM, Duration::from_secs(60));
        assert!(
            status.success(),
            "SIGTERM exit: {status:?}\n{}",
            daemon.output()
        );
        assert!(daemon.output().contains("flushed"), "{}", daemon.output());
        for _ in 0..100 {
            if !is_qemu(qemu) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!is_qemu(qemu), "QEMU outlived the daemon");
    }
    assert!(
        disk.read_image(777, data.len()) == data,
        "image after SIGTERM"
    );
    let daemon = DaemonBuilder::new(dir.path()).disk(&disk).start();
    let c = daemon.client();
    let h = c
        .open("disk.virtio-scsi:/0", OpenFlags::READ)
        .expect("open again");
    let mut back = vec![0u8; data.len()];
    c.read_exact_at(&h, 777, &mut back)
        .expect("read after restart");
    assert!(back == data, "data after restart");
}

#[test]
fn vscsi_cli_reads_and_writes() {
    let dir = tmp();
    let disk = TestDisk::create(dir.path(), "cli.img", 4 * MIB, 6);
    let daemon = DaemonBuilder::new(dir.path()).disk(&disk).start();

    let ls = daemon.vscsi(&["ls"], b"");
    assert!(
        ls.status.success(),
        "ls: {}",
        String::from_utf8_lossy(&ls.stderr)
    );
    let text = String::from_utf8_lossy(&ls.stdout);
    assert!(
        text.contains("disk.virtio-scsi:/0")
            || text.lines().any(|l| l.trim_start().starts_with('0')),
        "ls output: {text}"
    );

    let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let w = daemon.vscsi(
        &["write", "disk.virtio-scsi:/0", "--offset", "1001"],
        &payload,
    );
    assert!(
        w.status.success(),
        "write: {}",
        String::from_utf8_lossy(&w.stderr)
    );
    assert!(
        disk.read_image(1001, payload.len()) == payload,
        "CLI write in image"
    );

    let r = daemon.vscsi(
        &[
            "read",
            "disk.virtio-scsi:/0",
            "--offset",
            "1001",
            "--length",
            &payload.len().to_string(),
        ],
        b"",
    );
    assert!(
        r.status.success(),
        "read: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(r.stdout == payload, "CLI read bytes");

    let s = daemon.vscsi(&["sync", "disk.virtio-scsi:/0"], b"");
    assert!(
        s.status.success(),
        "sync: {}",
        String::from_utf8_lossy(&s.stderr)
    );
    let st = daemon.vscsi(&["stat", "disk.virtio-scsi:/0"], b"");
    assert!(st.status.success());
    assert!(
        String::from_utf8_lossy(&st.stdout).contains(&(4 * MIB).to_string()),
        "stat shows size"
    );

    let bad = daemon.vscsi(
        &[
            "read",
            "disk.virtio-scsi:/7",
            "--offset",
            "0",
            "--length",
            "1",
        ],
        b"",
    );
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one clear line: {err}");
    assert!(err.contains("ENOENT"), "{err}");
}

#[test]
fn embedded_default_disk_is_created_and_served() {
    let dir = tmp();
    let daemon = DaemonBuilder::new(dir.path()).start();
    let image = dir.path().join("state").join("disk0.img");
    let meta = std::fs::metadata(&image).expect("default image created");
    assert_eq!(meta.len(), 1 << 30);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 64 * MIB, "default image is sparse");
    let c: Client = daemon.client();
    let h = c
        .open("disk.virtio-scsi:/0", OpenFlags::READ_WRITE)
        .expect("open");
    assert_eq!(c.stat(&h).expect("stat").size, 1 << 30);
    c.write_all_at(&h, 5 * MIB, b"hello").expect("write");
    let disk = TestDisk {
        path: image,
        block_size: None,
        readonly: false,
    };
    assert_eq!(disk.read_image(5 * MIB, 5), b"hello");
}

#[test]
fn a_dying_qemu_is_reported_and_the_daemon_exits_nonzero() {
    let dir = tmp();
    let disk = TestDisk::create(dir.path(), "die.img", 4 * MIB, 8);
    let mut daemon = DaemonBuilder::new(dir.path()).disk(&disk).start();
    let c = daemon.client();
    let h = c
        .open("disk.virtio-scsi:/0", OpenFlags::READ)
        .expect("open");
    let qemu = daemon.qemu_pid().expect("QEMU pid reported");
    // SAFETY: kill(2) on the QEMU this test's daemon started.
    unsafe { libc::kill(qemu, libc::SIGKILL) };
    let status = daemon.wait(Duration::from_secs(20));
    assert!(!status.success(), "daemon must fail when its machine dies");
    assert!(
        daemon.output().to_lowercase().contains("machine"),
        "{}",
        daemon.output()
    );
    let mut buf = [0u8; 512];
    assert!(
        c.read_at(&h, 0, &mut buf).is_err(),
        "I/O after the machine died must fail"
    );
}

/// A Ctrl-C in the daemon's terminal sends SIGINT to its whole foreground process group. QEMU
/// runs in a group of its own, so only the daemon gets it: it flushes every disk (the
/// machine still up), stops QEMU itself and exits 0, and the data written just before is in
/// the image.
#[test]
fn ctrl_c_to_the_process_group_flushes_before_qemu_stops() {
    let dir = tmp();
    let disk = TestDisk::create(dir.path(), "d.img", DISK_BYTES, 77);
    let mut daemon = DaemonBuilder::new(dir.path())
        .disk(&disk)
        .own_process_group()
        .start();
    let qemu = daemon.qemu_pid().expect("QEMU pid");
    let c = daemon.client();
    let h = c
        .open("disk.virtio-scsi:/0", OpenFlags::READ_WRITE)
        .expect("open");
    let data = Rng::new(77).bytes(256 * 1024);
    c.write_all_at(&h, 3 * MIB + 7, &data).expect("write");
    drop(c);
    // SAFETY: kill(2) with a negative pid signals the process group the test created for the
    // daemon (its pid is the group id); no memory is involved.
    let r = unsafe { libc::kill(-daemon.pid(), libc::SIGINT) };
    assert_eq!(r, 0, "kill(-pgid, SIGINT)");
    let status = daemon.wait(Duration::from_secs(60));
    let out = daemon.output();
    assert!(status.success(), "exit status {status}:\n{out}");
    assert!(out.contains("all disks flushed"), "{out}");
    assert!(!out.contains("flush of disk"), "a flush failed:\n{out}");
    assert!(!is_qemu(qemu), "QEMU is gone after the daemon");
    assert!(disk.read_image(3 * MIB + 7, data.len()) == data);
}
