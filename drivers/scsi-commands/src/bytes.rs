//! Bounds-checked readers over untrusted device buffers (crate-private helpers).
//!
//! Every accessor returns `Option` so that a short buffer can never cause an
//! out-of-bounds index; all multi-byte fields are big-endian as in SPC/SBC.

/// One byte at `at`, if present.
pub(crate) fn byte(buf: &[u8], at: usize) -> Option<u8> {
    buf.get(at).copied()
}

/// `N` bytes starting at `at`, if all of them are present.
pub(crate) fn array<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    let end = at.checked_add(N)?;
    buf.get(at..end)?.try_into().ok()
}

/// Big-endian u16 at `at`.
pub(crate) fn be16(buf: &[u8], at: usize) -> Option<u16> {
    array::<2>(buf, at).map(u16::from_be_bytes)
}

/// Big-endian u32 at `at`.
pub(crate) fn be32(buf: &[u8], at: usize) -> Option<u32> {
    array::<4>(buf, at).map(u32::from_be_bytes)
}

/// Big-endian u64 at `at`.
pub(crate) fn be64(buf: &[u8], at: usize) -> Option<u64> {
    array::<8>(buf, at).map(u64::from_be_bytes)
}

/// The first `len` bytes of `buf`, or all of `buf` if it is shorter.
pub(crate) fn prefix(buf: &[u8], len: usize) -> &[u8] {
    buf.get(..len).unwrap_or(buf)
}

/// `buf[start..end]` clipped to what is present (empty if `start` is past the end).
pub(crate) fn clipped(buf: &[u8], start: usize, end: usize) -> &[u8] {
    let end = end.min(buf.len());
    buf.get(start..end).unwrap_or(&[])
}

/// Converts a device-supplied ASCII field to a `String`: NUL becomes a space,
/// bytes outside printable ASCII become `?`, and surrounding spaces are trimmed.
pub(crate) fn ascii_string(field: &[u8]) -> String {
    let s: String = field
        .iter()
        .map(|&b| match b {
            0 => ' ',
            0x20..=0x7E => char::from(b),
            _ => '?',
        })
        .collect();
    s.trim().to_owned()
}

/// Lower-case hex of `bytes` without separators.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len().saturating_mul(2));
    for b in bytes {
        // Writing into a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_never_go_out_of_bounds() {
        let buf = [1u8, 2, 3];
        assert_eq!(byte(&buf, 2), Some(3));
        assert_eq!(byte(&buf, 3), None);
        assert_eq!(be16(&buf, 1), Some(0x0203));
        assert_eq!(be16(&buf, 2), None);
        assert_eq!(be32(&buf, 0), None);
        assert_eq!(be64(&buf, usize::MAX), None);
        assert_eq!(prefix(&buf, 10), &buf);
        assert_eq!(clipped(&buf, 1, 10), &[2, 3]);
        assert_eq!(clipped(&buf, 5, 10), &[] as &[u8]);
        assert_eq!(clipped(&buf, 2, 1), &[] as &[u8]);
    }

    #[test]
    fn ascii_is_sanitised() {
        assert_eq!(ascii_string(b"  QEMU\0\0 "), "QEMU");
        assert_eq!(ascii_string(&[b'a', 0xFF, b'b', 0x07]), "a?b?");
        assert_eq!(hex(&[0x50, 0x0a]), "500a");
    }
}
