//! The daemon inside a Linux guest (issue 8): QEMU boots Debian's kernel with an initramfs of
//! busybox and our static binaries (tests/src/guest.rs), and inside it `virtio-scsid --pci`
//! drives the guest's virtio-scsi PCI device through `uio_pci_generic`. The image is a raw file
//! on the host with a known pattern and an MBR of two partitions; the guest reads ranges of it
//! (whole disk and partition `0p1`) and reports their SHA-256, writes patterns the host can
//! rebuild (`seq` output) at unaligned offsets, and powers off; the host then compares the
//! image's bytes. The same plan also runs through Linux's own driver (`/dev/sda`), which proves
//! the harness and the hand-over the benchmark uses, and, after the daemon, reads back what the
//! daemon wrote.
//!
//! `bench_guest` (ignored; scripts/bench-guest.sh runs it) compares the daemon with the kernel's
//! driver on the same device configuration.

use std::path::Path;
use std::time::Duration;

use vscsi_tests::guest::{self, Guest, GuestRun, Profile};
use vscsi_tests::{TestDisk, run_tool};

const MIB: u64 = 1 << 20;
/// The image: 64 MiB of a seeded pattern, then an MBR.
const IMAGE_SIZE: u64 = 64 * MIB;
const IMAGE_SEED: u64 = 0x6e57;
/// Partitions (start, size) in 512-byte sectors: 0p0 at 1 MiB (8 MiB), 0p1 at 10 MiB (16 MiB).
const PARTITIONS: [(u64, u64); 2] = [(2048, 16384), (20480, 32768)];

/// One read of the plan: disk (`0` or `0pM`), offset in it, length.
type Read = (&'static str, u64, usize);
/// One write of the plan: disk, offset in it, length, first number of its `seq` pattern.
type Write = (&'static str, u64, usize, u64);

/// Reads of bytes the host wrote (none overlaps a write or the partition table).
const READS: [Read; 3] = [
    ("0", 5 * MIB + 517, 300_000),
    ("0p1", 4097, 70_000),
    ("0p0", 0, 4096),
];
/// Writes at unaligned offsets (read-modify-write at both edges).
const WRITES: [Write; 2] = [
    ("0", 40 * MIB + 1234, 200_001, 1_000_000),
    ("0p1", MIB + 77, 100_000, 5_000_000),
];

/// Where `disk` starts in the image.
fn disk_start(disk: &str) -> u64 {
    match disk.strip_prefix("0p") {
        None => 0,
        Some(m) => {
            let m: usize = m.parse().expect("partition number");
            PARTITIONS[m].0 * 512
        }
    }
}

/// A temp dir with the image: the seeded pattern and an MBR made by sfdisk.
fn image(dir: &Path) -> TestDisk {
    let disk = TestDisk::create(dir, "guest.img", IMAGE_SIZE, IMAGE_SEED);
    let table: String = std::iter::once("label: dos\n".to_string())
        .chain(
            PARTITIONS
                .iter()
                .map(|(start, size)| format!("start={start}, size={size}, type=83\n")),
        )
        .collect();
    run_tool("sfdisk", &[&disk.path.display().to_string()], &table);
    disk
}

/// The plan as /etc/guest.env parameters: READS="DISK:OFFSET:LENGTH ...", WRITES="DISK:OFFSET:
/// LENGTH:FIRST ...".
fn plan_env(g: &mut Guest) {
    let reads: Vec<String> = READS
        .iter()
        .map(|(d, o, l)| format!("{d}:{o}:{l}"))
        .collect();
    let writes: Vec<String> = WRITES
        .iter()
        .map(|(d, o, l, f)| format!("{d}:{o}:{l}:{f}"))
        .collect();
    g.env("READS", &reads.join(" "))
        .env("WRITES", &writes.join(" "));
}

/// SHA-256 of each read of the plan, from the image before the boot.
fn expected_reads(disk: &TestDisk) -> Vec<String> {
    READS
        .iter()
        .map(|(d, o, l)| guest::sha256_hex(&disk.read_image(disk_start(d) + o, *l)))
        .collect()
}

/// Checks what the guest reported for the plan's reads and writes, and the image's bytes.
fn check_plan(run: &GuestRun, disk: &TestDisk, expected: &[String]) {
    for (i, sha) in expected.iter().enumerate() {
        assert_eq!(
            run.expect_mark(&format!("read_{i}_sha")),
            sha,
            "read {i} {:?}: the guest read other bytes than the image holds",
            READS[i]
        );
    }
    for (i, (d, o, l, first)) in WRITES.iter().enumerate() {
        let want = guest::seq_pattern(*first, *l);
        assert_eq!(
            run.expect_mark(&format!("write_{i}_sha")),
            guest::sha256_hex(&want),
            "write {i}: the guest made another pattern than the host's"
        );
        let got = disk.read_image(disk_start(d) + o, *l);
        if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!(
                "write {i} {:?}: image byte {} differs from what the guest wrote",
                WRITES[i],
                disk_start(d) + o + at as u64
            );
        }
    }
}

/// Checks that the bytes around each write are the image's old bytes (no write spilled).
fn check_edges(disk: &TestDisk, before: &[(Vec<u8>, Vec<u8>)]) {
    for ((d, o, l, _), (head, tail)) in WRITES.iter().zip(before) {
        let at = disk_start(d) + o;
        assert_eq!(&disk.read_image(at - 4096, 4096), head, "bytes before {at}");
        assert_eq!(
            &disk.read_image(at + *l as u64, 4096),
            tail,
            "bytes after the write at {at}"
        );
    }
}

fn edges(disk: &TestDisk) -> Vec<(Vec<u8>, Vec<u8>)> {
    WRITES
        .iter()
        .map(|(d, o, l, _)| {
            let at = disk_start(d) + o;
            (
                disk.read_image(at - 4096, 4096),
                disk.read_image(at + *l as u64, 4096),
            )
        })
        .collect()
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vscsi-linux-guest-")
        .tempdir()
        .expect("temp dir")
}

/// Linux's own virtio-scsi driver on the device: the harness, the kernel and its modules, the
/// hand-over to the kernel, and the partition table as Linux reads it.
#[test]
fn kernel_driver_in_guest() {
    if let Some(why) = guest::skip_reason() {
        eprintln!("SKIP kernel_driver_in_guest: {why}");
        return;
    }
    let (_dir, disk, g) = plan_guest(include_str!("../guest/kernel-driver.sh"));
    let (expected, around) = (expected_reads(&disk), edges(&disk));
    let run = boot(g);
    assert_eq!(run.expect_mark("kernel_driver"), "virtio-pci");
    check_plan(&run, &disk, &expected);
    check_edges(&disk, &around);
}

/// A guest running `script` on the test image (with its plan of reads and writes), and the
/// image with its temp dir.
fn plan_guest(script: &'static str) -> (tempfile::TempDir, TestDisk, Guest) {
    let dir = tmp();
    let disk = image(dir.path());
    let mut g = Guest::new(Profile::Debug, script).expect("prepare the guest");
    g.raw_image(&disk.path);
    plan_env(&mut g);
    (dir, disk, g)
}

/// Boots `g`, prints its console and insists that its script succeeded.
fn boot(mut g: Guest) -> guest::GuestRun {
    let run = g.run().expect("boot the guest");
    eprintln!(
        "guest console:\n{}\nguest ran for {:.1?}",
        run.serial, run.elapsed
    );
    run.assert_ok();
    run
}

/// The daemon in the guest with `--pci`: listing, reads of the host's bytes, writes the host
/// finds in the image, a clean stop, and Linux's driver reading back what the daemon wrote.
#[test]
fn daemon_pci_in_guest() {
    if let Some(why) = guest::skip_reason() {
        eprintln!("SKIP daemon_pci_in_guest: {why}");
        return;
    }
    let (_dir, disk, g) = plan_guest(include_str!("../guest/daemon-pci.sh"));
    let (expected, around) = (expected_reads(&disk), edges(&disk));
    assert!(
        guest::daemon_has_pci(&g.binaries).expect("virtio-scsid --help"),
        "virtio-scsid has no --pci option (the Linux platform backend, drivers/linux-platform)"
    );
    let run = boot(g);
    assert_eq!(run.expect_mark("daemon"), "serving");
    // Both daemons (interrupts, then busy polling) flushed and exited cleanly.
    assert_eq!(run.marks("daemon_rc"), ["0", "0"], "{}", run.serial);

    // The listing: disk 0 with the image's size, then its two partitions.
    let ls: serde_json::Value =
        serde_json::from_str(run.expect_mark("ls")).expect("`vscsi ls --json` output");
    let entries = ls.as_array().expect("ls: a JSON array");
    let find = |name: &str| {
        entries
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("ls has no {name}: {ls}"))
    };
    assert_eq!(find("0")["size"], IMAGE_SIZE, "{ls}");
    assert_eq!(find("0")["block_size"], 512, "{ls}");
    for (m, (_, sectors)) in PARTITIONS.iter().enumerate() {
        assert_eq!(find(&format!("0p{m}"))["size"], sectors * 512, "{ls}");
    }

    check_plan(&run, &disk, &expected);
    check_edges(&disk, &around);
    // A second daemon, busy polling, read them back over shared memory; then Linux's driver
    // read back the same bytes.
    for (i, (_, _, l, first)) in WRITES.iter().enumerate() {
        assert_eq!(
            run.expect_mark(&format!("polled_check_{i}_sha")),
            guest::sha256_hex(&guest::seq_pattern(*first, *l)),
            "write {i} read back over shared memory by a busy-polling daemon"
        );
    }
    for (i, (_, _, l, first)) in WRITES.iter().enumerate() {
        assert_eq!(
            run.expect_mark(&format!("kernel_check_{i}_sha")),
            guest::sha256_hex(&guest::seq_pattern(*first, *l)),
            "write {i} as Linux's driver reads it after the daemon stopped"
        );
    }
    assert_eq!(run.expect_mark("kernel_driver"), "virtio-pci");
}

/// Benchmark (scripts/bench-guest.sh): 4 KiB random reads through the daemon (`vscsi bench`),
/// through our driver in process (`inproc-bench --engine poll`) and through Linux's driver
/// (fio on /dev/sda), same guest, same device, same drive.
/// Parameters (environment): VSCSI_GUEST_BENCH_RUNTIME (seconds per point, default 10),
/// VSCSI_GUEST_BENCH_QDS (default "1 32"), VSCSI_GUEST_BENCH_IPC (`vscsi bench --ipc`: socket,
/// shm or shm-copy; default socket), VSCSI_GUEST_BENCH_DAEMON_ARGS (more virtio-scsid flags,
/// e.g. `--poll-us 200`), VSCSI_GUEST_BENCH_DRIVE (QEMU -drive options of
/// disk 0, default a 1 GiB null-co drive that reads zeroes), VSCSI_GUEST_BENCH_JSON (file for
/// the results, default target/bench-guest.json).
#[test]
#[ignore = "benchmark: scripts/bench-guest.sh"]
fn bench_guest() {
    if let Some(why) = guest::skip_reason() {
        panic!("cannot benchmark: {why}");
    }
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let runtime: u64 = var("VSCSI_GUEST_BENCH_RUNTIME", "10")
        .parse()
        .expect("VSCSI_GUEST_BENCH_RUNTIME: seconds");
    let qds: Vec<u32> = var("VSCSI_GUEST_BENCH_QDS", "1 32")
        .split_whitespace()
        .map(|q| q.parse().expect("VSCSI_GUEST_BENCH_QDS: numbers"))
        .collect();
    let drive = var(
        "VSCSI_GUEST_BENCH_DRIVE",
        "driver=null-co,size=1G,read-zeroes=on",
    );
    let ipc = var("VSCSI_GUEST_BENCH_IPC", "socket");
    let daemon_args = var("VSCSI_GUEST_BENCH_DAEMON_ARGS", "");
    let json_path = std::env::var("VSCSI_GUEST_BENCH_JSON")
        .map(Into::into)
        .unwrap_or_else(|_| guest::target_dir().join("bench-guest.json"));
    let fio = std::path::PathBuf::from("/usr/bin/fio");
    assert!(
        fio.exists(),
        "fio is not installed (scripts/install-deps.sh)"
    );
    // io_uring where this fio has it (the guest kernel does), else libaio.
    let engines = run_tool("fio", &["--enghelp"], "");
    let engine = if engines.lines().any(|l| l.trim() == "io_uring") {
        "io_uring"
    } else {
        "libaio"
    };

    let mut g =
        Guest::new(Profile::Release, include_str!("../guest/bench.sh")).expect("prepare the guest");
    let inproc = g.binaries.inproc_bench.clone();
    g.initramfs()
        .file("bin/inproc-bench", &inproc, 0o755)
        .program_with_libs("usr/bin/fio", &fio)
        .expect("fio and its libraries");
    let qd_list: Vec<String> = qds.iter().map(u32::to_string).collect();
    g.drive(&drive)
        .env("QDS", &qd_list.join(" "))
        .env("RUNTIME", &runtime.to_string())
        .env("FIO_ENGINE", engine)
        .env("IPC", &ipc)
        .env("DAEMON_ARGS", &daemon_args)
        .memory_mib(2048)
        // Boot and hand-over take well under a minute under TCG; each point runs three times
        // (daemon, in process, kernel), with room for a loaded machine.
        .timeout(Duration::from_secs(
            240 + 3 * 3 * runtime * qds.len() as u64,
        ));
    let run = g.run().expect("boot the guest");
    run.assert_ok();

    let mut rows = Vec::new();
    println!(
        "\nguest: Debian {} under {}, -smp 2, virtio-scsi-pci num_queues=2, drive {drive}, clocksource {} ({})",
        run.expect_mark("uname"),
        guest::accel_name().unwrap_or("?").to_uppercase(),
        run.mark("clocksource").unwrap_or("?"),
        run.mark("clock_cost").unwrap_or("?")
    );
    println!(
        "{:>4}  {:>10} {:>10} {:>10} {:>7} {:>7}   {:>9} {:>9} {:>9}   {:>9} {:>9} {:>9}",
        "QD",
        "daemon",
        "inproc",
        "kernel",
        "dmn/k",
        "inp/k",
        "dmn p50",
        "inp p50",
        "kern p50",
        "dmn p99",
        "inp p99",
        "kern p99"
    );
    // IOPS, p50 and p99 (µs) of one of our JSON results (vscsi bench, inproc-bench).
    let ours_figures = |mark: &str, what: &str| {
        let v: serde_json::Value = serde_json::from_str(run.expect_mark(mark)).expect(what);
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        (f("iops"), f("lat_p50_us"), f("lat_p99_us"))
    };
    for qd in &qds {
        let (o_iops, o50, o99) = ours_figures(&format!("ours_qd{qd}"), "vscsi bench JSON");
        let (i_iops, i50, i99) = ours_figures(&format!("inproc_qd{qd}"), "inproc-bench JSON");
        let fio: serde_json::Value =
            serde_json::from_str(run.expect_mark(&format!("kernel_qd{qd}"))).expect("fio JSON");
        let read = &fio["jobs"][0]["read"];
        let pct = |p: &str| {
            // Submission to completion (`lat`), as ours measure; fio without
            // --lat_percentiles has only `clat`.
            read["lat_ns"]["percentile"][p]
                .as_f64()
                .or_else(|| read["clat_ns"]["percentile"][p].as_f64())
                .unwrap_or(f64::NAN)
                / 1000.0
        };
        let k_iops = read["iops"].as_f64().unwrap_or(f64::NAN);
        let (k50, k99) = (pct("50.000000"), pct("99.000000"));
        println!(
            "{qd:>4}  {o_iops:>10.0} {i_iops:>10.0} {k_iops:>10.0} {:>7.2} {:>7.2}   {o50:>7.1}us {i50:>7.1}us {k50:>7.1}us   {o99:>7.1}us {i99:>7.1}us {k99:>7.1}us",
            o_iops / k_iops,
            i_iops / k_iops
        );
        rows.push(serde_json::json!({
            "qd": qd,
            "ours": { "iops": o_iops, "lat_p50_us": o50, "lat_p99_us": o99,
                      "command": run.mark(&format!("cmd_ours_qd{qd}")) },
            "inproc": { "iops": i_iops, "lat_p50_us": i50, "lat_p99_us": i99,
                        "command": run.mark(&format!("cmd_inproc_qd{qd}")) },
            "kernel": { "iops": k_iops, "lat_p50_us": k50, "lat_p99_us": k99,
                        "lat_mean_us": read["lat_ns"]["mean"].as_f64().map(|m| m / 1000.0),
                        "command": run.mark(&format!("cmd_kernel_qd{qd}")) },
            "iops_ratio_ours_over_kernel": o_iops / k_iops,
            "iops_ratio_inproc_over_kernel": i_iops / k_iops,
        }));
    }
    println!("\ncommands in the guest:");
    println!("  {}", run.expect_mark("cmd_daemon"));
    for qd in &qds {
        for what in ["ours", "inproc", "kernel"] {
            println!("  {}", run.expect_mark(&format!("cmd_{what}_qd{qd}")));
        }
    }
    let report = serde_json::json!({
        "kernel": run.mark("uname"),
        "accel": guest::accel_name(),
        "clocksource": run.mark("clocksource"),
        "clock_cost": run.mark("clock_cost"),
        "drive": drive,
        "ipc": ipc,
        "daemon": run.mark("cmd_daemon"),
        "runtime_s": runtime,
        "fio_engine": engine,
        "points": rows,
    });
    std::fs::write(&json_path, format!("{report:#}\n")).expect("write the results");
    println!(
        "results: {}; guest ran {:.0?}",
        json_path.display(),
        run.elapsed
    );
}
