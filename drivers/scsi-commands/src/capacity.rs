//! READ CAPACITY(10)/(16) parameter data (SBC-4 §5.20, §5.21) and the
//! validated [`Capacity`] of a logical unit.

use crate::bytes::{be16, be32, be64, byte};
use crate::error::ParseError;

/// Smallest logical block length accepted.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest logical block length accepted.
pub const MAX_BLOCK_SIZE: u32 = 64 * 1024;

/// READ CAPACITY(10) parameter data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReadCapacity10 {
    /// RETURNED LOGICAL BLOCK ADDRESS: the last LBA; 0xFFFFFFFF means the
    /// capacity does not fit and READ CAPACITY(16) must be used.
    pub last_lba: u32,
    /// LOGICAL BLOCK LENGTH IN BYTES.
    pub block_length: u32,
}

impl ReadCapacity10 {
    /// Decodes the 8-byte response.
    pub fn parse(buf: &[u8]) -> Result<ReadCapacity10, ParseError> {
        match (be32(buf, 0), be32(buf, 4)) {
            (Some(last_lba), Some(block_length)) => Ok(ReadCapacity10 {
                last_lba,
                block_length,
            }),
            _ => Err(ParseError::Truncated {
                needed: 8,
                got: buf.len(),
            }),
        }
    }

    /// The device has more than 2^32 - 1 blocks; READ CAPACITY(16) is needed.
    pub const fn needs_read_capacity16(&self) -> bool {
        self.last_lba == u32::MAX
    }

    /// The validated capacity, or [`ParseError::NeedsReadCapacity16`].
    pub fn capacity(&self) -> Result<Capacity, ParseError> {
        if self.needs_read_capacity16() {
            return Err(ParseError::NeedsReadCapacity16);
        }
        Capacity::new(u64::from(self.last_lba), self.block_length)
    }
}

/// READ CAPACITY(16) parameter data.
///
/// Only the first 12 bytes are required; the fields after them read as 0/false
/// when the response is shorter than 16 bytes, and `truncated` is then set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReadCapacity16 {
    /// RETURNED LOGICAL BLOCK ADDRESS: the last LBA.
    pub last_lba: u64,
    /// LOGICAL BLOCK LENGTH IN BYTES.
    pub block_length: u32,
    /// P_TYPE: protection type minus one (meaningful when `prot_en`).
    pub p_type: u8,
    /// PROT_EN: protection information is enabled.
    pub prot_en: bool,
    /// RC BASIS (zoned devices): 1 = `last_lba` is the last LBA of the logical
    /// unit; 0 = it is the last LBA of the leading non-sequential-write-required zones.
    pub rc_basis: u8,
    /// P_I_EXPONENT: protection information intervals per logical block (2^n).
    pub p_i_exponent: u8,
    /// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT.
    pub lbppbe: u8,
    /// LBPME: logical block provisioning management (thin provisioning) enabled.
    pub lbpme: bool,
    /// LBPRZ: unmapped blocks read as zeros.
    pub lbprz: bool,
    /// LOWEST ALIGNED LOGICAL BLOCK ADDRESS (14 bits).
    pub lowest_aligned_lba: u16,
    /// The response ended before byte 16.
    pub truncated: bool,
}

impl ReadCapacity16 {
    /// Decodes the response (12 bytes minimum, 32 normally).
    pub fn parse(buf: &[u8]) -> Result<ReadCapacity16, ParseError> {
        let (Some(last_lba), Some(block_length)) = (be64(buf, 0), be32(buf, 8)) else {
            return Err(ParseError::Truncated {
                needed: 12,
                got: buf.len(),
            });
        };
        let b12 = byte(buf, 12).unwrap_or(0);
        let b13 = byte(buf, 13).unwrap_or(0);
        let b14_15 = be16(buf, 14).unwrap_or(0);
        Ok(ReadCapacity16 {
            last_lba,
            block_length,
            p_type: (b12 >> 1) & 0x07,
            prot_en: b12 & 0x01 != 0,
            rc_basis: (b12 >> 4) & 0x03,
            p_i_exponent: b13 >> 4,
            lbppbe: b13 & 0x0F,
            lbpme: b14_15 & 0x8000 != 0,
            lbprz: b14_15 & 0x4000 != 0,
            lowest_aligned_lba: b14_15 & 0x3FFF,
            truncated: buf.len() < 16,
        })
    }

    /// The validated capacity including the physical-block and provisioning details.
    pub fn capacity(&self) -> Result<Capacity, ParseError> {
        let mut cap = Capacity::new(self.last_lba, self.block_length)?;
        cap.physical_block_exponent = self.lbppbe;
        cap.lowest_aligned_lba = self.lowest_aligned_lba;
        cap.thin_provisioned = self.lbpme;
        cap.reads_zeros_after_unmap = self.lbprz;
        cap.protection_type = self.prot_en.then(|| self.p_type.saturating_add(1));
        Ok(cap)
    }
}

/// Validated size of a logical unit: at least one block, a block size that is
/// a power of two in 512..=65536, and a byte size that fits in u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Capacity {
    /// Number of logical blocks (last LBA + 1).
    pub blocks: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Logical blocks per physical block = 2^exponent (0 from READ CAPACITY(10)).
    pub physical_block_exponent: u8,
    /// First LBA aligned to a physical block boundary.
    pub lowest_aligned_lba: u16,
    /// Thin provisioning enabled (LBPME).
    pub thin_provisioned: bool,
    /// Unmapped blocks read as zeros (LBPRZ).
    pub reads_zeros_after_unmap: bool,
    /// Protection information type 1..=3 when enabled.
    pub protection_type: Option<u8>,
}

impl Capacity {
    /// Validates a (last LBA, block length) pair as returned by READ CAPACITY.
    pub fn new(last_lba: u64, block_length: u32) -> Result<Capacity, ParseError> {
        if !block_length.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_length)
        {
            return Err(ParseError::InvalidBlockLength(block_length));
        }
        let blocks = last_lba
            .checked_add(1)
            .ok_or(ParseError::LastLbaOverflow(last_lba))?;
        if blocks.checked_mul(u64::from(block_length)).is_none() {
            return Err(ParseError::CapacityOverflow {
                blocks,
                block_size: block_length,
            });
        }
        Ok(Capacity {
            blocks,
            block_size: block_length,
            physical_block_exponent: 0,
            lowest_aligned_lba: 0,
            thin_provisioned: false,
            reads_zeros_after_unmap: false,
            protection_type: None,
        })
    }

    /// Size in bytes (cannot overflow: checked at construction).
    pub const fn bytes(&self) -> u64 {
        self.blocks.saturating_mul(self.block_size as u64)
    }

    /// The last addressable LBA.
    pub const fn last_lba(&self) -> u64 {
        self.blocks.saturating_sub(1)
    }

    /// Physical block size in bytes, if it fits in u32.
    pub fn physical_block_size(&self) -> Option<u32> {
        1u32.checked_shl(u32::from(self.physical_block_exponent))
            .and_then(|n| n.checked_mul(self.block_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rc10_good() {
        let b = [0x00, 0x01, 0xFF, 0xFF, 0x00, 0x00, 0x02, 0x00];
        let r = ReadCapacity10::parse(&b).unwrap();
        assert_eq!(r.last_lba, 0x1FFFF);
        assert_eq!(r.block_length, 512);
        let c = r.capacity().unwrap();
        assert_eq!(c.blocks, 0x20000);
        assert_eq!(c.bytes(), 64 * 1024 * 1024);
        assert_eq!(c.last_lba(), 0x1FFFF);
        assert_eq!(c.physical_block_size(), Some(512));
    }

    #[test]
    fn rc10_needs_16_and_errors() {
        let b = [0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x02, 0x00];
        let r = ReadCapacity10::parse(&b).unwrap();
        assert!(r.needs_read_capacity16());
        assert_eq!(r.capacity(), Err(ParseError::NeedsReadCapacity16));
        for len in 0..8 {
            assert_eq!(
                ReadCapacity10::parse(&b[..len]),
                Err(ParseError::Truncated {
                    needed: 8,
                    got: len
                })
            );
        }
    }

    #[test]
    fn block_length_validation() {
        for bad in [0u32, 1, 256, 511, 513, 520, 4095, 128 * 1024, u32::MAX] {
            assert_eq!(
                Capacity::new(10, bad),
                Err(ParseError::InvalidBlockLength(bad))
            );
        }
        for good in [512u32, 1024, 2048, 4096, 8192, 65536] {
            assert!(Capacity::new(10, good).is_ok());
        }
        assert_eq!(
            Capacity::new(u64::MAX, 512),
            Err(ParseError::LastLbaOverflow(u64::MAX))
        );
        assert_eq!(
            Capacity::new(u64::MAX - 1, 512),
            Err(ParseError::CapacityOverflow {
                blocks: u64::MAX,
                block_size: 512
            })
        );
        assert_eq!(Capacity::new(0, 512).unwrap().blocks, 1);
    }

    #[test]
    fn rc16_good() {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&0x1_2345_6789u64.to_be_bytes());
        b[8..12].copy_from_slice(&4096u32.to_be_bytes());
        b[12] = 0x03; // P_TYPE 1 (type 2), PROT_EN
        b[13] = 0x13; // P_I_EXPONENT 1, LBPPBE 3
        b[14] = 0xC0 | 0x01; // LBPME, LBPRZ, lowest aligned high bits
        b[15] = 0x02;
        let r = ReadCapacity16::parse(&b).unwrap();
        assert_eq!(r.last_lba, 0x1_2345_6789);
        assert_eq!(r.block_length, 4096);
        assert!(r.prot_en);
        assert_eq!(r.p_type, 1);
        assert_eq!(r.p_i_exponent, 1);
        assert_eq!(r.lbppbe, 3);
        assert!(r.lbpme && r.lbprz);
        assert_eq!(r.lowest_aligned_lba, 0x102);
        assert!(!r.truncated);
        let c = r.capacity().unwrap();
        assert_eq!(c.blocks, 0x1_2345_678A);
        assert_eq!(c.physical_block_size(), Some(32768));
        assert_eq!(c.protection_type, Some(2));
        assert!(c.thin_provisioned && c.reads_zeros_after_unmap);
    }

    #[test]
    fn rc16_truncated() {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&7u64.to_be_bytes());
        b[8..12].copy_from_slice(&512u32.to_be_bytes());
        b[13] = 0x03;
        for len in 0..12 {
            assert_eq!(
                ReadCapacity16::parse(&b[..len]),
                Err(ParseError::Truncated {
                    needed: 12,
                    got: len
                })
            );
        }
        let r = ReadCapacity16::parse(&b[..12]).unwrap();
        assert!(r.truncated);
        assert_eq!(r.lbppbe, 0);
        assert_eq!(r.capacity().unwrap().blocks, 8);
        let r = ReadCapacity16::parse(&b[..14]).unwrap();
        assert_eq!(r.lbppbe, 3);
        let mut big = b;
        big[0..8].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(
            ReadCapacity16::parse(&big).unwrap().capacity(),
            Err(ParseError::LastLbaOverflow(u64::MAX))
        );
    }
}
