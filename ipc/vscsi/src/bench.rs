//! `vscsi bench`: a load generator through the client library, for measuring the whole path
//! (client → IPC → scheme → driver → device) the way fio measures a block device.
//!
//! `jobs` connections, each with `iodepth` threads issuing one synchronous request at a time
//! (so `jobs × iodepth` requests are in flight). Jobs are spread round-robin over the given
//! disks. Every completed request's latency is kept (bounded), so percentiles are exact.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vscsi_ipc::{Client, OpenFlags};

/// What to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Rw {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads and writes, half each.
    Randrw,
}

/// Bench parameters.
pub struct BenchArgs {
    /// Disks to run against.
    pub paths: Vec<String>,
    /// Pattern.
    pub rw: Rw,
    /// Block size in bytes.
    pub bs: usize,
    /// Requests in flight per job.
    pub iodepth: usize,
    /// Connections.
    pub jobs: usize,
    /// Duration.
    pub runtime: Duration,
    /// Print one JSON object instead of text.
    pub json: bool,
}

/// Latency samples kept per thread (beyond this, only counts grow).
const MAX_SAMPLES_PER_THREAD: usize = 2_000_000;

/// Results.
pub struct BenchResult {
    /// Requests completed.
    pub ops: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Sorted latencies in nanoseconds.
    pub latencies: Vec<u64>,
}

impl BenchResult {
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i.min(self.latencies.len() - 1)] as f64 / 1000.0
    }
}

/// A small xorshift generator per thread (no shared state on the hot path).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Runs the benchmark; returns an error message on failure.
pub fn run(socket: &std::path::Path, a: &BenchArgs) -> Result<BenchResult, String> {
    if a.bs == 0 || a.iodepth == 0 || a.jobs == 0 || a.paths.is_empty() {
        return Err("bs, iodepth, jobs and at least one path must be non-zero".into());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let failure: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let mut threads = Vec::new();
    for job in 0..a.jobs {
        let client = Client::connect(socket).map_err(|e| e.to_string())?;
        let path = &a.paths[job % a.paths.len()];
        let flags = match a.rw {
            Rw::Randread | Rw::Read => OpenFlags::READ,
            _ => OpenFlags::READ_WRITE,
        };
        let h = Arc::new(client.open(path, flags).map_err(|e| format!("{path}: {e}"))?);
        let size = client.stat(&h).map_err(|e| format!("{path}: {e}"))?.size;
        let blocks = size / a.bs as u64;
        if blocks == 0 {
            return Err(format!("{path}: smaller than one {}-byte block", a.bs));
        }
        for t in 0..a.iodepth {
            let (client, h, stop, ops, failure) = (
                client.clone(),
                h.clone(),
                stop.clone(),
                ops.clone(),
                failure.clone(),
            );
            let (rw, bs) = (a.rw, a.bs);
            let seed = 0x9E37_79B9_7F4A_7C15u64 ^ ((job * 1000 + t) as u64 + 1);
            let stride = (a.jobs * a.iodepth) as u64;
            let first = (job * a.iodepth + t) as u64;
            threads.push(std::thread::spawn(move || {
                let mut rng = Rng(seed);
                let mut buf = vec![0xA5u8; bs];
                let mut lat = Vec::with_capacity(1 << 16);
                let mut seq = first;
                while !stop.load(Ordering::Relaxed) {
                    let (block, write) = match rw {
                        Rw::Randread => (rng.next() % blocks, false),
                        Rw::Randwrite => (rng.next() % blocks, true),
                        Rw::Randrw => (rng.next() % blocks, rng.next() & 1 == 1),
                        Rw::Read | Rw::Write => {
                            seq = (seq + stride) % blocks;
                            (seq, rw == Rw::Write)
                        }
                    };
                    let off = block * bs as u64;
                    let t0 = Instant::now();
                    let r = if write {
                        client.write_all_at(&h, off, &buf)
                    } else {
                        client.read_exact_at(&h, off, &mut buf)
                    };
                    let dt = t0.elapsed().as_nanos() as u64;
                    if let Err(e) = r {
                        *failure.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(format!("I/O at {off}: {e}"));
                        stop.store(true, Ordering::Relaxed);
                        break;
                    }
                    if lat.len() < MAX_SAMPLES_PER_THREAD {
                        lat.push(dt);
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                lat
            }));
        }
    }
    let start = Instant::now();
    let deadline = start + a.runtime;
    let mut last = 0;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200).min(deadline - Instant::now()));
        if !a.json {
            let now = ops.load(Ordering::Relaxed);
            let secs = start.elapsed().as_secs_f64();
            eprint!(
                "\r{:5.1}s  {:>10.0} IOPS avg  {:>8} ops   ",
                secs,
                now as f64 / secs.max(1e-9),
                now
            );
            let _ = std::io::stderr().flush();
            last = now;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let mut latencies = Vec::new();
    for t in threads {
        latencies.extend(t.join().map_err(|_| "a bench thread panicked".to_string())?);
    }
    if !a.json && last > 0 {
        eprintln!();
    }
    if let Some(f) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(f);
    }
    latencies.sort_unstable();
    let ops = ops.load(Ordering::Relaxed);
    Ok(BenchResult {
        ops,
        bytes: ops * a.bs as u64,
        elapsed,
        latencies,
    })
}

/// Prints the result as text or one JSON object.
pub fn report(a: &BenchArgs, r: &BenchResult) {
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    let iops = r.ops as f64 / secs;
    let mbs = r.bytes as f64 / secs / 1e6;
    let (p50, p99, p999) = (r.percentile(0.5), r.percentile(0.99), r.percentile(0.999));
    if a.json {
        println!(
            "{{\"rw\":\"{:?}\",\"bs\":{},\"iodepth\":{},\"jobs\":{},\"runtime_s\":{:.3},\"ops\":{},\"iops\":{:.1},\"mb_s\":{:.2},\"lat_p50_us\":{:.1},\"lat_p99_us\":{:.1},\"lat_p999_us\":{:.1}}}",
            a.rw, a.bs, a.iodepth, a.jobs, secs, r.ops, iops, mbs, p50, p99, p999
        );
    } else {
        println!(
            "{:?} bs={} iodepth={} jobs={}: {:.0} IOPS, {:.1} MB/s, latency p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us ({} ops in {:.1} s)",
            a.rw, a.bs, a.iodepth, a.jobs, iops, mbs, p50, p99, p999, r.ops, secs
        );
    }
}
