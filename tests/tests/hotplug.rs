//! Hotplug through QMP while I/O runs: a `scsi-hd` added at run time appears in the scheme
//! (event queue: TRANSPORT_RESET/RESCAN), reads back what its image holds, goes away on
//! `device_del` (REMOVED) with its open handle failing cleanly, and `block_resize` shows in
//! `fstat` (PARAM_CHANGE). A writer on another disk checks its data the whole time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use vscsi_ipc::{Client, OpenFlags};
use vscsi_tests::{DaemonBuilder, Rng, TestDisk};

const MIB: u64 = 1 << 20;

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn size_of(c: &Client, path: &str) -> Option<u64> {
    let h = c.open(path, OpenFlags::READ).ok()?;
    let s = c.stat(&h).ok()?.size;
    let _ = c.close(h);
    Some(s)
}

#[test]
fn hotplug_unplug_and_resize_while_io_runs_elsewhere() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = TestDisk::create(dir.path(), "base.img", 8 * MIB, 1);
    let plug = TestDisk::create(dir.path(), "plug.img", 4 * MIB, 2);
    let daemon = DaemonBuilder::new(dir.path()).disk(&base).start();
    let c = daemon.client();
    assert_eq!(c.list("disk.virtio-scsi").expect("list"), vec!["0"]);

    let stop = AtomicBool::new(false);
    // Stops the writer even when an assertion below fails (else the scope would wait forever).
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        let _stop_guard = StopOnDrop(&stop);
        // Background verified I/O on disk 0.
        let writer = {
            let c = daemon.client();
            let stop = &stop;
            let base = &base;
            s.spawn(move || {
                let h = c
                    .open("disk.virtio-scsi:/0", OpenFlags::READ_WRITE)
                    .expect("open 0");
                let mut rng = Rng::new(5);
                let mut rounds = 0;
                while !stop.load(Ordering::Relaxed) {
                    let off = rng.below(8 * MIB - 70_000);
                    let len = 1 + rng.below(65_536) as usize;
                    let data = rng.bytes(len);
                    c.write_all_at(&h, off, &data)
                        .expect("write during hotplug");
                    let mut back = vec![0u8; data.len()];
                    c.read_exact_at(&h, off, &mut back)
                        .expect("read during hotplug");
                    assert!(back == data, "disk 0 data during hotplug");
                    assert!(
                        base.read_image(off, data.len()) == data,
                        "disk 0 image during hotplug"
                    );
                    rounds += 1;
                }
                rounds
            })
        };

        // Plug a disk on target 5.
        daemon
            .qmp(
                "blockdev-add",
                json!({"driver": "raw", "node-name": "hp0",
                       "file": {"driver": "file", "filename": plug.path.display().to_string()}}),
            )
            .expect("blockdev-add");
        daemon
            .qmp(
                "device_add",
                json!({"driver": "scsi-hd", "bus": "scsi0.0", "scsi-id": 5, "lun": 0,
                       "drive": "hp0", "id": "hd5"}),
            )
            .expect("device_add");
        wait_for("the plugged disk in the listing", || {
            let l = c.list("disk.virtio-scsi").ok()?;
            (l == ["0", "1"]).then_some(())
        });
        assert_eq!(size_of(&c, "disk.virtio-scsi:/1"), Some(4 * MIB));
        let h = c
            .open("disk.virtio-scsi:/1", OpenFlags::READ_WRITE)
            .expect("open plugged");
        let mut got = vec![0u8; 300_000];
        c.read_exact_at(&h, 1000, &mut got).expect("read plugged");
        assert!(
            got == plug.read_image(1000, got.len()),
            "plugged disk reads its image"
        );
        c.write_all_at(&h, 4096, b"hot").expect("write plugged");
        assert_eq!(plug.read_image(4096, 3), b"hot");

        // Grow it: PARAM_CHANGE → fstat shows the new size.
        daemon
            .qmp("block_resize", json!({"node-name": "hp0", "size": 6 * MIB}))
            .expect("block_resize");
        wait_for("the new size in fstat", || {
            (c.stat(&h).ok()?.size == 6 * MIB).then_some(())
        });

        // Unplug: the listing drops it, its open handle fails cleanly (no hang).
        daemon
            .qmp("device_del", json!({"id": "hd5"}))
            .expect("device_del");
        wait_for("the unplugged disk to leave the listing", || {
            let l = c.list("disk.virtio-scsi").ok()?;
            (l == ["0"]).then_some(())
        });
        let t0 = Instant::now();
        let mut buf = vec![0u8; 4096];
        let e = c
            .read_exact_at(&h, 0, &mut buf)
            .expect_err("I/O on a removed disk");
        assert!(t0.elapsed() < Duration::from_secs(5), "no hang");
        assert!(
            matches!(
                e.errno(),
                Some(syscall::error::ENODEV | syscall::error::EIO)
            ),
            "{e}"
        );

        // Plug it back: same number. (QEMU finishes the unplug asynchronously; until it has
        // let go of the node, device_add is refused: retry.)
        wait_for("the node to be free for device_add", || {
            daemon
                .qmp(
                    "device_add",
                    json!({"driver": "scsi-hd", "bus": "scsi0.0", "scsi-id": 5, "lun": 0,
                           "drive": "hp0", "id": "hd5b"}),
                )
                .ok()
        });
        wait_for("the disk back under its number", || {
            let l = c.list("disk.virtio-scsi").ok()?;
            (l == ["0", "1"]).then_some(())
        });
        assert_eq!(size_of(&c, "disk.virtio-scsi:/1"), Some(6 * MIB));

        stop.store(true, Ordering::Relaxed);
        assert!(writer.join().expect("writer") > 0);
    });
}
