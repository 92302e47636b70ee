//! `vscsi copy SRC DST`: copies bytes between a host file and a disk of the scheme, in either
//! direction, then checks them.
//!
//! Owns: telling a disk (`SCHEME:/N`, `/scheme/SCHEME/N`) from a host file, sizing the copy
//! (`--offset`, `--length`, the disk's and the file's sizes, checked before any byte moves),
//! the copy itself (chunks of `--chunk` bytes, `--depth` of them in flight on one connection,
//! each chunk a pipelined `read_at`/`write_at` of the client library), the flush (SYNCHRONIZE
//! CACHE on a destination disk, fsync on a destination file), the verification (the destination
//! range is READ BACK after the flush and its CRC32C compared with the CRC32C of the bytes read
//! from the source), and the progress bar on stderr (only when stderr is a terminal).
//!
//! CRC32C (Castagnoli, as in iSCSI and ext4) is computed per chunk in parallel and combined in
//! order (`crc32c_combine`), so the printed value is the CRC32C of the whole range as one
//! stream: `crc32c` tools and libraries give the same number for the same bytes.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vscsi_ipc::{Client, Handle, OpenFlags};

/// Default chunks in flight.
pub const DEFAULT_DEPTH: usize = 4;
/// Largest chunk accepted (a buffer of this size per chunk in flight).
pub const MAX_CHUNK: usize = 256 << 20;
/// Most chunks in flight accepted.
pub const MAX_DEPTH: usize = 64;

/// One end of a copy, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A disk of the scheme, e.g. `disk.virtio-scsi:/0`.
    Disk(String),
    /// A host file.
    File(PathBuf),
}

impl Endpoint {
    /// `SCHEME:REST` with no `/` in SCHEME, or `/scheme/...`, is a disk; anything else is a host
    /// file (write `./a:b` for a file whose name has a colon).
    pub fn parse(s: &str) -> Endpoint {
        let disk = s.starts_with("/scheme/")
            || s.split_once(':')
                .is_some_and(|(scheme, _)| !scheme.is_empty() && !scheme.contains('/'));
        if disk {
            Endpoint::Disk(s.to_owned())
        } else {
            Endpoint::File(PathBuf::from(s))
        }
    }
}

/// What to copy.
#[derive(Clone, Debug)]
pub struct CopyArgs {
    /// Source, as given.
    pub src: String,
    /// Destination, as given.
    pub dst: String,
    /// Byte offset on the disk (where the file's bytes go, or where reading starts).
    pub offset: u64,
    /// Bytes to copy (default: the whole file, or the disk from `offset` to its end).
    pub length: Option<u64>,
    /// Bytes per chunk.
    pub chunk: usize,
    /// Chunks in flight.
    pub depth: usize,
}

/// What was done.
#[derive(Clone, Debug)]
pub struct CopyReport {
    /// Bytes copied.
    pub bytes: u64,
    /// Time of the copy and its flush (without the read-back).
    pub copy_time: Duration,
    /// Time of the read-back.
    pub verify_time: Duration,
    /// CRC32C of the bytes read back from the destination (equal to that of the bytes sent).
    pub crc32c: u32,
}

/// One side of the copy: positional, exact-length I/O.
trait Side: Sync {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
    fn write_all_at(&self, offset: u64, buf: &[u8]) -> Result<(), String>;
    fn name(&self) -> &str;
}

struct DiskSide<'a> {
    client: &'a Client,
    handle: Handle,
    path: String,
}

impl Side for DiskSide<'_> {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.client
            .read_exact_at(&self.handle, offset, buf)
            .map_err(|e| format!("reading {} at offset {offset}: {e}", self.path))
    }
    fn write_all_at(&self, offset: u64, buf: &[u8]) -> Result<(), String> {
        self.client
            .write_all_at(&self.handle, offset, buf)
            .map_err(|e| format!("writing {} at offset {offset}: {e}", self.path))
    }
    fn name(&self) -> &str {
        &self.path
    }
}

struct FileSide {
    file: File,
    path: String,
}

impl Side for FileSide {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                format!(
                    "reading {} at offset {offset}: the file ended (did it shrink during the copy?)",
                    self.path
                )
            } else {
                format!("reading {} at offset {offset}: {e}", self.path)
            }
        })
    }
    fn write_all_at(&self, offset: u64, buf: &[u8]) -> Result<(), String> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| format!("writing {} at offset {offset}: {e}", self.path))
    }
    fn name(&self) -> &str {
        &self.path
    }
}

/// Size of an open file: regular files and block devices (seek to the end); pipes and other
/// streams have none.
fn file_size(f: &mut File, path: &str) -> Result<u64, String> {
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(|e| format!("{path}: cannot tell its size ({e}); copy needs a regular file"))?;
    f.seek(SeekFrom::Start(0))
        .map_err(|e| format!("{path}: {e}"))?;
    Ok(size)
}

/// Opens a disk.
fn open_disk<'a>(client: &'a Client, path: &str, flags: OpenFlags) -> Result<DiskSide<'a>, String> {
    let handle = client
        .open(path, flags)
        .map_err(|e| format!("open {path}: {e}"))?;
    Ok(DiskSide {
        client,
        handle,
        path: path.to_owned(),
    })
}

impl DiskSide<'_> {
    /// Closes the handle, reporting the server's result.
    fn close(self) -> Result<(), String> {
        self.client
            .close(self.handle)
            .map_err(|e| format!("close {}: {e}", self.path))
    }
}

fn disk_size(side: &DiskSide<'_>) -> Result<u64, String> {
    side.client
        .size(&side.handle)
        .map_err(|e| format!("size of {}: {e}", side.path))
}

/// Copies as `args` says; returns what was done. Every error is one line saying what failed.
pub fn run(client: &Client, args: &CopyArgs) -> Result<CopyReport, String> {
    if args.chunk == 0 || args.chunk > MAX_CHUNK {
        return Err(format!("--chunk must be 1 byte to {} MiB", MAX_CHUNK >> 20));
    }
    if args.depth == 0 || args.depth > MAX_DEPTH {
        return Err(format!("--depth must be 1 to {MAX_DEPTH}"));
    }
    match (Endpoint::parse(&args.src), Endpoint::parse(&args.dst)) {
        (Endpoint::File(src), Endpoint::Disk(dst)) => {
            let mut file = File::open(&src).map_err(|e| format!("open {}: {e}", src.display()))?;
            let src_name = src.display().to_string();
            let file_len = file_size(&mut file, &src_name)?;
            let length = match args.length {
                Some(n) if n > file_len => {
                    return Err(format!(
                        "--length {n} is more than the {file_len} bytes of {src_name}"
                    ));
                }
                Some(n) => n,
                None => file_len,
            };
            let disk = open_disk(client, &dst, OpenFlags::READ_WRITE)?;
            let size = disk_size(&disk)?;
            check_fits(length, args.offset, size, &dst)?;
            let src = FileSide {
                file,
                path: src_name,
            };
            let report = copy_and_verify(&src, 0, &disk, args.offset, length, args, |d| {
                d.client
                    .sync(&d.handle)
                    .map_err(|e| format!("sync {}: {e}", d.path))
            })?;
            disk.close()?;
            Ok(report)
        }
        (Endpoint::Disk(src), Endpoint::File(dst)) => {
            let disk = open_disk(client, &src, OpenFlags::READ)?;
            let size = disk_size(&disk)?;
            if args.offset > size {
                return Err(format!(
                    "--offset {} is past the end of {src} ({size} bytes)",
                    args.offset
                ));
            }
            let length = match args.length {
                Some(n) => {
                    check_fits(n, args.offset, size, &src)?;
                    n
                }
                None => size - args.offset,
            };
            let dst_name = dst.display().to_string();
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&dst)
                .map_err(|e| format!("open {dst_name}: {e}"))?;
            let meta = file.metadata().map_err(|e| format!("{dst_name}: {e}"))?;
            // A regular file gets exactly the bytes copied (like cp); a device keeps its size.
            if meta.is_file() {
                file.set_len(length)
                    .map_err(|e| format!("{dst_name}: cannot set its size to {length}: {e}"))?;
            }
            let dst = FileSide {
                file,
                path: dst_name,
            };
            let report = copy_and_verify(&disk, args.offset, &dst, 0, length, args, |f| {
                f.file
                    .sync_all()
                    .map_err(|e| format!("fsync {}: {e}", f.path))
            })?;
            disk.close()?;
            Ok(report)
        }
        (Endpoint::Disk(_), Endpoint::Disk(_)) => {
            Err("SRC and DST are both disks: one must be a host file (copy through a file)".into())
        }
        (Endpoint::File(_), Endpoint::File(_)) => Err(
            "neither SRC nor DST is a disk (a disk is written like disk.virtio-scsi:/0); use cp \
             for host files"
                .into(),
        ),
    }
}

fn check_fits(length: u64, offset: u64, size: u64, disk: &str) -> Result<(), String> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(format!(
            "{length} bytes at offset {offset} do not fit on {disk} ({size} bytes)"
        )),
    }
}

/// Copies `length` bytes, flushes the destination with `flush`, reads the destination range
/// back and checks its CRC32C against that of the bytes read from the source.
fn copy_and_verify<S: Side, D: Side>(
    src: &S,
    src_off: u64,
    dst: &D,
    dst_off: u64,
    length: u64,
    args: &CopyArgs,
    flush: impl FnOnce(&D) -> Result<(), String>,
) -> Result<CopyReport, String> {
    let chunk = args.chunk as u64;
    let start = Instant::now();
    let sent = parallel_chunks(length, chunk, args.depth, "copy", |_, off, buf| {
        src.read_exact_at(src_off + off, buf)?;
        dst.write_all_at(dst_off + off, buf)
    })?;
    flush(dst)?;
    let copy_time = start.elapsed();
    let start = Instant::now();
    let back = parallel_chunks(length, chunk, args.depth, "verify", |_, off, buf| {
        dst.read_exact_at(dst_off + off, buf)
    })?;
    let verify_time = start.elapsed();
    if let Some(i) = sent.iter().zip(&back).position(|(a, b)| a != b) {
        let at = dst_off + i as u64 * chunk;
        return Err(format!(
            "verification failed: what {} holds at offset {at} (read back after the flush) \
             differs from what was read from {}",
            dst.name(),
            src.name()
        ));
    }
    Ok(CopyReport {
        bytes: length,
        copy_time,
        verify_time,
        crc32c: combine(&back, length, chunk),
    })
}

/// The CRC32C of the whole range from the CRCs of its chunks (all `chunk` bytes but the last).
fn combine(crcs: &[u32], length: u64, chunk: u64) -> u32 {
    let mut acc = 0u32;
    for (i, crc) in crcs.iter().enumerate() {
        let start = i as u64 * chunk;
        let len = chunk.min(length - start);
        acc = if i == 0 {
            *crc
        } else {
            crc32c::crc32c_combine(acc, *crc, len as usize)
        };
    }
    acc
}

/// Runs `op(index, offset, buffer)` on every chunk of `[0, length)`, `depth` chunks at a time
/// on `depth` threads; returns the CRC32C of each chunk's buffer after `op`, in order. Stops at
/// the first error (chunks already in flight finish) and returns it.
fn parallel_chunks(
    length: u64,
    chunk: u64,
    depth: usize,
    label: &str,
    op: impl Fn(u64, u64, &mut [u8]) -> Result<(), String> + Sync,
) -> Result<Vec<u32>, String> {
    let count = length.div_ceil(chunk);
    let count_usize =
        usize::try_from(count).map_err(|_| "the copy has too many chunks".to_owned())?;
    let crcs = Mutex::new(vec![0u32; count_usize]);
    let next = AtomicU64::new(0);
    let done_bytes = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<String>> = Mutex::new(None);
    let finished = AtomicBool::new(false);
    let workers = depth.min(count_usize.max(1));
    let progress = Progress::new(label, length);
    std::thread::scope(|s| {
        let progress_thread = progress.as_ref().map(|p| {
            let done_bytes = &done_bytes;
            let finished = &finished;
            s.spawn(move || {
                while !finished.load(Ordering::Relaxed) {
                    p.draw(done_bytes.load(Ordering::Relaxed));
                    std::thread::park_timeout(Duration::from_millis(200));
                }
                p.clear();
            })
        });
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    // Allocated inside the thread, at most one chunk (the range may be shorter).
                    let mut buf = vec![0u8; chunk.min(length) as usize];
                    loop {
                        if failed.load(Ordering::Relaxed) {
                            return;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return;
                        }
                        let off = i * chunk;
                        let n = chunk.min(length - off) as usize;
                        match op(i, off, &mut buf[..n]) {
                            Ok(()) => {
                                let crc = crc32c::crc32c(&buf[..n]);
                                if let Ok(mut v) = crcs.lock() {
                                    v[i as usize] = crc;
                                }
                                done_bytes.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                if let Ok(mut first) = first_error.lock() {
                                    first.get_or_insert(e);
                                }
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        let mut panicked = false;
        for h in handles {
            panicked |= h.join().is_err();
        }
        finished.store(true, Ordering::Relaxed);
        if let Some(t) = progress_thread {
            t.thread().unpark();
            let _ = t.join();
        }
        if panicked {
            failed.store(true, Ordering::Relaxed);
            if let Ok(mut first) = first_error.lock() {
                first.get_or_insert_with(|| format!("{label}: a worker thread panicked"));
            }
        }
    });
    if failed.load(Ordering::Relaxed) {
        let e = first_error
            .into_inner()
            .ok()
            .flatten()
            .unwrap_or_else(|| format!("{label} failed"));
        return Err(e);
    }
    crcs.into_inner()
        .map_err(|_| format!("{label}: a worker thread panicked"))
}

/// A one-line progress bar on stderr, drawn only when stderr is a terminal.
struct Progress {
    label: String,
    total: u64,
    start: Instant,
}

impl Progress {
    fn new(label: &str, total: u64) -> Option<Progress> {
        std::io::stderr().is_terminal().then(|| Progress {
            label: label.to_owned(),
            total,
            start: Instant::now(),
        })
    }

    fn draw(&self, done: u64) {
        const WIDTH: u64 = 30;
        let frac = if self.total == 0 {
            1.0
        } else {
            done as f64 / self.total as f64
        };
        let filled = ((frac * WIDTH as f64) as u64).min(WIDTH) as usize;
        let secs = self.start.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let eta = if rate > 0.0 && done < self.total {
            format!("{:.0}s", (self.total - done) as f64 / rate)
        } else {
            "-".to_owned()
        };
        let line = format!(
            "\r\x1b[K{:<6} [{}{}] {:>3.0}%  {} / {}  {}/s  ETA {eta}",
            self.label,
            "#".repeat(filled),
            ".".repeat(WIDTH as usize - filled),
            frac * 100.0,
            crate::human(done),
            crate::human(self.total),
            crate::human(rate as u64),
        );
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(line.as_bytes());
        let _ = err.flush();
    }

    fn clear(&self) {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(b"\r\x1b[K");
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::parse("disk.virtio-scsi:/0"),
            Endpoint::Disk("disk.virtio-scsi:/0".into())
        );
        assert_eq!(
            Endpoint::parse("/scheme/disk.virtio-scsi/1"),
            Endpoint::Disk("/scheme/disk.virtio-scsi/1".into())
        );
        assert_eq!(
            Endpoint::parse("./a:b"),
            Endpoint::File(PathBuf::from("./a:b"))
        );
        assert_eq!(
            Endpoint::parse("/tmp/x.img"),
            Endpoint::File(PathBuf::from("/tmp/x.img"))
        );
        assert_eq!(
            Endpoint::parse("file"),
            Endpoint::File(PathBuf::from("file"))
        );
        assert_eq!(Endpoint::parse(":x"), Endpoint::File(PathBuf::from(":x")));
    }

    #[test]
    fn combined_crc_equals_whole_crc() {
        let data: Vec<u8> = (0..100_003u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for chunk in [1u64, 7, 4096, 65536, 100_003, 1 << 20] {
            let crcs: Vec<u32> = data.chunks(chunk as usize).map(crc32c::crc32c).collect();
            assert_eq!(
                combine(&crcs, data.len() as u64, chunk),
                crc32c::crc32c(&data),
                "chunk {chunk}"
            );
        }
        assert_eq!(combine(&[], 0, 4096), 0);
        // The standard check value of CRC-32C.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn parallel_chunks_sees_every_byte_once() {
        let length = 10 * 4096 + 17;
        let seen = Mutex::new(vec![0u8; length as usize]);
        let crcs = parallel_chunks(length, 4096, 3, "test", |_, off, buf| {
            for (k, b) in buf.iter_mut().enumerate() {
                *b = (off as usize + k) as u8;
            }
            let mut s = seen.lock().map_err(|_| "poisoned".to_owned())?;
            for k in 0..buf.len() {
                s[off as usize + k] += 1;
            }
            Ok(())
        })
        .expect("no error");
        assert!(seen.into_inner().expect("lock").iter().all(|&n| n == 1));
        let whole: Vec<u8> = (0..length as usize).map(|k| k as u8).collect();
        assert_eq!(combine(&crcs, length, 4096), crc32c::crc32c(&whole));
        let err = parallel_chunks(length, 4096, 2, "test", |i, _, _| {
            if i == 3 {
                Err("chunk 3 broke".to_owned())
            } else {
                Ok(())
            }
        })
        .expect_err("error");
        assert_eq!(err, "chunk 3 broke");
    }
}
