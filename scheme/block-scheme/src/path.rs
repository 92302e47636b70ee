//! Scheme path syntax: splitting a full path into scheme name and inner path, and parsing the
//! inner path (`""`/`"/"` root, `"N"` disk, `"NpM"` partition) into a [`SchemePath`].

use syscall::error::{EINVAL, ENOENT, Error};

use crate::Result;

/// What a path inside the scheme names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchemePath {
    /// The scheme root: a directory listing the disks (and later their partitions).
    Root,
    /// A whole disk, by index.
    Disk(usize),
    /// Partition `part` (counted from 0) of disk `disk`.
    Partition {
        /// Disk index.
        disk: usize,
        /// Partition index on that disk, from 0.
        part: usize,
    },
}

/// Splits a full scheme path into `(scheme name, path inside the scheme)`.
///
/// Accepted forms:
/// - legacy Redox `name:path`, e.g. `"disk.virtio-scsi:/0"` → `("disk.virtio-scsi", "/0")`,
///   `"disk.virtio-scsi:0p1"` → `("disk.virtio-scsi", "0p1")`, `"disk.virtio-scsi:"` → root;
///   the split is at the first `:`;
/// - current Redox `/scheme/name/path`, e.g. `"/scheme/disk.virtio-scsi/0"` →
///   `("disk.virtio-scsi", "/0")`, `"/scheme/disk.virtio-scsi"` → `("disk.virtio-scsi", "")`.
///
/// The inner path is returned unchanged (feed it to [`parse_path`]). `EINVAL` when there is no
/// scheme separator or the scheme name is empty or contains `/`, `:`, whitespace or control
/// characters.
pub fn split_scheme_path(full: &str) -> Result<(&str, &str)> {
    let (name, path) = if let Some(rest) = full.strip_prefix("/scheme/") {
        match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        }
    } else {
        full.split_once(':').ok_or(Error::new(EINVAL))?
    };
    let bad = |c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control();
    if name.is_empty() || name.contains(bad) {
        return Err(Error::new(EINVAL));
    }
    Ok((name, path))
}

/// Parses a path inside the scheme.
///
/// At most one leading `/` is accepted (`"0"` and `"/0"` are the same). A number is ASCII
/// decimal digits only, without sign and without leading zeros (`"0"` itself is fine), and
/// must fit in `usize`. Anything else — `"x"`, `"-1"`, `"+1"`, `"00"`, `"01"`, `"0p"`, `"p0"`,
/// `"0p1p2"`, `"0/"`, `"//0"`, overflowing numbers, non-ASCII digits — is `ENOENT` (no such
/// name exists in the scheme). Never panics.
pub fn parse_path(path: &str) -> Result<SchemePath> {
    let p = path.strip_prefix('/').unwrap_or(path);
    if p.is_empty() {
        return Ok(SchemePath::Root);
    }
    match p.split_once('p') {
        Some((disk, part)) => Ok(SchemePath::Partition {
            disk: parse_index(disk)?,
            part: parse_index(part)?,
        }),
        None => Ok(SchemePath::Disk(parse_index(p)?)),
    }
}

/// A canonical decimal index: non-empty, ASCII digits, no leading zero unless it is `"0"`.
fn parse_index(s: &str) -> Result<usize> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if !canonical {
        return Err(Error::new(ENOENT));
    }
    s.parse::<usize>().map_err(|_| Error::new(ENOENT))
}

/// The inner path of a target, Redox style (no leading slash): `""`, `"N"`, `"NpM"`.
pub(crate) fn format_path(target: SchemePath) -> String {
    match target {
        SchemePath::Root => String::new(),
        SchemePath::Disk(d) => d.to_string(),
        SchemePath::Partition { disk, part } => format!("{disk}p{part}"),
    }
}
