//! NBD gateway: serves every disk and partition of the block scheme (`disk.virtio-scsi`) as an
//! NBD export (export names `0`, `1`, `0p1`, ... as in the scheme's root listing) on Unix
//! sockets and on loopback TCP ports. It is an ordinary client of the daemon: it talks to it
//! through the client library ([`vscsi_ipc::Client`]), one daemon connection per NBD
//! connection.
//!
//! Owns: the listening sockets, the accept loop, one thread per NBD connection (each with a
//! small pool of workers, so several requests of a connection are in flight and may be
//! answered out of order), the connection limit, and an orderly stop.
//!
//! Protocol coverage (the NBD protocol document, `doc/proto.md` of the NetworkBlockDevice
//! project), in modules [`proto`] (bytes) and `conn` (behaviour):
//! - fixed newstyle handshake (with `NBD_FLAG_NO_ZEROES`); no TLS (`NBD_OPT_STARTTLS` is
//!   refused with `NBD_REP_ERR_UNSUP`), simple replies only (`NBD_OPT_STRUCTURED_REPLY` and
//!   meta contexts refused with `NBD_REP_ERR_UNSUP`);
//! - `NBD_OPT_LIST`, `NBD_OPT_INFO`/`NBD_OPT_GO` (`NBD_INFO_EXPORT`, `NBD_INFO_BLOCK_SIZE`
//!   with minimum 1, preferred = the disk's block size, maximum 32 MiB; `NBD_INFO_NAME` and
//!   `NBD_INFO_DESCRIPTION` on request), `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`; the empty
//!   export name is the first export;
//! - transmission flags `HAS_FLAGS`, `SEND_FLUSH`, `CAN_MULTI_CONN`, and `SEND_FUA` +
//!   `SEND_WRITE_ZEROES` for writable disks or `READ_ONLY` for read-only ones; `SEND_TRIM`
//!   for writable disks that can discard (the daemon's identity reply says so);
//! - `NBD_CMD_READ`, `WRITE` (FUA: write, then flush), `FLUSH`, `WRITE_ZEROES` (the daemon's
//!   write zeroes: WRITE SAME without UNMAP on the device, or zero buffers the daemon writes;
//!   never a hole, so `NO_HOLE` holds), `TRIM` (the whole blocks inside the range are
//!   discarded, as the protocol allows; FUA: then a flush), `DISC`. Anything else, unknown
//!   flags, and ranges past the end get an error reply: reads and trims `EINVAL`, writes
//!   `ENOSPC`, writes and trims to a read-only export `EPERM`, longer than 32 MiB `EINVAL`;
//!   daemon errors map to `EIO`/`EPERM`/`ENOSPC`/`EINVAL`/`ENOTSUP`. A read is never answered
//!   short.
//!
//! ```no_run
//! use nbd_gateway::{Gateway, GatewayConfig, ListenAddr};
//! let listen: ListenAddr = "unix:/tmp/nbd.sock".parse()?;
//! let gw = Gateway::bind(GatewayConfig::new("/run/virtio-scsid.sock", vec![listen]))?;
//! let stop = gw.shutdown_handle(); // give to the signal-handling thread: stop.shutdown()
//! gw.run()?; // returns after stop.shutdown(), when every connection has ended
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod conn;
pub mod export;
mod listen;
pub mod proto;

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, poll};

pub use export::{Export, MAX_REQUEST};
pub use listen::{AddrError, ListenAddr};

use conn::ConnConfig;
use listen::{Listener, Stream};

/// Default requests of one connection executed at once.
pub const DEFAULT_WORKERS: usize = 4;
/// Default limit of open NBD connections; more are accepted and closed at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default permissions of the Unix socket files.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// How long a stop waits for connections to finish their requests before cutting them off.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long it then waits for their threads to end.
const CUT_TIMEOUT: Duration = Duration::from_secs(5);

/// Gateway settings.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// The daemon's socket.
    pub daemon_socket: PathBuf,
    /// Where to listen (at least one).
    pub listen: Vec<ListenAddr>,
    /// Requests of one connection executed at once (0 is taken as 1).
    pub workers_per_connection: usize,
    /// Open NBD connections allowed (0 is taken as 1).
    pub max_connections: usize,
    /// Permissions of Unix socket files.
    pub socket_mode: u32,
}

impl GatewayConfig {
    /// Defaults for everything but the daemon's socket and the listening addresses.
    pub fn new(daemon_socket: impl Into<PathBuf>, listen: Vec<ListenAddr>) -> Self {
        GatewayConfig {
            daemon_socket: daemon_socket.into(),
            listen,
            workers_per_connection: DEFAULT_WORKERS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            socket_mode: DEFAULT_SOCKET_MODE,
        }
    }
}

/// Asks a running [`Gateway`] to stop: the IPC server's handle, shared rather than written
/// twice. Requesting a stop: no new connections; connections in negotiation are closed;
/// connections in transmission read no further requests, finish and answer those in flight,
/// and close.
pub use vscsi_ipc::ShutdownHandle;

/// The open connections, so a stop can reach them.
#[derive(Default)]
struct Registry {
    conns: Mutex<HashMap<u64, Stream>>,
    ended: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// Waits until no connection is open or `timeout` passes; returns how many are left.
    fn wait_empty(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut conns = lock(&self.conns);
        while !conns.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            conns = self
                .ended
                .wait_timeout(conns, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        conns.len()
    }

    fn shutdown_all(&self, how: Shutdown) {
        for s in lock(&self.conns).values() {
            s.shutdown(how);
        }
    }
}

/// The gateway: bound listeners, ready to [`run`](Gateway::run).
pub struct Gateway {
    config: GatewayConfig,
    listeners: Vec<Listener>,
    shutdown: ShutdownHandle,
}

impl Gateway {
    /// Binds every listening address (TCP only on loopback; see [`ListenAddr`]). Does not
    /// contact the daemon: use [`probe`] for that.
    pub fn bind(config: GatewayConfig) -> io::Result<Gateway> {
        if config.listen.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no address to listen on",
            ));
        }
        let mut listeners = Vec::with_capacity(config.listen.len());
        for addr in &config.listen {
            // On failure, the listeners bound so far are dropped (their socket files removed).
            listeners.push(Listener::bind(addr, config.socket_mode)?);
        }
        Ok(Gateway {
            config,
            listeners,
            shutdown: ShutdownHandle::new()?,
        })
    }

    /// The addresses bound, in the order given (a TCP port 0 shows the port chosen).
    pub fn local_addrs(&self) -> io::Result<Vec<ListenAddr>> {
        self.listeners.iter().map(Listener::local_addr).collect()
    }

    /// A handle to stop [`run`](Gateway::run).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Serves until [`ShutdownHandle::shutdown`]; then stops as described there (waiting at
    /// most about 15 s for connections) and removes its Unix socket files.
    pub fn run(self) -> io::Result<()> {
        let Gateway {
            config,
            listeners,
            shutdown,
        } = self;
        let cfg = Arc::new(ConnConfig {
            daemon_socket: config.daemon_socket.clone(),
            workers: config.workers_per_connection.max(1),
            stopping: shutdown.clone(),
        });
        let registry = Arc::new(Registry::default());
        let next_id = AtomicU64::new(1);
        let outcome = accept_loop(
            &listeners,
            &shutdown,
            &cfg,
            &registry,
            &next_id,
            config.max_connections.max(1),
        );
        // Stop: new clients find no socket; open connections read nothing more.
        drop(listeners);
        cfg.stopping.shutdown();
        registry.shutdown_all(Shutdown::Read);
        let left = registry.wait_empty(DRAIN_TIMEOUT);
        if left > 0 {
            log::warn!(
                "{left} NBD connection(s) still busy after {DRAIN_TIMEOUT:?}; cutting them off"
            );
            registry.shutdown_all(Shutdown::Both);
            let left = registry.wait_empty(CUT_TIMEOUT);
            if left > 0 {
                log::warn!("{left} NBD connection(s) did not end; leaving them");
            }
        }
        outcome
    }
}

fn accept_loop(
    listeners: &[Listener],
    shutdown: &ShutdownHandle,
    cfg: &Arc<ConnConfig>,
    registry: &Arc<Registry>,
    next_id: &AtomicU64,
    max_connections: usize,
) -> io::Result<()> {
    loop {
        if shutdown.is_shutdown() {
            return Ok(());
        }
        let mut fds: Vec<PollFd<'_>> = listeners
            .iter()
            .map(|l| PollFd::new(l, PollFlags::IN))
            .collect();
        fds.push(PollFd::new(shutdown.wake_fd(), PollFlags::IN));
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                log::error!("poll on the listening sockets failed: {e}");
                return Err(e.into());
            }
        }
        if shutdown.is_shutdown() {
            return Ok(());
        }
        for l in listeners {
            loop {
                match l.accept() {
                    Ok(stream) => admit(stream, cfg, registry, next_id, max_connections),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                        ) => {}
                    Err(e) => {
                        // EMFILE, ENFILE, ENOBUFS, ENOMEM: back off instead of spinning.
                        log::warn!("accept failed: {e}; retrying shortly");
                        thread::sleep(Duration::from_millis(100));
                        break;
                    }
                }
            }
        }
    }
}

fn admit(
    stream: Stream,
    cfg: &Arc<ConnConfig>,
    registry: &Arc<Registry>,
    next_id: &AtomicU64,
    max_connections: usize,
) {
    let peer = stream.peer();
    let id = next_id.fetch_add(1, Ordering::Relaxed);
    {
        let mut conns = lock(&registry.conns);
        if conns.len() >= max_connections {
            log::warn!("{peer}: refused, {max_connections} NBD connections already open");
            return; // dropping the stream closes it
        }
        match stream.try_clone() {
            Ok(clone) => {
                conns.insert(id, clone);
            }
            Err(e) => {
                log::warn!("{peer}: cannot register the connection: {e}");
                return;
            }
        }
    }
    let cfg = cfg.clone();
    let reg = registry.clone();
    let spawned = thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            log::debug!("{peer}: connected (connection {id})");
            match conn::serve(&stream, &cfg) {
                Ok(()) => log::debug!("{peer}: disconnected"),
                // A stop cuts connections off; that is not the client's fault.
                Err(e) if cfg.stopping.is_shutdown() => {
                    log::debug!("{peer}: closed by the stop ({e})")
                }
                Err(e) => log::warn!("{peer}: connection ended: {e}"),
            }
            stream.shutdown(Shutdown::Both);
            drop(stream);
            lock(&reg.conns).remove(&id);
            reg.ended.notify_all();
        });
    if let Err(e) = spawned {
        log::warn!("cannot start a thread for an NBD connection: {e}");
        lock(&registry.conns).remove(&id);
        registry.ended.notify_all();
    }
}

/// Connects to the daemon and describes every export: the scheme name and the exports, for a
/// start-up check and message.
pub fn probe(
    daemon_socket: impl AsRef<std::path::Path>,
) -> Result<(String, Vec<Export>), vscsi_ipc::ClientError> {
    let client = vscsi_ipc::Client::connect(daemon_socket)?;
    let exports = export::all(&client)?;
    Ok((client.scheme().to_owned(), exports))
}
