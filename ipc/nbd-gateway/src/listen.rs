//! Where the gateway listens: `unix:PATH` and `tcp:HOST:PORT` addresses (TCP on loopback
//! only), binding them, and the connected-stream type both kinds of socket produce.
//!
//! Owns: address parsing and the loopback rule (a TCP address that is not loopback is refused
//! before anything is bound: NBD has no authentication here), Unix socket files (a stale
//! socket is replaced, a live one or a non-socket file never is; ours is removed on drop), and
//! [`Stream`], a Unix or TCP connection usable from several threads.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// A listening address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix socket file.
    Unix(PathBuf),
    /// A TCP address on a loopback interface.
    Tcp(SocketAddr),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A listening address that could not be parsed or is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// Not `unix:PATH` or `tcp:HOST:PORT`.
    #[error("`{0}` is not unix:PATH or tcp:HOST:PORT")]
    Syntax(String),
    /// The host does not resolve, or not to a loopback address.
    #[error(
        "`{0}` is not a loopback address: the NBD gateway listens on TCP only on loopback (127.0.0.0/8, ::1, localhost)"
    )]
    NotLoopback(String),
}

impl FromStr for ListenAddr {
    type Err = AddrError;

    /// `unix:PATH`, or `tcp:HOST:PORT` where HOST is an IPv4 literal, `[IPv6]` or `localhost`
    /// and every address it names is loopback.
    fn from_str(s: &str) -> Result<Self, AddrError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(AddrError::Syntax(s.to_owned()));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        let Some(hostport) = s.strip_prefix("tcp:") else {
            return Err(AddrError::Syntax(s.to_owned()));
        };
        let Some((host, port)) = hostport.rsplit_once(':') else {
            return Err(AddrError::Syntax(s.to_owned()));
        };
        let port: u16 = port.parse().map_err(|_| AddrError::Syntax(s.to_owned()))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let addr = if let Ok(ip) = host.parse::<IpAddr>() {
            SocketAddr::new(ip, port)
        } else if host.eq_ignore_ascii_case("localhost") {
            // Resolve, but insist that every answer is loopback; take the first.
            let addrs: Vec<SocketAddr> = (host, port)
                .to_socket_addrs()
                .map_err(|_| AddrError::NotLoopback(hostport.to_owned()))?
                .collect();
            if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
                return Err(AddrError::NotLoopback(hostport.to_owned()));
            }
            addrs[0]
        } else {
            // No name resolution for other names: they could point anywhere.
            return Err(AddrError::NotLoopback(hostport.to_owned()));
        };
        if !addr.ip().is_loopback() {
            return Err(AddrError::NotLoopback(hostport.to_owned()));
        }
        Ok(ListenAddr::Tcp(addr))
    }
}

/// A bound, non-blocking listening socket.
pub(crate) enum Listener {
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// (dev, ino) of the socket file we created, so we never remove someone else's.
        id: (u64, u64),
    },
    Tcp(TcpListener),
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

impl Listener {
    /// Binds `addr`. Unix: an existing socket file nobody answers on is replaced; a live one
    /// is `AddrInUse`, a non-socket `AlreadyExists`; the new file gets `socket_mode`.
    pub(crate) fn bind(addr: &ListenAddr, socket_mode: u32) -> io::Result<Listener> {
        match addr {
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                let listener =
                    UnixListener::bind(path).map_err(|e| with_path(e, "cannot bind", path))?;
                let md =
                    fs::symlink_metadata(path).map_err(|e| with_path(e, "cannot stat", path))?;
                let l = Listener::Unix {
                    listener,
                    path: path.clone(),
                    id: (md.dev(), md.ino()),
                };
                fs::set_permissions(path, fs::Permissions::from_mode(socket_mode))
                    .map_err(|e| with_path(e, "cannot set permissions of", path))?;
                l.set_nonblocking()?;
                Ok(l)
            }
            ListenAddr::Tcp(a) => {
                // Checked again here: a ListenAddr can be built without parsing.
                if !a.ip().is_loopback() {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        AddrError::NotLoopback(a.to_string()).to_string(),
                    ));
                }
                let l = TcpListener::bind(a)
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot bind tcp:{a}: {e}")))?;
                let l = Listener::Tcp(l);
                l.set_nonblocking()?;
                Ok(l)
            }
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Unix { listener, .. } => listener.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
    }

    /// The address actually bound (a TCP port 0 becomes the chosen port).
    pub(crate) fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Listener::Unix { path, .. } => Ok(ListenAddr::Unix(path.clone())),
            Listener::Tcp(l) => Ok(ListenAddr::Tcp(l.local_addr()?)),
        }
    }

    /// Accepts one connection, or `WouldBlock`. The stream is blocking, TCP without Nagle.
    pub(crate) fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix { listener, .. } => {
                let (s, _) = listener.accept()?;
                s.set_nonblocking(false)?;
                Ok(Stream::Unix(s))
            }
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Unix { listener, .. } => listener.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, id, .. } = self {
            // Only our own socket file: someone may have replaced it meanwhile.
            if let Ok(md) = fs::symlink_metadata(&*path)
                && (md.dev(), md.ino()) == *id
                && let Err(e) = fs::remove_file(&*path)
            {
                log::warn!("cannot remove socket {}: {e}", path.display());
            }
        }
    }
}

/// Removes `path` if it is a socket nobody answers on; fails if it is live or not a socket.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(with_path(e, "cannot inspect", path)),
        Ok(md) if !md.file_type().is_socket() => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        )),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("something is already listening on {}", path.display()),
            )),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("removing stale socket {}", path.display());
                match fs::remove_file(path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        Err(with_path(e, "cannot remove stale socket", path))
                    }
                    _ => Ok(()),
                }
            }
            Err(e) => Err(with_path(e, "cannot check existing socket", path)),
        },
    }
}

/// One client connection, Unix or TCP. `&Stream` reads and writes, so one clone can read
/// while another writes.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    pub(crate) fn shutdown(&self, how: Shutdown) {
        // NotConnected after the peer left is fine: the point is that nothing blocks on it.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        };
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }

    /// Who is on the other end, for log messages.
    pub(crate) fn peer(&self) -> String {
        match self {
            Stream::Unix(_) => "unix client".to_owned(),
            Stream::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "tcp client".to_owned(), |a| format!("tcp client {a}")),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Tcp(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Stream::Unix(s) => (&*s).write(buf),
            Stream::Tcp(s) => (&*s).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match *self {
            Stream::Unix(s) => (&*s).write_vectored(bufs),
            Stream::Tcp(s) => (&*s).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_loopback_tcp() {
        assert_eq!(
            "unix:/tmp/nbd.sock".parse(),
            Ok(ListenAddr::Unix("/tmp/nbd.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:10809".parse(),
            Ok(ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap()))
        );
        assert_eq!(
            "tcp:127.3.4.5:0".parse(),
            Ok(ListenAddr::Tcp("127.3.4.5:0".parse().unwrap()))
        );
        assert_eq!(
            "tcp:[::1]:10809".parse(),
            Ok(ListenAddr::Tcp("[::1]:10809".parse().unwrap()))
        );
        match "tcp:localhost:10809".parse::<ListenAddr>() {
            Ok(ListenAddr::Tcp(a)) => assert!(a.ip().is_loopback()),
            // A machine whose resolver says otherwise refuses it, which is also right.
            Ok(other) => panic!("localhost parsed as {other:?}"),
            Err(e) => assert!(matches!(e, AddrError::NotLoopback(_))),
        }
    }

    #[test]
    fn refuses_other_addresses_and_bad_syntax() {
        for a in [
            "tcp:0.0.0.0:10809",
            "tcp:10.0.0.1:10809",
            "tcp:192.168.1.1:10809",
            "tcp:[::]:10809",
            "tcp:example.com:10809",
        ] {
            assert!(
                matches!(a.parse::<ListenAddr>(), Err(AddrError::NotLoopback(_))),
                "{a} must be refused"
            );
        }
        for a in [
            "",
            "unix:",
            "tcp:",
            "tcp:127.0.0.1",
            "tcp:127.0.0.1:",
            "tcp:127.0.0.1:99999",
            "/tmp/x",
            "udp:127.0.0.1:1",
        ] {
            assert!(
                matches!(a.parse::<ListenAddr>(), Err(AddrError::Syntax(_))),
                "{a} must be a syntax error"
            );
        }
    }

    #[test]
    fn bind_refuses_a_constructed_non_loopback_address() {
        let a = ListenAddr::Tcp("0.0.0.0:0".parse().unwrap());
        let e = Listener::bind(&a, 0o660).err().expect("refused");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    }
}
