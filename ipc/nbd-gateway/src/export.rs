//! Exports: which NBD exports exist and what they look like, asked of the daemon through the
//! client library, and the mapping of client-library errors to NBD error values.
//!
//! Owns: export names (the scheme's root listing: `0`, `1`, `0p1`, ...; the empty name is the
//! first of them), each export's size, block size and read-only state (from `stat`) and
//! whether it can trim (the daemon's identity reply: the disk can discard), the transmission
//! flags and block-size constraints advertised for it, and errno mapping.

use syscall::error::{
    EACCES, EBUSY, EDQUOT, EFBIG, EINVAL, ENODEV, ENOENT, ENOLCK, ENOSPC, EOPNOTSUPP, EOVERFLOW,
    EPERM, EROFS, ESHUTDOWN,
};
use syscall::flag::O_STAT;
use vscsi_ipc::{Client, ClientError};

use crate::proto;

/// Largest read or write one request may carry (advertised as the maximum block size).
pub const MAX_REQUEST: u32 = 32 << 20;

/// One export: a disk or partition of the scheme.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    /// The NBD export name, which is also its path inside the scheme (`0`, `0p1`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The disk's logical block size (advertised as the preferred block size).
    pub block_size: u32,
    /// The disk refuses writes.
    pub read_only: bool,
    /// The disk can discard: `NBD_CMD_TRIM` is advertised and served.
    pub can_trim: bool,
}

impl Export {
    /// The path to open through the client library.
    pub fn scheme_path(&self) -> String {
        format!("/{}", self.name)
    }

    /// Transmission flags: flush always (it is harmless on a read-only disk); FUA and write
    /// zeroes only when writable; trim only when writable and the disk can discard;
    /// multi-connection, since every connection reaches the same daemon and a flush there
    /// (SYNCHRONIZE CACHE) covers every completed write of the disk.
    pub fn transmission_flags(&self) -> u16 {
        let mut f = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH | proto::FLAG_CAN_MULTI_CONN;
        if self.read_only {
            f |= proto::FLAG_READ_ONLY;
        } else {
            f |= proto::FLAG_SEND_FUA | proto::FLAG_SEND_WRITE_ZEROES;
            if self.can_trim {
                f |= proto::FLAG_SEND_TRIM;
            }
        }
        f
    }

    /// The whole blocks inside `[offset, offset + len)`, as (offset, length): what a trim of
    /// that range discards (the protocol lets a server round a trim inward). `None` when no
    /// whole block lies inside, or the range overflows.
    pub fn trim_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let bs = u64::from(self.block_size.max(1));
        let start = offset.checked_next_multiple_of(bs)?;
        let end = offset.checked_add(len)? / bs * bs;
        (start < end).then(|| (start, end - start))
    }

    /// (minimum, preferred, maximum) block sizes: any byte range works (the scheme does
    /// read-modify-write), whole aligned blocks avoid it, and one request carries at most
    /// [`MAX_REQUEST`] bytes.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        // The protocol wants a power of two of at least 512 as the preferred size.
        let preferred = if self.block_size.is_power_of_two() {
            self.block_size.max(512)
        } else {
            4096
        };
        (1, preferred, MAX_REQUEST)
    }

    /// A one-line description for people (`NBD_REP_SERVER`, `NBD_INFO_DESCRIPTION`).
    pub fn description(&self, scheme: &str) -> String {
        format!(
            "{scheme}:/{}: {} bytes, {}-byte blocks{}",
            self.name,
            self.size,
            self.block_size,
            if self.read_only { ", read-only" } else { "" }
        )
    }
}

/// Why an export could not be described or opened.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// No export has that name.
    #[error("no export named `{name}` (exports: {})", list.join(", "))]
    Unknown {
        /// The name asked for.
        name: String,
        /// The names that exist.
        list: Vec<String>,
    },
    /// The daemon answered with an error or could not be reached.
    #[error("{0}")]
    Backend(#[from] ClientError),
}

impl LookupError {
    /// The option error reply for it.
    pub fn reply_type(&self) -> u32 {
        match self {
            LookupError::Unknown { .. } => proto::REP_ERR_UNKNOWN,
            LookupError::Backend(e) => match e {
                ClientError::Disconnected | ClientError::Connect { .. } => proto::REP_ERR_SHUTDOWN,
                e => match e.errno() {
                    Some(EACCES | EPERM | EBUSY | ENOLCK) => proto::REP_ERR_POLICY,
                    _ => proto::REP_ERR_UNKNOWN,
                },
            },
        }
    }
}

/// The export names, in the daemon's order.
pub fn list(client: &Client) -> Result<Vec<String>, ClientError> {
    client.list(client.scheme())
}

/// Describes the export `name`; the empty name is the default export, the first listed.
pub fn lookup(client: &Client, name: &str) -> Result<Export, LookupError> {
    let names = list(client)?;
    let canonical = if name.is_empty() {
        names.first()
    } else {
        names.iter().find(|n| n.as_str() == name)
    };
    let Some(canonical) = canonical else {
        return Err(LookupError::Unknown {
            name: name.to_owned(),
            list: names,
        });
    };
    describe(client, canonical).map_err(|e| match e.errno() {
        // It went away between the listing and the stat.
        Some(ENOENT | ENODEV) => LookupError::Unknown {
            name: name.to_owned(),
            list: names.clone(),
        },
        _ => LookupError::Backend(e),
    })
}

/// Describes the listed export `name` (no listing look-up): its status and whether its disk
/// can discard, through one status-only handle.
pub fn describe(client: &Client, name: &str) -> Result<Export, ClientError> {
    let h = client.open_with_flags(&format!("/{name}"), O_STAT)?;
    let got = client
        .stat(&h)
        .and_then(|st| Ok((st, client.identity(&h)?)));
    let closed = client.close(h);
    let (st, details) = got?;
    closed?;
    // No write permission bit: the scheme reports a read-only disk as 0o444.
    let read_only = st.mode & 0o222 == 0;
    Ok(Export {
        name: name.to_owned(),
        size: st.size,
        block_size: st.block_size,
        read_only,
        can_trim: details.can_discard && !read_only,
    })
}

/// Every export, described.
pub fn all(client: &Client) -> Result<Vec<Export>, ClientError> {
    list(client)?
        .iter()
        .map(|name| describe(client, name))
        .collect()
}

/// The NBD error value for a failed client-library call.
pub fn nbd_errno(e: &ClientError) -> u32 {
    match e {
        ClientError::Errno { errno, .. } => match *errno {
            EROFS | EPERM | EACCES => proto::EPERM,
            ENOSPC | EDQUOT | EFBIG => proto::ENOSPC,
            EINVAL | EOVERFLOW => proto::EINVAL,
            EOPNOTSUPP => proto::ENOTSUP,
            ESHUTDOWN => proto::ESHUTDOWN,
            _ => proto::EIO,
        },
        ClientError::ShortWrite { .. } => proto::ENOSPC,
        // The daemon gone, a short read inside the advertised size, a protocol error: the
        // data is not there, which is an I/O error for the NBD client.
        _ => proto::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(read_only: bool, block_size: u32) -> Export {
        Export {
            name: "0".into(),
            size: 1 << 20,
            block_size,
            read_only,
            can_trim: false,
        }
    }

    #[test]
    fn flags() {
        let rw = export(false, 512).transmission_flags();
        assert_ne!(rw & proto::FLAG_HAS_FLAGS, 0);
        assert_ne!(rw & proto::FLAG_SEND_FLUSH, 0);
        assert_ne!(rw & proto::FLAG_SEND_FUA, 0);
        assert_ne!(rw & proto::FLAG_SEND_WRITE_ZEROES, 0);
        assert_eq!(rw & proto::FLAG_READ_ONLY, 0);
        assert_eq!(rw & proto::FLAG_SEND_TRIM, 0, "the disk cannot discard");
        let trim = Export {
            can_trim: true,
            ..export(false, 512)
        };
        assert_ne!(trim.transmission_flags() & proto::FLAG_SEND_TRIM, 0);
        let ro = export(true, 512).transmission_flags();
        assert_ne!(ro & proto::FLAG_READ_ONLY, 0);
        assert_eq!(ro & proto::FLAG_SEND_WRITE_ZEROES, 0);
        let ro_trim = Export {
            can_trim: true,
            ..export(true, 512)
        };
        assert_eq!(ro_trim.transmission_flags() & proto::FLAG_SEND_TRIM, 0);
    }

    #[test]
    fn trims_round_inward_to_whole_blocks() {
        let e = export(false, 4096);
        assert_eq!(e.trim_range(0, 8192), Some((0, 8192)));
        assert_eq!(e.trim_range(1, 8192), Some((4096, 4096)));
        assert_eq!(e.trim_range(100, 4000), None);
        assert_eq!(e.trim_range(4095, 4098), Some((4096, 4096)));
        assert_eq!(e.trim_range(0, 4095), None);
        assert_eq!(e.trim_range(0, 0), None);
        assert_eq!(e.trim_range(u64::MAX - 10, 5), None);
        assert_eq!(e.trim_range(4096, u64::MAX), None, "overflow");
    }

    #[test]
    fn block_sizes() {
        assert_eq!(export(false, 512).block_sizes(), (1, 512, MAX_REQUEST));
        assert_eq!(export(false, 4096).block_sizes(), (1, 4096, MAX_REQUEST));
        assert_eq!(export(false, 256).block_sizes(), (1, 512, MAX_REQUEST));
        assert_eq!(export(false, 520).block_sizes(), (1, 4096, MAX_REQUEST));
    }

    #[test]
    fn errno_mapping() {
        let e = |n| ClientError::from_errno(n);
        assert_eq!(nbd_errno(&e(EROFS)), proto::EPERM);
        assert_eq!(nbd_errno(&e(ENOSPC)), proto::ENOSPC);
        assert_eq!(nbd_errno(&e(EFBIG)), proto::ENOSPC);
        assert_eq!(nbd_errno(&e(EINVAL)), proto::EINVAL);
        assert_eq!(nbd_errno(&e(EOPNOTSUPP)), proto::ENOTSUP);
        assert_eq!(nbd_errno(&e(syscall::error::EIO)), proto::EIO);
        assert_eq!(nbd_errno(&e(ENODEV)), proto::EIO);
        assert_eq!(nbd_errno(&ClientError::Disconnected), proto::EIO);
        assert_eq!(
            LookupError::Backend(ClientError::Disconnected).reply_type(),
            proto::REP_ERR_SHUTDOWN
        );
        assert_eq!(
            LookupError::Backend(e(ENOLCK)).reply_type(),
            proto::REP_ERR_POLICY
        );
    }
}
