//! The gateway against an in-memory daemon (the real `vscsi_ipc` server and block scheme over
//! RAM disks), driven by a hand-written NBD client that checks the bytes on the wire:
//! negotiation, every command, bounds and flag errors, read-only exports, pipelining, many
//! connections, TCP on loopback, and the stop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use block_scheme::{BlockDevice, DiskInfo, DiskScheme};
use nbd_gateway::proto::{self, InfoRequest, OptionHeader, Request};
use nbd_gateway::{Gateway, GatewayConfig, ListenAddr, ShutdownHandle};
use vscsi_ipc::{Server, ServerConfig};

const SCHEME: &str = "disk.virtio-scsi";
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// The in-memory daemon.

struct MemDisk {
    block_size: u32,
    data: RwLock<Vec<u8>>,
    readonly: bool,
}

/// Disk 1 can discard (discarded blocks read back as [`DISCARDED`]) and has a write-zeroes
/// command; disks 0 and 2 have neither (write zeroes then go as zero buffers).
struct MemDevice {
    disks: Vec<MemDisk>,
    flushes: AtomicU64,
    /// (lba, blocks) of every discard.
    discards: std::sync::Mutex<Vec<(u64, u64)>>,
    /// Blocks zeroed by the write-zeroes command.
    zeroed_blocks: AtomicU64,
}

const DISCARDED: u8 = 0xD5;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

impl MemDevice {
    fn new() -> MemDevice {
        let disk = |bs: u32, bytes: u64, readonly: bool, seed: u64| MemDisk {
            block_size: bs,
            data: RwLock::new(pattern(seed, bytes as usize)),
            readonly,
        };
        MemDevice {
            disks: vec![
                disk(512, 2 * MIB, false, 1),
                disk(4096, MIB, false, 2),
                disk(512, MIB / 2, true, 3),
            ],
            flushes: AtomicU64::new(0),
            discards: std::sync::Mutex::new(Vec::new()),
            zeroed_blocks: AtomicU64::new(0),
        }
    }

    fn bytes(&self, disk: usize, off: u64, len: usize) -> Vec<u8> {
        let off = off as usize;
        self.disks[disk].data.read().unwrap()[off..off + len].to_vec()
    }
}

impl BlockDevice for MemDevice {
    fn disks(&self) -> Vec<DiskInfo> {
        self.disks
            .iter()
            .map(|d| DiskInfo {
                block_size: d.block_size,
                blocks: d.data.read().unwrap().len() as u64 / u64::from(d.block_size),
                readonly: d.readonly,
            })
            .collect()
    }

    fn read_blocks(&self, disk: usize, lba: u64, buf: &mut [u8]) -> block_scheme::Result<()> {
        let d = &self.disks[disk];
        let off = (lba * u64::from(d.block_size)) as usize;
        buf.copy_from_slice(&d.data.read().unwrap()[off..off + buf.len()]);
        Ok(())
    }

    fn write_blocks(&self, disk: usize, lba: u64, buf: &[u8]) -> block_scheme::Result<()> {
        let d = &self.disks[disk];
        let off = (lba * u64::from(d.block_size)) as usize;
        d.data.write().unwrap()[off..off + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self, _disk: usize) -> block_scheme::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn can_discard(&self, disk: usize) -> bool {
        disk == 1
    }

    fn discard(&self, disk: usize, lba: u64, blocks: u64) -> block_scheme::Result<()> {
        assert_eq!(disk, 1, "discard on a disk that cannot");
        let d = &self.disks[disk];
        let bs = u64::from(d.block_size);
        let (off, len) = ((lba * bs) as usize, (blocks * bs) as usize);
        d.data.write().unwrap()[off..off + len].fill(DISCARDED);
        self.discards.lock().unwrap().push((lba, blocks));
        Ok(())
    }

    fn write_zeroes(&self, disk: usize, lba: u64, blocks: u64) -> block_scheme::Result<()> {
        if disk != 1 {
            return Err(syscall::Error::new(syscall::error::EOPNOTSUPP));
        }
        let d = &self.disks[disk];
        let bs = u64::from(d.block_size);
        let (off, len) = ((lba * bs) as usize, (blocks * bs) as usize);
        d.data.write().unwrap()[off..off + len].fill(0);
        self.zeroed_blocks.fetch_add(blocks, Ordering::SeqCst);
        Ok(())
    }
}

/// A daemon and a gateway in this process, each on its own thread.
struct Setup {
    _dir: tempfile::TempDir,
    device: Arc<MemDevice>,
    nbd_socket: PathBuf,
    tcp: Option<std::net::SocketAddr>,
    gateway_stop: ShutdownHandle,
    gateway: Option<thread::JoinHandle<std::io::Result<()>>>,
    daemon_stop: vscsi_ipc::ShutdownHandle,
    daemon: Option<thread::JoinHandle<()>>,
}

impl Setup {
    fn start() -> Setup {
        Setup::start_with(false, None)
    }

    fn start_with(tcp: bool, daemon_socket_override: Option<&Path>) -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("nbd-gateway-test-")
            .tempdir()
            .unwrap();
        let device = Arc::new(MemDevice::new());
        let daemon_socket = dir.path().join("daemon.sock");
        let scheme = Arc::new(DiskScheme::new(SCHEME, device.clone()));
        let server = Server::bind(ServerConfig::new(&daemon_socket), scheme).unwrap();
        let daemon_stop = server.shutdown_handle();
        let daemon = thread::spawn(move || {
            server.run().unwrap();
        });
        let nbd_socket = dir.path().join("nbd.sock");
        let mut listen = vec![ListenAddr::Unix(nbd_socket.clone())];
        if tcp {
            listen.push("tcp:127.0.0.1:0".parse().unwrap());
        }
        let target = daemon_socket_override.map_or(daemon_socket, Path::to_path_buf);
        let gw = Gateway::bind(GatewayConfig::new(target, listen)).unwrap();
        let tcp = gw.local_addrs().unwrap().into_iter().find_map(|a| match a {
            ListenAddr::Tcp(a) => Some(a),
            ListenAddr::Unix(_) => None,
        });
        let gateway_stop = gw.shutdown_handle();
        let gateway = thread::spawn(move || gw.run());
        Setup {
            _dir: dir,
            device,
            nbd_socket,
            tcp,
            gateway_stop,
            gateway: Some(gateway),
            daemon_stop,
            daemon: Some(daemon),
        }
    }

    fn nbd(&self) -> Nbd {
        Nbd::handshake(Box::new(UnixStream::connect(&self.nbd_socket).unwrap()), 1)
    }

    /// Stops the gateway and returns how long `run` took to return.
    fn stop_gateway(&mut self) -> Duration {
        let t = Instant::now();
        self.gateway_stop.shutdown();
        if let Some(g) = self.gateway.take() {
            g.join().unwrap().unwrap();
        }
        t.elapsed()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.gateway_stop.shutdown();
        if let Some(g) = self.gateway.take() {
            let _ = g.join();
        }
        self.daemon_stop.shutdown();
        if let Some(d) = self.daemon.take() {
            let _ = d.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal NBD client that shows the wire.

trait Conn: Read + Write + Send {
    fn try_clone_box(&self) -> Box<dyn Conn>;
}

impl Conn for UnixStream {
    fn try_clone_box(&self) -> Box<dyn Conn> {
        Box::new(self.try_clone().unwrap())
    }
}

impl Conn for TcpStream {
    fn try_clone_box(&self) -> Box<dyn Conn> {
        Box::new(self.try_clone().unwrap())
    }
}

struct Nbd {
    s: Box<dyn Conn>,
}

struct OptReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

struct Go {
    size: u64,
    flags: u16,
    block_sizes: Option<(u32, u32, u32)>,
    name: Option<String>,
    description: Option<String>,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl Nbd {
    fn handshake(mut s: Box<dyn Conn>, client_flags: u32) -> Nbd {
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(
            be16(&g[16..]),
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES
        );
        s.write_all(&client_flags.to_be_bytes()).unwrap();
        Nbd { s }
    }

    fn send_opt(&mut self, option: u32, data: &[u8]) {
        let h = OptionHeader {
            option,
            len: data.len() as u32,
        };
        self.s.write_all(&h.encode()).unwrap();
        self.s.write_all(data).unwrap();
    }

    fn opt_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be64(&h[0..8]), proto::OPTION_REPLY_MAGIC);
        let mut data = vec![0u8; be32(&h[16..20]) as usize];
        self.s.read_exact(&mut data).unwrap();
        OptReply {
            option: be32(&h[8..12]),
            kind: be32(&h[12..16]),
            data,
        }
    }

    /// One-reply option: returns (reply type, message).
    fn opt_simple(&mut self, option: u32, data: &[u8]) -> (u32, String) {
        self.send_opt(option, data);
        let r = self.opt_reply();
        assert_eq!(r.option, option);
        (r.kind, String::from_utf8_lossy(&r.data).into_owned())
    }

    fn list(&mut self) -> Vec<(String, String)> {
        self.send_opt(proto::OPT_LIST, &[]);
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.option, proto::OPT_LIST);
            match r.kind {
                proto::REP_SERVER => {
                    let n = be32(&r.data) as usize;
                    let name = String::from_utf8(r.data[4..4 + n].to_vec()).unwrap();
                    let desc = String::from_utf8(r.data[4 + n..].to_vec()).unwrap();
                    out.push((name, desc));
                }
                proto::REP_ACK => return out,
                k => panic!("unexpected LIST reply {k:#x}"),
            }
        }
    }

    /// INFO or GO: Ok with the information, or Err(reply type, message).
    fn info(&mut self, option: u32, name: &str, requests: &[u16]) -> Result<Go, (u32, String)> {
        let req = InfoRequest {
            name: name.into(),
            requests: requests.to_vec(),
        };
        self.send_opt(option, &req.encode());
        let mut go = Go {
            size: 0,
            flags: 0,
            block_sizes: None,
            name: None,
            description: None,
        };
        let mut saw_export = false;
        loop {
            let r = self.opt_reply();
            assert_eq!(r.option, option);
            match r.kind {
                proto::REP_INFO => match be16(&r.data) {
                    proto::INFO_EXPORT => {
                        assert_eq!(r.data.len(), 12);
                        go.size = be64(&r.data[2..]);
                        go.flags = be16(&r.data[10..]);
                        saw_export = true;
                    }
                    proto::INFO_BLOCK_SIZE => {
                        assert_eq!(r.data.len(), 14);
                        go.block_sizes =
                            Some((be32(&r.data[2..]), be32(&r.data[6..]), be32(&r.data[10..])));
                    }
                    proto::INFO_NAME => {
                        go.name = Some(String::from_utf8(r.data[2..].to_vec()).unwrap())
                    }
                    proto::INFO_DESCRIPTION => {
                        go.description = Some(String::from_utf8(r.data[2..].to_vec()).unwrap())
                    }
                    t => panic!("unexpected info type {t}"),
                },
                proto::REP_ACK => {
                    assert!(saw_export, "ACK without NBD_INFO_EXPORT");
                    return Ok(go);
                }
                k => {
                    assert!(k & (1 << 31) != 0, "unexpected reply type {k:#x}");
                    return Err((k, String::from_utf8_lossy(&r.data).into_owned()));
                }
            }
        }
    }

    fn go(&mut self, name: &str) -> Go {
        match self.info(proto::OPT_GO, name, &[proto::INFO_BLOCK_SIZE]) {
            Ok(g) => g,
            Err((k, m)) => panic!("GO {name}: {k:#x} {m}"),
        }
    }

    fn send_cmd(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let r = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        self.s.write_all(&r.encode()).unwrap();
        self.s.write_all(data).unwrap();
    }

    /// Reads one simple reply header: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h), proto::SIMPLE_REPLY_MAGIC);
        (be32(&h[4..]), be64(&h[8..]))
    }

    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send_cmd(proto::CMD_READ, 0, 7, offset, len, &[]);
        let (err, cookie) = self.reply();
        assert_eq!(cookie, 7);
        if err != 0 {
            return Err(err);
        }
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).unwrap();
        Ok(data)
    }

    /// A command without reply data; returns its error value.
    fn cmd(&mut self, kind: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> u32 {
        self.send_cmd(kind, flags, 99, offset, len, data);
        let (err, cookie) = self.reply();
        assert_eq!(cookie, 99);
        err
    }

    fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.cmd(proto::CMD_WRITE, flags, offset, data.len() as u32, data)
    }

    /// True when the server closed the connection (EOF or reset) within a few seconds.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn negotiation_lists_and_describes_exports() {
    let setup = Setup::start();
    let mut c = setup.nbd();

    let list = c.list();
    let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["0", "1", "2"]);
    assert!(list[1].1.contains("4096-byte blocks"), "{}", list[1].1);
    assert!(list[2].1.contains("read-only"), "{}", list[2].1);

    let rw_flags = proto::FLAG_HAS_FLAGS
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_SEND_FUA
        | proto::FLAG_SEND_WRITE_ZEROES
        | proto::FLAG_CAN_MULTI_CONN;
    // Disk 1 can discard: TRIM as well.
    for (name, size, bs, flags) in [
        ("0", 2 * MIB, 512u32, rw_flags),
        ("1", MIB, 4096, rw_flags | proto::FLAG_SEND_TRIM),
    ] {
        let i = c
            .info(
                proto::OPT_INFO,
                name,
                &[
                    proto::INFO_BLOCK_SIZE,
                    proto::INFO_NAME,
                    proto::INFO_DESCRIPTION,
                ],
            )
            .unwrap_or_else(|e| panic!("INFO {name}: {e:?}"));
        assert_eq!(i.size, size);
        assert_eq!(i.flags, flags, "export {name} flags");
        assert_eq!(i.block_sizes, Some((1, bs, 32 << 20)));
        assert_eq!(i.name.as_deref(), Some(name));
        assert!(i.description.unwrap().starts_with("disk.virtio-scsi:/"));
    }
    let ro = c.info(proto::OPT_INFO, "2", &[]).unwrap();
    assert_eq!(
        ro.flags,
        proto::FLAG_HAS_FLAGS
            | proto::FLAG_READ_ONLY
            | proto::FLAG_SEND_FLUSH
            | proto::FLAG_CAN_MULTI_CONN
    );
    assert!(
        ro.block_sizes.is_some(),
        "block sizes are sent even unasked"
    );

    // The empty name is the default export, the first one.
    let d = c.info(proto::OPT_INFO, "", &[proto::INFO_NAME]).unwrap();
    assert_eq!(d.name.as_deref(), Some("0"));
    assert_eq!(d.size, 2 * MIB);

    // Errors are replies; the negotiation goes on after each.
    let (k, msg) = c.info(proto::OPT_INFO, "7", &[]).err().unwrap();
    assert_eq!(k, proto::REP_ERR_UNKNOWN);
    assert!(msg.contains("`7`") && msg.contains("0, 1, 2"), "{msg}");
    assert!(c.info(proto::OPT_GO, "../0", &[]).is_err());
    assert_eq!(
        c.opt_simple(proto::OPT_STRUCTURED_REPLY, &[]).0,
        proto::REP_ERR_UNSUP
    );
    assert_eq!(
        c.opt_simple(proto::OPT_STARTTLS, &[]).0,
        proto::REP_ERR_UNSUP
    );
    assert_eq!(
        c.opt_simple(proto::OPT_SET_META_CONTEXT, &[0; 8]).0,
        proto::REP_ERR_UNSUP
    );
    assert_eq!(c.opt_simple(4242, b"whatever").0, proto::REP_ERR_UNSUP);
    assert_eq!(
        c.opt_simple(proto::OPT_LIST, b"x").0,
        proto::REP_ERR_INVALID
    );
    assert_eq!(
        c.opt_simple(proto::OPT_INFO, &[0, 0, 0, 9, b'0']).0,
        proto::REP_ERR_INVALID
    );
    // Overlong option data is skipped and refused.
    assert_eq!(
        c.opt_simple(4243, &vec![0u8; 100 << 10]).0,
        proto::REP_ERR_TOO_BIG
    );
    assert_eq!(c.list().len(), 3, "still negotiating");

    assert_eq!(c.opt_simple(proto::OPT_ABORT, &[]).0, proto::REP_ACK);
    assert!(c.closed());
}

#[test]
fn reads_writes_flushes_and_zeroes_reach_the_disk() {
    let setup = Setup::start();
    let dev = &setup.device;
    let mut c = setup.nbd();
    let g = c.go("0");
    assert_eq!(g.size, 2 * MIB);

    // Unaligned write, read back through NBD and checked on the disk.
    let data = pattern(9, 65536 + 3);
    assert_eq!(c.write(4096 + 7, &data, 0), 0);
    assert_eq!(dev.bytes(0, 4096 + 7, data.len()), data);
    assert_eq!(c.read(4096 + 7, data.len() as u32).unwrap(), data);
    assert_eq!(c.read(0, 4096).unwrap(), dev.bytes(0, 0, 4096));

    // FUA and FLUSH reach the device as flushes.
    let before = dev.flushes.load(Ordering::SeqCst);
    assert_eq!(c.write(MIB, &[0xab; 512], proto::CMD_FLAG_FUA), 0);
    assert_eq!(dev.flushes.load(Ordering::SeqCst), before + 1);
    assert_eq!(c.cmd(proto::CMD_FLUSH, 0, 0, 0, &[]), 0);
    assert_eq!(dev.flushes.load(Ordering::SeqCst), before + 2);

    // Write zeroes, with NO_HOLE and FUA, also across the 1 MiB zero buffer.
    assert_eq!(
        c.cmd(
            proto::CMD_WRITE_ZEROES,
            proto::CMD_FLAG_NO_HOLE,
            100,
            8192,
            &[]
        ),
        0
    );
    assert_eq!(dev.bytes(0, 100, 8192), vec![0u8; 8192]);
    assert_ne!(dev.bytes(0, 99, 1), [0], "neighbour kept (pattern byte)");
    assert_eq!(
        c.cmd(
            proto::CMD_WRITE_ZEROES,
            proto::CMD_FLAG_FUA,
            MIB / 2 + 1,
            (MIB + 5) as u32,
            &[]
        ),
        0
    );
    assert!(
        dev.bytes(0, MIB / 2 + 1, (MIB + 5) as usize)
            .iter()
            .all(|&b| b == 0)
    );

    // The last byte, and an empty read at the end.
    assert_eq!(
        c.read(2 * MIB - 1, 1).unwrap(),
        dev.bytes(0, 2 * MIB - 1, 1)
    );
    assert_eq!(c.read(2 * MIB, 0).unwrap(), Vec::<u8>::new());

    // Errors: never a short or silent reply, and the connection stays usable after each.
    assert_eq!(
        c.read(2 * MIB - 1, 2),
        Err(proto::EINVAL),
        "read crossing the end"
    );
    assert_eq!(c.read(2 * MIB, 1), Err(proto::EINVAL), "read past the end");
    assert_eq!(c.read(u64::MAX, 1), Err(proto::EINVAL), "offset overflow");
    assert_eq!(c.read(0, (32 << 20) + 1), Err(proto::EINVAL), "too long");
    assert_eq!(
        c.write(2 * MIB - 1, &[1, 2], 0),
        proto::ENOSPC,
        "write crossing the end"
    );
    assert_eq!(
        dev.bytes(0, 2 * MIB - 1, 1),
        c.read(2 * MIB - 1, 1).unwrap()
    );
    assert_eq!(
        c.cmd(proto::CMD_WRITE_ZEROES, 0, 2 * MIB, 1, &[]),
        proto::ENOSPC
    );
    assert_eq!(
        c.cmd(proto::CMD_TRIM, 0, 0, 4096, &[]),
        proto::EINVAL,
        "no TRIM"
    );
    assert_eq!(c.cmd(42, 0, 0, 0, &[]), proto::EINVAL, "unknown command");
    assert_eq!(
        c.cmd(proto::CMD_WRITE, proto::CMD_FLAG_NO_HOLE, 0, 3, &[1, 2, 3]),
        proto::EINVAL,
        "flag not valid for a write"
    );
    assert_eq!(
        c.cmd(proto::CMD_WRITE_ZEROES, 1 << 4, 0, 512, &[]),
        proto::EINVAL,
        "FAST_ZERO not advertised"
    );
    // An oversize write's payload is consumed, so the stream stays in step.
    let big = vec![0x5a; (32 << 20) + 1];
    assert_eq!(c.write(0, &big, 0), proto::EINVAL);
    assert_ne!(dev.bytes(0, 0, 1), [0x5a]);
    assert_eq!(
        c.read(2 * MIB - 16, 16).unwrap(),
        dev.bytes(0, 2 * MIB - 16, 16)
    );

    c.send_cmd(proto::CMD_DISC, 0, 1, 0, 0, &[]);
    assert!(c.closed());
}

#[test]
fn trim_discards_the_whole_blocks_inside_and_zeroes_use_the_device() {
    let setup = Setup::start();
    let dev = &setup.device;
    // Disk 0 cannot discard: no TRIM flag. Disk 1 (4096-byte blocks) can.
    let g0 = setup.nbd().go("0");
    assert_eq!(g0.flags & proto::FLAG_SEND_TRIM, 0);
    let mut c = setup.nbd();
    let g = c.go("1");
    assert_ne!(g.flags & proto::FLAG_SEND_TRIM, 0, "flags {:#x}", g.flags);
    assert_eq!(g.size, MIB);

    // Aligned: exactly that range.
    let before = dev.bytes(1, 0, MIB as usize);
    assert_eq!(c.cmd(proto::CMD_TRIM, 0, 8192, 16384, &[]), 0);
    let mut want = before.clone();
    want[8192..24576].fill(DISCARDED);
    assert_eq!(dev.bytes(1, 0, MIB as usize), want);
    // Unaligned: only the whole blocks inside (4096..12288 of 100..12388); the edges kept.
    assert_eq!(c.cmd(proto::CMD_TRIM, 0, 65536 + 100, 12288, &[]), 0);
    want[65536 + 4096..65536 + 12288].fill(DISCARDED);
    assert_eq!(dev.bytes(1, 0, MIB as usize), want);
    // Less than a block: nothing to discard, success.
    assert_eq!(c.cmd(proto::CMD_TRIM, 0, 200_000, 4000, &[]), 0);
    assert_eq!(
        *dev.discards.lock().unwrap(),
        vec![(2, 4), (17, 2)],
        "(lba, blocks) of each discard"
    );
    // FUA: a flush after the discard.
    let flushes = dev.flushes.load(Ordering::SeqCst);
    assert_eq!(c.cmd(proto::CMD_TRIM, proto::CMD_FLAG_FUA, 0, 4096, &[]), 0);
    assert_eq!(dev.flushes.load(Ordering::SeqCst), flushes + 1);
    // Past the end, overflowing, bad flags: EINVAL, nothing discarded, the connection lives.
    assert_eq!(
        c.cmd(proto::CMD_TRIM, 0, MIB - 4096, 8192, &[]),
        proto::EINVAL
    );
    assert_eq!(c.cmd(proto::CMD_TRIM, 0, u64::MAX, 2, &[]), proto::EINVAL);
    assert_eq!(
        c.cmd(proto::CMD_TRIM, proto::CMD_FLAG_NO_HOLE, 0, 4096, &[]),
        proto::EINVAL
    );
    assert_eq!(dev.discards.lock().unwrap().len(), 3);

    // Write zeroes on this disk go through the device's command for the whole blocks and
    // read-modify-write at the edges.
    assert_eq!(c.cmd(proto::CMD_WRITE_ZEROES, 0, 300_001, 3 * 4096, &[]), 0);
    assert_eq!(dev.bytes(1, 300_001, 3 * 4096), vec![0; 3 * 4096]);
    assert_ne!(dev.bytes(1, 300_000, 1), [0]);
    assert_eq!(dev.zeroed_blocks.load(Ordering::SeqCst), 2);
    assert_eq!(c.read(300_000, 8).unwrap(), dev.bytes(1, 300_000, 8));
}

#[test]
fn read_only_export_refuses_writes() {
    let setup = Setup::start();
    let mut c = setup.nbd();
    let g = c.go("2");
    assert_ne!(g.flags & proto::FLAG_READ_ONLY, 0);
    let before = setup.device.bytes(2, 0, 4096);
    assert_eq!(c.write(0, &[1; 4096], 0), proto::EPERM);
    assert_eq!(c.write(0, &[1; 4096], proto::CMD_FLAG_FUA), proto::EPERM);
    assert_eq!(
        c.cmd(proto::CMD_WRITE_ZEROES, 0, 0, 4096, &[]),
        proto::EPERM
    );
    assert_eq!(g.flags & proto::FLAG_SEND_TRIM, 0);
    assert_eq!(c.cmd(proto::CMD_TRIM, 0, 0, 4096, &[]), proto::EPERM);
    assert_eq!(c.cmd(proto::CMD_FLUSH, 0, 0, 0, &[]), 0);
    assert_eq!(setup.device.bytes(2, 0, 4096), before);
    assert_eq!(c.read(0, 4096).unwrap(), before);
}

#[test]
fn export_name_option_enters_transmission() {
    let setup = Setup::start();
    for (flags, padding) in [(1u32, 124usize), (3, 0)] {
        let mut c = Nbd::handshake(
            Box::new(UnixStream::connect(&setup.nbd_socket).unwrap()),
            flags,
        );
        c.send_opt(proto::OPT_EXPORT_NAME, b"1");
        let mut r = vec![0u8; 10 + padding];
        c.s.read_exact(&mut r).unwrap();
        assert_eq!(be64(&r), MIB);
        assert_eq!(
            be16(&r[8..]) & proto::FLAG_SEND_FLUSH,
            proto::FLAG_SEND_FLUSH
        );
        assert!(r[10..].iter().all(|&b| b == 0));
        assert_eq!(
            c.read(8192, 4096).unwrap(),
            setup.device.bytes(1, 8192, 4096)
        );
    }
    // An unknown export cannot be refused with a reply: the server hangs up.
    let mut c = setup.nbd();
    c.send_opt(proto::OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
}

#[test]
fn protocol_violations_end_the_connection_only() {
    let setup = Setup::start();
    // Unknown client flags.
    let mut c = Nbd::handshake(
        Box::new(UnixStream::connect(&setup.nbd_socket).unwrap()),
        1 << 7,
    );
    assert!(c.closed());
    // An option without the magic.
    let mut c = setup.nbd();
    c.s.write_all(&[0u8; 16]).unwrap();
    assert!(c.closed());
    // A request with a bad magic.
    let mut c = setup.nbd();
    c.go("0");
    c.s.write_all(&[0xffu8; 28]).unwrap();
    assert!(c.closed());
    // A client that hangs up in the middle of a write payload.
    let mut c = setup.nbd();
    c.go("0");
    c.send_cmd(proto::CMD_WRITE, 0, 1, 0, 4096, &[1; 100]);
    drop(c);
    // The gateway still serves.
    let mut c = setup.nbd();
    c.go("0");
    assert_eq!(c.read(0, 512).unwrap(), setup.device.bytes(0, 0, 512));
}

#[test]
fn many_requests_in_flight_and_many_connections() {
    let setup = Setup::start();
    // One connection, 200 reads sent before any reply is read (replies may come in any
    // order); a thread sends while this one reads, so neither side's buffer fills up.
    let mut c = setup.nbd();
    c.go("1");
    let mut sender = c.s.try_clone_box();
    const N: u64 = 200;
    let send = thread::spawn(move || {
        for i in 0..N {
            let r = Request {
                flags: 0,
                kind: proto::CMD_READ,
                cookie: 1000 + i,
                offset: (i * 4096 * 7) % (MIB - 4096),
                len: 4096,
            };
            sender.write_all(&r.encode()).unwrap();
        }
    });
    let mut seen = std::collections::HashSet::new();
    for _ in 0..N {
        let (err, cookie) = c.reply();
        assert_eq!(err, 0);
        let i = cookie - 1000;
        assert!(
            i < N && seen.insert(cookie),
            "cookie {cookie} unexpected or repeated"
        );
        let mut data = vec![0u8; 4096];
        c.s.read_exact(&mut data).unwrap();
        let off = (i * 4096 * 7) % (MIB - 4096);
        assert!(data == setup.device.bytes(1, off, 4096), "read {i} data");
    }
    send.join().unwrap();

    // Eight connections writing their own ranges of disk 0 at once.
    let socket = setup.nbd_socket.clone();
    let writers: Vec<_> = (0..8u64)
        .map(|k| {
            let socket = socket.clone();
            thread::spawn(move || {
                let mut c = Nbd::handshake(Box::new(UnixStream::connect(&socket).unwrap()), 1);
                c.go("0");
                let data = pattern(100 + k, 128 << 10);
                for (j, chunk) in data.chunks(16 << 10).enumerate() {
                    let off = k * (256 << 10) + j as u64 * (16 << 10);
                    assert_eq!(c.write(off, chunk, 0), 0);
                }
                assert_eq!(c.cmd(proto::CMD_FLUSH, 0, 0, 0, &[]), 0);
                c.send_cmd(proto::CMD_DISC, 0, 0, 0, 0, &[]);
                (k, data)
            })
        })
        .collect();
    for w in writers {
        let (k, data) = w.join().unwrap();
        assert!(
            setup.device.bytes(0, k * (256 << 10), data.len()) == data,
            "connection {k}'s data"
        );
    }
}

#[test]
fn tcp_on_loopback() {
    let setup = Setup::start_with(true, None);
    let addr = setup.tcp.expect("a TCP address");
    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0);
    let mut c = Nbd::handshake(Box::new(TcpStream::connect(addr).unwrap()), 1);
    assert_eq!(c.list().len(), 3);
    c.go("1");
    assert_eq!(c.write(4096, &[7; 4096], proto::CMD_FLAG_FUA), 0);
    assert_eq!(setup.device.bytes(1, 4096, 4096), vec![7; 4096]);

    // Anything but loopback is refused before binding.
    let dir = tempfile::tempdir().unwrap();
    let bad = GatewayConfig::new(
        dir.path().join("d.sock"),
        vec![ListenAddr::Tcp("0.0.0.0:0".parse().unwrap())],
    );
    assert!(Gateway::bind(bad).is_err());
}

#[test]
fn daemon_unreachable_is_an_error_reply() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-daemon.sock");
    let setup = Setup::start_with(false, Some(&missing));
    let mut c = setup.nbd();
    let (k, msg) = c.opt_simple(proto::OPT_LIST, &[]);
    assert_eq!(k, proto::REP_ERR_SHUTDOWN);
    assert!(msg.contains("no-daemon.sock"), "{msg}");
    let (k, _) = c.info(proto::OPT_GO, "0", &[]).err().unwrap();
    assert_eq!(k, proto::REP_ERR_SHUTDOWN);
}

#[test]
fn stop_finishes_and_closes_connections_and_removes_the_socket() {
    let mut setup = Setup::start();
    let mut busy = setup.nbd();
    busy.go("0");
    assert_eq!(busy.write(0, &[3; 4096], 0), 0);
    let mut negotiating = setup.nbd();
    assert_eq!(negotiating.list().len(), 3);

    let took = setup.stop_gateway();
    assert!(took < Duration::from_secs(5), "stop took {took:?}");
    assert!(busy.closed());
    assert!(negotiating.closed());
    assert!(!setup.nbd_socket.exists(), "socket file removed");
    assert!(UnixStream::connect(&setup.nbd_socket).is_err());
}
