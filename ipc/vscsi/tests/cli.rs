//! End to end: the built `vscsi` binary against a server with an in-memory device.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, RwLock};
use std::thread;

use block_scheme::{BlockDevice, DiskInfo, DiskScheme};
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
    assert!(lines[0].starts_with("DISK"));
    let l0: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(&l0[..3], &["disk.virtio-scsi:/0", "50331648", "512"]);
    let l1: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(&l1[..3], &["disk.virtio-scsi:/1", "1048576", "4096"]);

    let o = f.vscsi(&["stat", "disk.virtio-scsi:/1"], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("path:       disk.virtio-scsi:1"), "{out}");
    assert!(out.contains("size:       1048576 (1.0 MiB)"), "{out}");
    assert!(out.contains("block size: 4096"), "{out}");
    assert!(out.contains("blocks:     256"), "{out}");
    assert!(out.contains("mode:       100644"), "{out}");
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
