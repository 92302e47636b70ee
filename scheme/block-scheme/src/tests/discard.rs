//! Discard, write zeroes, identity and `can_discard` against the fixture: whole blocks only,
//! never a byte outside the range, partition windows, the range lock, every error in its order,
//! and write zeroes (device command or zero buffers) against a model at unaligned edges.

use std::sync::{Arc, Mutex};

use syscall::error::{EBADF, EINVAL, EIO, ENOSPC, EOPNOTSUPP, EROFS};
use syscall::flag::{O_RDONLY, O_RDWR, O_STAT};

use super::fixture::{DISCARDED, MemDevice, Op, initial_byte};
use super::{Rng, ctx, errno, scheme};
use crate::{DiskScheme, MAX_IO_CHUNK};

fn pattern(start: u64, len: usize) -> Vec<u8> {
    (start..start + len as u64).map(initial_byte).collect()
}

/// A writable handle on disk 0 of a fresh fixture with discard switched on.
fn discarding(bs: u32, blocks: u64) -> (DiskScheme<MemDevice>, Arc<MemDevice>, usize) {
    let (s, dev) = scheme(&[(bs, blocks, false)]);
    dev.set_discard(true);
    let id = s.open("0", O_RDWR, &ctx()).unwrap();
    (s, dev, id)
}

#[test]
fn discard_takes_whole_blocks_and_touches_nothing_else() {
    for bs in [512u32, 4096] {
        let b = u64::from(bs);
        let (s, dev, id) = discarding(bs, 16);
        let size = (16 * b) as usize;
        s.discard(id, 3 * b, 4 * b).unwrap();
        let calls = dev.calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(
            (calls[0].op, calls[0].lba, calls[0].len),
            (Op::Discard, 3, 4 * bs as usize)
        );
        let mut want = pattern(0, size);
        want[(3 * b) as usize..(7 * b) as usize].fill(DISCARDED);
        assert!(dev.contents(0, 0, size) == want, "bs {bs}");

        // Never rounded: anything unaligned or outside the disk is EINVAL, with no device call.
        dev.clear_calls();
        for (offset, len) in [
            (1, b),
            (b, b - 1),
            (b, b + 1),
            (b - 1, 2 * b),
            (15 * b, 2 * b),
            (16 * b, b),
            (u64::MAX - b + 1, b),
            (b, u64::MAX - b + 1),
        ] {
            assert_eq!(
                errno(s.discard(id, offset, len)),
                EINVAL,
                "{len} at {offset}"
            );
        }
        // Zero length: nothing to do, anywhere.
        s.discard(id, 0, 0).unwrap();
        s.discard(id, 1 << 40, 0).unwrap();
        s.discard(id, 15 * b, b).unwrap(); // the last block
        assert_eq!(
            dev.calls().len(),
            1,
            "only the last-block discard reached the device"
        );
        want[(15 * b) as usize..].fill(DISCARDED);
        assert!(dev.contents(0, 0, size) == want);
    }
}

#[test]
fn discard_errors_in_their_order() {
    let (s, dev, id) = discarding(512, 8);
    // Handles that may not write: read-only, O_STAT, the root, closed, unknown.
    let ro = s.open("0", O_RDONLY, &ctx()).unwrap();
    let st = s.open("0", O_STAT | O_RDWR, &ctx()).unwrap();
    let root = s.open("", O_RDONLY, &ctx()).unwrap();
    let closed = s.open("0", O_RDWR, &ctx()).unwrap();
    s.close(closed).unwrap();
    for h in [ro, st, root, closed, 999] {
        assert_eq!(errno(s.discard(h, 0, 512)), EBADF, "handle {h}");
    }
    // The device cannot discard: EOPNOTSUPP (after the range checks).
    dev.set_discard(false);
    assert_eq!(errno(s.discard(id, 1, 512)), EINVAL);
    assert_eq!(errno(s.discard(id, 0, 512)), EOPNOTSUPP);
    dev.set_discard(true);
    // The device fails: its errno, and the table of this disk is not re-read for nothing.
    dev.fail(Op::Discard, 0, 1, EIO);
    assert_eq!(errno(s.discard(id, 0, 512)), EIO);
    // A disk that became read-only under an open handle: EROFS before anything else.
    dev.set_readonly(0, true);
    assert_eq!(errno(s.discard(id, 1, 512)), EROFS);
    assert_eq!(errno(s.discard(id, 0, 512)), EROFS);
    assert!(
        dev.calls().iter().all(|c| c.op != Op::Discard || c.failed),
        "no discard reached the device: {:?}",
        dev.calls()
    );
}

#[test]
fn discard_through_a_partition_stays_inside_it() {
    for bs in [512u32, 4096] {
        let b = u64::from(bs);
        let (s, dev) = scheme(&[(bs, 64, false)]);
        dev.set_discard(true);
        // One MBR partition: blocks 8..24 (the table counts in the disk's blocks).
        let mut mbr = [0u8; 512];
        mbr[446 + 4] = 0x83;
        mbr[446 + 8..446 + 12].copy_from_slice(&8u32.to_le_bytes());
        mbr[446 + 12..446 + 16].copy_from_slice(&16u32.to_le_bytes());
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        dev.set_contents(0, 0, &mbr);
        let before = dev.contents(0, 0, (64 * b) as usize);
        let p = s.open("0p0", O_RDWR, &ctx()).unwrap();
        assert_eq!(s.fsize(p).unwrap(), 16 * b);
        // The whole partition, then one past its end (EINVAL, nothing discarded).
        s.discard(p, 0, 16 * b).unwrap();
        assert_eq!(errno(s.discard(p, 15 * b, 2 * b)), EINVAL);
        assert_eq!(errno(s.discard(p, 16 * b, b)), EINVAL);
        let discards: Vec<_> = dev
            .calls()
            .into_iter()
            .filter(|c| c.op == Op::Discard)
            .collect();
        assert_eq!(discards.len(), 1);
        assert_eq!((discards[0].lba, discards[0].len), (8, 16 * bs as usize));
        let mut want = before;
        want[(8 * b) as usize..(24 * b) as usize].fill(DISCARDED);
        assert!(dev.contents(0, 0, (64 * b) as usize) == want, "bs {bs}");
    }
}

#[test]
fn discard_holds_the_range_lock() {
    let (s, dev, id) = discarding(512, 64);
    let lock = s.range_lock(0);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (l, v) = (lock.clone(), seen.clone());
    dev.set_hook(Some(Arc::new(move |op, _disk, lba| {
        if op == Op::Discard {
            v.lock().unwrap().push((lba, l.held_count()));
        }
    })));
    s.discard(id, 4096, 8192).unwrap();
    dev.set_hook(None);
    assert_eq!(*seen.lock().unwrap(), vec![(8, 1)]);
    assert_eq!(lock.held_count(), 0, "released after the discard");
}

#[test]
fn can_discard_says_what_the_disk_can_do() {
    let (s, dev) = scheme(&[(512, 8, false), (512, 8, true)]);
    let st = s.open("0", O_STAT, &ctx()).unwrap();
    let ro_disk = s.open("1", O_STAT, &ctx()).unwrap();
    let root = s.open("", O_RDONLY, &ctx()).unwrap();
    dev.clear_calls(); // the root's listing read the partition tables
    assert!(!s.can_discard(st).unwrap(), "device cannot");
    dev.set_discard(true);
    assert!(s.can_discard(st).unwrap());
    assert!(!s.can_discard(ro_disk).unwrap(), "read-only disk");
    assert!(!s.can_discard(root).unwrap());
    assert_eq!(errno(s.can_discard(12345)), EBADF);
    assert!(dev.calls().is_empty(), "no I/O to answer it");
}

#[test]
fn identity_of_disks_partitions_and_the_root() {
    let (s, dev) = scheme(&[(512, 64, false), (512, 8, false)]);
    let mut mbr = [0u8; 512];
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&8u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&8u32.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    dev.set_contents(0, 0, &mbr);
    let d0 = s.open("0", O_STAT, &ctx()).unwrap();
    let p0 = s.open("0p0", O_STAT, &ctx()).unwrap();
    let d1 = s.open("1", O_STAT, &ctx()).unwrap();
    let root = s.open("/", O_RDONLY, &ctx()).unwrap();
    let id = s.identity(d0).unwrap().expect("disk 0 has an identity");
    assert_eq!(
        (
            id.vendor.as_str(),
            id.product.as_str(),
            id.serial.as_deref()
        ),
        ("MEM", "FIXTURE DISK", Some("SER0"))
    );
    assert_eq!(s.identity(p0).unwrap(), Some(id), "a partition is its disk");
    assert_eq!(s.identity(d1).unwrap(), None);
    assert_eq!(s.identity(root).unwrap(), None);
    assert_eq!(errno(s.identity(777)), EBADF);
}

/// Write zeroes against a model, with and without the device's command.
fn zeroes_against_a_model(bs: u32, device_command: bool, seed: u64) {
    let blocks = (3 * MAX_IO_CHUNK as u64 / u64::from(bs)) + 5;
    let (s, dev) = scheme(&[(bs, blocks, false)]);
    dev.set_write_zeroes(device_command);
    let id = s.open("0", O_RDWR, &ctx()).unwrap();
    let b = u64::from(bs);
    let size = blocks * b;
    let mut model = pattern(0, size as usize);
    let mut rng = Rng::new(seed);
    for i in 0..60 {
        let offset = match rng.below(4) {
            0 => rng.below(size),
            1 => rng.below(blocks) * b,
            2 => size - rng.below(3 * b),
            _ => rng.below(blocks) * b + rng.below(3),
        };
        let len = match rng.below(4) {
            0 => rng.below(3 * b),
            1 => rng.below(4) * b,
            2 => rng.below(size),
            _ => 2 * MAX_IO_CHUNK as u64 + rng.below(3 * b),
        };
        // A pattern first, so that zeroes are visible.
        let fill = rng.bytes(usize::try_from(len.min(size - offset.min(size))).unwrap());
        if !fill.is_empty() {
            s.write(id, offset, &fill).unwrap();
            model[offset as usize..offset as usize + fill.len()].copy_from_slice(&fill);
        }
        dev.clear_calls();
        let got = s.write_zeroes(id, offset, len);
        if len == 0 {
            assert_eq!(got, Ok(0));
            assert!(dev.calls().is_empty());
            continue;
        }
        if offset >= size {
            assert_eq!(errno(got), ENOSPC, "op {i}");
            continue;
        }
        let n = len.min(size - offset);
        assert_eq!(got, Ok(n), "op {i}: {len} at {offset}");
        model[offset as usize..(offset + n) as usize].fill(0);
        assert!(
            dev.contents(0, 0, size as usize) == model,
            "op {i}: write zeroes of {len} at {offset} (device command: {device_command})"
        );
        let calls = dev.calls();
        let reads = calls.iter().filter(|c| c.op == Op::Read).count();
        assert!(reads <= 2, "only the edge blocks are read: {calls:?}");
        assert!(
            calls
                .iter()
                .all(|c| c.op != Op::Write || c.len <= MAX_IO_CHUNK)
        );
        let whole_blocks = ((offset + n) / b).saturating_sub(offset.div_ceil(b));
        if device_command && whole_blocks > 0 {
            let zeroed: usize = calls
                .iter()
                .filter(|c| c.op == Op::WriteZeroes)
                .map(|c| c.len)
                .sum();
            assert_eq!(zeroed as u64, whole_blocks * b, "op {i}: {calls:?}");
            assert!(
                calls
                    .iter()
                    .filter(|c| c.op == Op::Write)
                    .all(|c| c.len == bs as usize),
                "only edge blocks are written: {calls:?}"
            );
        } else {
            assert!(calls.iter().all(|c| c.op != Op::WriteZeroes));
        }
    }
}

#[test]
fn write_zeroes_with_the_device_command() {
    zeroes_against_a_model(512, true, 1);
    zeroes_against_a_model(4096, true, 2);
}

#[test]
fn write_zeroes_from_zero_buffers() {
    zeroes_against_a_model(512, false, 3);
    zeroes_against_a_model(4096, false, 4);
}

#[test]
fn write_zeroes_errors() {
    let (s, dev) = scheme(&[(512, 8, false)]);
    let ro = s.open("0", O_RDONLY, &ctx()).unwrap();
    let st = s.open("0", O_STAT, &ctx()).unwrap();
    let root = s.open("", O_RDONLY, &ctx()).unwrap();
    for h in [ro, st, root, 4242] {
        assert_eq!(errno(s.write_zeroes(h, 0, 512)), EBADF, "handle {h}");
    }
    let id = s.open("0", O_RDWR, &ctx()).unwrap();
    assert_eq!(errno(s.write_zeroes(id, 4096, 1)), ENOSPC);
    assert_eq!(s.write_zeroes(id, 4096, 0), Ok(0));
    assert_eq!(s.write_zeroes(id, 4000, u64::MAX), Ok(96));
    dev.set_write_zeroes(true);
    dev.fail(Op::WriteZeroes, 0, 1, EIO);
    assert_eq!(errno(s.write_zeroes(id, 0, 2048)), EIO);
    dev.set_readonly(0, true);
    assert_eq!(errno(s.write_zeroes(id, 0, 512)), EROFS);
}
