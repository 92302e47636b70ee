//! MODE SENSE(6)/(10) parameter data (SPC-4 §7.5): the mode parameter header
//! (write-protect bit), the mode pages that follow it, and the caching page.

use crate::bytes::{be16, byte, prefix};
use crate::error::ParseError;

/// Mode page codes.
pub mod mode_page {
    /// Read-write error recovery.
    pub const READ_WRITE_ERROR_RECOVERY: u8 = 0x01;
    /// Caching (WCE, RCD).
    pub const CACHING: u8 = 0x08;
    /// Control.
    pub const CONTROL: u8 = 0x0A;
    /// All pages.
    pub const ALL: u8 = 0x3F;
}

/// Mode parameter header, from MODE SENSE(6) or (10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModeParameterHeader {
    /// MODE DATA LENGTH: bytes that follow this field.
    pub mode_data_length: u16,
    /// MEDIUM TYPE.
    pub medium_type: u8,
    /// DEVICE-SPECIFIC PARAMETER (for disks: WP 0x80, DPOFUA 0x10).
    pub device_specific: u8,
    /// LONGLBA (MODE SENSE(10) only): block descriptors are 16 bytes.
    pub long_lba: bool,
    /// BLOCK DESCRIPTOR LENGTH.
    pub block_descriptor_length: u16,
    /// Size of the header itself (4 or 8).
    pub header_length: u8,
}

impl ModeParameterHeader {
    /// Decodes the 8-byte MODE SENSE(10) header.
    pub fn parse10(buf: &[u8]) -> Result<ModeParameterHeader, ParseError> {
        let (Some(len), Some(medium), Some(dsp), Some(b4), Some(bdl)) = (
            be16(buf, 0),
            byte(buf, 2),
            byte(buf, 3),
            byte(buf, 4),
            be16(buf, 6),
        ) else {
            return Err(ParseError::Truncated {
                needed: 8,
                got: buf.len(),
            });
        };
        Ok(ModeParameterHeader {
            mode_data_length: len,
            medium_type: medium,
            device_specific: dsp,
            long_lba: b4 & 0x01 != 0,
            block_descriptor_length: bdl,
            header_length: 8,
        })
    }

    /// Decodes the 4-byte MODE SENSE(6) header.
    pub fn parse6(buf: &[u8]) -> Result<ModeParameterHeader, ParseError> {
        let (Some(len), Some(medium), Some(dsp), Some(bdl)) =
            (byte(buf, 0), byte(buf, 1), byte(buf, 2), byte(buf, 3))
        else {
            return Err(ParseError::Truncated {
                needed: 4,
                got: buf.len(),
            });
        };
        Ok(ModeParameterHeader {
            mode_data_length: u16::from(len),
            medium_type: medium,
            device_specific: dsp,
            long_lba: false,
            block_descriptor_length: u16::from(bdl),
            header_length: 4,
        })
    }

    /// WP: the medium is write protected (direct-access devices).
    pub const fn write_protected(&self) -> bool {
        self.device_specific & 0x80 != 0
    }

    /// DPOFUA: the device supports the DPO and FUA bits.
    pub const fn dpofua(&self) -> bool {
        self.device_specific & 0x10 != 0
    }

    /// Total length of the mode data according to the header (the MODE DATA
    /// LENGTH field does not count itself).
    pub fn total_length(&self) -> usize {
        let field = if self.header_length == 8 { 2 } else { 1 };
        usize::from(self.mode_data_length).saturating_add(field)
    }
}

/// One mode page found after the header and block descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModePage<'a> {
    /// PAGE CODE (6 bits).
    pub page_code: u8,
    /// SUBPAGE CODE (0 for page_0 format).
    pub subpage: u8,
    /// PS: the page can be saved.
    pub saveable: bool,
    /// Page parameters after the 2-byte (page_0) or 4-byte (sub_page) page header.
    pub data: &'a [u8],
    /// The page was cut short by the end of the mode data or buffer.
    pub truncated: bool,
}

/// Decoded mode parameter data: header plus pages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModeSense<'a> {
    /// The header.
    pub header: ModeParameterHeader,
    /// Mode pages in the order returned.
    pub pages: Vec<ModePage<'a>>,
}

impl<'a> ModeSense<'a> {
    /// Decodes MODE SENSE(10) data.
    pub fn parse10(buf: &'a [u8]) -> Result<ModeSense<'a>, ParseError> {
        Ok(Self::with_header(buf, ModeParameterHeader::parse10(buf)?))
    }

    /// Decodes MODE SENSE(6) data.
    pub fn parse6(buf: &'a [u8]) -> Result<ModeSense<'a>, ParseError> {
        Ok(Self::with_header(buf, ModeParameterHeader::parse6(buf)?))
    }

    fn with_header(buf: &'a [u8], header: ModeParameterHeader) -> ModeSense<'a> {
        let data = prefix(buf, header.total_length());
        let start = usize::from(header.header_length)
            .saturating_add(usize::from(header.block_descriptor_length));
        let mut rest = data.get(start..).unwrap_or(&[]);
        let mut pages = Vec::new();
        while let Some(b0) = byte(rest, 0) {
            let spf = b0 & 0x40 != 0;
            let (subpage, hdr, len) = if spf {
                (
                    byte(rest, 1).unwrap_or(0),
                    4usize,
                    be16(rest, 2).map(usize::from),
                )
            } else {
                (0, 2usize, byte(rest, 1).map(usize::from))
            };
            let Some(len) = len else {
                break;
            };
            let end = hdr.saturating_add(len);
            let truncated = end > rest.len();
            pages.push(ModePage {
                page_code: b0 & 0x3F,
                subpage,
                saveable: b0 & 0x80 != 0,
                data: crate::bytes::clipped(rest, hdr, end),
                truncated,
            });
            rest = rest.get(end..).unwrap_or(&[]);
        }
        ModeSense { header, pages }
    }

    /// The first page with this page and subpage code.
    pub fn page(&self, page_code: u8, subpage: u8) -> Option<&ModePage<'a>> {
        self.pages
            .iter()
            .find(|p| p.page_code == page_code && p.subpage == subpage)
    }

    /// The caching page (0x08), if returned and long enough.
    pub fn caching(&self) -> Option<CachingPage> {
        let p = self.page(mode_page::CACHING, 0)?;
        let b = byte(p.data, 0)?;
        Some(CachingPage {
            wce: b & 0x04 != 0,
            rcd: b & 0x01 != 0,
        })
    }
}

/// The interesting bits of the caching mode page (SBC-4 §6.5.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CachingPage {
    /// WCE: write cache enabled — SYNCHRONIZE CACHE (or FUA) is needed for durability.
    pub wce: bool,
    /// RCD: read cache disabled.
    pub rcd: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header10() {
        let b = [0x00, 0x1A, 0x00, 0x90, 0x01, 0x00, 0x00, 0x00];
        let h = ModeParameterHeader::parse10(&b).unwrap();
        assert_eq!(h.mode_data_length, 0x1A);
        assert!(h.write_protected());
        assert!(h.dpofua());
        assert!(h.long_lba);
        assert_eq!(h.block_descriptor_length, 0);
        for len in 0..8 {
            assert_eq!(
                ModeParameterHeader::parse10(&b[..len]),
                Err(ParseError::Truncated {
                    needed: 8,
                    got: len
                })
            );
        }
        let h = ModeParameterHeader::parse10(&[0, 6, 0, 0x10, 0, 0, 0, 0]).unwrap();
        assert!(!h.write_protected());
    }

    #[test]
    fn sense10_with_descriptor_and_caching_page() {
        let mut b = vec![0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x08];
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 2, 0]); // block descriptor
        b.extend_from_slice(&[0x88, 0x12, 0x04]); // caching page, PS, WCE
        b.extend_from_slice(&[0; 17]);
        b.extend_from_slice(&[0x4A, 0x01, 0x00, 0x02, 0xAA, 0xBB]); // control subpage 1
        let total = b.len() - 2;
        b[0..2].copy_from_slice(&(total as u16).to_be_bytes());
        b.extend_from_slice(&[0xFF; 5]); // beyond MODE DATA LENGTH
        let m = ModeSense::parse10(&b).unwrap();
        assert_eq!(m.pages.len(), 2);
        assert_eq!(m.pages[0].page_code, 0x08);
        assert!(m.pages[0].saveable);
        assert_eq!(m.pages[0].data.len(), 0x12);
        assert_eq!(
            m.caching(),
            Some(CachingPage {
                wce: true,
                rcd: false
            })
        );
        let c = m.page(0x0A, 1).unwrap();
        assert_eq!(c.data, &[0xAA, 0xBB]);
        assert!(!c.truncated);
        // Truncated in the middle of the caching page.
        let m = ModeSense::parse10(&b[..20]).unwrap();
        assert_eq!(m.pages.len(), 1);
        assert!(m.pages[0].truncated);
        assert_eq!(m.pages[0].data, &[0x04, 0x00]);
    }

    #[test]
    fn sense6() {
        let b = [
            0x0F, 0x00, 0x80, 0x00, 0x08, 0x0A, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let m = ModeSense::parse6(&b).unwrap();
        assert!(m.header.write_protected());
        assert_eq!(m.header.total_length(), 16);
        assert_eq!(
            m.caching(),
            Some(CachingPage {
                wce: false,
                rcd: true
            })
        );
        assert_eq!(
            ModeSense::parse6(&b[..3]),
            Err(ParseError::Truncated { needed: 4, got: 3 })
        );
    }
}
