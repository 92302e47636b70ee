//! The command-line tools of issue 7, against QEMU's virtio-scsi device: `vscsi copy` in both
//! directions (its printed CRC32C checked against a CRC32C computed here by a separate, plain
//! table implementation, and the bytes against the image file on the host), `vscsi ls --json`
//! and `vscsi stat --json` (parsed, and matched with each other and the images), the SCSI
//! identity in `vscsi ls` and `vscsi stat` (QEMU disks given a known serial, WWN, vendor and
//! product: what the driver reads from INQUIRY and VPD pages 0x80 and 0x83), and
//! `scripts/bench-compare.sh`: a `bash -n` syntax check, and its `--smoke` mode (one queue
//! depth, 1-second runs, a 64 MiB image; about 10 s with KVM) run for real.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vscsi_tests::{Daemon, DaemonBuilder, Rng, TestDisk, bin, show_output as show};

const MIB: u64 = 1 << 20;
const DISK_BYTES: u64 = 32 * MIB;
/// Longest the smoke run of the bench script may take before it is killed (TCG start-up
/// included; with KVM it takes about 10 s).
const SMOKE_TIMEOUT: Duration = Duration::from_secs(120);

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vscsi-cli-tools-test-")
        .tempdir()
        .expect("temp dir")
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), one table lookup per byte: written
/// here on purpose, independent of the `crc32c` crate that `vscsi copy` uses.
fn crc32c(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, slot) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
        }
        *slot = c;
    }
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Runs `vscsi args...` against the daemon and insists that it succeeds; returns stdout.
fn vscsi_ok(daemon: &Daemon, args: &[&str]) -> String {
    daemon.vscsi_ok(args, b"")
}

/// Runs `vscsi args...`, which must fail with status 1 and one `vscsi: copy ...` line on
/// stderr; returns that line.
fn vscsi_fails(daemon: &Daemon, args: &[&str]) -> String {
    let o = daemon.vscsi_fails(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.starts_with("vscsi: copy "), "{}", show(&o));
    err
}

/// The value printed as `crc32c: XXXXXXXX (...)` by `vscsi copy`.
fn printed_crc(stdout: &str) -> u32 {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("crc32c: "))
        .unwrap_or_else(|| panic!("no crc32c line in:\n{stdout}"));
    let hex = line.get(..8).unwrap_or_else(|| panic!("short: {line}"));
    u32::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("{hex}: {e}"))
}

fn two_disks(dir: &Path) -> (Daemon, TestDisk, TestDisk) {
    let d512 = TestDisk::create(dir, "d512.img", DISK_BYTES, 11);
    let d4k = TestDisk::create(dir, "d4k.img", DISK_BYTES, 12).block_size(4096);
    let daemon = DaemonBuilder::new(dir).disk(&d512).disk(&d4k).start();
    (daemon, d512, d4k)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

#[test]
fn copy_file_to_disk_and_back_checksums_match_the_image() {
    let dir = tmp();
    let (daemon, d512, d4k) = two_disks(dir.path());
    let mut rng = Rng::new(2024);
    // An odd length at an unaligned offset, in chunks smaller than the copy (several in
    // flight), onto the 4096-byte-block disk: read-modify-write at both edges.
    let data = rng.bytes(5 * MIB as usize + 12_345);
    let src = dir.path().join("src.bin");
    std::fs::write(&src, &data).expect("write source file");
    let offset = 3 * MIB + 17;
    let offset_s = offset.to_string();
    let want = crc32c(&data);
    assert_eq!(crc32c(b"123456789"), 0xE306_9283, "the test's own CRC32C");

    let before = d4k.read_image(0, DISK_BYTES as usize);
    let out = vscsi_ok(
        &daemon,
        &[
            "copy",
            path_str(&src),
            "disk.virtio-scsi:/1",
            "--offset",
            &offset_s,
            "--chunk",
            "1M",
            "--depth",
            "3",
        ],
    );
    assert_eq!(printed_crc(&out), want, "file -> disk CRC:\n{out}");
    let image = d4k.read_image(offset, data.len());
    assert!(image == data, "the image does not hold the file's bytes");
    assert_eq!(crc32c(&image), want);
    // Neighbours of the range kept their bytes.
    let after = d4k.read_image(0, DISK_BYTES as usize);
    let end = offset as usize + data.len();
    assert!(after[..offset as usize] == before[..offset as usize]);
    assert!(after[end..] == before[end..]);

    // Disk -> file, into an existing longer file (truncated to the copy).
    let back = dir.path().join("back.bin");
    std::fs::write(&back, vec![0xEEu8; 8 * MIB as usize]).expect("pre-fill");
    let len_s = data.len().to_string();
    let out = vscsi_ok(
        &daemon,
        &[
            "copy",
            "disk.virtio-scsi:/1",
            path_str(&back),
            "--offset",
            &offset_s,
            "--length",
            &len_s,
        ],
    );
    assert_eq!(printed_crc(&out), want, "disk -> file CRC:\n{out}");
    let got = std::fs::read(&back).expect("read copied file");
    assert_eq!(got.len(), data.len(), "destination truncated to the copy");
    assert!(got == data, "the copied file differs from the source");

    // A whole disk (default length) to a new file: equal to the image file.
    let whole = dir.path().join("whole.bin");
    let out = vscsi_ok(&daemon, &["copy", "disk.virtio-scsi:/0", path_str(&whole)]);
    let image = d512.read_image(0, DISK_BYTES as usize);
    assert_eq!(printed_crc(&out), crc32c(&image), "whole-disk CRC:\n{out}");
    assert!(
        std::fs::read(&whole).expect("read whole") == image,
        "whole-disk copy differs from the image"
    );

    // A file copied to disk 0 at 0 with its default length, read back through the scheme.
    let small = rng.bytes(100_001);
    let small_src = dir.path().join("small.bin");
    std::fs::write(&small_src, &small).expect("write small");
    let out = vscsi_ok(
        &daemon,
        &["copy", path_str(&small_src), "disk.virtio-scsi:/0"],
    );
    assert_eq!(printed_crc(&out), crc32c(&small));
    assert!(d512.read_image(0, small.len()) == small);
    let c = daemon.client();
    let h = c
        .open("disk.virtio-scsi:/0", vscsi_ipc::OpenFlags::READ)
        .expect("open");
    let mut via = vec![0u8; small.len()];
    c.read_exact_at(&h, 0, &mut via).expect("read");
    assert!(via == small);
}

#[test]
fn copy_errors_are_one_line_and_exit_1() {
    let dir = tmp();
    let (daemon, _d512, _d4k) = two_disks(dir.path());
    let missing = dir.path().join("missing.bin");
    let e = vscsi_fails(
        &daemon,
        &["copy", path_str(&missing), "disk.virtio-scsi:/0"],
    );
    assert!(e.contains("No such file"), "{e}");
    // Too big for the disk: refused before any byte moves.
    let big = dir.path().join("big.bin");
    let f = std::fs::File::create(&big).expect("create");
    f.set_len(DISK_BYTES + 1).expect("size");
    let e = vscsi_fails(&daemon, &["copy", path_str(&big), "disk.virtio-scsi:/0"]);
    assert!(e.contains("do not fit"), "{e}");
    let e = vscsi_fails(
        &daemon,
        &["copy", path_str(&big), path_str(&dir.path().join("x"))],
    );
    assert!(e.contains("neither SRC nor DST is a disk"), "{e}");
    let e = vscsi_fails(
        &daemon,
        &["copy", "disk.virtio-scsi:/0", "disk.virtio-scsi:/1"],
    );
    assert!(e.contains("both disks"), "{e}");
    let e = vscsi_fails(
        &daemon,
        &[
            "copy",
            "disk.virtio-scsi:/9",
            path_str(&dir.path().join("y")),
        ],
    );
    assert!(e.contains("ENOENT"), "{e}");
    let e = vscsi_fails(
        &daemon,
        &[
            "copy",
            "disk.virtio-scsi:/0",
            path_str(&dir.path().join("z")),
            "--offset",
            "64M",
        ],
    );
    assert!(e.contains("past the end"), "{e}");
}

#[test]
fn ls_and_stat_json_parse_and_match() {
    let dir = tmp();
    let (daemon, _d512, _d4k) = two_disks(dir.path());
    let text = vscsi_ok(&daemon, &["ls"]);
    assert!(text.starts_with("DISK"), "text ls unchanged:\n{text}");
    let ls = vscsi_ok(&daemon, &["ls", "--json"]);
    assert_eq!(ls.lines().count(), 1, "one JSON line:\n{ls}");
    let ls: serde_json::Value = serde_json::from_str(&ls).expect("ls --json is JSON");
    let entries = ls.as_array().expect("ls --json is an array");
    assert_eq!(entries.len(), 2, "{ls}");
    for (n, bs) in [(0u64, 512u64), (1, 4096)] {
        let e = &entries[n as usize];
        assert_eq!(e["name"], n.to_string().as_str(), "{e}");
        let path = format!("disk.virtio-scsi:/{n}");
        assert_eq!(e["path"], path.as_str(), "{e}");
        assert_eq!(e["size"], DISK_BYTES, "{e}");
        assert_eq!(e["block_size"], bs, "{e}");
        assert_eq!(e["blocks"], DISK_BYTES / bs, "{e}");
        assert_eq!(e["kind"], "disk", "{e}");
        assert!(text.contains(&path), "text ls lists {path}");

        let st = vscsi_ok(&daemon, &["stat", &path, "--json"]);
        let st: serde_json::Value = serde_json::from_str(&st).expect("stat --json is JSON");
        assert!(st.is_object(), "{st}");
        for key in [
            "size",
            "block_size",
            "blocks",
            "mode",
            "kind",
            "permissions",
        ] {
            assert_eq!(st[key], e[key], "stat --json and ls --json agree on {key}");
        }
        assert_eq!(st["path"], format!("disk.virtio-scsi:{n}").as_str(), "{st}");
        assert!(st["uid"].is_u64() && st["gid"].is_u64(), "{st}");
        // The text form reports the same numbers.
        let stat_text = vscsi_ok(&daemon, &["stat", &path]);
        assert!(
            stat_text.contains(&format!("block size: {bs}\n")),
            "{stat_text}"
        );
        let mode = st["mode"].as_u64().expect("mode");
        assert!(
            stat_text.contains(&format!("mode:       {mode:o} ")),
            "{stat_text}"
        );
    }
    let o = daemon.vscsi(&["stat", "disk.virtio-scsi:/5", "--json"], b"");
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(o.stdout.is_empty(), "no JSON on failure: {}", show(&o));
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

#[test]
fn bench_compare_script_is_valid_bash() {
    let script = repo_root().join("scripts/bench-compare.sh");
    let o = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("run bash -n");
    assert!(
        o.status.success(),
        "bash -n {}: {}",
        script.display(),
        show(&o)
    );
    let o = Command::new("bash")
        .arg(&script)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(o.status.success(), "--help: {}", show(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("--smoke"));
    let o = Command::new("bash")
        .arg(&script)
        .arg("--no-such-option")
        .output()
        .expect("run bad option");
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
}

/// The whole script once, tiny: a 64 MiB image, QD 1, 1-second points, the workspace's debug
/// binaries. Checks the CSV it writes; the figures themselves are not judged (debug build,
/// shared machine).
#[test]
fn bench_compare_smoke_run() {
    let dir = tmp();
    let csv = dir.path().join("smoke.csv");
    let bin_dir = bin("vscsi")
        .parent()
        .expect("binary directory")
        .to_path_buf();
    assert!(bin("virtio-scsid").exists());
    let mut cmd = Command::new("bash");
    cmd.current_dir(repo_root())
        .arg("scripts/bench-compare.sh")
        .arg("--smoke")
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--csv")
        .arg(&csv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a hung run is ended with everything it started.
        .process_group(0);
    if let Ok(accel) = std::env::var("VSCSI_TEST_ACCEL") {
        cmd.arg("--accel").arg(accel);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn bench-compare.sh");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let pgid = child.id() as i32;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if started.elapsed() > SMOKE_TIMEOUT {
            // SAFETY: kill(2) on the process group this test created for the script.
            unsafe { libc::kill(-pgid, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(5));
            // SAFETY: as above.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!("bench-compare.sh --smoke took over {SMOKE_TIMEOUT:?}:\n{stdout}\n{stderr}")
    });
    eprintln!(
        "bench-compare.sh --smoke took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        status.success(),
        "bench-compare.sh --smoke failed ({status}):\n{stdout}\n{stderr}"
    );
    let text = std::fs::read_to_string(&csv).expect("CSV written");
    let mut lines = text.lines();
    let header = lines.next().expect("CSV header");
    assert!(header.starts_with("qd,fio_"), "{header}");
    assert_eq!(header.split(',').count(), 8, "{header}");
    let row: Vec<&str> = lines.next().expect("one row").split(',').collect();
    assert_eq!(row.len(), 8, "{text}");
    assert_eq!(row[0], "1", "QD 1: {text}");
    for (i, v) in row.iter().enumerate().skip(1) {
        let x: f64 = v
            .parse()
            .unwrap_or_else(|e| panic!("column {i} {v:?}: {e}"));
        assert!(x > 0.0, "column {i} is {x}: {text}");
    }
    assert!(stdout.contains("vscsi bench"), "table printed:\n{stdout}");
    assert!(lines.next().is_none(), "one QD in smoke mode: {text}");
}

/// QEMU disks with a known identity (`scsi-hd` properties through `--disk-qemu`'s
/// `device.NAME=VALUE` items) next to one with QEMU's defaults: `vscsi ls` shows each one's
/// size, block size, vendor/product and target:lun in a table, `vscsi stat` and the `--json`
/// forms show vendor, product, revision, serial (VPD 0x80) and WWN (VPD 0x83) as QEMU set them.
#[test]
fn ls_and_stat_show_the_scsi_identity() {
    let dir = tmp();
    let plain = TestDisk::create(dir.path(), "plain.img", 4 * MIB, 51);
    let named = TestDisk::create(dir.path(), "named.img", 8 * MIB, 52).block_size(4096);
    let daemon = DaemonBuilder::new(dir.path())
        .disk(&plain)
        .disk_qemu(&named.qemu_arg(
            "device.serial=VSCSI-SER-0042,device.wwn=0x5000c500a1b2c3d4,\
             device.vendor=ACME,device.product=Rocket Disk,device.ver=1.7",
        ))
        .start();

    let text = vscsi_ok(&daemon, &["ls"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let head: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        head,
        ["DISK", "SIZE", "BLOCK", "VENDOR/PRODUCT", "LUN"],
        "{text}"
    );
    let row0: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        row0,
        [
            "disk.virtio-scsi:/0",
            "4.0",
            "MiB",
            "512",
            "QEMU",
            "QEMU",
            "HARDDISK",
            "0:0"
        ],
        "{text}"
    );
    let row1: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        row1,
        [
            "disk.virtio-scsi:/1",
            "8.0",
            "MiB",
            "4096",
            "ACME",
            "Rocket",
            "Disk",
            "1:0"
        ],
        "{text}"
    );
    let col = lines[0].find("LUN").expect("LUN column");
    assert_eq!(lines[1].find("0:0"), Some(col), "columns line up:\n{text}");
    assert_eq!(lines[2].find("1:0"), Some(col), "columns line up:\n{text}");

    let st = vscsi_ok(&daemon, &["stat", "disk.virtio-scsi:/1", "--json"]);
    let st: serde_json::Value = serde_json::from_str(&st).expect("stat --json is JSON");
    assert_eq!(st["vendor"], "ACME", "{st}");
    assert_eq!(st["product"], "Rocket Disk", "{st}");
    assert_eq!(st["revision"], "1.7", "{st}");
    assert_eq!(st["serial"], "VSCSI-SER-0042", "{st}");
    assert_eq!(st["wwn"], "0x5000c500a1b2c3d4", "{st}");
    assert_eq!(
        (st["target"].as_u64(), st["lun"].as_u64()),
        (Some(1), Some(0)),
        "{st}"
    );
    assert_eq!(st["block_size"], 4096, "{st}");
    let st0 = vscsi_ok(&daemon, &["stat", "disk.virtio-scsi:/0", "--json"]);
    let st0: serde_json::Value = serde_json::from_str(&st0).expect("stat --json is JSON");
    assert_eq!(
        (st0["vendor"].as_str(), st0["product"].as_str()),
        (Some("QEMU"), Some("QEMU HARDDISK"))
    );
    assert!(
        st0["serial"].is_null() && st0["wwn"].is_null(),
        "QEMU sets none: {st0}"
    );
    assert_eq!(
        (st0["target"].as_u64(), st0["lun"].as_u64()),
        (Some(0), Some(0))
    );

    let text = vscsi_ok(&daemon, &["stat", "disk.virtio-scsi:/1"]);
    for line in [
        "vendor:     ACME\n",
        "product:    Rocket Disk\n",
        "revision:   1.7\n",
        "serial:     VSCSI-SER-0042\n",
        "wwn:        0x5000c500a1b2c3d4\n",
        "target/lun: 1:0\n",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
    let text = vscsi_ok(&daemon, &["stat", "disk.virtio-scsi:/0"]);
    assert!(
        text.contains("serial:     (none)\n") && text.contains("target/lun: 0:0\n"),
        "{text}"
    );

    // ls --json carries the same fields, per disk.
    let ls = vscsi_ok(&daemon, &["ls", "--json"]);
    let ls: serde_json::Value = serde_json::from_str(&ls).expect("ls --json is JSON");
    for key in [
        "vendor", "product", "revision", "serial", "wwn", "target", "lun",
    ] {
        assert_eq!(
            ls[1][key], st[key],
            "ls --json and stat --json agree on {key}"
        );
        assert_eq!(
            ls[0][key], st0[key],
            "ls --json and stat --json agree on {key}"
        );
    }
}
