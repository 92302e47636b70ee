//! The shared-memory transport end to end against QEMU: arenas are device-visible windows
//! (zero-copy), data checked against the image file; many clients at once; `vscsi bench
//! --ipc shm` processes killed mid-I/O, more of them than the machine has arena slots, while
//! another client keeps verifying its data.
//!
//! These need the daemon to serve arenas (an `ArenaProvider` in `ServerConfig::arena`),
//! enabled here with `--arena-mib`.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use vscsi_ipc::{Client, OpenFlags};
use vscsi_tests::{Daemon, DaemonBuilder, Rng, TestDisk, bin};

const MIB: u64 = 1 << 20;
const DISK_BYTES: u64 = 64 * MIB;
/// The daemon flag that turns the arenas on (MiB per session).
const ARENA_FLAG: &str = "--arena-mib";

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vscsi-shm-test-")
        .tempdir()
        .expect("temp dir")
}

fn daemon(dir: &std::path::Path) -> (Daemon, TestDisk) {
    let disk = TestDisk::create(dir, "d.img", DISK_BYTES, 7);
    let d = DaemonBuilder::new(dir)
        .disk(&disk)
        .arg(ARENA_FLAG)
        .arg("8")
        .start();
    (d, disk)
}

fn connect_shm(d: &Daemon) -> Client {
    Client::connect_shm(&d.socket, 4 << 20).expect("shared-memory session")
}

#[test]
fn zero_copy_bytes_land_in_the_image() {
    let dir = tmp();
    let (d, disk) = daemon(dir.path());
    let c = connect_shm(&d);
    let h = c.open("/0", OpenFlags::READ_WRITE).expect("open");
    let mut rng = Rng::new(11);
    // Arena buffers: aligned, straight to the device.
    let mut expect = Vec::new();
    for i in 0..16u64 {
        let mut b = c.alloc_buf(64 << 10).expect("arena buffer");
        rng.fill(&mut b);
        expect.push((i * MIB + 4096, b.to_vec()));
        c.prep_write(&h, i * MIB + 4096, b).expect("queue write");
    }
    c.submit().expect("submit");
    let mut out = Vec::new();
    while out.len() < 16 {
        c.reap(16 - out.len(), Some(Duration::from_secs(30)), &mut out)
            .expect("reap");
    }
    assert!(
        out.iter()
            .all(|c| matches!(c.result, Ok(n) if n == 64 << 10))
    );
    for (at, data) in &expect {
        assert!(disk.read_image(*at, data.len()) == *data, "image at {at}");
    }
    // The image, changed on the host, reads back through arena buffers.
    let fresh = rng.bytes(128 << 10);
    disk.write_image(40 * MIB, &fresh);
    let b = c.alloc_buf(128 << 10).expect("arena buffer");
    c.prep_read(&h, 40 * MIB, b).expect("queue read");
    c.submit().expect("submit");
    out.clear();
    c.reap(1, Some(Duration::from_secs(30)), &mut out)
        .expect("reap");
    let comp = out.pop().expect("completion");
    assert_eq!(comp.result.expect("read"), 128 << 10);
    assert!(comp.buf.expect("buffer")[..] == fresh[..]);
    // Any buffer, any offset: one copy through the arena.
    let odd = rng.bytes(3 * MIB as usize + 5);
    c.write_all_at(&h, 7 * MIB + 333, &odd)
        .expect("write_all_at");
    assert!(disk.read_image(7 * MIB + 333, odd.len()) == odd);
    let mut back = vec![0u8; odd.len()];
    c.read_exact_at(&h, 7 * MIB + 333, &mut back)
        .expect("read_exact_at");
    assert!(back == odd);
    c.sync(&h).expect("sync");
}

#[test]
fn many_clients_at_once_with_verified_data() {
    let dir = tmp();
    let (d, disk) = daemon(dir.path());
    let d = Arc::new(d);
    let mut threads = Vec::new();
    for k in 0..6u64 {
        let d = d.clone();
        threads.push(thread::spawn(move || {
            let c = connect_shm(&d);
            let h = c.open("/0", OpenFlags::READ_WRITE).expect("open");
            let mut rng = Rng::new(100 + k);
            let base = k * 8 * MIB;
            let mut written = Vec::new();
            for round in 0..8u64 {
                let mut tickets = Vec::new();
                for i in 0..8u64 {
                    let at = base + (round * 8 + i) * (64 << 10);
                    let mut b = c.alloc_buf(64 << 10).expect("arena buffer");
                    rng.fill(&mut b);
                    written.push((at, b.to_vec()));
                    tickets.push(c.prep_write(&h, at, b).expect("queue"));
                }
                c.submit().expect("submit");
                let mut out = Vec::new();
                while out.len() < tickets.len() {
                    c.reap(
                        tickets.len() - out.len(),
                        Some(Duration::from_secs(60)),
                        &mut out,
                    )
                    .expect("reap");
                }
                assert!(out.iter().all(|c| c.result.is_ok()));
            }
            for (at, data) in &written {
                let mut back = vec![0u8; data.len()];
                c.read_exact_at(&h, *at, &mut back).expect("read back");
                assert!(back == *data, "client {k} at {at}");
            }
            written
        }));
    }
    for t in threads {
        for (at, data) in t.join().expect("client thread") {
            assert!(disk.read_image(at, data.len()) == data, "image at {at}");
        }
    }
}

#[test]
fn clients_killed_mid_io_are_cleaned_up_and_others_continue() {
    let dir = tmp();
    // The killed clients write at random over a disk of their own (/1), so the steady client's
    // blocks on /0 change only by its own writes.
    let disk = TestDisk::create(dir.path(), "d.img", DISK_BYTES, 7);
    let noise = TestDisk::create(dir.path(), "noise.img", 16 * MIB, 8);
    let d = DaemonBuilder::new(dir.path())
        .disk(&disk)
        .disk(&noise)
        .arg(ARENA_FLAG)
        .arg("8")
        .start();
    // A steady client verifying its own range the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let steady = {
        let (socket, stop) = (d.socket.clone(), stop.clone());
        thread::spawn(move || {
            let c = Client::connect_shm(&socket, 4 << 20).expect("steady session");
            let h = c.open("/0", OpenFlags::READ_WRITE).expect("open");
            let mut rng = Rng::new(5);
            let mut rounds = 0u64;
            let mut last = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let at = 60 * MIB + (rounds % 32) * 4096;
                let data = rng.bytes(4096);
                c.write_all_at(&h, at, &data).expect("steady write");
                let mut back = vec![0u8; 4096];
                c.read_exact_at(&h, at, &mut back).expect("steady read");
                assert!(back == data, "steady client data");
                last.push((at, data));
                rounds += 1;
            }
            (rounds, last)
        })
    };
    // More killed sessions than the machine has arena slots (16 by default): arenas must come
    // back when their client dies, also with requests in flight.
    for i in 0..20 {
        let mut child = Command::new(bin("vscsi"))
            .arg("--socket")
            .arg(&d.socket)
            .args([
                "bench",
                "/1",
                "--ipc",
                "shm",
                "--rw",
                "randrw",
                "--bs",
                "16K",
                "--iodepth",
                "32",
                "--runtime",
                "30",
                "--json",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vscsi bench");
        thread::sleep(Duration::from_millis(300 + 50 * (i % 4)));
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "bench {i} ended early:\n{}",
            d.output()
        );
        child.kill().expect("kill");
        child.wait().expect("reap child");
    }
    // A new session still gets an arena.
    let deadline = Instant::now() + Duration::from_secs(30);
    let c = loop {
        match Client::connect_shm(&d.socket, 4 << 20) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for an arena: {e}");
                thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("no arena after the killed clients: {e}\n{}", d.output()),
        }
    };
    let h = c.open("/0", OpenFlags::READ).expect("open");
    let mut b = vec![0u8; 4096];
    c.read_exact_at(&h, 0, &mut b).expect("read");
    stop.store(true, Ordering::Relaxed);
    let (rounds, last) = steady.join().expect("steady client");
    assert!(rounds > 0);
    // The steady client's last write of each block is in the image.
    let mut latest = std::collections::HashMap::new();
    for (at, data) in last {
        latest.insert(at, data);
    }
    for (at, data) in latest {
        assert!(disk.read_image(at, 4096) == data, "image at {at}");
    }
}

/// Reads through the zero-copy path, which the daemon's poller submits itself (no worker), on
/// a disk slower than the command timeout: each is recovered (ABORT TASK ...) once overdue and
/// answered exactly once, in bounded time, while another disk keeps serving the same client.
#[test]
fn overdue_zero_copy_reads_are_recovered_and_answered_once() {
    overdue_zero_copy_reads(&[]);
}

/// The same with busy polling: the poller polls the device for the overdue reads (interrupts
/// off) until its budget ends, then hands them to the recovery as without polling.
#[test]
fn overdue_zero_copy_reads_are_recovered_under_busy_polling() {
    overdue_zero_copy_reads(&["--poll-us", "1000"]);
}

fn overdue_zero_copy_reads(extra: &[&str]) {
    let dir = tmp();
    let good = TestDisk::create(dir.path(), "good.img", 4 * MIB, 4);
    let mut builder = DaemonBuilder::new(dir.path());
    for a in extra {
        builder = builder.arg(a);
    }
    let d = builder
        .disk(&good)
        .arg("--disk-qemu")
        .arg("driver=null-co,size=64M,latency-ns=1500000000")
        .arg("--command-timeout-ms")
        .arg("300")
        .arg("--tmf-timeout-ms")
        .arg("400")
        .arg(ARENA_FLAG)
        .arg("8")
        .start();
    let c = connect_shm(&d);
    let slow = c.open("/1", OpenFlags::READ).expect("open slow disk");
    let fast = c.open("/0", OpenFlags::READ).expect("open good disk");
    let t0 = Instant::now();
    let mut slow_tickets = Vec::new();
    for i in 0..4u64 {
        let b = c.alloc_buf(4096).expect("arena buffer");
        slow_tickets.push(c.prep_read(&slow, i * 4096, b).expect("queue"));
    }
    let b = c.alloc_buf(4096).expect("arena buffer");
    let fast_ticket = c.prep_read(&fast, 8192, b).expect("queue");
    c.submit().expect("submit");
    let mut out = Vec::new();
    while out.len() < 5 {
        let n = c
            .reap(5 - out.len(), Some(Duration::from_secs(30)), &mut out)
            .expect("reap");
        assert!(n > 0, "no answer within 30 s: {} of 5", out.len());
    }
    assert!(t0.elapsed() < Duration::from_secs(25), "{:?}", t0.elapsed());
    for comp in &out {
        if comp.ticket == fast_ticket {
            assert_eq!(comp.result.as_ref().expect("good disk"), &4096);
            let b = comp.buf.as_ref().expect("buffer");
            assert!(b[..] == good.read_image(8192, 4096)[..]);
        } else {
            assert!(slow_tickets.contains(&comp.ticket));
            if let Ok(n) = comp.result.as_ref() {
                assert_eq!(*n, 4096, "a completed read is complete");
            }
        }
    }
    // Exactly once: nothing more arrives.
    let mut late = Vec::new();
    assert_eq!(
        c.reap(1, Some(Duration::from_millis(500)), &mut late)
            .expect("reap"),
        0
    );
    let stats = c.stats().expect("stats");
    let value = |name: &str| {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(value("command_timeouts") >= 1, "{stats}");
    assert!(value("task_management_functions") >= 1, "{stats}");
    for line in stats.lines().filter(|l| l.starts_with("queue ")) {
        let w: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(w[3], w[5], "submitted == completed: {line}");
    }
    // The session works on after recovery.
    let b = c.alloc_buf(4096).expect("arena buffer");
    c.prep_read(&fast, 0, b).expect("queue");
    c.submit().expect("submit");
    out.clear();
    c.reap(1, Some(Duration::from_secs(30)), &mut out)
        .expect("reap");
    let comp = out.pop().expect("completion");
    assert_eq!(comp.result.expect("read"), 4096);
    assert!(comp.buf.expect("buffer")[..] == good.read_image(0, 4096)[..]);
}

/// Busy polling (`--poll-us`): each session's poller polls the device for the requests it
/// started (the request queues' interrupts off meanwhile) and its submission ring between
/// requests. Several shared-memory clients at queue depths 1 and 8, and a socket client whose
/// blocking requests are answered by those polls or by interrupts once polling stops, all
/// verify their data against the image, and everything still works after the pollers went
/// idle (interrupts back on).
#[test]
fn busy_polling_sessions_with_verified_data() {
    let dir = tmp();
    let disk = TestDisk::create(dir.path(), "d.img", DISK_BYTES, 9);
    let d = Arc::new(
        DaemonBuilder::new(dir.path())
            .disk(&disk)
            .arg(ARENA_FLAG)
            .arg("8")
            .arg("--poll-us")
            .arg("2000")
            .start(),
    );
    let mut threads = Vec::new();
    for k in 0..3u64 {
        let d = d.clone();
        threads.push(thread::spawn(move || {
            let c = connect_shm(&d);
            let h = c.open("/0", OpenFlags::READ_WRITE).expect("open");
            let mut rng = Rng::new(300 + k);
            let base = k * 8 * MIB;
            let mut written = Vec::new();
            for round in 0..12u64 {
                // Alternately one request at a time and eight at once.
                let depth = if round % 2 == 0 { 1 } else { 8 };
                let mut out = Vec::new();
                for i in 0..depth {
                    let at = base + (round * 8 + i) * 4096;
                    let mut b = c.alloc_buf(4096).expect("arena buffer");
                    rng.fill(&mut b);
                    written.push((at, b.to_vec()));
                    c.prep_write(&h, at, b).expect("queue");
                }
                c.submit().expect("submit");
                while out.len() < depth as usize {
                    c.reap(
                        depth as usize - out.len(),
                        Some(Duration::from_secs(60)),
                        &mut out,
                    )
                    .expect("reap");
                }
                assert!(out.iter().all(|c| matches!(c.result, Ok(4096))));
            }
            for (at, data) in &written {
                let mut back = vec![0u8; data.len()];
                c.read_exact_at(&h, *at, &mut back).expect("read back");
                assert!(back == *data, "client {k} at {at}");
            }
            written
        }));
    }
    // Meanwhile, blocking requests over the socket.
    let socket_writes = {
        let c = d.client();
        let h = c.open("/0", OpenFlags::READ_WRITE).expect("open");
        let mut rng = Rng::new(399);
        let mut w = Vec::new();
        for i in 0..16u64 {
            let data = rng.bytes(12_345);
            let at = 40 * MIB + i * 65_536 + 7;
            c.write_all_at(&h, at, &data).expect("socket write");
            w.push((at, data));
        }
        c.sync(&h).expect("sync");
        w
    };
    for t in threads {
        for (at, data) in t.join().expect("client thread") {
            assert!(disk.read_image(at, data.len()) == data, "image at {at}");
        }
    }
    for (at, data) in &socket_writes {
        assert!(disk.read_image(*at, data.len()) == *data, "image at {at}");
    }
    // The pollers collected completions themselves (of the 162 shared-memory writes, a share
    // that holds even when a loaded machine lets the 2 ms budget run out now and then).
    let stats = d.client().stats().expect("stats");
    let polled = stats
        .lines()
        .find_map(|l| {
            l.strip_prefix("busy_polled_completions")?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no busy_polled_completions in stats:\n{stats}"));
    assert!(polled >= 16, "{stats}");
    // The CLI over a shared-memory session (`vscsi --shm MIB`): an unaligned write and an
    // aligned one land in the image, and the host's bytes read back.
    let text: Vec<u8> = (0..300_000u32)
        .flat_map(|i| format!("{i:07}\n").into_bytes())
        .take(1_000_001)
        .collect();
    for at in [45 * MIB + 3, 46 * MIB] {
        let at_s = at.to_string();
        d.vscsi_ok(
            &[
                "--shm",
                "4",
                "write",
                "disk.virtio-scsi:/0",
                "--offset",
                &at_s,
            ],
            &text,
        );
        assert!(disk.read_image(at, text.len()) == text, "CLI write at {at}");
        let len = text.len().to_string();
        let back = d.vscsi_ok(
            &[
                "--shm",
                "4",
                "read",
                "disk.virtio-scsi:/0",
                "--offset",
                &at_s,
                "--length",
                &len,
            ],
            b"",
        );
        assert!(back.as_bytes() == &text[..], "CLI read at {at}");
    }
    // Idle now (no poller polls, interrupts on): the host's bytes read back through a new
    // session, one request at a time.
    thread::sleep(Duration::from_millis(50));
    let fresh = Rng::new(400).bytes(64 << 10);
    disk.write_image(50 * MIB, &fresh);
    let c = connect_shm(&d);
    let h = c.open("/0", OpenFlags::READ).expect("open");
    let mut back = vec![0u8; fresh.len()];
    c.read_exact_at(&h, 50 * MIB, &mut back).expect("read");
    assert!(back == fresh);
}

/// Closing a handle (over the socket) while the shared-memory session's fast requests on it
/// are in flight waits for them, as it waits for the socket's own requests: when Close
/// returns, every write has completed and its completion is posted (a reap that does not wait
/// finds them all), and the image holds the bytes. The device is throttled (QEMU
/// `throttling.bps-write`, 2 MiB/s) so that the writes are still in flight when Close is sent.
#[test]
fn close_waits_for_the_handles_requests_in_flight() {
    let dir = tmp();
    let disk = TestDisk::create(dir.path(), "d.img", DISK_BYTES, 5);
    let drive = format!(
        "file={},format=raw,throttling.bps-write=2097152",
        disk.path.display()
    );
    let d = DaemonBuilder::new(dir.path())
        .arg("--disk-qemu")
        .arg(&drive)
        .arg(ARENA_FLAG)
        .arg("8")
        .start();
    let c = connect_shm(&d);
    let h = c.open("/0", OpenFlags::READ_WRITE).expect("open");
    let mut rng = Rng::new(77);
    let n = 16usize;
    let mut written = Vec::new();
    for i in 0..n as u64 {
        let mut b = c.alloc_buf(64 << 10).expect("arena buffer");
        rng.fill(&mut b);
        written.push((i * MIB, b.to_vec()));
        c.prep_write(&h, i * MIB, b).expect("queue write");
    }
    c.submit().expect("submit");
    // Once the first write is back, the poller has taken them all (one pass, microseconds;
    // each throttled write takes about 30 ms).
    let mut out = Vec::new();
    c.reap(1, Some(Duration::from_secs(30)), &mut out)
        .expect("first completion");
    let t0 = Instant::now();
    c.close(h).expect("close");
    let took = t0.elapsed();
    let got = c
        .reap(n - out.len(), Some(Duration::ZERO), &mut out)
        .expect("reap without waiting");
    assert_eq!(
        out.len(),
        n,
        "{got} more completions were posted when Close returned after {took:?}"
    );
    assert!(
        out.iter()
            .all(|c| matches!(c.result, Ok(n) if n == 64 << 10)),
        "every write succeeded"
    );
    for (at, data) in &written {
        assert!(disk.read_image(*at, data.len()) == *data, "image at {at}");
    }
}
