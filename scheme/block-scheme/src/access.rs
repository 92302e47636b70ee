//! Who may open what: the [`AccessPolicy`] the scheme checks on every open, and the per-disk
//! open counts that make a whole-disk open and an open partition of the same disk exclude
//! each other (`ENOLCK`), as Redox's `storage/driver-block` does.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use syscall::error::{ENOLCK, Error};

use crate::{CallerCtx, Result};

/// Which callers may open anything in the scheme (checked on every open, also of the root and
/// with `O_STAT`; refused callers get `EACCES`).
///
/// uid 0 is always allowed. On Redox, where the kernel supplies the caller's uid, the policy
/// is [`AccessPolicy::root_only`], exactly what `driver-block` enforces. On the host the
/// socket's file permissions decide who can connect at all, and this policy decides, from
/// the peer's credentials (`SO_PEERCRED`: uid and primary gid; supplementary groups are not
/// visible there), which of those may open disks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    any: bool,
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl AccessPolicy {
    /// Only uid 0 (Redox's rule; the default).
    pub fn root_only() -> Self {
        Self::default()
    }

    /// Every caller that can reach the scheme (on the host: that can connect to the socket).
    pub fn any_caller() -> Self {
        Self {
            any: true,
            ..Self::default()
        }
    }

    /// Also allows callers with user id `uid` (uid 0 is always allowed already).
    pub fn allow_uid(mut self, uid: u32) -> Self {
        if uid != 0 && !self.uids.contains(&uid) {
            self.uids.push(uid);
        }
        self
    }

    /// Also allows callers whose (primary) group id is `gid`.
    pub fn allow_gid(mut self, gid: u32) -> Self {
        if !self.gids.contains(&gid) {
            self.gids.push(gid);
        }
        self
    }

    /// Whether `ctx` may open.
    pub fn permits(&self, ctx: &CallerCtx) -> bool {
        self.any || ctx.uid == 0 || self.uids.contains(&ctx.uid) || self.gids.contains(&ctx.gid)
    }
}

impl std::fmt::Display for AccessPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.any {
            return f.write_str("any caller");
        }
        f.write_str("uid 0")?;
        for u in &self.uids {
            write!(f, ", uid {u}")?;
        }
        for g in &self.gids {
            write!(f, ", gid {g}")?;
        }
        Ok(())
    }
}

/// What kind of I/O handle holds a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Holder {
    /// A whole-disk handle.
    Whole,
    /// A partition handle.
    Partition,
}

/// Open I/O handles per disk: how many whole-disk and how many partition handles.
///
/// Invariant: for every disk, at most one of the two counts is non-zero. Both counts change
/// only under the mutex (check and increment in one critical section), and every successful
/// [`OpenCounts::acquire`] is paired with exactly one [`OpenCounts::release`] (when its
/// handle is closed, or when inserting the handle failed). The critical sections only read
/// and update counters, so a poisoned mutex is recovered with `into_inner`.
#[derive(Debug, Default)]
pub(crate) struct OpenCounts {
    map: Mutex<HashMap<usize, (usize, usize)>>,
}

impl OpenCounts {
    /// Counts one more `holder` on `disk`; `ENOLCK` if the other kind holds it.
    pub(crate) fn acquire(&self, disk: usize, holder: Holder) -> Result<()> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let (whole, parts) = map.entry(disk).or_insert((0, 0));
        let (mine, other) = match holder {
            Holder::Whole => (whole, *parts),
            Holder::Partition => (parts, *whole),
        };
        if other > 0 {
            return Err(Error::new(ENOLCK));
        }
        *mine = mine.saturating_add(1);
        Ok(())
    }

    /// Undoes one [`OpenCounts::acquire`] of `holder` on `disk`.
    pub(crate) fn release(&self, disk: usize, holder: Holder) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(counts) = map.get_mut(&disk) {
            let n = match holder {
                Holder::Whole => &mut counts.0,
                Holder::Partition => &mut counts.1,
            };
            *n = n.saturating_sub(1);
            if *counts == (0, 0) {
                map.remove(&disk);
            }
        }
    }

    /// `(whole-disk, partition)` handles open on `disk` (for tests).
    #[cfg(test)]
    pub(crate) fn counts(&self, disk: usize) -> (usize, usize) {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&disk).copied().unwrap_or((0, 0))
    }
}
