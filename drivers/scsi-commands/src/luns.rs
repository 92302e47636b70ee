//! REPORT LUNS parameter data (SPC-4 §6.33), LUN structures (SAM-5 §4.7) and
//! the virtio-scsi 8-byte LUN field (virtio 1.2 §5.6.6.1).

use std::fmt;

use crate::bytes::{array, be32, hex};
use crate::error::{LunError, ParseError};

/// Largest LUN number virtio-scsi can address (14 bits).
pub const VIRTIO_MAX_LUN: u16 = 0x3FFF;

/// The first level of a LUN structure, decoded by its address method
/// (bits 7..6 of byte 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LunAddress {
    /// 00b peripheral device addressing: bus 0 means `target_or_lun` is the LUN.
    Peripheral {
        /// BUS IDENTIFIER (6 bits).
        bus: u8,
        /// TARGET OR LUN.
        target_or_lun: u8,
    },
    /// 01b flat space addressing: a 14-bit LUN.
    Flat {
        /// The LUN.
        lun: u16,
    },
    /// 10b logical unit addressing.
    LogicalUnit {
        /// TARGET (6 bits).
        target: u8,
        /// BUS NUMBER (3 bits).
        bus: u8,
        /// LUN (5 bits).
        lun: u8,
    },
    /// 11b extended addressing (well-known LUs, long LUNs): left undecoded.
    Extended {
        /// The first two bytes of the structure.
        raw: [u8; 2],
    },
}

/// An 8-byte LUN as reported by REPORT LUNS.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lun {
    raw: [u8; 8],
}

impl fmt::Debug for Lun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lun({})", hex(&self.raw))
    }
}

impl Lun {
    /// Wraps raw LUN bytes.
    pub const fn from_raw(raw: [u8; 8]) -> Lun {
        Lun { raw }
    }

    /// A single-level LUN for `lun`: peripheral addressing below 256, flat
    /// space addressing from 256 to 16383 (the encoding QEMU itself reports).
    pub fn single_level(lun: u16) -> Result<Lun, LunError> {
        let mut raw = [0u8; 8];
        match lun {
            0..=0xFF => raw[1] = lun as u8,
            0x100..=VIRTIO_MAX_LUN => {
                let [hi, lo] = (lun | 0x4000).to_be_bytes();
                raw[0] = hi;
                raw[1] = lo;
            }
            _ => return Err(LunError::TooLarge(lun)),
        }
        Ok(Lun { raw })
    }

    /// The raw 8 bytes.
    pub const fn raw(&self) -> [u8; 8] {
        self.raw
    }

    /// Decodes the first addressing level.
    pub const fn address(&self) -> LunAddress {
        let [b0, b1, ..] = self.raw;
        match b0 >> 6 {
            0 => LunAddress::Peripheral {
                bus: b0 & 0x3F,
                target_or_lun: b1,
            },
            1 => LunAddress::Flat {
                lun: (((b0 & 0x3F) as u16) << 8) | b1 as u16,
            },
            2 => LunAddress::LogicalUnit {
                target: b0 & 0x3F,
                bus: b1 >> 5,
                lun: b1 & 0x1F,
            },
            _ => LunAddress::Extended { raw: [b0, b1] },
        }
    }

    /// Only the first level is used (bytes 2..8 are zero).
    pub fn is_single_level(&self) -> bool {
        self.raw.iter().skip(2).all(|&b| b == 0)
    }

    /// The LUN number as virtio-scsi addresses it: single level, and either
    /// peripheral addressing with bus 0 or flat space addressing.
    pub fn number(&self) -> Result<u16, LunError> {
        if !self.is_single_level() {
            return Err(LunError::MultiLevel);
        }
        match self.address() {
            LunAddress::Peripheral {
                bus: 0,
                target_or_lun,
            } => Ok(u16::from(target_or_lun)),
            LunAddress::Flat { lun } => Ok(lun),
            _ => Err(LunError::UnsupportedAddressMethod),
        }
    }

    /// The virtio-scsi LUN field addressing this LUN on `target`; see [`virtio_lun`].
    pub fn to_virtio_lun(&self, target: u8) -> Result<[u8; 8], LunError> {
        virtio_lun(target, self.number()?)
    }
}

/// The virtio-scsi request LUN field (virtio 1.2 §5.6.6.1): byte 0 = 1,
/// byte 1 = target, bytes 2..4 = a single-level LUN structure, bytes 4..8 = 0.
///
/// The LUN structure uses flat space addressing for every LUN,
/// `(0x4000 | lun)` big-endian, which is what Linux sends. QEMU
/// (`virtio_scsi_device_get`) accepts byte 2 equal to 0 or in 0x40..=0x7F and
/// decodes `((lun[2] << 8) | lun[3]) & 0x3FFF`, so both this and the
/// peripheral form QEMU reports for LUN < 256 address the same unit.
pub fn virtio_lun(target: u8, lun: u16) -> Result<[u8; 8], LunError> {
    if lun > VIRTIO_MAX_LUN {
        return Err(LunError::TooLarge(lun));
    }
    let [hi, lo] = (0x4000 | lun).to_be_bytes();
    Ok([1, target, hi, lo, 0, 0, 0, 0])
}

/// Decodes a virtio-scsi LUN field (e.g. from an event) into (target, LUN),
/// the way QEMU does. `None` when byte 0 is not 1, byte 2 is neither 0 nor
/// 0x40..=0x7F, or bytes 4..8 are not zero; the driver should then rescan
/// everything rather than trust the event.
pub fn parse_virtio_lun(field: &[u8; 8]) -> Option<(u8, u16)> {
    let [one, target, hi, lo, rest @ ..] = *field;
    if one != 1 || !(hi == 0 || (0x40..0x80).contains(&hi)) || rest != [0; 4] {
        return None;
    }
    Some((target, u16::from_be_bytes([hi, lo]) & VIRTIO_MAX_LUN))
}

/// REPORT LUNS parameter data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReportLuns {
    /// LUN LIST LENGTH as reported (bytes of LUN entries the device has,
    /// not adjusted for a short allocation length).
    pub list_length: u32,
    /// The complete 8-byte entries present in both the list and the buffer.
    pub luns: Vec<Lun>,
    /// The buffer held fewer entries than the list length: re-issue with
    /// [`ReportLuns::required_allocation_length`].
    pub truncated: bool,
}

impl ReportLuns {
    /// Decodes REPORT LUNS data. Needs the 8-byte header; entries are capped
    /// at the LUN LIST LENGTH and at the buffer; a trailing partial entry is
    /// ignored.
    pub fn parse(buf: &[u8]) -> Result<ReportLuns, ParseError> {
        let (Some(list_length), Some(_)) = (be32(buf, 0), array::<4>(buf, 4)) else {
            return Err(ParseError::Truncated {
                needed: 8,
                got: buf.len(),
            });
        };
        let body = buf.get(8..).unwrap_or(&[]);
        let listed = usize::try_from(list_length).unwrap_or(usize::MAX);
        let usable = listed.min(body.len());
        let luns = body
            .get(..usable)
            .unwrap_or(&[])
            .chunks_exact(8)
            .filter_map(|c| <[u8; 8]>::try_from(c).ok())
            .map(Lun::from_raw)
            .collect();
        Ok(ReportLuns {
            list_length,
            luns,
            truncated: listed > body.len(),
        })
    }

    /// Allocation length that fits the whole list (header included).
    pub fn required_allocation_length(&self) -> u64 {
        u64::from(self.list_length).saturating_add(8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_luns_good() {
        let b = [
            0, 0, 0, 24, 0, 0, 0, 0, //
            0, 0, 0, 0, 0, 0, 0, 0, // LUN 0
            0, 5, 0, 0, 0, 0, 0, 0, // peripheral LUN 5
            0x41, 0x00, 0, 0, 0, 0, 0, 0, // flat LUN 256
        ];
        let r = ReportLuns::parse(&b).unwrap();
        assert_eq!(r.list_length, 24);
        assert!(!r.truncated);
        assert_eq!(r.required_allocation_length(), 32);
        let nums: Vec<_> = r.luns.iter().map(|l| l.number().unwrap()).collect();
        assert_eq!(nums, vec![0, 5, 256]);
        assert_eq!(
            r.luns[1].address(),
            LunAddress::Peripheral {
                bus: 0,
                target_or_lun: 5
            }
        );
        assert_eq!(r.luns[2].address(), LunAddress::Flat { lun: 256 });
    }

    #[test]
    fn report_luns_capped() {
        let mut b = vec![0, 0, 0, 40, 0, 0, 0, 0];
        b.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0, 2, 0, 0]); // partial entry
        let r = ReportLuns::parse(&b).unwrap();
        assert_eq!(r.luns.len(), 1);
        assert!(r.truncated);
        assert_eq!(r.required_allocation_length(), 48);
        // List length smaller than the buffer: buffer garbage beyond it ignored.
        let mut b = vec![0, 0, 0, 8, 0, 0, 0, 0];
        b.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0, 2, 0, 0, 0, 0, 0, 0]);
        let r = ReportLuns::parse(&b).unwrap();
        assert_eq!(r.luns.len(), 1);
        assert!(!r.truncated);
        // Huge list length, tiny buffer.
        let b = [0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0];
        let r = ReportLuns::parse(&b).unwrap();
        assert!(r.luns.is_empty());
        assert!(r.truncated);
        assert_eq!(r.required_allocation_length(), 0xFFFF_FFFF + 8);
        for len in 0..8 {
            assert_eq!(
                ReportLuns::parse(&b[..len]),
                Err(ParseError::Truncated {
                    needed: 8,
                    got: len
                })
            );
        }
    }

    #[test]
    fn lun_methods() {
        let l = Lun::from_raw([0x81, 0x23, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            l.address(),
            LunAddress::LogicalUnit {
                target: 1,
                bus: 1,
                lun: 3
            }
        );
        assert_eq!(l.number(), Err(LunError::UnsupportedAddressMethod));
        let wlun = Lun::from_raw([0xC1, 0x01, 0, 0, 0, 0, 0, 0]);
        assert_eq!(wlun.address(), LunAddress::Extended { raw: [0xC1, 0x01] });
        assert_eq!(
            wlun.to_virtio_lun(0),
            Err(LunError::UnsupportedAddressMethod)
        );
        let multi = Lun::from_raw([0, 1, 0, 2, 0, 0, 0, 0]);
        assert!(!multi.is_single_level());
        assert_eq!(multi.number(), Err(LunError::MultiLevel));
        let bus1 = Lun::from_raw([0x01, 0x05, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bus1.number(), Err(LunError::UnsupportedAddressMethod));
        assert_eq!(format!("{:?}", bus1), "Lun(0105000000000000)");
    }

    #[test]
    fn virtio_encoding() {
        assert_eq!(virtio_lun(0, 0).unwrap(), [1, 0, 0x40, 0, 0, 0, 0, 0]);
        assert_eq!(virtio_lun(3, 5).unwrap(), [1, 3, 0x40, 5, 0, 0, 0, 0]);
        assert_eq!(
            virtio_lun(255, 256).unwrap(),
            [1, 255, 0x41, 0x00, 0, 0, 0, 0]
        );
        assert_eq!(
            virtio_lun(1, 0x3FFF).unwrap(),
            [1, 1, 0x7F, 0xFF, 0, 0, 0, 0]
        );
        assert_eq!(virtio_lun(1, 0x4000), Err(LunError::TooLarge(0x4000)));
        let l = Lun::single_level(7).unwrap();
        assert_eq!(l.raw(), [0, 7, 0, 0, 0, 0, 0, 0]);
        assert_eq!(l.to_virtio_lun(2).unwrap(), [1, 2, 0x40, 7, 0, 0, 0, 0]);
        let l = Lun::single_level(300).unwrap();
        assert_eq!(l.raw(), [0x41, 0x2C, 0, 0, 0, 0, 0, 0]);
        assert_eq!(l.number(), Ok(300));
        assert_eq!(Lun::single_level(0x4000), Err(LunError::TooLarge(0x4000)));
        // Every encodable LUN decodes back, QEMU-style.
        for lun in 0..=VIRTIO_MAX_LUN {
            let f = virtio_lun(9, lun).unwrap();
            assert_eq!(parse_virtio_lun(&f), Some((9, lun)));
            let raw = Lun::single_level(lun).unwrap().raw();
            let peripheral = [1, 9, raw[0], raw[1], 0, 0, 0, 0];
            assert_eq!(parse_virtio_lun(&peripheral), Some((9, lun)));
        }
        assert_eq!(parse_virtio_lun(&[0, 0, 0x40, 0, 0, 0, 0, 0]), None);
        assert_eq!(parse_virtio_lun(&[1, 0, 0x80, 0, 0, 0, 0, 0]), None);
        assert_eq!(parse_virtio_lun(&[1, 0, 0x01, 0, 0, 0, 0, 0]), None);
        assert_eq!(parse_virtio_lun(&[1, 0, 0x40, 0, 0, 0, 0, 1]), None);
    }
}
