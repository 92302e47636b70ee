//! `inproc-bench`, the driver benchmarked in process (the IPC baseline, and our side of the
//! in-guest comparison with Linux's driver), against QEMU's device: both engines do real I/O
//! and report it. The poll engine (split-phase commands, busy polling with interrupts off)
//! writes zero-filled blocks over an image of random bytes: the image shows them, at most as
//! many as the writes it reports, and nothing else changed; its reads report the same shape.

use std::process::Command;

use vscsi_tests::{TestDisk, bin, show_output};

const MIB: u64 = 1 << 20;
const BS: usize = 4096;

fn run(args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("inproc-bench"))
        .args(args)
        .output()
        .expect("run inproc-bench");
    assert!(out.status.success(), "{}", show_output(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {}", show_output(&out)))
}

#[test]
fn poll_and_thread_engines_do_real_io() {
    let dir = tempfile::Builder::new()
        .prefix("vscsi-inproc-bench-test-")
        .tempdir()
        .expect("temp dir");
    let disk = TestDisk::create(dir.path(), "d.img", 8 * MIB, 21);
    let before = disk.read_image(0, (8 * MIB) as usize);
    let drive = format!("file={},format=raw", disk.path.display());
    let common = ["--disk-qemu", &drive, "--queues", "2", "--runtime", "0.5"];

    for zero_copy in [true, false] {
        let mut args = common.to_vec();
        args.extend(["--engine", "poll", "--rw", "randwrite", "--iodepth", "4"]);
        if zero_copy {
            args.push("--zero-copy");
        }
        let w = run(&args);
        assert_eq!(w["engine"], "Poll");
        let ops = w["ops"].as_u64().expect("ops");
        assert!(ops > 0, "{w}");
        assert!(w["lat_p50_us"].as_f64().is_some_and(|l| l > 0.0), "{w}");
        // Every 4 KiB block is either as it was or zeroed by a write, and some were.
        let after = disk.read_image(0, (8 * MIB) as usize);
        let mut zeroed = 0u64;
        for (i, (a, b)) in after.chunks(BS).zip(before.chunks(BS)).enumerate() {
            if a != b {
                assert!(a.iter().all(|&x| x == 0), "block {i} holds neither");
                zeroed += 1;
            }
        }
        assert!(zeroed > 0, "no write reached the image: {w}");
        assert!(zeroed <= ops, "{zeroed} blocks changed by {ops} writes");
        disk.write_image(0, &before);
    }

    for engine in ["poll", "threads"] {
        let mut args = common.to_vec();
        args.extend(["--engine", engine, "--rw", "randread", "--iodepth", "4"]);
        args.extend(["--jobs", "1"]);
        let r = run(&args);
        assert!(r["ops"].as_u64().is_some_and(|n| n > 0), "{engine}: {r}");
        assert!(r["iops"].as_f64().is_some_and(|n| n > 0.0), "{engine}: {r}");
    }
    assert!(
        disk.read_image(0, (8 * MIB) as usize) == before,
        "reads changed the image"
    );
}
