//! The Redox serving loop (compiled only for `target_os = "redox"`): create the scheme
//! socket, register the scheme in the namespace, say so, then answer the kernel's requests
//! until the scheme is closed or `stop` is set, sleeping on a `redox_event` queue between
//! bursts. Requests are answered one at a time and in order, so when this returns nothing is
//! in flight: the caller can flush every disk and exit.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use block_scheme::BlockDevice;
use event::{EventFlags, EventQueue};
use redox_scheme::scheme::{SchemeState, register_sync_scheme};
use redox_scheme::{RequestKind, SignalBehavior, Socket};
use syscall::error::{EAGAIN, EBADF, EINTR, EWOULDBLOCK, Result};

use crate::RedoxDisks;

const EV_SCHEME: usize = 0;
const EV_WAKE: usize = 1;

/// Serves `disks` as the scheme `name` (e.g. `disk.virtio-scsi`). Calls `ready` once the
/// scheme is registered (the daemon then tells init it is up). Returns `Ok` when the kernel
/// closes the scheme or when `stop` is found set: it is checked after every burst of requests,
/// whenever the wait is interrupted by a signal, and whenever `wake` (the read end of a pipe a
/// signal handler writes to) becomes readable.
pub fn serve<D: BlockDevice>(
    disks: &mut RedoxDisks<D>,
    name: &str,
    stop: &AtomicBool,
    wake: Option<&std::io::PipeReader>,
    ready: impl FnOnce(),
) -> Result<()> {
    let socket = Socket::nonblock()?;
    register_sync_scheme(&socket, name, disks)?;
    log::info!("scheme {name} registered");
    ready();

    let queue = EventQueue::<usize>::new().map_err(|e| syscall::Error::new(e.errno()))?;
    queue
        .subscribe(socket.inner().raw(), EV_SCHEME, EventFlags::READ)
        .map_err(|e| syscall::Error::new(e.errno()))?;
    if let Some(pipe) = wake {
        let fd = usize::try_from(pipe.as_raw_fd()).map_err(|_| syscall::Error::new(EBADF))?;
        queue
            .subscribe(fd, EV_WAKE, EventFlags::READ)
            .map_err(|e| syscall::Error::new(e.errno()))?;
    }
    let mut state = SchemeState::new();
    loop {
        // Answer everything that is queued.
        loop {
            let request = match socket.next_request(SignalBehavior::Restart) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    log::info!("scheme {name} closed");
                    return Ok(());
                }
                Err(e) if matches!(e.errno, EAGAIN | EWOULDBLOCK) => break,
                Err(e) => return Err(e),
            };
            match request.kind() {
                RequestKind::Call(call) => {
                    let response = call.handle_sync(disks, &mut state);
                    socket.write_response(response, SignalBehavior::Restart)?;
                }
                RequestKind::OnClose { id } => {
                    state.on_close(id);
                    disks.on_close(id);
                }
                _ => {}
            }
        }
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        match queue.next_event() {
            // A signal handler wrote to the pipe: it sets `stop` first. (Nothing is read
            // back: the only writes come with `stop`, after which this returns.)
            Ok(ev) if ev.user_data == EV_WAKE => {
                if stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
            }
            Ok(_) => {}
            Err(e) if e.errno() == EINTR => {
                if stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
            }
            Err(e) => return Err(syscall::Error::new(e.errno())),
        }
    }
}
