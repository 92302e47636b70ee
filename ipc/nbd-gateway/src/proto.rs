//! The NBD wire format, as the NBD protocol document (`doc/proto.md` of the NetworkBlockDevice
//! project) defines it: magic numbers, handshake, option, reply, information, command and error
//! values, and the encoding and decoding of the fixed-layout messages.
//!
//! Owns only bytes: no sockets, no policy. Every decoder takes what a network client sent and
//! returns an error for anything malformed; nothing here panics on client input. All integers
//! are big-endian (network byte order).

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, sent by the server after `NBDMAGIC` and by the client before
/// every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no zero padding after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export refuses writes.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is supported (set for writable exports that can discard).
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` are supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: flush and FUA on one connection are visible on every connection.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: choose an export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: start TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: done, success.
pub const REP_ACK: u32 = 1;
/// Option reply: one export (answer to `NBD_OPT_LIST`).
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information (answer to `NBD_OPT_INFO`/`NBD_OPT_GO`).
pub const REP_INFO: u32 = 3;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option error: refused by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Option error: syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option error: the export does not exist or is not available.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// Option error: the request is too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information type: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information type: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type: minimum, preferred and maximum block size.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the request).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flag: force unit access (persist before replying).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (write zeroes): do not create a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// NBD error: operation not permitted (writes to a read-only export).
pub const EPERM: u32 = 1;
/// NBD error: input/output error.
pub const EIO: u32 = 5;
/// NBD error: cannot allocate memory.
pub const ENOMEM: u32 = 12;
/// NBD error: invalid argument (bad range, length, flags or command).
pub const EINVAL: u32 = 22;
/// NBD error: no space left (writes past the end).
pub const ENOSPC: u32 = 28;
/// NBD error: value too large.
pub const EOVERFLOW: u32 = 75;
/// NBD error: operation not supported.
pub const ENOTSUP: u32 = 95;
/// NBD error: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of an option request header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Longest string (export name, message) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// The server's first message: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting(handshake_flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

/// A client's option request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (`NBD_OPT_*`).
    pub option: u32,
    /// Length of the option data that follows.
    pub len: u32,
}

impl OptionHeader {
    /// Decodes the 16-byte header; `None` if the magic is not `IHAVEOPT`.
    pub fn decode(b: &[u8; OPTION_HEADER_LEN]) -> Option<OptionHeader> {
        if be_u64(&b[0..8]) != IHAVEOPT {
            return None;
        }
        Some(OptionHeader {
            option: be_u32(&b[8..12]),
            len: be_u32(&b[12..16]),
        })
    }

    /// Encodes it (for clients and tests).
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// One option reply: header and data.
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply_type.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// `NBD_REP_SERVER` data: the export name and a description for people.
pub fn rep_server_data(name: &str, description: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len() + description.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(description.as_bytes());
    b
}

/// `NBD_REP_INFO` data for `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, transmission_flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&transmission_flags.to_be_bytes());
    b
}

/// `NBD_REP_INFO` data for `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&minimum.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&maximum.to_be_bytes());
    b
}

/// `NBD_REP_INFO` data for a string item (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`).
pub fn info_string(info_type: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&info_type.to_be_bytes());
    b.extend_from_slice(truncate_str(s, MAX_STRING).as_bytes());
    b
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and 124 zero bytes unless
/// the client negotiated `NBD_FLAG_C_NO_ZEROES`.
pub fn export_name_reply(size: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

/// The data of an `NBD_OPT_INFO` or `NBD_OPT_GO` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export name (empty: the default export).
    pub name: String,
    /// The information types asked for.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Decodes the option data: name length, name, request count, requests. The lengths must
    /// add up to exactly `data.len()`, and the name must be UTF-8 without NUL.
    pub fn decode(data: &[u8]) -> Result<InfoRequest, &'static str> {
        let name_len = data.get(0..4).map(be_u32).ok_or("option data too short")?;
        let name_len = usize::try_from(name_len).map_err(|_| "export name too long")?;
        if name_len > MAX_STRING {
            return Err("export name longer than 4096 bytes");
        }
        let name = data
            .get(4..4 + name_len)
            .ok_or("export name runs past the option data")?;
        let name = decode_string(name)?;
        let rest = &data[4 + name_len..];
        let count = rest
            .get(0..2)
            .map(be_u16)
            .ok_or("information request count missing")?;
        let list = &rest[2..];
        if list.len() != usize::from(count) * 2 {
            return Err("information request count does not match the option length");
        }
        let requests = list.chunks_exact(2).map(be_u16).collect();
        Ok(InfoRequest { name, requests })
    }

    /// Encodes it (for clients and tests).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }
}

/// An export name as a string: UTF-8, no NUL, at most 4096 bytes.
pub fn decode_string(b: &[u8]) -> Result<String, &'static str> {
    if b.len() > MAX_STRING {
        return Err("string longer than 4096 bytes");
    }
    if b.contains(&0) {
        return Err("string contains NUL");
    }
    String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8")
}

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`).
    pub kind: u16,
    /// The client's cookie ("handle"), echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (for a write, the payload length that follows).
    pub len: u32,
}

impl Request {
    /// Decodes the 28-byte header; `None` if the magic is wrong.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if be_u32(&b[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be_u16(&b[4..6]),
            kind: be_u16(&b[6..8]),
            cookie: be_u64(&b[8..16]),
            offset: be_u64(&b[16..24]),
            len: be_u32(&b[24..28]),
        })
    }

    /// Encodes it (for clients and tests).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// A simple reply header (the data of a successful read follows it).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// The name of an option, for log messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "unknown option",
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn be_u16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_be_bytes(a)
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_layout() {
        let g = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
    }

    #[test]
    fn option_header_round_trip_and_bad_magic() {
        let h = OptionHeader {
            option: OPT_GO,
            len: 77,
        };
        assert_eq!(OptionHeader::decode(&h.encode()), Some(h));
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert_eq!(OptionHeader::decode(&bad), None);
    }

    #[test]
    fn option_reply_layout() {
        let r = option_reply(OPT_LIST, REP_SERVER, &rep_server_data("0", "disk"));
        assert_eq!(&r[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[8..12], &OPT_LIST.to_be_bytes());
        assert_eq!(&r[12..16], &REP_SERVER.to_be_bytes());
        assert_eq!(&r[16..20], &9u32.to_be_bytes());
        assert_eq!(&r[20..24], &1u32.to_be_bytes());
        assert_eq!(&r[24..], b"0disk");
    }

    #[test]
    fn info_items() {
        let e = info_export(0x1122_3344_5566_7788, 0x0105);
        assert_eq!(e.len(), 12);
        assert_eq!(&e[0..2], &[0, 0]);
        assert_eq!(&e[2..10], &0x1122_3344_5566_7788u64.to_be_bytes());
        assert_eq!(&e[10..12], &[1, 5]);
        let b = info_block_size(1, 4096, 32 << 20);
        assert_eq!(b.len(), 14);
        assert_eq!(&b[0..2], &[0, 3]);
        assert_eq!(&b[6..10], &4096u32.to_be_bytes());
        let n = info_string(INFO_NAME, "0p1");
        assert_eq!(n, [0, 1, b'0', b'p', b'1']);
    }

    #[test]
    fn export_name_reply_padding() {
        assert_eq!(export_name_reply(4096, 1, false).len(), 134);
        assert_eq!(export_name_reply(4096, 1, true).len(), 10);
    }

    #[test]
    fn info_request_decoding() {
        let r = InfoRequest {
            name: "1".into(),
            requests: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        assert_eq!(InfoRequest::decode(&r.encode()), Ok(r.clone()));
        let empty = InfoRequest {
            name: String::new(),
            requests: vec![],
        };
        assert_eq!(InfoRequest::decode(&empty.encode()), Ok(empty));
        // Truncated, overlong, inconsistent counts, bad strings: errors, never panics.
        let enc = r.encode();
        for n in 0..enc.len() {
            assert!(InfoRequest::decode(&enc[..n]).is_err(), "prefix {n}");
        }
        let mut extra = enc.clone();
        extra.push(0);
        assert!(InfoRequest::decode(&extra).is_err());
        let mut huge = enc.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(InfoRequest::decode(&huge).is_err());
        let nul = InfoRequest {
            name: "a\0b".into(),
            requests: vec![],
        };
        assert!(InfoRequest::decode(&nul.encode()).is_err());
        let mut bad_utf8 = vec![0, 0, 0, 1, 0xff, 0, 0];
        assert!(InfoRequest::decode(&bad_utf8).is_err());
        bad_utf8[4] = b'x';
        assert!(InfoRequest::decode(&bad_utf8).is_ok());
    }

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0xdead_beef_0000_0001,
            offset: 1 << 40,
            len: 65536,
        };
        assert_eq!(Request::decode(&r.encode()), Some(r));
        let mut bad = r.encode();
        bad[3] = 0;
        assert_eq!(Request::decode(&bad), None);
    }

    #[test]
    fn simple_reply_layout() {
        let r = simple_reply(EPERM, 42);
        assert_eq!(&r[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[4..8], &1u32.to_be_bytes());
        assert_eq!(&r[8..16], &42u64.to_be_bytes());
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_str("abc", 5), "abc");
        assert_eq!(truncate_str("aé", 2), "a");
        assert_eq!(truncate_str("aé", 3), "aé");
    }
}
