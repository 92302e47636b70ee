//! Shared-memory transport tests against an in-memory device and memfd arenas: round trips
//! (zero-copy and copying), many clients with verified data, a client killed mid-I/O (with
//! requests held in the device, on the workers' path and on the poller's fast path), a client
//! writing garbage into its rings, limits, and servers without arenas. Most run on a device
//! with split-phase I/O (`MemDevice::with_async`), so the poller's fast path, its hand-over of
//! slow requests to the workers and the workers' path all carry traffic.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{MemDevice, TestServer, pattern};
use syscall::error::{EAGAIN, EBADF, EBUSY, EEXIST, EFAULT, EINVAL, ENOSPC, ENOSYS, EOPNOTSUPP};
use syscall::flag::O_RDWR;
use vscsi_ipc::protocol::{self, Opcode, Reply, Request};
use vscsi_ipc::shm::{self, Cqe, Mapping, Ring, ShmInfo, Sqe, off, op};
use vscsi_ipc::{ArenaBuf, Client, ClientError, Completion, MemfdArenas, OpenFlags};

const MIB: usize = 1 << 20;

fn shm_server(
    device: MemDevice,
    tweak: impl FnOnce(&mut vscsi_ipc::ServerConfig),
) -> (TestServer, Arc<MemfdArenas>) {
    let arenas = Arc::new(MemfdArenas::new());
    let a = arenas.clone();
    let ts = TestServer::start_with(device, move |c| {
        c.arena = Some(a);
        c.arena_bytes = 8 * MIB;
        tweak(c);
    });
    (ts, arenas)
}

fn wait_until(what: &str, d: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + d;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Runs one request through the async API and returns its completion.
fn one(c: &Client, t: vscsi_ipc::Ticket) -> Completion {
    c.submit().unwrap();
    let mut out = Vec::new();
    c.reap(1, Some(Duration::from_secs(20)), &mut out).unwrap();
    assert_eq!(out.len(), 1);
    let comp = out.pop().unwrap();
    assert_eq!(comp.ticket, t);
    comp
}

#[test]
fn round_trip_zero_copy_and_copy_paths() {
    let ts = round_trip(MemDevice::with_async(&[(512, 8192)]));
    assert!(ts.device.async_started.load(Ordering::SeqCst) >= 2);
}

#[test]
fn round_trip_without_split_phase_io() {
    let ts = round_trip(MemDevice::new(&[(512, 8192)]));
    assert_eq!(ts.device.async_started.load(Ordering::SeqCst), 0);
}

#[test]
fn round_trip_with_the_fast_path_off() {
    let arenas = Arc::new(MemfdArenas::new());
    let a = arenas.clone();
    let ts = TestServer::start_with(MemDevice::with_async(&[(512, 64)]), move |c| {
        c.arena = Some(a);
        c.shm_async = false;
    });
    let c = Client::connect_shm(&ts.path, MIB).unwrap();
    let h = c.open("/0", OpenFlags::READ).unwrap();
    let comp = one(
        &c,
        c.prep_read(&h, 512, c.alloc_buf(4096).unwrap()).unwrap(),
    );
    assert_eq!(comp.result.unwrap(), 4096);
    assert_eq!(&comp.buf.unwrap()[..], &pattern(0, 512, 4096)[..]);
    assert_eq!(ts.device.async_started.load(Ordering::SeqCst), 0);
}

fn round_trip(device: MemDevice) -> TestServer {
    let (ts, arenas) = shm_server(device, |_| {});
    let c = Client::connect_shm(&ts.path, 0).unwrap();
    assert!(c.has_shm());
    let info = c.shm_info().unwrap();
    assert_eq!(info.arena_len, 8 * MIB as u64);
    assert_eq!(arenas.live(), 1);
    let h = c
        .open("disk.virtio-scsi:/0", OpenFlags::READ_WRITE)
        .unwrap();

    // Zero-copy write then read, from arena buffers.
    let mut w = c.alloc_buf(64 << 10).unwrap();
    assert_eq!(w.arena_offset() % 4096, 0);
    let data = pattern(9, 0, 64 << 10);
    w.copy_from_slice(&data);
    let comp = one(&c, c.prep_write(&h, 1 << 20, w).unwrap());
    assert_eq!(comp.result.unwrap(), 64 << 10);
    assert!(comp.buf.is_some());
    assert_eq!(ts.device.disk_bytes(0, 1 << 20, 64 << 10), data);
    let r = c.alloc_buf(64 << 10).unwrap();
    let comp = one(&c, c.prep_read(&h, 1 << 20, r).unwrap());
    assert_eq!(comp.result.unwrap(), 64 << 10);
    assert_eq!(&comp.buf.unwrap()[..], &data[..]);

    // The copying path at odd offsets and lengths, and larger than a bounce buffer.
    let odd = pattern(3, 0, 3 * MIB + 77);
    c.write_all_at(&h, 4097, &odd).unwrap();
    let mut back = vec![0u8; odd.len()];
    c.read_exact_at(&h, 4097, &mut back).unwrap();
    assert_eq!(back, odd);
    assert_eq!(ts.device.disk_bytes(0, 4097, odd.len()), odd);

    // End of device: short read, short write, ENOSPC.
    let size = 8192 * 512u64;
    let mut tail = vec![0u8; 1000];
    assert_eq!(c.read_at(&h, size - 100, &mut tail).unwrap(), 100);
    assert_eq!(c.read_at(&h, size, &mut tail).unwrap(), 0);
    assert_eq!(c.write_at(&h, size - 10, &tail).unwrap(), 10);
    let e = c.write_at(&h, size, &tail).unwrap_err();
    assert_eq!(e.errno(), Some(ENOSPC));
    let mut r = c.alloc_buf(4096).unwrap();
    r.set_len(1000);
    let comp = one(&c, c.prep_read(&h, size - 100, r).unwrap());
    assert_eq!(comp.result.unwrap(), 100);

    // fsync through the ring.
    let before = ts.device.flushes.load(Ordering::SeqCst);
    let comp = one(&c, c.prep_fsync(&h).unwrap());
    assert_eq!(comp.result.unwrap(), 0);
    assert!(comp.buf.is_none());
    assert_eq!(ts.device.flushes.load(Ordering::SeqCst), before + 1);

    // Socket operations still work beside the session.
    assert_eq!(c.size(&h).unwrap(), size);
    c.close(h).unwrap();
    drop(c);
    wait_until("arena recycled", Duration::from_secs(10), || {
        arenas.live() == 0
    });
    ts
}

#[test]
fn batches_many_requests_per_submit() {
    let (ts, _arenas) = shm_server(MemDevice::with_async(&[(512, 8192)]), |_| {});
    let c = Client::connect_shm(&ts.path, MIB).unwrap();
    let h = c.open("/0", OpenFlags::READ).unwrap();
    let depth = 48;
    let mut tickets = Vec::new();
    for i in 0..depth {
        let b = c.alloc_buf(4096).unwrap();
        tickets.push((c.prep_read(&h, i as u64 * 8192, b).unwrap(), i));
    }
    assert_eq!(c.submit().unwrap(), depth);
    assert_eq!(c.submit().unwrap(), 0);
    let mut out = Vec::with_capacity(depth);
    while out.len() < depth {
        c.reap(depth - out.len(), Some(Duration::from_secs(20)), &mut out)
            .unwrap();
    }
    for comp in out {
        let &(_, i) = tickets.iter().find(|(t, _)| *t == comp.ticket).unwrap();
        assert_eq!(comp.result.unwrap(), 4096);
        assert_eq!(
            &comp.buf.unwrap()[..],
            &pattern(0, i as u64 * 8192, 4096)[..]
        );
    }
    // A reap with nothing in flight times out empty.
    let mut none = Vec::new();
    assert_eq!(
        c.reap(1, Some(Duration::from_millis(20)), &mut none)
            .unwrap(),
        0
    );
}

#[test]
fn request_errors_complete_with_errno() {
    let (ts, _arenas) = shm_server(MemDevice::with_async(&[(512, 64)]), |_| {});
    let c = Client::connect_shm(&ts.path, MIB).unwrap();
    let other = Client::connect_shm(&ts.path, MIB).unwrap();
    let h = c.open("/0", OpenFlags::READ).unwrap();
    // Another client's buffer is refused locally, with the buffer back.
    let foreign = other.alloc_buf(4096).unwrap();
    let e = c.prep_read(&h, 0, foreign).unwrap_err();
    assert_eq!(e.error.errno(), Some(EINVAL));
    assert!(e.buf.is_some());
    // A handle of another client is refused locally too.
    let oh = other.open("/0", OpenFlags::READ).unwrap();
    let e = c.prep_read(&oh, 0, c.alloc_buf(512).unwrap()).unwrap_err();
    assert_eq!(e.error.errno(), Some(EBADF));
    // Write on a read-only handle: the scheme's EBADF comes back in the completion.
    let comp = one(&c, c.prep_write(&h, 0, c.alloc_buf(512).unwrap()).unwrap());
    assert_eq!(comp.result.unwrap_err().errno(), Some(EBADF));
    assert!(comp.buf.is_some());
    drop(comp.buf);
    // Write past the end.
    let hw = c.open("/0", OpenFlags::READ_WRITE).unwrap();
    let comp = one(
        &c,
        c.prep_write(&hw, 64 * 512, c.alloc_buf(512).unwrap())
            .unwrap(),
    );
    assert_eq!(comp.result.unwrap_err().errno(), Some(ENOSPC));
    drop(comp.buf);
    // Arena exhausted: ENOMEM, and freeing makes room again.
    let mut held = Vec::new();
    let e = loop {
        match c.alloc_buf(64 << 10) {
            Ok(b) => held.push(b),
            Err(e) => break e,
        }
    };
    assert_eq!(e.errno(), Some(syscall::error::ENOMEM));
    assert!(held.len() >= 8);
    let n = held.len();
    held.clear();
    for _ in 0..n {
        held.push(c.alloc_buf(64 << 10).unwrap());
    }
    assert_eq!(
        c.alloc_buf(MIB + 1).unwrap_err().errno(),
        Some(syscall::error::ENOMEM)
    );
}

#[test]
fn server_without_arenas_refuses_shm_and_keeps_the_socket() {
    let ts = TestServer::start(MemDevice::new(&[(512, 64)]));
    let e = Client::connect_shm(&ts.path, 0).unwrap_err();
    assert_eq!(e.errno(), Some(EOPNOTSUPP), "{e}");
    let c = Client::connect(&ts.path).unwrap();
    assert!(!c.has_shm());
    assert_eq!(c.alloc_buf(4096).unwrap_err().errno(), Some(EOPNOTSUPP));
    let h = c.open("/0", OpenFlags::READ).unwrap();
    let mut b = vec![0u8; 512];
    c.read_exact_at(&h, 0, &mut b).unwrap();
    assert_eq!(b, pattern(0, 0, 512));
}

#[test]
fn many_clients_with_verified_data() {
    let mut dev = MemDevice::with_async(&[(512, 65536)]);
    dev.slow = true; // some commands complete late, out of order
    let (ts, arenas) = shm_server(dev, |_| {});
    let clients = 8;
    let region = 2 * MIB as u64;
    let barrier = Arc::new(Barrier::new(clients));
    let mut threads = Vec::new();
    for k in 0..clients {
        let path = ts.path.clone();
        let barrier = barrier.clone();
        threads.push(thread::spawn(move || {
            let c = Client::connect_shm(&path, 2 * MIB).unwrap();
            let h = c.open("/0", OpenFlags::READ_WRITE).unwrap();
            let base = k as u64 * region;
            barrier.wait();
            // Async: write 64 blocks of 16 KiB at depth 16, then read them back at depth 16.
            let bs = 16 << 10;
            let n = (region / bs as u64) as usize;
            let mut bufs: Vec<ArenaBuf> = (0..16).map(|_| c.alloc_buf(bs).unwrap()).collect();
            let mut next = 0usize;
            let mut out = Vec::new();
            let mut inflight = 0;
            let mut written = 0;
            while written < n {
                while inflight < 16 && next < n {
                    let mut b = bufs.pop().unwrap();
                    b.copy_from_slice(&pattern(100 + k as u64, base + (next * bs) as u64, bs));
                    c.prep_write(&h, base + (next * bs) as u64, b).unwrap();
                    next += 1;
                    inflight += 1;
                }
                c.submit().unwrap();
                out.clear();
                c.reap(1, Some(Duration::from_secs(30)), &mut out).unwrap();
                for comp in out.drain(..) {
                    assert_eq!(comp.result.unwrap(), bs);
                    bufs.push(comp.buf.unwrap());
                    inflight -= 1;
                    written += 1;
                }
            }
            let mut offsets = std::collections::HashMap::new();
            next = 0;
            let mut read = 0;
            while read < n {
                while inflight < 16 && next < n {
                    let b = bufs.pop().unwrap();
                    let t = c.prep_read(&h, base + (next * bs) as u64, b).unwrap();
                    offsets.insert(t, base + (next * bs) as u64);
                    next += 1;
                    inflight += 1;
                }
                c.submit().unwrap();
                c.reap(1, Some(Duration::from_secs(30)), &mut out).unwrap();
                for comp in out.drain(..) {
                    assert_eq!(comp.result.unwrap(), bs);
                    let at = offsets.remove(&comp.ticket).unwrap();
                    let b = comp.buf.unwrap();
                    assert_eq!(
                        &b[..],
                        &pattern(100 + k as u64, at, bs)[..],
                        "client {k} at {at}"
                    );
                    bufs.push(b);
                    inflight -= 1;
                    read += 1;
                }
            }
            // Synchronous calls from several threads of the same client at once.
            let mut ts = Vec::new();
            for t in 0..4u64 {
                let (c, h2) = (c.clone(), c.open("/0", OpenFlags::READ_WRITE).unwrap());
                ts.push(thread::spawn(move || {
                    for i in 0..20u64 {
                        let at = base + (t * 20 + i) * 5000 + 3;
                        let d = pattern(7 + k as u64, at, 5000);
                        c.write_all_at(&h2, at, &d).unwrap();
                        let mut back = vec![0u8; 5000];
                        c.read_exact_at(&h2, at, &mut back).unwrap();
                        assert_eq!(back, d);
                    }
                }));
            }
            for t in ts {
                t.join().unwrap();
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    // The device holds what each client wrote last.
    for k in 0..clients as u64 {
        let at = (k * region + 3 * 5000 * 20 + 3) as usize;
        assert_eq!(
            ts.device.disk_bytes(0, at, 100),
            pattern(7 + k, at as u64, 100)
        );
    }
    wait_until("arenas recycled", Duration::from_secs(10), || {
        arenas.live() == 0
    });
    assert!(ts.device.async_started.load(Ordering::SeqCst) > 0);
    assert!(ts.device.async_slow.load(Ordering::SeqCst) > 0);
}

#[test]
fn overlapping_read_buffers_are_refused() {
    let mut dev = MemDevice::new(&[(512, 1024)]);
    dev.gate_lba = Some(100);
    let (ts, _arenas) = shm_server(dev, |_| {});
    let raw = RawSession::open(&ts.path, MIB as u64);
    let h = raw.open_disk();
    // A read held in the device, then a second read into the same arena bytes.
    raw.push(Sqe {
        opcode: op::READ,
        len: 4096,
        user_data: 1,
        handle: h,
        offset: 100 * 512,
        buf: 0,
        ..Sqe::default()
    });
    raw.publish();
    wait_until("gated read", Duration::from_secs(10), || {
        ts.device.gated_waiting.load(Ordering::SeqCst) == 1
    });
    raw.push(Sqe {
        opcode: op::READ,
        len: 4096,
        user_data: 2,
        handle: h,
        offset: 0,
        buf: 2048,
        ..Sqe::default()
    });
    // A write from those bytes too; a write elsewhere is fine.
    raw.push(Sqe {
        opcode: op::WRITE,
        len: 512,
        user_data: 3,
        handle: h,
        offset: 0,
        buf: 0,
        ..Sqe::default()
    });
    raw.push(Sqe {
        opcode: op::WRITE,
        len: 512,
        user_data: 4,
        handle: h,
        offset: 0,
        buf: 8192,
        ..Sqe::default()
    });
    raw.publish();
    let got = raw.wait_cqes(3);
    assert!(got.contains(&(2, -EBUSY)), "{got:?}");
    assert!(got.contains(&(3, -EBUSY)), "{got:?}");
    assert!(got.contains(&(4, 512)), "{got:?}");
    ts.device.open_gate();
    let got = raw.wait_cqes(4);
    assert!(got.contains(&(1, 4096)), "{got:?}");
}

#[test]
fn in_flight_limit_holds_and_backlog_drains() {
    let mut dev = MemDevice::new(&[(512, 1024)]);
    dev.gate_lba = Some(10);
    let (ts, _arenas) = shm_server(dev, |c| c.max_in_flight_per_conn = 5);
    let c = Client::connect_shm(&ts.path, MIB).unwrap();
    let info = c.shm_info().unwrap();
    assert_eq!((info.max_in_flight, info.sq_entries), (5, 8));
    let h = c.open("/0", OpenFlags::READ).unwrap();
    for _ in 0..8 {
        let b = c.alloc_buf(512).unwrap();
        c.prep_read(&h, 10 * 512, b).unwrap();
    }
    // All slots used: the next one is refused with the buffer back.
    let e = c.prep_read(&h, 0, c.alloc_buf(512).unwrap()).unwrap_err();
    assert_eq!(e.error.errno(), Some(EAGAIN));
    c.submit().unwrap();
    wait_until("5 in the device", Duration::from_secs(10), || {
        ts.device.gated_waiting.load(Ordering::SeqCst) == 5
    });
    thread::sleep(Duration::from_millis(100));
    assert_eq!(
        ts.device.gated_waiting.load(Ordering::SeqCst),
        5,
        "limit exceeded"
    );
    ts.device.open_gate();
    let mut out = Vec::new();
    while out.len() < 8 {
        c.reap(8 - out.len(), Some(Duration::from_secs(20)), &mut out)
            .unwrap();
    }
    assert!(out.iter().all(|c| *c.result.as_ref().unwrap() == 512));
}

#[test]
fn arena_size_is_capped_and_second_setup_refused() {
    let (ts, _arenas) = shm_server(MemDevice::new(&[(512, 64)]), |c| c.arena_bytes = 2 * MIB);
    let c = Client::connect_shm(&ts.path, 64 * MIB).unwrap();
    assert_eq!(c.shm_info().unwrap().arena_len, 2 * MIB as u64);
    let raw = RawSession::open(&ts.path, 4096);
    assert_eq!(raw.info.arena_len, 4096);
    let mut s = &raw.sock;
    s.write_all(&Request::ShmSetup { arena_bytes: 0 }.encode(7))
        .unwrap();
    let r = protocol::read_reply(&mut s).unwrap().unwrap();
    assert_eq!((r.tag, r.status), (7, EEXIST as u32));
}

/// A session driven by hand over the raw protocol, for tests that misbehave.
struct RawSession {
    sock: UnixStream,
    ring: Ring,
    arena: Mapping,
    info: ShmInfo,
    server_bell: OwnedFd,
    tail: std::cell::Cell<u32>,
    seen: std::cell::RefCell<Vec<(u64, i32)>>,
    head: std::cell::Cell<u32>,
}

impl RawSession {
    fn open(path: &std::path::Path, arena: u64) -> RawSession {
        let sock = UnixStream::connect(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut s = &sock;
        s.write_all(
            &Request::Hello {
                client: "raw-shm".into(),
            }
            .encode(0),
        )
        .unwrap();
        let r = protocol::read_reply(&mut s).unwrap().unwrap();
        assert_eq!(r.status, 0);
        s.write_all(&Request::ShmSetup { arena_bytes: arena }.encode(1))
            .unwrap();
        let mut hb = [0u8; protocol::REPLY_HEADER_LEN];
        let (n, fds) = shm::recv_with_fds(sock.as_fd(), &mut hb).unwrap();
        assert_eq!(n, hb.len());
        let h = protocol::ReplyHeader::parse(&hb).unwrap();
        assert_eq!((h.op, h.status), (Some(Opcode::ShmSetup), 0));
        let mut payload = vec![0u8; h.payload_len as usize];
        s.read_exact(&mut payload).unwrap();
        let info = ShmInfo::decode(&payload).unwrap();
        let [ring_fd, arena_fd, server_bell, _client_bell]: [OwnedFd; 4] = fds.try_into().unwrap();
        let ring = Ring::new(
            Mapping::map(ring_fd.as_fd(), info.ring_len as usize).unwrap(),
            info.sq_entries,
            info.cq_entries,
        )
        .unwrap();
        let arena = Mapping::map(arena_fd.as_fd(), info.arena_len as usize).unwrap();
        // The fds cannot be shrunk by us.
        assert!(rustix::fs::ftruncate(&arena_fd, 0).is_err());
        assert!(rustix::fs::ftruncate(&ring_fd, 0).is_err());
        RawSession {
            sock,
            ring,
            arena,
            info,
            server_bell,
            tail: 0.into(),
            seen: Vec::new().into(),
            head: 0.into(),
        }
    }

    fn call(&self, tag: u64, req: &Request) -> Reply {
        let mut s = &self.sock;
        s.write_all(&req.encode(tag)).unwrap();
        protocol::read_reply(&mut s).unwrap().unwrap()
    }

    fn open_disk(&self) -> u64 {
        let r = self.call(
            2,
            &Request::Open {
                path: "/0".into(),
                flags: O_RDWR as u64,
            },
        );
        assert_eq!(r.status, 0);
        r.value
    }

    fn push(&self, sqe: Sqe) {
        self.ring.write_sqe(self.tail.get(), &sqe);
        self.tail.set(self.tail.get().wrapping_add(1));
    }

    fn publish(&self) {
        self.ring
            .word(off::SQ_TAIL)
            .store(self.tail.get(), Ordering::SeqCst);
        shm::kick(self.server_bell.as_fd());
    }

    /// Collects completions until `n` were seen in total; returns all seen.
    fn wait_cqes(&self, n: usize) -> Vec<(u64, i32)> {
        let end = Instant::now() + Duration::from_secs(20);
        while self.seen.borrow().len() < n {
            let tail = self.ring.word(off::CQ_TAIL).load(Ordering::Acquire);
            while self.head.get() != tail {
                let c: Cqe = self.ring.read_cqe(self.head.get());
                self.seen.borrow_mut().push((c.user_data, c.res));
                self.head.set(self.head.get().wrapping_add(1));
                self.ring
                    .word(off::CQ_HEAD)
                    .store(self.head.get(), Ordering::SeqCst);
            }
            assert!(
                Instant::now() < end,
                "only {:?} of {n} completions",
                self.seen.borrow()
            );
            thread::sleep(Duration::from_millis(1));
        }
        self.seen.borrow().clone()
    }

    /// Whether the server closed the socket (waits up to `d`).
    fn closed_within(&self, d: Duration) -> bool {
        self.sock.set_read_timeout(Some(d)).unwrap();
        let mut b = [0u8; 64];
        let mut s = &self.sock;
        loop {
            match s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// A well-behaved client doing verified I/O in its own range until `stop`.
fn good_client(
    path: std::path::PathBuf,
    base: u64,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let c = Client::connect_shm(&path, MIB).unwrap();
        let h = c.open("/0", OpenFlags::READ_WRITE).unwrap();
        let mut rounds = 0u64;
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) || rounds < 20 {
            let at = base + (rounds % 64) * 4096;
            let d = pattern(rounds, at, 4096);
            let mut b = c.alloc_buf(4096).unwrap();
            b.copy_from_slice(&d);
            c.prep_write(&h, at, b).unwrap();
            c.submit().unwrap();
            out.clear();
            c.reap(1, Some(Duration::from_secs(20)), &mut out).unwrap();
            assert_eq!(out[0].result.as_ref().unwrap(), &4096);
            let mut back = vec![0u8; 4096];
            c.read_exact_at(&h, at, &mut back).unwrap();
            assert_eq!(back, d, "good client data at {at}");
            rounds += 1;
        }
        rounds
    })
}

#[test]
fn garbage_in_the_rings_gets_errors_or_a_disconnect_and_others_are_fine() {
    let (ts, arenas) = shm_server(MemDevice::with_async(&[(512, 65536)]), |_| {});
    let stop = Arc::new(AtomicBool::new(false));
    let good = good_client(ts.path.clone(), 16 * MIB as u64, stop.clone());
    let mut rng = Rng(0x1234_5678_9abc_def1);

    // 1. Random bytes as SQEs, published honestly: every entry completes, with an error (or
    //    success when it happens to be valid), and the session stays up.
    let raw = RawSession::open(&ts.path, MIB as u64);
    let h = raw.open_disk();
    let entries = raw.info.sq_entries;
    let mut total = 0usize;
    for round in 0..20u32 {
        let k = (rng.next() % u64::from(entries)) as usize + 1;
        for _ in 0..k {
            let mut w = [0u64; 8];
            for x in &mut w {
                *x = rng.next();
            }
            if round.is_multiple_of(2) && rng.next().is_multiple_of(2) {
                // Clean reserved fields: the opcode (mostly unknown) is what gets checked.
                w[0] &= 0xFFFF_FFFF_0000_00FF;
                w[5] = 0;
                w[6] = 0;
                w[7] = 0;
            }
            if round % 2 == 1 {
                // Plausible entries: right opcode and handle, wild len/offset/buf.
                let opc = [op::READ, op::WRITE, op::FSYNC][(rng.next() % 3) as usize];
                w[0] = u64::from(opc) | (rng.next() % (2 * MIB as u64)) << 32;
                w[2] = if rng.next().is_multiple_of(4) {
                    rng.next()
                } else {
                    h
                };
                w[3] = if rng.next().is_multiple_of(2) {
                    rng.next()
                } else {
                    rng.next() % (40 * MIB as u64)
                };
                w[4] = if rng.next().is_multiple_of(2) {
                    rng.next()
                } else {
                    rng.next() % (2 * MIB as u64)
                };
                w[5] = 0;
                w[6] = 0;
                w[7] = 0;
            }
            raw.push(Sqe::from_words(w));
        }
        raw.publish();
        total += k;
        let seen = raw.wait_cqes(total);
        for &(_, res) in &seen[total - k..] {
            assert!(
                res >= 0 || [EINVAL, EFAULT, ENOSYS, EBADF, EBUSY, ENOSPC].contains(&-res),
                "unexpected result {res}"
            );
        }
        // Scribble over words the server owns: it never reads them back.
        raw.ring
            .word(off::SQ_HEAD)
            .store(rng.next() as u32, Ordering::SeqCst);
        raw.ring
            .word(off::CQ_TAIL)
            .store(rng.next() as u32, Ordering::SeqCst);
        raw.ring
            .word(off::CQ_TAIL)
            .store(raw.head.get(), Ordering::SeqCst);
    }
    let seen = raw.seen.borrow().clone();
    assert!(seen.iter().any(|&(_, r)| r == -ENOSYS));
    assert!(seen.iter().any(|&(_, r)| r == -EINVAL));
    assert!(seen.iter().any(|&(_, r)| r == -EFAULT));
    // Still served on the socket.
    assert_eq!(raw.call(9, &Request::Fsize { handle: h }).status, 0);

    // 2. A submission tail far ahead of the ring: disconnect.
    let raw2 = RawSession::open(&ts.path, MIB as u64);
    raw2.ring
        .word(off::SQ_TAIL)
        .store(entries + 7, Ordering::SeqCst);
    shm::kick(raw2.server_bell.as_fd());
    assert!(raw2.closed_within(Duration::from_secs(10)));

    // 3. A completion head beyond what was published: disconnect (noticed at the next
    //    submission).
    let raw3 = RawSession::open(&ts.path, MIB as u64);
    let h3 = raw3.open_disk();
    raw3.ring.word(off::CQ_HEAD).store(12345, Ordering::SeqCst);
    raw3.push(Sqe {
        opcode: op::READ,
        len: 512,
        user_data: 1,
        handle: h3,
        offset: 0,
        buf: 0,
        ..Sqe::default()
    });
    raw3.publish();
    assert!(raw3.closed_within(Duration::from_secs(10)));

    // 4. Random control words, many times, while requests are in flight.
    let raw4 = RawSession::open(&ts.path, MIB as u64);
    let h4 = raw4.open_disk();
    for _ in 0..200 {
        raw4.push(Sqe {
            opcode: op::READ,
            len: 4096,
            user_data: 5,
            handle: h4,
            offset: 0,
            buf: 0,
            ..Sqe::default()
        });
        for w in [
            off::SQ_TAIL,
            off::CQ_HEAD,
            off::SERVER_SLEEPING,
            off::CLIENT_SLEEPING,
        ] {
            raw4.ring.word(w).store(rng.next() as u32, Ordering::SeqCst);
        }
        shm::kick(raw4.server_bell.as_fd());
    }
    assert!(raw4.closed_within(Duration::from_secs(10)));

    // 5. Garbage in the arena itself is just data.
    let raw5 = RawSession::open(&ts.path, MIB as u64);
    // SAFETY (test): our own mapping of our own arena.
    unsafe { std::ptr::write_bytes(raw5.arena.ptr().as_ptr(), 0xEE, raw5.arena.len()) };
    drop((raw, raw2, raw3, raw4, raw5));

    stop.store(true, Ordering::Relaxed);
    assert!(good.join().unwrap() >= 20);
    wait_until("arenas recycled", Duration::from_secs(10), || {
        arenas.live() == 0
    });
    // And the server takes new sessions.
    let c = Client::connect_shm(&ts.path, MIB).unwrap();
    let h = c.open("/0", OpenFlags::READ).unwrap();
    let mut b = vec![0u8; 512];
    c.read_exact_at(&h, 0, &mut b).unwrap();
    assert_eq!(b, pattern(0, 0, 512));
}

const CHILD_ENV: &str = "VSCSI_SHM_TEST_CHILD_SOCKET";

/// Not a test on its own: the body of the child process of `killed_client_is_cleaned_up`.
#[test]
fn child_client_process() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let c = Client::connect_shm(&path, MIB).unwrap();
    let h = c.open("/0", OpenFlags::READ_WRITE).unwrap();
    // Requests that hang in the device (the gate), then writes and reads forever.
    for _ in 0..4 {
        let b = c.alloc_buf(4096).unwrap();
        c.prep_read(&h, 0, b).unwrap();
    }
    c.submit().unwrap();
    println!("child: ready");
    let mut out = Vec::new();
    let mut i = 0u64;
    loop {
        let mut b = c.alloc_buf(4096).unwrap();
        b.fill(0xC5);
        c.prep_write(&h, MIB as u64 + (i % 100) * 4096, b).unwrap();
        c.submit().unwrap();
        out.clear();
        c.reap(1, Some(Duration::from_secs(5)), &mut out).unwrap();
        i += 1;
    }
}

/// Starts `child_client_process` (this test binary again) against the server at `path` and
/// waits until it says it has requests going. The child's stdout stays open as long as the
/// returned reader lives (the child keeps printing).
fn spawn_child_client(
    path: &std::path::Path,
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
) {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "child_client_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    while !line.contains("child: ready") {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0,
            "child died"
        );
    }
    (child, out)
}

#[test]
fn killed_client_is_cleaned_up() {
    let mut dev = MemDevice::new(&[(512, 65536)]);
    dev.gate_lba = Some(0);
    let (ts, arenas) = shm_server(dev, |_| {});
    let stop = Arc::new(AtomicBool::new(false));
    let good = good_client(ts.path.clone(), 16 * MIB as u64, stop.clone());
    wait_until("good client session", Duration::from_secs(10), || {
        arenas.live() == 1
    });

    let (mut child, _out) = spawn_child_client(&ts.path);
    wait_until(
        "child reads held in the device",
        Duration::from_secs(10),
        || ts.device.gated_waiting.load(Ordering::SeqCst) == 4,
    );
    thread::sleep(Duration::from_millis(50)); // let it write for a while
    child.kill().unwrap();
    child.wait().unwrap();
    // Its reads are still in the device: the arena must not be recycled yet.
    thread::sleep(Duration::from_millis(100));
    assert_eq!(arenas.live(), 2, "arena recycled under requests in flight");
    ts.device.open_gate();
    wait_until("child arena recycled", Duration::from_secs(10), || {
        arenas.live() == 1
    });
    stop.store(true, Ordering::Relaxed);
    assert!(good.join().unwrap() >= 20);
    // Nothing the child wrote went outside its range.
    assert_eq!(ts.device.disk_bytes(0, 0, MIB), pattern(0, 0, MIB));
}

/// The same with the child's requests started on the poller's fast path and held in the
/// device: the dead client's session must not end (and its arena must not be recycled) until
/// the device has answered every one of them.
#[test]
fn killed_client_with_fast_requests_in_the_device_is_cleaned_up() {
    let (ts, arenas) = shm_server(MemDevice::with_async(&[(512, 65536)]), |_| {});
    ts.device.async_hold.store(true, Ordering::SeqCst);
    let (mut child, _out) = spawn_child_client(&ts.path);
    wait_until(
        "child requests held in the device",
        Duration::from_secs(10),
        || ts.device.async_started.load(Ordering::SeqCst) >= 5,
    );
    child.kill().unwrap();
    child.wait().unwrap();
    // Its requests are still in the device: the arena must not be recycled yet.
    thread::sleep(Duration::from_millis(200));
    assert_eq!(arenas.live(), 1, "arena recycled under requests in flight");
    ts.device.async_hold.store(false, Ordering::SeqCst);
    wait_until("child arena recycled", Duration::from_secs(10), || {
        arenas.live() == 0
    });
    // Nothing the child wrote went outside its range, and the server takes new sessions.
    assert_eq!(ts.device.disk_bytes(0, 0, MIB), pattern(0, 0, MIB));
    let c = Client::connect_shm(&ts.path, MIB).unwrap();
    let h = c.open("/0", OpenFlags::READ).unwrap();
    let comp = one(&c, c.prep_read(&h, 0, c.alloc_buf(4096).unwrap()).unwrap());
    assert_eq!(comp.result.unwrap(), 4096);
    assert_eq!(&comp.buf.unwrap()[..], &pattern(0, 0, 4096)[..]);
}

const SERVER_CHILD_ENV: &str = "VSCSI_SHM_TEST_SERVER_CHILD";

/// Not a test on its own: the server process of `client_notices_a_dead_server`. Reads of
/// LBA 0 hang in its device forever.
#[test]
fn child_server_process() {
    if std::env::var(SERVER_CHILD_ENV).is_err() {
        return;
    }
    let mut dev = MemDevice::new(&[(512, 64)]);
    dev.gate_lba = Some(0);
    let (ts, _arenas) = shm_server(dev, |_| {});
    println!("socket {}", ts.path.display());
    // Lives until killed, or until its parent test is gone (never an orphan for long).
    let parent = std::os::unix::process::parent_id();
    let end = Instant::now() + Duration::from_secs(120);
    while std::os::unix::process::parent_id() == parent && Instant::now() < end {
        thread::sleep(Duration::from_millis(200));
    }
    std::process::exit(0);
}

#[test]
fn client_notices_a_dead_server() {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "child_server_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SERVER_CHILD_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let path = loop {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0,
            "server died"
        );
        // The harness may print "test child_server_process ... " before it on the line.
        if let Some(p) = line.trim().split("socket ").nth(1) {
            break std::path::PathBuf::from(p);
        }
    };
    let c = Client::connect_shm(&path, MIB).unwrap();
    let h = c.open("/0", OpenFlags::READ).unwrap();
    // A read held in the device, a thread waiting for it without a timeout.
    c.prep_read(&h, 0, c.alloc_buf(512).unwrap()).unwrap();
    c.submit().unwrap();
    let waiter = {
        let c = c.clone();
        thread::spawn(move || {
            let mut out = Vec::new();
            c.reap(1, None, &mut out)
        })
    };
    thread::sleep(Duration::from_millis(100));
    child.kill().unwrap();
    child.wait().unwrap();
    let t0 = Instant::now();
    let r = waiter.join().unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "noticed after {:?}",
        t0.elapsed()
    );
    assert!(matches!(r, Err(ClientError::Disconnected)), "{r:?}");
    let mut b = vec![0u8; 512];
    assert!(c.read_at(&h, 0, &mut b).is_err());
    assert!(c.submit().is_err());
}
