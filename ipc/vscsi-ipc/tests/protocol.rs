//! Protocol tests: round trips for every opcode, strict header checks, and a decoder that never
//! panics on truncated or random input.

use std::io::Cursor;

use syscall::data::Stat;
use syscall::error::{EMSGSIZE, ENAMETOOLONG, ENOENT, ENOSYS, EPROTO, EPROTONOSUPPORT};
use vscsi_ipc::protocol::*;

fn sample_requests() -> Vec<(u64, Request)> {
    vec![
        (
            0,
            Request::Hello {
                client: "test client".into(),
            },
        ),
        (
            1,
            Request::Hello {
                client: String::new(),
            },
        ),
        (
            2,
            Request::Open {
                path: "/0".into(),
                flags: 0x0003_0000,
            },
        ),
        (
            3,
            Request::Open {
                path: String::new(),
                flags: 0,
            },
        ),
        (
            4,
            Request::Read {
                handle: 7,
                offset: 12345,
                len: 4096,
            },
        ),
        (
            5,
            Request::Read {
                handle: 7,
                offset: u64::MAX,
                len: MAX_PAYLOAD as u32,
            },
        ),
        (
            6,
            Request::Write {
                handle: 9,
                offset: 1,
                data: vec![1, 2, 3, 4, 5],
            },
        ),
        (
            7,
            Request::Write {
                handle: 9,
                offset: 0,
                data: Vec::new(),
            },
        ),
        (8, Request::Fsync { handle: 3 }),
        (9, Request::Fstat { handle: 3 }),
        (10, Request::Fsize { handle: 3 }),
        (11, Request::Fpath { handle: 3 }),
        (u64::MAX, Request::Close { handle: u64::MAX }),
    ]
}

fn full_stat() -> Stat {
    Stat {
        st_dev: 1,
        st_ino: 2,
        st_mode: 0o100644,
        st_nlink: 3,
        st_uid: 4,
        st_gid: 5,
        st_size: 6,
        st_blksize: 7,
        st_blocks: 8,
        st_mtime: 9,
        st_mtime_nsec: 10,
        st_atime: 11,
        st_atime_nsec: 12,
        st_ctime: 13,
        st_ctime_nsec: 14,
    }
}

fn sample_replies() -> Vec<Reply> {
    vec![
        Reply::ok(
            Opcode::Hello,
            0,
            MAX_PAYLOAD as u64,
            b"disk.virtio-scsi".to_vec(),
        ),
        Reply::ok(Opcode::Open, 1, 42, Vec::new()),
        Reply::ok(Opcode::Read, 2, 3, vec![9, 8, 7]),
        Reply::ok(Opcode::Write, 3, 4096, Vec::new()),
        Reply::ok(Opcode::Fsync, 4, 0, Vec::new()),
        Reply::ok(Opcode::Fstat, 5, 0, encode_stat(&full_stat()).to_vec()),
        Reply::ok(Opcode::Fsize, 6, 1 << 40, Vec::new()),
        Reply::ok(Opcode::Fpath, 7, 0, b"disk.virtio-scsi:0".to_vec()),
        Reply::ok(Opcode::Close, 8, 0, Vec::new()),
        Reply::error(Some(Opcode::Open), 9, ENOENT),
        Reply::error(None, 10, EPROTO),
    ]
}

#[test]
fn request_round_trip_every_op() {
    let mut seen = std::collections::HashSet::new();
    for (tag, req) in sample_requests() {
        seen.insert(req.opcode());
        let bytes = req.encode(tag);
        assert_eq!(bytes.len(), REQUEST_HEADER_LEN + req.payload().len());
        let (t, r, used) = decode_request(&bytes).unwrap();
        assert_eq!((t, &r, used), (tag, &req, bytes.len()));
        let (t, r) = read_request(&mut Cursor::new(&bytes)).unwrap().unwrap();
        assert_eq!((t, r), (tag, req));
    }
    assert_eq!(seen.len(), 9, "every opcode covered");
}

#[test]
fn reply_round_trip_every_op() {
    for reply in sample_replies() {
        let bytes = reply.encode();
        let (r, used) = decode_reply(&bytes).unwrap();
        assert_eq!((&r, used), (&reply, bytes.len()));
        let r = read_reply(&mut Cursor::new(&bytes)).unwrap().unwrap();
        assert_eq!(r, reply);
    }
}

#[test]
fn stat_field_by_field() {
    let s = full_stat();
    let b = encode_stat(&s);
    assert_eq!(b.len(), STAT_WIRE_LEN);
    assert_eq!(decode_stat(&b).unwrap(), s);
    // Layout pinned: st_size at 16, st_mode at 56, st_blksize at 72.
    assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 6);
    assert_eq!(u32::from_le_bytes(b[56..60].try_into().unwrap()), 0o100644);
    assert_eq!(u32::from_le_bytes(b[72..76].try_into().unwrap()), 7);
    assert!(decode_stat(&b[..87]).is_err());
    let mut bad = b;
    bad[58] = 1; // st_mode above 16 bits
    assert!(decode_stat(&bad).is_err());
}

#[test]
fn header_layout_is_pinned() {
    let b = Request::Read {
        handle: 0x11,
        offset: 0x22,
        len: 0x33,
    }
    .encode(0x44);
    assert_eq!(&b[0..4], b"VSRQ");
    assert_eq!(b[4], VERSION);
    assert_eq!(b[5], Opcode::Read as u8);
    assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 0x44);
    assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 0x11);
    assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 0x22);
    assert_eq!(u64::from_le_bytes(b[32..40].try_into().unwrap()), 0x33);
    let r = Reply::ok(Opcode::Fsize, 5, 0x66, vec![]).encode();
    assert_eq!(&r[0..4], b"VSRP");
    assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), 5);
    assert_eq!(u64::from_le_bytes(r[24..32].try_into().unwrap()), 0x66);
}

fn malformed(bytes: &[u8]) -> FrameError {
    match decode_request(bytes) {
        Err(DecodeError::Malformed(e)) => e,
        other => panic!("expected malformed, got {other:?}"),
    }
}

fn raw_header(op: u8, tag: u64, handle: u64, offset: u64, arg: u64, plen: u32) -> Vec<u8> {
    let mut b = vec![0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(b"VSRQ");
    b[4] = VERSION;
    b[5] = op;
    b[8..16].copy_from_slice(&tag.to_le_bytes());
    b[16..24].copy_from_slice(&handle.to_le_bytes());
    b[24..32].copy_from_slice(&offset.to_le_bytes());
    b[32..40].copy_from_slice(&arg.to_le_bytes());
    b[40..44].copy_from_slice(&plen.to_le_bytes());
    b
}

#[test]
fn strict_header_checks() {
    // Over the caps: refused from the header alone, tag known.
    let e = malformed(&raw_header(
        Opcode::Write as u8,
        7,
        1,
        0,
        0,
        MAX_PAYLOAD as u32 + 1,
    ));
    assert_eq!((e.tag, e.errno), (Some(7), EMSGSIZE));
    let e = malformed(&raw_header(Opcode::Write as u8, 7, 1, 0, 0, u32::MAX));
    assert_eq!(e.errno, EMSGSIZE);
    let e = malformed(&raw_header(
        Opcode::Read as u8,
        8,
        1,
        0,
        MAX_PAYLOAD as u64 + 1,
        0,
    ));
    assert_eq!((e.tag, e.errno), (Some(8), EMSGSIZE));
    let e = malformed(&raw_header(
        Opcode::Open as u8,
        9,
        0,
        0,
        0,
        MAX_PATH as u32 + 1,
    ));
    assert_eq!(e.errno, ENAMETOOLONG);
    let e = malformed(&raw_header(
        Opcode::Hello as u8,
        9,
        0,
        0,
        0,
        MAX_NAME as u32 + 1,
    ));
    assert_eq!(e.errno, EMSGSIZE);
    // Payload on an op without one.
    let e = malformed(&raw_header(Opcode::Fsync as u8, 10, 1, 0, 0, 1));
    assert_eq!(e.errno, EMSGSIZE);
    // Unused fields must be zero.
    let e = malformed(&raw_header(Opcode::Fsync as u8, 11, 1, 5, 0, 0));
    assert_eq!(e.errno, EPROTO);
    let e = malformed(&raw_header(Opcode::Open as u8, 11, 1, 0, 0, 0));
    assert_eq!(e.errno, EPROTO);
    // Unknown opcode, opcode 0.
    let e = malformed(&raw_header(77, 12, 0, 0, 0, 0));
    assert_eq!((e.tag, e.errno), (Some(12), ENOSYS));
    assert_eq!(malformed(&raw_header(0, 12, 0, 0, 0, 0)).errno, ENOSYS);
    // Bad magic, version, reserved fields.
    let mut b = raw_header(Opcode::Close as u8, 13, 1, 0, 0, 0);
    b[0] = b'X';
    assert_eq!(malformed(&b).errno, EPROTO);
    assert_eq!(malformed(&b[..20]).tag, Some(13));
    let mut b = raw_header(Opcode::Close as u8, 14, 1, 0, 0, 0);
    b[4] = 2;
    let e = malformed(&b);
    assert_eq!((e.tag, e.errno), (Some(14), EPROTONOSUPPORT));
    let mut b = raw_header(Opcode::Close as u8, 15, 1, 0, 0, 0);
    b[6] = 1;
    assert_eq!(malformed(&b).errno, EPROTO);
    let mut b = raw_header(Opcode::Close as u8, 15, 1, 0, 0, 0);
    b[47] = 1;
    assert_eq!(malformed(&b).errno, EPROTO);
    // Path not UTF-8.
    let mut b = raw_header(Opcode::Open as u8, 16, 0, 0, 0, 2);
    b.extend_from_slice(&[0xff, 0xfe]);
    assert_eq!(malformed(&b).errno, EPROTO);
}

#[test]
fn stream_read_refuses_huge_payload_before_allocating() {
    // Claims u32::MAX bytes: must fail at once from the header (no 4 GiB allocation).
    let b = raw_header(Opcode::Write as u8, 1, 1, 0, 0, u32::MAX);
    match read_request(&mut Cursor::new(b)) {
        Err(ReadError::Malformed(e)) => assert_eq!((e.tag, e.errno), (Some(1), EMSGSIZE)),
        other => panic!("{other:?}"),
    }
    // Truncated payload: malformed with the tag.
    let mut b = raw_header(Opcode::Write as u8, 2, 1, 0, 0, 100);
    b.extend_from_slice(&[0u8; 10]);
    match read_request(&mut Cursor::new(b)) {
        Err(ReadError::Malformed(e)) => assert_eq!(e.tag, Some(2)),
        other => panic!("{other:?}"),
    }
    // Truncated header after the tag, and before it.
    let b = raw_header(Opcode::Close as u8, 3, 1, 0, 0, 0);
    match read_request(&mut Cursor::new(&b[..20])) {
        Err(ReadError::Malformed(e)) => assert_eq!(e.tag, Some(3)),
        other => panic!("{other:?}"),
    }
    match read_request(&mut Cursor::new(&b[..10])) {
        Err(ReadError::Malformed(e)) => assert_eq!(e.tag, None),
        other => panic!("{other:?}"),
    }
    assert!(
        read_request(&mut Cursor::new(Vec::new()))
            .unwrap()
            .is_none()
    );
}

#[test]
fn reply_checks() {
    // An error reply must not carry a value or payload.
    let mut r = Reply::error(Some(Opcode::Read), 1, ENOENT);
    r.value = 5;
    assert!(matches!(
        decode_reply(&r.encode()),
        Err(DecodeError::Malformed(_))
    ));
    let mut r = Reply::error(Some(Opcode::Read), 1, ENOENT);
    r.payload = vec![1];
    assert!(matches!(
        decode_reply(&r.encode()),
        Err(DecodeError::Malformed(_))
    ));
    // Status must be an errno.
    let mut b = Reply::ok(Opcode::Close, 1, 0, vec![]).encode();
    b[16..20].copy_from_slice(&5000u32.to_le_bytes());
    assert!(matches!(decode_reply(&b), Err(DecodeError::Malformed(_))));
    // Success without an opcode.
    let mut b = Reply::ok(Opcode::Close, 1, 0, vec![]).encode();
    b[5] = 0;
    assert!(matches!(decode_reply(&b), Err(DecodeError::Malformed(_))));
    // Payload over the cap.
    let mut b = Reply::ok(Opcode::Read, 1, 0, vec![]).encode();
    b[20..24].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
    assert!(matches!(decode_reply(&b), Err(DecodeError::Malformed(_))));
    // errno_to_status clamps nonsense to EIO.
    assert_eq!(errno_to_status(-3), syscall::error::EIO as u32);
    assert_eq!(errno_to_status(0), syscall::error::EIO as u32);
    assert_eq!(errno_to_status(ENOENT), ENOENT as u32);
}

#[test]
fn every_prefix_is_incomplete_or_malformed_never_a_panic() {
    for (tag, req) in sample_requests() {
        let bytes = req.encode(tag);
        for cut in 0..bytes.len() {
            match decode_request(&bytes[..cut]) {
                Err(DecodeError::Incomplete { needed }) => assert!(needed > cut),
                other => panic!("prefix {cut} of {req:?}: {other:?}"),
            }
            assert!(read_request(&mut Cursor::new(&bytes[..cut])).is_err() || cut == 0);
        }
    }
    for reply in sample_replies() {
        let bytes = reply.encode();
        for cut in 0..bytes.len() {
            match decode_reply(&bytes[..cut]) {
                Err(DecodeError::Incomplete { needed }) => assert!(needed > cut),
                other => panic!("prefix {cut} of {reply:?}: {other:?}"),
            }
        }
    }
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn check_request_bytes(b: &[u8]) {
    match decode_request(b) {
        Ok((tag, req, used)) => {
            assert!(used <= b.len());
            // Canonical: re-encoding gives the same bytes.
            assert_eq!(req.encode(tag), &b[..used]);
        }
        Err(DecodeError::Incomplete { needed }) => assert!(needed > b.len()),
        Err(DecodeError::Malformed(e)) => assert!(e.errno > 0),
    }
    let _ = read_request(&mut Cursor::new(b));
}

fn check_reply_bytes(b: &[u8]) {
    match decode_reply(b) {
        Ok((r, used)) => {
            assert!(used <= b.len());
            assert_eq!(r.encode(), &b[..used]);
        }
        Err(DecodeError::Incomplete { needed }) => assert!(needed > b.len()),
        Err(DecodeError::Malformed(_)) => {}
    }
    let _ = read_reply(&mut Cursor::new(b));
    let _ = decode_stat(b);
}

#[test]
fn seeded_random_fuzz_never_panics() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let reqs: Vec<Vec<u8>> = sample_requests()
        .iter()
        .map(|(t, r)| r.encode(*t))
        .collect();
    let reps: Vec<Vec<u8>> = sample_replies().iter().map(Reply::encode).collect();
    for i in 0..200_000u32 {
        let mut b: Vec<u8> = match i % 3 {
            // Pure random bytes (magic fixed half of the time so the header checks run).
            0 => {
                let len = rng.below(120) as usize;
                let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                if rng.below(2) == 0 && b.len() >= 4 {
                    let m: &[u8; 4] = if rng.below(2) == 0 { b"VSRQ" } else { b"VSRP" };
                    b[..4].copy_from_slice(m);
                    if b.len() > 4 {
                        b[4] = VERSION;
                    }
                }
                b
            }
            // Mutated valid request.
            1 => reqs[rng.below(reqs.len() as u64) as usize].clone(),
            // Mutated valid reply.
            _ => reps[rng.below(reps.len() as u64) as usize].clone(),
        };
        if i % 3 != 0 && !b.is_empty() {
            for _ in 0..=rng.below(4) {
                let at = rng.below(b.len() as u64) as usize;
                b[at] = rng.next() as u8;
            }
            if rng.below(4) == 0 {
                let cut = rng.below(b.len() as u64 + 1) as usize;
                b.truncate(cut);
            }
        }
        check_request_bytes(&b);
        check_reply_bytes(&b);
    }
}

#[test]
fn errno_display_names() {
    let e = vscsi_ipc::ClientError::from_errno(ENOENT);
    assert_eq!(e.to_string(), "No such file or directory (ENOENT)");
    assert_eq!(e.errno(), Some(ENOENT));
}
