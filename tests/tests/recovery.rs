//! Bad days, against QEMU's real device: injected backend errors (blkdebug), commands that
//! take too long (a null-co disk with a latency beyond the command timeout), QEMU killed under
//! load, and durability of fsync when QEMU and the daemon are killed right after it.

use std::time::{Duration, Instant};

use syscall::error::EIO;
use vscsi_ipc::OpenFlags;
use vscsi_tests::{DaemonBuilder, Rng, TestDisk};

const MIB: u64 = 1 << 20;

fn stat_value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).map(str::trim))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in stats:\n{text}"))
}

#[test]
fn blkdebug_errors_surface_as_eio_and_nothing_else_breaks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = TestDisk::create(dir.path(), "good.img", 4 * MIB, 1);
    let bad = TestDisk::create(dir.path(), "bad.img", 4 * MIB, 2);
    // Sector 2048 (1 MiB) fails to read, sector 4096 (2 MiB) fails to write, flushes fail.
    let conf = dir.path().join("blkdebug.conf");
    std::fs::write(
        &conf,
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nsector = \"2048\"\n\n\
         [inject-error]\nevent = \"write_aio\"\nerrno = \"5\"\nsector = \"4096\"\n\n\
         [inject-error]\nevent = \"flush_to_disk\"\nerrno = \"5\"\n",
    )
    .expect("blkdebug config");
    let opts = format!(
        "driver=raw,file.driver=blkdebug,file.config={},file.image.driver=file,\
         file.image.filename={},werror=report,rerror=report",
        conf.display(),
        bad.path.display()
    );
    let daemon = DaemonBuilder::new(dir.path())
        .disk(&good)
        .arg("--disk-qemu")
        .arg(&opts)
        .start();
    let c = daemon.client();
    let hb = c
        .open("disk.virtio-scsi:/1", OpenFlags::READ_WRITE)
        .expect("open bad disk");
    let hg = c
        .open("disk.virtio-scsi:/0", OpenFlags::READ_WRITE)
        .expect("open good disk");

    let mut buf = vec![0u8; 4096];
    let e = c
        .read_exact_at(&hb, MIB, &mut buf)
        .expect_err("injected read error");
    assert_eq!(e.errno(), Some(EIO), "{e}");
    c.read_exact_at(&hb, 0, &mut buf)
        .expect("other sectors still read");
    assert_eq!(buf, bad.read_image(0, 4096));

    let before = bad.read_image(2 * MIB, 4096);
    let e = c
        .write_all_at(&hb, 2 * MIB, &[0x5a; 4096])
        .expect_err("injected write error");
    assert_eq!(e.errno(), Some(EIO), "{e}");
    assert_eq!(
        bad.read_image(2 * MIB, 4096),
        before,
        "a failed write changed nothing"
    );
    c.write_all_at(&hb, 3 * MIB, &[0x77; 4096])
        .expect("other sectors still write");
    assert_eq!(bad.read_image(3 * MIB, 4096), vec![0x77; 4096]);

    let e = c.sync(&hb).expect_err("injected flush error");
    assert_eq!(e.errno(), Some(EIO), "{e}");

    // The good disk never noticed.
    let data = Rng::new(3).bytes(100_000);
    c.write_all_at(&hg, 12345, &data).expect("good disk write");
    c.sync(&hg).expect("good disk sync");
    assert!(good.read_image(12345, data.len()) == data);
}

#[test]
fn a_command_that_takes_too_long_is_recovered_and_answered_exactly_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = TestDisk::create(dir.path(), "good.img", 4 * MIB, 4);
    let daemon = DaemonBuilder::new(dir.path())
        .disk(&good)
        .arg("--disk-qemu")
        .arg("driver=null-co,size=64M,latency-ns=1500000000")
        .arg("--command-timeout-ms")
        .arg("300")
        .arg("--tmf-timeout-ms")
        .arg("400")
        .start();
    let c = daemon.client();
    let slow = c
        .open("disk.virtio-scsi:/1", OpenFlags::READ)
        .expect("open slow disk");
    let fast = c
        .open("disk.virtio-scsi:/0", OpenFlags::READ)
        .expect("open good disk");
    // Several slow reads at once; each gets exactly one answer (data or an error), bounded in
    // time, while the good disk keeps serving.
    std::thread::scope(|s| {
        let slow_readers: Vec<_> = (0..4)
            .map(|i| {
                let c = c.clone();
                let slow = &slow;
                s.spawn(move || {
                    let t0 = Instant::now();
                    let mut buf = vec![0u8; 4096];
                    let r = c.read_at(slow, i * 4096, &mut buf);
                    (r.map_err(|e| e.to_string()), t0.elapsed())
                })
            })
            .collect();
        let mut buf = vec![0u8; 4096];
        c.read_exact_at(&fast, 0, &mut buf)
            .expect("good disk during recovery");
        assert_eq!(buf, good.read_image(0, 4096));
        for r in slow_readers {
            let (result, took) = r.join().expect("reader");
            assert!(took < Duration::from_secs(20), "answer took {took:?}");
            if let Ok(n) = result {
                assert_eq!(n, 4096, "a completed read is complete");
            }
        }
    });
    let stats = c.stats().expect("stats");
    assert!(stat_value(&stats, "command_timeouts") >= 1, "{stats}");
    assert!(
        stat_value(&stats, "task_management_functions") >= 1,
        "{stats}"
    );
    for q in 0..4 {
        let line = stats
            .lines()
            .find(|l| l.starts_with(&format!("queue {q} ")))
            .expect("queue line");
        let w: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(w[3], w[5], "queue {q}: submitted == completed: {line}");
    }
    // And the device still works after recovery.
    let mut buf = vec![0u8; 4096];
    c.read_exact_at(&fast, 8192, &mut buf)
        .expect("good disk after recovery");
    assert_eq!(buf, good.read_image(8192, 4096));
}

#[test]
fn qemu_killed_under_load_fails_every_request_promptly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = TestDisk::create(dir.path(), "load.img", 16 * MIB, 5);
    let mut daemon = DaemonBuilder::new(dir.path()).disk(&disk).start();
    let qemu = daemon.qemu_pid().expect("QEMU pid");
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|t| {
                let c = daemon.client();
                let stop = &stop;
                s.spawn(move || {
                    let h = c
                        .open("disk.virtio-scsi:/0", OpenFlags::READ_WRITE)
                        .expect("open");
                    let mut rng = Rng::new(t);
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut ok = 0u64;
                    loop {
                        let off = rng.below(15 * MIB);
                        let r = if t % 2 == 0 {
                            c.read_exact_at(&h, off, &mut buf)
                        } else {
                            c.write_all_at(&h, off, &buf)
                        };
                        match r {
                            Ok(()) => ok += 1,
                            Err(_) => return (ok, Instant::now()),
                        }
                        if stop.load(std::sync::atomic::Ordering::Relaxed) && ok > 1_000_000 {
                            unreachable!();
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: kill(2) on the QEMU this test's daemon started.
        unsafe { libc::kill(qemu, libc::SIGKILL) };
        let killed = Instant::now();
        for w in workers {
            let (ok, failed_at) = w.join().expect("worker");
            assert!(ok > 0, "the worker did I/O before the kill");
            assert!(
                failed_at.duration_since(killed) < Duration::from_secs(5),
                "a request hung after QEMU died"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let status = daemon.wait(Duration::from_secs(20));
    assert!(!status.success(), "the daemon reports the dead machine");
}

#[test]
fn fsync_then_sigkill_keeps_the_data_over_20_rounds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = TestDisk::create(dir.path(), "durable.img", 8 * MIB, 6).block_size(4096);
    let mut rng = Rng::new(77);
    for round in 0..20 {
        let daemon = DaemonBuilder::new(dir.path()).disk(&disk).start();
        let c = daemon.client();
        let h = c
            .open("disk.virtio-scsi:/0", OpenFlags::READ_WRITE)
            .expect("open");
        let off = rng.below(7 * MIB);
        let len = 1 + rng.below(300_000) as usize;
        let data = rng.bytes(len);
        c.write_all_at(&h, off, &data).expect("write");
        c.sync(&h).expect("fsync");
        let qemu = daemon.qemu_pid().expect("QEMU pid");
        // SAFETY: kill(2) on this round's QEMU and daemon, right after fsync returned.
        unsafe {
            libc::kill(qemu, libc::SIGKILL);
            libc::kill(daemon.pid(), libc::SIGKILL);
        }
        drop(daemon);
        assert!(
            disk.read_image(off, data.len()) == data,
            "round {round}: data acknowledged by fsync is missing"
        );
    }
}
