//! Hostile-client fuzzing with proptest (extends the seeded loop in `protocol.rs`):
//! arbitrary bytes, mutated valid frames and frame streams delivered in random chunks through
//! `decode_request` and `read_request`, and a live server with garbage clients hammering it
//! while a well-behaved client does verified I/O.
//!
//! Properties: the decoders never panic; they agree with each other; a decoded request
//! re-encodes to the same bytes; an incomplete prefix asks for a bounded number of bytes; a
//! refused frame carries a protocol errno and the tag when 16 bytes arrived. The server answers
//! malformed input only with an error reply and/or a disconnect, keeps serving everyone else,
//! and the good client's data stays correct.
//!
//! `VSCSI_FUZZ_CASES=N` scales the decoder case counts (default 4000 per property).

mod common;

use std::io::{self, Cursor, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{MemDevice, TestServer, pattern};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use syscall::error::{EMSGSIZE, ENAMETOOLONG, ENOSYS, EPROTO, EPROTONOSUPPORT};
use vscsi_ipc::protocol::*;
use vscsi_ipc::{Client, OpenFlags};

fn cases() -> u32 {
    std::env::var("VSCSI_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000)
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

const FRAME_ERRNOS: [i32; 5] = [EPROTO, EMSGSIZE, ENAMETOOLONG, ENOSYS, EPROTONOSUPPORT];

/// Every invariant of the request decoders on one buffer.
fn check_request_bytes(b: &[u8]) -> Result<(), TestCaseError> {
    let decoded = decode_request(b);
    match &decoded {
        Ok((tag, req, used)) => {
            prop_assert!(*used <= b.len());
            prop_assert_eq!(&req.encode(*tag)[..], &b[..*used], "canonical re-encoding");
            prop_assert_eq!(req.header(*tag).payload_len as usize, req.payload().len());
        }
        Err(DecodeError::Incomplete { needed }) => {
            prop_assert!(*needed > b.len());
            prop_assert!(
                *needed <= REQUEST_HEADER_LEN + MAX_PAYLOAD,
                "asks for {} bytes",
                needed
            );
        }
        Err(DecodeError::Malformed(e)) => {
            prop_assert!(FRAME_ERRNOS.contains(&e.errno), "errno {}", e.errno);
            prop_assert!(!e.reason.is_empty());
            if b.len() >= 16 {
                prop_assert_eq!(e.tag, peek_tag(b), "the tag is reported");
            }
        }
    }
    // The stream reader agrees.
    let streamed = read_request(&mut Cursor::new(b));
    match (&decoded, streamed) {
        (Ok((tag, req, _)), Ok(Some((t, r)))) => {
            prop_assert_eq!(*tag, t);
            prop_assert_eq!(req, &r);
        }
        (Err(DecodeError::Malformed(e)), Err(ReadError::Malformed(f))) => {
            prop_assert_eq!(e.errno, f.errno);
            prop_assert_eq!(e.tag, f.tag);
        }
        (Err(DecodeError::Incomplete { .. }), Ok(None)) => prop_assert!(b.is_empty()),
        (Err(DecodeError::Incomplete { .. }), Err(ReadError::Malformed(f))) => {
            prop_assert_eq!(f.errno, EPROTO, "a stream that ends inside a frame");
        }
        (d, s) => prop_assert!(false, "decoders disagree: {:?} vs {:?}", d, s),
    }
    Ok(())
}

fn request() -> impl Strategy<Value = Request> {
    let name = prop::collection::vec(any::<char>(), 0..20)
        .prop_map(|c| c.into_iter().collect::<String>())
        .prop_filter("fits MAX_NAME", |s| s.len() <= MAX_NAME);
    let path = prop_oneof![
        Just("/0".to_string()),
        Just("/1".to_string()),
        Just(String::new()),
        "[ -~]{0,40}",
    ];
    prop_oneof![
        name.prop_map(|client| Request::Hello { client }),
        (path, any::<u64>()).prop_map(|(path, flags)| Request::Open { path, flags }),
        (any::<u64>(), any::<u64>(), 0..=MAX_PAYLOAD as u32).prop_map(|(handle, offset, len)| {
            Request::Read {
                handle,
                offset,
                len,
            }
        }),
        (
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(handle, offset, data)| Request::Write {
                handle,
                offset,
                data
            }),
        any::<u64>().prop_map(|handle| Request::Fsync { handle }),
        any::<u64>().prop_map(|handle| Request::Fstat { handle }),
        any::<u64>().prop_map(|handle| Request::Fsize { handle }),
        any::<u64>().prop_map(|handle| Request::Fpath { handle }),
        any::<u64>().prop_map(|handle| Request::Close { handle }),
        Just(Request::Stats),
        any::<u64>().prop_map(|arena_bytes| Request::ShmSetup { arena_bytes }),
    ]
}

/// One change to an encoded frame.
#[derive(Clone, Debug)]
enum Mutation {
    /// Overwrite a byte (position taken modulo the length).
    Byte(usize, u8),
    /// Set one of the header's fields (by offset) to a value.
    Field(u8, u64),
    /// Cut the frame.
    Truncate(usize),
    /// Append bytes.
    Append(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Byte(p, b)),
        3 => (
            prop::sample::select(vec![4u8, 5, 6, 8, 16, 24, 32, 40, 44]),
            prop_oneof![any::<u64>(), Just(0u64), Just(u64::from(u32::MAX)), 0u64..20],
        )
            .prop_map(|(f, v)| Mutation::Field(f, v)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Mutation::Append),
    ]
}

fn apply(frame: &mut Vec<u8>, m: &Mutation) {
    match m {
        Mutation::Byte(p, b) => {
            if !frame.is_empty() {
                let at = p % frame.len();
                frame[at] = *b;
            }
        }
        Mutation::Field(off, v) => {
            let (at, width) = match off {
                4 | 5 => (usize::from(*off), 1),
                6 => (6, 2),
                40 | 44 => (usize::from(*off), 4),
                _ => (usize::from(*off), 8),
            };
            if frame.len() >= at + width {
                frame[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
            }
        }
        Mutation::Truncate(n) => {
            let n = n % (frame.len() + 1);
            frame.truncate(n);
        }
        Mutation::Append(tail) => frame.extend_from_slice(tail),
    }
}

proptest! {
    #![proptest_config(config(cases()))]

    #[test]
    fn arbitrary_bytes_are_refused_or_decoded(b in prop::collection::vec(any::<u8>(), 0..160)) {
        check_request_bytes(&b)?;
    }

    #[test]
    fn arbitrary_headers_with_valid_magic(
        mut b in prop::collection::vec(any::<u8>(), 48..400),
        version in prop_oneof![Just(VERSION), any::<u8>()],
        op in prop_oneof![1u8..=11, any::<u8>()],
        zero_reserved in any::<bool>(),
    ) {
        b[0..4].copy_from_slice(&REQUEST_MAGIC);
        b[4] = version;
        b[5] = op;
        if zero_reserved {
            b[6..8].fill(0);
            b[44..48].fill(0);
        }
        check_request_bytes(&b)?;
    }

    #[test]
    fn valid_frames_round_trip(tag in any::<u64>(), req in request()) {
        let bytes = req.encode(tag);
        check_request_bytes(&bytes)?;
        let (t, r, used) = decode_request(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!((t, &r, used), (tag, &req, bytes.len()));
        // Every strict prefix is incomplete (never malformed, never a panic).
        for cut in [0, 1, 4, 15, 16, 47, bytes.len().saturating_sub(1)] {
            if cut < bytes.len() {
                let is_incomplete =
                    matches!(decode_request(&bytes[..cut]), Err(DecodeError::Incomplete { .. }));
                prop_assert!(is_incomplete, "prefix {}", cut);
            }
        }
    }

    #[test]
    fn mutated_valid_frames(
        tag in any::<u64>(),
        req in request(),
        muts in prop::collection::vec(mutation(), 1..5),
    ) {
        let mut bytes = req.encode(tag);
        for m in &muts {
            apply(&mut bytes, m);
        }
        check_request_bytes(&bytes)?;
    }
}

/// A reader that hands out bytes in given chunk sizes and sometimes fails with `Interrupted`.
struct Chunky {
    data: Vec<u8>,
    at: usize,
    chunks: Vec<usize>,
    next: usize,
}

impl Read for Chunky {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let c = self
            .chunks
            .get(self.next % self.chunks.len().max(1))
            .copied()
            .unwrap_or(1);
        self.next += 1;
        if c == 0 {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = c.min(buf.len()).min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

proptest! {
    #![proptest_config(config(cases() / 4))]

    /// Several frames back to back, then garbage, delivered in random pieces: the stream
    /// reader yields exactly what the buffer decoder yields, frame by frame, then stops with
    /// an error or a clean end.
    #[test]
    fn frame_streams_in_random_chunks(
        reqs in prop::collection::vec((any::<u64>(), request()), 0..6),
        tail in prop::collection::vec(any::<u8>(), 0..80),
        chunks in prop::collection::vec(0usize..70, 1..10),
    ) {
        let mut all = Vec::new();
        for (tag, r) in &reqs {
            all.extend_from_slice(&r.encode(*tag));
        }
        all.extend_from_slice(&tail);
        let mut stream = Chunky { data: all.clone(), at: 0, chunks: chunks.clone(), next: 0 };
        // Make sure some chunk makes progress.
        if chunks.iter().all(|&c| c == 0) {
            stream.chunks.push(1);
        }
        let mut at = 0;
        loop {
            let want = decode_request(&all[at..]);
            let got = read_request(&mut stream);
            match (want, got) {
                (Ok((tag, req, used)), Ok(Some((t, r)))) => {
                    prop_assert_eq!((tag, req), (t, r));
                    at += used;
                }
                (Err(DecodeError::Incomplete { .. }), Ok(None)) => {
                    prop_assert_eq!(at, all.len());
                    break;
                }
                (Err(_), Err(ReadError::Malformed(_))) => break,
                (w, g) => prop_assert!(false, "at {}: {:?} vs {:?}", at, w, g),
            }
        }
    }
}

// ---- The server under garbage ----

/// What one garbage connection sends.
#[derive(Clone, Debug)]
enum Garbage {
    /// Random bytes from the first byte on.
    Random(Vec<u8>),
    /// A good Hello, then random bytes.
    HelloThenRandom(Vec<u8>),
    /// A good Hello and Open of disk 1, then valid requests with mutated headers.
    Mutated(Vec<(u64, Request, Vec<Mutation>)>),
    /// A header announcing `len` payload bytes, then fewer, then the end of the stream.
    ShortPayload(u32, Vec<u8>),
    /// Part of a header, then the end of the stream.
    PartialHeader(usize),
}

fn garbage() -> impl Strategy<Value = Garbage> {
    // Mutated requests go to disk 1 only (the good client owns disk 0): payload bytes (the
    // path) are never mutated, only the header.
    let header_mutation = prop_oneof![
        (0usize..48, any::<u8>()).prop_map(|(p, b)| Mutation::Byte(p, b)),
        (
            prop::sample::select(vec![4u8, 5, 6, 8, 16, 24, 32, 40, 44]),
            any::<u64>()
        )
            .prop_map(|(f, v)| Mutation::Field(f, v)),
    ];
    let disk1_request = prop_oneof![
        (any::<u64>(), 0u64..4096, 0u32..8192).prop_map(|(handle, offset, len)| Request::Read {
            handle,
            offset,
            len
        }),
        (
            any::<u64>(),
            0u64..4096,
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(handle, offset, data)| Request::Write {
                handle,
                offset,
                data
            }),
        any::<u64>().prop_map(|handle| Request::Fstat { handle }),
        any::<u64>().prop_map(|handle| Request::Close { handle }),
        Just(Request::Stats),
        any::<u64>().prop_map(|arena_bytes| Request::ShmSetup { arena_bytes }),
    ];
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..600).prop_map(Garbage::Random),
        prop::collection::vec(any::<u8>(), 1..600).prop_map(Garbage::HelloThenRandom),
        prop::collection::vec(
            (
                any::<u64>(),
                disk1_request,
                prop::collection::vec(header_mutation, 0..3)
            ),
            1..6
        )
        .prop_map(Garbage::Mutated),
        (any::<u32>(), prop::collection::vec(any::<u8>(), 0..100))
            .prop_map(|(n, b)| Garbage::ShortPayload(n, b)),
        (1usize..48).prop_map(Garbage::PartialHeader),
    ]
}

/// The bytes of a garbage connection, and the tags of the valid frames at its start (the only
/// requests that may get a successful reply).
fn render(g: &Garbage) -> (Vec<u8>, Vec<u64>) {
    let hello = |tag| {
        Request::Hello {
            client: "garbage".into(),
        }
        .encode(tag)
    };
    let mut b = Vec::new();
    match g {
        Garbage::Random(r) => b.extend_from_slice(r),
        Garbage::HelloThenRandom(r) => {
            b.extend_from_slice(&hello(1));
            b.extend_from_slice(r);
        }
        Garbage::Mutated(reqs) => {
            b.extend_from_slice(&hello(1));
            b.extend_from_slice(
                &Request::Open {
                    path: "/1".into(),
                    flags: syscall::flag::O_RDWR as u64,
                }
                .encode(2),
            );
            for (tag, r, muts) in reqs {
                let mut f = r.encode(*tag);
                for m in muts {
                    apply(&mut f, m);
                }
                b.extend_from_slice(&f);
            }
        }
        Garbage::ShortPayload(n, tail) => {
            b.extend_from_slice(&hello(1));
            let mut h = Request::Write {
                handle: 1,
                offset: 0,
                data: vec![],
            }
            .encode(9);
            h[40..44].copy_from_slice(&n.to_le_bytes());
            b.extend_from_slice(&h);
            b.extend_from_slice(tail);
        }
        Garbage::PartialHeader(n) => b.extend_from_slice(&hello(1)[..*n]),
    }
    // The valid prefix, as the server sees it.
    let mut tags = Vec::new();
    let mut at = 0;
    while let Ok((tag, _, used)) = decode_request(&b[at..]) {
        tags.push(tag);
        at += used;
    }
    (b, tags)
}

/// Sends one garbage stream and checks the server's answer: replies that parse, successes
/// only for the valid frames, then a disconnect (never a hang).
fn garbage_connection(path: &std::path::Path, g: &Garbage) -> Result<(), String> {
    let (bytes, valid_tags) = render(g);
    let mut s = UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    // The server may close early (after the first bad frame): write errors are expected.
    let _ = s.write_all(&bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if Instant::now() > deadline {
            return Err(format!("{g:?}: no disconnect"));
        }
        match read_reply(&mut s) {
            Ok(None) => return Ok(()),
            Ok(Some(r)) => {
                if r.status == 0 && !valid_tags.contains(&r.tag) {
                    return Err(format!(
                        "{g:?}: success reply (tag {}) to a frame that was not valid",
                        r.tag
                    ));
                }
            }
            Err(ReadError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) =>
            {
                return Ok(());
            }
            Err(ReadError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("{g:?}: the server neither replied nor closed"));
            }
            Err(e) => return Err(format!("{g:?}: unreadable reply: {e:?}")),
        }
    }
}

#[test]
fn garbage_clients_while_a_good_client_does_verified_io() {
    const DISK: u64 = 512 * 2048;
    let srv = TestServer::start(MemDevice::new(&[(512, 2048), (512, 256)]));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(5));

    // The good client: random writes and read-backs on disk 0, checked against its own copy.
    let good = {
        let path = srv.path.clone();
        let stop = stop.clone();
        let start = start.clone();
        thread::spawn(move || -> Result<u64, String> {
            let c = Client::connect(&path).map_err(|e| e.to_string())?;
            let h = c
                .open("/0", OpenFlags::READ_WRITE)
                .map_err(|e| e.to_string())?;
            let mut model = pattern(0, 0, DISK as usize);
            let mut rng = 0x2545_f491_4f6c_dd1du64;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            start.wait();
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) || rounds < 50 {
                let len = 1 + (next() % 20_000) as usize;
                let off = next() % (DISK - len as u64);
                let data = pattern(rounds + 1, off, len);
                c.write_all_at(&h, off, &data).map_err(|e| e.to_string())?;
                model[off as usize..off as usize + len].copy_from_slice(&data);
                let roff = next() % (DISK - 8192);
                let mut back = vec![0u8; 8192];
                c.read_exact_at(&h, roff, &mut back)
                    .map_err(|e| e.to_string())?;
                if back[..] != model[roff as usize..roff as usize + 8192] {
                    return Err(format!("round {rounds}: data at {roff} differs"));
                }
                rounds += 1;
            }
            c.sync(&h).map_err(|e| e.to_string())?;
            Ok(rounds)
        })
    };

    // Garbage clients, each with its own stream of generated garbage.
    let mut bad = Vec::new();
    for t in 0..4u64 {
        let path = srv.path.clone();
        let start = start.clone();
        bad.push(thread::spawn(move || -> Result<usize, String> {
            let mut runner = TestRunner::new_with_rng(
                Config::default(),
                proptest::test_runner::TestRng::from_seed(
                    proptest::test_runner::RngAlgorithm::ChaCha,
                    &[t as u8 + 1; 32],
                ),
            );
            start.wait();
            let mut n = 0;
            for _ in 0..60 {
                let g = garbage()
                    .new_tree(&mut runner)
                    .map_err(|e| e.to_string())?
                    .current();
                garbage_connection(&path, &g)?;
                n += 1;
            }
            Ok(n)
        }));
    }
    let mut garbage_connections = 0;
    for b in bad {
        garbage_connections += b
            .join()
            .expect("garbage thread")
            .unwrap_or_else(|e| panic!("{e}"));
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = good
        .join()
        .expect("good client thread")
        .expect("good client I/O");
    eprintln!(
        "server fuzz: {garbage_connections} garbage connections, {rounds} verified good-client rounds"
    );

    // The server still serves newcomers, and disk 0 holds what the good client wrote.
    let c = Client::connect(&srv.path).expect("server still accepts");
    let h = c.open("/0", OpenFlags::READ).expect("open");
    let mut b = [0u8; 16];
    c.read_exact_at(&h, 0, &mut b).expect("read");
    assert!(
        srv.thread.as_ref().is_some_and(|t| !t.is_finished()),
        "server thread still running"
    );
    assert_eq!(srv.device.disks[0].data.read().unwrap().len() as u64, DISK);
}

#[test]
fn render_marks_only_valid_prefix_frames() -> Result<(), String> {
    let (_, tags) = render(&Garbage::PartialHeader(10));
    assert!(tags.is_empty());
    let (_, tags) = render(&Garbage::HelloThenRandom(vec![0xff; 8]));
    assert_eq!(tags, vec![1]);
    Ok(())
}
