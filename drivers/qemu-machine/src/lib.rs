//! A QEMU machine as a driver platform: [`QemuMachine`] launches and owns one
//! `qemu-system-x86_64` (q35, a halting firmware, a virtio-scsi-pci device with `scsi-hd`
//! disks) and implements [`platform::Platform`] over it:
//! - PCI configuration, MMIO and port I/O go through QEMU's qtest socket (`qtest.rs`);
//! - DMA memory is guest RAM itself, a shared file mapped into this process (`shm.rs`), so
//!   guest-physical address `X` is at `ram + X` and the device reads and writes it directly;
//! - the device's INTx line is intercepted at the ioapic and reported as `IRQ raise/lower`
//!   lines on the qtest socket;
//! - QMP (`qmp.rs`) is there for hotplug, reset and quit.
//!
//! The machine owns the QEMU process: dropping the last `Arc` kills and reaps it, and QEMU is
//! started with a parent-death signal so that it also dies with this process.
//! See `/work/shared/DESIGN.md` §2 for the facts this is built on.

mod config;
mod launch;
mod qmp;
mod qtest;
mod shm;

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use platform::{
    DmaWindow, IrqWait, MmioWindow, PciAddress, Platform, PlatformError, Result, SharedWindow,
    Width,
};
use serde_json::Value;

pub use config::{Accel, DiskFormat, DiskSpec, MachineConfig};
pub use qmp::QmpError;

use launch::LaunchPaths;
use qtest::{Qtest, Shared, lock, width_suffix};
use shm::RamMapping;

/// Guest-physical (and device) address where the DMA window starts. The first megabyte is not
/// plain RAM on q35: 0xA0000..0xC0000 is the VGA/SMRAM window and 0xC0000..0x100000 holds the
/// option-ROM and BIOS shadows (PAM), where device writes would not land in the RAM file.
pub const DMA_BASE: u64 = 0x10_0000;

/// Start of the window where the driver may place memory BARs.
///
/// q35 with at most 0xB000_0000 bytes of RAM below 4 GiB (see `MAX_RAM_MIB`; QEMU moves the
/// rest above 4 GiB) leaves 0xB000_0000..0xFEC0_0000 to PCI, of which 0xB000_0000..0xC000_0000
/// is MMCONFIG (PCIEXBAR, 256 MiB, once a firmware enables it). 0xFEC0_0000 and up are the
/// ioapic, HPET, LAPIC/MSI and the BIOS. So 0xC000_0000..0xD000_0000 collides with nothing;
/// `info mtree` on this machine shows only our BAR there.
pub const MMIO_BASE: u64 = 0xC000_0000;
/// Length of the BAR window (256 MiB).
pub const MMIO_LEN: u64 = 0x1000_0000;

/// How long QEMU may take to connect to the qtest socket.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a qtest command may take to be answered.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `shutdown` waits for `quit` (and then for QEMU to exit) before SIGKILL.
const QUIT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the reader waits for QEMU's exit status after the socket closed.
const EXIT_GRACE: Duration = Duration::from_millis(500);
/// Lines of QEMU's log quoted in errors.
const LOG_TAIL_LINES: usize = 20;

/// The ioapic input (GSI) of INTx `pin` (0 = INTA) of a device in `slot` on q35's bus 0.
///
/// ICH9 routes INTA..INTD of slots 0..24 to PIRQ E..H by `(slot + pin) % 4`, and PIRQ A..H are
/// ioapic inputs 16..23. Verified on QEMU 7.2 (TCG and KVM): slot 1 → 21, 2 → 22, 3 → 23,
/// 5 → 21.
const fn intx_gsi(slot: u8, pin: u8) -> u8 {
    16 + 4 + (slot + pin) % 4
}

/// Why a machine could not be launched, or a management command failed.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The QEMU binary is not installed (or not where the configuration says).
    #[error(
        "QEMU binary `{}` not found: install it with `apt-get install qemu-system-x86` \
         (or set MachineConfig::qemu_binary)",
        .0.display()
    )]
    QemuNotFound(PathBuf),
    /// The configuration cannot work.
    #[error("invalid machine configuration: {0}")]
    InvalidConfig(String),
    /// The work directory is missing or unusable.
    #[error("work directory {}: {source}", path.display())]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// A file or socket could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// QEMU started but did not come up (it exited, or did not connect, or refused setup).
    #[error("QEMU failed to start: {reason}\n--- last lines of {} ---\n{log_tail}", log.display())]
    LaunchFailed {
        /// What happened.
        reason: String,
        /// QEMU's log file.
        log: PathBuf,
        /// Its last lines.
        log_tail: String,
    },
    /// A QMP command failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The machine is gone (or another platform error).
    #[error(transparent)]
    Platform(#[from] PlatformError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> MachineError {
    move |source| MachineError::Io {
        what: what.into(),
        source,
    }
}

/// The QEMU child process.
struct Process {
    pid: u32,
    child: Mutex<Child>,
    log_path: PathBuf,
}

impl Process {
    fn try_status(&self) -> Option<ExitStatus> {
        lock(&self.child).try_wait().ok().flatten()
    }

    /// Polls for the exit status for up to `timeout` (used only on the way out).
    fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL (unless it already exited) and reap.
    fn kill_and_reap(&self) {
        let mut child = lock(&self.child);
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        if let Err(e) = child.kill() {
            log::warn!("killing QEMU (pid {}): {e}", self.pid);
        }
        if let Err(e) = child.wait() {
            log::warn!("reaping QEMU (pid {}): {e}", self.pid);
        }
    }

    fn log_tail(&self) -> String {
        launch::log_tail(&self.log_path, LOG_TAIL_LINES)
    }

    /// The "gone" reason: what ended the connection, QEMU's exit status and log tail.
    fn describe_end(&self, cause: &str) -> String {
        let status = match self.wait_exit(EXIT_GRACE) {
            Some(s) => format!("QEMU (pid {}) exited: {s}", self.pid),
            None => format!("QEMU (pid {}) is still running", self.pid),
        };
        format!(
            "{cause}; {status}\n--- last lines of {} ---\n{}",
            self.log_path.display(),
            self.log_tail()
        )
    }
}

/// What the machine thread hands back once QEMU is connected.
type Connected = std::result::Result<(Arc<Process>, UnixStream), MachineError>;

/// Everything the machine thread needs to start QEMU.
struct Spawn {
    binary: PathBuf,
    args: Vec<std::ffi::OsString>,
    log: File,
    log_path: PathBuf,
    listener: UnixListener,
}

/// The machine thread: spawns QEMU (so that QEMU's parent-death signal is tied to this thread,
/// which lives exactly as long as the qtest connection), accepts its qtest connection, hands
/// it to `launch`, then reads the socket until it ends and marks the machine gone.
fn machine_thread(spawn: Spawn, shared: Arc<Shared>, tx: mpsc::SyncSender<Connected>) {
    let Spawn {
        binary,
        args,
        log,
        log_path,
        listener,
    } = spawn;
    let launch_failed = |reason: String| MachineError::LaunchFailed {
        reason,
        log: log_path.clone(),
        log_tail: launch::log_tail(&log_path, LOG_TAIL_LINES),
    };
    let stdout = match log.try_clone() {
        Ok(f) => f,
        Err(e) => {
            let _ = tx.send(Err(io_err("duplicating the log file")(e)));
            return;
        }
    };
    let mut cmd = Command::new(&binary);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(log)
        // Its own process group: a Ctrl-C in the daemon's terminal (SIGINT to the foreground
        // group) or a signal to the daemon's group must reach the daemon alone, which then
        // flushes every disk before it stops QEMU. Had QEMU received it too, it would be gone
        // before the flush. (PR_SET_PDEATHSIG below still ends QEMU with the daemon.)
        .process_group(0);
    // SAFETY: the closure runs in the forked child before exec. It only calls prctl (a plain
    // system call, async-signal-safe) and, on failure, builds an `io::Error` from errno
    // (no allocation). PR_SET_PDEATHSIG makes the kernel SIGKILL QEMU when this thread ends,
    // i.e. also when this whole process dies without running any destructor.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let _ = tx.send(Err(MachineError::QemuNotFound(binary)));
            return;
        }
        Err(e) => {
            let _ = tx.send(Err(io_err(format!("starting {}", binary.display()))(e)));
            return;
        }
    };
    let process = Arc::new(Process {
        pid: child.id(),
        child: Mutex::new(child),
        log_path: log_path.clone(),
    });

    // Accept QEMU's connection, watching for an early exit.
    let start = Instant::now();
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                process.kill_and_reap();
                let _ = tx.send(Err(launch_failed(format!(
                    "accepting QEMU's qtest connection: {e}"
                ))));
                return;
            }
        }
        if let Some(status) = process.try_status() {
            let _ = tx.send(Err(launch_failed(format!(
                "QEMU exited before connecting to the qtest socket: {status}"
            ))));
            return;
        }
        if start.elapsed() > ACCEPT_TIMEOUT {
            process.kill_and_reap();
            let _ = tx.send(Err(launch_failed(format!(
                "QEMU did not connect to the qtest socket within {ACCEPT_TIMEOUT:?}"
            ))));
            return;
        }
        thread::sleep(Duration::from_millis(2));
    };
    drop(listener);
    let reader = match stream
        .set_nonblocking(false)
        .and_then(|()| stream.try_clone())
    {
        Ok(r) => r,
        Err(e) => {
            process.kill_and_reap();
            let _ = tx.send(Err(io_err("setting up the qtest socket")(e)));
            return;
        }
    };
    if tx.send(Ok((process.clone(), stream))).is_err() {
        process.kill_and_reap();
        return;
    }
    // From here on this thread is the qtest reader. It ends when the socket ends: QEMU exited
    // or was killed (EOF arrives at once, so a dead QEMU is noticed even when the socket is
    // idle), or the machine was dropped.
    let cause = qtest::run_reader(&shared, reader);
    if shared.gone().is_none() {
        let reason = process.describe_end(&cause);
        shared.mark_gone(reason);
    }
}

/// A running QEMU machine: the [`Platform`] a driver uses, plus management (QMP, shutdown).
///
/// Created with [`QemuMachine::launch`]. Dropping the last `Arc` kills QEMU, unmaps guest RAM
/// and deletes the RAM file: a [`DmaWindow`] obtained from it must not be used after that
/// (holding the `Arc` keeps it valid).
pub struct QemuMachine {
    config: MachineConfig,
    work_dir: PathBuf,
    paths: LaunchPaths,
    log_path: PathBuf,
    process: Arc<Process>,
    qtest: Qtest,
    qmp: qmp::QmpClient,
    reader: Mutex<Option<JoinHandle<()>>>,
    irq_line: u8,
    cpu_count: usize,
    /// Shared windows plugged as `pc-dimm`s (see `alloc_shared_window`); unmapped with `ram`.
    arenas: Mutex<Vec<shm::SealedMemfd>>,
    // Last: unmapped only after QEMU is dead (fields drop in order, after `Drop::drop`).
    ram: RamMapping,
}

impl fmt::Debug for QemuMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QemuMachine")
            .field("pid", &self.process.pid)
            .field("work_dir", &self.work_dir)
            .field("ram_path", &self.ram.path())
            .field("gone", &self.qtest.shared().gone())
            .finish()
    }
}

impl QemuMachine {
    /// Launches QEMU as `config` says and connects to it. Returns once qtest works and the
    /// ioapic's inputs are intercepted.
    pub fn launch(config: MachineConfig) -> std::result::Result<Arc<QemuMachine>, MachineError> {
        config.validate().map_err(MachineError::InvalidConfig)?;
        let binary = launch::find_binary(&config.qemu_binary)
            .ok_or_else(|| MachineError::QemuNotFound(config.qemu_binary.clone()))?;
        let work_dir =
            std::path::absolute(&config.work_dir).map_err(|source| MachineError::WorkDir {
                path: config.work_dir.clone(),
                source,
            })?;
        match fs::metadata(&work_dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(MachineError::WorkDir {
                    path: work_dir,
                    source: io::Error::other("not a directory"),
                });
            }
            Err(source) => {
                return Err(MachineError::WorkDir {
                    path: work_dir,
                    source,
                });
            }
        }

        let ram_bytes = config.ram_mib as usize * (1 << 20);
        let ram = RamMapping::create(ram_bytes, &work_dir).map_err(io_err("creating guest RAM"))?;
        let paths = LaunchPaths::in_dir(&work_dir, ram.path().to_path_buf());
        for p in [&paths.qtest_socket, &paths.qmp_socket] {
            launch::check_socket_path(p).map_err(MachineError::InvalidConfig)?;
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("removing old {}", p.display()))(e)),
            }
        }
        launch::write_firmware(&paths.firmware)
            .map_err(io_err(format!("writing {}", paths.firmware.display())))?;
        let log_path = work_dir.join("qemu.log");
        let log =
            File::create(&log_path).map_err(io_err(format!("creating {}", log_path.display())))?;
        let listener = UnixListener::bind(&paths.qtest_socket).map_err(io_err(format!(
            "listening on {}",
            paths.qtest_socket.display()
        )))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("setting up the qtest listener"))?;

        let accel = launch::accel_args(config.accel, launch::kvm_usable());
        let args = launch::qemu_args(&config, &paths, &accel);
        log::info!(
            "launching {} {}",
            binary.display(),
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );

        let shared = Shared::new();
        let (tx, rx) = mpsc::sync_channel(1);
        let spawn = Spawn {
            binary,
            args,
            log,
            log_path: log_path.clone(),
            listener,
        };
        let thread_shared = shared.clone();
        let handle = thread::Builder::new()
            .name("qemu-machine".into())
            .spawn(move || machine_thread(spawn, thread_shared, tx))
            .map_err(io_err("starting the machine thread"))?;
        let (process, stream) = match rx.recv() {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                let _ = handle.join();
                let _ = fs::remove_file(&paths.qtest_socket);
                return Err(e);
            }
            Err(_) => {
                let _ = handle.join();
                return Err(MachineError::LaunchFailed {
                    reason: "the machine thread ended unexpectedly".into(),
                    log_tail: launch::log_tail(&log_path, LOG_TAIL_LINES),
                    log: log_path,
                });
            }
        };

        // From here on, dropping `machine` kills QEMU and cleans up.
        let machine = QemuMachine {
            qmp: qmp::QmpClient::new(paths.qmp_socket.clone()),
            qtest: Qtest::new(stream, shared, ANSWER_TIMEOUT),
            config,
            work_dir,
            paths,
            log_path,
            process,
            reader: Mutex::new(Some(handle)),
            irq_line: intx_gsi(launch::VIRTIO_SCSI_SLOT, 0),
            cpu_count: thread::available_parallelism().map_or(1, |n| n.get()),
            arenas: Mutex::new(Vec::new()),
            ram,
        };
        // "ioapic" is resolved by QOM partial path (it is /machine/q35/ioapic, or kvm-ioapic's
        // object under KVM); both work with irq_intercept_in on QEMU 7.2.
        if let Err(e) = machine
            .qtest
            .command(format_args!("irq_intercept_in ioapic"))
        {
            // A Gone reason already quotes QEMU's log.
            let log_tail = match e {
                PlatformError::Gone(_) => "(see above)".to_string(),
                _ => machine.process.log_tail(),
            };
            return Err(MachineError::LaunchFailed {
                reason: format!("`irq_intercept_in ioapic` failed: {e}"),
                log: machine.log_path.clone(),
                log_tail,
            });
        }
        log::info!(
            "QEMU machine up: pid {}, RAM {} ({} MiB), INTx on ioapic input {}",
            machine.process.pid,
            machine.ram.path().display(),
            machine.config.ram_mib,
            machine.irq_line
        );
        Ok(Arc::new(machine))
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid
    }

    /// The configuration the machine was launched with.
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// The work directory (absolute).
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// The guest RAM file (deleted when the machine is dropped).
    pub fn ram_path(&self) -> &Path {
        self.ram.path()
    }

    /// QEMU's log (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> &Path {
        &self.paths.qmp_socket
    }

    /// QEMU's exit status, once it has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.process.try_status()
    }

    /// The ioapic input the virtio-scsi device's INTx is wired to (21 for 00:01.0).
    pub fn irq_line(&self) -> u8 {
        self.irq_line
    }

    /// Whether that line is asserted now (as last reported by QEMU).
    pub fn irq_asserted(&self) -> bool {
        self.qtest.shared().irq_level(self.irq_line)
    }

    /// Executes a QMP command (`arguments` may be `Value::Null`) and returns its `return`
    /// value. Fails with `Platform(Gone)` once the machine is gone.
    pub fn qmp(&self, command: &str, arguments: Value) -> std::result::Result<Value, MachineError> {
        if let Some(reason) = self.qtest.shared().gone() {
            return Err(PlatformError::Gone(reason).into());
        }
        Ok(self.qmp.execute(command, arguments, QMP_TIMEOUT)?)
    }

    /// Sends one raw qtest command line and returns what followed `OK` in the answer
    /// (e.g. `"0x0000000000000001"`). For tests and debugging.
    pub fn qtest_command(&self, line: &str) -> Result<String> {
        if line.contains(['\n', '\r']) {
            return Err(PlatformError::Invalid(
                "a qtest command is one line".to_string(),
            ));
        }
        self.qtest.command(format_args!("{line}"))
    }

    /// Reads guest-physical memory through QEMU (any address: RAM, ROM or device). Unlike
    /// [`Platform::mmio_read`] this is not limited to the MMIO window.
    pub fn mem_read(&self, addr: u64, width: Width) -> Result<u64> {
        let s = width_suffix(width);
        self.qtest.command_value(format_args!("read{s} 0x{addr:x}"))
    }

    /// Writes guest-physical memory through QEMU (any address) and waits for it.
    pub fn mem_write(&self, addr: u64, width: Width, value: u64) -> Result<()> {
        check_value(width, value)?;
        let s = width_suffix(width);
        self.qtest
            .command(format_args!("write{s} 0x{addr:x} 0x{value:x}"))
            .map(drop)
    }

    /// Stops the machine: QMP `quit`, then SIGKILL if QEMU is still alive after a short wait,
    /// and reap. Every later platform call fails with `Gone`.
    pub fn shutdown(&self) {
        self.qtest
            .shared()
            .mark_gone("the machine was shut down".to_string());
        if let Err(e) = self.qmp.execute("quit", Value::Null, QUIT_TIMEOUT) {
            // QEMU may close the socket before answering; that is fine.
            log::debug!("QMP quit: {e}");
        }
        self.qmp.disconnect();
        if self.process.wait_exit(QUIT_TIMEOUT).is_none() {
            log::warn!(
                "QEMU (pid {}) did not quit within {QUIT_TIMEOUT:?}; killing it",
                self.process.pid
            );
        }
        self.process.kill_and_reap();
    }

    fn check_mmio(addr: u64, width: Width) -> Result<()> {
        let n = width.bytes() as u64;
        if !addr.is_multiple_of(n) {
            return Err(PlatformError::Invalid(format!(
                "MMIO address {addr:#x} is not aligned to {n} bytes"
            )));
        }
        let end = addr.checked_add(n);
        if addr < MMIO_BASE || end.is_none_or(|e| e > MMIO_BASE + MMIO_LEN) {
            return Err(PlatformError::Invalid(format!(
                "MMIO address {addr:#x} is outside the MMIO window {MMIO_BASE:#x}+{MMIO_LEN:#x}"
            )));
        }
        Ok(())
    }

    fn check_port(port: u16, width: Width) -> Result<char> {
        if width == Width::U64 {
            return Err(PlatformError::Invalid(
                "port I/O is at most 32 bits wide".to_string(),
            ));
        }
        if u32::from(port) + width.bytes() as u32 > 0x1_0000 {
            return Err(PlatformError::Invalid(format!(
                "port {port:#x} + {} bytes is beyond 0xffff",
                width.bytes()
            )));
        }
        Ok(width_suffix(width))
    }
}

/// Rejects a value that does not fit in `width`.
fn check_value(width: Width, value: u64) -> Result<()> {
    let bits = width.bytes() * 8;
    if bits < 64 && value >> bits != 0 {
        return Err(PlatformError::Invalid(format!(
            "value {value:#x} does not fit in {bits} bits"
        )));
    }
    Ok(())
}

/// Checks that a value QEMU returned fits in `width`.
fn check_answer(width: Width, value: u64) -> Result<u64> {
    check_value(width, value).map(|()| value).map_err(|_| {
        PlatformError::Protocol(format!("QEMU returned {value:#x} for a {width:?} read"))
    })
}

/// The CONFIG_ADDRESS (0xCF8) value for a dword of `dev`'s configuration space.
fn config_address(dev: PciAddress, offset: u8) -> Result<u32> {
    if dev.device >= 32 || dev.function >= 8 {
        return Err(PlatformError::Invalid(format!(
            "no such PCI function {dev}"
        )));
    }
    if !offset.is_multiple_of(4) {
        return Err(PlatformError::Invalid(format!(
            "PCI config offset {offset:#x} is not dword-aligned"
        )));
    }
    Ok(0x8000_0000
        | u32::from(dev.bus) << 16
        | u32::from(dev.device) << 11
        | u32::from(dev.function) << 8
        | u32::from(offset & 0xFC))
}

impl Platform for QemuMachine {
    fn pci_read32(&self, dev: PciAddress, offset: u8) -> Result<u32> {
        let addr = config_address(dev, offset)?;
        // Both lines go out in one send under the writer lock: no other thread's 0xCF8 write
        // can come between them.
        let (_, value) = self.qtest.command_pair(
            format_args!("outl 0xcf8 0x{addr:x}"),
            format_args!("inl 0xcfc"),
        )?;
        let value = qtest::parse_hex(&value)
            .ok_or_else(|| PlatformError::Protocol(format!("bad `inl 0xcfc` answer `{value}`")))?;
        Ok(check_answer(Width::U32, value)? as u32)
    }

    fn pci_write32(&self, dev: PciAddress, offset: u8, value: u32) -> Result<()> {
        let addr = config_address(dev, offset)?;
        self.qtest
            .command_pair(
                format_args!("outl 0xcf8 0x{addr:x}"),
                format_args!("outl 0xcfc 0x{value:x}"),
            )
            .map(drop)
    }

    fn mmio_read(&self, addr: u64, width: Width) -> Result<u64> {
        Self::check_mmio(addr, width)?;
        let s = width_suffix(width);
        let value = self
            .qtest
            .command_value(format_args!("read{s} 0x{addr:x}"))?;
        check_answer(width, value)
    }

    fn mmio_write(&self, addr: u64, width: Width, value: u64) -> Result<()> {
        Self::check_mmio(addr, width)?;
        check_value(width, value)?;
        let s = width_suffix(width);
        self.qtest
            .command(format_args!("write{s} 0x{addr:x} 0x{value:x}"))
            .map(drop)
    }

    fn mmio_write_posted(&self, addr: u64, width: Width, value: u64) -> Result<()> {
        Self::check_mmio(addr, width)?;
        check_value(width, value)?;
        let s = width_suffix(width);
        self.qtest
            .post(format_args!("write{s} 0x{addr:x} 0x{value:x}"), addr, value)
    }

    fn port_read(&self, port: u16, width: Width) -> Result<u32> {
        let s = Self::check_port(port, width)?;
        let value = self.qtest.command_value(format_args!("in{s} 0x{port:x}"))?;
        Ok(check_answer(width, value)? as u32)
    }

    fn port_write(&self, port: u16, width: Width, value: u32) -> Result<()> {
        let s = Self::check_port(port, width)?;
        check_value(width, value.into())?;
        self.qtest
            .command(format_args!("out{s} 0x{port:x} 0x{value:x}"))
            .map(drop)
    }

    /// Plugs a new memory backend file as a `pc-dimm` (QMP `object-add` + `device_add`): the
    /// device reaches it at the guest-physical address QEMU assigns (in the device-memory
    /// region above 4 GiB), this process maps the same file, and the returned fd maps exactly
    /// it — a client given the fd sees this window and nothing else of the machine.
    fn alloc_shared_window(&self, len: usize) -> Result<SharedWindow> {
        const ALIGN: usize = 2 << 20;
        let max = self.config.arena_max_mib as usize * (1 << 20);
        let len = len.div_ceil(ALIGN).max(1) * ALIGN;
        if len > max {
            return Err(PlatformError::Invalid(format!(
                "shared window of {len} bytes exceeds arena_max_mib ({max} bytes)"
            )));
        }
        let mut arenas = lock(&self.arenas);
        if arenas.len() >= self.config.arena_slots as usize {
            return Err(PlatformError::Invalid(format!(
                "all {} shared-window slots are in use",
                self.config.arena_slots
            )));
        }
        let index = arenas.len();
        let mapping = shm::SealedMemfd::create(&format!("vscsi-window-{index}"), len)
            .map_err(|e| PlatformError::Invalid(format!("shared window memfd: {e}")))?;
        let fd = mapping
            .fd()
            .try_clone()
            .map_err(|e| PlatformError::Invalid(format!("shared window fd: {e}")))?;
        let mem_path = format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            std::os::fd::AsRawFd::as_raw_fd(mapping.fd())
        );
        let qmp_err = |e: MachineError| PlatformError::Protocol(format!("plugging a window: {e}"));
        let id = format!("arena{index}");
        self.qmp(
            "object-add",
            serde_json::json!({
                "qom-type": "memory-backend-file",
                "id": id,
                "size": len,
                "mem-path": mem_path,
                "share": true,
            }),
        )
        .map_err(qmp_err)?;
        let dimm = format!("dimm{index}");
        self.qmp(
            "device_add",
            serde_json::json!({ "driver": "pc-dimm", "id": dimm, "memdev": id }),
        )
        .map_err(qmp_err)?;
        let devices = self
            .qmp("query-memory-devices", serde_json::json!({}))
            .map_err(qmp_err)?;
        let addr = devices
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["data"]["id"] == dimm.as_str())
            .and_then(|d| d["data"]["addr"].as_u64())
            .ok_or_else(|| PlatformError::Protocol(format!("{dimm} has no address")))?;
        let window = DmaWindow {
            device_addr: addr,
            cpu_ptr: mapping.ptr(),
            len: mapping.len(),
        };
        log::info!("shared window {index}: {len} bytes at guest {addr:#x}");
        arenas.push(mapping);
        Ok(SharedWindow { window, fd })
    }

    fn dma_window(&self) -> DmaWindow {
        let offset = DMA_BASE as usize;
        // SAFETY: the mapping is at least MIN_RAM_MIB (2 MiB) long (checked by
        // `MachineConfig::validate` before it was created), so `ptr + 1 MiB` is inside it and
        // not null.
        let cpu_ptr = unsafe { NonNull::new_unchecked(self.ram.ptr().as_ptr().add(offset)) };
        DmaWindow {
            device_addr: DMA_BASE,
            cpu_ptr,
            // All RAM is below 4 GiB (`MAX_RAM_MIB`), so file offset == guest-physical address
            // up to the end of the file.
            len: self.ram.len() - offset,
        }
    }

    fn mmio_window(&self) -> MmioWindow {
        MmioWindow {
            base: MMIO_BASE,
            len: MMIO_LEN,
        }
    }

    fn wait_irq(&self, timeout: Option<Duration>) -> Result<IrqWait> {
        self.qtest.wait_irq(1u64 << self.irq_line, timeout)
    }

    fn cpu_count(&self) -> usize {
        self.cpu_count
    }

    fn current_cpu(&self) -> usize {
        // SAFETY: sched_getcpu has no preconditions; it returns -1 on failure.
        let cpu = unsafe { libc::sched_getcpu() };
        // Modulo rather than min: with an affinity mask like {4, 5} and 2 CPUs, this still
        // spreads threads over 0 and 1.
        usize::try_from(cpu).map_or(0, |c| c % self.cpu_count)
    }

    fn health(&self) -> Result<()> {
        match self.qtest.shared().gone() {
            Some(reason) => Err(PlatformError::Gone(reason)),
            None => Ok(()),
        }
    }
}

impl Drop for QemuMachine {
    fn drop(&mut self) {
        self.qtest
            .shared()
            .mark_gone("the machine was dropped".to_string());
        self.qmp.disconnect();
        self.process.kill_and_reap();
        // The reader sees EOF now that QEMU is dead.
        let reader = lock(&self.reader).take();
        if reader.is_some_and(|h| h.join().is_err()) {
            log::error!("the qtest reader thread panicked");
        }
        for p in [&self.paths.qtest_socket, &self.paths.qmp_socket] {
            let _ = fs::remove_file(p);
        }
        // `ram` is unmapped and its file deleted when the fields drop, after this.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsi_routing() {
        assert_eq!(intx_gsi(1, 0), 21);
        assert_eq!(intx_gsi(2, 0), 22);
        assert_eq!(intx_gsi(3, 0), 23);
        assert_eq!(intx_gsi(4, 0), 20);
        assert_eq!(intx_gsi(5, 0), 21);
    }

    #[test]
    fn config_addresses() {
        let dev = PciAddress {
            bus: 0,
            device: 1,
            function: 0,
        };
        assert_eq!(config_address(dev, 0).unwrap(), 0x8000_0800);
        assert_eq!(config_address(dev, 0x3c).unwrap(), 0x8000_083c);
        assert!(config_address(dev, 2).is_err());
        let bad = PciAddress {
            bus: 0,
            device: 32,
            function: 0,
        };
        assert!(config_address(bad, 0).is_err());
    }

    #[test]
    fn width_checks() {
        assert!(check_value(Width::U8, 0xff).is_ok());
        assert!(check_value(Width::U8, 0x100).is_err());
        assert!(check_value(Width::U64, u64::MAX).is_ok());
        assert!(QemuMachine::check_mmio(MMIO_BASE, Width::U64).is_ok());
        assert!(QemuMachine::check_mmio(MMIO_BASE + 2, Width::U32).is_err());
        assert!(QemuMachine::check_mmio(MMIO_BASE - 4, Width::U32).is_err());
        assert!(QemuMachine::check_mmio(MMIO_BASE + MMIO_LEN - 4, Width::U32).is_ok());
        assert!(QemuMachine::check_mmio(MMIO_BASE + MMIO_LEN, Width::U8).is_err());
        assert!(QemuMachine::check_port(0xcfc, Width::U32).is_ok());
        assert!(QemuMachine::check_port(0xfffe, Width::U32).is_err());
        assert!(QemuMachine::check_port(0x80, Width::U64).is_err());
    }
}
