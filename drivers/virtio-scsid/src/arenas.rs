//! Client arenas for the zero-copy IPC: `vscsi_ipc::ArenaProvider` over the host's shared
//! windows (on the QEMU machine, sealed memfds plugged as `pc-dimm`s, so the device reads and
//! writes a client's buffers in place).
//!
//! A window outlives its first client: the platform cannot unplug it while the machine runs,
//! and the client may keep its mapping after it disconnects (it cannot be revoked). So an
//! ended window is zeroed and kept in a pool, and given again only to a client with the same
//! uid as its last holder; a client of another uid gets a new window.

use std::io;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use block_scheme::CallerCtx;
use virtio_scsi::ScsiHost;
use vscsi_ipc::{ArenaMem, ArenaProvider};

/// One window: the daemon's own fd (clients get duplicates), its mapping, its last holder.
struct Window {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
    uid: u32,
}

// SAFETY: the window's memory stays mapped for the host's lifetime (platform contract); the
// pointer is only used to zero the window while no client session uses it.
unsafe impl Send for Window {}

/// The arenas of one daemon.
pub struct HostArenas {
    host: Arc<ScsiHost>,
    /// Windows no connection uses now.
    idle: Arc<Mutex<Vec<Window>>>,
}

impl HostArenas {
    /// Arenas from `host`'s shared windows.
    pub fn new(host: Arc<ScsiHost>) -> Self {
        HostArenas {
            host,
            idle: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

impl ArenaProvider for HostArenas {
    fn alloc(&self, len: usize, client: &CallerCtx) -> io::Result<ArenaMem> {
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.iter()
                .position(|w| w.uid == client.uid && w.len >= len)
                .map(|i| idle.swap_remove(i))
        };
        let window = match reused {
            Some(w) => {
                // SAFETY: the window is idle (its last session ended and `recycle` ran), so
                // nothing of ours uses it; a lingering client mapping of the same uid may see
                // the zeroes, which is all it can see.
                unsafe { std::ptr::write_bytes(w.ptr.as_ptr(), 0, w.len) };
                w
            }
            None => {
                let shared = self
                    .host
                    .alloc_shared_window(len)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                Window {
                    fd: shared.fd,
                    ptr: shared.window.cpu_ptr,
                    len: shared.window.len,
                    uid: client.uid,
                }
            }
        };
        let client_fd = window.fd.try_clone()?;
        let (ptr, wlen) = (window.ptr, window.len);
        let idle = self.idle.clone();
        let uid = client.uid;
        Ok(ArenaMem {
            fd: client_fd,
            ptr,
            len: wlen,
            recycle: Box::new(move || {
                let mut w = window;
                w.uid = uid;
                idle.lock().unwrap_or_else(|p| p.into_inner()).push(w);
            }),
        })
    }
}
