//! `vscsi bench`: a load generator through the client library, for measuring the whole path
//! (client → IPC → scheme → driver → device) the way fio measures a block device.
//!
//! `jobs` connections, `iodepth` requests in flight on each (so `jobs × iodepth` in all). Jobs
//! are spread round-robin over the given disks. Every completed request's latency is kept
//! (bounded), so percentiles are exact. The transport (`--ipc`):
//! - `socket`: `iodepth` threads per job, each issuing one synchronous `read_at`/`write_at` at
//!   a time; data is copied through the socket.
//! - `shm-copy`: the same threads over a shared-memory session: ordinary buffers, one copy
//!   through the arena.
//! - `shm`: one thread per job keeps `iodepth` requests in flight from arena buffers with
//!   batched asynchronous submission (`prep_*`, `submit`, `reap`): no copy in the IPC.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vscsi_ipc::{ArenaBuf, Client, Handle, OpenFlags, Ticket};

/// How requests reach the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Ipc {
    /// Synchronous calls over the socket (data copied through it).
    Socket,
    /// Shared-memory rings, arena buffers, batched asynchronous submission (zero-copy).
    Shm,
    /// Shared-memory rings with ordinary buffers (one copy through the arena).
    ShmCopy,
}

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
    /// Transport.
    pub ipc: Ipc,
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

/// Where the next request of a thread goes: (block, is a write).
struct Picker {
    rng: Rng,
    rw: Rw,
    blocks: u64,
    seq: u64,
    stride: u64,
}

impl Picker {
    fn next(&mut self) -> (u64, bool) {
        match self.rw {
            Rw::Randread => (self.rng.next() % self.blocks, false),
            Rw::Randwrite => (self.rng.next() % self.blocks, true),
            Rw::Randrw => (self.rng.next() % self.blocks, self.rng.next() & 1 == 1),
            Rw::Read | Rw::Write => {
                self.seq = (self.seq + self.stride) % self.blocks;
                (self.seq, self.rw == Rw::Write)
            }
        }
    }
}

type Failure = Arc<Mutex<Option<String>>>;

fn record_failure(failure: &Failure, stop: &AtomicBool, msg: String) {
    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
    stop.store(true, Ordering::Relaxed);
}

/// One `--ipc shm` job: `iodepth` requests in flight from arena buffers, one thread.
fn shm_job(
    client: &Client,
    h: &Handle,
    mut pick: Picker,
    a: (usize, usize),
    stop: &AtomicBool,
    ops: &AtomicU64,
    failure: &Failure,
) -> Vec<u64> {
    let (bs, depth) = a;
    let mut lat = Vec::with_capacity(1 << 16);
    let mut bufs: Vec<ArenaBuf> = Vec::with_capacity(depth);
    for _ in 0..depth {
        match client.alloc_buf(bs) {
            Ok(mut b) => {
                b.fill(0xA5);
                bufs.push(b);
            }
            Err(e) => {
                record_failure(
                    failure,
                    stop,
                    format!("arena buffer of {bs} bytes (raise the arena or lower iodepth): {e}"),
                );
                return lat;
            }
        }
    }
    let mut started: HashMap<Ticket, (Instant, u64)> = HashMap::with_capacity(depth * 2);
    let mut out = Vec::with_capacity(depth);
    loop {
        let more = !stop.load(Ordering::Relaxed);
        while more && let Some(b) = bufs.pop() {
            let (block, write) = pick.next();
            let off = block * bs as u64;
            let r = if write {
                client.prep_write(h, off, b)
            } else {
                client.prep_read(h, off, b)
            };
            match r {
                Ok(t) => {
                    started.insert(t, (Instant::now(), off));
                }
                Err(e) => {
                    record_failure(failure, stop, format!("queueing I/O at {off}: {}", e.error));
                    return lat;
                }
            }
        }
        if started.is_empty() {
            return lat;
        }
        if let Err(e) = client.submit() {
            record_failure(failure, stop, format!("submit: {e}"));
            return lat;
        }
        out.clear();
        if let Err(e) = client.reap(1, Some(Duration::from_secs(30)), &mut out) {
            record_failure(failure, stop, format!("reap: {e}"));
            return lat;
        }
        let now = Instant::now();
        for c in out.drain(..) {
            let (t0, off) = started.remove(&c.ticket).unwrap_or((now, 0));
            match c.result {
                Ok(n) if n == bs => {}
                Ok(n) => {
                    record_failure(failure, stop, format!("I/O at {off}: {n} of {bs} bytes"));
                }
                Err(e) => record_failure(failure, stop, format!("I/O at {off}: {e}")),
            }
            if let Some(b) = c.buf {
                bufs.push(b);
            }
            if lat.len() < MAX_SAMPLES_PER_THREAD {
                lat.push((now - t0).as_nanos() as u64);
            }
            ops.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Runs the benchmark; returns an error message on failure.
pub fn run(socket: &std::path::Path, a: &BenchArgs) -> Result<BenchResult, String> {
    if a.bs == 0 || a.iodepth == 0 || a.jobs == 0 || a.paths.is_empty() {
        return Err("bs, iodepth, jobs and at least one path must be non-zero".into());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let failure: Failure = Arc::new(Mutex::new(None));
    let mut threads = Vec::new();
    for job in 0..a.jobs {
        let client = match a.ipc {
            Ipc::Socket => Client::connect(socket),
            Ipc::Shm | Ipc::ShmCopy => {
                // Room for every buffer in flight, rounded up to 2 MiB.
                let want = (a.bs.saturating_mul(a.iodepth + 1)).next_multiple_of(2 << 20);
                Client::connect_shm(socket, want)
            }
        }
        .map_err(|e| e.to_string())?;
        let path = &a.paths[job % a.paths.len()];
        let flags = match a.rw {
            Rw::Randread | Rw::Read => OpenFlags::READ,
            _ => OpenFlags::READ_WRITE,
        };
        let h = Arc::new(
            client
                .open(path, flags)
                .map_err(|e| format!("{path}: {e}"))?,
        );
        let size = client.stat(&h).map_err(|e| format!("{path}: {e}"))?.size;
        let blocks = size / a.bs as u64;
        if blocks == 0 {
            return Err(format!("{path}: smaller than one {}-byte block", a.bs));
        }
        if a.ipc == Ipc::Shm {
            let (stop, ops, failure) = (stop.clone(), ops.clone(), failure.clone());
            let pick = Picker {
                rng: Rng(0x9E37_79B9_7F4A_7C15u64 ^ (job as u64 * 1000 + 1)),
                rw: a.rw,
                blocks,
                seq: job as u64,
                stride: a.jobs as u64,
            };
            let (bs, depth) = (a.bs, a.iodepth);
            threads.push(std::thread::spawn(move || {
                shm_job(&client, &h, pick, (bs, depth), &stop, &ops, &failure)
            }));
            continue;
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
                let mut pick = Picker {
                    rng: Rng(seed),
                    rw,
                    blocks,
                    seq: first,
                    stride,
                };
                let mut buf = vec![0xA5u8; bs];
                let mut lat = Vec::with_capacity(1 << 16);
                while !stop.load(Ordering::Relaxed) {
                    let (block, write) = pick.next();
                    let off = block * bs as u64;
                    let t0 = Instant::now();
                    let r = if write {
                        client.write_all_at(&h, off, &buf)
                    } else {
                        client.read_exact_at(&h, off, &mut buf)
                    };
                    let dt = t0.elapsed().as_nanos() as u64;
                    if let Err(e) = r {
                        record_failure(&failure, &stop, format!("I/O at {off}: {e}"));
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
        latencies.extend(
            t.join()
                .map_err(|_| "a bench thread panicked".to_string())?,
        );
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
            "{{\"rw\":\"{:?}\",\"ipc\":\"{:?}\",\"bs\":{},\"iodepth\":{},\"jobs\":{},\"runtime_s\":{:.3},\"ops\":{},\"iops\":{:.1},\"mb_s\":{:.2},\"lat_p50_us\":{:.1},\"lat_p99_us\":{:.1},\"lat_p999_us\":{:.1}}}",
            a.rw, a.ipc, a.bs, a.iodepth, a.jobs, secs, r.ops, iops, mbs, p50, p99, p999
        );
    } else {
        println!(
            "{:?} ipc={:?} bs={} iodepth={} jobs={}: {:.0} IOPS, {:.1} MB/s, latency p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us ({} ops in {:.1} s)",
            a.rw, a.ipc, a.bs, a.iodepth, a.jobs, iops, mbs, p50, p99, p999, r.ops, secs
        );
    }
}
