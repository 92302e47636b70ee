//! systemd readiness notification (`sd_notify`): one datagram to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`). Without the
//! variable (not started by systemd with `Type=notify`) it does nothing.
//!
//! A dozen lines over `std`'s Unix datagram socket, so no crate is pulled in for it (the
//! `sd-notify` crate does the same thing).

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `"READY=1"`, `"STOPPING=1"`, `"STATUS=..."`, newline-separated) to
/// the service manager. `Ok(false)` when `$NOTIFY_SOCKET` is unset or empty.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()) {
        Some(socket) => send(&socket, state).map(|()| true),
        None => Ok(false),
    }
}

/// Sends `state` to the notification socket `socket`.
pub fn send(socket: &OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
            return Ok(());
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "abstract notification sockets exist only on Linux",
            ));
        }
    }
    sock.send_to(state.as_bytes(), socket)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_one_datagram_to_a_path_and_an_abstract_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).expect("bind");
        send(path.as_os_str(), "READY=1\nSTATUS=ok").expect("send");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=ok");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("vscsid-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract addr");
        let rx = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        send(OsStr::new(&format!("@{name}")), "STOPPING=1").expect("send abstract");
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");

        assert!(send(OsStr::new("/nonexistent/notify"), "READY=1").is_err());
    }
}
