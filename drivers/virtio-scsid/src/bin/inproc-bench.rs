//! `inproc-bench`: the in-process baseline for the IPC benchmarks. It starts the same QEMU
//! machine and virtio-scsi host as the daemon, but its threads call the driver directly
//! (`ScsiHost::read`/`write`) with no client, IPC or scheme in between. Output: one JSON object
//! in the same shape as `vscsi bench --json`, so scripts can divide the two.
//!
//! Usage: inproc-bench --disk-qemu OPTS [--rw randread|randwrite|read] [--bs N] [--jobs N]
//!        [--iodepth N] [--runtime S] [--zero-copy] [--accel auto|tcg|kvm]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use qemu_machine::{Accel, DiskSpec, MachineConfig, QemuMachine};
use virtio_scsi::{HostConfig, ScsiHost};

#[derive(Parser, Debug)]
#[command(
    name = "inproc-bench",
    about = "Drive virtio-scsi in process (IPC baseline)"
)]
struct Args {
    /// QEMU -drive options of the disk (e.g. driver=null-co,size=1G).
    #[arg(long, default_value = "driver=null-co,size=1G")]
    disk_qemu: String,
    /// randread, randwrite or read (sequential).
    #[arg(long, default_value = "randread")]
    rw: String,
    /// Block size in bytes.
    #[arg(long, default_value_t = 4096)]
    bs: usize,
    /// Threads ("jobs") issuing requests.
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    /// Requests in flight per job (one thread each).
    #[arg(long, default_value_t = 8)]
    iodepth: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    runtime: f64,
    /// Use buffers inside a device-visible window (no copy) instead of ordinary memory.
    #[arg(long)]
    zero_copy: bool,
    /// Request queues.
    #[arg(long, default_value_t = 4)]
    queues: u16,
    /// auto, tcg or kvm.
    #[arg(long, default_value = "auto")]
    accel: String,
}

fn main() -> Result<(), String> {
    let a = Args::parse();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut cfg = MachineConfig::new(dir.path());
    cfg.ram_mib = 64 + 8 * u32::from(a.queues);
    cfg.num_queues = a.queues;
    cfg.accel = match a.accel.as_str() {
        "tcg" => Accel::Tcg,
        "kvm" => Accel::Kvm,
        _ => Accel::Auto,
    };
    cfg.disks.push(DiskSpec {
        drive_options: Some(a.disk_qemu.clone()),
        ..DiskSpec::new("")
    });
    let machine = QemuMachine::launch(cfg).map_err(|e| e.to_string())?;
    let host = ScsiHost::start(
        machine.clone(),
        HostConfig {
            queues: Some(usize::from(a.queues)),
            ..HostConfig::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let disk = host.disk(0).ok_or("no disk found")?;
    let blocks = disk.size() / a.bs as u64;
    let nthreads = a.jobs * a.iodepth;
    // Per-thread buffers: plain heap memory, or slices of one shared (device-visible) window.
    let window = if a.zero_copy {
        Some(
            host.alloc_shared_window(nthreads * a.bs)
                .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut threads = Vec::new();
    for t in 0..nthreads {
        let (host, disk, stop, ops) = (host.clone(), disk.clone(), stop.clone(), ops.clone());
        let bs = a.bs;
        let rw = a.rw.clone();
        let buf_addr = window
            .as_ref()
            .map(|w| w.window.cpu_ptr.as_ptr() as usize + t * bs);
        threads.push(std::thread::spawn(move || {
            let mut own = vec![0u8; bs];
            let buf: &mut [u8] = match buf_addr {
                // SAFETY: each thread gets its own disjoint `bs`-byte piece of the shared
                // window, which the host keeps mapped for its lifetime (held by this thread).
                Some(addr) => unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, bs) },
                None => &mut own,
            };
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
            let mut seq = t as u64;
            let mut lat = Vec::with_capacity(1 << 16);
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let block = if rw == "read" {
                    seq = (seq + nthreads as u64) % blocks;
                    seq
                } else {
                    x % blocks
                };
                let lba = block * bs as u64 / u64::from(disk.block_size);
                let t0 = Instant::now();
                let r = if rw == "randwrite" {
                    host.write(&disk, lba, buf)
                } else {
                    host.read(&disk, lba, buf)
                };
                if let Err(e) = r {
                    eprintln!("inproc-bench: I/O error: {e}");
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
                lat.push(t0.elapsed().as_nanos() as u64);
                ops.fetch_add(1, Ordering::Relaxed);
            }
            lat
        }));
    }
    std::thread::sleep(Duration::from_secs_f64(a.runtime));
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat: Vec<u64> = Vec::new();
    for t in threads {
        lat.extend(t.join().map_err(|_| "thread panicked")?);
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize)
            .map_or(0.0, |&v| v as f64 / 1000.0)
    };
    let n = ops.load(Ordering::Relaxed);
    println!(
        "{{\"rw\":\"{}\",\"bs\":{},\"iodepth\":{},\"jobs\":{},\"zero_copy\":{},\"runtime_s\":{:.3},\"ops\":{},\"iops\":{:.1},\"mb_s\":{:.2},\"lat_p50_us\":{:.1},\"lat_p99_us\":{:.1},\"lat_p999_us\":{:.1}}}",
        a.rw,
        a.bs,
        a.iodepth,
        a.jobs,
        a.zero_copy,
        elapsed,
        n,
        n as f64 / elapsed,
        (n * a.bs as u64) as f64 / elapsed / 1e6,
        pct(0.5),
        pct(0.99),
        pct(0.999)
    );
    host.shutdown();
    machine.shutdown();
    Ok(())
}
