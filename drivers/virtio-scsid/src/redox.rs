//! The daemon on Redox OS (compiled only for `target_os = "redox"`): started by
//! `pcid-spawner` for a 1af4:1004/1af4:1048 function (see `dist/redox/`), it drives the device
//! through `redox-platform`, serves `disk.virtio-scsi` through the kernel's scheme interface
//! (`redox-adapter`: redox-scheme's `SchemeSync`, waiting with `redox_event`), tells init it is
//! ready once the scheme is registered (`redox-daemon`: the parent process exits when the
//! child says so), and on SIGTERM or when the scheme is closed stops taking requests, flushes
//! every writable disk (SYNCHRONIZE CACHE) and exits.
//!
//! Type-checked here with `cargo check --target x86_64-unknown-redox`; it cannot be linked or
//! run without a Redox system (relibc, the kernel's schemes).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use block_scheme::{AccessPolicy, DiskScheme};
use clap::Parser;
use redox_adapter::RedoxDisks;
use redox_platform::RedoxPlatform;
use virtio_scsi::{HostConfig, Policy, ScsiHost};

use crate::SCHEME;
use crate::device::HostDevices;

/// The Redox daemon's command line (the pcid-spawner entry passes none).
#[derive(Parser, Debug)]
#[command(
    name = "virtio-scsid",
    version,
    about = "virtio-scsi driver for Redox: serves the disks of a virtio-scsi function as disk.virtio-scsi"
)]
struct RedoxArgs {
    /// Request queues to use (at most what the device offers).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Physically contiguous DMA memory for rings and command slots, in MiB (default:
    /// 8 + 8 per queue).
    #[arg(long, value_name = "MIB")]
    dma_mib: Option<usize>,
    /// How a request queue is chosen: per-target, per-cpu or single.
    #[arg(long, default_value = "per-target")]
    steering: Policy,
    /// Also let callers with this user id open disks (Redox's rule is uid 0 only). Repeatable.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// Also let callers with this group id open disks. Repeatable.
    #[arg(long = "allow-gid", value_name = "GID")]
    allow_gids: Vec<u32>,
}

/// Forks into the daemon (before any thread exists); the parent exits once the child is
/// ready (or failed), which is what Redox's init waits for.
pub fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = RedoxArgs::parse();
    let Err(e) = redox_daemon::Daemon::new(move |daemon| {
        let code = match run(args, daemon) {
            Ok(()) => 0,
            Err(e) => {
                log::error!("{e}");
                1
            }
        };
        std::process::exit(code)
    });
    eprintln!("virtio-scsid: cannot start the daemon: {e}");
    ExitCode::FAILURE
}

fn run(args: RedoxArgs, daemon: redox_daemon::Daemon) -> Result<(), String> {
    let dma_mib = args.dma_mib.unwrap_or(8 + 8 * usize::from(args.queues));
    let platform = RedoxPlatform::discover(dma_mib << 20).map_err(|e| e.to_string())?;
    let host = ScsiHost::start(
        Arc::new(platform),
        HostConfig {
            queues: Some(usize::from(args.queues)),
            steering: args.steering,
            ..HostConfig::default()
        },
    )
    .map_err(|e| format!("virtio-scsi host: {e}"))?;
    for (i, d) in host.disks().iter().enumerate() {
        log::info!("{SCHEME}:/{i} = {d}");
    }
    let mut access = AccessPolicy::root_only();
    for &uid in &args.allow_uids {
        access = access.allow_uid(uid);
    }
    for &gid in &args.allow_gids {
        access = access.allow_gid(gid);
    }
    let devices = Arc::new(HostDevices::new(host.clone(), Vec::new()));
    let scheme = Arc::new(DiskScheme::with_access(SCHEME, devices, access));
    let mut disks = RedoxDisks::new(scheme);

    // SIGTERM/SIGINT set `stop` and write to a pipe the serving loop waits on (so the stop is
    // seen at once even if the kernel restarts the interrupted wait).
    let stop = Arc::new(AtomicBool::new(false));
    let (wake_rx, wake_tx) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| format!("signals: {e}"))?;
        let tx = wake_tx.try_clone().map_err(|e| format!("pipe: {e}"))?;
        signal_hook::low_level::pipe::register(sig, tx).map_err(|e| format!("signals: {e}"))?;
    }
    let mut daemon = Some(daemon);
    let served = redox_adapter::serve(&mut disks, SCHEME, &stop, Some(&wake_rx), || {
        if let Some(d) = daemon.take()
            && let Err(e) = d.ready()
        {
            log::warn!("readiness notification failed: {e}");
        }
    });

    // The loop answers one request at a time, so nothing is in flight now: flush and stop.
    let mut failed = served.err().map(|e| format!("scheme: {e}"));
    for (i, d) in host.disks().iter().enumerate() {
        if d.readonly {
            continue;
        }
        if let Err(e) = host.flush(d) {
            log::error!("flush of disk {i} failed: {e}");
            failed = Some(format!("flush of disk {i} failed: {e}"));
        }
    }
    host.shutdown();
    match failed {
        Some(e) => Err(e),
        None => {
            log::info!("all disks flushed; bye");
            Ok(())
        }
    }
}
