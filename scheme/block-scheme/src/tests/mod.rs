//! Unit tests of the scheme against the in-memory fixture device, plus shared helpers.

mod async_io;
mod concurrency;
mod discard;
mod fixture;
mod io;
mod open;
mod partitions;
mod paths;

use std::sync::Arc;

use crate::{CallerCtx, DiskScheme, Result};
use fixture::MemDevice;

pub(crate) const NAME: &str = "disk.virtio-scsi";

pub(crate) fn ctx() -> CallerCtx {
    CallerCtx {
        uid: 0,
        gid: 0,
        pid: 42,
    }
}

/// A scheme over a fresh fixture with disks `(block_size, blocks, readonly)`.
pub(crate) fn scheme(disks: &[(u32, u64, bool)]) -> (DiskScheme<MemDevice>, Arc<MemDevice>) {
    let dev = MemDevice::new(disks);
    (DiskScheme::new(NAME, dev.clone()), dev)
}

/// The errno of a result that must be an error.
pub(crate) fn errno<T: std::fmt::Debug>(r: Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.errno,
    }
}

/// SplitMix64: a small seeded PRNG, so failures reproduce.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}
