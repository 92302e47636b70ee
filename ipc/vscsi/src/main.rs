//! `vscsi`: command-line client for the `disk.virtio-scsi` block scheme served by virtio-scsid.
//!
//! Owns: argument parsing, number parsing (decimal, `0x` hex, K/M/G/T suffixes), streaming
//! reads to stdout and writes from stdin in chunks, `ls` (a table) and `stat` as text or JSON
//! (`--json`) with each disk's SCSI identity, `discard`, and one-line error reporting
//! (`vscsi: read disk.virtio-scsi:/7: No such file or directory (ENOENT)`, exit status 1;
//! bad usage exits with 2).

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

mod bench;
mod copy;

use clap::{Parser, Subcommand};
use syscall::error::{EINVAL, EOPNOTSUPP};
use syscall::flag::{MODE_DIR, MODE_FILE, MODE_PERM, MODE_TYPE, O_STAT};
use vscsi_ipc::client::{DiskDetails, DiskIdentity};
use vscsi_ipc::{Client, ClientError, OpenFlags, default_socket_path};

/// The scheme this tool talks to.
const SCHEME: &str = "disk.virtio-scsi";
/// Largest buffer used for streaming (one frame at most).
const STREAM_CHUNK: usize = 16 << 20;

#[derive(Parser, Debug)]
#[command(
    name = "vscsi",
    version,
    about = "Use the disks of virtio-scsid (the disk.virtio-scsi scheme)",
    after_help = "PATH is a disk like disk.virtio-scsi:/0 (or /0, or 0).\n\
                  Numbers are decimal or 0x hex, optionally with a K, M, G or T suffix (powers of 1024)."
)]
struct Cli {
    /// The daemon's socket (default: see `vscsi_ipc::default_socket_path`).
    #[arg(
        long,
        value_name = "PATH",
        global = true,
        help = "The daemon's socket [default: $VSCSI_SOCKET; else /run/virtio-scsid.sock as root; \
                else $XDG_RUNTIME_DIR/virtio-scsid.sock; else /tmp/virtio-scsid-<uid>.sock]"
    )]
    socket: Option<PathBuf>,
    /// Move requests and data through a shared-memory session (request rings and an arena of
    /// this many MiB) instead of the socket (every command but `bench`, which has `--ipc`, and
    /// `nbd`)
    #[arg(long, value_name = "MIB", global = true)]
    shm: Option<u32>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List the disks and partitions: size, block size, vendor/product and SCSI address
    Ls {
        /// Print one JSON array of {name, path, size, block_size, blocks, mode, kind,
        /// permissions, vendor, product, revision, serial, wwn, target, lun, can_discard}
        #[arg(long)]
        json: bool,
    },
    /// Show a disk's size, block size, block count, mode and SCSI identity (vendor, product,
    /// revision, serial, WWN, target and LUN)
    Stat {
        /// The disk, e.g. disk.virtio-scsi:/0
        path: String,
        /// Print one JSON object {path, size, block_size, blocks, mode, kind, permissions,
        /// uid, gid, vendor, product, revision, serial, wwn, target, lun, can_discard}
        #[arg(long)]
        json: bool,
    },
    /// Discard LENGTH bytes at OFFSET of a disk (whole blocks: both must be multiples of the
    /// block size); the device may then deallocate them
    #[command(after_help = "\
The range must lie inside the disk or partition and start and end on block boundaries (no
rounding, so no byte outside it is ever lost). What the discarded blocks read back as is the
device's business: a QEMU disk with discard=unmap on a raw image punches a hole in the file
(zeroes); with QEMU's default (discard=ignore) the old data stays. A read-only disk, or one
whose device cannot discard, is an error.")]
    Discard {
        /// The disk, e.g. disk.virtio-scsi:/0
        path: String,
        /// Byte offset to start at (a multiple of the block size)
        #[arg(long, value_parser = parse_num)]
        offset: u64,
        /// Number of bytes to discard (a multiple of the block size)
        #[arg(long, value_parser = parse_num)]
        length: u64,
    },
    /// Copy LENGTH bytes at OFFSET of a disk to standard output
    Read {
        /// The disk, e.g. disk.virtio-scsi:/0
        path: String,
        /// Byte offset to start at
        #[arg(long, value_parser = parse_num)]
        offset: u64,
        /// Number of bytes to read
        #[arg(long, value_parser = parse_num)]
        length: u64,
    },
    /// Write standard input (to its end) at OFFSET of a disk; use `sync` to make it durable
    Write {
        /// The disk, e.g. disk.virtio-scsi:/0
        path: String,
        /// Byte offset to start at
        #[arg(long, value_parser = parse_num)]
        offset: u64,
    },
    /// Flush a disk's write cache to stable storage
    Sync {
        /// The disk, e.g. disk.virtio-scsi:/0
        path: String,
    },
    /// Copy a host file to a disk or a disk to a host file, then read the destination back
    /// and print the CRC32C of what it holds
    #[command(after_help = "\
Examples:
  vscsi copy ./image.raw disk.virtio-scsi:/0 --offset 1M
  vscsi copy disk.virtio-scsi:/0 ./backup.raw --offset 0 --length 64M

A disk is written SCHEME:/N (disk.virtio-scsi:/0) or /scheme/SCHEME/N; anything else is a host
file (write ./a:b for a file whose name has a colon). One side must be a disk, the other a file.
A destination file is created or truncated to the length copied (a device keeps its size).

The copy moves --chunk bytes per request, --depth requests in flight. Then the destination is
flushed (SYNCHRONIZE CACHE on a disk, fsync on a file) and the copied range is READ BACK from the
destination: the printed CRC32C (Castagnoli) is computed over those read-back bytes, not over
what was sent, and it is compared with the CRC32C of the bytes read from the source; a mismatch
is an error (exit status 1). A progress bar is drawn on stderr when stderr is a terminal.")]
    Copy {
        /// Source: a host file, or a disk like disk.virtio-scsi:/0
        src: String,
        /// Destination: a disk like disk.virtio-scsi:/0, or a host file
        dst: String,
        /// Byte offset on the disk: where the file's bytes go, or where reading starts
        #[arg(long, value_parser = parse_num, default_value = "0")]
        offset: u64,
        /// Bytes to copy [default: the whole file, or the disk from --offset to its end]
        #[arg(long, value_parser = parse_num)]
        length: Option<u64>,
        /// Bytes per request
        #[arg(long, value_parser = parse_num, default_value = "4M")]
        chunk: u64,
        /// Requests in flight
        #[arg(long, default_value_t = copy::DEFAULT_DEPTH)]
        depth: usize,
    },
    /// Show the driver's counters: per-queue submissions and completions, steering
    Stats,
    /// Measure IOPS, bandwidth and latency through the scheme (writes destroy data)
    Bench {
        /// Disks to run against (jobs are spread round-robin over them)
        #[arg(required = true)]
        paths: Vec<String>,
        /// Access pattern
        #[arg(long, value_enum, default_value = "randread")]
        rw: bench::Rw,
        /// Block size
        #[arg(long, value_parser = parse_num, default_value = "4K")]
        bs: u64,
        /// Requests in flight per job
        #[arg(long, default_value_t = 32)]
        iodepth: usize,
        /// Jobs (one connection each)
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Seconds to run
        #[arg(long, default_value_t = 10.0)]
        runtime: f64,
        /// Print one JSON object (iops, mb_s, lat_p50_us, lat_p99_us, lat_p999_us, ...)
        #[arg(long)]
        json: bool,
        /// Transport: socket (data copied through the socket), shm (arena buffers, batched
        /// asynchronous submission: zero-copy), shm-copy (shared-memory rings, ordinary
        /// buffers: one copy through the arena)
        #[arg(long, value_enum, default_value = "socket")]
        ipc: bench::Ipc,
    },
    /// Serve every disk and partition as an NBD export (names 0, 1, 0p0, ...) until SIGTERM
    Nbd {
        /// Where to listen: unix:PATH or tcp:HOST:PORT (loopback only); may be repeated
        #[arg(long, required = true, value_name = "ADDR")]
        listen: Vec<nbd_gateway::ListenAddr>,
        /// Requests of one NBD connection executed at once
        #[arg(long, default_value_t = nbd_gateway::DEFAULT_WORKERS)]
        workers: usize,
    },
}

/// Parses `123`, `0x1f`, `4K`, `1M`, `2G`, `1T` (also `KiB`, `MiB`, ...; powers of 1024).
fn parse_num(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (digits, mult) = [
        ("kib", 1u64 << 10),
        ("mib", 1 << 20),
        ("gib", 1 << 30),
        ("tib", 1 << 40),
        ("k", 1 << 10),
        ("m", 1 << 20),
        ("g", 1 << 30),
        ("t", 1 << 40),
    ]
    .iter()
    .find_map(|(suf, m)| lower.strip_suffix(suf).map(|d| (d.to_owned(), *m)))
    .unwrap_or((lower.clone(), 1));
    let digits = digits.trim_end();
    let value = if let Some(hex) = digits.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else {
        digits.parse::<u64>()
    }
    .map_err(|_| format!("`{s}` is not a number (decimal, 0x hex, optional K/M/G/T)"))?;
    value
        .checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// An error with what we were doing: printed as `vscsi: <context>: <error>`.
struct Failure {
    context: String,
    error: String,
}

fn fail(context: impl Into<String>, e: impl std::fmt::Display) -> Failure {
    Failure {
        context: context.into(),
        error: e.to_string(),
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn mode_string(mode: u16) -> String {
    let kind = match mode & MODE_TYPE {
        MODE_DIR => "directory",
        MODE_FILE => "disk",
        _ => "other",
    };
    format!("{:o} ({kind}, permissions {:03o})", mode, mode & MODE_PERM)
}

fn connect(socket: &Option<PathBuf>, shm_mib: Option<u32>) -> Result<Client, Failure> {
    let path = socket.clone().unwrap_or_else(default_socket_path);
    let client = match shm_mib {
        Some(mib) => Client::connect_shm(&path, (mib as usize) << 20),
        None => Client::connect(&path),
    };
    client.map_err(|e| match e {
        // Its message already says what it was connecting to.
        ClientError::Connect { .. } => Failure {
            context: String::new(),
            error: e.to_string(),
        },
        e => fail(format!("connect {}", path.display()), e),
    })
}

/// A disk's status as JSON (`ls --json` entries, `stat --json`).
fn stat_json(path: &str, st: &vscsi_ipc::Stat) -> serde_json::Map<String, serde_json::Value> {
    let kind = match st.mode & MODE_TYPE {
        MODE_DIR => "directory",
        MODE_FILE => "disk",
        _ => "other",
    };
    let mut m = serde_json::Map::new();
    m.insert("path".into(), path.into());
    m.insert("size".into(), st.size.into());
    m.insert("block_size".into(), st.block_size.into());
    m.insert("blocks".into(), st.blocks.into());
    m.insert("mode".into(), st.mode.into());
    m.insert("kind".into(), kind.into());
    m.insert(
        "permissions".into(),
        format!("{:03o}", st.mode & MODE_PERM).into(),
    );
    m
}

/// Adds the identity fields (`null` when the device does not say) and `can_discard`.
fn identity_json(m: &mut serde_json::Map<String, serde_json::Value>, d: &DiskDetails) {
    let id = d.identity.as_ref();
    let text = |f: fn(&DiskIdentity) -> Option<&str>| -> serde_json::Value {
        id.and_then(f).map_or(serde_json::Value::Null, Into::into)
    };
    m.insert("vendor".into(), text(|i| Some(&i.vendor)));
    m.insert("product".into(), text(|i| Some(&i.product)));
    m.insert("revision".into(), text(|i| Some(&i.revision)));
    m.insert("serial".into(), text(|i| i.serial.as_deref()));
    m.insert("wwn".into(), text(|i| i.wwn.as_deref()));
    let num = |v: Option<u32>| v.map_or(serde_json::Value::Null, Into::into);
    m.insert("target".into(), num(id.map(|i| i.target)));
    m.insert("lun".into(), num(id.map(|i| i.lun)));
    m.insert("can_discard".into(), d.can_discard.into());
}

/// `target:lun`, or `-` when the device does not say.
fn lun_address(d: &DiskDetails) -> String {
    d.identity
        .as_ref()
        .map_or_else(|| "-".to_owned(), |i| format!("{}:{}", i.target, i.lun))
}

/// `vendor product`, or `-` when the device does not say.
fn vendor_product(d: &DiskDetails) -> String {
    match &d.identity {
        Some(i) => {
            let vp = format!("{} {}", i.vendor, i.product);
            if vp.trim().is_empty() {
                "-".to_owned()
            } else {
                vp.trim().to_owned()
            }
        }
        None => "-".to_owned(),
    }
}

/// The status and the identity of `path`, through one `O_STAT` handle (no I/O, no locks).
fn describe(c: &Client, path: &str) -> Result<(vscsi_ipc::Stat, DiskDetails, String), ClientError> {
    let h = c.open_with_flags(path, O_STAT)?;
    let got = c.stat(&h).and_then(|st| {
        let details = c.identity(&h)?;
        let canonical = c.fpath(&h)?;
        Ok((st, details, canonical))
    });
    let closed = c.close(h);
    let got = got?;
    closed?;
    Ok(got)
}

/// Lays out rows in columns: each column as wide as its widest cell, numbers (`right`) aligned
/// right, two spaces between columns, no trailing blanks.
fn table(rows: &[Vec<String>], right: &[bool]) -> Vec<String> {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|r| {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                if c > 0 {
                    line.push_str("  ");
                }
                let pad = width[c].saturating_sub(cell.chars().count());
                if right.get(c).copied().unwrap_or(false) {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    if c + 1 < r.len() {
                        line.push_str(&" ".repeat(pad));
                    }
                }
            }
            line
        })
        .collect()
}

fn ls(c: &Client, json: bool) -> Result<(), Failure> {
    let entries = c
        .list(SCHEME)
        .map_err(|e| fail(format!("ls {SCHEME}"), e))?;
    let mut out = io::stdout().lock();
    let mut first_err = None;
    let mut rows = vec![vec![
        "DISK".to_owned(),
        "SIZE".to_owned(),
        "BLOCK".to_owned(),
        "VENDOR/PRODUCT".to_owned(),
        "LUN".to_owned(),
    ]];
    let mut objects = Vec::new();
    for entry in entries {
        let path = format!("{SCHEME}:/{entry}");
        match describe(c, &path) {
            Ok((st, details, _)) if json => {
                let mut m = serde_json::Map::new();
                m.insert("name".into(), entry.as_str().into());
                m.extend(stat_json(&path, &st));
                identity_json(&mut m, &details);
                objects.push(serde_json::Value::Object(m));
            }
            Ok((st, details, _)) => rows.push(vec![
                path,
                human(st.size),
                st.block_size.to_string(),
                vendor_product(&details),
                lun_address(&details),
            ]),
            Err(e) => {
                eprintln!("vscsi: ls {path}: {e}");
                first_err.get_or_insert(fail(format!("ls {path}"), e));
            }
        }
    }
    let lines = if json {
        vec![serde_json::Value::Array(objects).to_string()]
    } else {
        table(&rows, &[false, true, true, false, false])
    };
    for l in lines {
        writeln!(out, "{l}").map_err(|e| fail("writing to standard output", e))?;
    }
    match first_err {
        // Already reported per entry; exit 1 without repeating it.
        Some(_) => Err(Failure {
            context: String::new(),
            error: String::new(),
        }),
        None => Ok(()),
    }
}

fn stat(c: &Client, path: &str, json: bool) -> Result<(), Failure> {
    let (st, details, canonical) =
        describe(c, path).map_err(|e| fail(format!("stat {path}"), e))?;
    let text = if json {
        let mut m = stat_json(&canonical, &st);
        m.insert("uid".into(), st.uid.into());
        m.insert("gid".into(), st.gid.into());
        identity_json(&mut m, &details);
        format!("{}\n", serde_json::Value::Object(m))
    } else {
        let mut t = format!(
            "path:       {canonical}\nsize:       {} ({})\nblock size: {}\nblocks:     {}\nmode:       {}\n",
            st.size,
            human(st.size),
            st.block_size,
            st.blocks,
            mode_string(st.mode)
        );
        if let Some(id) = &details.identity {
            let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
            t.push_str(&format!(
                "vendor:     {}\nproduct:    {}\nrevision:   {}\nserial:     {}\nwwn:        {}\n\
                 target/lun: {}:{}\n",
                id.vendor,
                id.product,
                id.revision,
                or_none(&id.serial),
                or_none(&id.wwn),
                id.target,
                id.lun
            ));
        }
        if !st.is_dir {
            let yes = if details.can_discard { "yes" } else { "no" };
            t.push_str(&format!("discard:    {yes}\n"));
        }
        t
    };
    io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(|e| fail("writing to standard output", e))
}

fn read(c: &Client, path: &str, offset: u64, length: u64) -> Result<(), Failure> {
    let ctx = || format!("read {path}");
    if offset.checked_add(length).is_none() {
        return Err(fail(ctx(), "offset + length overflows"));
    }
    let h = c.open(path, OpenFlags::READ).map_err(|e| fail(ctx(), e))?;
    let chunk = c.chunk_size().min(STREAM_CHUNK);
    let mut buf = vec![0u8; usize::try_from(length).unwrap_or(usize::MAX).min(chunk)];
    let mut out = io::stdout().lock();
    let mut done = 0u64;
    while done < length {
        let n = usize::try_from(length - done)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let got = c
            .read_at(&h, offset + done, &mut buf[..n])
            .map_err(|e| fail(ctx(), e))?;
        out.write_all(&buf[..got])
            .map_err(|e| fail(format!("{}: writing to standard output", ctx()), e))?;
        done += got as u64;
        if got < n {
            let _ = out.flush();
            return Err(fail(
                ctx(),
                ClientError::UnexpectedEof {
                    offset,
                    expected: usize::try_from(length).unwrap_or(usize::MAX),
                    got: usize::try_from(done).unwrap_or(usize::MAX),
                },
            ));
        }
    }
    out.flush()
        .map_err(|e| fail(format!("{}: writing to standard output", ctx()), e))?;
    c.close(h).map_err(|e| fail(ctx(), e))
}

fn write(c: &Client, path: &str, offset: u64) -> Result<(), Failure> {
    let ctx = || format!("write {path}");
    let h = c.open(path, OpenFlags::WRITE).map_err(|e| fail(ctx(), e))?;
    let mut buf = vec![0u8; c.chunk_size().min(STREAM_CHUNK)];
    let mut input = io::stdin().lock();
    let mut done = 0u64;
    loop {
        let n = vscsi_ipc::protocol::read_full(&mut input, &mut buf)
            .map_err(|e| fail(format!("{}: reading standard input", ctx()), e))?;
        if n == 0 {
            break;
        }
        let at = offset
            .checked_add(done)
            .ok_or_else(|| fail(ctx(), "offset overflows"))?;
        c.write_all_at(&h, at, &buf[..n])
            .map_err(|e| fail(ctx(), e))?;
        done += n as u64;
        if n < buf.len() {
            break;
        }
    }
    c.close(h).map_err(|e| fail(ctx(), e))
}

fn discard(c: &Client, path: &str, offset: u64, length: u64) -> Result<(), Failure> {
    let ctx = || format!("discard {path}");
    let h = c.open(path, OpenFlags::WRITE).map_err(|e| fail(ctx(), e))?;
    if let Err(e) = c.discard(&h, offset, length) {
        // Say why in terms of this disk, not just the errno.
        let why = match (e.errno(), c.stat(&h)) {
            (Some(EINVAL), Ok(st)) => format!(
                "{e}: offset and length must be multiples of the {}-byte block size and the \
                 range must end by {} (the size)",
                st.block_size, st.size
            ),
            (Some(EOPNOTSUPP), _) => format!("{e}: this disk cannot discard"),
            _ => e.to_string(),
        };
        let _ = c.close(h);
        return Err(fail(ctx(), why));
    }
    c.close(h).map_err(|e| fail(ctx(), e))
}

fn sync(c: &Client, path: &str) -> Result<(), Failure> {
    let ctx = || format!("sync {path}");
    let h = c.open(path, OpenFlags::READ).map_err(|e| fail(ctx(), e))?;
    c.sync(&h).map_err(|e| fail(ctx(), e))?;
    c.close(h).map_err(|e| fail(ctx(), e))
}

/// `vscsi copy`: see the subcommand's help and copy.rs.
fn copy(c: &Client, args: copy::CopyArgs) -> Result<(), Failure> {
    let ctx = format!("copy {} -> {}", args.src, args.dst);
    let r = copy::run(c, &args).map_err(|e| fail(&ctx, e))?;
    let secs = r.copy_time.as_secs_f64();
    let rate = if secs > 0.0 {
        human((r.bytes as f64 / secs) as u64)
    } else {
        "-".to_owned()
    };
    let text = format!(
        "copied {} bytes ({}) {} -> {} (disk offset {}) in {secs:.2} s, flush included \
         ({rate}/s); read back in {:.2} s\n\
         crc32c: {:08x} (of the bytes read back from {}; equal to that of the bytes read from {})\n",
        r.bytes,
        human(r.bytes),
        args.src,
        args.dst,
        args.offset,
        r.verify_time.as_secs_f64(),
        r.crc32c,
        args.dst,
        args.src
    );
    io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(|e| fail("writing to standard output", e))
}

fn stats(c: &Client) -> Result<(), Failure> {
    let text = c.stats().map_err(|e| fail("stats", e))?;
    print!("{text}");
    Ok(())
}

/// `vscsi nbd`: binds the listening sockets, prints `ready`, serves until SIGTERM/SIGINT
/// (then finishes the requests in flight, closes every connection and removes its sockets).
fn nbd(
    socket: Option<PathBuf>,
    listen: Vec<nbd_gateway::ListenAddr>,
    workers: usize,
) -> Result<(), Failure> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .try_init();
    // Signals first, so one during start-up is not lost.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| fail("nbd: signal handlers", e))?;
    let daemon = socket.unwrap_or_else(default_socket_path);
    let (scheme, exports) = nbd_gateway::probe(&daemon).map_err(|e| match e {
        ClientError::Connect { .. } => fail("nbd", e),
        e => fail(format!("nbd: {}", daemon.display()), e),
    })?;
    let mut config = nbd_gateway::GatewayConfig::new(daemon, listen);
    config.workers_per_connection = workers;
    let gateway = nbd_gateway::Gateway::bind(config).map_err(|e| fail("nbd", e))?;
    let addrs = gateway.local_addrs().map_err(|e| fail("nbd", e))?;
    let stop = gateway.shutdown_handle();
    std::thread::spawn(move || {
        for _ in signals.forever() {
            stop.shutdown();
        }
    });
    let names: Vec<String> = exports
        .iter()
        .map(|e| {
            let ro = if e.read_only { ", read-only" } else { "" };
            let trim = if e.can_trim { ", trim" } else { "" };
            format!(
                "{} ({} bytes, {}-byte blocks{ro}{trim})",
                e.name, e.size, e.block_size
            )
        })
        .collect();
    let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let names = if names.is_empty() {
        "(none yet)".to_owned()
    } else {
        names.join(", ")
    };
    println!(
        "vscsi nbd: ready: {scheme} exports {names} on {}",
        addrs.join(", ")
    );
    let _ = io::stdout().flush();
    gateway.run().map_err(|e| fail("nbd", e))
}

fn run(cli: Cli) -> Result<(), Failure> {
    if let Cmd::Nbd { listen, workers } = cli.cmd {
        return nbd(cli.socket, listen, workers);
    }
    if let Cmd::Bench {
        paths,
        rw,
        bs,
        iodepth,
        jobs,
        runtime,
        json,
        ipc,
    } = cli.cmd
    {
        let socket = cli.socket.unwrap_or_else(default_socket_path);
        let args = bench::BenchArgs {
            paths,
            rw,
            bs: usize::try_from(bs).map_err(|_| fail("bench", "block size too large"))?,
            iodepth,
            jobs,
            runtime: std::time::Duration::try_from_secs_f64(runtime)
                .map_err(|e| fail("bench", e))?,
            json,
            ipc,
        };
        let r = bench::run(&socket, &args).map_err(|e| fail("bench", e))?;
        bench::report(&args, &r);
        return Ok(());
    }
    let c = connect(&cli.socket, cli.shm)?;
    match cli.cmd {
        Cmd::Ls { json } => ls(&c, json),
        Cmd::Stat { path, json } => stat(&c, &path, json),
        Cmd::Copy {
            src,
            dst,
            offset,
            length,
            chunk,
            depth,
        } => copy(
            &c,
            copy::CopyArgs {
                src,
                dst,
                offset,
                length,
                chunk: usize::try_from(chunk).unwrap_or(usize::MAX),
                depth,
            },
        ),
        Cmd::Read {
            path,
            offset,
            length,
        } => read(&c, &path, offset, length),
        Cmd::Write { path, offset } => write(&c, &path, offset),
        Cmd::Sync { path } => sync(&c, &path),
        Cmd::Discard {
            path,
            offset,
            length,
        } => discard(&c, &path, offset, length),
        Cmd::Stats => stats(&c),
        Cmd::Bench { .. } => Ok(()),
        Cmd::Nbd { .. } => Ok(()), // served above, without this connection
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            match (f.context.is_empty(), f.error.is_empty()) {
                (_, true) => {}
                (true, false) => eprintln!("vscsi: {}", f.error),
                (false, false) => eprintln!("vscsi: {}: {}", f.context, f.error),
            }
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn numbers() {
        assert_eq!(parse_num("0"), Ok(0));
        assert_eq!(parse_num("4096"), Ok(4096));
        assert_eq!(parse_num("0x1000"), Ok(4096));
        assert_eq!(parse_num("0X10"), Ok(16));
        assert_eq!(parse_num("4K"), Ok(4096));
        assert_eq!(parse_num("4k"), Ok(4096));
        assert_eq!(parse_num("1M"), Ok(1 << 20));
        assert_eq!(parse_num("2MiB"), Ok(2 << 20));
        assert_eq!(parse_num("1G"), Ok(1 << 30));
        assert_eq!(parse_num("0x2M"), Ok(2 << 20));
        assert!(parse_num("").is_err());
        assert!(parse_num("-1").is_err());
        assert!(parse_num("1.5M").is_err());
        assert!(parse_num("12q").is_err());
        assert!(parse_num("0x").is_err());
        assert!(parse_num("99999999999T").is_err());
    }

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn tables_align_columns() {
        let rows = vec![
            vec!["DISK".into(), "SIZE".into(), "VENDOR".into()],
            vec!["disk:/0".into(), "4.0 MiB".into(), "QEMU X".into()],
            vec!["disk:/10".into(), "512 B".into(), "-".into()],
        ];
        assert_eq!(
            table(&rows, &[false, true, false]),
            vec![
                "DISK         SIZE  VENDOR",
                "disk:/0   4.0 MiB  QEMU X",
                "disk:/10    512 B  -",
            ]
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(64 << 20), "64.0 MiB");
        assert_eq!(
            mode_string(MODE_FILE | 0o644),
            "100644 (disk, permissions 644)"
        );
    }
}
