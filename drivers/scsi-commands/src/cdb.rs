//! Command descriptor blocks (CDBs): builders for the SPC/SBC commands the
//! driver issues, encoded big-endian exactly as the standards lay them out,
//! plus the UNMAP parameter list.

use std::fmt;

use crate::error::CdbError;

/// Operation codes used by this crate (SPC-4 / SBC-4).
pub mod opcode {
    /// TEST UNIT READY (6).
    pub const TEST_UNIT_READY: u8 = 0x00;
    /// REQUEST SENSE (6).
    pub const REQUEST_SENSE: u8 = 0x03;
    /// INQUIRY (6).
    pub const INQUIRY: u8 = 0x12;
    /// MODE SENSE(6).
    pub const MODE_SENSE_6: u8 = 0x1A;
    /// START STOP UNIT (6).
    pub const START_STOP_UNIT: u8 = 0x1B;
    /// READ CAPACITY(10).
    pub const READ_CAPACITY_10: u8 = 0x25;
    /// READ(10).
    pub const READ_10: u8 = 0x28;
    /// WRITE(10).
    pub const WRITE_10: u8 = 0x2A;
    /// SYNCHRONIZE CACHE(10).
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    /// UNMAP (10).
    pub const UNMAP: u8 = 0x42;
    /// MODE SENSE(10).
    pub const MODE_SENSE_10: u8 = 0x5A;
    /// READ(16).
    pub const READ_16: u8 = 0x88;
    /// WRITE(16).
    pub const WRITE_16: u8 = 0x8A;
    /// SYNCHRONIZE CACHE(16).
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    /// WRITE SAME(16).
    pub const WRITE_SAME_16: u8 = 0x93;
    /// SERVICE ACTION IN(16); READ CAPACITY(16) is service action 0x10.
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    /// REPORT LUNS (12).
    pub const REPORT_LUNS: u8 = 0xA0;
}

/// Service action of READ CAPACITY(16) within SERVICE ACTION IN(16).
pub const SA_READ_CAPACITY_16: u8 = 0x10;
/// Allocation length that covers the whole standard INQUIRY data a block driver uses.
pub const INQUIRY_STANDARD_LEN: u16 = 96;
/// Length of the READ CAPACITY(10) parameter data.
pub const READ_CAPACITY_10_LEN: usize = 8;
/// Length of the READ CAPACITY(16) parameter data (SBC-4).
pub const READ_CAPACITY_16_LEN: u32 = 32;
/// Minimum REPORT LUNS allocation length (SPC-3).
pub const REPORT_LUNS_MIN_ALLOC: u32 = 16;
/// Size of the UNMAP parameter list header.
pub const UNMAP_HEADER_LEN: usize = 8;
/// Size of one UNMAP block descriptor.
pub const UNMAP_DESCRIPTOR_LEN: usize = 16;
/// Most UNMAP block descriptors that fit a parameter list whose length is a u16.
pub const UNMAP_MAX_DESCRIPTORS: usize =
    (u16::MAX as usize - UNMAP_HEADER_LEN) / UNMAP_DESCRIPTOR_LEN;

// Bits in byte 1 of READ/WRITE(10/16).
const FUA: u8 = 0x08;

/// The last LBA of a range of `blocks` (> 0) blocks starting at `lba`.
fn last_lba(lba: u64, blocks: u64) -> Result<u64, CdbError> {
    let span = blocks.checked_sub(1).ok_or(CdbError::ZeroBlocks)?;
    lba.checked_add(span)
        .ok_or(CdbError::LbaRangeOverflow { lba, blocks })
}

/// Which way data moves for a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataDirection {
    /// No data phase.
    None,
    /// Device to host (data-in: reads, INQUIRY, …).
    FromDevice,
    /// Host to device (data-out: writes, UNMAP parameter list, …).
    ToDevice,
}

/// A CDB of up to 16 bytes, with the direction of its data transfer.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cdb {
    bytes: [u8; 16],
    len: u8,
    direction: DataDirection,
}

impl fmt::Debug for Cdb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cdb[")?;
        for (i, b) in self.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        write!(f, "] {:?}", self.direction)
    }
}

/// Which of READ or WRITE.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rw {
    Read,
    Write,
}

impl Cdb {
    /// Builds from a fixed-size array; `N` is checked at compile time.
    fn fixed<const N: usize>(src: [u8; N], direction: DataDirection) -> Cdb {
        const { assert!(N >= 6 && N <= 16) };
        let mut bytes = [0u8; 16];
        for (dst, s) in bytes.iter_mut().zip(src) {
            *dst = s;
        }
        Cdb {
            bytes,
            // N <= 16, checked above.
            len: N as u8,
            direction,
        }
    }

    /// A CDB from raw bytes (pass-through). `bytes` must be 1..=16 long.
    pub fn from_bytes(bytes: &[u8], direction: DataDirection) -> Result<Cdb, CdbError> {
        let len = u8::try_from(bytes.len())
            .ok()
            .filter(|l| (1..=16).contains(l))
            .ok_or(CdbError::BadCdbLength(bytes.len()))?;
        let mut buf = [0u8; 16];
        for (dst, s) in buf.iter_mut().zip(bytes) {
            *dst = *s;
        }
        Ok(Cdb {
            bytes: buf,
            len,
            direction,
        })
    }

    /// The CDB bytes (6, 10, 12 or 16 of them for the builders here).
    pub fn as_slice(&self) -> &[u8] {
        self.bytes
            .get(..usize::from(self.len))
            .unwrap_or(&self.bytes)
    }

    /// The CDB zero-padded to 16 bytes (virtio-scsi's cdb field is at least
    /// this long; pad further with zeros for a larger `cdb_size`).
    pub const fn padded(&self) -> &[u8; 16] {
        &self.bytes
    }

    /// Length of the CDB in bytes.
    pub const fn len(&self) -> usize {
        self.len as usize
    }

    /// Always false for a built CDB.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The operation code (byte 0).
    pub const fn opcode(&self) -> u8 {
        self.bytes[0]
    }

    /// The data transfer direction.
    pub const fn direction(&self) -> DataDirection {
        self.direction
    }

    /// TEST UNIT READY: `00 00 00 00 00 00`.
    pub fn test_unit_ready() -> Cdb {
        Cdb::fixed(
            [opcode::TEST_UNIT_READY, 0, 0, 0, 0, 0],
            DataDirection::None,
        )
    }

    /// REQUEST SENSE with an 8-bit allocation length; `descriptor_format`
    /// sets the DESC bit (ask for descriptor-format sense).
    pub fn request_sense(alloc_len: u8, descriptor_format: bool) -> Cdb {
        Cdb::fixed(
            [
                opcode::REQUEST_SENSE,
                u8::from(descriptor_format),
                0,
                0,
                alloc_len,
                0,
            ],
            DataDirection::FromDevice,
        )
    }

    /// Standard INQUIRY (EVPD 0, page 0).
    pub fn inquiry(alloc_len: u16) -> Cdb {
        let [hi, lo] = alloc_len.to_be_bytes();
        Cdb::fixed(
            [opcode::INQUIRY, 0, 0, hi, lo, 0],
            DataDirection::FromDevice,
        )
    }

    /// INQUIRY for a vital product data page (EVPD 1).
    pub fn inquiry_vpd(page: u8, alloc_len: u16) -> Cdb {
        let [hi, lo] = alloc_len.to_be_bytes();
        Cdb::fixed(
            [opcode::INQUIRY, 0x01, page, hi, lo, 0],
            DataDirection::FromDevice,
        )
    }

    /// REPORT LUNS with SELECT REPORT 0 (all logical units except well-known
    /// ones). SPC-3 requires an allocation length of at least 16.
    pub fn report_luns(alloc_len: u32) -> Result<Cdb, CdbError> {
        if alloc_len < REPORT_LUNS_MIN_ALLOC {
            return Err(CdbError::AllocationLengthTooSmall {
                got: alloc_len,
                min: REPORT_LUNS_MIN_ALLOC,
            });
        }
        let [a, b, c, d] = alloc_len.to_be_bytes();
        Ok(Cdb::fixed(
            [opcode::REPORT_LUNS, 0, 0x00, 0, 0, 0, a, b, c, d, 0, 0],
            DataDirection::FromDevice,
        ))
    }

    /// READ CAPACITY(10) (LBA 0, PMI 0); returns 8 bytes.
    pub fn read_capacity10() -> Cdb {
        Cdb::fixed(
            [opcode::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            DataDirection::FromDevice,
        )
    }

    /// READ CAPACITY(16): SERVICE ACTION IN(16) 0x9E / 0x10 with the given
    /// allocation length (use [`READ_CAPACITY_16_LEN`]).
    pub fn read_capacity16(alloc_len: u32) -> Cdb {
        let [a, b, c, d] = alloc_len.to_be_bytes();
        Cdb::fixed(
            [
                opcode::SERVICE_ACTION_IN_16,
                SA_READ_CAPACITY_16,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                a,
                b,
                c,
                d,
                0,
                0,
            ],
            DataDirection::FromDevice,
        )
    }

    fn rw10(op: Rw, lba: u32, blocks: u16, fua: bool) -> Cdb {
        let (code, dir) = match op {
            Rw::Read => (opcode::READ_10, DataDirection::FromDevice),
            Rw::Write => (opcode::WRITE_10, DataDirection::ToDevice),
        };
        let [l0, l1, l2, l3] = lba.to_be_bytes();
        let [n0, n1] = blocks.to_be_bytes();
        let flags = if fua { FUA } else { 0 };
        Cdb::fixed([code, flags, l0, l1, l2, l3, 0, n0, n1, 0], dir)
    }

    fn rw16(op: Rw, lba: u64, blocks: u32, fua: bool) -> Cdb {
        let (code, dir) = match op {
            Rw::Read => (opcode::READ_16, DataDirection::FromDevice),
            Rw::Write => (opcode::WRITE_16, DataDirection::ToDevice),
        };
        let [l0, l1, l2, l3, l4, l5, l6, l7] = lba.to_be_bytes();
        let [n0, n1, n2, n3] = blocks.to_be_bytes();
        let flags = if fua { FUA } else { 0 };
        Cdb::fixed(
            [
                code, flags, l0, l1, l2, l3, l4, l5, l6, l7, n0, n1, n2, n3, 0, 0,
            ],
            dir,
        )
    }

    /// Picks (10) when the whole range `lba ..= lba + blocks - 1` is below
    /// 2^32 and `blocks` fits in 16 bits, otherwise (16). Requiring the *last*
    /// LBA to fit (not only the first) keeps (10) away from ranges that cross
    /// 2^32, which only exist on devices where (16) is the safe choice anyway.
    fn rw_auto(op: Rw, lba: u64, blocks: u64, fua: bool) -> Result<Cdb, CdbError> {
        if blocks == 0 {
            return Err(CdbError::ZeroBlocks);
        }
        let blocks32 = u32::try_from(blocks).map_err(|_| CdbError::TooManyBlocks(blocks))?;
        let last = last_lba(lba, blocks)?;
        match (
            u32::try_from(lba),
            u32::try_from(last),
            u16::try_from(blocks),
        ) {
            (Ok(lba32), Ok(_), Ok(blocks16)) => Ok(Cdb::rw10(op, lba32, blocks16, fua)),
            _ => Ok(Cdb::rw16(op, lba, blocks32, fua)),
        }
    }

    /// READ(10). A transfer length of 0 is legal SCSI and transfers nothing.
    pub fn read10(lba: u32, blocks: u16, fua: bool) -> Cdb {
        Cdb::rw10(Rw::Read, lba, blocks, fua)
    }

    /// READ(16). A transfer length of 0 is legal SCSI and transfers nothing.
    pub fn read16(lba: u64, blocks: u32, fua: bool) -> Cdb {
        Cdb::rw16(Rw::Read, lba, blocks, fua)
    }

    /// WRITE(10). FUA forces the data to the medium before completion.
    pub fn write10(lba: u32, blocks: u16, fua: bool) -> Cdb {
        Cdb::rw10(Rw::Write, lba, blocks, fua)
    }

    /// WRITE(16). FUA forces the data to the medium before completion.
    pub fn write16(lba: u64, blocks: u32, fua: bool) -> Cdb {
        Cdb::rw16(Rw::Write, lba, blocks, fua)
    }

    /// READ(10) or READ(16), whichever fits (see [`Cdb::write`] for the rule).
    /// Errors: `blocks == 0`, `blocks > u32::MAX`, or the range overflows u64.
    pub fn read(lba: u64, blocks: u64, fua: bool) -> Result<Cdb, CdbError> {
        Cdb::rw_auto(Rw::Read, lba, blocks, fua)
    }

    /// WRITE(10) when `lba + blocks - 1 <= u32::MAX` and `blocks <= u16::MAX`,
    /// else WRITE(16). Errors: `blocks == 0`, `blocks > u32::MAX`, or the range
    /// overflows u64.
    pub fn write(lba: u64, blocks: u64, fua: bool) -> Result<Cdb, CdbError> {
        Cdb::rw_auto(Rw::Write, lba, blocks, fua)
    }

    /// SYNCHRONIZE CACHE(10) of the whole device (LBA 0, 0 blocks, IMMED 0).
    pub fn synchronize_cache10() -> Cdb {
        Cdb::fixed(
            [opcode::SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            DataDirection::None,
        )
    }

    /// SYNCHRONIZE CACHE(16) of the whole device (LBA 0, 0 blocks, IMMED 0).
    pub fn synchronize_cache16() -> Cdb {
        let mut b = [0u8; 16];
        b[0] = opcode::SYNCHRONIZE_CACHE_16;
        Cdb::fixed(b, DataDirection::None)
    }

    /// MODE SENSE(10) for current values of `page_code`/`subpage`; `dbd`
    /// disables block descriptors. Page codes are 6 bits (0x3F = all pages).
    pub fn mode_sense10(
        page_code: u8,
        subpage: u8,
        dbd: bool,
        alloc_len: u16,
    ) -> Result<Cdb, CdbError> {
        if page_code > 0x3F {
            return Err(CdbError::InvalidPageCode(page_code));
        }
        let [hi, lo] = alloc_len.to_be_bytes();
        let byte1 = if dbd { 0x08 } else { 0 };
        Ok(Cdb::fixed(
            [
                opcode::MODE_SENSE_10,
                byte1,
                page_code,
                subpage,
                0,
                0,
                0,
                hi,
                lo,
                0,
            ],
            DataDirection::FromDevice,
        ))
    }

    /// MODE SENSE(6) for current values; see [`Cdb::mode_sense10`].
    pub fn mode_sense6(
        page_code: u8,
        subpage: u8,
        dbd: bool,
        alloc_len: u8,
    ) -> Result<Cdb, CdbError> {
        if page_code > 0x3F {
            return Err(CdbError::InvalidPageCode(page_code));
        }
        let byte1 = if dbd { 0x08 } else { 0 };
        Ok(Cdb::fixed(
            [
                opcode::MODE_SENSE_6,
                byte1,
                page_code,
                subpage,
                alloc_len,
                0,
            ],
            DataDirection::FromDevice,
        ))
    }

    /// START STOP UNIT with START set or cleared (no eject, power condition 0).
    /// Used when NOT READY 04/02 says an initializing command is required.
    pub fn start_stop_unit(start: bool, immed: bool) -> Cdb {
        Cdb::fixed(
            [
                opcode::START_STOP_UNIT,
                u8::from(immed),
                0,
                0,
                u8::from(start),
                0,
            ],
            DataDirection::None,
        )
    }

    /// UNMAP (ANCHOR 0, group 0) with a parameter list of `param_list_len`
    /// bytes; build the list with [`unmap_parameter_list`] or use [`unmap`].
    pub fn unmap(param_list_len: u16) -> Cdb {
        let [hi, lo] = param_list_len.to_be_bytes();
        Cdb::fixed(
            [opcode::UNMAP, 0, 0, 0, 0, 0, 0, hi, lo, 0],
            DataDirection::ToDevice,
        )
    }

    /// WRITE SAME(16) of `blocks` blocks from `lba`. With `unmap` the device
    /// may deallocate the blocks instead of writing them (discard); with
    /// `ndob` (no data-out buffer) no block is sent and zeros are written,
    /// otherwise the data-out buffer is one logical block (zeros for discard).
    ///
    /// `blocks == 0` is refused: SBC gives it the meaning "to the end of the
    /// medium", which a driver never wants by accident.
    pub fn write_same16(lba: u64, blocks: u32, unmap: bool, ndob: bool) -> Result<Cdb, CdbError> {
        if blocks == 0 {
            return Err(CdbError::ZeroBlocks);
        }
        last_lba(lba, u64::from(blocks))?;
        let mut flags = 0u8;
        if unmap {
            flags |= 0x08;
        }
        if ndob {
            flags |= 0x01;
        }
        let [l0, l1, l2, l3, l4, l5, l6, l7] = lba.to_be_bytes();
        let [n0, n1, n2, n3] = blocks.to_be_bytes();
        let dir = if ndob {
            DataDirection::None
        } else {
            DataDirection::ToDevice
        };
        Ok(Cdb::fixed(
            [
                opcode::WRITE_SAME_16,
                flags,
                l0,
                l1,
                l2,
                l3,
                l4,
                l5,
                l6,
                l7,
                n0,
                n1,
                n2,
                n3,
                0,
                0,
            ],
            dir,
        ))
    }
}

/// One range for UNMAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UnmapRange {
    /// First LBA to unmap.
    pub lba: u64,
    /// Number of logical blocks (must be > 0).
    pub blocks: u32,
}

/// Encodes the UNMAP parameter list (SBC-4 §5.31.2): an 8-byte header (UNMAP
/// DATA LENGTH = n-1, BLOCK DESCRIPTOR DATA LENGTH) then 16 bytes per range
/// (8-byte LBA, 4-byte block count, 4 reserved).
///
/// Errors: no ranges or more than [`UNMAP_MAX_DESCRIPTORS`]; a range of 0
/// blocks; a range that overflows the LBA space. The device's own limits
/// (Block Limits VPD: maximum unmap LBA / descriptor count) are the caller's
/// to apply.
pub fn unmap_parameter_list(ranges: &[UnmapRange]) -> Result<Vec<u8>, CdbError> {
    if ranges.is_empty() || ranges.len() > UNMAP_MAX_DESCRIPTORS {
        return Err(CdbError::BadListLength(ranges.len()));
    }
    // Bounded by UNMAP_MAX_DESCRIPTORS, so these cannot overflow u16.
    let desc_len = ranges.len().saturating_mul(UNMAP_DESCRIPTOR_LEN);
    let total = desc_len.saturating_add(UNMAP_HEADER_LEN);
    let data_len = u16::try_from(total.saturating_sub(2))
        .map_err(|_| CdbError::BadListLength(ranges.len()))?;
    let desc_len16 = u16::try_from(desc_len).map_err(|_| CdbError::BadListLength(ranges.len()))?;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&data_len.to_be_bytes());
    out.extend_from_slice(&desc_len16.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    for r in ranges {
        if r.blocks == 0 {
            return Err(CdbError::ZeroBlocks);
        }
        last_lba(r.lba, u64::from(r.blocks))?;
        out.extend_from_slice(&r.lba.to_be_bytes());
        out.extend_from_slice(&r.blocks.to_be_bytes());
        out.extend_from_slice(&[0; 4]);
    }
    Ok(out)
}

/// UNMAP CDB together with its parameter list (the data-out buffer).
pub fn unmap(ranges: &[UnmapRange]) -> Result<(Cdb, Vec<u8>), CdbError> {
    let list = unmap_parameter_list(ranges)?;
    let len = u16::try_from(list.len()).map_err(|_| CdbError::BadListLength(ranges.len()))?;
    Ok((Cdb::unmap(len), list))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn six_byte_commands() {
        assert_eq!(Cdb::test_unit_ready().as_slice(), &[0, 0, 0, 0, 0, 0]);
        assert_eq!(Cdb::test_unit_ready().direction(), DataDirection::None);
        assert_eq!(
            Cdb::request_sense(252, false).as_slice(),
            &[0x03, 0, 0, 0, 252, 0]
        );
        assert_eq!(
            Cdb::request_sense(18, true).as_slice(),
            &[0x03, 1, 0, 0, 18, 0]
        );
        assert_eq!(Cdb::inquiry(96).as_slice(), &[0x12, 0, 0, 0, 96, 0]);
        assert_eq!(
            Cdb::inquiry_vpd(0x83, 0x1234).as_slice(),
            &[0x12, 1, 0x83, 0x12, 0x34, 0]
        );
        assert_eq!(
            Cdb::start_stop_unit(true, false).as_slice(),
            &[0x1B, 0, 0, 0, 1, 0]
        );
        assert_eq!(
            Cdb::mode_sense6(0x3F, 0, true, 0xC0).unwrap().as_slice(),
            &[0x1A, 0x08, 0x3F, 0, 0xC0, 0]
        );
    }

    #[test]
    fn report_luns() {
        assert_eq!(
            Cdb::report_luns(0x0001_0008).unwrap().as_slice(),
            &[0xA0, 0, 0, 0, 0, 0, 0x00, 0x01, 0x00, 0x08, 0, 0]
        );
        assert_eq!(
            Cdb::report_luns(15),
            Err(CdbError::AllocationLengthTooSmall { got: 15, min: 16 })
        );
    }

    #[test]
    fn read_capacity() {
        assert_eq!(
            Cdb::read_capacity10().as_slice(),
            &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            Cdb::read_capacity16(32).as_slice(),
            &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]
        );
        assert_eq!(Cdb::read_capacity16(32).len(), 16);
    }

    #[test]
    fn read_write_10() {
        let c = Cdb::read10(0x1234_5678, 0x100, false);
        assert_eq!(
            c.as_slice(),
            &[0x28, 0x00, 0x12, 0x34, 0x56, 0x78, 0x00, 0x01, 0x00, 0x00]
        );
        assert_eq!(c.direction(), DataDirection::FromDevice);
        let c = Cdb::write10(0xDEAD_BEEF, 0xFFFF, true);
        assert_eq!(
            c.as_slice(),
            &[0x2A, 0x08, 0xDE, 0xAD, 0xBE, 0xEF, 0x00, 0xFF, 0xFF, 0x00]
        );
        assert_eq!(c.direction(), DataDirection::ToDevice);
        assert_eq!(c.opcode(), opcode::WRITE_10);
        assert_eq!(&c.padded()[10..], &[0; 6]);
    }

    #[test]
    fn read_write_16() {
        let c = Cdb::read16(0x0102_0304_0506_0708, 0x0A0B_0C0D, true);
        assert_eq!(
            c.as_slice(),
            &[
                0x88, 0x08, 1, 2, 3, 4, 5, 6, 7, 8, 0x0A, 0x0B, 0x0C, 0x0D, 0, 0
            ]
        );
        let c = Cdb::write16(1, 1, false);
        assert_eq!(
            c.as_slice(),
            &[0x8A, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0]
        );
    }

    #[test]
    fn auto_selection_boundaries() {
        // Largest (10): last LBA exactly u32::MAX, count exactly u16::MAX.
        let c = Cdb::read(u64::from(u32::MAX) - 0xFFFE, 0xFFFF, false).unwrap();
        assert_eq!(c.opcode(), opcode::READ_10);
        let c = Cdb::read(u64::from(u32::MAX), 1, false).unwrap();
        assert_eq!(c.opcode(), opcode::READ_10);
        assert_eq!(&c.as_slice()[2..6], &[0xFF; 4]);
        // Range crossing 2^32 -> (16).
        let c = Cdb::read(u64::from(u32::MAX), 2, false).unwrap();
        assert_eq!(c.opcode(), opcode::READ_16);
        // LBA 2^32 -> (16).
        let c = Cdb::write(1 << 32, 1, true).unwrap();
        assert_eq!(c.opcode(), opcode::WRITE_16);
        assert_eq!(c.as_slice()[1], 0x08);
        // Count 65536 -> (16).
        let c = Cdb::write(0, 0x1_0000, false).unwrap();
        assert_eq!(c.opcode(), opcode::WRITE_16);
        assert_eq!(&c.as_slice()[10..14], &[0, 1, 0, 0]);
        // Count 65535 at 0 -> (10).
        assert_eq!(
            Cdb::write(0, 0xFFFF, false).unwrap().opcode(),
            opcode::WRITE_10
        );
        // Errors.
        assert_eq!(Cdb::read(0, 0, false), Err(CdbError::ZeroBlocks));
        assert_eq!(
            Cdb::read(0, 1 << 32, false),
            Err(CdbError::TooManyBlocks(1 << 32))
        );
        assert!(Cdb::read(0, u64::from(u32::MAX), false).is_ok());
        assert_eq!(
            Cdb::write(u64::MAX, 2, false),
            Err(CdbError::LbaRangeOverflow {
                lba: u64::MAX,
                blocks: 2
            })
        );
        assert_eq!(
            Cdb::write(u64::MAX, 1, false).unwrap().opcode(),
            opcode::WRITE_16
        );
    }

    #[test]
    fn synchronize_cache() {
        assert_eq!(
            Cdb::synchronize_cache10().as_slice(),
            &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let c = Cdb::synchronize_cache16();
        assert_eq!(c.as_slice()[0], 0x91);
        assert_eq!(&c.as_slice()[1..], &[0; 15]);
        assert_eq!(c.direction(), DataDirection::None);
    }

    #[test]
    fn mode_sense10() {
        assert_eq!(
            Cdb::mode_sense10(0x08, 0, true, 0x00FC).unwrap().as_slice(),
            &[0x5A, 0x08, 0x08, 0, 0, 0, 0, 0x00, 0xFC, 0]
        );
        assert_eq!(
            Cdb::mode_sense10(0x3F, 0xFF, false, 0x1000)
                .unwrap()
                .as_slice(),
            &[0x5A, 0x00, 0x3F, 0xFF, 0, 0, 0, 0x10, 0x00, 0]
        );
        assert_eq!(
            Cdb::mode_sense10(0x40, 0, false, 8),
            Err(CdbError::InvalidPageCode(0x40))
        );
    }

    #[test]
    fn unmap_list_and_cdb() {
        let (cdb, list) = unmap(&[
            UnmapRange {
                lba: 0x10,
                blocks: 8,
            },
            UnmapRange {
                lba: 0x1_0000_0000,
                blocks: 0x100,
            },
        ])
        .unwrap();
        assert_eq!(cdb.as_slice(), &[0x42, 0, 0, 0, 0, 0, 0, 0, 40, 0]);
        assert_eq!(cdb.direction(), DataDirection::ToDevice);
        assert_eq!(
            list,
            vec![
                0, 38, 0, 32, 0, 0, 0, 0, // header
                0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 8, 0, 0, 0, 0, //
                0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0,
            ]
        );
        assert_eq!(unmap(&[]), Err(CdbError::BadListLength(0)));
        assert_eq!(
            unmap_parameter_list(&[UnmapRange { lba: 0, blocks: 0 }]),
            Err(CdbError::ZeroBlocks)
        );
        assert!(matches!(
            unmap_parameter_list(&[UnmapRange {
                lba: u64::MAX,
                blocks: 2
            }]),
            Err(CdbError::LbaRangeOverflow { .. })
        ));
        let many = vec![UnmapRange { lba: 0, blocks: 1 }; UNMAP_MAX_DESCRIPTORS];
        let (cdb, list) = unmap(&many).unwrap();
        assert_eq!(list.len(), 8 + 16 * 4095);
        assert_eq!(&cdb.as_slice()[7..9], &(list.len() as u16).to_be_bytes());
        let too_many = vec![UnmapRange { lba: 0, blocks: 1 }; UNMAP_MAX_DESCRIPTORS + 1];
        assert_eq!(
            unmap(&too_many),
            Err(CdbError::BadListLength(UNMAP_MAX_DESCRIPTORS + 1))
        );
    }

    #[test]
    fn write_same16() {
        let c = Cdb::write_same16(0x0102_0304_0506_0708, 0x1000, true, false).unwrap();
        assert_eq!(
            c.as_slice(),
            &[0x93, 0x08, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x10, 0, 0, 0]
        );
        assert_eq!(c.direction(), DataDirection::ToDevice);
        let c = Cdb::write_same16(0, 1, true, true).unwrap();
        assert_eq!(c.as_slice()[1], 0x09);
        assert_eq!(c.direction(), DataDirection::None);
        assert_eq!(
            Cdb::write_same16(0, 0, true, false),
            Err(CdbError::ZeroBlocks)
        );
        assert!(Cdb::write_same16(u64::MAX, 2, true, false).is_err());
    }

    #[test]
    fn raw_cdbs() {
        let c = Cdb::from_bytes(&[0x12, 0, 0, 0, 36, 0], DataDirection::FromDevice).unwrap();
        assert_eq!(c, Cdb::inquiry(36));
        assert_eq!(
            Cdb::from_bytes(&[], DataDirection::None),
            Err(CdbError::BadCdbLength(0))
        );
        assert_eq!(
            Cdb::from_bytes(&[0; 17], DataDirection::None),
            Err(CdbError::BadCdbLength(17))
        );
        assert_eq!(
            format!("{:?}", Cdb::test_unit_ready()),
            "Cdb[00 00 00 00 00 00] None"
        );
    }
}
