//! The socket server: serves one [`DiskScheme`] to many clients over a Unix stream socket.
//!
//! Owns: binding the socket (stale-socket check, permissions), accepting connections (with
//! SO_PEERCRED as the caller context and a connection cap), per-connection reader and writer
//! threads, the shared worker pool that runs scheme calls, per-connection handle ownership and
//! clean-up, backpressure, and orderly shutdown.
//!
//! Threads: one accept loop (the caller of [`Server::run`]); per connection a reader thread
//! (decodes frames, enforces the in-flight bounds, dispatches to the pool, tears the connection
//! down) and a writer thread (writes each encoded reply as one whole frame). Workers never
//! touch a socket, so a client that stops reading its replies stalls only its own connection,
//! never the worker pool.
//!
//! With an [`ArenaProvider`] configured, a connection may also start the shared-memory
//! transport (`ShmSetup`, see [`crate::shm`] and [`crate::shm_server`]): its reader thread sets
//! the session up, a per-connection poller thread takes submissions from the ring and starts
//! the aligned reads and writes itself where the device has split-phase I/O, and a separate
//! pool of shm workers runs the rest. The session ends with the connection.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use block_scheme::{BlockDevice, CallerCtx, DiskScheme};
use crossbeam_channel::{Receiver, Sender};
use log::{debug, error, info, warn};
use rustix::event::{PollFd, PollFlags, poll};
use rustix::net::SendFlags;
use syscall::error::{
    EBADF, EEXIST, EINVAL, EIO, ENAMETOOLONG, EOPNOTSUPP, EPROTO, ESHUTDOWN, EUSERS,
};

use crate::protocol::{
    self, MAX_NAME, MAX_PATH, MAX_PAYLOAD, Opcode, REPLY_HEADER_LEN, REQUEST_HEADER_LEN, ReadError,
    Reply, ReplyHeader, Request,
};
use crate::shm_server::{self, ArenaProvider, JobQueue, ShmHandle, ShmService};

/// Default number of worker threads.
pub const DEFAULT_WORKERS: usize = 64;
/// Default cap on open connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default cap on requests in flight per connection.
pub const DEFAULT_MAX_IN_FLIGHT_PER_CONN: usize = 256;
/// Default (and largest) arena of a shared-memory session, in bytes.
pub const DEFAULT_ARENA_BYTES: usize = 32 << 20;
/// Default longest time a shared-memory poller spins before it sleeps, on machines where
/// spinning pays ([`crate::shm::spin_worthwhile`]; elsewhere the default is 0).
pub const DEFAULT_SHM_SPIN: Duration = Duration::from_micros(50);
/// Default permissions of the socket file.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// Cap on request and reply bytes in flight per connection (the reader stops reading once it
/// is reached; one more frame of up to [`MAX_PAYLOAD`] may be admitted past it).
pub const MAX_IN_FLIGHT_BYTES_PER_CONN: u64 = 64 << 20;
/// How long shutdown waits for in-flight requests after it stopped reading new ones.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long shutdown waits after forcibly closing connections that did not finish in time.
pub const SHUTDOWN_FORCE_GRACE: Duration = Duration::from_secs(5);

const CONN_STACK: usize = 256 << 10;

/// Returns the socket path used by both the daemon and the clients when none is given:
///
/// 1. `$VSCSI_SOCKET`, if it is set and not empty;
/// 2. otherwise `/run/virtio-scsid.sock` when running as root (effective uid 0);
/// 3. otherwise `$XDG_RUNTIME_DIR/virtio-scsid.sock`, if `XDG_RUNTIME_DIR` is set and not empty;
/// 4. otherwise `/tmp/virtio-scsid-<uid>.sock`, with the real user id.
pub fn default_socket_path() -> PathBuf {
    if let Some(p) = std::env::var_os("VSCSI_SOCKET").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/run/virtio-scsid.sock");
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        return PathBuf::from(dir).join("virtio-scsid.sock");
    }
    PathBuf::from(format!(
        "/tmp/virtio-scsid-{}.sock",
        rustix::process::getuid().as_raw()
    ))
}

/// How the server listens and how much it lets clients do at once.
#[derive(Clone)]
pub struct ServerConfig {
    /// Where the socket file goes.
    pub socket_path: PathBuf,
    /// Worker threads running scheme calls (0 is taken as 1). With arenas, as many again run
    /// the shared-memory sessions' requests (a separate pool, shared by all sessions).
    pub workers: usize,
    /// Open connections allowed; more are accepted, told `EUSERS` and closed (0 is taken as 1).
    pub max_connections: usize,
    /// Requests in flight per connection before the server stops reading it (0 is taken as 1).
    /// Also the most requests a shared-memory session runs at once (its rings get the next
    /// power of two, at most 4096, as entries).
    pub max_in_flight_per_conn: usize,
    /// Permissions of the socket file, e.g. `0o660`.
    pub socket_mode: u32,
    /// Pin worker `i` to the `i mod n`-th CPU this process may run on, so that the CPU a
    /// request is submitted from (which the driver's queue steering uses) is the worker's.
    pub pin_workers: bool,
    /// Where shared-memory arenas come from; `None` (the default): clients asking for the
    /// shared-memory transport get `EOPNOTSUPP` and keep using the socket.
    pub arena: Option<Arc<dyn ArenaProvider>>,
    /// Arena size a session gets by default, and the most a client may ask for.
    pub arena_bytes: usize,
    /// Longest time a session's poller spins on an empty ring before it sleeps (adaptive
    /// below this); 0 never spins.
    pub shm_spin: Duration,
    /// Busy polling of the device by a session's poller: with requests it started itself in
    /// flight and nothing else to do, it polls the device's completions
    /// ([`block_scheme::BlockDevice::busy_poll`], the device's interrupts off meanwhile) for
    /// up to this long without progress before it sleeps until a completion wakes it. 0 (the
    /// default): it sleeps at once.
    pub shm_poll: Duration,
    /// Whether a session's poller starts aligned whole-block reads and writes itself, without
    /// a worker, when the device has split-phase I/O ([`block_scheme::BlockDevice::async_io`];
    /// see [`crate::shm_server`]). On by default; off, every request goes to the shm workers.
    pub shm_async: bool,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("socket_path", &self.socket_path)
            .field("workers", &self.workers)
            .field("max_connections", &self.max_connections)
            .field("max_in_flight_per_conn", &self.max_in_flight_per_conn)
            .field("socket_mode", &format_args!("{:o}", self.socket_mode))
            .field("pin_workers", &self.pin_workers)
            .field("arena", &self.arena.is_some())
            .field("arena_bytes", &self.arena_bytes)
            .field("shm_spin", &self.shm_spin)
            .field("shm_poll", &self.shm_poll)
            .field("shm_async", &self.shm_async)
            .finish()
    }
}

impl ServerConfig {
    /// Defaults with the given socket path.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        ServerConfig {
            socket_path: socket_path.into(),
            workers: DEFAULT_WORKERS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_in_flight_per_conn: DEFAULT_MAX_IN_FLIGHT_PER_CONN,
            socket_mode: DEFAULT_SOCKET_MODE,
            pin_workers: false,
            arena: None,
            arena_bytes: DEFAULT_ARENA_BYTES,
            shm_spin: if crate::shm::spin_worthwhile() {
                DEFAULT_SHM_SPIN
            } else {
                Duration::ZERO
            },
            shm_poll: Duration::ZERO,
            shm_async: true,
        }
    }
}

impl Default for ServerConfig {
    /// Defaults with [`default_socket_path`].
    fn default() -> Self {
        ServerConfig::new(default_socket_path())
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves consistent state.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(|e| e.into_inner())
}

fn wait_timeout<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>, d: Duration) -> MutexGuard<'a, T> {
    match cv.wait_timeout(g, d) {
        Ok((g, _)) => g,
        Err(e) => e.into_inner().0,
    }
}

/// Writes all of `buf` to a socket without raising SIGPIPE.
pub(crate) fn send_all(fd: impl AsFd, mut buf: &[u8], flags: SendFlags) -> io::Result<()> {
    while !buf.is_empty() {
        match rustix::net::send(&fd, buf, flags | SendFlags::NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = buf.get(n..).unwrap_or_default(),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

struct ShutdownState {
    requested: AtomicBool,
    wake_r: OwnedFd,
    wake_w: OwnedFd,
}

/// Asks a running [`Server`] (or any accept loop that polls [`ShutdownHandle::wake_fd`], like
/// the NBD gateway) to stop. Cheap to clone; usable from any thread, a signal thread included.
#[derive(Clone)]
pub struct ShutdownHandle {
    state: Arc<ShutdownState>,
}

impl ShutdownHandle {
    /// A handle not yet asked to stop, with its wake-up pipe.
    pub fn new() -> io::Result<Self> {
        let (wake_r, wake_w) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        )?;
        Ok(ShutdownHandle {
            state: Arc::new(ShutdownState {
                requested: AtomicBool::new(false),
                wake_r,
                wake_w,
            }),
        })
    }

    /// Becomes readable once a stop was requested: poll it next to the listening sockets.
    pub fn wake_fd(&self) -> &OwnedFd {
        &self.state.wake_r
    }

    /// Requests shutdown: the server stops accepting, finishes in-flight requests (bounded),
    /// closes every handle and removes its socket file; [`Server::run`] then returns.
    /// Idempotent; may be called before `run`.
    pub fn shutdown(&self) {
        self.state.requested.store(true, Ordering::SeqCst);
        // The pipe is non-blocking: if it is full, a wake-up is already pending.
        let _ = rustix::io::write(&self.state.wake_w, &[1]);
    }

    /// Whether shutdown has been requested.
    pub fn is_shutdown(&self) -> bool {
        self.state.requested.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("requested", &self.is_shutdown())
            .finish()
    }
}

/// The socket server. See the module documentation.
pub struct Server<D: BlockDevice> {
    config: ServerConfig,
    scheme: Arc<DiskScheme<D>>,
    listener: Mutex<Option<UnixListener>>,
    /// (dev, ino) of the socket file we created, so we never remove someone else's.
    socket_id: (u64, u64),
    shutdown: ShutdownHandle,
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

impl<D: BlockDevice> Server<D> {
    /// Binds the socket at `config.socket_path` and sets its permissions to
    /// `config.socket_mode`. An existing socket file is removed only if nothing answers on it;
    /// if a live server answers, this fails with `AddrInUse`. A path that exists and is not a
    /// socket is never removed (`AlreadyExists`).
    pub fn bind(config: ServerConfig, scheme: Arc<DiskScheme<D>>) -> io::Result<Self> {
        let path = config.socket_path.clone();
        match fs::symlink_metadata(&path) {
            Ok(md) => {
                if !md.file_type().is_socket() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!(
                            "{} exists and is not a socket; refusing to replace it",
                            path.display()
                        ),
                    ));
                }
                match UnixStream::connect(&path) {
                    Ok(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!(
                                "another server is already listening on {}; stop it first",
                                path.display()
                            ),
                        ));
                    }
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        info!("removing stale socket {}", path.display());
                        match fs::remove_file(&path) {
                            Ok(()) => {}
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                            Err(e) => {
                                return Err(with_path(e, "cannot remove stale socket", &path));
                            }
                        }
                    }
                    Err(e) => {
                        return Err(with_path(e, "cannot check existing socket", &path));
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(with_path(e, "cannot inspect", &path)),
        }

        let listener = Self::bind_with_mode(&path, config.socket_mode)?;
        listener.set_nonblocking(true)?;
        let md = fs::symlink_metadata(&path).map_err(|e| with_path(e, "cannot stat", &path))?;
        let shutdown = ShutdownHandle::new()?;
        info!(
            "listening on {} (mode {:o}) for scheme {}",
            path.display(),
            config.socket_mode,
            scheme.name()
        );
        Ok(Server {
            config,
            scheme,
            listener: Mutex::new(Some(listener)),
            socket_id: (md.dev(), md.ino()),
            shutdown,
        })
    }

    /// Binds under a temporary name, sets the mode, then renames into place, so the socket is
    /// never reachable at `path` with the umask's permissions.
    fn bind_with_mode(path: &Path, mode: u32) -> io::Result<UnixListener> {
        let perms = fs::Permissions::from_mode(mode);
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "socket".into());
        let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&tmp);
        match UnixListener::bind(&tmp) {
            Ok(l) => {
                let done = fs::set_permissions(&tmp, perms)
                    .map_err(|e| with_path(e, "cannot set permissions of", &tmp))
                    .and_then(|()| {
                        fs::rename(&tmp, path)
                            .map_err(|e| with_path(e, "cannot move socket to", path))
                    });
                if let Err(e) = done {
                    let _ = fs::remove_file(&tmp);
                    return Err(e);
                }
                Ok(l)
            }
            // The temporary name may be too long for sun_path where the real one is not.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                let l = UnixListener::bind(path).map_err(|e| with_path(e, "cannot bind", path))?;
                if let Err(e) = fs::set_permissions(path, perms) {
                    let _ = fs::remove_file(path);
                    return Err(with_path(e, "cannot set permissions of", path));
                }
                Ok(l)
            }
            Err(e) => Err(with_path(e, "cannot bind", &tmp)),
        }
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.config.socket_path
    }

    /// A handle that stops [`Server::run`] from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    fn remove_socket_file(&self) {
        let path = &self.config.socket_path;
        match fs::symlink_metadata(path) {
            Ok(md) if (md.dev(), md.ino()) == self.socket_id => {
                if let Err(e) = fs::remove_file(path) {
                    warn!("cannot remove socket {}: {e}", path.display());
                }
            }
            Ok(_) => warn!(
                "socket {} was replaced by someone else; leaving it",
                path.display()
            ),
            Err(_) => {}
        }
    }

    /// Accepts and serves connections until shutdown is requested through a
    /// [`ShutdownHandle`]. Then it stops accepting, removes the socket file, stops reading
    /// requests, waits (at most [`SHUTDOWN_GRACE`], then forcibly closes connections) for
    /// requests in flight, closes every handle clients left open, and returns.
    ///
    /// Can be called once; a second call fails.
    pub fn run(&self) -> io::Result<()> {
        let Some(listener) = lock(&self.listener).take() else {
            return Err(io::Error::other("Server::run called more than once"));
        };
        let registry = Arc::new(Registry {
            conns: Mutex::new(HashMap::new()),
            cv: Condvar::new(),
        });
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
        let workers = match self.spawn_workers(&job_rx) {
            Ok(w) => w,
            Err(e) => {
                self.remove_socket_file();
                return Err(e);
            }
        };
        drop(job_rx);
        let limits = Limits {
            max_in_flight: self.config.max_in_flight_per_conn.max(1),
        };
        let mut shm_workers = Vec::new();
        let shm_queue = Arc::new(JobQueue::new(
            self.config.workers.max(1) * 2,
            self.config.workers.max(1),
        ));
        let shm = match &self.config.arena {
            None => None,
            Some(provider) => {
                let n = self.config.workers.max(1);
                match shm_server::spawn_workers(&self.scheme, &shm_queue, n) {
                    Ok(w) => shm_workers = w,
                    Err(e) => {
                        shm_queue.close();
                        self.remove_socket_file();
                        return Err(e);
                    }
                }
                Some(Arc::new(ShmService {
                    provider: provider.clone(),
                    arena_bytes: self.config.arena_bytes.max(4096),
                    max_in_flight: u32::try_from(limits.max_in_flight).unwrap_or(u32::MAX),
                    spin: self.config.shm_spin,
                    poll: self.config.shm_poll,
                    jobs: shm_queue.clone(),
                    scheme: self
                        .config
                        .shm_async
                        .then(|| self.scheme.clone() as Arc<dyn shm_server::AsyncScheme>),
                }))
            }
        };
        let next_id = AtomicU64::new(1);

        let result = self.accept_loop(&listener, &registry, &job_tx, &shm, limits, &next_id);

        // Stop accepting: nobody can reach us by path, and queued connections are refused.
        self.remove_socket_file();
        drop(listener);
        self.drain(&registry);
        drop(job_tx);
        drop(shm);
        shm_queue.close();
        let deadline = Instant::now() + SHUTDOWN_FORCE_GRACE;
        for w in workers.into_iter().chain(shm_workers) {
            while !w.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if w.is_finished() {
                let _ = w.join();
            } else {
                warn!("a worker is still busy in the device; not waiting for it");
            }
        }
        info!("server on {} stopped", self.config.socket_path.display());
        result
    }

    fn spawn_workers(&self, job_rx: &Receiver<Job>) -> io::Result<Vec<thread::JoinHandle<()>>> {
        let n = self.config.workers.max(1);
        let cpus = if self.config.pin_workers {
            allowed_cpus()
        } else {
            Vec::new()
        };
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            let rx = job_rx.clone();
            let scheme = self.scheme.clone();
            let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
            let h = thread::Builder::new()
                .name(format!("vscsi-worker-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_to(cpu);
                    }
                    worker(scheme, rx)
                });
            match h {
                Ok(h) => v.push(h),
                Err(e) if !v.is_empty() => {
                    warn!("could only start {} of {n} workers: {e}", v.len());
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(v)
    }

    fn accept_loop(
        &self,
        listener: &UnixListener,
        registry: &Arc<Registry>,
        job_tx: &Sender<Job>,
        shm: &Option<Arc<ShmService>>,
        limits: Limits,
        next_id: &AtomicU64,
    ) -> io::Result<()> {
        loop {
            if self.shutdown.is_shutdown() {
                return Ok(());
            }
            let mut fds = [
                PollFd::new(listener, PollFlags::IN),
                PollFd::new(self.shutdown.wake_fd(), PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    error!("poll on the listening socket failed: {e}");
                    return Err(e.into());
                }
            }
            if self.shutdown.is_shutdown() {
                return Ok(());
            }
            loop {
                match listener.accept() {
                    Ok((stream, _)) => self.admit(stream, registry, job_tx, shm, limits, next_id),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                        ) => {}
                    Err(e) => {
                        // EMFILE, ENFILE, ENOBUFS, ENOMEM: back off instead of spinning.
                        warn!("accept failed: {e}; retrying shortly");
                        thread::sleep(Duration::from_millis(100));
                        break;
                    }
                }
            }
        }
    }

    fn admit(
        &self,
        stream: UnixStream,
        registry: &Arc<Registry>,
        job_tx: &Sender<Job>,
        shm: &Option<Arc<ShmService>>,
        limits: Limits,
        next_id: &AtomicU64,
    ) {
        let ctx = match rustix::net::sockopt::socket_peercred(&stream) {
            Ok(c) => CallerCtx {
                uid: c.uid.as_raw(),
                gid: c.gid.as_raw(),
                pid: u32::try_from(c.pid.as_raw_pid()).unwrap_or(0),
            },
            Err(e) => {
                warn!("refusing a connection: cannot read its credentials (SO_PEERCRED): {e}");
                return;
            }
        };
        // Accepted sockets are blocking; make sure of it whatever the listener is.
        if let Err(e) = stream.set_nonblocking(false) {
            warn!("refusing connection from pid {}: {e}", ctx.pid);
            return;
        }
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let (out_tx, out_rx) = crossbeam_channel::unbounded();
        let conn = Arc::new(Conn {
            id,
            stream,
            ctx,
            handles: Mutex::new(Handles {
                closed: false,
                map: HashMap::new(),
            }),
            flight: Mutex::new(Flight { count: 0, bytes: 0 }),
            flight_cv: Condvar::new(),
            out_tx,
            shm: Mutex::new(None),
        });
        {
            let mut conns = lock(&registry.conns);
            let max = self.config.max_connections.max(1);
            if conns.len() >= max {
                drop(conns);
                warn!(
                    "refusing connection from pid {} (uid {}): {max} connections already open (the limit)",
                    ctx.pid, ctx.uid
                );
                // Tell the client why: an unsolicited Hello error with tag 0, without blocking.
                let frame = Reply::error(Some(Opcode::Hello), 0, EUSERS).encode();
                let _ = send_all(&conn.stream, &frame, SendFlags::DONTWAIT);
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
                return;
            }
            conns.insert(id, conn.clone());
        }
        debug!(
            "connection {id} from pid {} uid {} gid {}",
            ctx.pid, ctx.uid, ctx.gid
        );
        let scheme = self.scheme.clone();
        let reg = registry.clone();
        let jobs = job_tx.clone();
        let shm = shm.clone();
        let conn2 = conn.clone();
        let spawned = thread::Builder::new()
            .name(format!("vscsi-conn-{id}"))
            .stack_size(CONN_STACK)
            .spawn(move || {
                serve_connection(&scheme, &conn2, &jobs, shm.as_deref(), limits, out_rx);
                lock(&reg.conns).remove(&conn2.id);
                reg.cv.notify_all();
            });
        if let Err(e) = spawned {
            warn!(
                "refusing connection {id} from pid {}: cannot start a thread: {e}",
                ctx.pid
            );
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            lock(&registry.conns).remove(&id);
            registry.cv.notify_all();
        }
    }

    /// Stops reading every connection, waits for them to finish, forcing them after the grace.
    fn drain(&self, registry: &Registry) {
        let conns: Vec<Arc<Conn>> = lock(&registry.conns).values().cloned().collect();
        if !conns.is_empty() {
            info!(
                "shutting down: finishing requests of {} connections",
                conns.len()
            );
        }
        for c in &conns {
            let _ = c.stream.shutdown(std::net::Shutdown::Read);
        }
        drop(conns);
        if self.wait_conns(registry, SHUTDOWN_GRACE) {
            return;
        }
        let conns: Vec<Arc<Conn>> = lock(&registry.conns).values().cloned().collect();
        warn!(
            "{} connections still busy after {:?}; closing them",
            conns.len(),
            SHUTDOWN_GRACE
        );
        for c in &conns {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
        drop(conns);
        if !self.wait_conns(registry, SHUTDOWN_FORCE_GRACE) {
            error!(
                "{} connections have requests stuck in the device; their handles are closed when those finish",
                lock(&registry.conns).len()
            );
        }
    }

    fn wait_conns(&self, registry: &Registry, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut g = lock(&registry.conns);
        while !g.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = wait_timeout(&registry.cv, g, deadline - now);
        }
        true
    }
}

impl<D: BlockDevice> Drop for Server<D> {
    fn drop(&mut self) {
        // Bound but never run: still remove our socket file.
        if lock(&self.listener).take().is_some() {
            self.remove_socket_file();
        }
    }
}

struct Registry {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    cv: Condvar,
}

#[derive(Clone, Copy)]
struct Limits {
    max_in_flight: usize,
}

/// One open scheme handle owned by a connection. Operations hold the read lock for the length
/// of the scheme call; Close takes the write lock, so a handle id is never closed (and possibly
/// reused by the scheme for someone else) while an operation of this connection still uses it.
pub(crate) type HandleSlot = Arc<RwLock<Option<usize>>>;

struct Handles {
    /// Set at teardown: handles opened afterwards are closed at once.
    closed: bool,
    map: HashMap<u64, HandleSlot>,
}

struct Flight {
    count: usize,
    bytes: u64,
}

enum Out {
    /// An encoded reply frame; `cost` is released from the in-flight bounds once written.
    Frame { bytes: Vec<u8>, cost: Option<u64> },
    /// An encoded reply frame with descriptors attached to its first byte.
    FrameFds { bytes: Vec<u8>, fds: Vec<OwnedFd> },
    /// No more frames will come.
    Stop,
}

pub(crate) struct Conn {
    pub(crate) id: u64,
    pub(crate) stream: UnixStream,
    pub(crate) ctx: CallerCtx,
    handles: Mutex<Handles>,
    flight: Mutex<Flight>,
    flight_cv: Condvar,
    out_tx: Sender<Out>,
    /// The shared-memory session, if the client started one.
    shm: Mutex<Option<ShmHandle>>,
}

impl Conn {
    fn send(&self, bytes: Vec<u8>, cost: Option<u64>) {
        if self.out_tx.send(Out::Frame { bytes, cost }).is_err()
            && let Some(c) = cost
        {
            self.release(c);
        }
    }

    fn release(&self, cost: u64) {
        let mut f = lock(&self.flight);
        f.count = f.count.saturating_sub(1);
        f.bytes = f.bytes.saturating_sub(cost);
        drop(f);
        self.flight_cv.notify_all();
    }

    /// Blocks while the connection is at its in-flight bounds (backpressure).
    fn wait_for_slot(&self, limits: Limits) {
        let mut f = lock(&self.flight);
        while f.count >= limits.max_in_flight || f.bytes >= MAX_IN_FLIGHT_BYTES_PER_CONN {
            f = wait(&self.flight_cv, f);
        }
    }

    fn acquire(&self, cost: u64) {
        let mut f = lock(&self.flight);
        f.count += 1;
        f.bytes += cost;
    }

    fn wait_idle(&self) {
        let mut f = lock(&self.flight);
        while f.count > 0 {
            f = wait(&self.flight_cv, f);
        }
    }

    pub(crate) fn slot(&self, handle: u64) -> Option<HandleSlot> {
        lock(&self.handles).map.get(&handle).cloned()
    }
}

struct Job {
    conn: Arc<Conn>,
    tag: u64,
    req: Request,
    cost: u64,
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| set.is_set(c))
            .collect(),
        Err(e) => {
            warn!("cannot read the CPU affinity ({e}); workers stay unpinned");
            Vec::new()
        }
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        warn!("cannot pin a worker to CPU {cpu}: {e}");
    }
}

fn worker<D: BlockDevice>(scheme: Arc<DiskScheme<D>>, rx: Receiver<Job>) {
    for job in rx.iter() {
        let op = job.req.opcode();
        let tag = job.tag;
        let conn = job.conn;
        let frame = catch_unwind(AssertUnwindSafe(|| execute(&scheme, &conn, tag, job.req)))
            .unwrap_or_else(|_| {
                error!(
                    "connection {}: {} request (tag {tag}) panicked in the scheme; replying EIO",
                    conn.id,
                    op.name()
                );
                Reply::error(Some(op), tag, EIO).encode()
            });
        conn.send(frame, Some(job.cost));
    }
}

fn err_frame(op: Opcode, tag: u64, e: syscall::error::Error) -> Vec<u8> {
    Reply::error(Some(op), tag, e.errno).encode()
}

/// Runs `f` with the scheme id of `handle`, if this connection owns it and it is open.
fn with_handle(
    conn: &Conn,
    handle: u64,
    f: impl FnOnce(usize) -> block_scheme::Result<Vec<u8>>,
) -> block_scheme::Result<Vec<u8>> {
    let Some(slot) = conn.slot(handle) else {
        return Err(syscall::error::Error::new(EBADF));
    };
    let guard = slot.read().unwrap_or_else(|e| e.into_inner());
    match *guard {
        Some(id) => f(id),
        None => Err(syscall::error::Error::new(EBADF)),
    }
}

fn ok_frame(op: Opcode, tag: u64, value: u64, payload: Vec<u8>) -> Vec<u8> {
    Reply::ok(op, tag, value, payload).encode()
}

fn execute<D: BlockDevice>(scheme: &DiskScheme<D>, conn: &Conn, tag: u64, req: Request) -> Vec<u8> {
    let op = req.opcode();
    let res: block_scheme::Result<Vec<u8>> = match req {
        Request::Hello { .. } => Err(syscall::error::Error::new(EPROTO)),
        Request::Open { path, flags } => open(scheme, conn, tag, &path, flags),
        Request::Read {
            handle,
            offset,
            len,
        } => with_handle(conn, handle, |id| {
            let len = len as usize;
            let mut buf = vec![0u8; REPLY_HEADER_LEN + len];
            let n = scheme.read(id, offset, &mut buf[REPLY_HEADER_LEN..])?;
            if n > len {
                error!("scheme read returned {n} bytes for a {len}-byte buffer");
                return Err(syscall::error::Error::new(EIO));
            }
            buf.truncate(REPLY_HEADER_LEN + n);
            let h = ReplyHeader {
                op: Some(op),
                tag,
                status: 0,
                value: n as u64,
                payload_len: n as u32,
            };
            buf[..REPLY_HEADER_LEN].copy_from_slice(&h.encode());
            Ok(buf)
        }),
        Request::Write {
            handle,
            offset,
            data,
        } => with_handle(conn, handle, |id| {
            let n = scheme.write(id, offset, &data)?;
            if n > data.len() {
                error!("scheme write returned {n} for {} bytes", data.len());
                return Err(syscall::error::Error::new(EIO));
            }
            Ok(ok_frame(op, tag, n as u64, Vec::new()))
        }),
        Request::Fsync { handle } => with_handle(conn, handle, |id| {
            scheme.fsync(id)?;
            Ok(ok_frame(op, tag, 0, Vec::new()))
        }),
        Request::Fstat { handle } => with_handle(conn, handle, |id| {
            let st = scheme.fstat(id)?;
            Ok(ok_frame(op, tag, 0, protocol::encode_stat(&st).to_vec()))
        }),
        Request::Fsize { handle } => with_handle(conn, handle, |id| {
            let size = scheme.fsize(id)?;
            Ok(ok_frame(op, tag, size, Vec::new()))
        }),
        Request::Fpath { handle } => with_handle(conn, handle, |id| {
            let p = scheme.fpath(id)?;
            if p.len() > MAX_PATH {
                return Err(syscall::error::Error::new(ENAMETOOLONG));
            }
            Ok(ok_frame(op, tag, 0, p.into_bytes()))
        }),
        Request::Close { handle } => close(scheme, conn, tag, handle),
        Request::Discard {
            handle,
            offset,
            len,
        } => with_handle(conn, handle, |id| {
            scheme.discard(id, offset, len)?;
            Ok(ok_frame(op, tag, 0, Vec::new()))
        }),
        Request::WriteZeroes {
            handle,
            offset,
            len,
        } => with_handle(conn, handle, |id| {
            let n = scheme.write_zeroes(id, offset, len)?;
            if n > len {
                error!("scheme zeroed {n} bytes for a {len}-byte request");
                return Err(syscall::error::Error::new(EIO));
            }
            Ok(ok_frame(op, tag, n, Vec::new()))
        }),
        Request::Identity { handle } => with_handle(conn, handle, |id| {
            let caps = if scheme.can_discard(id)? {
                protocol::CAP_DISCARD
            } else {
                0
            };
            let payload = scheme
                .identity(id)?
                .map(|i| protocol::encode_identity(&i))
                .unwrap_or_default();
            Ok(ok_frame(op, tag, caps, payload))
        }),
        // Handled by the reader thread; never dispatched.
        Request::ShmSetup { .. } => Err(syscall::error::Error::new(EPROTO)),
        Request::Stats => {
            let text = scheme.device().stats();
            if text.len() > MAX_PAYLOAD {
                Err(syscall::error::Error::new(EIO))
            } else {
                Ok(ok_frame(op, tag, 0, text.into_bytes()))
            }
        }
    };
    res.unwrap_or_else(|e| err_frame(op, tag, e))
}

fn open<D: BlockDevice>(
    scheme: &DiskScheme<D>,
    conn: &Conn,
    tag: u64,
    path: &str,
    flags: u64,
) -> block_scheme::Result<Vec<u8>> {
    let flags = usize::try_from(flags).map_err(|_| syscall::error::Error::new(EINVAL))?;
    let id = scheme.open(path, flags, &conn.ctx)?;
    let mut h = lock(&conn.handles);
    if h.closed {
        drop(h);
        let _ = scheme.close(id);
        return Err(syscall::error::Error::new(ESHUTDOWN));
    }
    // A scheme id is unique among open handles; a leftover slot here is a closed one.
    h.map.insert(id as u64, Arc::new(RwLock::new(Some(id))));
    Ok(ok_frame(Opcode::Open, tag, id as u64, Vec::new()))
}

fn close<D: BlockDevice>(
    scheme: &DiskScheme<D>,
    conn: &Conn,
    tag: u64,
    handle: u64,
) -> block_scheme::Result<Vec<u8>> {
    let Some(slot) = conn.slot(handle) else {
        return Err(syscall::error::Error::new(EBADF));
    };
    let mut guard = slot.write().unwrap_or_else(|e| e.into_inner());
    let Some(id) = guard.take() else {
        return Err(syscall::error::Error::new(EBADF));
    };
    // No request of this connection uses the handle any more: the socket's held the read
    // lock (the write lock waited for them), new ones find it closed; the shared-memory
    // session's fast requests hold no lock, so wait for them too (outside the lock: the
    // session's poller takes it to start requests).
    drop(guard);
    let session = lock(&conn.shm).as_ref().map(ShmHandle::session);
    if let Some(session) = session {
        session.wait_handle_quiet(handle);
    }
    let res = scheme.close(id);
    let mut h = lock(&conn.handles);
    if h.map.get(&handle).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
        h.map.remove(&handle);
    }
    drop(h);
    res?;
    Ok(ok_frame(Opcode::Close, tag, 0, Vec::new()))
}

fn request_cost(req: &Request) -> u64 {
    let extra = match req {
        Request::Read { len, .. } => u64::from(*len),
        Request::Write { data, .. } => data.len() as u64,
        _ => 0,
    };
    (REQUEST_HEADER_LEN + REPLY_HEADER_LEN) as u64 + extra
}

fn serve_connection<D: BlockDevice>(
    scheme: &DiskScheme<D>,
    conn: &Arc<Conn>,
    jobs: &Sender<Job>,
    shm: Option<&ShmService>,
    limits: Limits,
    out_rx: Receiver<Out>,
) {
    let wconn = conn.clone();
    let writer = thread::Builder::new()
        .name(format!("vscsi-conn-{}-w", conn.id))
        .stack_size(CONN_STACK)
        .spawn(move || write_replies(&wconn, out_rx));
    let writer = match writer {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(
                "connection {}: cannot start its writer thread: {e}",
                conn.id
            );
            None
        }
    };
    if writer.is_some() {
        read_requests(scheme, conn, jobs, shm, limits);
    }
    // Teardown: no more requests will be read. Stop the shared-memory session (its requests
    // finish first, then the arena is given back), let the socket's requests finish and be
    // written.
    let session = lock(&conn.shm).take();
    if let Some(s) = session {
        s.shutdown();
    }
    conn.wait_idle();
    let left: Vec<HandleSlot> = {
        let mut h = lock(&conn.handles);
        h.closed = true;
        h.map.drain().map(|(_, s)| s).collect()
    };
    let mut closed = 0usize;
    for slot in left {
        let mut g = slot.write().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = g.take() {
            closed += 1;
            if let Err(e) = scheme.close(id) {
                warn!("connection {}: closing left-open handle {id}: {e}", conn.id);
            }
        }
    }
    if closed > 0 {
        debug!(
            "connection {}: closed {closed} handles it left open",
            conn.id
        );
    }
    let _ = conn.out_tx.send(Out::Stop);
    if let Some(w) = writer {
        let _ = w.join();
    }
    let _ = conn.stream.shutdown(std::net::Shutdown::Both);
    debug!("connection {} closed", conn.id);
}

fn read_requests<D: BlockDevice>(
    scheme: &DiskScheme<D>,
    conn: &Arc<Conn>,
    jobs: &Sender<Job>,
    shm: Option<&ShmService>,
    limits: Limits,
) {
    let mut reader = &conn.stream;
    let mut hello_done = false;
    loop {
        conn.wait_for_slot(limits);
        match protocol::read_request(&mut reader) {
            Ok(None) => return,
            Ok(Some((tag, Request::Hello { client }))) => {
                if hello_done {
                    refuse(conn, tag, Some(Opcode::Hello), EPROTO, "Hello sent twice");
                    return;
                }
                hello_done = true;
                debug!(
                    "connection {}: hello from {:?} (pid {})",
                    conn.id,
                    client.chars().take(MAX_NAME).collect::<String>(),
                    conn.ctx.pid
                );
                let name = scheme.name().as_bytes().to_vec();
                conn.send(
                    Reply::ok(Opcode::Hello, tag, MAX_PAYLOAD as u64, name).encode(),
                    None,
                );
            }
            Ok(Some((tag, Request::ShmSetup { arena_bytes }))) if hello_done => {
                shm_setup(conn, shm, tag, arena_bytes);
            }
            Ok(Some((tag, req))) => {
                if !hello_done {
                    refuse(
                        conn,
                        tag,
                        Some(req.opcode()),
                        EPROTO,
                        "first request must be Hello",
                    );
                    return;
                }
                let cost = request_cost(&req);
                conn.acquire(cost);
                let job = Job {
                    conn: conn.clone(),
                    tag,
                    req,
                    cost,
                };
                if let Err(crossbeam_channel::SendError(job)) = jobs.send(job) {
                    // Workers are gone (shutting down).
                    let op = job.req.opcode();
                    conn.send(Reply::error(Some(op), tag, ESHUTDOWN).encode(), Some(cost));
                    return;
                }
            }
            Err(ReadError::Malformed(fe)) => {
                warn!(
                    "connection {} (pid {}): {fe}; closing it",
                    conn.id, conn.ctx.pid
                );
                if let Some(tag) = fe.tag {
                    conn.send(Reply::error(fe.op, tag, fe.errno).encode(), None);
                }
                return;
            }
            Err(ReadError::Io(e)) => {
                debug!("connection {}: read failed: {e}", conn.id);
                return;
            }
        }
    }
}

/// Starts the shared-memory session of `conn` and sends the reply with its descriptors.
fn shm_setup(conn: &Arc<Conn>, shm: Option<&ShmService>, tag: u64, arena_bytes: u64) {
    let op = Some(Opcode::ShmSetup);
    let Some(svc) = shm else {
        conn.send(Reply::error(op, tag, EOPNOTSUPP).encode(), None);
        return;
    };
    let mut slot = lock(&conn.shm);
    if slot.is_some() {
        drop(slot);
        conn.send(Reply::error(op, tag, EEXIST).encode(), None);
        return;
    }
    match shm_server::setup(svc, conn, arena_bytes) {
        Ok((info, fds, handle)) => {
            *slot = Some(handle);
            drop(slot);
            debug!(
                "connection {}: shared-memory session, {} arena bytes, {} ring entries",
                conn.id, info.arena_len, info.sq_entries
            );
            let bytes = Reply::ok(
                Opcode::ShmSetup,
                tag,
                info.arena_len,
                info.encode().to_vec(),
            )
            .encode();
            let _ = conn.out_tx.send(Out::FrameFds { bytes, fds });
        }
        Err(e) => {
            drop(slot);
            warn!(
                "connection {} (pid {}): no shared-memory session: {}",
                conn.id, conn.ctx.pid, e.why
            );
            conn.send(Reply::error(op, tag, e.errno).encode(), None);
        }
    }
}

fn refuse(conn: &Conn, tag: u64, op: Option<Opcode>, errno: i32, why: &str) {
    warn!(
        "connection {} (pid {}): {why}; closing it",
        conn.id, conn.ctx.pid
    );
    conn.send(Reply::error(op, tag, errno).encode(), None);
}

fn write_replies(conn: &Conn, rx: Receiver<Out>) {
    let mut dead = false;
    for out in rx.iter() {
        match out {
            Out::Stop => break,
            Out::FrameFds { bytes, fds } => {
                if !dead {
                    let borrowed = crate::shm::borrow_all(&fds);
                    if let Err(e) =
                        crate::shm::send_with_fds(conn.stream.as_fd(), &bytes, &borrowed)
                    {
                        debug!(
                            "connection {}: write failed: {e}; dropping replies",
                            conn.id
                        );
                        dead = true;
                        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
                    }
                }
                // Our copies of the descriptors close here; the client has its own.
                drop(fds);
            }
            Out::Frame { bytes, cost } => {
                if !dead && let Err(e) = send_all(&conn.stream, &bytes, SendFlags::empty()) {
                    debug!(
                        "connection {}: write failed: {e}; dropping replies",
                        conn.id
                    );
                    dead = true;
                    // Stop the reader too: nobody is listening.
                    let _ = conn.stream.shutdown(std::net::Shutdown::Both);
                }
                if let Some(c) = cost {
                    conn.release(c);
                }
            }
        }
    }
}
