//! Byte-granular I/O against a reference model: random unaligned reads and writes, chunking
//! of large requests, end-of-device behaviour at every boundary, offsets near `u64::MAX`, and
//! device errors.

use syscall::error::{EAGAIN, EIO, ENOSPC, EROFS};
use syscall::flag::{O_RDONLY, O_RDWR};

use super::fixture::{Call, MemDevice, Op, initial_byte};
use super::{Rng, ctx, errno, scheme};
use crate::{DiskScheme, MAX_IO_CHUNK, Result};

/// The reference model of a disk: what a read returns and a write does.
struct Model(Vec<u8>);

impl Model {
    fn new(size: usize) -> Self {
        Self((0..size as u64).map(initial_byte).collect())
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let size = self.0.len() as u64;
        if offset >= size {
            return Vec::new();
        }
        let o = offset as usize;
        let n = len.min(self.0.len() - o);
        self.0[o..o + n].to_vec()
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let size = self.0.len() as u64;
        if offset >= size {
            return Err(syscall::Error::new(ENOSPC));
        }
        let o = offset as usize;
        let n = data.len().min(self.0.len() - o);
        self.0[o..o + n].copy_from_slice(&data[..n]);
        Ok(n)
    }
}

/// An offset that likes block boundaries and the end of the device.
fn pick_offset(rng: &mut Rng, bs: u64, size: u64) -> u64 {
    let blocks = size / bs;
    match rng.below(6) {
        0 => rng.below(size + 2 * bs),
        1 | 2 => (rng.below(blocks + 2) * bs).saturating_add_signed(rng.below(7) as i64 - 3),
        3 => size.saturating_sub(rng.below(2 * bs + 2)),
        4 => size + rng.below(3),
        _ => rng.below(blocks) * bs,
    }
}

fn pick_len(rng: &mut Rng, bs: u64, size: u64) -> usize {
    (match rng.below(7) {
        0 => 0,
        1 => rng.below(16),
        2 => bs - 1 + rng.below(3),
        3 => rng.below(3 * bs),
        4 => bs * (1 + rng.below(4)),
        5 => (2 * bs).saturating_add_signed(rng.below(7) as i64 - 3),
        _ => rng.below(size),
    }) as usize
}

fn check_write_calls(calls: &[Call], bs: usize, offset: u64, len: usize) {
    let reads: Vec<_> = calls.iter().filter(|c| c.op == Op::Read).collect();
    assert!(reads.len() <= 2, "more than head and tail read: {calls:?}");
    assert!(reads.iter().all(|c| c.len == bs));
    let aligned = offset.checked_rem(bs as u64) == Some(0) && len.checked_rem(bs) == Some(0);
    if aligned {
        assert!(
            reads.is_empty(),
            "aligned write did read-modify-write: {calls:?}"
        );
    }
    assert!(calls.iter().all(|c| c.len <= MAX_IO_CHUNK.max(bs)));
}

fn random_io(bs: u32, blocks: u64, seed: u64, ops: usize) {
    let (s, dev) = scheme(&[(bs, blocks, false)]);
    let bsu = u64::from(bs);
    let size = bsu * blocks;
    let id = s.open("0", O_RDWR, &ctx()).unwrap();
    let mut model = Model::new(size as usize);
    let mut rng = Rng::new(seed);
    for i in 0..ops {
        let offset = pick_offset(&mut rng, bsu, size);
        let len = pick_len(&mut rng, bsu, size);
        dev.clear_calls();
        if rng.below(2) == 0 {
            let data = rng.bytes(len);
            let got = s.write(id, offset, &data);
            let want = model.write(offset, &data);
            assert_eq!(got, want, "op {i}: write {len} at {offset}");
            let calls = dev.calls();
            match got {
                Ok(n) => check_write_calls(&calls, bs as usize, offset, n),
                Err(_) => assert!(calls.is_empty()),
            }
            if len == 0 {
                assert!(calls.is_empty(), "zero-length write did I/O");
            }
            assert!(
                dev.contents(0, 0, size as usize) == model.0,
                "op {i}: disk differs from the model after write {len} at {offset}"
            );
        } else {
            let mut buf = vec![0xEE; len];
            let n = s.read(id, offset, &mut buf).unwrap();
            let want = model.read(offset, len);
            assert_eq!(n, want.len(), "op {i}: read {len} at {offset}");
            assert!(
                buf[..n] == want[..],
                "op {i}: read {len} at {offset}: wrong data"
            );
            assert!(
                buf[n..].iter().all(|&b| b == 0xEE),
                "read wrote past its count"
            );
            let calls = dev.calls();
            assert!(
                calls
                    .iter()
                    .all(|c| c.op == Op::Read && c.len <= MAX_IO_CHUNK)
            );
            if n == 0 {
                assert!(calls.is_empty(), "empty read did I/O");
            }
        }
    }
}

#[test]
fn random_unaligned_io_512() {
    random_io(512, 64, 1, 3000);
    random_io(512, 3, 2, 1000);
    random_io(512, 1, 3, 500);
}

#[test]
fn random_unaligned_io_4096() {
    random_io(4096, 24, 4, 3000);
    random_io(4096, 1, 5, 500);
}

/// Every offset/length combination around the block boundaries of a small disk.
#[test]
fn exhaustive_small_writes_keep_neighbours() {
    for bs in [512u32, 4096] {
        let b = bs as u64;
        let (s, dev) = scheme(&[(bs, 3, false)]);
        let id = s.open("0", O_RDWR, &ctx()).unwrap();
        let mut model = Model::new(3 * bs as usize);
        let mut rng = Rng::new(u64::from(bs));
        let offsets = [0, 1, b - 1, b, b + 1, 2 * b - 1, 2 * b, 3 * b - 1];
        let lens = [
            1,
            2,
            b as usize - 1,
            b as usize,
            b as usize + 1,
            2 * b as usize + 1,
        ];
        for &o in &offsets {
            for &l in &lens {
                let data = rng.bytes(l);
                assert_eq!(s.write(id, o, &data), model.write(o, &data), "{l} at {o}");
                assert!(dev.contents(0, 0, 3 * bs as usize) == model.0, "{l} at {o}");
                let mut buf = vec![0; l];
                let n = s.read(id, o, &mut buf).unwrap();
                assert!(buf[..n] == model.read(o, l)[..]);
            }
        }
    }
}

fn rw(bs: u32, blocks: u64) -> (DiskScheme<MemDevice>, std::sync::Arc<MemDevice>, usize) {
    let (s, dev) = scheme(&[(bs, blocks, false)]);
    let id = s.open("0", O_RDWR, &ctx()).unwrap();
    (s, dev, id)
}

#[test]
fn large_requests_are_chunked() {
    for bs in [512u32, 4096] {
        let b = bs as usize;
        let blocks = (4 * MAX_IO_CHUNK / b) as u64;
        let (s, dev, id) = rw(bs, blocks);
        let mut rng = Rng::new(9);

        // Aligned read of 2.5 chunks: 3 calls, ascending, each at most MAX_IO_CHUNK.
        let mut buf = vec![0; MAX_IO_CHUNK * 5 / 2];
        dev.clear_calls();
        assert_eq!(s.read(id, 0, &mut buf).unwrap(), buf.len());
        let calls = dev.calls();
        assert_eq!(calls.len(), 3);
        assert!(
            calls
                .iter()
                .all(|c| c.op == Op::Read && c.len <= MAX_IO_CHUNK)
        );
        assert_eq!(calls.iter().map(|c| c.len).sum::<usize>(), buf.len());
        assert!(buf == dev.contents(0, 0, buf.len()));

        // Unaligned write of 2.5 chunks + 100 bytes at offset 300: head RMW, whole-block
        // chunks, tail RMW; every byte covered once, in ascending order.
        let data = rng.bytes(MAX_IO_CHUNK * 5 / 2 + 100);
        dev.clear_calls();
        assert_eq!(s.write(id, 300, &data).unwrap(), data.len());
        let calls = dev.calls();
        let reads: Vec<_> = calls.iter().filter(|c| c.op == Op::Read).collect();
        let writes: Vec<_> = calls.iter().filter(|c| c.op == Op::Write).collect();
        assert_eq!(reads.len(), 2, "{calls:?}");
        assert!(writes.iter().all(|c| c.len <= MAX_IO_CHUNK));
        let mut next = 0;
        for w in &writes {
            assert_eq!(w.lba, next, "writes not contiguous/ascending: {writes:?}");
            next = w.lba + (w.len / b) as u64;
        }
        assert_eq!(next, (300 + data.len() as u64).div_ceil(bs as u64));
        assert!(dev.contents(0, 300, data.len()) == data);
        assert_eq!(
            dev.contents(0, 0, 300),
            (0..300).map(initial_byte).collect::<Vec<_>>()
        );
    }
}

/// Reads and writes at every boundary around the end of the device.
#[test]
fn end_of_device() {
    for bs in [512u32, 4096] {
        let b = bs as u64;
        let size = 4 * b;
        let (s, dev, id) = rw(bs, 4);
        let offsets = [
            0,
            size - b - 1,
            size - b,
            size - 1,
            size,
            size + 1,
            size + b,
            u64::MAX / 2,
            u64::MAX - 1,
            u64::MAX,
        ];
        let lens = [
            0,
            1,
            b as usize - 1,
            b as usize,
            b as usize + 1,
            2 * b as usize,
        ];
        for &o in &offsets {
            for &l in &lens {
                let inside = size.saturating_sub(o).min(l as u64) as usize;
                dev.clear_calls();
                let mut buf = vec![0; l];
                assert_eq!(s.read(id, o, &mut buf).unwrap(), inside, "read {l} at {o}");
                if inside == 0 {
                    assert!(dev.calls().is_empty(), "read {l} at {o} did I/O");
                }
                let data = vec![0xA5; l];
                let got = s.write(id, o, &data);
                if l == 0 {
                    assert_eq!(got, Ok(0));
                } else if o >= size {
                    assert_eq!(errno(got), ENOSPC, "write {l} at {o}");
                } else {
                    assert_eq!(got, Ok(inside), "write {l} at {o}");
                }
                if inside == 0 {
                    assert!(dev.calls().is_empty(), "write {l} at {o} did I/O");
                }
            }
        }
        // Writing exactly up to the end, then continuing: short count, then ENOSPC.
        let data = vec![7u8; 100];
        assert_eq!(s.write(id, size - 30, &data), Ok(30));
        assert_eq!(errno(s.write(id, size, &data[30..])), ENOSPC);
        assert_eq!(dev.contents(0, size - 30, 30), vec![7u8; 30]);
    }
}

/// Offsets and sizes near u64::MAX: a disk whose byte size does not fit in u64.
#[test]
fn offsets_near_u64_max() {
    for bs in [512u32, 4096] {
        let b = u64::from(bs);
        let (s, dev, id) = rw(bs, u64::MAX);
        let size = (u64::MAX / b) * b;
        assert_eq!(s.fsize(id).unwrap(), size);
        let st = s.fstat(id).unwrap();
        assert_eq!((st.st_size, st.st_blocks), (size, size / b));

        let mut buf = [0u8; 100];
        assert_eq!(s.read(id, size - 10, &mut buf).unwrap(), 10);
        assert_eq!(s.read(id, size, &mut buf).unwrap(), 0);
        assert_eq!(s.read(id, u64::MAX, &mut buf).unwrap(), 0);
        assert_eq!(s.read(id, u64::MAX - 1, &mut buf).unwrap(), 0);

        assert_eq!(s.write(id, size - 5, b"0123456789"), Ok(5));
        assert_eq!(dev.contents(0, size - 5, 5), b"01234");
        assert_eq!(errno(s.write(id, size, b"x")), ENOSPC);
        assert_eq!(errno(s.write(id, u64::MAX, b"x")), ENOSPC);
        assert_eq!(s.write(id, u64::MAX, b""), Ok(0));

        // Straddling the last two blocks, unaligned on both sides.
        let o = size - b - 3;
        assert_eq!(s.write(id, o, &[1u8; 8]), Ok(8));
        assert_eq!(dev.contents(0, o, 8), vec![1u8; 8]);
        assert_eq!(s.read(id, o - 1, &mut buf[..10]).unwrap(), 10);
        assert_eq!(&buf[1..9], &[1u8; 8]);
    }
}

#[test]
fn device_read_error_fails_the_read() {
    let (s, dev, id) = rw(512, 16);
    for (skip, len, offset) in [(0, 10, 5), (0, 4096, 0), (1, 2000, 100), (2, 2000, 100)] {
        dev.fail(Op::Read, skip, 1, EIO);
        let mut buf = vec![0; len];
        assert_eq!(
            errno(s.read(id, offset, &mut buf)),
            EIO,
            "{skip} {len} {offset}"
        );
    }
    // Any errno comes through unchanged.
    dev.fail(Op::Read, 0, 1, EAGAIN);
    assert_eq!(errno(s.read(id, 0, &mut [0; 512])), EAGAIN);
    // And the next read works again.
    assert_eq!(s.read(id, 0, &mut [0; 512]), Ok(512));
}

#[test]
fn device_write_error_fails_the_write() {
    let (s, dev, id) = rw(512, 16);
    let size = 16 * 512;

    // RMW read of the head fails: nothing is written at all.
    dev.clear_calls();
    dev.fail(Op::Read, 0, 1, EIO);
    assert_eq!(errno(s.write(id, 10, b"abc")), EIO);
    assert!(dev.calls().iter().all(|c| c.op != Op::Write));
    assert_eq!(dev.contents(0, 0, size), Model::new(size).0);

    // The write of a single aligned block fails.
    dev.fail(Op::Write, 0, 1, EIO);
    assert_eq!(errno(s.write(id, 512, &[1; 512])), EIO);

    // The head RMW succeeds, the middle fails: still an error, not a short count.
    dev.fail(Op::Write, 1, 1, EIO);
    assert_eq!(errno(s.write(id, 100, &[2; 2000])), EIO);

    // The tail RMW's read fails after head and middle were written.
    dev.fail(Op::Read, 1, 1, EIO);
    assert_eq!(errno(s.write(id, 100, &[3; 2000])), EIO);

    // A device-reported errno comes through unchanged (e.g. write-protected medium).
    dev.fail(Op::Write, 0, 1, EROFS);
    assert_eq!(errno(s.write(id, 0, &[4; 512])), EROFS);

    // Flush errors reach fsync.
    dev.fail(Op::Flush, 0, 1, EIO);
    assert_eq!(errno(s.fsync(id)), EIO);
    s.fsync(id).unwrap();

    // After errors, the range locks are free and writes work.
    assert_eq!(s.write(id, 100, &[5; 2000]), Ok(2000));
    assert_eq!(dev.contents(0, 100, 2000), vec![5; 2000]);
    let lock = s.range_lock(0);
    assert_eq!(lock.held_count(), 0);
}

#[test]
fn read_only_handle_on_read_only_disk_reads() {
    let (s, dev) = scheme(&[(4096, 4, true)]);
    let id = s.open("0", O_RDONLY, &ctx()).unwrap();
    let mut buf = vec![0; 5000];
    assert_eq!(s.read(id, 3000, &mut buf), Ok(5000));
    assert!(buf == dev.contents(0, 3000, 5000));
}
