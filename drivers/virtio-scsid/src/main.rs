//! `virtio-scsid`: the virtio-scsi driver daemon.
//!
//! Lifecycle: parse the command line → launch the machine (QEMU with the disks on a
//! virtio-scsi-pci device), or with `--pci BDF` take a virtio-scsi function of the Linux machine
//! the daemon runs in (bound to `uio_pci_generic`, crate `linux-platform`) → bring up the host
//! and find its disks → bind the scheme's socket and print `ready` → serve until SIGTERM/SIGINT
//! (flush every disk, exit 0) or until the machine dies (report it, exit 1). Settings come from
//! the flags and, with `--config`, a TOML file whose keys are the long flags (module
//! `settings`); readiness is also reported to systemd (module `notify`). On Redox the daemon is a different program around the same driver and
//! scheme: module `redox` (the host-only code here is compiled out there).
#![cfg_attr(target_os = "redox", allow(unused_imports, dead_code))]

#[cfg(not(target_os = "redox"))]
mod arenas;
#[cfg(not(target_os = "redox"))]
mod config;
mod device;
#[cfg(not(target_os = "redox"))]
mod notify;
#[cfg(target_os = "redox")]
mod redox;
#[cfg(not(target_os = "redox"))]
mod settings;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use block_scheme::{AccessPolicy, DiskScheme};
use clap::Parser;
#[cfg(not(target_os = "redox"))]
use crossbeam_channel::{RecvTimeoutError, select};
#[cfg(not(target_os = "redox"))]
use qemu_machine::{Accel, DiskFormat, DiskSpec, MachineConfig, QemuMachine};
use virtio_scsi::{HostConfig, LockKind, Policy, ScsiHost};
#[cfg(not(target_os = "redox"))]
use vscsi_ipc::{Server, ServerConfig};

#[cfg(not(target_os = "redox"))]
use crate::config::{DiskArg, Format};
use crate::device::HostDevices;

/// The scheme this daemon serves.
const SCHEME: &str = "disk.virtio-scsi";

#[cfg(not(target_os = "redox"))]
#[derive(Parser, Debug)]
#[command(
    name = "virtio-scsid",
    version,
    about = "virtio-scsi driver daemon: serves the disks of a virtio-scsi device as disk.virtio-scsi"
)]
struct Args {
    /// A disk image: PATH[,format=raw|qcow2][,block-size=512|4096][,readonly]. Repeatable;
    /// disk N is on target N. Without any, a sparse 1 GiB image in the state directory is used.
    #[arg(long = "disk", value_name = "SPEC", value_parser = config::parse_disk)]
    disks: Vec<DiskArg>,
    /// A disk whose QEMU `-drive` options are given verbatim (e.g.
    /// 'driver=null-co,size=1G,latency-ns=100000' or a blkdebug chain), after the --disk ones.
    /// Repeatable.
    #[arg(long = "disk-qemu", value_name = "DRIVE-OPTIONS", value_parser = config::parse_disk_qemu)]
    disks_qemu: Vec<DiskArg>,
    /// Request queues of the virtio-scsi device.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Socket to serve on (default: $VSCSI_SOCKET, else /run/virtio-scsid.sock for root, else
    /// $XDG_RUNTIME_DIR/virtio-scsid.sock or /tmp/virtio-scsid-UID.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Where the embedded default disk lives (default: $VSCSID_STATE_DIR, else
    /// /var/lib/virtio-scsid for root, else ~/.local/state/virtio-scsid).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The QEMU binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Accelerator for the machine: auto (KVM when /dev/kvm is usable), tcg or kvm.
    #[arg(long, default_value = "auto", value_parser = ["auto", "tcg", "kvm"])]
    accel: String,
    /// Worker threads serving client requests (pinned round-robin to the CPUs; a request is
    /// submitted by the worker that runs it, and that worker's CPU picks its queue).
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// How a request queue is chosen: per-target (seqcount steering: all in-flight requests of
    /// a target on one queue), per-cpu (the submitting CPU's queue) or single (queue 0).
    #[arg(long, default_value = "per-target")]
    steering: Policy,
    /// Synchronisation of per-target steering state: seqcount, spinlock or mutex (the last two
    /// only to measure against the seqcount).
    #[arg(long, default_value = "seqcount")]
    steering_lock: LockKind,
    /// Check on live traffic that all in-flight requests of a target share one queue
    /// (a mutex per request; violations show in `vscsi stats`).
    #[arg(long)]
    check_steering: bool,
    /// Milliseconds a command may take before recovery starts (ABORT TASK, LOGICAL UNIT RESET,
    /// I_T NEXUS RESET, then a device reset).
    #[arg(long, default_value_t = 30_000)]
    command_timeout_ms: u64,
    /// MiB of zero-copy arena per shared-memory client (device-visible memory the client maps;
    /// 0 turns the shared-memory transport off).
    #[arg(long, default_value_t = 32)]
    arena_mib: usize,
    /// Milliseconds each recovery step waits for the command.
    #[arg(long, default_value_t = 5_000)]
    tmf_timeout_ms: u64,
    /// Busy-poll completions while I/O is in flight, falling back to interrupts after this
    /// many microseconds without one (0: interrupts only). A shared-memory session's poller
    /// polls for the requests it started itself (and its submission ring as long between
    /// requests); otherwise the completion thread polls.
    /// Costs a CPU while busy; saves the interrupt path and the wake-ups after it (worth it
    /// with `--pci`, where each interrupt goes through UIO).
    #[arg(long, default_value_t = 0)]
    poll_us: u64,
    /// A TOML file of settings: each key is one of these long flags (`queues = 4`,
    /// `disk = ["a.img", "b.img,readonly"]`, `check-steering = true`); flags given here
    /// override it (a repeatable flag given here replaces the file's list).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Permissions of the socket file (octal), which decide who can connect at all.
    #[arg(long, value_name = "OCTAL", default_value = "0660", value_parser = parse_mode)]
    socket_mode: u32,
    /// Also let callers with this user id open disks (uid 0 and the daemon's own user always
    /// may; the peer's credentials come from the socket). Repeatable.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// Also let callers whose primary group id is this open disks. Repeatable.
    #[arg(long = "allow-gid", value_name = "GID")]
    allow_gids: Vec<u32>,
    /// Let every caller who can connect to the socket open disks (the socket's permissions
    /// are then the only check).
    #[arg(long)]
    allow_any_user: bool,
    /// Drive this virtio-scsi PCI function of the Linux machine the daemon runs in (e.g.
    /// 0000:00:04.0) instead of launching QEMU: it is bound to uio_pci_generic (the module must
    /// be loaded) and its disks are whatever is attached to it. Needs root.
    #[arg(long, value_name = "BDF", value_parser = parse_bdf)]
    pci: Option<linux_platform::Bdf>,
    /// With --pci: MiB of DMA memory (physically contiguous 2 MiB hugepages, reserved by the
    /// daemon). Default: 32, or 6 per request queue plus 8 when that is more.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(2..=65536))]
    dma_mib: Option<u32>,
}

/// Parses a PCI address (`0000:00:04.0` or `00:04.0`).
#[cfg(not(target_os = "redox"))]
fn parse_bdf(s: &str) -> Result<linux_platform::Bdf, String> {
    s.parse()
}

/// Parses an octal file mode (`0660`, `660` or `0o660`), at most `0o777`.
#[cfg(not(target_os = "redox"))]
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{s:?} is not an octal mode like 0660")),
    }
}

#[cfg(target_os = "redox")]
fn main() -> ExitCode {
    redox::main()
}

#[cfg(not(target_os = "redox"))]
fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let args = settings::parse_args::<Args>();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virtio-scsid: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What the driver runs on: a QEMU machine the daemon launched, or a PCI function of the
/// machine the daemon runs in.
#[cfg(not(target_os = "redox"))]
enum Machine {
    /// QEMU, with the directory of its sockets and RAM file (removed after QEMU stopped).
    Qemu {
        machine: Arc<QemuMachine>,
        _work_dir: tempfile::TempDir,
    },
    /// A function bound to uio_pci_generic.
    #[cfg(target_os = "linux")]
    Pci(Arc<linux_platform::LinuxPlatform>),
}

#[cfg(not(target_os = "redox"))]
impl Machine {
    fn platform(&self) -> Arc<dyn platform::Platform> {
        match self {
            Machine::Qemu { machine, .. } => machine.clone(),
            #[cfg(target_os = "linux")]
            Machine::Pci(p) => p.clone(),
        }
    }

    fn shutdown(&self) {
        match self {
            Machine::Qemu { machine, .. } => machine.shutdown(),
            // The host has reset the device; the platform stops its bus mastering and frees
            // the DMA memory when the last user drops it (or the kernel does, at exit).
            #[cfg(target_os = "linux")]
            Machine::Pci(_) => {}
        }
    }
}

/// The disks `--disk`/`--disk-qemu` ask for (or the embedded default disk), checked.
#[cfg(not(target_os = "redox"))]
fn qemu_disks(args: &Args) -> Result<Vec<DiskArg>, String> {
    let disks = if args.disks.is_empty() && args.disks_qemu.is_empty() {
        let state = args
            .state_dir
            .clone()
            .unwrap_or_else(config::default_state_dir);
        vec![config::default_disk(&state)?]
    } else {
        args.disks.iter().chain(&args.disks_qemu).cloned().collect()
    };
    if disks.len() > 255 {
        return Err("at most 255 disks".into());
    }
    for d in &disks {
        if d.qemu_options.is_none() && !d.path.exists() {
            return Err(format!("disk image {} does not exist", d.path.display()));
        }
    }
    Ok(disks)
}

/// DMA memory for `--pci`: `--dma-mib`, else 32 MiB or 6 MiB per request queue plus 8 (each
/// queue's command slots take about 5.5 MiB).
#[cfg(not(target_os = "redox"))]
fn dma_mib(args: &Args) -> u32 {
    args.dma_mib
        .unwrap_or_else(|| (8 + 6 * u32::from(args.queues)).max(32))
}

/// Binds `bdf` to uio_pci_generic and opens it as the driver's platform.
#[cfg(target_os = "linux")]
fn start_pci(bdf: linux_platform::Bdf, args: &Args) -> Result<Machine, String> {
    let uio = linux_platform::bind_uio(&bdf).map_err(|e| format!("PCI {bdf}: {e}"))?;
    let mib = dma_mib(args);
    let platform = linux_platform::LinuxPlatform::open(bdf, (mib as usize) << 20)
        .map_err(|e| format!("PCI {bdf}: {e}"))?;
    let dma = platform::Platform::dma_window(&platform);
    println!(
        "virtio-scsid: device up: PCI {bdf} through {} ({} MiB of DMA memory at {:#x})",
        uio.display(),
        dma.len >> 20,
        dma.device_addr
    );
    Ok(Machine::Pci(Arc::new(platform)))
}

#[cfg(not(any(target_os = "linux", target_os = "redox")))]
fn start_pci(_bdf: linux_platform::Bdf, _args: &Args) -> Result<Machine, String> {
    Err("--pci needs Linux (uio_pci_generic)".into())
}

/// Refuses settings that contradict each other: `--disk`/`--disk-qemu` configure the QEMU
/// machine, which `--pci` does not launch, and `--dma-mib` is for `--pci` only.
#[cfg(not(target_os = "redox"))]
fn check_backend(args: &Args) -> Result<(), String> {
    if args.pci.is_some() && !(args.disks.is_empty() && args.disks_qemu.is_empty()) {
        return Err(
            "--disk and --disk-qemu describe disks of a QEMU machine the daemon \
                    launches; with --pci the disks are those attached to that PCI function: \
                    give one or the other"
                .into(),
        );
    }
    if args.pci.is_none() && args.dma_mib.is_some() {
        return Err(
            "--dma-mib sizes the DMA memory of --pci; without --pci the QEMU \
                    machine's memory is sized from --queues"
                .into(),
        );
    }
    Ok(())
}

#[cfg(not(target_os = "redox"))]
fn run(args: Args) -> Result<(), String> {
    check_backend(&args)?;
    let disks = match args.pci {
        Some(_) => Vec::new(),
        None => qemu_disks(&args)?,
    };
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(vscsi_ipc::default_socket_path);

    // Signals first, so a SIGTERM during start-up is not lost.
    let (sig_tx, sig_rx) = crossbeam_channel::bounded::<i32>(4);
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|e| format!("signal handlers: {e}"))?;
    std::thread::spawn(move || {
        for s in signals.forever() {
            let _ = sig_tx.send(s);
        }
    });

    let machine = match args.pci {
        Some(bdf) => start_pci(bdf, &args)?,
        None => start_qemu(&args, &disks)?,
    };
    let host = ScsiHost::start(
        machine.platform(),
        HostConfig {
            queues: Some(usize::from(args.queues)),
            steering: args.steering,
            steering_lock: args.steering_lock,
            check_steering: args.check_steering,
            command_timeout: Duration::from_millis(args.command_timeout_ms.max(1)),
            tmf_timeout: Duration::from_millis(args.tmf_timeout_ms.max(1)),
            poll: Duration::from_micros(args.poll_us),
            ..HostConfig::default()
        },
    )
    .map_err(|e| format!("virtio-scsi host: {e}"))?;
    serve(args, machine, host, &disks, socket, sig_rx)
}

/// Launches the QEMU machine with `disks`.
#[cfg(not(target_os = "redox"))]
fn start_qemu(args: &Args, disks: &[DiskArg]) -> Result<Machine, String> {
    let work_dir = tempfile::Builder::new()
        .prefix("virtio-scsid-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?;
    let machine_cfg = MachineConfig {
        qemu_binary: args.qemu.clone(),
        work_dir: work_dir.path().to_path_buf(),
        ram_mib: ram_for(args.queues),
        num_queues: args.queues,
        disks: disks
            .iter()
            .enumerate()
            .map(|(i, d)| DiskSpec {
                path: d.path.clone(),
                format: match d.format {
                    Format::Raw => DiskFormat::Raw,
                    Format::Qcow2 => DiskFormat::Qcow2,
                },
                logical_block_size: d.block_size,
                readonly: d.readonly,
                target: i as u8,
                lun: 0,
                drive_options: d.qemu_options.clone(),
            })
            .collect(),
        accel: match args.accel.as_str() {
            "tcg" => Accel::Tcg,
            "kvm" => Accel::Kvm,
            _ => Accel::Auto,
        },
        extra_args: Vec::new(),
        arena_slots: 16,
        arena_max_mib: 256,
    };
    let machine = QemuMachine::launch(machine_cfg).map_err(|e| e.to_string())?;
    println!(
        "virtio-scsid: machine up: QEMU pid {} (QMP {})",
        machine.pid(),
        machine.qmp_socket().display()
    );
    let _ = std::io::stdout().flush();
    Ok(Machine::Qemu {
        machine,
        _work_dir: work_dir,
    })
}

/// Serves `host`'s disks until a signal, the server stopping, or the machine dying; then
/// drains, flushes every disk and stops the machine.
#[cfg(not(target_os = "redox"))]
fn serve(
    args: Args,
    machine: Machine,
    host: Arc<ScsiHost>,
    disks: &[DiskArg],
    socket: PathBuf,
    sig_rx: crossbeam_channel::Receiver<i32>,
) -> Result<(), String> {
    let found = host.disks();
    if args.pci.is_none() && found.len() != disks.len() {
        log::warn!(
            "configured {} disk(s), the device reports {}",
            disks.len(),
            found.len()
        );
    }
    let readonly_targets = disks
        .iter()
        .enumerate()
        .filter(|(_, d)| d.readonly)
        .map(|(i, _)| i as u8)
        .collect();
    let devices = Arc::new(HostDevices::new(host.clone(), readonly_targets));
    let access = access_policy(&args);
    log::info!(
        "disks may be opened by: {access} (socket mode {:o})",
        args.socket_mode
    );
    let scheme = Arc::new(DiskScheme::with_access(SCHEME, devices.clone(), access));
    let server = Server::bind(
        ServerConfig {
            socket_path: socket.clone(),
            workers: args.workers.max(1),
            pin_workers: true,
            socket_mode: args.socket_mode,
            // A PCI function of this machine has no shareable DMA windows (see
            // linux-platform): its shared-memory clients get arenas of plain memory, which the
            // driver copies through its command slots (the rings still save the socket hop).
            arena: (args.arena_mib > 0).then(|| {
                if args.pci.is_some() {
                    Arc::new(vscsi_ipc::MemfdArenas::new()) as Arc<dyn vscsi_ipc::ArenaProvider>
                } else {
                    Arc::new(arenas::HostArenas::new(host.clone()))
                        as Arc<dyn vscsi_ipc::ArenaProvider>
                }
            }),
            arena_bytes: args.arena_mib.max(1) << 20,
            // Busy polling covers a session's whole round trip: the poller polls the device
            // for its requests and, between requests, its submission ring.
            shm_poll: Duration::from_micros(args.poll_us),
            shm_spin: ServerConfig::default()
                .shm_spin
                .max(Duration::from_micros(args.poll_us)),
            ..ServerConfig::default()
        },
        scheme,
    )
    .map_err(|e| format!("cannot serve on {}: {e}", socket.display()))?;
    let shutdown = server.shutdown_handle();
    let server = Arc::new(server);
    let (done_tx, done_rx) = crossbeam_channel::bounded::<Result<(), String>>(1);
    {
        let server = server.clone();
        std::thread::spawn(move || {
            let r = server.run().map_err(|e| format!("server: {e}"));
            let _ = done_tx.send(r);
        });
    }

    for (i, d) in found.iter().enumerate() {
        println!("virtio-scsid: {SCHEME}:/{i} = {d}");
    }
    println!(
        "virtio-scsid: ready: serving {} disk(s) as {SCHEME} on {}",
        found.len(),
        socket.display()
    );
    let _ = std::io::stdout().flush();
    let status = format!(
        "STATUS=serving {} disk(s) on {}",
        found.len(),
        socket.display()
    );
    if let Err(e) = notify::notify(&format!("READY=1\n{status}")) {
        log::warn!("systemd readiness notification failed: {e}");
    }

    // Serve until a signal, the server stopping, or the machine dying.
    let outcome = loop {
        select! {
            recv(sig_rx) -> s => {
                log::info!("signal {}: flushing and shutting down", s.unwrap_or(0));
                break Ok(());
            }
            recv(done_rx) -> r => {
                break r.unwrap_or_else(|_| Err("server thread ended".into()))
                    .and_then(|()| Err("server stopped".into()));
            }
            default(Duration::from_millis(200)) => {
                if let Err(e) = host.health() {
                    break Err(format!("the machine failed: {e}"));
                }
            }
        }
    };

    // Orderly shutdown: stop taking requests, drain, flush every disk, stop the machine.
    let _ = notify::notify("STOPPING=1");
    shutdown.shutdown();
    match done_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(_) | Err(RecvTimeoutError::Disconnected) => {}
        Err(RecvTimeoutError::Timeout) => log::warn!("server did not stop within 30 s"),
    }
    let mut flush_failed = None;
    if outcome.is_ok() {
        for (i, d) in host.disks().iter().enumerate() {
            if d.readonly {
                continue;
            }
            if let Err(e) = host.flush(d) {
                log::error!("flush of disk {i} failed: {e}");
                flush_failed = Some(format!("flush of disk {i} failed: {e}"));
            }
        }
    }
    host.shutdown();
    machine.shutdown();
    match (outcome, flush_failed) {
        (Err(e), _) | (Ok(()), Some(e)) => Err(e),
        (Ok(()), None) => {
            log::info!("all disks flushed; bye");
            Ok(())
        }
    }
}

/// Who may open disks on the host: uid 0, the daemon's own user, and what the flags add.
#[cfg(not(target_os = "redox"))]
fn access_policy(args: &Args) -> AccessPolicy {
    if args.allow_any_user {
        return AccessPolicy::any_caller();
    }
    let own = rustix::process::geteuid().as_raw();
    let mut policy = AccessPolicy::root_only().allow_uid(own);
    for &uid in &args.allow_uids {
        policy = policy.allow_uid(uid);
    }
    for &gid in &args.allow_gids {
        policy = policy.allow_gid(gid);
    }
    policy
}

/// Guest RAM: room for the rings and the command slots of every queue (42 slots of 132 KiB
/// each per queue) plus slack.
#[cfg(not(target_os = "redox"))]
fn ram_for(queues: u16) -> u32 {
    64 + 8 * u32::from(queues)
}
