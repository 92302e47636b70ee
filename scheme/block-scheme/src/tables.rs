//! The partition-table cache: each disk's table is read on first use and read again when the
//! disk changes — a different block size or block count, a new [`BlockDevice::generation`]
//! (medium changed), or any write through a whole-disk handle (which may have rewritten the
//! table; writes through partition handles cannot reach it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::io::Geometry;
use crate::partitions::{self, PartitionTable, TableKind};
use crate::{BlockDevice, DiskInfo, Result};

/// What a cached table was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DiskKey {
    block_size: u32,
    blocks: u64,
    generation: u64,
}

#[derive(Debug, Default)]
struct Entry {
    /// Whole-disk writes so far (only grows).
    writes: u64,
    /// The last table read, with the key and write count it was read at.
    cached: Option<(DiskKey, u64, Arc<PartitionTable>)>,
}

/// See the module documentation.
///
/// Invariant: a cached table is used only while its key equals the disk's current key and no
/// whole-disk write was counted since the read began (the count is taken before reading and
/// a result is stored only if it is unchanged, so a write racing with a read makes the next
/// lookup read again). The mutex is never held during device I/O; its critical sections only
/// read and update fields, so poisoning is recovered with `into_inner`.
#[derive(Debug, Default)]
pub(crate) struct TableCache {
    map: Mutex<HashMap<usize, Entry>>,
}

impl TableCache {
    /// Notes a write through a whole-disk handle of `disk` (call after the write).
    pub(crate) fn note_write(&self, disk: usize) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let e = map.entry(disk).or_default();
        e.writes = e.writes.wrapping_add(1);
    }

    /// The table of `disk` (with device info `info` and whole-disk geometry `geo`), from the
    /// cache or read now. Device errors are returned and not cached.
    pub(crate) fn get<D: BlockDevice + ?Sized>(
        &self,
        dev: &D,
        disk: usize,
        info: &DiskInfo,
        geo: &Geometry,
    ) -> Result<Arc<PartitionTable>> {
        let key = DiskKey {
            block_size: info.block_size,
            blocks: info.blocks,
            generation: dev.generation(disk),
        };
        let writes = {
            let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
            let e = map.entry(disk).or_default();
            if let Some((k, w, table)) = &e.cached
                && *k == key
                && *w == e.writes
            {
                return Ok(table.clone());
            }
            e.writes
        };
        let table = Arc::new(partitions::read_table(dev, disk, geo)?);
        match table.kind {
            TableKind::None => log::info!("disk {disk}: no partition table"),
            kind => log::info!(
                "disk {disk}: {kind:?} with {} partition(s): {:?}",
                table.partitions.len(),
                table.partitions
            ),
        }
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let e = map.entry(disk).or_default();
        if e.writes == writes {
            e.cached = Some((key, writes, table.clone()));
        }
        Ok(table)
    }
}
