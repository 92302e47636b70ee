//! A real filesystem on top: RedoxFS (the `redoxfs` crate as a library) made and used over the
//! block scheme through the client library, on a partition of a GPT disk (made by `sgdisk`),
//! against QEMU's virtio-scsi device. A tree of files is written, the daemon and QEMU are
//! stopped and started again, and the filesystem is opened anew and every byte of every file
//! checked — also against the image file (each file's bytes must sit inside the partition).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redoxfs::{BLOCK_SIZE, Disk, FileSystem, Node, TreePtr};
use syscall::error::{EIO, Error};
use vscsi_ipc::{Client, Handle, OpenFlags};
use vscsi_tests::{DaemonBuilder, Rng, TestDisk, run_tool};

const MIB: u64 = 1 << 20;

/// A RedoxFS `Disk` over one open handle of the block scheme (RedoxFS does I/O in 4 KiB
/// blocks; the partition's byte offset 0 is its block 0).
struct SchemeDisk {
    client: Client,
    handle: Handle,
    size: u64,
}

impl SchemeDisk {
    fn open(client: Client, path: &str) -> SchemeDisk {
        let handle = client.open(path, OpenFlags::READ_WRITE).expect("open");
        let size = client.size(&handle).expect("size");
        SchemeDisk {
            client,
            handle,
            size,
        }
    }

    fn close(self) {
        self.client.sync(&self.handle).expect("sync");
        self.client.close(self.handle).expect("close");
    }
}

fn io_err(what: &str, e: vscsi_ipc::ClientError) -> Error {
    eprintln!("redoxfs disk {what}: {e}");
    Error::new(e.errno().unwrap_or(EIO))
}

impl Disk for SchemeDisk {
    unsafe fn read_at(&mut self, block: u64, buffer: &mut [u8]) -> syscall::Result<usize> {
        let offset = block.checked_mul(BLOCK_SIZE).ok_or(Error::new(EIO))?;
        self.client
            .read_exact_at(&self.handle, offset, buffer)
            .map_err(|e| io_err("read", e))?;
        Ok(buffer.len())
    }

    unsafe fn write_at(&mut self, block: u64, buffer: &[u8]) -> syscall::Result<usize> {
        let offset = block.checked_mul(BLOCK_SIZE).ok_or(Error::new(EIO))?;
        self.client
            .write_all_at(&self.handle, offset, buffer)
            .map_err(|e| io_err("write", e))?;
        Ok(buffer.len())
    }

    fn size(&mut self) -> syscall::Result<u64> {
        Ok(self.size)
    }
}

fn now() -> (u64, u32) {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_secs(), t.subsec_nanos())
}

/// The tree the test writes: directory path → files (name → contents).
type Tree = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

fn make_tree() -> Tree {
    let mut rng = Rng::new(2024);
    let mut tree = Tree::new();
    for dir in ["", "etc", "home", "home/user", "home/user/src", "var/log"] {
        let mut files = BTreeMap::new();
        for i in 0..4 {
            // Empty, tiny, odd-sized, and some larger than many blocks.
            let len = match (i + dir.len()) % 4 {
                0 => 0,
                1 => 1 + rng.below(100) as usize,
                2 => 4096 * (1 + rng.below(3) as usize) + rng.below(4096) as usize,
                _ => 100_000 + rng.below(300_000) as usize,
            };
            files.insert(format!("file{i}.bin"), rng.bytes(len));
        }
        tree.insert(dir.to_string(), files);
    }
    tree
}

/// Follows `dir` (slash-separated, from the root), creating directories when `create`.
fn walk(
    tx: &mut redoxfs::Transaction<SchemeDisk>,
    dir: &str,
    create: bool,
) -> syscall::Result<TreePtr<Node>> {
    let mut ptr = TreePtr::<Node>::root();
    for name in dir.split('/').filter(|n| !n.is_empty()) {
        ptr = match tx.find_node(ptr, name) {
            Ok(node) => node.ptr(),
            Err(e) if create && e.errno == syscall::error::ENOENT => {
                let (s, ns) = now();
                tx.create_node(ptr, name, Node::MODE_DIR | 0o755, s, ns)?
                    .ptr()
            }
            Err(e) => return Err(e),
        };
    }
    Ok(ptr)
}

#[test]
fn redoxfs_on_a_gpt_partition_survives_a_restart_byte_for_byte() {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("vscsi-redoxfs-")
        .tempdir()
        .expect("temp dir");
    let disk = TestDisk::create(dir.path(), "redoxfs.img", 64 * MIB, 77);
    let p = disk.path.display().to_string();
    run_tool("sgdisk", &["--zap-all", &p], "");
    // A small first partition, then RedoxFS's, 4 KiB aligned.
    run_tool(
        "sgdisk",
        &["-n", "1:2048:+4M", "-n", "2:0:0", "-t", "2:8300", &p],
        "",
    );
    let (part_start, part_bytes) = {
        let list = run_tool("fdisk", &["-l", "-o", "Device,Start,Sectors", &p], "");
        let line = list
            .lines()
            .filter(|l| l.starts_with(&p))
            .nth(1)
            .expect("partition 2 in fdisk's listing")
            .to_string();
        let cols: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|c| c.parse().ok())
            .collect();
        (cols[0] * 512, cols[1] * 512)
    };
    let outside_before = disk.read_image(0, part_start as usize);
    let tree = make_tree();
    let path = "disk.virtio-scsi:/0p1";

    // First life: make the filesystem and write the tree.
    {
        let mut daemon = DaemonBuilder::new(dir.path()).disk(&disk).start();
        let sd = SchemeDisk::open(daemon.client(), path);
        assert_eq!(sd.size, part_bytes);
        let (s, ns) = now();
        let mut fs = FileSystem::create(sd, None, s, ns).expect("mkfs redoxfs");
        for (d, files) in &tree {
            for (name, data) in files {
                fs.tx(|tx| {
                    let parent = walk(tx, d, true)?;
                    let (s, ns) = now();
                    let node = tx.create_node(parent, name, Node::MODE_FILE | 0o644, s, ns)?;
                    // Several writes per file, at unaligned boundaries.
                    let mut off = 0usize;
                    for chunk in data.chunks(65_537) {
                        let n = tx.write_node(node.ptr(), off as u64, chunk, s, ns)?;
                        assert_eq!(n, chunk.len());
                        off += n;
                    }
                    Ok(())
                })
                .unwrap_or_else(|e| panic!("write {d}/{name}: {e}"));
            }
        }
        let sd = fs.disk;
        sd.close();
        let status = daemon.signal_and_wait(libc::SIGTERM, Duration::from_secs(60));
        assert!(status.success(), "{}", daemon.output());
    }
    // Nothing outside the partition changed (before it: the other partition and the GPT).
    assert!(disk.read_image(0, part_start as usize) == outside_before);

    // Second life: a new daemon and QEMU; open the filesystem and check every byte.
    let daemon = DaemonBuilder::new(dir.path()).disk(&disk).start();
    let names = daemon.client().list("disk.virtio-scsi").expect("list");
    assert_eq!(names, vec!["0", "0p0", "0p1"]);
    let sd = SchemeDisk::open(daemon.client(), path);
    let mut fs = FileSystem::open(sd, None, None, true).expect("open redoxfs again");
    let image = std::fs::read(&disk.path).expect("read image");
    let partition = &image[part_start as usize..(part_start + part_bytes) as usize];
    let mut total = 0usize;
    for (d, files) in &tree {
        let listed = fs
            .tx(|tx| {
                let ptr = walk(tx, d, false)?;
                let mut entries = Vec::new();
                tx.child_nodes(ptr, &mut entries)?;
                Ok(entries
                    .iter()
                    .filter_map(|e| e.name().map(str::to_string))
                    .collect::<Vec<_>>())
            })
            .unwrap_or_else(|e| panic!("list {d:?}: {e}"));
        for name in files.keys() {
            assert!(listed.contains(name), "{d}/{name} not listed: {listed:?}");
        }
        for (name, data) in files {
            let back = fs
                .tx(|tx| {
                    let parent = walk(tx, d, false)?;
                    let node = tx.find_node(parent, name)?;
                    assert_eq!(node.data().size(), data.len() as u64, "{d}/{name} size");
                    let mut back = vec![0u8; data.len() + 10];
                    let n = tx.read_node(node.ptr(), 0, &mut back, 0, 0)?;
                    back.truncate(n);
                    Ok(back)
                })
                .unwrap_or_else(|e| panic!("read {d}/{name}: {e}"));
            assert!(back == *data, "{d}/{name}: contents differ after restart");
            // A 4 KiB-aligned piece of each larger file is a whole block of the partition in
            // the image (no encryption; random data does not compress, so it is stored as is).
            if data.len() >= 8192 {
                let probe = &data[4096..8192];
                assert!(
                    partition.chunks_exact(4096).any(|w| w == probe),
                    "{d}/{name}: data not found inside the partition in the image"
                );
            }
            total += data.len();
        }
    }
    assert!(total > 1_000_000, "the tree holds {total} bytes");
    fs.disk.close();
    eprintln!(
        "redoxfs round trip of {total} bytes in {:?}",
        started.elapsed()
    );
}
