//! The NBD gateway (`vscsi nbd`) with real NBD clients that nobody here wrote, from Debian's
//! packages (`scripts/install-deps.sh` installs them): `nbdinfo` and `nbdcopy` (libnbd-bin),
//! `qemu-img` and `qemu-io` (qemu-utils) and `fio --ioengine=nbd` with `verify=crc32c`. They
//! read, write, zero and trim through the gateway, the daemon and QEMU's virtio-scsi device;
//! every check ends at the image files on the host (and at QEMU's own block counters).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vscsi_tests::{Daemon, DaemonBuilder, Rng, TestDisk, bin, show_output as show};

const MIB: u64 = 1 << 20;
const DISK_BYTES: u64 = 16 * MIB;
/// Longest any one tool may run (TCG is slow; nothing here should come close).
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// A running `vscsi nbd`; killed by pid when dropped.
struct NbdGateway {
    child: Option<Child>,
    socket: PathBuf,
    tcp: String,
    output: Arc<Mutex<String>>,
}

impl NbdGateway {
    fn start(daemon: &Daemon, dir: &Path) -> NbdGateway {
        let socket = dir.join("nbd.sock");
        let mut child = Command::new(bin("vscsi"))
            .arg("--socket")
            .arg(&daemon.socket)
            .arg("nbd")
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--listen")
            .arg("tcp:127.0.0.1:0")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vscsi nbd");
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let streams: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("stdout")),
            Box::new(child.stderr.take().expect("stderr")),
        ];
        for stream in streams {
            let output = output.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut o) = output.lock() {
                        o.push_str(&line);
                        o.push('\n');
                    }
                    let _ = tx.send(line);
                }
            });
        }
        drop(tx);
        let mut gw = NbdGateway {
            child: Some(child),
            socket,
            tcp: String::new(),
            output,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("vscsi nbd: ready") => {
                    gw.tcp = line
                        .split("tcp:")
                        .nth(1)
                        .map(|a| a.trim().trim_end_matches(',').to_owned())
                        .expect("ready line names the TCP address");
                    break;
                }
                Ok(_) => {}
                Err(_) => panic!("vscsi nbd did not become ready:\n{}", gw.output()),
            }
        }
        std::thread::spawn(move || while rx.recv().is_ok() {});
        gw
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    fn output(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// SIGTERM, then waits (bounded) for the exit.
    fn terminate(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("gateway running");
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = wait_bounded(child, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("vscsi nbd ignored SIGTERM:\n{}", self.output()));
        self.child = None;
        status
    }
}

impl Drop for NbdGateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Debian package of each tool, for the message when one is missing.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        "qemu-img" | "qemu-io" => "qemu-utils",
        "fio" => "fio",
        _ => "?",
    }
}

/// Starts `tool args...` with its output captured.
fn spawn_tool(tool: &str, args: &[&str]) -> Child {
    Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {tool}: {e}; install the Debian package {} (scripts/install-deps.sh does)",
                package_of(tool)
            )
        })
}

/// Waits (bounded) for a tool started with [`spawn_tool`]; kills it on time-out.
fn finish_tool(mut child: Child, what: &str) -> Output {
    // Drain the pipes on threads so a chatty tool cannot block.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = match wait_bounded(&mut child, TOOL_TIMEOUT) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: no result within {TOOL_TIMEOUT:?}");
        }
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Runs a tool and insists that it succeeds; returns its standard output.
fn run_ok(tool: &str, args: &[&str], gw: &NbdGateway) -> String {
    let what = format!("{tool} {}", args.join(" "));
    let o = finish_tool(spawn_tool(tool, args), &what);
    assert!(
        o.status.success(),
        "{what} failed: {}\ngateway:\n{}",
        show(&o),
        gw.output()
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a tool that must fail; returns everything it printed.
fn run_fails(tool: &str, args: &[&str]) -> String {
    let what = format!("{tool} {}", args.join(" "));
    let o = finish_tool(spawn_tool(tool, args), &what);
    assert!(
        !o.status.success(),
        "{what} should have failed: {}",
        show(&o)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vscsi-nbd-test-")
        .tempdir()
        .expect("temp dir")
}

/// The JSON value of `key` in the export object of `json` named `name`, as text
/// (`nbdinfo --json` output; numbers and booleans are bare words).
fn export_field(json: &str, name: &str, key: &str) -> String {
    let start = json
        .find(&format!("\"export-name\": \"{name}\""))
        .unwrap_or_else(|| panic!("export {name} not listed:\n{json}"));
    let obj = &json[start..];
    let obj = &obj[..obj.find('}').unwrap_or(obj.len())];
    let at = obj
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("export {name} has no {key}:\n{json}"));
    obj[at + key.len() + 3..]
        .split([',', '\n'])
        .next()
        .unwrap_or_default()
        .trim()
        .trim_matches('"')
        .to_owned()
}

/// An MBR partition entry: type 0x83, `start` and `sectors` in 512-byte blocks.
fn mbr_entry(start: u32, sectors: u32) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[4] = 0x83;
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    e
}

/// A raw NBD connection in transmission on `export` (`NBD_OPT_GO`), for the checks no tool
/// makes.
fn raw_go(socket: &Path, export: &str) -> UnixStream {
    let mut s = UnixStream::connect(socket).expect("connect gateway");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&1u32.to_be_bytes()).unwrap(); // fixed newstyle
    // NBD_OPT_GO with the export name and no information requests.
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(b"IHAVEOPT").unwrap();
    s.write_all(&7u32.to_be_bytes()).unwrap();
    s.write_all(&(data.len() as u32).to_be_bytes()).unwrap();
    s.write_all(&data).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        s.read_exact(&mut d).unwrap();
        match kind {
            1 => break, // NBD_REP_ACK: transmission
            3 => {}     // NBD_REP_INFO
            k => panic!(
                "GO {export} refused: {k:#x} {}",
                String::from_utf8_lossy(&d)
            ),
        }
    }
    s
}

/// Sends one request without payload (`NBD_CMD_*` `kind` with `flags`) on a connection in
/// transmission and returns the error of its simple reply.
fn raw_cmd(s: &mut UnixStream, kind: u16, flags: u16, offset: u64, len: u32) -> u32 {
    let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
    req.extend_from_slice(&flags.to_be_bytes());
    req.extend_from_slice(&kind.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&len.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes());
    assert_eq!(&reply[8..], &7u64.to_be_bytes());
    u32::from_be_bytes(reply[4..8].try_into().unwrap())
}

/// That the server itself (not just a client honouring the read-only flag) refuses a write
/// with `EPERM`: returns the reply's error.
fn raw_write_error(socket: &Path, export: &str) -> u32 {
    let mut s = raw_go(socket, export);
    // NBD_CMD_WRITE of 512 bytes at 0, then read the simple reply.
    let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&1u16.to_be_bytes());
    req.extend_from_slice(&42u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&512u32.to_be_bytes());
    req.extend_from_slice(&[0x77; 512]);
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes());
    assert_eq!(&reply[8..], &42u64.to_be_bytes());
    u32::from_be_bytes(reply[4..8].try_into().unwrap())
}

#[test]
fn real_nbd_clients_read_and_write_through_the_gateway() {
    let dir = tmp();
    let d512 = TestDisk::create(dir.path(), "d512.img", DISK_BYTES, 11);
    let d4k = TestDisk::create(dir.path(), "d4k.img", DISK_BYTES, 12).block_size(4096);
    let ro = TestDisk::create(dir.path(), "ro.img", 4 * MIB, 13).readonly();
    let parts = TestDisk::create(dir.path(), "parts.img", 8 * MIB, 14);
    // Two MBR partitions, 2 MiB at 1 MiB and 1 MiB at 4 MiB: exports of their own.
    let mut table = [0u8; 66];
    table[..16].copy_from_slice(&mbr_entry(2048, 4096));
    table[16..32].copy_from_slice(&mbr_entry(8192, 2048));
    table[64..].copy_from_slice(&[0x55, 0xaa]);
    parts.write_image(446, &table);
    let daemon = DaemonBuilder::new(dir.path())
        .disk(&d512)
        .disk(&d4k)
        .disk(&ro)
        .disk(&parts)
        .start();
    let mut gw = NbdGateway::start(&daemon, dir.path());
    let uri0 = gw.uri("0");
    let uri1 = gw.uri("1");
    let uri2 = gw.uri("2");

    // nbdinfo: every export, with its size, block sizes and flags.
    let json = run_ok(
        "nbdinfo",
        &[
            "--list",
            "--json",
            &format!("nbd+unix:///?socket={}", gw.socket.display()),
        ],
        &gw,
    );
    for (name, size, bs, read_only) in [
        ("0", DISK_BYTES, 512, false),
        ("1", DISK_BYTES, 4096, false),
        ("2", 4 * MIB, 512, true),
    ] {
        let field = |k| export_field(&json, name, k);
        assert_eq!(field("export-size"), size.to_string(), "export {name} size");
        assert_eq!(field("block_size_minimum"), "1", "export {name}");
        assert_eq!(
            field("block_size_preferred"),
            bs.to_string(),
            "export {name}"
        );
        assert_eq!(field("block_size_maximum"), (32 * MIB).to_string());
        assert_eq!(
            field("is_read_only"),
            read_only.to_string(),
            "export {name}"
        );
        assert_eq!(field("can_flush"), "true");
        assert_eq!(field("can_multi_conn"), "true");
        // QEMU's scsi-hd reports logical block provisioning (UNMAP) even with its default
        // discard=ignore, so every writable disk can trim.
        assert_eq!(field("can_trim"), (!read_only).to_string(), "export {name}");
        assert_eq!(field("can_zero"), (!read_only).to_string());
        assert_eq!(field("can_fua"), (!read_only).to_string());
    }
    // Partitions: each a window on its disk, of its own size, bounded at its end.
    let names: Vec<String> = json
        .match_indices("\"export-name\": \"")
        .map(|(i, m)| {
            json[i + m.len()..]
                .split('"')
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    let part_names: Vec<&String> = names.iter().filter(|n| n.starts_with("3p")).collect();
    assert_eq!(
        part_names.len(),
        2,
        "two partition exports of disk 3: {names:?}"
    );
    for (name, size, start) in [(part_names[0], 2 * MIB, MIB), (part_names[1], MIB, 4 * MIB)] {
        assert_eq!(export_field(&json, name, "export-size"), size.to_string());
        let uri = gw.uri(name);
        let outside = (
            parts.read_image(start - 512, 512),
            parts.read_image(start + size, 512),
        );
        run_ok(
            "qemu-io",
            &["-f", "raw", "-c", &format!("write -P 0x5c 0 {size}"), &uri],
            &gw,
        );
        assert_eq!(
            parts.read_image(start, size as usize),
            vec![0x5c; size as usize]
        );
        let past_end = format!("write -P 0x5d {size} 512");
        run_fails("qemu-io", &["-f", "raw", "-c", &past_end, &uri]);
        assert_eq!(
            (
                parts.read_image(start - 512, 512),
                parts.read_image(start + size, 512)
            ),
            outside,
            "partition {name}: bytes outside it changed"
        );
    }

    // While the whole disk is open, its partitions are not (and the client is told why).
    let whole = raw_go(&gw.socket, "3");
    let msg = run_fails(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            "-c",
            "read 0 512",
            &gw.uri(part_names[0]),
        ],
    );
    assert!(
        msg.contains("ENOLCK"),
        "qemu-io should show the server's reason: {msg}"
    );
    drop(whole);

    // The same over loopback TCP.
    let tcp_json = run_ok("nbdinfo", &["--json", &format!("nbd://{}/1", gw.tcp)], &gw);
    assert_eq!(
        export_field(&tcp_json, "1", "export-size"),
        DISK_BYTES.to_string()
    );

    // nbdcopy a file into export 0: random data around a 4 MiB hole, which nbdcopy zeroes
    // (write zeroes) where the image held a pattern. The rest of the disk is untouched.
    let mut rng = Rng::new(77);
    let src = dir.path().join("src.bin");
    let mut expect = rng.bytes(12 * MIB as usize);
    expect[6 * MIB as usize..10 * MIB as usize].fill(0);
    {
        let f = File::create(&src).unwrap();
        f.write_all_at(&expect[..6 * MIB as usize], 0).unwrap();
        f.write_all_at(&expect[10 * MIB as usize..], 10 * MIB)
            .unwrap();
        f.set_len(12 * MIB).unwrap(); // the middle stays a hole
    }
    let tail = d512.read_image(12 * MIB, 4 * MIB as usize);
    run_ok("nbdcopy", &[src.to_str().unwrap(), &uri0], &gw);
    assert!(
        d512.read_image(0, expect.len()) == expect,
        "export 0: the image differs from the file nbdcopy copied"
    );
    assert!(
        d512.read_image(12 * MIB, tail.len()) == tail,
        "export 0: nbdcopy changed bytes past the file's end"
    );

    // fio on export 1 (random 4 KiB writes, crc32c-verified reads), while export 0 is copied
    // back out (nbdcopy, several connections) and compared with qemu-img: many connections
    // to two exports at once.
    let fio = spawn_tool(
        "fio",
        &[
            "--name=nbd-verify",
            "--ioengine=nbd",
            &format!("--uri={uri1}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=8M",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ],
    );
    let back = dir.path().join("back.bin");
    run_ok("nbdcopy", &[&uri0, back.to_str().unwrap()], &gw);
    assert!(
        std::fs::read(&back).unwrap() == d512.read_image(0, DISK_BYTES as usize),
        "export 0 copied out differs from the image"
    );
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "raw",
            "-F",
            "raw",
            d512.path.to_str().unwrap(),
            &uri0,
        ],
        &gw,
    );
    let fio_out = finish_tool(fio, "fio --ioengine=nbd");
    assert!(
        fio_out.status.success(),
        "fio with crc32c verification failed: {}\ngateway:\n{}",
        show(&fio_out),
        gw.output()
    );
    let fio_text = String::from_utf8_lossy(&fio_out.stdout);
    assert!(
        fio_text.contains("err= 0"),
        "fio reported errors:\n{fio_text}"
    );
    // The image is the oracle for fio too: verify what it wrote from the file itself.
    let verify_image = run_ok(
        "fio",
        &[
            "--name=nbd-verify",
            "--ioengine=psync",
            &format!("--filename={}", d4k.path.display()),
            "--rw=randwrite",
            "--bs=4k",
            "--size=8M",
            "--verify=crc32c",
            "--verify_only",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ],
        &gw,
    );
    assert!(verify_image.contains("err= 0"), "{verify_image}");

    // qemu-img compare sees a change made on the host (its reads really go through).
    d512.write_image(5 * MIB + 3, b"changed on the host");
    let o = finish_tool(
        spawn_tool(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                back.to_str().unwrap(),
                &uri0,
            ],
        ),
        "qemu-img compare",
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected a mismatch: {}",
        show(&o)
    );

    // qemu-io: a pattern write and a zero write, a flush, pattern reads; checked in the
    // images. On the 4096-byte disk, an unaligned write (read-modify-write below).
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 4096 65536",
            "-c",
            "write -z 1048576 65536",
            "-c",
            "flush",
            &uri0,
        ],
        &gw,
    );
    assert_eq!(d512.read_image(4096, 65536), vec![0xab; 65536]);
    assert_eq!(d512.read_image(MIB, 65536), vec![0; 65536]);
    let edges = (d4k.read_image(36864, 137), d4k.read_image(42001, 3055));
    let before = d4k.read_image(9 * MIB, 3 * 4096);
    let qio = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xcd 37001 5000",
            "-c",
            "read -P 0xcd 37001 5000",
            &uri1,
        ],
        &gw,
    );
    assert!(!qio.contains("verification failed"), "{qio}");
    assert_eq!(d4k.read_image(37001, 5000), vec![0xcd; 5000]);
    assert_eq!(
        (d4k.read_image(36864, 137), d4k.read_image(42001, 3055)),
        edges,
        "the rest of the two 4096-byte blocks kept"
    );
    assert_eq!(
        d4k.read_image(9 * MIB, 3 * 4096),
        before,
        "bytes far away kept"
    );
    let qio = run_ok(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0xab 4096 65536", &uri0],
        &gw,
    );
    assert!(!qio.contains("verification failed"), "{qio}");

    // The read-only disk: clients refuse, and so does the server itself; nothing changes.
    let ro_before = ro.read_image(0, 4 * MIB as usize);
    let msg = run_fails("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4096", &uri2]);
    assert!(
        msg.to_lowercase().contains("read-only") || msg.contains("Permission denied"),
        "{msg}"
    );
    let msg = run_fails("nbdcopy", &[src.to_str().unwrap(), &uri2]);
    assert!(msg.contains("read-only"), "{msg}");
    assert_eq!(raw_write_error(&gw.socket, "2"), 1, "EPERM from the server");
    assert!(
        ro.read_image(0, 4 * MIB as usize) == ro_before,
        "read-only disk changed"
    );
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "raw",
            "-F",
            "raw",
            ro.path.to_str().unwrap(),
            &uri2,
        ],
        &gw,
    );

    // SIGTERM: a clean exit that removes the socket.
    let status = gw.terminate();
    assert!(
        status.success(),
        "vscsi nbd exit: {status}\n{}",
        gw.output()
    );
    assert!(!gw.socket.exists(), "socket file left behind");
    drop(daemon);
}

/// TRIM and WRITE_ZEROES from real clients, on a raw image attached with `discard=unmap`:
/// `nbdinfo` sees the trim flag only where the disk can discard, `qemu-io` and
/// `fio --rw=trim` trims become holes in the image file (zeroes, `SEEK_HOLE`), a trim that
/// is not block-aligned discards only the whole blocks inside it (QEMU's unmap byte counter
/// says how many), FUA on a trim reaches QEMU as a flush, write zeroes is one WRITE SAME
/// (QEMU counts one write operation for a whole MiB), and no byte outside any range changes.
#[test]
fn trims_and_zeroes_from_real_clients_reach_the_image() {
    let dir = tmp();
    let disk = TestDisk::create(dir.path(), "trim.img", DISK_BYTES, 41);
    let ro = TestDisk::create(dir.path(), "ro.img", 4 * MIB, 42).readonly();
    let daemon = DaemonBuilder::new(dir.path())
        .disk(&ro)
        .disk_qemu(&disk.qemu_arg("discard=unmap"))
        .start();
    let gw = NbdGateway::start(&daemon, dir.path());
    let uri = gw.uri("1");

    // The flag: only the writable disk that can discard has it.
    let o = finish_tool(spawn_tool("nbdinfo", &["--can", "trim", &uri]), "nbdinfo");
    assert_eq!(o.status.code(), Some(0), "can trim: {}", show(&o));
    let o = finish_tool(
        spawn_tool("nbdinfo", &["--can", "trim", &gw.uri("0")]),
        "nbdinfo",
    );
    assert_eq!(
        o.status.code(),
        Some(2),
        "read-only: cannot trim: {}",
        show(&o)
    );
    let json = run_ok("nbdinfo", &["--json", &uri], &gw);
    assert_eq!(export_field(&json, "1", "can_trim"), "true");
    assert_eq!(export_field(&json, "1", "can_zero"), "true");

    let mut want = disk.read_image(0, DISK_BYTES as usize);
    let unmapped = daemon.block_stat(1, "unmap_bytes");

    // qemu-io: an aligned trim of 2 MiB at 4 MiB.
    run_ok("qemu-io", &["-f", "raw", "-c", "discard 4M 2M", &uri], &gw);
    want[(4 * MIB) as usize..(6 * MIB) as usize].fill(0);
    assert!(
        disk.read_image(0, want.len()) == want,
        "after the aligned trim"
    );
    assert_eq!(disk.next_hole(4 * MIB), 4 * MIB, "a hole in the image");
    assert_eq!(disk.next_data(4 * MIB), Some(6 * MIB));
    assert_eq!(daemon.block_stat(1, "unmap_bytes") - unmapped, 2 * MIB);

    // Not aligned: only the whole 512-byte blocks inside 1000..9192 (1024..8704) go to the
    // device; the bytes around them stay.
    let unmapped = daemon.block_stat(1, "unmap_bytes");
    let (around_a, around_b) = (disk.read_image(1000, 24), disk.read_image(8704, 488));
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "discard 1000 8192", &uri],
        &gw,
    );
    assert_eq!(
        daemon.block_stat(1, "unmap_bytes") - unmapped,
        8704 - 1024,
        "the whole blocks inside the range were unmapped, nothing more"
    );
    assert_eq!(
        disk.read_image(1000, 24),
        around_a,
        "bytes before the first whole block"
    );
    assert_eq!(
        disk.read_image(8704, 488),
        around_b,
        "bytes after the last whole block"
    );
    // What the hole punch made of 1024..8704 is the file system's business (it zeroes the
    // parts of pages it cannot free); either zeroes or the old bytes, nothing else.
    let inside = disk.read_image(1024, 8704 - 1024);
    for (i, &b) in inside.iter().enumerate() {
        assert!(
            b == 0 || b == want[1024 + i],
            "byte {} became {b:#x}",
            1024 + i
        );
    }
    want[1024..8704].copy_from_slice(&inside);

    // fio's NBD engine: 64 KiB trims over 10..12 MiB.
    run_ok(
        "fio",
        &[
            "--name=nbd-trim",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=trim",
            "--bs=64k",
            "--offset=10M",
            "--size=2M",
        ],
        &gw,
    );
    want[(10 * MIB) as usize..(12 * MIB) as usize].fill(0);
    assert!(disk.read_image(0, want.len()) == want, "after fio's trims");
    assert_eq!(disk.next_hole(10 * MIB), 10 * MIB);
    assert_eq!(disk.next_data(10 * MIB), Some(12 * MIB));

    // TRIM with FUA (no tool sets it; a raw request): QEMU sees the unmap, then a flush.
    let flushes = daemon.block_stat(1, "flush_operations");
    let mut raw = raw_go(&gw.socket, "1");
    assert_eq!(raw_cmd(&mut raw, 4, 1, 13 * MIB, MIB as u32), 0);
    assert!(
        daemon.block_stat(1, "flush_operations") > flushes,
        "FUA became a flush"
    );
    want[(13 * MIB) as usize..(14 * MIB) as usize].fill(0);
    assert!(disk.read_image(0, want.len()) == want, "after the FUA trim");
    // Past the end: EINVAL (22), nothing happens.
    assert_eq!(raw_cmd(&mut raw, 4, 0, DISK_BYTES - 512, 1024), 22);
    drop(raw);

    // Write zeroes (no hole asked for): one WRITE SAME, so QEMU counts one write of 1 MiB.
    let writes = daemon.block_stat(1, "wr_operations");
    let written = daemon.block_stat(1, "wr_bytes");
    run_ok("qemu-io", &["-f", "raw", "-c", "write -z 7M 1M", &uri], &gw);
    assert_eq!(daemon.block_stat(1, "wr_operations") - writes, 1);
    assert_eq!(daemon.block_stat(1, "wr_bytes") - written, MIB);
    want[(7 * MIB) as usize..(8 * MIB) as usize].fill(0);
    // Unaligned write zeroes: edges by read-modify-write.
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -z 8389000 5000", &uri],
        &gw,
    );
    want[8_389_000..8_394_000].fill(0);
    assert!(
        disk.read_image(0, want.len()) == want,
        "after the write zeroes"
    );

    // The read-only export refuses a trim.
    let ro_before = ro.read_image(0, (4 * MIB) as usize);
    run_fails(
        "qemu-io",
        &["-f", "raw", "-c", "discard 0 1M", &gw.uri("0")],
    );
    assert!(ro.read_image(0, ro_before.len()) == ro_before);
    assert_eq!(daemon.block_stat(0, "unmap_operations"), 0);
}
