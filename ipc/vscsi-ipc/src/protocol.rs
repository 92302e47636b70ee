//! The wire protocol between block-scheme clients and the virtio-scsid socket server.
//!
//! Owns: frame layouts, opcodes, limits, and the strictly bounds-checked encoders and decoders
//! for requests and replies. It does no I/O beyond reading one frame from a `Read`.
//!
//! This comment is the public contract of the protocol (version 1).
//!
//! # Why hand-written and not serde
//! The layout is fixed and small, every field is checked against explicit bounds before anything
//! is allocated, and the same byte layout is meant to move into shared-memory rings later. A
//! hand-written codec keeps the layout visible in one place, is trivially fuzzable
//! ([`decode_request`], [`decode_reply`]) and cannot be talked into allocating a size chosen by
//! the peer.
//!
//! # Transport
//! A Unix stream socket. All integers are little-endian. Each direction is a sequence of frames:
//! a fixed header followed by `payload_len` payload bytes. There is no padding between frames.
//!
//! # Request frame (client → server): 48-byte header, then payload
//! ```text
//! off size field
//!  0   4   magic        "VSRQ" (0x56 0x53 0x52 0x51)
//!  4   1   version      1
//!  5   1   opcode       see below
//!  6   2   reserved     must be 0
//!  8   8   tag          chosen by the client, echoed in the reply
//! 16   8   handle       handle id from an Open reply (0 when unused)
//! 24   8   offset       byte offset for Read/Write/Discard/WriteZeroes (0 when unused)
//! 32   8   arg          Open: Redox O_* flags; Read: length (<= MAX_PAYLOAD);
//!                       Discard, WriteZeroes: length in bytes (any u64); else 0
//! 40   4   payload_len  Open: path bytes (<= MAX_PATH); Write: data (<= MAX_PAYLOAD);
//!                       Hello: client name (<= MAX_NAME); else 0
//! 44   4   reserved     must be 0
//! 48   ..  payload
//! ```
//! Fields an opcode does not use must be 0. Paths and names must be UTF-8.
//!
//! # Reply frame (server → client): 32-byte header, then payload
//! ```text
//! off size field
//!  0   4   magic        "VSRP" (0x56 0x53 0x52 0x50)
//!  4   1   version      1
//!  5   1   opcode       the request's opcode, or 0 if the request could not be decoded
//!  6   2   reserved     0
//!  8   8   tag          the request's tag
//! 16   4   status       0 = success, else a positive Redox errno (< 4096)
//! 20   4   payload_len  0 when status != 0; <= MAX_PAYLOAD
//! 24   8   value        see below (0 when status != 0)
//! 32   ..  payload
//! ```
//!
//! # Opcodes and replies
//! | op | name  | request                          | reply value          | reply payload          |
//! |----|-------|----------------------------------|----------------------|------------------------|
//! | 1  | Hello | payload: client name (optional)  | server MAX_PAYLOAD   | scheme name (UTF-8)    |
//! | 2  | Open  | arg: O_* flags; payload: path    | handle id            | —                      |
//! | 3  | Read  | handle, offset, arg: length      | bytes read           | the data (= value)     |
//! | 4  | Write | handle, offset; payload: data    | bytes written        | —                      |
//! | 5  | Fsync | handle                           | 0                    | —                      |
//! | 6  | Fstat | handle                           | 0                    | stat, [`STAT_WIRE_LEN`] bytes |
//! | 7  | Fsize | handle                           | size in bytes        | —                      |
//! | 8  | Fpath | handle                           | 0                    | path (UTF-8)           |
//! | 9  | Close | handle                           | 0                    | —                      |
//! | 10 | Stats | —                                | 0                    | driver counters (UTF-8 text) |
//! | 11 | ShmSetup | arg: arena bytes (0: default) | arena bytes          | [`crate::shm::ShmInfo`], 4 fds attached |
//! | 12 | Discard | handle, offset, arg: length     | 0                    | —                      |
//! | 13 | Identity | handle                         | capability bits      | identity, or empty     |
//! | 14 | WriteZeroes | handle, offset, arg: length  | bytes zeroed         | —                      |
//!
//! Discard takes whole blocks of the handle's disk or partition (offset and length multiples
//! of the block size, the range inside it; else `EINVAL`); `EOPNOTSUPP` when the disk cannot
//! discard, `EROFS` when it is read-only, `EBADF` without write access (see
//! `block_scheme::DiskScheme::discard`). WriteZeroes is a write of zero bytes at any offset
//! and length, with every rule of Write (short count across the end, `ENOSPC` at it).
//!
//! Identity works on any handle, `O_STAT` ones too. Its reply value holds capability bits
//! ([`CAP_DISCARD`]: Discard can work on this disk; other bits are 0 and a client must ignore
//! any it does not know). Its payload is empty when the device says nothing about itself (and
//! for the root), else the disk's identity, field by field ([`encode_identity`]):
//! ```text
//! off size field
//!  0   4   target        SCSI target id (u32)
//!  4   4   lun           logical unit number (u32)
//!  8   1   present       bit 0: serial present, bit 1: wwn present; other bits 0
//!  9   ..  five strings, each a u16 length then that many UTF-8 bytes (at most
//!          MAX_IDENTITY_STRING): vendor, product, revision, serial, wwn (an absent one: length 0)
//! ```
//! Nothing may follow the last string.
//!
//! ShmSetup starts the shared-memory transport for the connection (see [`crate::shm`]): the
//! reply frame carries the ring, arena and two doorbell descriptors (SCM_RIGHTS, attached to
//! its first byte). A server without arenas replies `EOPNOTSUPP`; a second ShmSetup on one
//! connection gets `EEXIST`; no arena available gets `ENOMEM` (or the provider's errno).
//!
//! The Open path is the path inside the scheme (`""`, `"/"`, `"/0"`, `"0p1"`); the client library
//! strips a `disk.virtio-scsi:` prefix after checking it against the scheme name from Hello.
//!
//! Stat payload (88 bytes, field by field, never a memory image): `st_dev` u64, `st_ino` u64,
//! `st_size` u64, `st_blocks` u64, `st_mtime` u64, `st_atime` u64, `st_ctime` u64, then `st_mode`
//! (u16 widened to u32), `st_nlink` u32, `st_uid` u32, `st_gid` u32, `st_blksize` u32,
//! `st_mtime_nsec` u32, `st_atime_nsec` u32, `st_ctime_nsec` u32.
//!
//! # Session rules
//! - The first request on a connection must be Hello, and only the first. Its header carries the
//!   client's protocol version; a server that does not speak it replies `EPROTONOSUPPORT` and
//!   closes. The Hello reply tells the scheme name and the server's payload cap.
//! - After Hello, any number of requests may be in flight, each with its own tag; replies come
//!   in any order. Tags should be unique among a connection's requests in flight (the server
//!   does not check; a client that reuses a tag cannot tell the replies apart).
//! - Handles belong to the connection that opened them; another connection's handle id gets
//!   `EBADF`. When a connection closes, the server closes all handles it still has open.
//! - The server stops reading a connection that has too many requests (or bytes) in flight until
//!   replies have been written (backpressure, not an error).
//! - A frame that breaks any rule above (bad magic, version, reserved field, opcode, size,
//!   UTF-8, request before Hello, ...) gets an error reply with status `EPROTO`, `EMSGSIZE`,
//!   `ENAMETOOLONG`, `ENOSYS` or `EPROTONOSUPPORT` if its tag could be read (the first 16 bytes
//!   arrived), and then the server closes the connection. Other connections are not affected.
//! - Reads and writes larger than the payload cap are split by the client library.

use std::fmt;
use std::io::{self, Read};

use block_scheme::DiskIdentity;
use syscall::data::Stat;
use syscall::error::{EMSGSIZE, ENAMETOOLONG, ENOSYS, EPROTO, EPROTONOSUPPORT};

/// Magic of a request frame, "VSRQ".
pub const REQUEST_MAGIC: [u8; 4] = *b"VSRQ";
/// Magic of a reply frame, "VSRP".
pub const REPLY_MAGIC: [u8; 4] = *b"VSRP";
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Size of a request header in bytes.
pub const REQUEST_HEADER_LEN: usize = 48;
/// Size of a reply header in bytes.
pub const REPLY_HEADER_LEN: usize = 32;
/// Largest payload of any frame (16 MiB): the most data one Read or Write moves.
pub const MAX_PAYLOAD: usize = 16 << 20;
/// Largest Open path and Fpath reply, in bytes.
pub const MAX_PATH: usize = 4096;
/// Largest Hello name (client name in the request, scheme name in the reply), in bytes.
pub const MAX_NAME: usize = 256;
/// Size of an encoded stat in bytes.
pub const STAT_WIRE_LEN: usize = 88;
/// Statuses at or above this are not errno values.
pub const MAX_ERRNO: u32 = 4096;
/// Identity reply value bit: the disk can discard (a Discard request can work).
pub const CAP_DISCARD: u64 = 1;
/// Longest string of an identity payload, in bytes (longer ones are cut, at a character
/// boundary, by the encoder).
pub const MAX_IDENTITY_STRING: usize = 1024;
/// Largest identity payload: the fixed part and five strings at their longest.
pub const MAX_IDENTITY_LEN: usize = 9 + 5 * (2 + MAX_IDENTITY_STRING);

/// The operation a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Version handshake; must be first.
    Hello = 1,
    /// Open a path in the scheme.
    Open = 2,
    /// Read at an offset.
    Read = 3,
    /// Write at an offset.
    Write = 4,
    /// Flush to stable storage.
    Fsync = 5,
    /// Stat a handle.
    Fstat = 6,
    /// Size of a handle in bytes.
    Fsize = 7,
    /// Canonical path of a handle.
    Fpath = 8,
    /// Close a handle.
    Close = 9,
    /// Driver counters.
    Stats = 10,
    /// Start the shared-memory transport.
    ShmSetup = 11,
    /// Discard whole blocks.
    Discard = 12,
    /// Identity and capabilities of a handle's disk.
    Identity = 13,
    /// Write zero bytes.
    WriteZeroes = 14,
}

impl Opcode {
    /// The opcode for a wire byte, if it is one.
    pub fn from_u8(b: u8) -> Option<Opcode> {
        Some(match b {
            1 => Opcode::Hello,
            2 => Opcode::Open,
            3 => Opcode::Read,
            4 => Opcode::Write,
            5 => Opcode::Fsync,
            6 => Opcode::Fstat,
            7 => Opcode::Fsize,
            8 => Opcode::Fpath,
            9 => Opcode::Close,
            10 => Opcode::Stats,
            11 => Opcode::ShmSetup,
            12 => Opcode::Discard,
            13 => Opcode::Identity,
            14 => Opcode::WriteZeroes,
            _ => return None,
        })
    }

    /// Lower-case name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::Hello => "hello",
            Opcode::Open => "open",
            Opcode::Read => "read",
            Opcode::Write => "write",
            Opcode::Fsync => "fsync",
            Opcode::Fstat => "fstat",
            Opcode::Fsize => "fsize",
            Opcode::Fpath => "fpath",
            Opcode::Close => "close",
            Opcode::Stats => "stats",
            Opcode::ShmSetup => "shm-setup",
            Opcode::Discard => "discard",
            Opcode::Identity => "identity",
            Opcode::WriteZeroes => "write-zeroes",
        }
    }
}

/// A decoded request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Handshake; `client` is a free-form name for logs (may be empty).
    Hello { client: String },
    /// Open `path` (inside the scheme) with Redox `O_*` flags.
    Open { path: String, flags: u64 },
    /// Read `len` bytes at `offset`.
    Read { handle: u64, offset: u64, len: u32 },
    /// Write `data` at `offset`.
    Write {
        handle: u64,
        offset: u64,
        data: Vec<u8>,
    },
    /// Flush.
    Fsync { handle: u64 },
    /// Stat.
    Fstat { handle: u64 },
    /// Size in bytes.
    Fsize { handle: u64 },
    /// Canonical path.
    Fpath { handle: u64 },
    /// Close.
    Close { handle: u64 },
    /// Driver counters.
    Stats,
    /// Start the shared-memory transport with an arena of `arena_bytes` (0: server default).
    ShmSetup { arena_bytes: u64 },
    /// Discard `len` bytes (whole blocks) at `offset`.
    Discard { handle: u64, offset: u64, len: u64 },
    /// Identity and capabilities.
    Identity { handle: u64 },
    /// Write `len` zero bytes at `offset`.
    WriteZeroes { handle: u64, offset: u64, len: u64 },
}

impl Request {
    /// This request's opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Hello { .. } => Opcode::Hello,
            Request::Open { .. } => Opcode::Open,
            Request::Read { .. } => Opcode::Read,
            Request::Write { .. } => Opcode::Write,
            Request::Fsync { .. } => Opcode::Fsync,
            Request::Fstat { .. } => Opcode::Fstat,
            Request::Fsize { .. } => Opcode::Fsize,
            Request::Fpath { .. } => Opcode::Fpath,
            Request::Close { .. } => Opcode::Close,
            Request::Stats => Opcode::Stats,
            Request::ShmSetup { .. } => Opcode::ShmSetup,
            Request::Discard { .. } => Opcode::Discard,
            Request::Identity { .. } => Opcode::Identity,
            Request::WriteZeroes { .. } => Opcode::WriteZeroes,
        }
    }

    /// The payload bytes this request carries.
    pub fn payload(&self) -> &[u8] {
        match self {
            Request::Hello { client } => client.as_bytes(),
            Request::Open { path, .. } => path.as_bytes(),
            Request::Write { data, .. } => data,
            _ => &[],
        }
    }

    /// The header for this request with `tag`. Panics never; payload sizes above the limits
    /// produce a header the server will refuse (the client library never builds those).
    pub fn header(&self, tag: u64) -> RequestHeader {
        let (handle, offset, arg) = match *self {
            Request::Hello { .. } | Request::Stats => (0, 0, 0),
            Request::Open { flags, .. } => (0, 0, flags),
            Request::ShmSetup { arena_bytes } => (0, 0, arena_bytes),
            Request::Read {
                handle,
                offset,
                len,
            } => (handle, offset, u64::from(len)),
            Request::Write { handle, offset, .. } => (handle, offset, 0),
            Request::Discard {
                handle,
                offset,
                len,
            }
            | Request::WriteZeroes {
                handle,
                offset,
                len,
            } => (handle, offset, len),
            Request::Fsync { handle }
            | Request::Identity { handle }
            | Request::Fstat { handle }
            | Request::Fsize { handle }
            | Request::Fpath { handle }
            | Request::Close { handle } => (handle, 0, 0),
        };
        RequestHeader {
            version: VERSION,
            op: self.opcode(),
            tag,
            handle,
            offset,
            arg,
            payload_len: u32::try_from(self.payload().len()).unwrap_or(u32::MAX),
        }
    }

    /// Encodes the whole frame (header and payload) into one buffer.
    pub fn encode(&self, tag: u64) -> Vec<u8> {
        let payload = self.payload();
        let mut out = Vec::with_capacity(REQUEST_HEADER_LEN + payload.len());
        out.extend_from_slice(&self.header(tag).encode());
        out.extend_from_slice(payload);
        out
    }
}

/// Why a frame was refused, with what the server (or client) knows about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameError {
    /// The frame's tag, if its first 16 bytes could be read.
    pub tag: Option<u64>,
    /// The frame's opcode, if it was a valid one.
    pub op: Option<Opcode>,
    /// The errno to report (EPROTO, EMSGSIZE, ENAMETOOLONG, ENOSYS, EPROTONOSUPPORT).
    pub errno: i32,
    /// What was wrong, for logs.
    pub reason: String,
}

impl FrameError {
    fn new(tag: Option<u64>, op: Option<Opcode>, errno: i32, reason: impl Into<String>) -> Self {
        FrameError {
            tag,
            op,
            errno,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed frame: {}", self.reason)?;
        if let Some(tag) = self.tag {
            write!(f, " (tag {tag})")?;
        }
        Ok(())
    }
}

impl std::error::Error for FrameError {}

/// Result of decoding from a byte buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The buffer holds a valid prefix; at least `needed` bytes in total are required.
    Incomplete {
        /// Total bytes needed from the start of the buffer.
        needed: usize,
    },
    /// The bytes can never become a valid frame.
    Malformed(FrameError),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Incomplete { needed } => {
                write!(f, "incomplete frame: need {needed} bytes")
            }
            DecodeError::Malformed(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Error from reading one frame from a stream.
#[derive(Debug)]
pub enum ReadError {
    /// The stream failed (not a clean end of stream).
    Io(io::Error),
    /// The frame was malformed or cut short by the end of the stream.
    Malformed(FrameError),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "read failed: {e}"),
            ReadError::Malformed(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ReadError {}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// The tag of a frame whose first 16 bytes are in `b` (same offset in both directions).
pub fn peek_tag(b: &[u8]) -> Option<u64> {
    if b.len() >= 16 {
        Some(le_u64(b, 8))
    } else {
        None
    }
}

/// A request header, decoded and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Protocol version of the sender.
    pub version: u8,
    /// Operation.
    pub op: Opcode,
    /// Client-chosen tag.
    pub tag: u64,
    /// Handle id (0 when unused).
    pub handle: u64,
    /// Byte offset (0 when unused).
    pub offset: u64,
    /// Open flags, Read/Discard/WriteZeroes length, ShmSetup arena bytes (0 when unused).
    pub arg: u64,
    /// Payload bytes following the header.
    pub payload_len: u32,
}

impl RequestHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC);
        b[4] = self.version;
        b[5] = self.op as u8;
        b[8..16].copy_from_slice(&self.tag.to_le_bytes());
        b[16..24].copy_from_slice(&self.handle.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.arg.to_le_bytes());
        b[40..44].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    /// Decodes and checks a header: magic, version, reserved fields, opcode, and every size
    /// against its cap, so that allocating `payload_len` afterwards is safe.
    pub fn parse(b: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, FrameError> {
        let tag = Some(le_u64(b, 8));
        if b[0..4] != REQUEST_MAGIC {
            return Err(FrameError::new(tag, None, EPROTO, "bad request magic"));
        }
        let op = Opcode::from_u8(b[5]);
        let version = b[4];
        if version != VERSION {
            return Err(FrameError::new(
                tag,
                op,
                EPROTONOSUPPORT,
                format!("protocol version {version} not supported (server speaks {VERSION})"),
            ));
        }
        let Some(op) = op else {
            return Err(FrameError::new(
                tag,
                None,
                ENOSYS,
                format!("unknown opcode {}", b[5]),
            ));
        };
        if le_u16(b, 6) != 0 || le_u32(b, 44) != 0 {
            return Err(FrameError::new(
                tag,
                Some(op),
                EPROTO,
                "reserved field not zero",
            ));
        }
        let h = RequestHeader {
            version,
            op,
            tag: le_u64(b, 8),
            handle: le_u64(b, 16),
            offset: le_u64(b, 24),
            arg: le_u64(b, 32),
            payload_len: le_u32(b, 40),
        };
        h.check()?;
        Ok(h)
    }

    fn check(&self) -> Result<(), FrameError> {
        let err = |errno, reason: String| {
            Err(FrameError::new(
                Some(self.tag),
                Some(self.op),
                errno,
                reason,
            ))
        };
        let plen = self.payload_len as usize;
        // (uses handle, uses offset, uses arg, payload cap)
        let (uses_handle, uses_offset, uses_arg, cap, cap_errno) = match self.op {
            Opcode::Hello => (false, false, false, MAX_NAME, EMSGSIZE),
            Opcode::Open => (false, false, true, MAX_PATH, ENAMETOOLONG),
            Opcode::Read => (true, true, true, 0, EMSGSIZE),
            Opcode::Write => (true, true, false, MAX_PAYLOAD, EMSGSIZE),
            Opcode::Fsync
            | Opcode::Fstat
            | Opcode::Fsize
            | Opcode::Fpath
            | Opcode::Close
            | Opcode::Identity => (true, false, false, 0, EMSGSIZE),
            Opcode::Discard | Opcode::WriteZeroes => (true, true, true, 0, EMSGSIZE),
            Opcode::Stats => (false, false, false, 0, EMSGSIZE),
            Opcode::ShmSetup => (false, false, true, 0, EMSGSIZE),
        };
        if plen > cap {
            return err(
                cap_errno,
                format!(
                    "{} payload of {plen} bytes exceeds the limit of {cap}",
                    self.op.name()
                ),
            );
        }
        if (!uses_handle && self.handle != 0)
            || (!uses_offset && self.offset != 0)
            || (!uses_arg && self.arg != 0)
        {
            return err(
                EPROTO,
                format!("{} request has a non-zero unused field", self.op.name()),
            );
        }
        if self.op == Opcode::Read && self.arg > MAX_PAYLOAD as u64 {
            return err(
                EMSGSIZE,
                format!(
                    "read length {} exceeds the limit of {MAX_PAYLOAD}",
                    self.arg
                ),
            );
        }
        Ok(())
    }

    /// Builds the request from this header and its payload (`payload.len()` must equal
    /// `payload_len`; checked).
    pub fn into_request(self, payload: Vec<u8>) -> Result<Request, FrameError> {
        let tag = Some(self.tag);
        if payload.len() != self.payload_len as usize {
            return Err(FrameError::new(
                tag,
                Some(self.op),
                EPROTO,
                "payload length mismatch",
            ));
        }
        let utf8 = |p: Vec<u8>, what: &str| {
            String::from_utf8(p).map_err(|_| {
                FrameError::new(tag, Some(self.op), EPROTO, format!("{what} is not UTF-8"))
            })
        };
        let h = self.handle;
        Ok(match self.op {
            Opcode::Hello => Request::Hello {
                client: utf8(payload, "client name")?,
            },
            Opcode::Open => Request::Open {
                path: utf8(payload, "path")?,
                flags: self.arg,
            },
            Opcode::Read => Request::Read {
                handle: h,
                offset: self.offset,
                // check() bounded arg by MAX_PAYLOAD, which fits in u32.
                len: u32::try_from(self.arg).map_err(|_| {
                    FrameError::new(tag, Some(self.op), EMSGSIZE, "read length too large")
                })?,
            },
            Opcode::Write => Request::Write {
                handle: h,
                offset: self.offset,
                data: payload,
            },
            Opcode::Fsync => Request::Fsync { handle: h },
            Opcode::Fstat => Request::Fstat { handle: h },
            Opcode::Fsize => Request::Fsize { handle: h },
            Opcode::Fpath => Request::Fpath { handle: h },
            Opcode::Close => Request::Close { handle: h },
            Opcode::Stats => Request::Stats,
            Opcode::ShmSetup => Request::ShmSetup {
                arena_bytes: self.arg,
            },
            Opcode::Discard => Request::Discard {
                handle: h,
                offset: self.offset,
                len: self.arg,
            },
            Opcode::Identity => Request::Identity { handle: h },
            Opcode::WriteZeroes => Request::WriteZeroes {
                handle: h,
                offset: self.offset,
                len: self.arg,
            },
        })
    }
}

/// Decodes one request frame from the start of `buf`; returns it with its tag and the number
/// of bytes it used. Never panics, never allocates more than the checked payload length.
pub fn decode_request(buf: &[u8]) -> Result<(u64, Request, usize), DecodeError> {
    let Some(hb) = buf.get(..REQUEST_HEADER_LEN) else {
        // Check what we can of a prefix so garbage is refused early.
        if buf.len() >= 4 && buf[0..4] != REQUEST_MAGIC {
            return Err(DecodeError::Malformed(FrameError::new(
                peek_tag(buf),
                None,
                EPROTO,
                "bad request magic",
            )));
        }
        return Err(DecodeError::Incomplete {
            needed: REQUEST_HEADER_LEN,
        });
    };
    let mut arr = [0u8; REQUEST_HEADER_LEN];
    arr.copy_from_slice(hb);
    let h = RequestHeader::parse(&arr).map_err(DecodeError::Malformed)?;
    let total = REQUEST_HEADER_LEN + h.payload_len as usize;
    let Some(p) = buf.get(REQUEST_HEADER_LEN..total) else {
        return Err(DecodeError::Incomplete { needed: total });
    };
    let req = h.into_request(p.to_vec()).map_err(DecodeError::Malformed)?;
    Ok((h.tag, req, total))
}

/// Reads into `buf` until it is full or the stream ends; returns the bytes read (retrying
/// `EINTR`). Shared by the server, the CLI and the NBD gateway.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads one request frame from a stream. `Ok(None)` is a clean end of stream between frames.
/// The payload is allocated only after the header passed all its checks.
pub fn read_request(r: &mut impl Read) -> Result<Option<(u64, Request)>, ReadError> {
    let mut hb = [0u8; REQUEST_HEADER_LEN];
    let got = read_full(r, &mut hb).map_err(ReadError::Io)?;
    if got == 0 {
        return Ok(None);
    }
    if got < REQUEST_HEADER_LEN {
        return Err(ReadError::Malformed(FrameError::new(
            peek_tag(&hb[..got]),
            None,
            EPROTO,
            format!("stream ended inside a request header ({got} of {REQUEST_HEADER_LEN} bytes)"),
        )));
    }
    let h = RequestHeader::parse(&hb).map_err(ReadError::Malformed)?;
    let mut payload = vec![0u8; h.payload_len as usize];
    let got = read_full(r, &mut payload).map_err(ReadError::Io)?;
    if got < payload.len() {
        return Err(ReadError::Malformed(FrameError::new(
            Some(h.tag),
            Some(h.op),
            EPROTO,
            format!(
                "stream ended inside a request payload ({got} of {} bytes)",
                payload.len()
            ),
        )));
    }
    let req = h.into_request(payload).map_err(ReadError::Malformed)?;
    Ok(Some((h.tag, req)))
}

/// A reply header, decoded and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyHeader {
    /// The request's opcode, or `None` (wire 0) for a request that could not be decoded.
    pub op: Option<Opcode>,
    /// The request's tag.
    pub tag: u64,
    /// 0 or a positive errno.
    pub status: u32,
    /// Handle id, byte count, size, or 0.
    pub value: u64,
    /// Payload bytes following the header.
    pub payload_len: u32,
}

impl ReplyHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; REPLY_HEADER_LEN] {
        let mut b = [0u8; REPLY_HEADER_LEN];
        b[0..4].copy_from_slice(&REPLY_MAGIC);
        b[4] = VERSION;
        b[5] = self.op.map_or(0, |o| o as u8);
        b[8..16].copy_from_slice(&self.tag.to_le_bytes());
        b[16..20].copy_from_slice(&self.status.to_le_bytes());
        b[20..24].copy_from_slice(&self.payload_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    /// Decodes and checks a reply header (magic, version, reserved, opcode, status range,
    /// payload cap, and "errors carry nothing").
    pub fn parse(b: &[u8; REPLY_HEADER_LEN]) -> Result<ReplyHeader, FrameError> {
        let tag = Some(le_u64(b, 8));
        if b[0..4] != REPLY_MAGIC {
            return Err(FrameError::new(tag, None, EPROTO, "bad reply magic"));
        }
        if b[4] != VERSION {
            return Err(FrameError::new(
                tag,
                None,
                EPROTONOSUPPORT,
                format!("reply has protocol version {} (expected {VERSION})", b[4]),
            ));
        }
        let op = match b[5] {
            0 => None,
            x => match Opcode::from_u8(x) {
                Some(op) => Some(op),
                None => {
                    return Err(FrameError::new(
                        tag,
                        None,
                        EPROTO,
                        format!("reply has unknown opcode {x}"),
                    ));
                }
            },
        };
        if le_u16(b, 6) != 0 {
            return Err(FrameError::new(tag, op, EPROTO, "reserved field not zero"));
        }
        let h = ReplyHeader {
            op,
            tag: le_u64(b, 8),
            status: le_u32(b, 16),
            payload_len: le_u32(b, 20),
            value: le_u64(b, 24),
        };
        if h.status >= MAX_ERRNO {
            return Err(FrameError::new(
                tag,
                op,
                EPROTO,
                format!("reply status {} is not an errno", h.status),
            ));
        }
        if h.status != 0 && (h.payload_len != 0 || h.value != 0) {
            return Err(FrameError::new(
                tag,
                op,
                EPROTO,
                "error reply carries a value or payload",
            ));
        }
        if h.status == 0 && op.is_none() {
            return Err(FrameError::new(
                tag,
                op,
                EPROTO,
                "success reply without an opcode",
            ));
        }
        if h.payload_len as usize > MAX_PAYLOAD {
            return Err(FrameError::new(
                tag,
                op,
                EMSGSIZE,
                format!("reply payload of {} bytes exceeds the limit", h.payload_len),
            ));
        }
        Ok(h)
    }
}

/// A decoded reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The request's opcode (`None` for a reply to an undecodable request).
    pub op: Option<Opcode>,
    /// The request's tag.
    pub tag: u64,
    /// 0 or a positive errno.
    pub status: u32,
    /// Handle id, byte count, size, or 0.
    pub value: u64,
    /// Read data, stat bytes, path or scheme name.
    pub payload: Vec<u8>,
}

impl Reply {
    /// A successful reply.
    pub fn ok(op: Opcode, tag: u64, value: u64, payload: Vec<u8>) -> Reply {
        Reply {
            op: Some(op),
            tag,
            status: 0,
            value,
            payload,
        }
    }

    /// An error reply.
    pub fn error(op: Option<Opcode>, tag: u64, errno: i32) -> Reply {
        Reply {
            op,
            tag,
            status: errno_to_status(errno),
            value: 0,
            payload: Vec::new(),
        }
    }

    /// The header of this reply.
    pub fn header(&self) -> ReplyHeader {
        ReplyHeader {
            op: self.op,
            tag: self.tag,
            status: self.status,
            value: self.value,
            payload_len: u32::try_from(self.payload.len()).unwrap_or(u32::MAX),
        }
    }

    /// Encodes the whole frame into one buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(REPLY_HEADER_LEN + self.payload.len());
        out.extend_from_slice(&self.header().encode());
        out.extend_from_slice(&self.payload);
        out
    }
}

/// Maps an errno to a wire status: positive and below [`MAX_ERRNO`]; anything else becomes EIO.
pub fn errno_to_status(errno: i32) -> u32 {
    match u32::try_from(errno) {
        Ok(s) if s > 0 && s < MAX_ERRNO => s,
        _ => syscall::error::EIO as u32,
    }
}

/// Decodes one reply frame from the start of `buf`; returns it and the bytes it used.
pub fn decode_reply(buf: &[u8]) -> Result<(Reply, usize), DecodeError> {
    let Some(hb) = buf.get(..REPLY_HEADER_LEN) else {
        if buf.len() >= 4 && buf[0..4] != REPLY_MAGIC {
            return Err(DecodeError::Malformed(FrameError::new(
                peek_tag(buf),
                None,
                EPROTO,
                "bad reply magic",
            )));
        }
        return Err(DecodeError::Incomplete {
            needed: REPLY_HEADER_LEN,
        });
    };
    let mut arr = [0u8; REPLY_HEADER_LEN];
    arr.copy_from_slice(hb);
    let h = ReplyHeader::parse(&arr).map_err(DecodeError::Malformed)?;
    let total = REPLY_HEADER_LEN + h.payload_len as usize;
    let Some(p) = buf.get(REPLY_HEADER_LEN..total) else {
        return Err(DecodeError::Incomplete { needed: total });
    };
    Ok((
        Reply {
            op: h.op,
            tag: h.tag,
            status: h.status,
            value: h.value,
            payload: p.to_vec(),
        },
        total,
    ))
}

/// Reads one reply frame from a stream. `Ok(None)` is a clean end of stream between frames.
pub fn read_reply(r: &mut impl Read) -> Result<Option<Reply>, ReadError> {
    let mut hb = [0u8; REPLY_HEADER_LEN];
    let got = read_full(r, &mut hb).map_err(ReadError::Io)?;
    if got == 0 {
        return Ok(None);
    }
    if got < REPLY_HEADER_LEN {
        return Err(ReadError::Malformed(FrameError::new(
            peek_tag(&hb[..got]),
            None,
            EPROTO,
            format!("stream ended inside a reply header ({got} of {REPLY_HEADER_LEN} bytes)"),
        )));
    }
    let h = ReplyHeader::parse(&hb).map_err(ReadError::Malformed)?;
    let mut payload = vec![0u8; h.payload_len as usize];
    let got = read_full(r, &mut payload).map_err(ReadError::Io)?;
    if got < payload.len() {
        return Err(ReadError::Malformed(FrameError::new(
            Some(h.tag),
            h.op,
            EPROTO,
            format!(
                "stream ended inside a reply payload ({got} of {} bytes)",
                payload.len()
            ),
        )));
    }
    Ok(Some(Reply {
        op: h.op,
        tag: h.tag,
        status: h.status,
        value: h.value,
        payload,
    }))
}

/// Encodes a stat field by field (see the module comment for the order).
pub fn encode_stat(s: &Stat) -> [u8; STAT_WIRE_LEN] {
    let mut b = [0u8; STAT_WIRE_LEN];
    let u64s = [
        s.st_dev,
        s.st_ino,
        s.st_size,
        s.st_blocks,
        s.st_mtime,
        s.st_atime,
        s.st_ctime,
    ];
    let u32s = [
        u32::from(s.st_mode),
        s.st_nlink,
        s.st_uid,
        s.st_gid,
        s.st_blksize,
        s.st_mtime_nsec,
        s.st_atime_nsec,
        s.st_ctime_nsec,
    ];
    let mut at = 0;
    for v in u64s {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        at += 8;
    }
    for v in u32s {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        at += 4;
    }
    b
}

/// Decodes a stat; the input must be exactly [`STAT_WIRE_LEN`] bytes and `st_mode` must fit 16 bits.
pub fn decode_stat(b: &[u8]) -> Result<Stat, FrameError> {
    if b.len() != STAT_WIRE_LEN {
        return Err(FrameError::new(
            None,
            Some(Opcode::Fstat),
            EPROTO,
            format!(
                "stat payload is {} bytes, expected {STAT_WIRE_LEN}",
                b.len()
            ),
        ));
    }
    let mode = u16::try_from(le_u32(b, 56)).map_err(|_| {
        FrameError::new(
            None,
            Some(Opcode::Fstat),
            EPROTO,
            "st_mode does not fit 16 bits",
        )
    })?;
    Ok(Stat {
        st_dev: le_u64(b, 0),
        st_ino: le_u64(b, 8),
        st_size: le_u64(b, 16),
        st_blocks: le_u64(b, 24),
        st_mtime: le_u64(b, 32),
        st_atime: le_u64(b, 40),
        st_ctime: le_u64(b, 48),
        st_mode: mode,
        st_nlink: le_u32(b, 60),
        st_uid: le_u32(b, 64),
        st_gid: le_u32(b, 68),
        st_blksize: le_u32(b, 72),
        st_mtime_nsec: le_u32(b, 76),
        st_atime_nsec: le_u32(b, 80),
        st_ctime_nsec: le_u32(b, 84),
    })
}

/// `s` cut to at most [`MAX_IDENTITY_STRING`] bytes, at a character boundary.
fn identity_str(s: &str) -> &str {
    if s.len() <= MAX_IDENTITY_STRING {
        return s;
    }
    let mut end = MAX_IDENTITY_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Encodes an identity payload (see the module comment). Strings longer than
/// [`MAX_IDENTITY_STRING`] bytes are cut at a character boundary; the result is at most
/// [`MAX_IDENTITY_LEN`] bytes.
pub fn encode_identity(id: &DiskIdentity) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&id.target.to_le_bytes());
    b.extend_from_slice(&id.lun.to_le_bytes());
    b.push(u8::from(id.serial.is_some()) | u8::from(id.wwn.is_some()) << 1);
    for s in [
        id.vendor.as_str(),
        id.product.as_str(),
        id.revision.as_str(),
        id.serial.as_deref().unwrap_or(""),
        id.wwn.as_deref().unwrap_or(""),
    ] {
        let s = identity_str(s);
        // At most MAX_IDENTITY_STRING bytes, which fits in u16.
        b.extend_from_slice(&(s.len() as u16).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    }
    b
}

/// Decodes an identity payload, checking every field: the lengths against the payload and
/// [`MAX_IDENTITY_STRING`], UTF-8, the presence bits (unknown bits, or an absent string that
/// is not empty, are errors), and that nothing follows the last string.
pub fn decode_identity(b: &[u8]) -> Result<DiskIdentity, FrameError> {
    let bad = |why: String| FrameError::new(None, Some(Opcode::Identity), EPROTO, why);
    if b.len() > MAX_IDENTITY_LEN {
        return Err(bad(format!("identity payload of {} bytes", b.len())));
    }
    let Some(&present) = b.get(8) else {
        return Err(bad(format!("identity payload of {} bytes", b.len())));
    };
    if present & !0b11 != 0 {
        return Err(bad(format!("identity presence bits {present:#x}")));
    }
    let mut at = 9usize;
    let mut strings: Vec<String> = Vec::with_capacity(5);
    for name in ["vendor", "product", "revision", "serial", "wwn"] {
        if b.len() < at + 2 {
            return Err(bad(format!("identity ends before its {name}")));
        }
        let len = usize::from(le_u16(b, at));
        at += 2;
        if len > MAX_IDENTITY_STRING {
            return Err(bad(format!("identity {name} of {len} bytes")));
        }
        let Some(bytes) = b.get(at..at + len) else {
            return Err(bad(format!("identity ends inside its {name}")));
        };
        at += len;
        let s =
            std::str::from_utf8(bytes).map_err(|_| bad(format!("identity {name} is not UTF-8")))?;
        strings.push(s.to_owned());
    }
    if at != b.len() {
        return Err(bad(format!(
            "{} bytes after the identity's last string",
            b.len() - at
        )));
    }
    let (has_serial, has_wwn) = (present & 1 != 0, present & 2 != 0);
    let mut it = strings.into_iter();
    let mut next = || it.next().unwrap_or_default();
    let (vendor, product, revision, serial, wwn) = (next(), next(), next(), next(), next());
    if (!has_serial && !serial.is_empty()) || (!has_wwn && !wwn.is_empty()) {
        return Err(bad("identity has a string marked absent".into()));
    }
    Ok(DiskIdentity {
        vendor,
        product,
        revision,
        serial: has_serial.then_some(serial),
        wwn: has_wwn.then_some(wwn),
        target: le_u32(b, 0),
        lun: le_u32(b, 4),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> DiskIdentity {
        DiskIdentity {
            vendor: "QEMU".into(),
            product: "QEMU HARDDISK".into(),
            revision: "2.5+".into(),
            serial: Some("SER-42".into()),
            wwn: Some("0x5000c500a1b2c3d4".into()),
            target: 3,
            lun: 7,
        }
    }

    #[test]
    fn new_requests_round_trip_and_use_only_their_fields() {
        for (tag, req) in [
            (
                1u64,
                Request::Discard {
                    handle: 5,
                    offset: 4096,
                    len: u64::MAX,
                },
            ),
            (2, Request::Identity { handle: 9 }),
            (
                3,
                Request::WriteZeroes {
                    handle: 1,
                    offset: 7,
                    len: 1 << 40,
                },
            ),
        ] {
            let bytes = req.encode(tag);
            assert_eq!(bytes.len(), REQUEST_HEADER_LEN, "no payload");
            let (t, r, used) = decode_request(&bytes).unwrap();
            assert_eq!((t, r, used), (tag, req.clone(), bytes.len()));
            // A payload, or a non-zero field the opcode does not use, is refused.
            let mut with_payload = bytes.clone();
            with_payload[40] = 1;
            with_payload.push(0);
            let Err(DecodeError::Malformed(e)) = decode_request(&with_payload) else {
                panic!("{req:?} with a payload was accepted");
            };
            assert_eq!(e.errno, EMSGSIZE);
            if let Request::Identity { .. } = req {
                let mut b = bytes.clone();
                b[24] = 1; // offset
                let Err(DecodeError::Malformed(e)) = decode_request(&b) else {
                    panic!("identity with an offset was accepted");
                };
                assert_eq!(e.errno, EPROTO);
            }
        }
        assert_eq!(Opcode::from_u8(12), Some(Opcode::Discard));
        assert_eq!(Opcode::from_u8(13), Some(Opcode::Identity));
        assert_eq!(Opcode::from_u8(14), Some(Opcode::WriteZeroes));
        assert_eq!(Opcode::from_u8(15), None);
    }

    #[test]
    fn identity_round_trips() {
        let full = identity();
        assert_eq!(decode_identity(&encode_identity(&full)), Ok(full.clone()));
        let bare = DiskIdentity {
            serial: None,
            wwn: None,
            ..full.clone()
        };
        assert_eq!(decode_identity(&encode_identity(&bare)), Ok(bare));
        // An empty serial is not an absent one.
        let empty = DiskIdentity {
            serial: Some(String::new()),
            ..full
        };
        assert_eq!(decode_identity(&encode_identity(&empty)), Ok(empty));
        // Long strings are cut at a character boundary.
        let long = DiskIdentity {
            vendor: "é".repeat(MAX_IDENTITY_STRING),
            ..DiskIdentity::default()
        };
        let enc = encode_identity(&long);
        assert!(enc.len() <= MAX_IDENTITY_LEN);
        let back = decode_identity(&enc).unwrap();
        assert_eq!(back.vendor.len(), MAX_IDENTITY_STRING);
        assert!(long.vendor.starts_with(&back.vendor));
    }

    #[test]
    fn identity_decoder_refuses_every_malformation() {
        let good = encode_identity(&identity());
        // Every strict prefix and every extension is refused, never a panic.
        for cut in 0..good.len() {
            assert!(decode_identity(&good[..cut]).is_err(), "prefix {cut}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(decode_identity(&longer).is_err());
        // Unknown presence bits; a string marked absent but present.
        let mut b = good.clone();
        b[8] |= 4;
        assert!(decode_identity(&b).is_err());
        let mut b = good.clone();
        b[8] = 0;
        assert!(decode_identity(&b).is_err());
        // A length past the end, an overlong string, bad UTF-8.
        let mut b = good.clone();
        b[9] = 0xff;
        assert!(decode_identity(&b).is_err());
        let mut b = vec![0u8; 9];
        b.extend_from_slice(&(MAX_IDENTITY_STRING as u16 + 1).to_le_bytes());
        b.extend(std::iter::repeat_n(b'a', MAX_IDENTITY_STRING + 1));
        b.extend_from_slice(&[0; 8]);
        assert!(decode_identity(&b).is_err());
        let mut b = good.clone();
        b[11] = 0xff; // first vendor byte
        assert!(decode_identity(&b).is_err());
        // Garbage of every small length.
        let mut x = 0x1234_5678u32;
        for len in 0..200 {
            let g: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = decode_identity(&g);
        }
    }
}
