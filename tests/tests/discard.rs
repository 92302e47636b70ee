//! Discard end to end against QEMU's virtio-scsi device: `vscsi discard` through the daemon
//! (`UNMAP` from the driver) on raw images attached with `discard=unmap`, judged on the host:
//! the range reads back as zeroes in the image file, the file has a hole there (`SEEK_HOLE`,
//! `SEEK_DATA`, fewer allocated blocks), QEMU counted the unmaps (`query-blockstats`), and not
//! one byte outside the range changed, on 512- and 4096-byte disks and through a partition.
//! Disks that cannot discard (read-only) give a clear error; QEMU's default `discard=ignore`
//! takes the command and leaves the data, which is what SCSI allows.

use vscsi_tests::{Daemon, DaemonBuilder, Rng, TestDisk, show_output as show};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vscsi-discard-test-")
        .tempdir()
        .expect("temp dir")
}

/// Runs `vscsi args...`, which must fail with status 1 and one error line; returns it.
fn vscsi_fails(daemon: &Daemon, args: &[&str]) -> String {
    let o = daemon.vscsi_fails(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.stdout.is_empty(), "{}", show(&o));
    err
}

fn discard(daemon: &Daemon, path: &str, offset: u64, length: u64) {
    daemon.vscsi_ok(
        &[
            "discard",
            path,
            "--offset",
            &offset.to_string(),
            "--length",
            &length.to_string(),
        ],
        b"",
    );
}

fn stat_json(daemon: &Daemon, path: &str) -> serde_json::Value {
    let text = daemon.vscsi_ok(&["stat", path, "--json"], b"");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("stat --json: {e}: {text}"))
}

/// An MBR partition entry: type 0x83, `start` and `sectors` in 512-byte blocks.
fn mbr_entry(start: u32, sectors: u32) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[4] = 0x83;
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    e
}

/// Asserts that `[start, end)` of the image is a hole on the host that reads as zeroes.
fn assert_hole(disk: &TestDisk, start: u64, end: u64, what: &str) {
    let len = (end - start) as usize;
    assert!(
        disk.read_image(start, len).iter().all(|&b| b == 0),
        "{what}: the discarded range does not read back as zeroes in the image"
    );
    assert_eq!(
        disk.next_hole(start),
        start,
        "{what}: no hole in the image file at {start}"
    );
    let data = disk.next_data(start);
    assert!(
        data.is_none_or(|d| d >= end),
        "{what}: data at {data:?} inside the hole {start}..{end}"
    );
}

#[test]
fn discard_punches_a_hole_exactly_in_the_range() {
    let dir = tmp();
    // Disk 0: 512-byte blocks, two MBR partitions (8..16 MiB and 16..24 MiB).
    let d512 = TestDisk::create(dir.path(), "d512.img", 32 * MIB, 21);
    let mut table = [0u8; 66];
    table[..16].copy_from_slice(&mbr_entry(16384, 16384));
    table[16..32].copy_from_slice(&mbr_entry(32768, 16384));
    table[64..].copy_from_slice(&[0x55, 0xaa]);
    d512.write_image(446, &table);
    // Disk 1: 4096-byte blocks.
    let d4k = TestDisk::create(dir.path(), "d4k.img", 8 * MIB, 22).block_size(4096);
    let daemon = DaemonBuilder::new(dir.path())
        .disk_qemu(&d512.qemu_arg("discard=unmap"))
        .disk_qemu(&d4k.qemu_arg("discard=unmap"))
        .start();
    for n in ["0", "1"] {
        let st = stat_json(&daemon, &format!("disk.virtio-scsi:/{n}"));
        assert_eq!(st["can_discard"], true, "disk {n}: {st}");
    }

    // A pattern written through the daemon around and over the range, flushed.
    let mut rng = Rng::new(5);
    let pattern = rng.bytes((4 * MIB + 8 * KIB) as usize);
    daemon.vscsi_ok(
        &["write", "disk.virtio-scsi:/0", "--offset", "2044K"],
        &pattern,
    );
    daemon.vscsi_ok(&["sync", "disk.virtio-scsi:/0"], b"");
    assert!(d512.read_image(2 * MIB - 4 * KIB, pattern.len()) == pattern);
    assert_eq!(
        d512.next_data(0),
        Some(0),
        "the image starts fully allocated"
    );
    assert!(d512.next_hole(0) >= 32 * MIB, "no hole yet");
    let allocated = d512.allocated_bytes();
    let unmaps = daemon.block_stat(0, "unmap_operations");
    let image = d512.read_image(0, (32 * MIB) as usize);

    // Discard 4 MiB at 2 MiB (human sizes work).
    daemon.vscsi_ok(
        &[
            "discard",
            "disk.virtio-scsi:/0",
            "--offset",
            "2M",
            "--length",
            "4M",
        ],
        b"",
    );
    assert_hole(&d512, 2 * MIB, 6 * MIB, "disk 0");
    assert!(
        d512.allocated_bytes() + 4 * MIB <= allocated,
        "the file did not shrink by 4 MiB: {allocated} -> {}",
        d512.allocated_bytes()
    );
    let mut want = image.clone();
    want[(2 * MIB) as usize..(6 * MIB) as usize].fill(0);
    assert!(
        d512.read_image(0, want.len()) == want,
        "bytes outside the discarded range changed (the 4 KiB just before and after hold the \
         pattern written through the daemon)"
    );
    assert!(daemon.block_stat(0, "unmap_operations") > unmaps);
    assert!(daemon.block_stat(0, "unmap_bytes") >= 4 * MIB);
    // Through the daemon, too, the range reads as zeroes.
    let back = daemon.vscsi(
        &[
            "read",
            "disk.virtio-scsi:/0",
            "--offset",
            "2M",
            "--length",
            "4M",
        ],
        b"",
    );
    assert!(back.status.success(), "{}", show(&back));
    assert!(back.stdout.iter().all(|&b| b == 0) && back.stdout.len() == (4 * MIB) as usize);

    // Never rounded: unaligned or past the end is EINVAL, and nothing changes.
    for (offset, length) in [("2M", "1000"), ("1", "512"), ("31M", "2M"), ("32M", "512")] {
        let e = vscsi_fails(
            &daemon,
            &[
                "discard",
                "disk.virtio-scsi:/0",
                "--offset",
                offset,
                "--length",
                length,
            ],
        );
        assert!(
            e.starts_with("vscsi: discard disk.virtio-scsi:/0: Invalid argument (EINVAL): ")
                && e.contains("512-byte block size"),
            "{e}"
        );
    }
    assert!(
        d512.read_image(0, want.len()) == want,
        "a refused discard changed bytes"
    );

    // Through partition 1 (16..24 MiB): its whole length, then past its end (refused).
    discard(&daemon, "disk.virtio-scsi:/0p1", 0, 8 * MIB);
    want[(16 * MIB) as usize..(24 * MIB) as usize].fill(0);
    assert_hole(&d512, 16 * MIB, 24 * MIB, "partition 0p1");
    for (offset, length) in [(8 * MIB, 512), (4 * MIB, 8 * MIB)] {
        let e = vscsi_fails(
            &daemon,
            &[
                "discard",
                "disk.virtio-scsi:/0p1",
                "--offset",
                &offset.to_string(),
                "--length",
                &length.to_string(),
            ],
        );
        assert!(e.contains("EINVAL"), "{e}");
    }
    assert!(
        d512.read_image(0, want.len()) == want,
        "a discard through the partition reached outside it (its neighbour, the table, or \
         the rest of the disk)"
    );

    // The 4096-byte disk: whole 4 KiB blocks only.
    let image4k = d4k.read_image(0, (8 * MIB) as usize);
    discard(&daemon, "disk.virtio-scsi:/1", MIB, 64 * KIB);
    assert_hole(&d4k, MIB, MIB + 64 * KIB, "disk 1");
    let e = vscsi_fails(
        &daemon,
        &[
            "discard",
            "disk.virtio-scsi:/1",
            "--offset",
            "512",
            "--length",
            "4096",
        ],
    );
    assert!(e.contains("4096-byte block size"), "{e}");
    let mut want4k = image4k;
    want4k[MIB as usize..(MIB + 64 * KIB) as usize].fill(0);
    assert!(
        d4k.read_image(0, want4k.len()) == want4k,
        "disk 1: bytes outside changed"
    );
}

#[test]
fn disks_that_cannot_discard_say_so() {
    let dir = tmp();
    let ro = TestDisk::create(dir.path(), "ro.img", 4 * MIB, 31).readonly();
    let plain = TestDisk::create(dir.path(), "plain.img", 4 * MIB, 32);
    let daemon = DaemonBuilder::new(dir.path())
        .disk(&ro)
        .disk(&plain)
        .start();

    // Read-only: QEMU's scsi-hd still reports logical block provisioning, but the disk is
    // write-protected, so it cannot discard, and says so.
    let st = stat_json(&daemon, "disk.virtio-scsi:/0");
    assert_eq!(st["can_discard"], false, "{st}");
    let text = daemon.vscsi_ok(&["stat", "disk.virtio-scsi:/0"], b"");
    assert!(text.contains("discard:    no\n"), "{text}");
    let before = ro.read_image(0, (4 * MIB) as usize);
    let e = vscsi_fails(
        &daemon,
        &[
            "discard",
            "disk.virtio-scsi:/0",
            "--offset",
            "0",
            "--length",
            "1M",
        ],
    );
    assert_eq!(
        e,
        "vscsi: discard disk.virtio-scsi:/0: Read-only file system (EROFS)\n"
    );
    assert!(ro.read_image(0, before.len()) == before);
    assert_eq!(daemon.block_stat(0, "unmap_operations"), 0);

    // Writable without discard=unmap: QEMU takes UNMAP (the disk reports it can) and, with
    // its default discard=ignore, leaves the file as it was. Discarded blocks are the
    // device's business: the command succeeds, the data stays.
    assert_eq!(
        stat_json(&daemon, "disk.virtio-scsi:/1")["can_discard"],
        true
    );
    let before = plain.read_image(0, (4 * MIB) as usize);
    discard(&daemon, "disk.virtio-scsi:/1", MIB, MIB);
    assert!(
        plain.read_image(0, before.len()) == before,
        "discard=ignore changed the image"
    );
    assert!(plain.next_hole(0) >= 4 * MIB, "discard=ignore made a hole");
}
