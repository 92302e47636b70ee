//! Partitions against the fixture: GPT (written by the `gpt` crate) and MBR tables on 512- and
//! 4096-byte disks, the root listing, I/O bounded at partition edges (every device call
//! checked), hostile tables, re-reading after changes, whole-disk/partition exclusion
//! (ENOLCK) and the access policy (EACCES).

use std::io::Cursor;
use std::sync::Arc;

use gpt::disk::LogicalBlockSize;
use syscall::error::{EACCES, EBADF, EIO, ENODEV, ENOENT, ENOLCK, ENOSPC, ENOTDIR, EROFS};
use syscall::flag::{MODE_FILE, O_DIRECTORY, O_RDONLY, O_RDWR, O_STAT, O_WRONLY};

use super::fixture::{MemDevice, Op, initial_byte};
use super::{NAME, Rng, ctx, errno, scheme};
use crate::{AccessPolicy, CallerCtx, DiskScheme, Partition, TableKind};

/// A disk image of `blocks` blocks of `bs` bytes with a protective MBR and a GPT holding
/// `parts` as `(first, last)` blocks (inclusive), written by the `gpt` crate.
fn gpt_image(bs: u64, blocks: u64, parts: &[(u64, u64)]) -> Vec<u8> {
    let mut img = vec![0u8; (bs * blocks) as usize];
    let pmbr = mbr_sector(&[(0xEE, 1, (blocks - 1).min(u32::MAX as u64) as u32)]);
    img[..512].copy_from_slice(&pmbr);
    let lb = if bs == 512 {
        LogicalBlockSize::Lb512
    } else {
        LogicalBlockSize::Lb4096
    };
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(lb)
        .create_from_device(Cursor::new(img), None)
        .unwrap();
    for (i, &(first, last)) in parts.iter().enumerate() {
        disk.add_partition_at(
            &format!("part{i}"),
            i as u32 + 1,
            first,
            last - first + 1,
            gpt::partition_types::LINUX_FS,
            0,
        )
        .unwrap();
    }
    disk.write().unwrap().into_inner()
}

/// A 512-byte MBR with primary entries `(type, start, sectors)`.
fn mbr_sector(entries: &[(u8, u32, u32)]) -> [u8; 512] {
    let mut s = [0u8; 512];
    for (i, &(kind, start, len)) in entries.iter().enumerate() {
        let e = &mut s[446 + 16 * i..446 + 16 * (i + 1)];
        e[4] = kind;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&len.to_le_bytes());
    }
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

fn read_all(s: &DiskScheme<MemDevice>, id: usize) -> Vec<u8> {
    let mut out = vec![0u8; 4096];
    let n = s.read(id, 0, &mut out).unwrap();
    out.truncate(n);
    out
}

fn listing(s: &DiskScheme<MemDevice>) -> String {
    let id = s.open("", O_RDONLY, &ctx()).unwrap();
    let text = String::from_utf8(read_all(s, id)).unwrap();
    s.close(id).unwrap();
    text
}

/// Checks every read/write the device saw since the last clear lies in `[first, end)` blocks.
fn assert_calls_inside(dev: &MemDevice, bs: u64, first: u64, end: u64) {
    for c in dev.calls() {
        if c.op == Op::Flush {
            continue;
        }
        let n = c.len as u64 / bs;
        assert!(
            c.lba >= first && c.lba + n <= end,
            "{c:?} outside blocks {first}..{end}"
        );
    }
}

#[test]
fn gpt_partitions_on_512_and_4096_byte_disks() {
    for bs in [512u64, 4096] {
        let blocks = if bs == 512 { 2048 } else { 512 };
        // Three partitions, the first two adjacent, then a gap.
        let parts = [(40u64, 99u64), (100, 163), (200, blocks - 40)];
        let (s, dev) = scheme(&[(bs as u32, blocks, false), (512, 64, false)]);
        dev.set_contents(0, 0, &gpt_image(bs, blocks, &parts));

        let table = s.partition_table(0).unwrap();
        assert_eq!(table.kind, TableKind::Gpt);
        let want: Vec<Partition> = parts
            .iter()
            .map(|&(f, l)| Partition {
                start: f,
                blocks: l - f + 1,
            })
            .collect();
        assert_eq!(table.partitions, want, "block size {bs}");
        assert_eq!(listing(&s), "0\n0p0\n0p1\n0p2\n1\n");

        for (m, &(first, last)) in parts.iter().enumerate() {
            let path = format!("/0p{m}");
            let id = s.open(&path, O_RDWR, &ctx()).unwrap();
            let size = (last - first + 1) * bs;
            assert_eq!(s.fsize(id).unwrap(), size);
            let st = s.fstat(id).unwrap();
            assert_eq!(st.st_mode, MODE_FILE | 0o644);
            assert_eq!(st.st_blksize as u64, bs);
            assert_eq!(st.st_blocks, last - first + 1);
            assert_eq!(s.fpath(id).unwrap(), format!("{NAME}:0p{m}"));

            // Offset 0 of the partition is its first block on the disk.
            let mut buf = vec![0u8; 100];
            assert_eq!(s.read(id, 3, &mut buf).unwrap(), 100);
            assert_eq!(buf, dev.contents(0, first * bs + 3, 100));

            // Reads stop at the partition's end; writes too, and never touch the next block.
            dev.clear_calls();
            let after = dev.contents(0, (last + 1) * bs, bs as usize);
            let before = dev.contents(0, first * bs - bs, bs as usize);
            let mut buf = vec![0u8; 3000];
            assert_eq!(s.read(id, size - 10, &mut buf).unwrap(), 10);
            assert_eq!(&buf[..10], &dev.contents(0, (last + 1) * bs - 10, 10)[..]);
            assert_eq!(s.read(id, size, &mut buf).unwrap(), 0);
            assert_eq!(s.read(id, u64::MAX, &mut buf).unwrap(), 0);
            let data = vec![0xA5u8; 3000];
            assert_eq!(s.write(id, size - 7, &data).unwrap(), 7);
            assert_eq!(errno(s.write(id, size, &data)), ENOSPC);
            assert_eq!(errno(s.write(id, u64::MAX - 3, &data)), ENOSPC);
            assert_eq!(s.write(id, 0, &data[..5]).unwrap(), 5);
            assert_eq!(
                dev.contents(0, (last + 1) * bs - 7, 7),
                vec![0xA5u8; 7],
                "partition {m}: last bytes"
            );
            assert_eq!(dev.contents(0, first * bs, 5), vec![0xA5u8; 5]);
            assert_eq!(
                dev.contents(0, (last + 1) * bs, bs as usize),
                after,
                "neighbour after"
            );
            assert_eq!(
                dev.contents(0, first * bs - bs, bs as usize),
                before,
                "neighbour before"
            );
            assert_calls_inside(&dev, bs, first, last + 1);
            s.fsync(id).unwrap();
            s.close(id).unwrap();
        }
        assert_eq!(errno(s.open("0p3", O_RDONLY, &ctx())), ENOENT);
        assert_eq!(errno(s.open("1p0", O_RDONLY, &ctx())), ENOENT);
        assert_eq!(
            errno(s.open("0p0", O_RDONLY | O_DIRECTORY, &ctx())),
            ENOTDIR
        );
    }
}

#[test]
fn random_io_through_a_partition_matches_a_model() {
    let (s, dev) = scheme(&[(512, 1024, false)]);
    let (first, last) = (64u64, 191u64);
    dev.set_contents(0, 0, &gpt_image(512, 1024, &[(34, 63), (first, last)]));
    let size = ((last - first + 1) * 512) as usize;
    let id = s.open("0p1", O_RDWR, &ctx()).unwrap();
    let whole_before = dev.contents(0, 0, 1024 * 512);
    let mut model = dev.contents(0, first * 512, size);
    let mut rng = Rng::new(77);
    for _ in 0..300 {
        let off = rng.below(size as u64 + 100) as usize;
        let len = 1 + rng.below(3000) as usize;
        let data = rng.bytes(len);
        match s.write(id, off as u64, &data) {
            Ok(n) => {
                assert_eq!(n, len.min(size - off));
                model[off..off + n].copy_from_slice(&data[..n]);
            }
            Err(e) => assert!(off >= size && e.errno == ENOSPC, "{e:?} at {off}"),
        }
    }
    let mut back = vec![0u8; size];
    assert_eq!(s.read(id, 0, &mut back).unwrap(), size);
    assert!(back == model);
    let whole_after = dev.contents(0, 0, 1024 * 512);
    let (a, b) = ((first * 512) as usize, ((last + 1) * 512) as usize);
    assert!(
        whole_after[..a] == whole_before[..a],
        "bytes before changed"
    );
    assert!(whole_after[b..] == whole_before[b..], "bytes after changed");
}

#[test]
fn mbr_partitions_on_512_and_4096_byte_disks() {
    for bs in [512u32, 4096] {
        let (s, dev) = scheme(&[(bs, 1000, false)]);
        dev.set_contents(
            0,
            0,
            &mbr_sector(&[
                (0x83, 10, 90),   // 0p0
                (0x05, 100, 200), // extended container: left out
                (0x00, 0, 0),     // unused
                (0x0C, 300, 700), // 0p1, up to the last block
            ]),
        );
        let table = s.partition_table(0).unwrap();
        assert_eq!(table.kind, TableKind::Mbr);
        assert_eq!(
            table.partitions,
            vec![
                Partition {
                    start: 10,
                    blocks: 90
                },
                Partition {
                    start: 300,
                    blocks: 700
                }
            ]
        );
        assert_eq!(listing(&s), "0\n0p0\n0p1\n");
        let id = s.open("0p1", O_RDWR, &ctx()).unwrap();
        assert_eq!(s.fsize(id).unwrap(), 700 * u64::from(bs));
        dev.clear_calls();
        let mut buf = vec![0u8; 64];
        assert_eq!(s.read(id, 700 * u64::from(bs) - 1, &mut buf).unwrap(), 1);
        assert_eq!(buf[0], initial_byte(1000 * u64::from(bs) - 1));
        assert_calls_inside(&dev, u64::from(bs), 300, 1000);
    }
}

/// An EBR at block `at` of a disk with `bs`-byte blocks: its logical partition `(type,
/// start relative to the EBR, length)` and the link to the next EBR (start relative to the
/// container; `None`: the end of the chain).
fn ebr(dev: &MemDevice, bs: u32, at: u64, part: (u8, u32, u32), next: Option<u32>) {
    let mut entries = vec![part];
    if let Some(n) = next {
        entries.push((0x05, n, 1));
    }
    dev.set_contents(0, at * u64::from(bs), &mbr_sector(&entries));
}

#[test]
fn logical_partitions_follow_the_primaries_in_chain_order() {
    for bs in [512u32, 4096] {
        let (s, dev) = scheme(&[(bs, 1000, false)]);
        dev.set_contents(
            0,
            0,
            &mbr_sector(&[(0x83, 10, 90), (0x0F, 100, 400), (0x83, 600, 100)]),
        );
        // Container 100..500: EBRs at 100, 200 and 350 (links relative to 100).
        ebr(&dev, bs, 100, (0x83, 2, 50), Some(100)); // 102..152
        ebr(&dev, bs, 200, (0x07, 8, 92), Some(250)); // 208..300
        ebr(&dev, bs, 350, (0x83, 1, 149), None); // 351..500, the container's last block
        let table = s.partition_table(0).unwrap();
        assert_eq!(table.kind, TableKind::Mbr);
        let got: Vec<(u64, u64)> = table
            .partitions
            .iter()
            .map(|p| (p.start, p.blocks))
            .collect();
        assert_eq!(
            got,
            vec![(10, 90), (600, 100), (102, 50), (208, 92), (351, 149)]
        );
        assert_eq!(listing(&s), "0\n0p0\n0p1\n0p2\n0p3\n0p4\n");
        // I/O on a logical partition stays inside it.
        let id = s.open("0p3", O_RDWR, &ctx()).unwrap();
        assert_eq!(s.fsize(id).unwrap(), 92 * u64::from(bs));
        dev.clear_calls();
        let data = vec![0x5Au8; 3 * bs as usize];
        assert_eq!(s.write(id, 91 * u64::from(bs), &data).unwrap(), bs as usize);
        assert_calls_inside(&dev, u64::from(bs), 208, 300);
        s.close(id).unwrap();
    }
}

#[test]
fn hostile_ebr_chains_end_cleanly() {
    let bs = 512u32;
    // A chain that links back to itself: one partition, then the loop is noticed.
    let (s, dev) = scheme(&[(bs, 1000, false)]);
    dev.set_contents(0, 0, &mbr_sector(&[(0x05, 100, 400)]));
    ebr(&dev, bs, 100, (0x83, 1, 10), Some(100));
    ebr(&dev, bs, 200, (0x83, 1, 10), Some(0));
    let got: Vec<(u64, u64)> = s
        .partition_table(0)
        .unwrap()
        .partitions
        .iter()
        .map(|p| (p.start, p.blocks))
        .collect();
    assert_eq!(got, vec![(101, 10), (201, 10)]);

    // Logical partitions reaching past their container, a link outside it, a link past the
    // disk: left out, the chain stops, nothing panics.
    let (s, dev) = scheme(&[(bs, 1000, false)]);
    dev.set_contents(0, 0, &mbr_sector(&[(0x05, 100, 100)]));
    ebr(&dev, bs, 100, (0x83, 1, 150), Some(50)); // 101..251: past the container's end 200
    ebr(&dev, bs, 150, (0x83, 1, 10), Some(u32::MAX)); // kept; link far outside
    let got: Vec<(u64, u64)> = s
        .partition_table(0)
        .unwrap()
        .partitions
        .iter()
        .map(|p| (p.start, p.blocks))
        .collect();
    assert_eq!(got, vec![(151, 10)]);

    // A chain of more EBRs than the cap: bounded.
    let (s, dev) = scheme(&[(bs, 4000, false)]);
    dev.set_contents(0, 0, &mbr_sector(&[(0x05, 10, 3900)]));
    for i in 0..200u32 {
        let at = 10 + 2 * u64::from(i);
        ebr(&dev, bs, at, (0x83, 1, 1), Some(2 * (i + 1)));
    }
    let n = s.partition_table(0).unwrap().partitions.len();
    assert_eq!(n, crate::partitions::MAX_LOGICAL);
}

#[test]
fn bad_tables_give_no_partitions_and_never_panic() {
    // MBR entries outside the disk, or at block 0, are left out.
    let (s, dev) = scheme(&[(512, 100, false)]);
    dev.set_contents(
        0,
        0,
        &mbr_sector(&[
            (0x83, 50, 51),
            (0x83, 0, 10),
            (0x83, u32::MAX, u32::MAX),
            (0x83, 1, 99),
        ]),
    );
    assert_eq!(
        s.partition_table(0).unwrap().partitions,
        vec![Partition {
            start: 1,
            blocks: 99
        }]
    );

    // A boot sector whose entry status bytes are not 0x00/0x80 is not an MBR.
    let (s, dev) = scheme(&[(512, 100, false)]);
    let mut vbr = mbr_sector(&[(0x83, 1, 10)]);
    vbr[446] = 0x12;
    dev.set_contents(0, 0, &vbr);
    assert_eq!(s.partition_table(0).unwrap().kind, TableKind::None);

    // A protective MBR without a GPT: nothing.
    let (s, dev) = scheme(&[(512, 100, false)]);
    dev.set_contents(0, 0, &mbr_sector(&[(0xEE, 1, 99)]));
    assert_eq!(s.partition_table(0).unwrap().kind, TableKind::None);
    assert_eq!(listing(&s), "0\n");

    // GPT headers with entry sizes or counts the crate would assert on or read forever.
    for (offset, value) in [(84usize, 256u32), (80, 0x00FF_FFFF), (84, 0)] {
        let (s, dev) = scheme(&[(512, 2048, false)]);
        let mut img = gpt_image(512, 2048, &[(40, 99)]);
        for hdr in [512usize, 2047 * 512] {
            img[hdr + offset..hdr + offset + 4].copy_from_slice(&value.to_le_bytes());
        }
        dev.set_contents(0, 0, &img);
        assert_eq!(
            s.partition_table(0).unwrap().kind,
            TableKind::None,
            "field at {offset} = {value}"
        );
    }

    // A GPT whose headers fail their checksum: not used.
    let (s, dev) = scheme(&[(512, 2048, false)]);
    let mut img = gpt_image(512, 2048, &[(40, 99)]);
    img[512 + 40] ^= 1;
    img[2047 * 512 + 40] ^= 1;
    dev.set_contents(0, 0, &img);
    assert_eq!(s.partition_table(0).unwrap().kind, TableKind::None);

    // Only the backup header is intact: the GPT is still found (the crate falls back).
    let (s, dev) = scheme(&[(512, 2048, false)]);
    let mut img = gpt_image(512, 2048, &[(40, 99)]);
    img[512 + 40] ^= 1;
    dev.set_contents(0, 0, &img);
    assert_eq!(s.partition_table(0).unwrap().partitions.len(), 1);

    // Random garbage everywhere: no panic, whatever is found lies inside the disk.
    let mut rng = Rng::new(5);
    for _ in 0..50 {
        let (s, dev) = scheme(&[(512, 64, false)]);
        let mut junk = rng.bytes(64 * 512);
        junk[510] = 0x55;
        junk[511] = 0xAA;
        junk[512..520].copy_from_slice(b"EFI PART");
        dev.set_contents(0, 0, &junk);
        for p in &s.partition_table(0).unwrap().partitions {
            assert!(p.start > 0 && p.blocks > 0 && p.start + p.blocks <= 64);
        }
    }

    // Odd block sizes are never read as GPT.
    let (s, _) = scheme(&[(1024, 64, false)]);
    assert_eq!(s.partition_table(0).unwrap().kind, TableKind::None);
}

#[test]
fn table_read_errors_are_reported_and_not_cached() {
    let (s, dev) = scheme(&[(512, 2048, false)]);
    dev.set_contents(0, 0, &gpt_image(512, 2048, &[(40, 99)]));
    dev.fail(Op::Read, 0, 1, EIO);
    assert_eq!(errno(s.open("0p0", O_RDONLY, &ctx())), EIO);
    // Listing still works (the disk without its partitions) ...
    dev.fail(Op::Read, 0, 1, EIO);
    assert_eq!(listing(&s), "0\n");
    // ... and the next try reads the table.
    let id = s.open("0p0", O_RDONLY, &ctx()).unwrap();
    assert_eq!(s.fsize(id).unwrap(), 60 * 512);
}

#[test]
fn tables_are_reread_after_whole_disk_writes_and_disk_changes() {
    let (s, dev) = scheme(&[(512, 2048, false)]);
    assert_eq!(listing(&s), "0\n");

    // A new table written through the whole disk is seen once that handle is closed.
    let img = gpt_image(512, 2048, &[(40, 99), (100, 199)]);
    let w = s.open("0", O_WRONLY, &ctx()).unwrap();
    assert_eq!(s.write(w, 0, &img[..34 * 512]).unwrap(), 34 * 512);
    assert_eq!(
        s.write(w, 2015 * 512, &img[2015 * 512..]).unwrap(),
        33 * 512
    );
    assert_eq!(errno(s.open("0p0", O_RDONLY, &ctx())), ENOLCK);
    s.close(w).unwrap();
    assert_eq!(listing(&s), "0\n0p0\n0p1\n");
    dev.clear_calls();
    assert_eq!(listing(&s), "0\n0p0\n0p1\n");
    assert!(dev.calls().is_empty(), "unchanged table was read again");

    // An open partition whose table entry moves (medium changed) gets ENODEV.
    let p1 = s.open("0p1", O_RDWR, &ctx()).unwrap();
    assert_eq!(s.fsize(p1).unwrap(), 100 * 512);
    dev.set_contents(0, 0, &gpt_image(512, 2048, &[(40, 99), (120, 199)]));
    // Same generation, same size: the cached table (and handle) stay.
    assert_eq!(s.fsize(p1).unwrap(), 100 * 512);
    dev.set_generation(0, 1);
    assert_eq!(errno(s.fsize(p1)), ENODEV);
    assert_eq!(errno(s.read(p1, 0, &mut [0u8; 8])), ENODEV);
    assert_eq!(errno(s.write(p1, 0, b"x")), ENODEV);
    assert_eq!(errno(s.fsync(p1)), ENODEV);
    s.close(p1).unwrap();
    let p1 = s.open("0p1", O_RDONLY, &ctx()).unwrap();
    assert_eq!(s.fsize(p1).unwrap(), 80 * 512);
    // An unchanged partition keeps working across the change.
    let p0 = s.open("0p0", O_RDONLY, &ctx()).unwrap();
    dev.set_generation(0, 2);
    assert_eq!(s.fsize(p0).unwrap(), 60 * 512);

    // A disk that shrinks below a partition: the entry is left out, the handle gets ENODEV.
    dev.set_blocks(0, 150);
    assert_eq!(errno(s.fsize(p1)), ENODEV);
    assert_eq!(s.fsize(p0).unwrap(), 60 * 512);
    assert_eq!(listing(&s), "0\n0p0\n");
}

#[test]
fn whole_disk_and_partitions_exclude_each_other() {
    let (s, dev) = scheme(&[(512, 2048, false), (512, 2048, false)]);
    dev.set_contents(0, 0, &gpt_image(512, 2048, &[(40, 99), (100, 199)]));
    dev.set_contents(1, 0, &gpt_image(512, 2048, &[(40, 99)]));

    // Partitions of one disk open together, any modes.
    let a = s.open("0p0", O_RDWR, &ctx()).unwrap();
    let b = s.open("0p1", O_RDONLY, &ctx()).unwrap();
    let b2 = s.open("0p1", O_WRONLY, &ctx()).unwrap();
    let none = s.open("0p1", 0, &ctx()).unwrap();
    for flags in [O_RDONLY, O_WRONLY, O_RDWR, 0] {
        assert_eq!(errno(s.open("0", flags, &ctx())), ENOLCK, "flags {flags}");
    }
    // O_STAT handles and the root are not I/O handles: no conflict.
    let st = s.open("0", O_STAT, &ctx()).unwrap();
    assert_eq!(s.fsize(st).unwrap(), 2048 * 512);
    let root = s.open("", O_RDONLY, &ctx()).unwrap();
    // Another disk is independent.
    let d1 = s.open("1", O_RDWR, &ctx()).unwrap();
    assert_eq!(errno(s.open("1p0", O_RDONLY, &ctx())), ENOLCK);
    let st1 = s.open("1p0", O_STAT, &ctx()).unwrap();
    assert_eq!(s.fsize(st1).unwrap(), 60 * 512);
    assert_eq!(s.opens.counts(0), (0, 4));
    assert_eq!(s.opens.counts(1), (1, 0));

    // Closing all but one partition handle still blocks the disk; the last one frees it.
    for id in [a, b, none] {
        s.close(id).unwrap();
        assert_eq!(errno(s.open("0", O_RDONLY, &ctx())), ENOLCK);
    }
    s.close(b2).unwrap();
    let w1 = s.open("0", O_RDONLY, &ctx()).unwrap();
    let w2 = s.open("/0", O_RDWR, &ctx()).unwrap();
    for p in ["0p0", "/0p1"] {
        for flags in [O_RDONLY, O_RDWR] {
            assert_eq!(errno(s.open(p, flags, &ctx())), ENOLCK);
        }
    }
    s.close(w1).unwrap();
    assert_eq!(errno(s.open("0p0", O_RDONLY, &ctx())), ENOLCK);
    s.close(w2).unwrap();
    let again = s.open("0p0", O_RDONLY, &ctx()).unwrap();
    s.close(again).unwrap();
    s.close(d1).unwrap();
    let p = s.open("1p0", O_RDONLY, &ctx()).unwrap();
    for id in [st, root, st1, p] {
        s.close(id).unwrap();
    }
    assert_eq!(s.opens.counts(0), (0, 0));
    assert_eq!(s.opens.counts(1), (0, 0));
    // A failed open holds nothing.
    assert_eq!(errno(s.open("0p9", O_RDONLY, &ctx())), ENOENT);
    let w = s.open("0", O_RDWR, &ctx()).unwrap();
    s.close(w).unwrap();
}

#[test]
fn exclusion_under_concurrent_opens() {
    let (s, dev) = scheme(&[(512, 2048, false)]);
    dev.set_contents(0, 0, &gpt_image(512, 2048, &[(40, 99)]));
    let s = Arc::new(s);
    std::thread::scope(|scope| {
        for t in 0..8 {
            let s = s.clone();
            scope.spawn(move || {
                let path = if t % 2 == 0 { "0" } else { "0p0" };
                for _ in 0..500 {
                    if let Ok(id) = s.open(path, O_RDONLY, &ctx()) {
                        let (whole, parts) = s.opens.counts(0);
                        assert!(whole == 0 || parts == 0, "both held: {whole} {parts}");
                        s.close(id).unwrap();
                    }
                }
            });
        }
    });
    assert_eq!(s.opens.counts(0), (0, 0));
}

#[test]
fn modes_and_readonly_disks_apply_to_partitions() {
    let (s, dev) = scheme(&[(512, 2048, true)]);
    dev.set_contents(0, 0, &gpt_image(512, 2048, &[(40, 99)]));
    assert_eq!(errno(s.open("0p0", O_RDWR, &ctx())), EROFS);
    assert_eq!(errno(s.open("0p0", O_WRONLY, &ctx())), EROFS);
    let ro = s.open("0p0", O_RDONLY, &ctx()).unwrap();
    assert_eq!(errno(s.write(ro, 0, b"x")), EBADF);
    assert_eq!(s.fstat(ro).unwrap().st_mode, MODE_FILE | 0o444);
    let st = s.open("0p0", O_STAT | O_RDWR, &ctx()).unwrap();
    assert_eq!(errno(s.read(st, 0, &mut [0u8; 4])), EBADF);
    assert_eq!(errno(s.fsync(st)), EBADF);

    let (s, dev) = scheme(&[(512, 2048, false)]);
    dev.set_contents(0, 0, &gpt_image(512, 2048, &[(40, 99)]));
    let ro = s.open("0p0", O_RDONLY, &ctx()).unwrap();
    dev.clear_calls();
    assert_eq!(errno(s.write(ro, 0, b"x")), EBADF);
    let wo = s.open("0p0", O_WRONLY, &ctx()).unwrap();
    assert_eq!(errno(s.read(wo, 0, &mut [0u8; 4])), EBADF);
    assert!(dev.calls().iter().all(|c| c.op != Op::Write));
    // Distinct inode numbers for the disk and each partition.
    let d = s.open("0", O_STAT, &ctx()).unwrap();
    assert_ne!(s.fstat(d).unwrap().st_ino, s.fstat(ro).unwrap().st_ino);
}

#[test]
fn access_policy_decides_every_open() {
    let user = CallerCtx {
        uid: 1000,
        gid: 100,
        pid: 9,
    };
    let other = CallerCtx {
        uid: 1001,
        gid: 200,
        pid: 10,
    };
    let paths = ["", "/", "0", "/0p0", "0p9", "7", "x"];
    let modes = [O_RDONLY, O_WRONLY, O_RDWR, O_STAT, O_RDONLY | O_DIRECTORY];

    // The default is Redox's: uid 0 only, EACCES for everyone else, whatever they open.
    let (s, dev) = scheme(&[(512, 2048, false)]);
    dev.set_contents(0, 0, &gpt_image(512, 2048, &[(40, 99)]));
    assert_eq!(s.access(), &AccessPolicy::root_only());
    for p in paths {
        for m in modes {
            if p != "x" {
                assert_eq!(errno(s.open(p, m, &user)), EACCES, "{p:?} {m:#x}");
            }
        }
    }
    assert!(s.open("0p0", O_RDWR, &ctx()).is_ok());

    // Allowed uids and gids; uid 0 always.
    let dev = MemDevice::new(&[(512, 2048, false)]);
    let policy = AccessPolicy::root_only()
        .allow_uid(0)
        .allow_uid(1000)
        .allow_uid(1000)
        .allow_gid(200);
    let s = DiskScheme::with_access(NAME, dev, policy);
    let nobody = CallerCtx {
        uid: 65534,
        gid: 65534,
        pid: 11,
    };
    for who in [ctx(), user, other] {
        let id = s.open("0", O_RDWR, &who).unwrap();
        s.close(id).unwrap();
    }
    for m in modes {
        assert_eq!(errno(s.open("0", m, &nobody)), EACCES);
    }
    assert_eq!(
        s.access().to_string(),
        "uid 0, uid 1000, gid 200",
        "display"
    );

    // Any caller.
    let dev = MemDevice::new(&[(512, 8, false)]);
    let s = DiskScheme::with_access(NAME, dev, AccessPolicy::any_caller());
    let id = s.open("0", O_RDWR, &nobody).unwrap();
    assert_eq!(s.caller(id).unwrap(), nobody);
}

#[test]
fn a_disk_with_no_blocks_is_absent_until_it_returns() {
    let (s, dev) = scheme(&[(512, 2048, false), (512, 2048, false)]);
    dev.set_contents(1, 0, &gpt_image(512, 2048, &[(40, 99)]));
    let whole = s.open("1", O_RDONLY, &ctx()).unwrap();
    let st = s.open("1", O_STAT, &ctx()).unwrap();
    assert_eq!(listing(&s), "0\n1\n1p0\n");
    // Unplugged: the device keeps the number with no blocks.
    dev.set_blocks(1, 0);
    dev.set_generation(1, 1);
    assert_eq!(listing(&s), "0\n");
    for p in ["1", "1p0"] {
        assert_eq!(errno(s.open(p, O_RDONLY, &ctx())), ENOENT, "{p}");
        assert_eq!(errno(s.open(p, O_STAT, &ctx())), ENOENT, "{p}");
    }
    assert_eq!(errno(s.partition_table(1)), ENOENT);
    assert_eq!(errno(s.read(whole, 0, &mut [0u8; 8])), ENODEV);
    assert_eq!(errno(s.fsize(st)), ENODEV);
    assert_eq!(errno(s.fsync(whole)), ENODEV);
    s.close(whole).unwrap();
    // Back, same number, table read again.
    dev.set_blocks(1, 2048);
    dev.set_generation(1, 2);
    assert_eq!(listing(&s), "0\n1\n1p0\n");
    let p = s.open("1p0", O_RDONLY, &ctx()).unwrap();
    assert_eq!(s.fsize(p).unwrap(), 60 * 512);
}
