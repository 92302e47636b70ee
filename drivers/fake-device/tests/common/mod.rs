//! Shared test support: a panic recorder (the driver's completion thread is a separate thread,
//! so a panic there would otherwise only print), a watchdog that turns a hang into a failure,
//! host settings with short timeouts, and deterministic data patterns.
#![allow(dead_code)]

use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::Duration;

use fake_virtio_scsi::{FakeMachine, FakeSpec};
use virtio_scsi::{DriverError, HostConfig, ScsiHost};

static HOOK: Once = Once::new();
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Prints the driver's and the fake's log records to stderr when `FAKE_VSCSI_LOG` is set
/// (`error`, `warn`, `info`, `debug`).
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        let name = thread::current().name().unwrap_or("?").to_string();
        eprintln!("[{} {} {name}] {}", r.level(), r.target(), r.args());
    }
    fn flush(&self) {}
}

static LOGGER: StderrLog = StderrLog;

/// Installs (once) a panic hook that records every panic with its thread name, then runs the
/// default hook; and the stderr logger if `FAKE_VSCSI_LOG` asks for it.
pub fn record_panics() {
    HOOK.call_once(|| {
        if let Ok(level) = std::env::var("FAKE_VSCSI_LOG")
            && log::set_logger(&LOGGER).is_ok()
        {
            log::set_max_level(level.parse().unwrap_or(log::LevelFilter::Warn));
        }
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = thread::current().name().unwrap_or("<unnamed>").to_string();
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            PANICS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("thread {name} panicked at {at}: {msg}"));
            prev(info);
        }));
    });
}

/// Panics recorded so far (all threads, all tests of this binary).
pub fn panics() -> Vec<String> {
    PANICS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Panics recorded in threads whose name starts with one of `prefixes`.
pub fn panics_in(prefixes: &[&str]) -> Vec<String> {
    panics()
        .into_iter()
        .filter(|p| {
            prefixes
                .iter()
                .any(|x| p.starts_with(&format!("thread {x}")))
        })
        .collect()
}

/// Runs `f` on its own thread (named `name`) and waits at most `limit`. `Err` describes a
/// hang (the thread is left behind) or a panic.
pub fn with_watchdog<T: Send + 'static>(
    name: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = mpsc::channel();
    let h = thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        })
        .map_err(|e| e.to_string())?;
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => {
            let _ = h.join();
            Ok(v)
        }
        Ok(Err(p)) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            Err(format!("panicked: {msg}"))
        }
        Err(_) => Err(format!("hung: no result after {limit:?}{}", dump_stacks())),
    }
}

/// With `FAKE_VSCSI_GDB_ON_HANG=1`, writes every thread's stack (gdb attached to this
/// process) to a file in the temporary directory and returns a note naming it.
fn dump_stacks() -> String {
    if std::env::var("FAKE_VSCSI_GDB_ON_HANG").is_err() {
        return String::new();
    }
    let pid = std::process::id();
    let path = std::env::temp_dir().join(format!(
        "fake-vscsi-hang-{pid}-{}.txt",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    ));
    let out = std::process::Command::new("gdb")
        .args([
            "-p",
            &pid.to_string(),
            "-batch",
            "-ex",
            "thread apply all bt",
        ])
        .output();
    match out {
        Ok(o) => {
            let _ = std::fs::write(&path, &o.stdout);
            format!(" (thread stacks in {})", path.display())
        }
        Err(e) => format!(" (gdb failed: {e})"),
    }
}

/// Host settings for tests: short command and recovery timeouts, one small slot size, a small
/// scan.
pub fn host_config(timeout: Duration) -> HostConfig {
    HostConfig {
        queues: Some(1),
        slot_bytes: 16 * 1024,
        command_timeout: timeout,
        tmf_timeout: timeout,
        max_scan_target: 3,
        ..HostConfig::default()
    }
}

/// Threads of the driver whose panics are driver bugs.
pub const DRIVER_THREADS: &[&str] = &["vscsi-completion", "vscsi-events"];

/// A fake machine and a host started on it.
pub fn start(
    spec: FakeSpec,
    cfg: HostConfig,
) -> (Arc<FakeMachine>, Result<Arc<ScsiHost>, DriverError>) {
    let fake = FakeMachine::new(spec).expect("fake machine");
    let host = ScsiHost::start(fake.platform(), cfg);
    (fake, host)
}

/// Deterministic bytes for (seed, absolute offset).
pub fn pattern(seed: u64, start: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let o = start + i;
            (o.wrapping_mul(131) ^ (o >> 7) ^ seed.wrapping_mul(0x9e37_79b9)) as u8
        })
        .collect()
}

/// One step of a test's I/O sequence. Disk indices and LBAs are reduced modulo what the driver
/// found, so any values make a valid request.
#[derive(Clone, Debug)]
pub enum Op {
    /// Write `blocks` blocks of pattern `seed` at `lba`.
    Write {
        disk: usize,
        lba: u64,
        blocks: u64,
        seed: u64,
    },
    /// Read `blocks` blocks at `lba`.
    Read { disk: usize, lba: u64, blocks: u64 },
    /// SYNCHRONIZE CACHE.
    Flush { disk: usize },
    /// The device delivers these bytes as an event (with this used length).
    Event {
        bytes: Vec<u8>,
        used_len: Option<u32>,
    },
    /// The device puts an arbitrary used element on a virtqueue.
    Used { queue: u16, id: u32, len: u32 },
}

/// What one case did.
#[derive(Debug)]
pub struct CaseReport {
    /// `ScsiHost::start`: the number of disks found, or the error text.
    pub start: Result<usize, String>,
    /// Each operation actually run and its result.
    pub results: Vec<(String, Result<(), String>)>,
    /// Successful transfers whose bytes disagree with the fake's medium while the fake had
    /// told no lie (each is a driver bug).
    pub data_errors: Vec<String>,
    /// Errors without a message or errno (not "clear").
    pub unclear: Vec<String>,
    /// Successful transfers checked against the medium.
    pub verified: usize,
    /// The fake's findings at the end.
    pub stats: fake_virtio_scsi::FakeStats,
    /// The device status after `shutdown` (0 = reset).
    pub status_after_shutdown: u8,
    /// `ScsiHost::health` after the operations.
    pub health_at_end: Result<(), String>,
}

fn check_error(e: &DriverError, unclear: &mut Vec<String>) -> String {
    let text = e.to_string();
    if text.trim().is_empty() || e.errno() <= 0 {
        unclear.push(format!("{e:?}"));
    }
    text
}

/// Starts a host on a fake built from `spec`, switches to `io_plan` (if any) once the host is
/// up, runs `ops` and shuts down, checking every successful transfer against the medium as
/// long as the fake told no lie and the driver's view of each disk matches the fake's.
pub fn run_case(
    spec: FakeSpec,
    io_plan: Option<fake_virtio_scsi::FaultPlan>,
    ops: Vec<Op>,
    cfg: HostConfig,
) -> CaseReport {
    let units = spec.disks.clone();
    let (fake, host) = start(spec, cfg);
    let mut report = CaseReport {
        start: Err(String::new()),
        results: Vec::new(),
        data_errors: Vec::new(),
        unclear: Vec::new(),
        verified: 0,
        stats: fake.stats(),
        status_after_shutdown: 0,
        health_at_end: Err("not started".into()),
    };
    let host = match host {
        Ok(h) => h,
        Err(e) => {
            report.start = Err(check_error(&e, &mut report.unclear));
            report.stats = fake.stats();
            report.status_after_shutdown = report.stats.status;
            return report;
        }
    };
    let disks = host.disks();
    report.start = Ok(disks.len());
    if let Some(plan) = io_plan {
        fake.set_plan(plan);
    }
    // The driver's view must match the unit it addresses for data checks to mean anything.
    let faithful = |d: &virtio_scsi::Disk| {
        units.iter().any(|u| {
            u.target == d.target
                && u.lun == d.lun
                && u.block_size == d.block_size
                && u.blocks >= d.blocks
        })
    };
    for op in ops {
        if disks.is_empty() {
            break;
        }
        let clip = |d: &virtio_scsi::Disk, lba: u64, blocks: u64| {
            let lba = lba % d.blocks.max(1);
            let room = (d.blocks - lba).clamp(1, 64);
            (lba, 1 + blocks % room)
        };
        let lies_before = fake.stats().lies;
        let (d, name, res, check) = match op {
            Op::Event { bytes, used_len } => {
                let delivered = fake.inject_event(&bytes, used_len);
                report.results.push((
                    format!("event {:02x?}", &bytes[..bytes.len().min(4)]),
                    Ok(()),
                ));
                if delivered {
                    // Let the event thread act on it (probing sends commands).
                    thread::sleep(Duration::from_millis(2));
                }
                continue;
            }
            Op::Used { queue, id, len } => {
                fake.inject_used(queue, id, len);
                report
                    .results
                    .push((format!("used q{queue} id {id:#x} len {len}"), Ok(())));
                continue;
            }
            Op::Write {
                disk,
                lba,
                blocks,
                seed,
            } => {
                let d = &disks[disk % disks.len()];
                let (lba, n) = clip(d, lba, blocks);
                let bs = u64::from(d.block_size);
                let data = pattern(seed, lba * bs, (n * bs) as usize);
                let r = host.write(d, lba, &data);
                let name = format!("write {}:{} lba {lba} +{n}", d.target, d.lun);
                (d, name, r, Some((lba * bs, data)))
            }
            Op::Read { disk, lba, blocks } => {
                let d = &disks[disk % disks.len()];
                let (lba, n) = clip(d, lba, blocks);
                let bs = u64::from(d.block_size);
                let mut buf = vec![0u8; (n * bs) as usize];
                let r = host.read(d, lba, &mut buf);
                let name = format!("read {}:{} lba {lba} +{n}", d.target, d.lun);
                (d, name, r, Some((lba * bs, buf)))
            }
            Op::Flush { disk } => {
                let d = &disks[disk % disks.len()];
                let name = format!("flush {}:{}", d.target, d.lun);
                (d, name, host.flush(d), None)
            }
        };
        let stats = fake.stats();
        let honest = stats.lies == 0 && stats.lies == lies_before;
        if let (Ok(()), Some((at, bytes))) = (&res, &check)
            && honest
            && faithful(d)
        {
            let medium = fake.disk_read(d.target, d.lun, *at, bytes.len());
            if medium.as_deref() != Some(&bytes[..]) {
                report.data_errors.push(format!(
                    "{name}: driver reported success but the data differs from the medium"
                ));
            } else {
                report.verified += 1;
            }
        }
        let res = res.map_err(|e| check_error(&e, &mut report.unclear));
        report.results.push((name, res));
    }
    report.health_at_end = host.health().map_err(|e| e.to_string());
    host.shutdown();
    drop(host);
    report.stats = fake.stats();
    report.status_after_shutdown = report.stats.status;
    report
}
