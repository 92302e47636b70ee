//! One NBD client connection: the fixed newstyle negotiation, then the transmission phase.
//!
//! Owns: the option loop (`NBD_OPT_LIST`, `INFO`, `GO`, `EXPORT_NAME`, `ABORT`; everything else
//! refused with an error reply), the request reader, a small per-connection pool of workers
//! that run requests against the daemon through the client library and may reply out of order,
//! request validation (flags, bounds, sizes) and the simple replies.
//!
//! Each connection has its own [`Client`] (its own daemon connection), opened when the first
//! option needs the daemon; its handle is closed when the connection ends. Nothing a client
//! sends can panic this code: malformed input ends the connection (a hard disconnect, as the
//! protocol allows) or gets an error reply.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use vscsi_ipc::{Client, ClientError, Handle, OpenFlags};

use crate::export::{self, Export, LookupError, MAX_REQUEST};
use crate::listen::Stream;
use crate::proto::{self, OptionHeader, Request};

/// How long a client may take to send each negotiation message.
pub(crate) const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest option data we read; longer options are skipped and refused (`NBD_REP_ERR_TOO_BIG`).
const MAX_OPTION_DATA: u32 = 64 << 10;
/// Longest option data we skip before giving up on the client (a hard disconnect).
const MAX_OPTION_SKIP: u32 = 16 << 20;

/// What every connection shares.
pub(crate) struct ConnConfig {
    /// The daemon's socket.
    pub daemon_socket: PathBuf,
    /// Requests of one connection executed at once.
    pub workers: usize,
    /// Set when the gateway is stopping.
    pub stopping: vscsi_ipc::ShutdownHandle,
}

/// Why a connection ended other than by the client's choice.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

fn violation(msg: impl Into<String>) -> ConnError {
    ConnError::Protocol(msg.into())
}

/// Serves one connection to its end. `Ok` when the client ended it properly (or the gateway
/// stopped); an error for anything else, for the log.
pub(crate) fn serve(stream: &Stream, cfg: &ConnConfig) -> Result<(), ConnError> {
    stream.set_read_timeout(Some(NEGOTIATION_TIMEOUT))?;
    stream.set_write_timeout(Some(NEGOTIATION_TIMEOUT))?;
    let mut neg = Negotiation {
        stream,
        cfg,
        client: None,
        no_zeroes: false,
    };
    let Some((client, export, handle)) = neg.run()? else {
        return Ok(());
    };
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    log::debug!(
        "{}: transmission on export {} ({} bytes{})",
        stream.peer(),
        export.name,
        export.size,
        if export.read_only { ", read-only" } else { "" }
    );
    let outcome = transmission(stream, cfg, &client, &handle, &export);
    // An error here (the daemon gone) changes nothing for the NBD client.
    let _ = client.close(handle);
    outcome
}

struct Negotiation<'a> {
    stream: &'a Stream,
    cfg: &'a ConnConfig,
    client: Option<Client>,
    no_zeroes: bool,
}

/// The result of handling one option.
enum Next {
    Continue,
    /// Enter transmission with this export, opened.
    Transmit(Export, Handle),
    /// The client aborted.
    Close,
}

impl Negotiation<'_> {
    /// The handshake and the option loop: `Some` to enter transmission, `None` when the
    /// client aborted.
    fn run(&mut self) -> Result<Option<(Client, Export, Handle)>, ConnError> {
        let mut w = self.stream;
        w.write_all(&proto::greeting(
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
        ))?;
        let mut cf = [0u8; 4];
        if !read_message(self.stream, &mut cf)? {
            return Ok(None); // connected and left (a liveness probe, say)
        }
        let client_flags = u32::from_be_bytes(cf);
        let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
        if client_flags & !known != 0 {
            return Err(violation(format!("unknown client flags {client_flags:#x}")));
        }
        self.no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
        loop {
            let mut hb = [0u8; proto::OPTION_HEADER_LEN];
            if !read_message(self.stream, &mut hb)? {
                return Ok(None); // the client left without NBD_OPT_ABORT
            }
            let h = OptionHeader::decode(&hb)
                .ok_or_else(|| violation("option without the IHAVEOPT magic"))?;
            if h.len > MAX_OPTION_DATA {
                if h.len > MAX_OPTION_SKIP {
                    return Err(violation(format!("option of {} bytes", h.len)));
                }
                skip(self.stream, u64::from(h.len))?;
                if h.option == proto::OPT_EXPORT_NAME {
                    return Err(violation("NBD_OPT_EXPORT_NAME with an overlong name"));
                }
                self.error(h.option, proto::REP_ERR_TOO_BIG, "option data too long")?;
                continue;
            }
            let mut data = vec![0u8; h.len as usize];
            (&mut self.stream).read_exact(&mut data)?;
            log::debug!(
                "{}: {} ({} bytes)",
                self.stream.peer(),
                proto::option_name(h.option),
                h.len
            );
            match self.option(h.option, &data)? {
                Next::Continue => {}
                Next::Close => return Ok(None),
                Next::Transmit(export, handle) => {
                    let client = self
                        .client
                        .take()
                        .ok_or_else(|| io::Error::other("no daemon connection"))?;
                    return Ok(Some((client, export, handle)));
                }
            }
        }
    }

    fn option(&mut self, option: u32, data: &[u8]) -> Result<Next, ConnError> {
        if self.cfg.stopping.is_shutdown() && option != proto::OPT_ABORT {
            if option == proto::OPT_EXPORT_NAME {
                return Err(violation("gateway is shutting down"));
            }
            self.error(
                option,
                proto::REP_ERR_SHUTDOWN,
                "the gateway is shutting down",
            )?;
            return Ok(Next::Continue);
        }
        match option {
            proto::OPT_ABORT => {
                // The client may already have closed: a failed ACK is fine.
                let _ = self.reply(option, proto::REP_ACK, &[]);
                Ok(Next::Close)
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    self.error(option, proto::REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    return Ok(Next::Continue);
                }
                self.list(option)?;
                Ok(Next::Continue)
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let req = match proto::InfoRequest::decode(data) {
                    Ok(r) => r,
                    Err(why) => {
                        self.error(option, proto::REP_ERR_INVALID, why)?;
                        return Ok(Next::Continue);
                    }
                };
                self.info(option, &req)
            }
            proto::OPT_EXPORT_NAME => {
                let name = proto::decode_string(data).map_err(violation)?;
                // No error reply exists for this option: failure is a hard disconnect.
                let opened = self.lookup(&name).and_then(|export| {
                    let handle = self.open(&export)?;
                    Ok((export, handle))
                });
                let (export, handle) =
                    opened.map_err(|e| violation(format!("NBD_OPT_EXPORT_NAME `{name}`: {e}")))?;
                let mut w = self.stream;
                w.write_all(&proto::export_name_reply(
                    export.size,
                    export.transmission_flags(),
                    self.no_zeroes,
                ))?;
                Ok(Next::Transmit(export, handle))
            }
            proto::OPT_STARTTLS => {
                self.error(option, proto::REP_ERR_UNSUP, "TLS is not supported")?;
                Ok(Next::Continue)
            }
            proto::OPT_STRUCTURED_REPLY => {
                self.error(option, proto::REP_ERR_UNSUP, "only simple replies")?;
                Ok(Next::Continue)
            }
            _ => {
                self.error(option, proto::REP_ERR_UNSUP, "option not supported")?;
                Ok(Next::Continue)
            }
        }
    }

    fn client(&mut self) -> Result<&Client, ClientError> {
        if self.client.is_none() {
            self.client = Some(Client::connect(&self.cfg.daemon_socket)?);
        }
        self.client.as_ref().ok_or(ClientError::Disconnected)
    }

    fn lookup(&mut self, name: &str) -> Result<Export, LookupError> {
        let client = self.client()?;
        export::lookup(client, name)
    }

    /// Opens the export for transmission: read-write, or read-only for a read-only disk.
    fn open(&mut self, export: &Export) -> Result<Handle, LookupError> {
        let flags = if export.read_only {
            OpenFlags::READ
        } else {
            OpenFlags::READ_WRITE
        };
        Ok(self.client()?.open(&export.scheme_path(), flags)?)
    }

    fn list(&mut self, option: u32) -> Result<(), ConnError> {
        let listed = self
            .client()
            .and_then(|c| Ok((c.scheme().to_owned(), export::all(c)?)));
        match listed {
            Ok((scheme, exports)) => {
                for e in exports {
                    let data = proto::rep_server_data(&e.name, &e.description(&scheme));
                    self.reply(option, proto::REP_SERVER, &data)?;
                }
                self.reply(option, proto::REP_ACK, &[])
            }
            Err(e) => {
                let rep = LookupError::Backend(e);
                self.error(option, rep.reply_type(), &rep.to_string())
            }
        }
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`: describe the export (`NBD_INFO_EXPORT` always,
    /// `NBD_INFO_BLOCK_SIZE` always since we cap request sizes, name and description when
    /// asked), then `NBD_REP_ACK`; for GO, transmission follows.
    fn info(&mut self, option: u32, req: &proto::InfoRequest) -> Result<Next, ConnError> {
        let export = match self.lookup(&req.name) {
            Ok(e) => e,
            Err(e) => {
                self.error(option, e.reply_type(), &e.to_string())?;
                return Ok(Next::Continue);
            }
        };
        // GO: open the export before promising it, since after the ACK no error can be
        // reported.
        let handle = if option == proto::OPT_GO {
            match self.open(&export) {
                Ok(h) => Some(h),
                Err(e) => {
                    self.error(option, e.reply_type(), &e.to_string())?;
                    return Ok(Next::Continue);
                }
            }
        } else {
            None
        };
        self.reply(
            option,
            proto::REP_INFO,
            &proto::info_export(export.size, export.transmission_flags()),
        )?;
        let (min, pref, max) = export.block_sizes();
        self.reply(
            option,
            proto::REP_INFO,
            &proto::info_block_size(min, pref, max),
        )?;
        let scheme = self
            .client
            .as_ref()
            .map(|c| c.scheme().to_owned())
            .unwrap_or_default();
        for &item in &req.requests {
            match item {
                proto::INFO_NAME => self.reply(
                    option,
                    proto::REP_INFO,
                    &proto::info_string(proto::INFO_NAME, &export.name),
                )?,
                proto::INFO_DESCRIPTION => self.reply(
                    option,
                    proto::REP_INFO,
                    &proto::info_string(proto::INFO_DESCRIPTION, &export.description(&scheme)),
                )?,
                // EXPORT and BLOCK_SIZE were sent; unknown requests are ignored.
                _ => {}
            }
        }
        self.reply(option, proto::REP_ACK, &[])?;
        Ok(match handle {
            Some(h) => Next::Transmit(export, h),
            None => Next::Continue,
        })
    }

    fn reply(&self, option: u32, reply_type: u32, data: &[u8]) -> Result<(), ConnError> {
        let mut w = self.stream;
        w.write_all(&proto::option_reply(option, reply_type, data))?;
        Ok(())
    }

    fn error(&self, option: u32, reply_type: u32, msg: &str) -> Result<(), ConnError> {
        log::debug!(
            "{}: {} refused: {msg}",
            self.stream.peer(),
            proto::option_name(option)
        );
        self.reply(
            option,
            reply_type,
            proto::truncate_str(msg, proto::MAX_STRING).as_bytes(),
        )
    }
}

/// Reads a whole message into `buf`: `false` if the stream ended before its first byte, an
/// error if it ended inside it.
fn read_message(stream: &Stream, buf: &mut [u8]) -> io::Result<bool> {
    let mut r = stream;
    match vscsi_ipc::protocol::read_full(&mut r, buf)? {
        0 => Ok(false),
        n if n < buf.len() => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed inside a message",
        )),
        _ => Ok(true),
    }
}

/// Reads and drops `n` bytes.
fn skip(stream: &Stream, n: u64) -> io::Result<()> {
    let mut r = stream;
    let copied = io::copy(&mut (&mut r).take(n), &mut io::sink())?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// What a worker does for one request.
enum Op {
    Read,
    Write(Vec<u8>),
    Flush,
    WriteZeroes,
    Trim,
    /// Refused while reading it: reply with this error.
    Fail(u32),
}

struct Job {
    req: Request,
    op: Op,
}

/// Replies go through here: one writer at a time, a reply never interleaved with another.
struct Replies<'a> {
    stream: Mutex<&'a Stream>,
    broken: AtomicBool,
}

impl Replies<'_> {
    fn send(&self, error: u32, cookie: u64, data: &[u8]) {
        if self.broken.load(Ordering::SeqCst) {
            return;
        }
        let header = proto::simple_reply(error, cookie);
        let guard = self.stream.lock().unwrap_or_else(PoisonError::into_inner);
        let mut w: &Stream = *guard;
        if let Err(e) = write_all_vectored(&mut w, &[&header, data]) {
            log::debug!("{}: sending a reply failed: {e}", w.peer());
            self.broken.store(true, Ordering::SeqCst);
            // Wake the reader: nothing more can be sent on this connection.
            w.shutdown(Shutdown::Both);
        }
    }
}

fn write_all_vectored(w: &mut &Stream, bufs: &[&[u8]]) -> io::Result<()> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut done = 0usize;
    while done < total {
        // Build the slices past `done`.
        let mut skip = done;
        let mut slices = Vec::with_capacity(bufs.len());
        for b in bufs {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            slices.push(IoSlice::new(&b[skip..]));
            skip = 0;
        }
        match w.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The transmission phase: this thread reads requests, `cfg.workers` threads execute them.
fn transmission(
    stream: &Stream,
    cfg: &ConnConfig,
    client: &Client,
    handle: &Handle,
    export: &Export,
) -> Result<(), ConnError> {
    let replies = Replies {
        stream: Mutex::new(stream),
        broken: AtomicBool::new(false),
    };
    let workers = cfg.workers.max(1);
    std::thread::scope(|s| {
        // A rendezvous channel: the reader hands a request over only when a worker is free,
        // so at most `workers + 1` requests (and their buffers) exist at once.
        let (tx, rx) = crossbeam_channel::bounded::<Job>(0);
        for i in 0..workers {
            let rx = rx.clone();
            let replies = &replies;
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn_scoped(s, move || {
                    for job in rx {
                        execute(job, client, handle, export, replies);
                    }
                });
            if let Err(e) = spawned {
                // Fewer workers than asked is still a working connection (if there is one).
                log::warn!("cannot start an NBD worker thread: {e}");
                if i == 0 {
                    return Err(ConnError::Io(e));
                }
                break;
            }
        }
        drop(rx);
        let outcome = read_requests(stream, export, &tx, &replies);
        // Dropping the sender lets the workers finish what they hold, reply, and exit; the
        // scope waits for them.
        drop(tx);
        outcome
    })
}

/// Reads requests until `NBD_CMD_DISC`, the end of the stream or a violation.
fn read_requests(
    stream: &Stream,
    export: &Export,
    tx: &crossbeam_channel::Sender<Job>,
    replies: &Replies<'_>,
) -> Result<(), ConnError> {
    let mut r = stream;
    loop {
        let mut hb = [0u8; proto::REQUEST_LEN];
        if !read_message(stream, &mut hb)? {
            return Ok(()); // the client closed (or the gateway is stopping)
        }
        if replies.broken.load(Ordering::SeqCst) {
            return Ok(());
        }
        let req = Request::decode(&hb).ok_or_else(|| violation("request with a bad magic"))?;
        let op = match req.kind {
            proto::CMD_DISC => return Ok(()),
            proto::CMD_WRITE => match check_write(&req, export) {
                Ok(()) => {
                    let mut data = vec![0u8; req.len as usize];
                    r.read_exact(&mut data)?;
                    Op::Write(data)
                }
                Err(errno) => {
                    // The payload is on the wire whatever we think of it.
                    skip(stream, u64::from(req.len))?;
                    Op::Fail(errno)
                }
            },
            proto::CMD_READ => check_read(&req, export).map_or_else(Op::Fail, |()| Op::Read),
            proto::CMD_FLUSH => {
                check_flags(&req, proto::CMD_FLAG_FUA).map_or_else(Op::Fail, |()| Op::Flush)
            }
            proto::CMD_WRITE_ZEROES => {
                check_write_zeroes(&req, export).map_or_else(Op::Fail, |()| Op::WriteZeroes)
            }
            proto::CMD_TRIM => check_trim(&req, export).map_or_else(Op::Fail, |()| Op::Trim),
            // Nothing else is advertised.
            _ => Op::Fail(proto::EINVAL),
        };
        if tx.send(Job { req, op }).is_err() {
            return Ok(()); // every worker is gone
        }
    }
}

fn check_flags(req: &Request, allowed: u16) -> Result<(), u32> {
    if req.flags & !allowed != 0 {
        return Err(proto::EINVAL);
    }
    Ok(())
}

fn end(req: &Request) -> Option<u64> {
    req.offset.checked_add(u64::from(req.len))
}

fn check_read(req: &Request, export: &Export) -> Result<(), u32> {
    // FUA is tolerated on every command (clients are known to set it on reads).
    check_flags(req, proto::CMD_FLAG_FUA)?;
    if req.len > MAX_REQUEST {
        return Err(proto::EINVAL);
    }
    match end(req) {
        Some(e) if e <= export.size => Ok(()),
        _ => Err(proto::EINVAL),
    }
}

fn check_write(req: &Request, export: &Export) -> Result<(), u32> {
    check_flags(req, proto::CMD_FLAG_FUA)?;
    if export.read_only {
        return Err(proto::EPERM);
    }
    if req.len > MAX_REQUEST {
        return Err(proto::EINVAL);
    }
    match end(req) {
        Some(e) if e <= export.size => Ok(()),
        _ => Err(proto::ENOSPC),
    }
}

fn check_write_zeroes(req: &Request, export: &Export) -> Result<(), u32> {
    // NO_HOLE is honoured trivially: zeroes are always written, never a hole.
    check_flags(req, proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE)?;
    if export.read_only {
        return Err(proto::EPERM);
    }
    match end(req) {
        Some(e) if e <= export.size => Ok(()),
        _ => Err(proto::ENOSPC),
    }
}

fn check_trim(req: &Request, export: &Export) -> Result<(), u32> {
    check_flags(req, proto::CMD_FLAG_FUA)?;
    if export.read_only {
        return Err(proto::EPERM);
    }
    if !export.can_trim {
        // Not advertised: a client that sends it anyway gets what any unknown command gets.
        return Err(proto::EINVAL);
    }
    match end(req) {
        Some(e) if e <= export.size => Ok(()),
        _ => Err(proto::EINVAL),
    }
}

fn execute(job: Job, client: &Client, handle: &Handle, export: &Export, replies: &Replies<'_>) {
    let req = job.req;
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    let result: Result<Vec<u8>, ClientError> = match job.op {
        Op::Fail(errno) => {
            replies.send(errno, req.cookie, &[]);
            return;
        }
        Op::Read => {
            let mut buf = vec![0u8; req.len as usize];
            client
                .read_exact_at(handle, req.offset, &mut buf)
                .map(|()| buf)
        }
        Op::Write(data) => client
            .write_all_at(handle, req.offset, &data)
            .and_then(|()| if fua { client.sync(handle) } else { Ok(()) })
            .map(|()| Vec::new()),
        Op::Flush => client.sync(handle).map(|()| Vec::new()),
        Op::WriteZeroes => write_zeroes(client, handle, req.offset, u64::from(req.len))
            .and_then(|()| if fua { client.sync(handle) } else { Ok(()) })
            .map(|()| Vec::new()),
        // The protocol lets a trim discard less than asked: only the whole blocks inside the
        // range are discarded, so no byte outside it (in a shared edge block) is ever lost.
        Op::Trim => export
            .trim_range(req.offset, u64::from(req.len))
            .map_or(Ok(()), |(at, n)| client.discard(handle, at, n))
            .and_then(|()| if fua { client.sync(handle) } else { Ok(()) })
            .map(|()| Vec::new()),
    };
    match result {
        Ok(data) => replies.send(0, req.cookie, &data),
        Err(e) => {
            let errno = export::nbd_errno(&e);
            log::warn!(
                "export {}: command {} at {}+{} failed: {e} (NBD error {errno})",
                export.name,
                req.kind,
                req.offset,
                req.len
            );
            replies.send(errno, req.cookie, &[]);
        }
    }
}

/// Zeroes the range through the daemon (WRITE SAME on the device where it has it, zero
/// buffers written by the daemon otherwise): no zeroes cross the socket. The range was checked
/// against the export's size, so a short count means the disk shrank meanwhile.
fn write_zeroes(
    client: &Client,
    handle: &Handle,
    offset: u64,
    len: u64,
) -> Result<(), ClientError> {
    let n = client.write_zeroes(handle, offset, len)?;
    if n < len {
        return Err(ClientError::from_errno(syscall::error::ENOSPC));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 1,
            offset,
            len,
        }
    }

    fn export(read_only: bool) -> Export {
        Export {
            name: "0".into(),
            size: 1 << 20,
            block_size: 512,
            read_only,
            can_trim: !read_only,
        }
    }

    #[test]
    fn read_bounds_and_flags() {
        let e = export(false);
        assert_eq!(check_read(&req(0, 0, 0, 4096), &e), Ok(()));
        assert_eq!(check_read(&req(0, 0, (1 << 20) - 1, 1), &e), Ok(()));
        assert_eq!(check_read(&req(0, 0, 1 << 20, 0), &e), Ok(()));
        assert_eq!(
            check_read(&req(0, 0, (1 << 20) - 1, 2), &e),
            Err(proto::EINVAL)
        );
        assert_eq!(check_read(&req(0, 0, u64::MAX, 2), &e), Err(proto::EINVAL));
        assert_eq!(check_read(&req(0, proto::CMD_FLAG_FUA, 0, 1), &e), Ok(()));
        assert_eq!(check_read(&req(0, 1 << 2, 0, 1), &e), Err(proto::EINVAL));
        let big = Export {
            size: 1 << 40,
            ..export(false)
        };
        assert_eq!(
            check_read(&req(0, 0, 0, MAX_REQUEST + 1), &big),
            Err(proto::EINVAL)
        );
    }

    #[test]
    fn write_checks() {
        let e = export(false);
        assert_eq!(
            check_write(&req(1, proto::CMD_FLAG_FUA, 0, 512), &e),
            Ok(())
        );
        assert_eq!(check_write(&req(1, 0, 1 << 20, 1), &e), Err(proto::ENOSPC));
        assert_eq!(
            check_write(&req(1, proto::CMD_FLAG_NO_HOLE, 0, 1), &e),
            Err(proto::EINVAL)
        );
        assert_eq!(
            check_write(&req(1, 0, 0, 1), &export(true)),
            Err(proto::EPERM)
        );
        assert_eq!(
            check_write_zeroes(
                &req(6, proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FUA, 0, 1 << 20),
                &e
            ),
            Ok(())
        );
        assert_eq!(
            check_write_zeroes(&req(6, 1 << 4, 0, 1), &e),
            Err(proto::EINVAL),
            "FAST_ZERO is not advertised"
        );
        assert_eq!(
            check_write_zeroes(&req(6, 0, 1, 1 << 20), &e),
            Err(proto::ENOSPC)
        );
        assert_eq!(
            check_write_zeroes(&req(6, 0, 0, 1), &export(true)),
            Err(proto::EPERM)
        );
    }

    #[test]
    fn trim_checks() {
        let e = export(false);
        assert_eq!(
            check_trim(&req(4, proto::CMD_FLAG_FUA, 0, 1 << 20), &e),
            Ok(())
        );
        assert_eq!(check_trim(&req(4, 0, 1, 1 << 20), &e), Err(proto::EINVAL));
        assert_eq!(
            check_trim(&req(4, proto::CMD_FLAG_NO_HOLE, 0, 512), &e),
            Err(proto::EINVAL)
        );
        assert_eq!(
            check_trim(&req(4, 0, 0, 512), &export(true)),
            Err(proto::EPERM)
        );
        let cannot = Export {
            can_trim: false,
            ..export(false)
        };
        assert_eq!(check_trim(&req(4, 0, 0, 512), &cannot), Err(proto::EINVAL));
    }
}
