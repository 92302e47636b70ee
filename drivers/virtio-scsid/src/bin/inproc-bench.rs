//! `inproc-bench`: the driver benchmarked in process, with no client, IPC or scheme in between
//! (the baseline of the IPC benchmarks, and our side of the in-guest comparison with Linux's
//! driver that is not the daemon's IPC). It brings up the same virtio-scsi host as the daemon,
//! on a QEMU machine it launches or (`--pci BDF`, Linux) on a PCI function of the machine it
//! runs in, and drives disk 0 with one of two engines:
//!
//! - `threads` (default): `jobs x iodepth` threads, each calling the blocking
//!   `ScsiHost::read`/`write` (completion by interrupt, a wake-up per request);
//! - `poll`: one thread keeping `iodepth` split-phase commands in flight
//!   (`ScsiHost::submit_async`) and busy-polling them (`AsyncIo::poll` reaps the used ring
//!   itself) with the request queues' interrupts off (`ScsiHost::begin_busy_poll`): how SPDK's
//!   `perf` drives its userspace drivers. Buffers from the host's DMA memory (`--zero-copy`)
//!   or plain memory (bounced through the command slots).
//!
//! Output: one JSON object in the shape of `vscsi bench --json`, so scripts can divide them.
//!
//! Usage: inproc-bench [--disk-qemu OPTS | --pci BDF [--dma-mib N]] [--engine threads|poll]
//!        [--rw randread|randwrite|read] [--bs N] [--jobs N] [--iodepth N] [--runtime S]
//!        [--zero-copy] [--queues N] [--accel auto|tcg|kvm]
//!        inproc-bench --clock-cost   (what one clock reading costs here)

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use qemu_machine::{Accel, DiskSpec, MachineConfig, QemuMachine};
use virtio_scsi::{AsyncIo, AsyncPoll, CompletionWaker, Disk, HostConfig, ScsiHost};

#[derive(Parser, Debug)]
#[command(name = "inproc-bench", about = "Drive virtio-scsi in process")]
struct Args {
    /// QEMU -drive options of the disk of the QEMU machine this launches (not with --pci).
    #[arg(long, default_value = "driver=null-co,size=1G")]
    disk_qemu: String,
    /// Instead of launching QEMU, drive this virtio-scsi PCI function of the Linux machine
    /// this runs in (bound to uio_pci_generic, as `virtio-scsid --pci` does; needs root).
    #[arg(long, value_parser = parse_bdf)]
    pci: Option<linux_platform::Bdf>,
    /// With --pci: MiB of DMA memory (hugepages).
    #[arg(long, default_value_t = 32)]
    dma_mib: u32,
    /// How requests are issued (module docs).
    #[arg(long, value_enum, default_value_t = Engine::Threads)]
    engine: Engine,
    /// randread, randwrite or read (sequential).
    #[arg(long, default_value = "randread")]
    rw: String,
    /// Block size in bytes.
    #[arg(long, default_value_t = 4096)]
    bs: usize,
    /// Threads ("jobs") issuing requests (engine threads only).
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    /// Requests in flight (per job with engine threads: one thread each).
    #[arg(long, default_value_t = 8)]
    iodepth: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    runtime: f64,
    /// Use buffers inside a device-visible window (no copy) instead of ordinary memory.
    #[arg(long)]
    zero_copy: bool,
    /// Request queues (of the QEMU machine launched; with --pci the device's, up to this).
    #[arg(long, default_value_t = 4)]
    queues: u16,
    /// auto, tcg or kvm (the QEMU machine launched).
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Only measure what one reading of the monotonic clock costs here (no device): prints
    /// `{"clock_read_ns":N}`.
    #[arg(long)]
    clock_cost: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Engine {
    /// One blocked thread per request in flight.
    Threads,
    /// One thread, split-phase submission, busy polling, no interrupts.
    Poll,
}

fn parse_bdf(s: &str) -> Result<linux_platform::Bdf, String> {
    s.parse()
}

/// The QEMU machine launched (with the directory of its sockets, removed after it stopped),
/// none with `--pci`.
type Launched = Option<(Arc<QemuMachine>, tempfile::TempDir)>;

fn start(a: &Args) -> Result<(Launched, Arc<dyn platform::Platform>), String> {
    if let Some(bdf) = a.pci {
        return start_pci(bdf, a);
    }
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
    Ok((Some((machine.clone(), dir)), machine))
}

#[cfg(target_os = "linux")]
fn start_pci(
    bdf: linux_platform::Bdf,
    a: &Args,
) -> Result<(Launched, Arc<dyn platform::Platform>), String> {
    linux_platform::bind_uio(&bdf).map_err(|e| format!("PCI {bdf}: {e}"))?;
    let p = Arc::new(
        linux_platform::LinuxPlatform::open(bdf, (a.dma_mib as usize) << 20)
            .map_err(|e| format!("PCI {bdf}: {e}"))?,
    );
    Ok((None, p))
}

#[cfg(not(target_os = "linux"))]
fn start_pci(
    _bdf: linux_platform::Bdf,
    _a: &Args,
) -> Result<(Launched, Arc<dyn platform::Platform>), String> {
    Err("--pci needs Linux (uio_pci_generic)".into())
}

/// The next block of a run: sequential from `seq` for `read`, else xorshift-random.
struct Offsets {
    x: u64,
    seq: u64,
    stride: u64,
    blocks: u64,
    sequential: bool,
}

impl Offsets {
    fn new(seed: u64, stride: u64, blocks: u64, sequential: bool) -> Self {
        Offsets {
            x: 0x9E37_79B9_7F4A_7C15u64 ^ (seed + 1),
            seq: seed,
            stride,
            blocks,
            sequential,
        }
    }
    fn next(&mut self) -> u64 {
        if self.sequential {
            self.seq = (self.seq + self.stride) % self.blocks;
            return self.seq;
        }
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        self.x % self.blocks
    }
}

fn main() -> Result<(), String> {
    let a = Args::parse();
    if a.clock_cost {
        const READS: u32 = 10_000;
        let t0 = Instant::now();
        for _ in 0..READS {
            std::hint::black_box(Instant::now());
        }
        let ns = t0.elapsed().as_nanos() as f64 / f64::from(READS);
        println!("{{\"clock_read_ns\":{ns:.0}}}");
        return Ok(());
    }
    if a.bs == 0 || a.iodepth == 0 || a.jobs == 0 {
        return Err("--bs, --iodepth and --jobs must be at least 1".into());
    }
    let (machine, platform) = start(&a)?;
    let host = ScsiHost::start(
        platform,
        HostConfig {
            queues: Some(usize::from(a.queues)),
            ..HostConfig::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let disk = host.disk(0).ok_or("no disk found")?;
    if a.bs % disk.block_size as usize != 0 {
        return Err(format!(
            "--bs {} is not a multiple of the disk's block size {}",
            a.bs, disk.block_size
        ));
    }
    let blocks = disk.size() / a.bs as u64;
    if blocks == 0 {
        return Err("the disk is smaller than one --bs".into());
    }
    let started = Instant::now();
    let result = match a.engine {
        Engine::Threads => run_threads(&host, &disk, &a, blocks),
        Engine::Poll => run_poll(&host, &disk, &a, blocks),
    };
    let elapsed = started.elapsed().as_secs_f64();
    host.shutdown();
    if let Some((m, _dir)) = &machine {
        m.shutdown();
    }
    let (n, mut lat) = result?;
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize)
            .map_or(0.0, |&v| v as f64 / 1000.0)
    };
    println!(
        "{{\"rw\":\"{}\",\"bs\":{},\"iodepth\":{},\"jobs\":{},\"engine\":\"{:?}\",\"zero_copy\":{},\"runtime_s\":{:.3},\"ops\":{},\"iops\":{:.1},\"mb_s\":{:.2},\"lat_p50_us\":{:.1},\"lat_p99_us\":{:.1},\"lat_p999_us\":{:.1}}}",
        a.rw,
        a.bs,
        a.iodepth,
        if a.engine == Engine::Poll { 1 } else { a.jobs },
        a.engine,
        a.zero_copy,
        elapsed,
        n,
        n as f64 / elapsed,
        (n * a.bs as u64) as f64 / elapsed / 1e6,
        pct(0.5),
        pct(0.99),
        pct(0.999)
    );
    Ok(())
}

/// Engine `threads`: returns the requests done and their latencies (ns).
fn run_threads(
    host: &Arc<ScsiHost>,
    disk: &Arc<Disk>,
    a: &Args,
    blocks: u64,
) -> Result<(u64, Vec<u64>), String> {
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
    let mut threads = Vec::new();
    for t in 0..nthreads {
        let (host, disk, stop, ops) = (host.clone(), disk.clone(), stop.clone(), ops.clone());
        let bs = a.bs;
        let write = a.rw == "randwrite";
        let mut offsets = Offsets::new(t as u64, nthreads as u64, blocks, a.rw == "read");
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
            let mut lat = Vec::with_capacity(1 << 16);
            while !stop.load(Ordering::Relaxed) {
                let lba = offsets.next() * bs as u64 / u64::from(disk.block_size);
                let t0 = Instant::now();
                let r = if write {
                    host.write(&disk, lba, buf)
                } else {
                    host.read(&disk, lba, buf)
                };
                if let Err(e) = r {
                    stop.store(true, Ordering::Relaxed);
                    return Err(format!("I/O error: {e}"));
                }
                lat.push(t0.elapsed().as_nanos() as u64);
                ops.fetch_add(1, Ordering::Relaxed);
            }
            Ok(lat)
        }));
    }
    std::thread::sleep(Duration::from_secs_f64(a.runtime));
    stop.store(true, Ordering::Relaxed);
    let mut lat: Vec<u64> = Vec::new();
    for t in threads {
        lat.extend(t.join().map_err(|_| "thread panicked")??);
    }
    Ok((ops.load(Ordering::Relaxed), lat))
}

/// The poll engine never sleeps on a completion: the waker has nothing to do.
struct Spinning;

impl CompletionWaker for Spinning {
    fn wake(&self) {}
}

/// Runs a blocking driver call from the polling thread: busy polling pauses meanwhile (the
/// call waits for an answer that, with interrupts off, only a poll would collect).
fn blocking<T>(host: &ScsiHost, call: impl FnOnce() -> T) -> T {
    host.end_busy_poll();
    let r = call();
    host.begin_busy_poll();
    r
}

/// Engine `poll`: returns the requests done and their latencies (ns).
fn run_poll(
    host: &Arc<ScsiHost>,
    disk: &Arc<Disk>,
    a: &Args,
    blocks: u64,
) -> Result<(u64, Vec<u64>), String> {
    let (qd, bs) = (a.iodepth, a.bs);
    let write = a.rw == "randwrite";
    let mut offsets = Offsets::new(0, 1, blocks, a.rw == "read");
    // One `bs` buffer per request in flight: device memory, or plain memory the driver bounces.
    let dma = if a.zero_copy {
        Some(
            host.alloc_dma_buffer(qd * bs)
                .ok_or("no DMA memory for the buffers")?,
        )
    } else {
        None
    };
    let mut plain = if dma.is_none() {
        vec![0u8; qd * bs]
    } else {
        Vec::new()
    };
    let base = match &dma {
        Some(d) => d.cpu_ptr(),
        None => NonNull::new(plain.as_mut_ptr()).ok_or("empty buffer")?,
    };
    let waker: Arc<dyn CompletionWaker> = Arc::new(Spinning);
    // Completions are reaped here (`AsyncIo::poll` drains its queue): the device need not
    // interrupt until `end_busy_poll` below.
    host.begin_busy_poll();
    let mut in_flight: Vec<Option<(AsyncIo, Instant)>> = (0..qd).map(|_| None).collect();
    let mut lat = Vec::with_capacity(1 << 18);
    let mut ops = 0u64;
    let mut failure = None;
    let end = Instant::now() + Duration::from_secs_f64(a.runtime);
    let mut spins = 0u32;
    'run: loop {
        spins = spins.wrapping_add(1);
        // The clock once per 64 rounds for the end and the deadlines (where it is not the TSC,
        // each reading is a system call).
        let now = spins.is_multiple_of(64).then(Instant::now);
        let stopping = now.is_some_and(|n| n >= end);
        let mut busy = false;
        for (i, entry) in in_flight.iter_mut().enumerate() {
            // SAFETY: buffer `i` is `bs` bytes inside `dma`/`plain` (qd * bs), both alive until
            // this function returns after every token settled; only request `i` uses it.
            let buf = unsafe { NonNull::new_unchecked(base.as_ptr().add(i * bs)) };
            if let Some((io, t0)) = entry.as_mut() {
                let t0 = *t0;
                let state = io.poll();
                if state == AsyncPoll::Pending && now.is_none_or(|n| n < io.deadline()) {
                    busy = true;
                    continue;
                }
                // Done, or (an error, a short transfer, overdue) settled the blocking way.
                let answered = match (state, entry.take()) {
                    (AsyncPoll::Done, _) | (_, None) => Ok(()),
                    (_, Some((io, _))) => blocking(host, || io.finish_blocking()),
                };
                if let Err(e) = answered {
                    failure = Some(format!("I/O error: {e}"));
                    *entry = None;
                    break 'run;
                }
                lat.push(t0.elapsed().as_nanos() as u64);
                ops += 1;
                *entry = None;
            }
            if stopping {
                continue;
            }
            let lba = offsets.next() * bs as u64 / u64::from(disk.block_size);
            let t0 = Instant::now();
            // SAFETY: `buf` is valid for `bs` bytes and untouched by this thread until the
            // token settles (polled to Done or finished above, or dropped at the end, when
            // `dma`/`plain` still outlive the device's use: DMA memory stays mapped with the
            // host, and every token is settled before `plain` is freed).
            match unsafe { host.submit_async(disk, lba, buf, bs, write, &waker) } {
                Some(io) => {
                    *entry = Some((io, t0));
                    busy = true;
                }
                None => {
                    // Not eligible now (no free slot, ...): the blocking call, as the
                    // daemon's poller falls back.
                    // SAFETY: as above; no token uses buffer `i` now.
                    let data = unsafe { std::slice::from_raw_parts_mut(buf.as_ptr(), bs) };
                    let r = blocking(host, || {
                        if write {
                            host.write(disk, lba, data)
                        } else {
                            host.read(disk, lba, data)
                        }
                    });
                    if let Err(e) = r {
                        failure = Some(format!("I/O error: {e}"));
                        break 'run;
                    }
                    lat.push(t0.elapsed().as_nanos() as u64);
                    ops += 1;
                }
            }
        }
        if stopping && !busy {
            break;
        }
        std::hint::spin_loop();
    }
    host.end_busy_poll();
    // Settle whatever an error left in flight before the buffers go.
    for (io, _) in in_flight.iter_mut().filter_map(Option::take) {
        let _ = io.finish_blocking();
    }
    match failure {
        Some(e) => Err(e),
        None => Ok((ops, lat)),
    }
}
