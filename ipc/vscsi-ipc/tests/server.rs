//! Server and client tests against an in-memory device: concurrency with out-of-order
//! replies, handle isolation, disconnects, garbage frames, limits, big I/O, shutdown.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{MemDevice, SCHEME, TestServer, pattern};
use syscall::error::{EBADF, ENODEV, ENOENT, ENOSPC, EPROTO, EUSERS};
use syscall::flag::{O_RDONLY, O_RDWR};
use vscsi_ipc::protocol::{self, Opcode, Reply, Request};
use vscsi_ipc::{Client, ClientError, OpenFlags, Server, ServerConfig};

const MIB: u64 = 1 << 20;

/// A raw protocol connection for tests that must misbehave.
struct Raw {
    s: UnixStream,
}

impl Raw {
    fn connect(path: &std::path::Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Raw { s }
    }
    fn hello(path: &std::path::Path) -> Raw {
        let mut r = Raw::connect(path);
        r.send(
            0,
            &Request::Hello {
                client: "raw".into(),
            },
        );
        let rep = r.recv().unwrap();
        assert_eq!((rep.tag, rep.status), (0, 0));
        assert_eq!(rep.payload, SCHEME.as_bytes());
        r
    }
    fn send(&mut self, tag: u64, req: &Request) {
        self.s.write_all(&req.encode(tag)).unwrap();
    }
    fn recv(&mut self) -> Option<Reply> {
        protocol::read_reply(&mut self.s).unwrap()
    }
    fn call(&mut self, tag: u64, req: &Request) -> Reply {
        self.send(tag, req);
        let r = self.recv().unwrap();
        assert_eq!(r.tag, tag);
        r
    }
    fn open(&mut self, tag: u64, path: &str) -> u64 {
        // The root is a directory: read-only.
        let flags = if path == "/" { O_RDONLY } else { O_RDWR };
        let r = self.call(
            tag,
            &Request::Open {
                path: path.into(),
                flags: flags as u64,
            },
        );
        assert_eq!(r.status, 0);
        r.value
    }
    /// Expects the server to close the connection (EOF); panics on data or timeout.
    fn expect_eof(&mut self) {
        let mut buf = [0u8; 64];
        match self.s.read(&mut buf) {
            Ok(0) => {}
            Ok(_) => panic!("unexpected data before EOF"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("no EOF: {e}"),
        }
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn basic_ops() {
    let srv = TestServer::start(MemDevice::new(&[(512, 2048), (4096, 256)]));
    let c = Client::connect(&srv.path).unwrap();
    assert_eq!(c.scheme(), SCHEME);
    assert_eq!(c.list(SCHEME).unwrap(), vec!["0", "1"]);
    assert_eq!(c.list("disk.virtio-scsi:").unwrap(), vec!["0", "1"]);
    assert_eq!(c.list("disk.other").unwrap_err().errno(), Some(ENODEV));

    let h = c
        .open("disk.virtio-scsi:/1", OpenFlags::READ_WRITE)
        .unwrap();
    let st = c.stat(&h).unwrap();
    assert_eq!(
        (st.size, st.block_size, st.blocks, st.is_dir),
        (1 << 20, 4096, 256, false)
    );
    assert_eq!(c.size(&h).unwrap(), 1 << 20);
    assert_eq!(c.fpath(&h).unwrap(), "disk.virtio-scsi:1");

    let mut buf = vec![0u8; 1000];
    c.read_exact_at(&h, 333, &mut buf).unwrap();
    assert_eq!(buf, pattern(1, 333, 1000));
    c.write_all_at(&h, 5000, b"hello world").unwrap();
    assert_eq!(srv.device.disk_bytes(1, 5000, 11), b"hello world");
    c.sync(&h).unwrap();
    assert!(srv.device.flushes.load(Ordering::SeqCst) >= 1);

    // In-scheme paths, root stat, other-scheme paths.
    let h0 = c.open("0", OpenFlags::READ).unwrap();
    assert_eq!(c.stat(&h0).unwrap().size, 512 * 2048);
    let root = c.open("/", OpenFlags::READ).unwrap();
    assert!(c.stat(&root).unwrap().is_dir);
    assert_eq!(c.stat_path("disk.virtio-scsi:0").unwrap().block_size, 512);
    let e = c.open("disk.nvme:/0", OpenFlags::READ).unwrap_err();
    assert_eq!(e.errno(), Some(ENODEV));
    assert_eq!(e.to_string(), "No such device (ENODEV)");
    let e = c.open("disk.virtio-scsi:/7", OpenFlags::READ).unwrap_err();
    assert_eq!(e.to_string(), "No such file or directory (ENOENT)");
    // A read-only handle refuses writes.
    assert_eq!(c.write_at(&h0, 0, b"x").unwrap_err().errno(), Some(EBADF));

    c.close(h).unwrap();
    c.close(h0).unwrap();
    c.close(root).unwrap();
}

#[test]
fn end_of_device_is_never_silent() {
    let srv = TestServer::start(MemDevice::new(&[(512, 8)])); // 4096 bytes
    let c = Client::connect(&srv.path).unwrap();
    let h = c.open("/0", OpenFlags::READ_WRITE).unwrap();
    let mut buf = vec![0u8; 1000];
    assert_eq!(c.read_at(&h, 4000, &mut buf).unwrap(), 96);
    assert_eq!(c.read_at(&h, 4096, &mut buf).unwrap(), 0);
    let e = c.read_exact_at(&h, 4000, &mut buf).unwrap_err();
    assert!(matches!(
        e,
        ClientError::UnexpectedEof {
            offset: 4000,
            expected: 1000,
            got: 96
        }
    ));
    assert!(e.to_string().contains("unexpected end of device"), "{e}");
    assert_eq!(c.write_at(&h, 4000, &buf).unwrap(), 96);
    let e = c.write_all_at(&h, 4000, &buf).unwrap_err();
    assert!(matches!(e, ClientError::ShortWrite { got: 96, .. }), "{e}");
    assert_eq!(
        c.write_at(&h, 4096, &buf).unwrap_err().errno(),
        Some(ENOSPC)
    );
}

#[test]
fn big_io_is_split_and_correct() {
    // 64 MiB disk; 40 MiB transfers at an unaligned offset span several 16 MiB frames.
    let srv = TestServer::start(MemDevice::new(&[(512, 64 * MIB / 512)]));
    let c = Client::connect(&srv.path).unwrap();
    assert_eq!(c.chunk_size(), 16 << 20);
    let h = c.open("/0", OpenFlags::READ_WRITE).unwrap();
    let off = 3 * MIB + 1234;
    let data = pattern(77, 0, (40 * MIB) as usize);
    c.write_all_at(&h, off, &data).unwrap();
    assert!(srv.device.disk_bytes(0, off as usize, data.len()) == data);
    let mut back = vec![0u8; data.len()];
    c.read_exact_at(&h, off, &mut back).unwrap();
    assert!(back == data);
    // Crossing the end of the device exactly at a frame boundary: a short count, not ENOSPC.
    let tail = vec![0xAB; (24 * MIB) as usize];
    assert_eq!(
        c.write_at(&h, 48 * MIB, &tail).unwrap(),
        (16 * MIB) as usize
    );
    let mut big = vec![0u8; (24 * MIB) as usize];
    assert_eq!(
        c.read_at(&h, 48 * MIB, &mut big).unwrap(),
        (16 * MIB) as usize
    );
    assert!(big[..(16 * MIB) as usize].iter().all(|&b| b == 0xAB));
}

#[test]
fn many_clients_many_threads_out_of_order() {
    let mut dev = MemDevice::new(&[(512, 16 * MIB / 512)]);
    dev.slow = true;
    let srv = TestServer::start(dev);
    const CLIENTS: usize = 6;
    const THREADS: usize = 6;
    const ROUNDS: usize = 30;
    let barrier = Arc::new(Barrier::new(CLIENTS * THREADS));
    let mut joins = Vec::new();
    for ci in 0..CLIENTS {
        let c = Client::connect(&srv.path).unwrap();
        for ti in 0..THREADS {
            let c = c.clone();
            let b = barrier.clone();
            joins.push(thread::spawn(move || {
                let h = c
                    .open("disk.virtio-scsi:/0", OpenFlags::READ_WRITE)
                    .unwrap();
                // Each thread owns a 64 KiB region in the first 8 MiB...
                let slot = (ci * THREADS + ti) as u64;
                let base = slot * 65536;
                b.wait();
                for round in 0..ROUNDS {
                    let len = 512 + (round * 997 + ti * 131) % 8000;
                    let off = base + ((round * 4099) % (65536 - 8192)) as u64;
                    let data = pattern(slot * 1000 + round as u64, off, len);
                    c.write_all_at(&h, off, &data).unwrap();
                    let mut back = vec![0u8; len];
                    c.read_exact_at(&h, off, &mut back).unwrap();
                    assert_eq!(back, data, "client {ci} thread {ti} round {round}");
                    // ...and reads the untouched upper half, which holds the initial pattern.
                    let roff = 8 * MIB + ((round * 7919 + ti * 4096) as u64 % (7 * MIB));
                    let mut r = vec![0u8; 3000];
                    c.read_exact_at(&h, roff, &mut r).unwrap();
                    assert_eq!(r, pattern(0, roff, 3000));
                }
                c.close(h).unwrap();
            }));
        }
    }
    for j in joins {
        j.join().unwrap();
    }
}

#[test]
fn replies_come_back_out_of_order() {
    let mut dev = MemDevice::new(&[(512, 1024)]);
    dev.gate_lba = Some(100);
    let srv = TestServer::start(dev);
    let mut r = Raw::hello(&srv.path);
    let h = r.open(1, "/0");
    // Tag 10 waits at the gate; tags 11..=15 are fast and must overtake it.
    r.send(
        10,
        &Request::Read {
            handle: h,
            offset: 100 * 512,
            len: 512,
        },
    );
    wait_until("gated read", || {
        srv.device.gated_waiting.load(Ordering::SeqCst) == 1
    });
    for t in 11..=15u64 {
        r.send(
            t,
            &Request::Read {
                handle: h,
                offset: t * 512,
                len: 512,
            },
        );
    }
    let mut order = Vec::new();
    for _ in 0..5 {
        let rep = r.recv().unwrap();
        assert_eq!(rep.status, 0);
        assert_eq!(rep.payload, pattern(0, rep.tag * 512, 512));
        order.push(rep.tag);
    }
    order.sort();
    assert_eq!(order, vec![11, 12, 13, 14, 15]);
    srv.device.open_gate();
    let rep = r.recv().unwrap();
    assert_eq!(rep.tag, 10);
    assert_eq!(rep.payload, pattern(0, 100 * 512, 512));
}

#[test]
fn handles_are_per_connection() {
    let srv = TestServer::start(MemDevice::new(&[(512, 64)]));
    let mut a = Raw::hello(&srv.path);
    let mut b = Raw::hello(&srv.path);
    let ha = a.open(1, "/0");
    for req in [
        Request::Read {
            handle: ha,
            offset: 0,
            len: 16,
        },
        Request::Write {
            handle: ha,
            offset: 0,
            data: vec![1],
        },
        Request::Fsync { handle: ha },
        Request::Fstat { handle: ha },
        Request::Fsize { handle: ha },
        Request::Fpath { handle: ha },
        Request::Close { handle: ha },
    ] {
        let rep = b.call(2, &req);
        assert_eq!(rep.status, EBADF as u32, "{req:?}");
    }
    // Still open and usable by its owner.
    let rep = a.call(3, &Request::Fsize { handle: ha });
    assert_eq!((rep.status, rep.value), (0, 512 * 64));
    assert_eq!(a.call(4, &Request::Close { handle: ha }).status, 0);
    assert_eq!(
        a.call(5, &Request::Close { handle: ha }).status,
        EBADF as u32
    );

    // The client library refuses another client's handle locally too.
    let c1 = Client::connect(&srv.path).unwrap();
    let c2 = Client::connect(&srv.path).unwrap();
    let h1 = c1.open("/0", OpenFlags::READ).unwrap();
    assert_eq!(c2.size(&h1).unwrap_err().errno(), Some(EBADF));
    assert_eq!(c1.size(&h1).unwrap(), 512 * 64);
}

#[test]
fn disconnect_mid_request_closes_its_handles_only() {
    let mut dev = MemDevice::new(&[(512, 1024)]);
    dev.gate_lba = Some(500);
    let srv = TestServer::start(dev);
    let other = Client::connect(&srv.path).unwrap();
    let ho = other.open("/0", OpenFlags::READ).unwrap();

    let mut a = Raw::hello(&srv.path);
    let h1 = a.open(1, "/0");
    let h2 = a.open(2, "/");
    assert!(srv.scheme.caller(h1 as usize).is_ok());
    a.send(
        3,
        &Request::Read {
            handle: h1,
            offset: 500 * 512,
            len: 4096,
        },
    );
    wait_until("gated read", || {
        srv.device.gated_waiting.load(Ordering::SeqCst) == 1
    });
    drop(a); // vanish with a request in flight

    // Others are not affected while it hangs in the device.
    let mut buf = [0u8; 64];
    other.read_exact_at(&ho, 0, &mut buf).unwrap();
    assert_eq!(&buf[..], &pattern(0, 0, 64)[..]);
    srv.device.open_gate();
    // Its handles get closed once its request finishes.
    wait_until("handles closed", || {
        srv.scheme.caller(h1 as usize).is_err() && srv.scheme.caller(h2 as usize).is_err()
    });
    assert!(srv.scheme.caller(ho.id() as usize).is_ok());
    other.read_exact_at(&ho, 64, &mut buf).unwrap();
}

#[test]
fn dropped_handle_and_client_are_closed_on_the_server() {
    let srv = TestServer::start(MemDevice::new(&[(512, 64)]));
    let c = Client::connect(&srv.path).unwrap();
    let h = c.open("/0", OpenFlags::READ).unwrap();
    let id = h.id() as usize;
    drop(h); // background close
    wait_until("dropped handle closed", || srv.scheme.caller(id).is_err());
    let h = c.open("/0", OpenFlags::READ).unwrap();
    let id = h.id() as usize;
    std::mem::forget(h); // no background close: only the connection's end closes it
    drop(c);
    wait_until("client's handle closed", || srv.scheme.caller(id).is_err());
}

#[test]
fn garbage_gets_an_error_and_a_close_others_keep_working() {
    let srv = TestServer::start(MemDevice::new(&[(512, 64)]));
    let good = Client::connect(&srv.path).unwrap();
    let hg = good.open("/0", OpenFlags::READ).unwrap();

    // Garbage header with a readable tag.
    let mut g = Raw::hello(&srv.path);
    let hid = g.open(1, "/0");
    let mut junk = vec![0x5Au8; 48];
    junk[8..16].copy_from_slice(&77u64.to_le_bytes());
    g.s.write_all(&junk).unwrap();
    let rep = g.recv().unwrap();
    assert_eq!((rep.tag, rep.status, rep.op), (77, EPROTO as u32, None));
    g.expect_eof();
    wait_until("garbage conn handle closed", || {
        srv.scheme.caller(hid as usize).is_err()
    });

    // Oversized frame: refused from its header.
    let mut g = Raw::hello(&srv.path);
    let mut hdr = Request::Write {
        handle: 1,
        offset: 0,
        data: vec![],
    }
    .encode(5);
    hdr[40..44].copy_from_slice(&(100u32 << 20).to_le_bytes());
    g.s.write_all(&hdr).unwrap();
    let rep = g.recv().unwrap();
    assert_eq!((rep.tag, rep.status), (5, syscall::error::EMSGSIZE as u32));
    g.expect_eof();

    // A request before Hello.
    let mut g = Raw::connect(&srv.path);
    g.send(9, &Request::Fsize { handle: 1 });
    let rep = g.recv().unwrap();
    assert_eq!((rep.tag, rep.status), (9, EPROTO as u32));
    g.expect_eof();

    // Too short to hold a tag: just closed.
    let mut g = Raw::connect(&srv.path);
    g.s.write_all(b"hello?").unwrap();
    g.s.shutdown(std::net::Shutdown::Write).unwrap();
    g.expect_eof();

    // Random garbage streams.
    let mut seed = 12345u64;
    for _ in 0..20 {
        let mut g = Raw::connect(&srv.path);
        let bytes: Vec<u8> = (0..300)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = g.s.write_all(&bytes);
        let _ = g.s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = g.s.read_to_end(&mut sink);
    }

    let mut buf = [0u8; 16];
    good.read_exact_at(&hg, 16, &mut buf).unwrap();
    assert_eq!(&buf[..], &pattern(0, 16, 16)[..]);
}

#[test]
fn connection_limit_and_backpressure() {
    let mut dev = MemDevice::new(&[(512, 1024)]);
    dev.gate_lba = Some(0);
    let srv = TestServer::start_with(dev, |c| {
        c.max_connections = 2;
        c.max_in_flight_per_conn = 2;
    });
    let c1 = Client::connect(&srv.path).unwrap();
    let mut raw = Raw::hello(&srv.path);
    let e = Client::connect(&srv.path).unwrap_err();
    assert_eq!(e.errno(), Some(EUSERS), "{e}");

    // Backpressure: 10 requests with at most 2 in flight; the gated ones hold the slots.
    let h = raw.open(1, "/0");
    for t in 0..10u64 {
        raw.send(
            100 + t,
            &Request::Read {
                handle: h,
                offset: 0,
                len: 512,
            },
        );
    }
    wait_until("gated reads", || {
        srv.device.gated_waiting.load(Ordering::SeqCst) >= 2
    });
    thread::sleep(Duration::from_millis(50));
    assert_eq!(
        srv.device.gated_waiting.load(Ordering::SeqCst),
        2,
        "only 2 in flight"
    );
    srv.device.open_gate();
    let mut tags: Vec<u64> = (0..10).map(|_| raw.recv().unwrap().tag).collect();
    tags.sort();
    assert_eq!(tags, (100..110).collect::<Vec<_>>());
    drop(raw);
    drop(c1);
    // Slots free again.
    wait_until("reconnect", || Client::connect(&srv.path).is_ok());
}

#[test]
fn client_fails_promptly_when_server_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let l = UnixListener::bind(&path).unwrap();
    let fake = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        // Answer Hello, take one request, then die.
        let _ = protocol::read_request(&mut s).unwrap().unwrap();
        let hello = Reply::ok(Opcode::Hello, 0, 1 << 20, SCHEME.as_bytes().to_vec());
        s.write_all(&hello.encode()).unwrap();
        let _ = protocol::read_request(&mut s).unwrap().unwrap();
        thread::sleep(Duration::from_millis(100));
    });
    let c = Client::connect(&path).unwrap();
    assert_eq!(c.chunk_size(), 1 << 20);
    let t0 = Instant::now();
    let e = c.open("/0", OpenFlags::READ).unwrap_err();
    assert!(matches!(e, ClientError::Disconnected), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(matches!(
        c.list(SCHEME).unwrap_err(),
        ClientError::Disconnected
    ));
    fake.join().unwrap();

    // Nobody listening at all.
    let e = Client::connect(dir.path().join("none.sock")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cannot connect to virtio-scsid at"),
        "{e}"
    );
}

#[test]
fn bind_rules_and_shutdown() {
    let mut srv = TestServer::start(MemDevice::new(&[(512, 64)]));
    let mode = std::fs::metadata(&srv.path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // A live server is never replaced.
    let scheme2 = srv.scheme.clone();
    let e = Server::bind(ServerConfig::new(&srv.path), scheme2)
        .err()
        .unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");

    let c = Client::connect(&srv.path).unwrap();
    let h = c.open("/0", OpenFlags::READ).unwrap();
    let id = h.id() as usize;
    srv.stop().unwrap();
    assert!(!srv.path.exists(), "socket file removed");
    assert!(srv.scheme.caller(id).is_err(), "handles closed at shutdown");
    assert!(matches!(c.size(&h).unwrap_err(), ClientError::Disconnected));

    // A stale socket file (nobody answers) is replaced.
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut cfg = ServerConfig::new(&stale);
    cfg.socket_mode = 0o600;
    let s = Server::bind(cfg, srv.scheme.clone()).unwrap();
    let mode = std::fs::metadata(&stale).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Bound but never run: dropping removes the socket.
    drop(s);
    assert!(!stale.exists());

    // A regular file is never removed.
    let file = dir.path().join("file.sock");
    std::fs::write(&file, b"x").unwrap();
    let e = Server::bind(ServerConfig::new(&file), srv.scheme.clone())
        .err()
        .unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    assert!(file.exists());
}

#[test]
fn shutdown_before_run_returns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let dev = Arc::new(MemDevice::new(&[(512, 8)]));
    let scheme = Arc::new(block_scheme::DiskScheme::new(SCHEME, dev));
    let s = Server::bind(ServerConfig::new(&path), scheme).unwrap();
    s.shutdown_handle().shutdown();
    s.run().unwrap();
    assert!(!path.exists());
    assert!(s.run().is_err(), "run twice");
}

#[test]
fn open_flags_and_raw_open() {
    let srv = TestServer::start(MemDevice::new(&[(512, 64)]));
    let c = Client::connect(&srv.path).unwrap();
    let h = c.open_with_flags("/0", O_RDONLY).unwrap();
    assert_eq!(c.write_at(&h, 0, b"x").unwrap_err().errno(), Some(EBADF));
    assert_eq!(
        c.open("/0p0", OpenFlags::READ).unwrap_err().errno(),
        Some(ENOENT)
    );
    assert_eq!(OpenFlags::READ_WRITE.to_redox(), O_RDWR);
}

#[test]
fn one_client_many_threads_demuxes_out_of_order() {
    let mut dev = MemDevice::new(&[(512, 1024)]);
    dev.gate_lba = Some(900);
    let srv = TestServer::start(dev);
    let c = Client::connect(&srv.path).unwrap();
    let h = Arc::new(c.open("/0", OpenFlags::READ).unwrap());
    // One call waits in the device...
    let slow = {
        let (c, h) = (c.clone(), h.clone());
        thread::spawn(move || {
            let mut buf = vec![0u8; 512];
            c.read_exact_at(&h, 900 * 512, &mut buf).unwrap();
            buf
        })
    };
    wait_until("gated read", || {
        srv.device.gated_waiting.load(Ordering::SeqCst) == 1
    });
    // ...while later calls on the same connection complete around it.
    let fast: Vec<_> = (0..8u64)
        .map(|i| {
            let (c, h) = (c.clone(), h.clone());
            thread::spawn(move || {
                let mut buf = vec![0u8; 700];
                c.read_exact_at(&h, i * 4000, &mut buf).unwrap();
                assert_eq!(buf, pattern(0, i * 4000, 700));
            })
        })
        .collect();
    for t in fast {
        t.join().unwrap();
    }
    assert!(!slow.is_finished());
    srv.device.open_gate();
    assert_eq!(slow.join().unwrap(), pattern(0, 900 * 512, 512));
}

#[test]
fn shutdown_finishes_requests_in_flight() {
    let mut dev = MemDevice::new(&[(512, 1024)]);
    dev.gate_lba = Some(10);
    let mut srv = TestServer::start(dev);
    let c = Client::connect(&srv.path).unwrap();
    let h = c.open("/0", OpenFlags::READ).unwrap();
    let id = h.id() as usize;
    let reader = {
        let c = c.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 512];
            let r = c.read_exact_at(&h, 10 * 512, &mut buf);
            (r.map(|_| buf), h)
        })
    };
    wait_until("gated read", || {
        srv.device.gated_waiting.load(Ordering::SeqCst) == 1
    });
    let dev = srv.device.clone();
    let opener = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        dev.open_gate();
    });
    srv.stop().unwrap();
    opener.join().unwrap();
    let (res, h) = reader.join().unwrap();
    assert_eq!(
        res.unwrap(),
        pattern(0, 10 * 512, 512),
        "in-flight read answered"
    );
    assert!(srv.scheme.caller(id).is_err(), "handle closed");
    assert!(matches!(c.size(&h).unwrap_err(), ClientError::Disconnected));
}
