//! End to end: the built `vscsi` binary against a server with an in-memory device.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, RwLock};
use std::thread;

use block_scheme::{BlockDevice, DiskIdentity, DiskInfo, DiskScheme};
use vscsi_ipc::{Server, ServerConfig, ShutdownHandle};

struct MemDevice {
    disks: Vec<(u32, RwLock<Vec<u8>>)>,
}

impl BlockDevice for MemDevice {
    fn disks(&self) -> Vec<DiskInfo> {
        self.disks
            .iter()
            .map(|(bs, d)| DiskInfo {
                block_size: *bs,
                blocks: d.read().unwrap().len() as u64 / u64::from(*bs),
                readonly: false,
            })
            .collect()
    }
    fn read_blocks(&self, disk: usize, lba: u64, buf: &mut [u8]) -> block_scheme::Result<()> {
        let (bs, d) = &self.disks[disk];
        let off = (lba * u64::from(*bs)) as usize;
        buf.copy_from_slice(&d.read().unwrap()[off..off + buf.len()]);
        Ok(())
    }
    fn write_blocks(&self, disk: usize, lba: u64, buf: &[u8]) -> block_scheme::Result<()> {
        let (bs, d) = &self.disks[disk];
        let off = (lba * u64::from(*bs)) as usize;
        d.write().unwrap()[off..off + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self, _disk: usize) -> block_scheme::Result<()> {
        Ok(())
    }
    /// Disk 0 discards (the blocks read back as 0xDD), disk 1 cannot.
    fn can_discard(&self, disk: usize) -> bool {
        disk == 0
    }
    fn discard(&self, disk: usize, lba: u64, blocks: u64) -> block_scheme::Result<()> {
        assert_eq!(disk, 0, "discard on a disk that cannot");
        let (bs, d) = &self.disks[disk];
        let (off, len) = (
            (lba * u64::from(*bs)) as usize,
            (blocks * u64::from(*bs)) as usize,
        );
        d.write().unwrap()[off..off + len].fill(0xDD);
        Ok(())
    }
    /// Disk 0 says who it is; disk 1 does not.
    fn identity(&self, disk: usize) -> Option<DiskIdentity> {
        (disk == 0).then(|| DiskIdentity {
            vendor: "QEMU".into(),
            product: "QEMU HARDDISK".into(),
            revision: "2.5+".into(),
            serial: Some("SER-0".into()),
            wwn: Some("0x5000c500a1b2c3d4".into()),
            target: 0,
            lun: 3,
        })
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    device: Arc<MemDevice>,
    shutdown: ShutdownHandle,
    thread: Option<thread::JoinHandle<std::io::Result<()>>>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let device = Arc::new(MemDevice {
            disks: vec![
                (512, RwLock::new(vec![0u8; 48 << 20])),
                (4096, RwLock::new(vec![7u8; 1 << 20])),
            ],
        });
        let scheme = Arc::new(DiskScheme::new("disk.virtio-scsi", device.clone()));
        let server = Server::bind(ServerConfig::new(&path), scheme).unwrap();
        let shutdown = server.shutdown_handle();
        let thread = Some(thread::spawn(move || server.run()));
        Fixture {
            _dir: dir,
            path,
            device,
            shutdown,
            thread,
        }
    }

    fn vscsi(&self, args: &[&str], stdin: &[u8]) -> Output {
        run(Some(&self.path), args, stdin, &[])
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        if let Some(t) = self.thread.take() {
            t.join().unwrap().unwrap();
        }
    }
}

fn run(socket: Option<&Path>, args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vscsi"));
    if let Some(s) = socket {
        cmd.arg("--socket").arg(s);
    }
    cmd.args(args)
        .env_remove("VSCSI_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let feeder = thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(seed as u32) as u8
        })
        .collect()
}

#[test]
fn ls_and_stat() {
    let f = Fixture::new();
    let o = f.vscsi(&["ls"], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let head: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        head,
        ["DISK", "SIZE", "BLOCK", "VENDOR/PRODUCT", "LUN"],
        "{out}"
    );
    let l0: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        l0,
        [
            "disk.virtio-scsi:/0",
            "48.0",
            "MiB",
            "512",
            "QEMU",
            "QEMU",
            "HARDDISK",
            "0:3"
        ],
        "{out}"
    );
    let l1: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        l1,
        ["disk.virtio-scsi:/1", "1.0", "MiB", "4096", "-", "-"],
        "{out}"
    );
    // The columns line up: every row's LUN starts where the header's does.
    let col = lines[0].find("LUN").unwrap();
    assert_eq!(lines[1].find("0:3"), Some(col), "{out}");
    assert_eq!(lines[2].rfind('-'), Some(col), "{out}");

    let o = f.vscsi(&["ls", "--json"], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[0]["vendor"], "QEMU");
    assert_eq!(v[0]["product"], "QEMU HARDDISK");
    assert_eq!(v[0]["serial"], "SER-0");
    assert_eq!(v[0]["wwn"], "0x5000c500a1b2c3d4");
    assert_eq!(
        (v[0]["target"].as_u64(), v[0]["lun"].as_u64()),
        (Some(0), Some(3))
    );
    assert_eq!(v[0]["can_discard"], true);
    assert!(v[1]["vendor"].is_null() && v[1]["lun"].is_null(), "{v}");
    assert_eq!(v[1]["can_discard"], false);

    let o = f.vscsi(&["stat", "/0"], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for line in [
        "vendor:     QEMU\n",
        "product:    QEMU HARDDISK\n",
        "revision:   2.5+\n",
        "serial:     SER-0\n",
        "wwn:        0x5000c500a1b2c3d4\n",
        "target/lun: 0:3\n",
        "discard:    yes\n",
    ] {
        assert!(out.contains(line), "{line:?} in:\n{out}");
    }
    let o = f.vscsi(&["stat", "/0", "--json"], b"");
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        (v["serial"].as_str(), v["lun"].as_u64()),
        (Some("SER-0"), Some(3))
    );

    let o = f.vscsi(&["stat", "disk.virtio-scsi:/1"], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("path:       disk.virtio-scsi:1"), "{out}");
    assert!(out.contains("size:       1048576 (1.0 MiB)"), "{out}");
    assert!(out.contains("block size: 4096"), "{out}");
    assert!(out.contains("blocks:     256"), "{out}");
    assert!(out.contains("mode:       100644"), "{out}");
    assert!(
        !out.contains("vendor:"),
        "no identity, no identity lines: {out}"
    );
    assert!(out.contains("discard:    no\n"), "{out}");
    // --socket may also follow the subcommand.
    let o = run(
        None,
        &["stat", "/0", "--socket", f.path.to_str().unwrap()],
        b"",
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn write_then_read_binary_and_large() {
    let f = Fixture::new();
    // 20 MiB + a bit: several stream chunks, unaligned offset, every byte value.
    let payload = data((20 << 20) + 777, 3);
    let o = f.vscsi(
        &["write", "disk.virtio-scsi:/0", "--offset", "0x3001"],
        &payload,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout.is_empty(), "stdout stays clean");
    {
        let d = f.device.disks[0].1.read().unwrap();
        assert!(d[0x3001..0x3001 + payload.len()] == payload[..]);
        assert!(d[..0x3001].iter().all(|&b| b == 0));
    }
    let len = payload.len().to_string();
    let o = f.vscsi(
        &[
            "read",
            "disk.virtio-scsi:/0",
            "--offset",
            "12289",
            "--length",
            &len,
        ],
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout == payload);

    // Suffixes, in-scheme path, small read.
    let o = f.vscsi(&["read", "/0", "--offset", "4K", "--length", "0x10"], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let d = f.device.disks[0].1.read().unwrap();
    assert_eq!(o.stdout, &d[4096..4112]);
    drop(d);

    let o = f.vscsi(&["sync", "disk.virtio-scsi:/0"], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout.is_empty());

    // Empty stdin writes nothing and succeeds.
    let o = f.vscsi(&["write", "/1", "--offset", "0"], b"");
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn errors_are_one_clear_line() {
    let f = Fixture::new();
    let o = f.vscsi(
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
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "vscsi: read disk.virtio-scsi:/7: No such file or directory (ENOENT)\n"
    );
    assert!(o.stdout.is_empty());

    let o = f.vscsi(&["stat", "disk.other:/0"], b"");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "vscsi: stat disk.other:/0: No such device (ENODEV)\n"
    );

    // Past the end: the bytes that exist, then an error.
    let o = f.vscsi(
        &["read", "/1", "--offset", "1048000", "--length", "1000"],
        b"",
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(o.stdout.len(), 576);
    let e = stderr(&o);
    assert!(
        e.starts_with("vscsi: read /1: unexpected end of device"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1);

    // Writing past the end.
    let o = f.vscsi(&["write", "/1", "--offset", "1M"], b"abc");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "vscsi: write /1: No space left on device (ENOSPC)\n"
    );
    let o = f.vscsi(&["write", "/1", "--offset", "1048575"], b"abc");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("vscsi: write /1: short write: wrote 1 of 3 bytes"),
        "{}",
        stderr(&o)
    );

    // Bad usage: clap's exit status 2.
    for args in [
        &["read", "/0", "--offset", "zz", "--length", "1"][..],
        &["read", "/0"][..],
        &["frobnicate"][..],
        &[][..],
    ] {
        let o = f.vscsi(args, b"");
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn socket_from_environment_and_connect_errors() {
    let f = Fixture::new();
    let o = run(
        None,
        &["ls"],
        b"",
        &[("VSCSI_SOCKET", f.path.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("disk.virtio-scsi:/1"));

    let missing = f.path.with_file_name("missing.sock");
    let o = run(Some(&missing), &["ls"], b"", &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.starts_with(&format!(
            "vscsi: cannot connect to virtio-scsid at {}",
            missing.display()
        )),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1);
}

#[test]
fn discard_whole_blocks_and_clear_errors() {
    let f = Fixture::new();
    let before = f.device.disks[0].1.read().unwrap().clone();
    let o = f.vscsi(&["discard", "/0", "--offset", "1M", "--length", "64K"], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout.is_empty() && o.stderr.is_empty());
    {
        let d = f.device.disks[0].1.read().unwrap();
        let (a, b) = (1 << 20, (1 << 20) + (64 << 10));
        assert!(
            d[a..b].iter().all(|&x| x == 0xDD),
            "the range was discarded"
        );
        assert!(
            d[..a] == before[..a] && d[b..] == before[b..],
            "nothing else"
        );
    }
    // Unaligned: EINVAL, with the block size in the message; nothing changes.
    let o = f.vscsi(&["discard", "/0", "--offset", "100", "--length", "4K"], b"");
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.starts_with("vscsi: discard /0: Invalid argument (EINVAL): offset and length must be multiples of the 512-byte block size"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1);
    // Past the end.
    let o = f.vscsi(
        &["discard", "/0", "--offset", "48M", "--length", "512"],
        b"",
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    // A disk that cannot discard.
    let before1 = f.device.disks[1].1.read().unwrap().clone();
    let o = f.vscsi(&["discard", "/1", "--offset", "0", "--length", "4096"], b"");
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.starts_with("vscsi: discard /1: ")
            && e.ends_with("(EOPNOTSUPP): this disk cannot discard\n")
            && e.lines().count() == 1,
        "{e}"
    );
    assert!(*f.device.disks[1].1.read().unwrap() == before1);
    // Missing arguments are usage errors.
    let o = f.vscsi(&["discard", "/0", "--offset", "0"], b"");
    assert_eq!(o.status.code(), Some(2));
}
