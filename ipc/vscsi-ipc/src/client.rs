//! The client library: a thread-safe connection to the virtio-scsid socket server.
//!
//! Owns: connecting and the Hello handshake, tag allocation, the reader thread that
//! demultiplexes replies to waiting callers, splitting large reads and writes into frames of
//! at most the server's payload cap (pipelined, a few at a time), and turning replies into
//! typed results and [`ClientError`]s.
//!
//! One [`Client`] is one connection; clone it freely (it is an `Arc` inside) and use it from
//! many threads at once: every call has its own tag, so requests from different threads are in
//! flight together and complete in any order. When the server goes away, every waiting call
//! fails promptly with [`ClientError::Disconnected`], and so does every later call.
//!
//! A [`Handle`] dropped without [`Client::close`] sends a Close without waiting for its reply
//! (errors are ignored); if the connection is gone, the server has closed it already (the
//! server closes every handle of a connection when the connection ends).
//!
//! [`Client::connect_shm`] also starts the shared-memory transport ([`crate::shm`]): requests
//! then go through rings in shared memory, and data through an arena the device can reach.
//! [`Client::alloc_buf`] gives buffers in that arena; [`Client::prep_read`],
//! [`Client::prep_write`], [`Client::prep_fsync`], [`Client::submit`] and [`Client::reap`]
//! run many requests from one thread with no copy and no system call per request while the
//! server is busy. `read_at`/`write_at` keep working on any buffer (one copy through the
//! arena). Open, close, stat and the rest stay on the socket.
//!
//! [`Client::discard`] and [`Client::write_zeroes`] move no data (one request each, on the
//! socket); [`Client::identity`] tells who a disk is (vendor, product, serial, WWN, SCSI
//! address) and whether it can discard.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use rustix::net::{SendAncillaryBuffer, SendFlags};
use syscall::error::{EAGAIN, EBADF, EINVAL, ENAMETOOLONG, ENODEV, ENOSPC, EOPNOTSUPP};
use syscall::flag::{MODE_DIR, MODE_TYPE, O_DIRECTORY, O_RDONLY, O_RDWR, O_STAT, O_WRONLY};

use crate::errno::{errno_name, errno_text};
use crate::protocol::{
    self, MAX_NAME, MAX_PATH, MAX_PAYLOAD, Opcode, REPLY_HEADER_LEN, ReadError, Reply, ReplyHeader,
    Request, RequestHeader, VERSION,
};
use crate::server::default_socket_path;
use crate::shm::{self, ShmInfo};
use crate::shm_client::{ArenaBuf, Completion, PrepError, Session, Ticket};

/// How long `connect` waits for the server's Hello reply.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Chunks of one large read or write in flight at once.
const PIPELINE_DEPTH: usize = 4;
/// Largest root listing `list` accepts.
const MAX_LISTING: usize = 1 << 20;
/// Largest bounce buffer `read_at`/`write_at` take from the arena per request.
const SHM_BOUNCE_MAX: usize = 1 << 20;

/// Errors from the client library. `Display` is one clear line.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server (scheme) answered with a Redox errno.
    #[error("{text} ({name})")]
    Errno {
        /// The errno value.
        errno: i32,
        /// Its symbolic name, e.g. `"ENOENT"`.
        name: &'static str,
        /// Its text, e.g. `"No such file or directory"`.
        text: &'static str,
    },
    /// Connecting to the server failed (socket missing, refused, no handshake reply, ...).
    #[error("cannot connect to virtio-scsid at {}: {source}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// A local I/O error other than the connection ending.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The server broke the protocol; the connection is closed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection to the server ended (server stopped or crashed).
    #[error("connection to virtio-scsid lost")]
    Disconnected,
    /// `read_exact_at` got fewer bytes than asked: the range runs past the end of the device.
    #[error("unexpected end of device: read {got} of {expected} bytes at offset {offset}")]
    UnexpectedEof {
        /// Start of the read.
        offset: u64,
        /// Bytes asked for.
        expected: usize,
        /// Bytes read.
        got: usize,
    },
    /// `write_all_at` wrote fewer bytes than asked: the range runs past the end of the device.
    #[error("short write: wrote {got} of {expected} bytes at offset {offset} (end of device)")]
    ShortWrite {
        /// Start of the write.
        offset: u64,
        /// Bytes to write.
        expected: usize,
        /// Bytes written.
        got: usize,
    },
}

impl ClientError {
    /// The error for a Redox errno, with its name and text.
    pub fn from_errno(errno: i32) -> ClientError {
        ClientError::Errno {
            errno,
            name: errno_name(errno),
            text: errno_text(errno),
        }
    }

    /// The errno, if this is an [`ClientError::Errno`].
    pub fn errno(&self) -> Option<i32> {
        match self {
            ClientError::Errno { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

impl From<syscall::error::Error> for ClientError {
    fn from(e: syscall::error::Error) -> Self {
        ClientError::from_errno(e.errno)
    }
}

impl From<ClientError> for io::Error {
    fn from(e: ClientError) -> io::Error {
        match e {
            // Redox errno numbers match Linux's for everything the scheme returns.
            ClientError::Errno { errno, .. } => io::Error::from_raw_os_error(errno),
            ClientError::Io(e) => e,
            ClientError::Connect { source, .. } => source,
            ClientError::UnexpectedEof { .. } => {
                io::Error::new(io::ErrorKind::UnexpectedEof, e.to_string())
            }
            ClientError::ShortWrite { .. } => {
                io::Error::new(io::ErrorKind::WriteZero, e.to_string())
            }
            ClientError::Disconnected => {
                io::Error::new(io::ErrorKind::ConnectionAborted, e.to_string())
            }
            ClientError::Protocol(_) => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        }
    }
}

/// Access mode for [`Client::open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OpenFlags {
    /// Open for reading.
    pub read: bool,
    /// Open for writing.
    pub write: bool,
}

impl OpenFlags {
    /// Read only.
    pub const READ: OpenFlags = OpenFlags {
        read: true,
        write: false,
    };
    /// Write only.
    pub const WRITE: OpenFlags = OpenFlags {
        read: false,
        write: true,
    };
    /// Read and write.
    pub const READ_WRITE: OpenFlags = OpenFlags {
        read: true,
        write: true,
    };

    /// The Redox `O_*` access flags.
    pub fn to_redox(self) -> usize {
        match (self.read, self.write) {
            (true, true) => O_RDWR,
            (false, true) => O_WRONLY,
            (true, false) => O_RDONLY,
            (false, false) => 0,
        }
    }
}

/// Who a disk is: vendor, product, revision, serial, WWN, SCSI target and LUN.
pub use block_scheme::DiskIdentity;

/// What [`Client::identity`] says about a handle's disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskDetails {
    /// Who the disk is; `None` for the root, or when the device does not say.
    pub identity: Option<DiskIdentity>,
    /// [`Client::discard`] can work on the disk (it is writable and its device can discard).
    pub can_discard: bool,
}

/// Status of an open handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Redox mode: type bits (`MODE_FILE`, `MODE_DIR`) and permissions.
    pub mode: u16,
    /// The handle is a directory (the scheme root).
    pub is_dir: bool,
    /// Size in bytes.
    pub size: u64,
    /// Logical block size in bytes (0 for the root).
    pub block_size: u32,
    /// Number of logical blocks (size / block size).
    pub blocks: u64,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
}

impl From<syscall::data::Stat> for Stat {
    fn from(s: syscall::data::Stat) -> Stat {
        Stat {
            mode: s.st_mode,
            is_dir: s.st_mode & MODE_TYPE == MODE_DIR,
            size: s.st_size,
            block_size: s.st_blksize,
            blocks: s.st_blocks,
            uid: s.st_uid,
            gid: s.st_gid,
        }
    }
}

/// An open handle on the server. Belongs to the [`Client`] that opened it; using it with
/// another client gives `EBADF`. Dropping it without [`Client::close`] closes it in the
/// background.
pub struct Handle {
    id: u64,
    client_id: u64,
    inner: Weak<Inner>,
    closed: bool,
}

impl Handle {
    /// The server's handle id.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("id", &self.id)
            .field("client", &self.client_id)
            .finish()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        if let Some(inner) = self.inner.upgrade() {
            // Fire and forget: the reply is discarded by the reader thread.
            let _ = inner.submit(Request::Close { handle: self.id }.header(0), &[], false);
        }
    }
}

enum Dead {
    Disconnected,
    Protocol(String),
}

impl Dead {
    fn error(&self) -> ClientError {
        match self {
            Dead::Disconnected => ClientError::Disconnected,
            Dead::Protocol(m) => ClientError::Protocol(m.clone()),
        }
    }
}

struct Pending {
    op: Opcode,
    /// `None`: nobody waits (background close); the reply is dropped.
    tx: Option<Sender<Reply>>,
}

struct State {
    pending: HashMap<u64, Pending>,
    dead: Option<Dead>,
}

struct Shared {
    state: Mutex<State>,
    /// The shared-memory session's doorbell: rung when the connection dies, so that threads
    /// sleeping on the completion ring notice.
    bell: Option<OwnedFd>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Marks the connection dead (first reason wins) and fails every waiting call.
    fn kill(&self, why: Dead, stream: &UnixStream) {
        let drained = {
            let mut st = lock(&self.state);
            if st.dead.is_none() {
                st.dead = Some(why);
            }
            std::mem::take(&mut st.pending)
        };
        // Dropping the senders wakes every waiter with an error.
        drop(drained);
        let _ = stream.shutdown(std::net::Shutdown::Both);
        if let Some(b) = &self.bell {
            shm::kick(b.as_fd());
        }
    }

    fn dead(&self) -> Option<ClientError> {
        lock(&self.state).dead.as_ref().map(Dead::error)
    }

    fn dead_error(&self) -> ClientError {
        lock(&self.state)
            .dead
            .as_ref()
            .map_or(ClientError::Disconnected, Dead::error)
    }
}

static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

struct Inner {
    id: u64,
    stream: UnixStream,
    write_lock: Mutex<()>,
    shared: Arc<Shared>,
    scheme: String,
    /// Bytes per Read/Write frame: a power of two, at most the server's and our cap.
    chunk: usize,
    next_tag: AtomicU64,
    reader: Mutex<Option<thread::JoinHandle<()>>>,
    /// The shared-memory session, if one was set up.
    shm: Option<Session>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(r) = lock(&self.reader).take() {
            let _ = r.join();
        }
    }
}

/// Sends all of `bufs` as one frame, without SIGPIPE.
fn send_frame(stream: &UnixStream, bufs: &[&[u8]]) -> io::Result<()> {
    let mut idx = 0;
    let mut off = 0;
    while idx < bufs.len() {
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(bufs.len() - idx);
        for (i, b) in bufs[idx..].iter().enumerate() {
            let b = if i == 0 {
                b.get(off..).unwrap_or_default()
            } else {
                b
            };
            if !b.is_empty() {
                slices.push(IoSlice::new(b));
            }
        }
        if slices.is_empty() {
            return Ok(());
        }
        let n = match rustix::net::sendmsg(
            stream,
            &slices,
            &mut SendAncillaryBuffer::default(),
            SendFlags::NOSIGNAL,
        ) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        // Advance past n bytes.
        let mut left = n;
        while idx < bufs.len() && left > 0 {
            let rem = bufs[idx].len().saturating_sub(off);
            if left >= rem {
                left -= rem;
                idx += 1;
                off = 0;
            } else {
                off += left;
                left = 0;
            }
        }
        while idx < bufs.len() && bufs[idx].len() <= off {
            idx += 1;
            off = 0;
        }
    }
    Ok(())
}

impl Inner {
    /// Registers a tag and sends the frame. With `wait`, returns the receiver for the reply.
    fn submit(
        &self,
        mut header: RequestHeader,
        payload: &[u8],
        wait: bool,
    ) -> Result<Option<Receiver<Reply>>, ClientError> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        header.tag = tag;
        let (tx, rx) = if wait {
            let (tx, rx) = crossbeam_channel::bounded(1);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        {
            let mut st = lock(&self.shared.state);
            if let Some(d) = &st.dead {
                return Err(d.error());
            }
            st.pending.insert(tag, Pending { op: header.op, tx });
        }
        let hdr = header.encode();
        let sent = {
            let _g = lock(&self.write_lock);
            send_frame(&self.stream, &[&hdr, payload])
        };
        if let Err(e) = sent {
            // A frame may be half-written: the stream is unusable from here on.
            log::debug!("send failed: {e}");
            self.shared.kill(Dead::Disconnected, &self.stream);
            return Err(self.shared.dead_error());
        }
        Ok(rx)
    }

    fn wait(&self, rx: Receiver<Reply>) -> Result<Reply, ClientError> {
        let reply = rx.recv().map_err(|_| self.shared.dead_error())?;
        if reply.status != 0 {
            return Err(ClientError::from_errno(reply.status as i32));
        }
        Ok(reply)
    }

    fn call(&self, req: &Request) -> Result<Reply, ClientError> {
        let rx = self.submit(req.header(0), req.payload(), true)?;
        match rx {
            Some(rx) => self.wait(rx),
            None => Err(ClientError::Disconnected),
        }
    }

    fn call_with(
        &self,
        header: RequestHeader,
        payload: &[u8],
    ) -> Result<Receiver<Reply>, ClientError> {
        self.submit(header, payload, true)?
            .ok_or(ClientError::Disconnected)
    }
}

fn reader_loop(shared: Arc<Shared>, stream: UnixStream) {
    let mut r = &stream;
    loop {
        let reply = match protocol::read_reply(&mut r) {
            Ok(Some(reply)) => reply,
            Ok(None) => return shared.kill(Dead::Disconnected, &stream),
            Err(ReadError::Io(e)) => {
                log::debug!("reading replies failed: {e}");
                return shared.kill(Dead::Disconnected, &stream);
            }
            Err(ReadError::Malformed(fe)) => {
                return shared.kill(Dead::Protocol(fe.to_string()), &stream);
            }
        };
        let pending = lock(&shared.state).pending.remove(&reply.tag);
        let Some(pending) = pending else {
            let why = format!("reply with unknown tag {}", reply.tag);
            return shared.kill(Dead::Protocol(why), &stream);
        };
        if reply.op.is_some_and(|op| op != pending.op) {
            let why = format!(
                "reply to a {} request is marked {:?}",
                pending.op.name(),
                reply.op
            );
            return shared.kill(Dead::Protocol(why), &stream);
        }
        if let Some(tx) = pending.tx {
            // The waiter may have given up (dropped its receiver); that is fine.
            let _ = tx.send(reply);
        }
    }
}

/// The caller's buffer of a `read_at`/`write_at` through the session.
enum ShmRw<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl ShmRw<'_> {
    fn len(&self) -> usize {
        match self {
            ShmRw::Read(b) => b.len(),
            ShmRw::Write(b) => b.len(),
        }
    }
}

/// Sends ShmSetup on a connection that finished Hello (nothing else in flight), receives the
/// reply with its descriptors, and maps the session.
fn setup_shm(stream: &UnixStream, arena_bytes: u64) -> Result<Session, ClientError> {
    let req = Request::ShmSetup { arena_bytes };
    send_frame(stream, &[&req.encode(0)])?;
    let mut hb = [0u8; REPLY_HEADER_LEN];
    let (mut got, fds) = shm::recv_with_fds(stream.as_fd(), &mut hb)?;
    if got == 0 {
        return Err(ClientError::Disconnected);
    }
    let mut r = stream;
    while got < REPLY_HEADER_LEN {
        match r.read(&mut hb[got..]) {
            Ok(0) => return Err(ClientError::Disconnected),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let h = ReplyHeader::parse(&hb).map_err(|e| protocol_err(e.to_string()))?;
    if h.tag != 0 || h.op.is_some_and(|op| op != Opcode::ShmSetup) {
        return Err(protocol_err("unexpected reply to ShmSetup"));
    }
    let mut payload = vec![0u8; h.payload_len as usize];
    r.read_exact(&mut payload)?;
    if h.status != 0 {
        return Err(ClientError::from_errno(h.status as i32));
    }
    let info = ShmInfo::decode(&payload).map_err(protocol_err)?;
    if h.value != info.arena_len {
        return Err(protocol_err("ShmSetup reply value is not the arena length"));
    }
    if fds.len() != shm::SETUP_FDS {
        return Err(protocol_err(format!(
            "ShmSetup reply carried {} descriptors, expected {}",
            fds.len(),
            shm::SETUP_FDS
        )));
    }
    Session::new(info, fds).map_err(|e| protocol_err(format!("cannot map the session: {e}")))
}

/// A connection to the virtio-scsid server. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.inner.id)
            .field("scheme", &self.inner.scheme)
            .finish()
    }
}

fn protocol_err(msg: impl Into<String>) -> ClientError {
    ClientError::Protocol(msg.into())
}

impl Client {
    /// Connects to the server at `path` and does the Hello handshake (at most
    /// [`HANDSHAKE_TIMEOUT`]).
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Client::connect_with(path.as_ref(), None)
    }

    /// Like [`Client::connect`], then starts the shared-memory transport with an arena of
    /// `arena_bytes` (0: the server's default; the server may give less than asked, never
    /// more than its limit). Fails with the server's errno if it cannot (`EOPNOTSUPP`: the
    /// server has no arenas); [`Client::connect`] then still works.
    pub fn connect_shm(path: impl AsRef<Path>, arena_bytes: usize) -> Result<Client, ClientError> {
        Client::connect_with(path.as_ref(), Some(arena_bytes as u64))
    }

    fn connect_with(path: &Path, shm_arena: Option<u64>) -> Result<Client, ClientError> {
        let connect_err = |source: io::Error| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_err)?;
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(connect_err)?;
        let hello = Request::Hello {
            client: format!("vscsi-ipc pid {}", std::process::id()),
        };
        // A server over its connection limit may have answered (EUSERS) and closed before our
        // Hello arrived: then the send fails but its reply is still there to read.
        let sent = send_frame(&stream, &[&hello.encode(0)]);
        let reply = match protocol::read_reply(&mut &stream) {
            Ok(Some(r)) => r,
            Ok(None) | Err(ReadError::Io(_)) if sent.is_err() => {
                return Err(connect_err(sent.err().unwrap_or_else(|| {
                    io::Error::other("sending the handshake failed")
                })));
            }
            Ok(None) => {
                return Err(connect_err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection during the handshake",
                )));
            }
            Err(ReadError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(connect_err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no handshake reply within {HANDSHAKE_TIMEOUT:?}"),
                )));
            }
            Err(ReadError::Io(e)) => return Err(connect_err(e)),
            Err(ReadError::Malformed(fe)) => return Err(protocol_err(fe.to_string())),
        };
        if reply.tag != 0 || reply.op.is_some_and(|op| op != Opcode::Hello) {
            return Err(protocol_err("unexpected reply to Hello"));
        }
        if reply.status != 0 {
            return Err(ClientError::from_errno(reply.status as i32));
        }
        let server_max = usize::try_from(reply.value).unwrap_or(usize::MAX);
        let cap = server_max.min(MAX_PAYLOAD);
        if cap < 4096 {
            return Err(protocol_err(format!(
                "server payload cap {server_max} is below 4096"
            )));
        }
        // A power of two, so chunk boundaries fall on block boundaries.
        let chunk = 1usize << (usize::BITS - 1 - cap.leading_zeros());
        if reply.payload.is_empty() || reply.payload.len() > MAX_NAME {
            return Err(protocol_err("bad scheme name in Hello reply"));
        }
        let scheme = String::from_utf8(reply.payload)
            .map_err(|_| protocol_err("scheme name in Hello reply is not UTF-8"))?;
        let session = match shm_arena {
            None => None,
            Some(bytes) => Some(setup_shm(&stream, bytes).map_err(|e| match e {
                ClientError::Io(e) => connect_err(e),
                e => e,
            })?),
        };
        stream.set_read_timeout(None).map_err(connect_err)?;
        let bell = match &session {
            Some(s) => Some(s.bell().map_err(connect_err)?),
            None => None,
        };

        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                dead: None,
            }),
            bell,
        });
        let rstream = stream.try_clone().map_err(connect_err)?;
        let rshared = shared.clone();
        let reader = thread::Builder::new()
            .name("vscsi-client-reader".into())
            .stack_size(256 << 10)
            .spawn(move || reader_loop(rshared, rstream))
            .map_err(ClientError::Io)?;
        Ok(Client {
            inner: Arc::new(Inner {
                id: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
                stream,
                write_lock: Mutex::new(()),
                shared,
                scheme,
                chunk,
                next_tag: AtomicU64::new(1),
                reader: Mutex::new(Some(reader)),
                shm: session,
            }),
        })
    }

    /// Connects to [`default_socket_path`].
    pub fn connect_default() -> Result<Client, ClientError> {
        Client::connect(default_socket_path())
    }

    /// The scheme the server serves (from the Hello reply), e.g. `"disk.virtio-scsi"`.
    pub fn scheme(&self) -> &str {
        &self.inner.scheme
    }

    /// Bytes per Read/Write frame; bigger calls are split into several.
    pub fn chunk_size(&self) -> usize {
        self.inner.chunk
    }

    /// The path inside the scheme: a full path (`"disk.virtio-scsi:/0"`,
    /// `"/scheme/disk.virtio-scsi/0"`) is checked against the server's scheme name.
    fn scheme_path<'a>(&self, path: &'a str) -> Result<&'a str, ClientError> {
        let inner = if path.contains(':') || path.starts_with("/scheme/") {
            let (scheme, p) = block_scheme::split_scheme_path(path)?;
            if scheme != self.inner.scheme {
                return Err(ClientError::from_errno(ENODEV));
            }
            p
        } else {
            path
        };
        if inner.len() > MAX_PATH {
            return Err(ClientError::from_errno(ENAMETOOLONG));
        }
        Ok(inner)
    }

    /// Opens `path`: a full path (`"disk.virtio-scsi:/0"`; another scheme gives `ENODEV`) or a
    /// path inside the scheme (`"/0"`, `"0"`, `"/"`).
    pub fn open(&self, path: &str, flags: OpenFlags) -> Result<Handle, ClientError> {
        self.open_with_flags(path, flags.to_redox())
    }

    /// Like [`Client::open`] with raw Redox `O_*` flags (e.g. `O_RDONLY | O_STAT`).
    pub fn open_with_flags(&self, path: &str, flags: usize) -> Result<Handle, ClientError> {
        let p = self.scheme_path(path)?;
        let reply = self.inner.call(&Request::Open {
            path: p.to_owned(),
            flags: flags as u64,
        })?;
        Ok(Handle {
            id: reply.value,
            client_id: self.inner.id,
            inner: Arc::downgrade(&self.inner),
            closed: false,
        })
    }

    fn check_handle(&self, h: &Handle) -> Result<(), ClientError> {
        if h.client_id != self.inner.id || h.closed {
            return Err(ClientError::from_errno(EBADF));
        }
        Ok(())
    }

    /// The chunks of `[offset, offset + len)`: boundaries at multiples of the chunk size, so
    /// every inner boundary is block-aligned. Returns (start in buffer, length) pairs.
    fn chunks(&self, offset: u64, len: usize) -> Result<Vec<(usize, usize)>, ClientError> {
        if offset.checked_add(len as u64).is_none() {
            return Err(ClientError::from_errno(EINVAL));
        }
        let chunk = self.inner.chunk as u64;
        let mut v = Vec::new();
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let to_boundary = chunk - pos % chunk;
            let n = (len - done).min(usize::try_from(to_boundary).unwrap_or(usize::MAX));
            v.push((done, n));
            done += n;
        }
        Ok(v)
    }

    /// Reads at `offset` into `buf`; returns the bytes read. The count is short only at the
    /// end of the device (0 at or past it). Large buffers are split into several requests; an
    /// error in any part fails the whole call.
    pub fn read_at(&self, h: &Handle, offset: u64, buf: &mut [u8]) -> Result<usize, ClientError> {
        self.check_handle(h)?;
        if buf.is_empty() {
            return Ok(0);
        }
        if let Some(r) = self.shm_rw(h, offset, ShmRw::Read(buf)) {
            return r;
        }
        let chunks = self.chunks(offset, buf.len())?;
        let mut queue: VecDeque<(usize, usize, Receiver<Reply>)> = VecDeque::new();
        let mut next = 0;
        let mut total = 0usize;
        let mut outcome: Option<Result<usize, ClientError>> = None;
        loop {
            while outcome.is_none() && next < chunks.len() && queue.len() < PIPELINE_DEPTH {
                let (start, n) = chunks[next];
                let req = Request::Read {
                    handle: h.id,
                    offset: offset + start as u64,
                    len: n as u32,
                };
                match self.inner.call_with(req.header(0), &[]) {
                    Ok(rx) => queue.push_back((start, n, rx)),
                    Err(e) => outcome = Some(Err(e)),
                }
                next += 1;
            }
            let Some((start, n, rx)) = queue.pop_front() else {
                break;
            };
            let res = self.inner.wait(rx);
            if outcome.is_some() {
                continue; // draining
            }
            match res {
                Err(e) => outcome = Some(Err(e)),
                Ok(reply) => {
                    let got = reply.payload.len();
                    if reply.value != got as u64 || got > n {
                        outcome = Some(Err(protocol_err(format!(
                            "read reply of {got} bytes (value {}) for a {n}-byte request",
                            reply.value
                        ))));
                        continue;
                    }
                    buf[start..start + got].copy_from_slice(&reply.payload);
                    total += got;
                    if got < n {
                        outcome = Some(Ok(total)); // end of device
                    }
                }
            }
        }
        outcome.unwrap_or(Ok(total))
    }

    /// Writes `buf` at `offset`; returns the bytes written, short only when the range crosses
    /// the end of the device (a write starting at or past the end fails with `ENOSPC`). Large
    /// buffers are split into several requests; an error in any part fails the whole call
    /// (the range's contents are then unspecified, as after any failed write).
    pub fn write_at(&self, h: &Handle, offset: u64, buf: &[u8]) -> Result<usize, ClientError> {
        self.check_handle(h)?;
        if buf.is_empty() {
            return Ok(0);
        }
        if let Some(r) = self.shm_rw(h, offset, ShmRw::Write(buf)) {
            return r;
        }
        let chunks = self.chunks(offset, buf.len())?;
        let mut queue: VecDeque<(usize, usize, Receiver<Reply>)> = VecDeque::new();
        let mut next = 0;
        let mut total = 0usize;
        let mut outcome: Option<Result<usize, ClientError>> = None;
        loop {
            while outcome.is_none() && next < chunks.len() && queue.len() < PIPELINE_DEPTH {
                let (start, n) = chunks[next];
                let header = RequestHeader {
                    version: VERSION,
                    op: Opcode::Write,
                    tag: 0,
                    handle: h.id,
                    offset: offset + start as u64,
                    arg: 0,
                    payload_len: n as u32,
                };
                match self.inner.call_with(header, &buf[start..start + n]) {
                    Ok(rx) => queue.push_back((start, n, rx)),
                    Err(e) => outcome = Some(Err(e)),
                }
                next += 1;
            }
            let Some((start, n, rx)) = queue.pop_front() else {
                break;
            };
            let res = self.inner.wait(rx);
            if outcome.is_some() {
                continue; // draining
            }
            match res {
                // The end of the device exactly at a chunk boundary: a short write, like a
                // single request crossing the end.
                Err(e) if start > 0 && e.errno() == Some(ENOSPC) => outcome = Some(Ok(total)),
                Err(e) => outcome = Some(Err(e)),
                Ok(reply) => {
                    let Ok(got) = usize::try_from(reply.value) else {
                        outcome = Some(Err(protocol_err("write count out of range")));
                        continue;
                    };
                    if got > n {
                        outcome = Some(Err(protocol_err(format!(
                            "write reply says {got} bytes for a {n}-byte request"
                        ))));
                        continue;
                    }
                    total += got;
                    if got < n {
                        outcome = Some(Ok(total));
                    }
                }
            }
        }
        outcome.unwrap_or(Ok(total))
    }

    /// Reads exactly `buf.len()` bytes at `offset`; a short read (end of device) is
    /// [`ClientError::UnexpectedEof`].
    pub fn read_exact_at(
        &self,
        h: &Handle,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ClientError> {
        let got = self.read_at(h, offset, buf)?;
        if got < buf.len() {
            return Err(ClientError::UnexpectedEof {
                offset,
                expected: buf.len(),
                got,
            });
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`; a short write (end of device) is
    /// [`ClientError::ShortWrite`].
    pub fn write_all_at(&self, h: &Handle, offset: u64, buf: &[u8]) -> Result<(), ClientError> {
        let got = self.write_at(h, offset, buf)?;
        if got < buf.len() {
            return Err(ClientError::ShortWrite {
                offset,
                expected: buf.len(),
                got,
            });
        }
        Ok(())
    }

    /// Flushes every completed write on the handle's disk to stable storage.
    pub fn sync(&self, h: &Handle) -> Result<(), ClientError> {
        self.check_handle(h)?;
        self.inner.call(&Request::Fsync { handle: h.id }).map(drop)
    }

    /// Discards `len` bytes at `offset`: whole blocks (offset and length multiples of the
    /// block size, the range inside the disk or partition, else `EINVAL`). Afterwards the
    /// range reads back as whatever the device makes of discarded blocks (zeroes on a disk
    /// that deallocates, else possibly the old data) until it is written again. `EOPNOTSUPP`
    /// when the disk cannot discard ([`DiskDetails::can_discard`]), `EROFS` when it is
    /// read-only, `EBADF` for a handle opened without write access.
    pub fn discard(&self, h: &Handle, offset: u64, len: u64) -> Result<(), ClientError> {
        self.check_handle(h)?;
        self.inner
            .call(&Request::Discard {
                handle: h.id,
                offset,
                len,
            })
            .map(drop)
    }

    /// Writes `len` zero bytes at `offset` without sending them (the device's write-zeroes
    /// command where it has one); returns the bytes zeroed, short only when the range crosses
    /// the end of the device (`ENOSPC` at or past it), as [`Client::write_at`].
    pub fn write_zeroes(&self, h: &Handle, offset: u64, len: u64) -> Result<u64, ClientError> {
        self.check_handle(h)?;
        if len == 0 {
            return Ok(0);
        }
        let reply = self.inner.call(&Request::WriteZeroes {
            handle: h.id,
            offset,
            len,
        })?;
        if reply.value > len {
            return Err(protocol_err(format!(
                "write zeroes reply says {} bytes for a {len}-byte request",
                reply.value
            )));
        }
        Ok(reply.value)
    }

    /// Who the handle's disk is, and whether it can discard. Works on `O_STAT` handles.
    pub fn identity(&self, h: &Handle) -> Result<DiskDetails, ClientError> {
        self.check_handle(h)?;
        let reply = self.inner.call(&Request::Identity { handle: h.id })?;
        let identity = if reply.payload.is_empty() {
            None
        } else {
            let id = protocol::decode_identity(&reply.payload)
                .map_err(|e| protocol_err(e.to_string()))?;
            Some(id)
        };
        Ok(DiskDetails {
            identity,
            can_discard: reply.value & protocol::CAP_DISCARD != 0,
        })
    }

    /// Opens `path` for status only (`O_STAT`) and returns [`Client::identity`] of it.
    pub fn identity_path(&self, path: &str) -> Result<DiskDetails, ClientError> {
        let h = self.open_with_flags(path, O_STAT)?;
        let details = self.identity(&h);
        let closed = self.close(h);
        let details = details?;
        closed?;
        Ok(details)
    }

    /// Status of the handle.
    pub fn stat(&self, h: &Handle) -> Result<Stat, ClientError> {
        self.check_handle(h)?;
        let reply = self.inner.call(&Request::Fstat { handle: h.id })?;
        let st = protocol::decode_stat(&reply.payload).map_err(|e| protocol_err(e.to_string()))?;
        Ok(st.into())
    }

    /// Size in bytes.
    pub fn size(&self, h: &Handle) -> Result<u64, ClientError> {
        self.check_handle(h)?;
        Ok(self.inner.call(&Request::Fsize { handle: h.id })?.value)
    }

    /// The handle's canonical path, e.g. `"disk.virtio-scsi:0"`.
    pub fn fpath(&self, h: &Handle) -> Result<String, ClientError> {
        self.check_handle(h)?;
        let reply = self.inner.call(&Request::Fpath { handle: h.id })?;
        if reply.payload.len() > MAX_PATH {
            return Err(protocol_err("fpath reply too long"));
        }
        String::from_utf8(reply.payload).map_err(|_| protocol_err("fpath reply is not UTF-8"))
    }

    /// The driver's counters as text, one `name value` item per line.
    pub fn stats(&self) -> Result<String, ClientError> {
        let reply = self.inner.call(&Request::Stats)?;
        String::from_utf8(reply.payload).map_err(|_| protocol_err("stats reply is not UTF-8"))
    }

    /// Closes the handle and reports the server's result.
    pub fn close(&self, mut h: Handle) -> Result<(), ClientError> {
        self.check_handle(&h)?;
        h.closed = true;
        self.inner.call(&Request::Close { handle: h.id }).map(drop)
    }

    /// The root listing of `scheme` (`"disk.virtio-scsi"`, with or without a trailing `:`):
    /// one entry per line (`"0"`, `"1"`, `"0p0"`, ...). Another scheme gives `ENODEV`.
    pub fn list(&self, scheme: &str) -> Result<Vec<String>, ClientError> {
        let name = scheme.split_once(':').map_or(scheme, |(n, _)| n);
        if name != self.inner.scheme {
            return Err(ClientError::from_errno(ENODEV));
        }
        let h = self.open_with_flags("/", O_RDONLY | O_DIRECTORY)?;
        let mut text = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let res = loop {
            match self.read_at(&h, text.len() as u64, &mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    text.extend_from_slice(&buf[..n]);
                    if text.len() > MAX_LISTING {
                        break Err(protocol_err("root listing is too long"));
                    }
                }
                Err(e) => break Err(e),
            }
        };
        let closed = self.close(h);
        res?;
        closed?;
        let text = String::from_utf8(text).map_err(|_| protocol_err("listing is not UTF-8"))?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// Whether the shared-memory transport is on ([`Client::connect_shm`]).
    pub fn has_shm(&self) -> bool {
        self.inner.shm.is_some()
    }

    /// What the server set up for the shared-memory session.
    pub fn shm_info(&self) -> Option<ShmInfo> {
        self.inner.shm.as_ref().map(|s| *s.info())
    }

    fn session(&self) -> Result<&Session, ClientError> {
        self.inner
            .shm
            .as_ref()
            .ok_or_else(|| ClientError::from_errno(EOPNOTSUPP))
    }

    /// A buffer of `len` bytes in the arena (4 KiB-aligned, contents unspecified). `ENOMEM`
    /// when the arena has no room, `EOPNOTSUPP` without a shared-memory session.
    pub fn alloc_buf(&self, len: usize) -> Result<ArenaBuf, ClientError> {
        self.session()?.alloc_buf(len)
    }

    fn prep_io(
        &self,
        opcode: u8,
        h: &Handle,
        offset: u64,
        buf: ArenaBuf,
    ) -> Result<Ticket, PrepError> {
        let s = match self
            .session()
            .and_then(|s| self.check_handle(h).map(|()| s))
        {
            Ok(s) => s,
            Err(error) => {
                return Err(PrepError {
                    error,
                    buf: Some(buf),
                });
            }
        };
        if offset.checked_add(buf.len() as u64).is_none() {
            return Err(PrepError {
                error: ClientError::from_errno(EINVAL),
                buf: Some(buf),
            });
        }
        s.prep(opcode, h.id, offset, Some(buf), false)
    }

    /// Queues a read of `buf.len()` bytes at `offset` into `buf` (an arena buffer of this
    /// client); nothing is sent before [`Client::submit`]. The buffer comes back in the
    /// completion. Fails (with the buffer back) without a free request slot (`EAGAIN`: reap
    /// first), for a foreign or empty buffer (`EINVAL`), or a foreign handle (`EBADF`).
    pub fn prep_read(&self, h: &Handle, offset: u64, buf: ArenaBuf) -> Result<Ticket, PrepError> {
        self.prep_io(shm::op::READ, h, offset, buf)
    }

    /// Queues a write of `buf` at `offset`; see [`Client::prep_read`].
    pub fn prep_write(&self, h: &Handle, offset: u64, buf: ArenaBuf) -> Result<Ticket, PrepError> {
        self.prep_io(shm::op::WRITE, h, offset, buf)
    }

    /// Queues an fsync of the handle's disk: when it completes, every write that completed
    /// before it was submitted is durable.
    pub fn prep_fsync(&self, h: &Handle) -> Result<Ticket, ClientError> {
        let s = self.session()?;
        self.check_handle(h)?;
        s.prep(shm::op::FSYNC, h.id, 0, None, false)
            .map_err(|e| e.error)
    }

    /// Sends every queued request to the server (a system call only if the server sleeps).
    /// Returns how many were sent.
    pub fn submit(&self) -> Result<usize, ClientError> {
        if let Some(e) = self.inner.shared.dead() {
            return Err(e);
        }
        self.session()?.submit()
    }

    /// Waits until at least `min` queued requests finished (or `timeout` passed; `None`
    /// waits as long as it takes) and appends their completions to `out`, returning how many
    /// it added (possibly more than `min`, fewer after a timeout). Does not allocate when
    /// `out` has room. Fails if the connection is lost or the server broke the ring's rules.
    pub fn reap(
        &self,
        min: usize,
        timeout: Option<Duration>,
        out: &mut Vec<Completion>,
    ) -> Result<usize, ClientError> {
        let shared = &self.inner.shared;
        self.session()?.reap(min, timeout, out, &|| shared.dead())
    }

    /// `read_at`/`write_at` through the shared-memory session, one bounce copy per piece.
    /// `None`: no session, or no room in the arena (the caller uses the socket).
    fn shm_rw(
        &self,
        h: &Handle,
        offset: u64,
        mut io: ShmRw<'_>,
    ) -> Option<Result<usize, ClientError>> {
        let s = self.inner.shm.as_ref()?;
        let total_len = io.len();
        if offset.checked_add(total_len as u64).is_none() {
            return Some(Err(ClientError::from_errno(EINVAL)));
        }
        let piece_max = (s.info().max_io as usize).min(SHM_BOUNCE_MAX);
        let mut bounce = s.alloc_buf(total_len.min(piece_max)).ok()?;
        let shared = &self.inner.shared;
        let mut done = 0usize;
        while done < total_len {
            let n = (total_len - done).min(bounce.capacity());
            bounce.set_len(n);
            let pos = offset + done as u64;
            let opcode = match &io {
                ShmRw::Read(_) => shm::op::READ,
                ShmRw::Write(src) => {
                    bounce.copy_from_slice(&src[done..done + n]);
                    shm::op::WRITE
                }
            };
            let ticket = match s.prep(opcode, h.id, pos, Some(bounce), true) {
                Ok(t) => t,
                Err(PrepError {
                    error,
                    buf: Some(b),
                }) if error.errno() == Some(EAGAIN) && done == 0 => {
                    // Every slot busy with prepared requests: use the socket instead.
                    drop(b);
                    return None;
                }
                Err(e) => return Some(Err(e.error)),
            };
            if let Err(e) = s.submit() {
                return Some(Err(e));
            }
            let c = match s.wait_sync(ticket, &|| shared.dead()) {
                Ok(c) => c,
                Err(e) => return Some(Err(e)),
            };
            let Some(b) = c.buf else {
                return Some(Err(protocol_err("completion lost its buffer")));
            };
            bounce = b;
            let got = match c.result {
                Ok(got) => got,
                // The end of the device exactly at a piece boundary: a short write.
                Err(e) if done > 0 && e.errno() == Some(ENOSPC) => return Some(Ok(done)),
                Err(e) => return Some(Err(e)),
            };
            if let ShmRw::Read(dst) = &mut io {
                dst[done..done + got].copy_from_slice(&bounce[..got]);
            }
            done += got;
            if got < n {
                break; // end of device
            }
        }
        Some(Ok(done))
    }

    /// Opens `path` for status only (`O_STAT`: no I/O, no locks) and returns its status.
    pub fn stat_path(&self, path: &str) -> Result<Stat, ClientError> {
        let h = self.open_with_flags(path, O_STAT)?;
        let st = self.stat(&h);
        let closed = self.close(h);
        let st = st?;
        closed?;
        Ok(st)
    }
}
