//! Harness for the QEMU-run tests: finds the workspace's binaries (built beforehand by
//! `scripts/test.sh`), starts a `virtio-scsid` (which starts its own QEMU) in a private temp
//! dir with its own socket, and guarantees both processes are killed by pid when the test ends,
//! passes or panics. [`guest`] is the other harness: a Linux guest booted under QEMU with our
//! statically linked binaries inside (it builds those itself).
//!
//! The oracle is always the image file on the host: tests compare bytes read through the
//! driver with the file, and the other way round.

pub mod guest;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a daemon may take to print `ready` (TCG start-up plus the bus scan).
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Path of a binary built from this workspace (`cargo build --workspace --bins` first; the
/// README's test command does that).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` before the tests (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A disk for a test daemon.
#[derive(Clone, Debug)]
pub struct TestDisk {
    /// Image path.
    pub path: PathBuf,
    /// Logical block size (None = QEMU's default 512).
    pub block_size: Option<u32>,
    /// Attach read-only.
    pub readonly: bool,
}

impl TestDisk {
    /// Creates an image of `size` bytes filled with a deterministic pattern derived from `seed`
    /// (so tests can tell "old" bytes from zeroes), in `dir`.
    pub fn create(dir: &Path, name: &str, size: u64, seed: u64) -> TestDisk {
        let path = dir.join(name);
        let f = File::create(&path).expect("create image");
        let mut at = 0u64;
        let mut rng = Rng::new(seed);
        let mut chunk = vec![0u8; 1 << 20];
        while at < size {
            let n = chunk.len().min((size - at) as usize);
            rng.fill(&mut chunk[..n]);
            f.write_all_at(&chunk[..n], at).expect("fill image");
            at += n as u64;
        }
        TestDisk {
            path,
            block_size: None,
            readonly: false,
        }
    }

    /// With this logical block size.
    pub fn block_size(mut self, bs: u32) -> Self {
        self.block_size = Some(bs);
        self
    }

    /// Read-only.
    pub fn readonly(mut self) -> Self {
        self.readonly = true;
        self
    }

    /// The `--disk` argument.
    pub fn arg(&self) -> String {
        let mut s = self.path.display().to_string().replace(',', ",,");
        if let Some(bs) = self.block_size {
            s.push_str(&format!(",block-size={bs}"));
        }
        if self.readonly {
            s.push_str(",readonly");
        }
        s
    }

    /// The `--disk-qemu` argument for this image (raw, its block size and read-only state),
    /// with `extra` QEMU options appended: `-drive` options such as `discard=unmap`, or
    /// `device.NAME=VALUE` properties of its `scsi-hd` (`device.serial=S1`).
    pub fn qemu_arg(&self, extra: &str) -> String {
        let mut s = format!(
            "file={},format=raw",
            self.path.display().to_string().replace(',', ",,")
        );
        if let Some(bs) = self.block_size {
            s.push_str(&format!(
                ",device.logical_block_size={bs},device.physical_block_size={bs}"
            ));
        }
        if self.readonly {
            s.push_str(",readonly=on");
        }
        if !extra.is_empty() {
            s.push(',');
            s.push_str(extra);
        }
        s
    }

    /// Bytes of the image file allocated on the host (`st_blocks` in bytes): a discard that
    /// reached the file as a hole makes it smaller.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).expect("stat image").blocks() * 512
    }

    /// The next hole of the image file at or after `offset` (`SEEK_HOLE`; the file's end
    /// counts as a hole).
    pub fn next_hole(&self, offset: u64) -> u64 {
        self.seek(offset, libc::SEEK_HOLE)
            .expect("SEEK_HOLE before the end of the file")
    }

    /// The next data of the image file at or after `offset` (`SEEK_DATA`), or `None` when only
    /// a hole follows.
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        self.seek(offset, libc::SEEK_DATA)
    }

    /// lseek(2) with `whence`; `None` for `ENXIO` (nothing of that kind after `offset`).
    fn seek(&self, offset: u64, whence: i32) -> Option<u64> {
        use std::os::fd::AsRawFd;
        let f = File::open(&self.path).expect("open image");
        let off = libc::off_t::try_from(offset).expect("offset fits off_t");
        // SAFETY: lseek(2) on a descriptor that stays open for the duration of the call.
        let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::ENXIO), "lseek: {e}");
            return None;
        }
        u64::try_from(r).ok()
    }

    /// Reads `len` bytes of the image at `offset`, straight from the host file.
    pub fn read_image(&self, offset: u64, len: usize) -> Vec<u8> {
        let f = File::open(&self.path).expect("open image");
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).expect("read image");
        buf
    }

    /// Writes bytes into the image at `offset`, straight into the host file.
    pub fn write_image(&self, offset: u64, data: &[u8]) {
        let f = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .expect("open image");
        f.write_all_at(data, offset).expect("write image");
        f.sync_data().expect("sync image");
    }
}

/// A running daemon with its QEMU. Dropping it kills both by pid.
pub struct Daemon {
    child: Option<Child>,
    qemu_pid: Option<i32>,
    qmp: Option<PathBuf>,
    /// The socket it serves on.
    pub socket: PathBuf,
    /// Everything it printed (stdout and stderr).
    pub output: Arc<Mutex<String>>,
}

/// Builder for a test daemon.
pub struct DaemonBuilder {
    args: Vec<String>,
    socket: PathBuf,
    envs: Vec<(String, String)>,
    own_group: bool,
}

impl DaemonBuilder {
    /// A daemon whose socket and state live in `dir`.
    pub fn new(dir: &Path) -> Self {
        DaemonBuilder {
            args: vec![
                "--state-dir".into(),
                dir.join("state").display().to_string(),
            ],
            socket: dir.join("vscsid.sock"),
            envs: Vec::new(),
            own_group: false,
        }
    }

    /// Starts the daemon in a process group of its own (its pid is the group id), as a shell
    /// does for a foreground job, so a test can signal the whole group like a Ctrl-C does.
    pub fn own_process_group(mut self) -> Self {
        self.own_group = true;
        self
    }

    /// Adds a disk.
    pub fn disk(mut self, d: &TestDisk) -> Self {
        self.args.push("--disk".into());
        self.args.push(d.arg());
        self
    }

    /// Adds a disk given as QEMU drive options (`--disk-qemu`, see [`TestDisk::qemu_arg`]).
    /// Disks given this way come after every [`DaemonBuilder::disk`] in the disk numbering.
    pub fn disk_qemu(mut self, options: &str) -> Self {
        self.args.push("--disk-qemu".into());
        self.args.push(options.into());
        self
    }

    /// Adds raw arguments.
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.into());
        self
    }

    /// Sets an environment variable for the daemon.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }

    /// Starts it and waits for `ready`.
    pub fn start(self) -> Daemon {
        let mut cmd = Command::new(bin("virtio-scsid"));
        cmd.args(&self.args)
            .arg("--socket")
            .arg(&self.socket)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        if self.own_group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        // CI may lack KVM: VSCSI_TEST_ACCEL=tcg forces the machine every test starts.
        if let Ok(accel) = std::env::var("VSCSI_TEST_ACCEL") {
            cmd.arg("--accel").arg(accel);
        }
        let mut child = cmd.spawn().expect("spawn virtio-scsid");
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for stream in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
            let output = output.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    output
                        .lock()
                        .map(|mut o| {
                            o.push_str(&line);
                            o.push('\n');
                        })
                        .ok();
                    let _ = tx.send(line);
                }
            });
        }
        drop(tx);
        let mut daemon = Daemon {
            child: Some(child),
            qemu_pid: None,
            qmp: None,
            socket: self.socket,
            output,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(qmp) = line.split("(QMP ").nth(1).and_then(|r| r.strip_suffix(')'))
                    {
                        daemon.qmp = Some(PathBuf::from(qmp));
                    }
                    if let Some(pid) = line
                        .split("QEMU pid ")
                        .nth(1)
                        .and_then(|r| r.split_whitespace().next())
                        .and_then(|p| p.parse().ok())
                    {
                        daemon.qemu_pid = Some(pid);
                    }
                    if line.starts_with("virtio-scsid: ready") {
                        break;
                    }
                }
                Err(_) => panic!(
                    "virtio-scsid did not become ready:\n{}",
                    daemon.output.lock().map(|o| o.clone()).unwrap_or_default()
                ),
            }
        }
        // Drain the rest of the output in the background.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        daemon
    }
}

impl Daemon {
    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// QEMU's pid, as the daemon reported it.
    pub fn qemu_pid(&self) -> Option<i32> {
        self.qemu_pid
    }

    /// Runs one QMP command on the daemon's QEMU (a fresh connection each time) and returns
    /// its `return` value, or the error's description as `Err`.
    pub fn qmp(
        &self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        use std::io::Write;
        let path = self
            .qmp
            .as_ref()
            .ok_or("the daemon did not report its QMP socket")?;
        let stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut lines = BufReader::new(stream).lines();
        let mut next = || -> Result<serde_json::Value, String> {
            loop {
                let line = lines
                    .next()
                    .ok_or("QMP closed")?
                    .map_err(|e| e.to_string())?;
                let v: serde_json::Value =
                    serde_json::from_str(&line).map_err(|e| e.to_string())?;
                if v.get("event").is_none() {
                    return Ok(v);
                }
            }
        };
        next()?; // greeting
        for (cmd, args) in [
            ("qmp_capabilities", serde_json::json!({})),
            (command, arguments),
        ] {
            let req = serde_json::json!({ "execute": cmd, "arguments": args });
            writeln!(writer, "{req}").map_err(|e| e.to_string())?;
            let reply = next()?;
            if let Some(err) = reply.get("error") {
                return Err(err.to_string());
            }
            if cmd == command {
                return Ok(reply.get("return").cloned().unwrap_or_default());
            }
        }
        Err("unreachable".into())
    }

    /// A client connected to this daemon.
    pub fn client(&self) -> vscsi_ipc::Client {
        vscsi_ipc::Client::connect(&self.socket).expect("connect to daemon")
    }

    /// Sends `signal` and waits (bounded) for the daemon to exit.
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> ExitStatus {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        unsafe { libc::kill(self.pid(), signal) };
        self.wait(timeout)
    }

    /// Waits (bounded) for the daemon to exit.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("daemon running");
        loop {
            if let Some(status) = child.try_wait().expect("wait for daemon") {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "virtio-scsid did not exit within {timeout:?}:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the daemon printed so far.
    pub fn output(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// One counter of QEMU's `query-blockstats` for the disk whose drive is `d{disk}` (the
    /// daemon names QEMU's drives `d0`, `d1`, ... in disk order), e.g. `wr_operations` or
    /// `unmap_bytes`.
    pub fn block_stat(&self, disk: usize, counter: &str) -> u64 {
        let stats = self
            .qmp("query-blockstats", serde_json::json!({}))
            .expect("query-blockstats");
        let name = format!("d{disk}");
        stats
            .as_array()
            .and_then(|a| a.iter().find(|d| d["device"] == name.as_str()))
            .and_then(|d| d["stats"][counter].as_u64())
            .unwrap_or_else(|| panic!("no {counter} for drive {name} in {stats}"))
    }

    /// Runs the `vscsi` CLI against this daemon.
    pub fn vscsi(&self, args: &[&str], stdin: &[u8]) -> std::process::Output {
        use std::io::Write;
        let mut child = Command::new(bin("vscsi"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vscsi");
        let mut input = child.stdin.take().expect("stdin");
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let out = child.wait_with_output().expect("vscsi output");
        let _ = writer.join();
        out
    }

    /// Runs `vscsi args...` with `stdin` and insists that it succeeds; returns its stdout.
    pub fn vscsi_ok(&self, args: &[&str], stdin: &[u8]) -> String {
        let o = self.vscsi(args, stdin);
        assert!(
            o.status.success(),
            "vscsi {args:?} failed: {}\ndaemon:\n{}",
            show_output(&o),
            self.output()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs `vscsi args...`, which must fail with status 1 and exactly one line on stderr;
    /// returns what it printed.
    pub fn vscsi_fails(&self, args: &[&str]) -> std::process::Output {
        let o = self.vscsi(args, b"");
        assert_eq!(
            o.status.code(),
            Some(1),
            "vscsi {args:?}: {}",
            show_output(&o)
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            err.lines().count(),
            1,
            "one error line: {}",
            show_output(&o)
        );
        o
    }
}

/// A finished command's status, stdout and stderr, for assertion messages.
pub fn show_output(o: &std::process::Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = self.qemu_pid {
            // SAFETY: kill(2) on QEMU's pid; if it already exited and the pid was reused the
            // worst case is a signal to an unrelated process of ours, which the pid check in
            // is_qemu rules out.
            if is_qemu(pid) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Whether `pid` is a live QEMU process.
pub fn is_qemu(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().starts_with("qemu"))
        .unwrap_or(false)
}

/// A small deterministic PRNG (xorshift64*), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Fills `buf`.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// Runs a partitioning tool (`sgdisk`, `sfdisk`; `scripts/install-deps.sh`, which the test
/// command runs first, installs them) with `args` and `stdin`, and returns its stdout. Panics
/// with the tool's output if it is missing or fails: tests that need it never skip.
pub fn run_tool(program: &str, args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    // The tools live in /usr/sbin, which a non-root PATH may lack.
    let path = std::env::var("PATH").unwrap_or_default();
    let mut child = Command::new(program)
        .args(args)
        .env("PATH", format!("{path}:/usr/sbin:/sbin"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}): run scripts/install-deps.sh (gdisk, fdisk)")
        });
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).expect("tool stdin");
    }
    let out = child.wait_with_output().expect("tool output");
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
