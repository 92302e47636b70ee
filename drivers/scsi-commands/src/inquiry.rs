//! INQUIRY data (SPC-4 §6.6): the standard INQUIRY response and the vital
//! product data pages a block driver reads (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2).

use crate::bytes::{ascii_string, be16, be32, be64, byte, clipped, hex, prefix};
use crate::error::ParseError;

/// VPD page codes.
pub mod vpd_page {
    /// Supported VPD pages.
    pub const SUPPORTED_PAGES: u8 = 0x00;
    /// Unit serial number.
    pub const UNIT_SERIAL_NUMBER: u8 = 0x80;
    /// Device identification.
    pub const DEVICE_IDENTIFICATION: u8 = 0x83;
    /// Block limits (SBC).
    pub const BLOCK_LIMITS: u8 = 0xB0;
    /// Block device characteristics (SBC).
    pub const BLOCK_DEVICE_CHARACTERISTICS: u8 = 0xB1;
    /// Logical block provisioning (SBC).
    pub const LOGICAL_BLOCK_PROVISIONING: u8 = 0xB2;
}

/// PERIPHERAL QUALIFIER (byte 0, bits 7..5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeripheralQualifier {
    /// 000b: a logical unit of this type is connected.
    Connected,
    /// 001b: the device server could support such a unit, but none is connected.
    NotConnected,
    /// 011b: the device server cannot support a logical unit here.
    NotSupported,
    /// Reserved or vendor-specific values (010b, 1xxb).
    Other(u8),
}

impl PeripheralQualifier {
    /// Decodes bits 7..5 of `b`.
    pub const fn from_byte0(b: u8) -> Self {
        match b >> 5 {
            0 => Self::Connected,
            1 => Self::NotConnected,
            3 => Self::NotSupported,
            v => Self::Other(v),
        }
    }
}

/// PERIPHERAL DEVICE TYPE (byte 0, bits 4..0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceType {
    /// 0x00: direct access block device (disk).
    DirectAccess,
    /// 0x01: sequential access (tape).
    SequentialAccess,
    /// 0x05: CD/DVD.
    CdDvd,
    /// 0x07: optical memory.
    OpticalMemory,
    /// 0x08: medium changer.
    MediumChanger,
    /// 0x0C: storage array controller.
    StorageArray,
    /// 0x0D: enclosure services.
    Enclosure,
    /// 0x0E: simplified direct access (RBC).
    SimplifiedDirectAccess,
    /// 0x14: host managed zoned block device.
    HostManagedZoned,
    /// 0x1E: well known logical unit.
    WellKnownLu,
    /// 0x1F: unknown or no device type.
    Unknown,
    /// Any other type code.
    Other(u8),
}

impl DeviceType {
    /// Decodes bits 4..0 of `b`.
    pub const fn from_byte0(b: u8) -> Self {
        match b & 0x1F {
            0x00 => Self::DirectAccess,
            0x01 => Self::SequentialAccess,
            0x05 => Self::CdDvd,
            0x07 => Self::OpticalMemory,
            0x08 => Self::MediumChanger,
            0x0C => Self::StorageArray,
            0x0D => Self::Enclosure,
            0x0E => Self::SimplifiedDirectAccess,
            0x14 => Self::HostManagedZoned,
            0x1E => Self::WellKnownLu,
            0x1F => Self::Unknown,
            v => Self::Other(v),
        }
    }

    /// The 5-bit code.
    pub const fn code(self) -> u8 {
        match self {
            Self::DirectAccess => 0x00,
            Self::SequentialAccess => 0x01,
            Self::CdDvd => 0x05,
            Self::OpticalMemory => 0x07,
            Self::MediumChanger => 0x08,
            Self::StorageArray => 0x0C,
            Self::Enclosure => 0x0D,
            Self::SimplifiedDirectAccess => 0x0E,
            Self::HostManagedZoned => 0x14,
            Self::WellKnownLu => 0x1E,
            Self::Unknown => 0x1F,
            Self::Other(v) => v,
        }
    }
}

/// Standard INQUIRY data.
///
/// Flags in bytes 5..7 read as `false` and strings as empty (or partial) when
/// the response is too short to contain them; `truncated` is then set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StandardInquiry {
    /// Peripheral qualifier.
    pub qualifier: PeripheralQualifier,
    /// Peripheral device type.
    pub device_type: DeviceType,
    /// RMB: removable medium.
    pub removable: bool,
    /// VERSION (0x05 SPC-3, 0x06 SPC-4, 0x07 SPC-5, 0 none claimed).
    pub version: u8,
    /// NORMACA.
    pub normaca: bool,
    /// HISUP: hierarchical LUN addressing.
    pub hisup: bool,
    /// RESPONSE DATA FORMAT (2 for all current devices).
    pub response_data_format: u8,
    /// ADDITIONAL LENGTH (n-4).
    pub additional_length: u8,
    /// SCCS: embedded storage array controller.
    pub sccs: bool,
    /// TPGS: target port group support (ALUA), 0..=3.
    pub tpgs: u8,
    /// 3PC: third-party copy.
    pub third_party_copy: bool,
    /// PROTECT: protection information supported.
    pub protect: bool,
    /// ENCSERV: embedded enclosure services.
    pub encserv: bool,
    /// MULTIP: multiple ports.
    pub multip: bool,
    /// CMDQUE: command queuing supported.
    pub cmdque: bool,
    /// T10 VENDOR IDENTIFICATION (bytes 8..16), trimmed.
    pub vendor: String,
    /// PRODUCT IDENTIFICATION (bytes 16..32), trimmed.
    pub product: String,
    /// PRODUCT REVISION LEVEL (bytes 32..36), trimmed.
    pub revision: String,
    /// The data (bounded by the buffer and the ADDITIONAL LENGTH) ended before byte 36.
    pub truncated: bool,
}

impl StandardInquiry {
    /// Minimum bytes accepted: through the ADDITIONAL LENGTH field.
    pub const MIN_LEN: usize = 5;
    /// Bytes needed for all fields including the revision string.
    pub const FULL_LEN: usize = 36;

    /// Decodes standard INQUIRY data. Fewer than 5 bytes is an error; beyond
    /// that, fields are decoded as far as the buffer and ADDITIONAL LENGTH go.
    pub fn parse(buf: &[u8]) -> Result<StandardInquiry, ParseError> {
        let (Some(b0), Some(b1), Some(b2), Some(b3), Some(additional)) = (
            byte(buf, 0),
            byte(buf, 1),
            byte(buf, 2),
            byte(buf, 3),
            byte(buf, 4),
        ) else {
            return Err(ParseError::Truncated {
                needed: Self::MIN_LEN,
                got: buf.len(),
            });
        };
        let d = prefix(buf, 5usize.saturating_add(usize::from(additional)));
        let b5 = byte(d, 5).unwrap_or(0);
        let b6 = byte(d, 6).unwrap_or(0);
        let b7 = byte(d, 7).unwrap_or(0);
        Ok(StandardInquiry {
            qualifier: PeripheralQualifier::from_byte0(b0),
            device_type: DeviceType::from_byte0(b0),
            removable: b1 & 0x80 != 0,
            version: b2,
            normaca: b3 & 0x20 != 0,
            hisup: b3 & 0x10 != 0,
            response_data_format: b3 & 0x0F,
            additional_length: additional,
            sccs: b5 & 0x80 != 0,
            tpgs: (b5 >> 4) & 0x03,
            third_party_copy: b5 & 0x08 != 0,
            protect: b5 & 0x01 != 0,
            encserv: b6 & 0x40 != 0,
            multip: b6 & 0x10 != 0,
            cmdque: b7 & 0x02 != 0,
            vendor: ascii_string(clipped(d, 8, 16)),
            product: ascii_string(clipped(d, 16, 32)),
            revision: ascii_string(clipped(d, 32, 36)),
            truncated: d.len() < Self::FULL_LEN,
        })
    }

    /// A logical unit is present at this address (qualifier 000b and a known
    /// device type). QEMU answers 0x7F (qualifier 011b, type 0x1F) for LUNs
    /// that do not exist.
    pub fn lu_present(&self) -> bool {
        self.qualifier == PeripheralQualifier::Connected && self.device_type != DeviceType::Unknown
    }

    /// A present direct-access block device (disk), the kind this driver serves.
    pub fn is_disk(&self) -> bool {
        self.qualifier == PeripheralQualifier::Connected
            && matches!(
                self.device_type,
                DeviceType::DirectAccess | DeviceType::SimplifiedDirectAccess
            )
    }
}

/// Checks a VPD page header and returns the page (header included), clipped to
/// the PAGE LENGTH and to the buffer, plus whether the buffer was shorter
/// than the PAGE LENGTH says.
fn vpd_page(buf: &[u8], expected: u8) -> Result<(&[u8], bool), ParseError> {
    let (Some(code), Some(page_len)) = (byte(buf, 1), be16(buf, 2)) else {
        return Err(ParseError::Truncated {
            needed: 4,
            got: buf.len(),
        });
    };
    if code != expected {
        return Err(ParseError::PageCodeMismatch {
            expected,
            got: code,
        });
    }
    let total = 4usize.saturating_add(usize::from(page_len));
    Ok((prefix(buf, total), buf.len() < total))
}

/// VPD 0x00: the list of supported page codes.
pub fn parse_vpd_supported_pages(buf: &[u8]) -> Result<Vec<u8>, ParseError> {
    let (page, _) = vpd_page(buf, vpd_page::SUPPORTED_PAGES)?;
    Ok(page.get(4..).unwrap_or(&[]).to_vec())
}

/// VPD 0x80: the product serial number, trimmed (non-printable bytes become `?`).
pub fn parse_vpd_unit_serial(buf: &[u8]) -> Result<String, ParseError> {
    let (page, _) = vpd_page(buf, vpd_page::UNIT_SERIAL_NUMBER)?;
    Ok(ascii_string(page.get(4..).unwrap_or(&[])))
}

/// CODE SET of a designation descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CodeSet {
    /// 1: binary.
    Binary,
    /// 2: ASCII printable.
    Ascii,
    /// 3: UTF-8.
    Utf8,
    /// Reserved values.
    Other(u8),
}

/// ASSOCIATION of a designation descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Association {
    /// 0: the addressed logical unit.
    LogicalUnit,
    /// 1: the target port that received the command.
    TargetPort,
    /// 2: the SCSI target device containing the logical unit.
    TargetDevice,
    /// 3: reserved.
    Reserved,
}

/// DESIGNATOR TYPE of a designation descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DesignatorType {
    /// 0: vendor specific.
    VendorSpecific,
    /// 1: T10 vendor ID based.
    T10VendorId,
    /// 2: EUI-64 based.
    Eui64,
    /// 3: NAA.
    Naa,
    /// 4: relative target port identifier.
    RelativeTargetPort,
    /// 5: target port group.
    TargetPortGroup,
    /// 6: logical unit group.
    LogicalUnitGroup,
    /// 7: MD5 logical unit identifier.
    Md5LogicalUnit,
    /// 8: SCSI name string.
    ScsiNameString,
    /// 9: protocol specific port identifier.
    ProtocolSpecificPort,
    /// 0xA: UUID.
    Uuid,
    /// Reserved values.
    Other(u8),
}

impl DesignatorType {
    const fn from_nibble(v: u8) -> Self {
        match v & 0x0F {
            0 => Self::VendorSpecific,
            1 => Self::T10VendorId,
            2 => Self::Eui64,
            3 => Self::Naa,
            4 => Self::RelativeTargetPort,
            5 => Self::TargetPortGroup,
            6 => Self::LogicalUnitGroup,
            7 => Self::Md5LogicalUnit,
            8 => Self::ScsiNameString,
            9 => Self::ProtocolSpecificPort,
            0xA => Self::Uuid,
            v => Self::Other(v),
        }
    }
}

/// One designation descriptor of VPD page 0x83.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Designator {
    /// PROTOCOL IDENTIFIER (meaningful only when `piv` is set).
    pub protocol_identifier: u8,
    /// CODE SET.
    pub code_set: CodeSet,
    /// PIV: the protocol identifier is valid.
    pub piv: bool,
    /// ASSOCIATION.
    pub association: Association,
    /// DESIGNATOR TYPE.
    pub designator_type: DesignatorType,
    /// The designator bytes.
    pub identifier: Vec<u8>,
}

impl Designator {
    /// The identifier as text: sanitised ASCII for the ASCII/UTF-8 code sets,
    /// `0x…` hex otherwise.
    pub fn identifier_text(&self) -> String {
        match self.code_set {
            CodeSet::Ascii | CodeSet::Utf8 => ascii_string(&self.identifier),
            _ => format!("0x{}", hex(&self.identifier)),
        }
    }

    /// For a binary NAA designator of the right length: the NAA field (2, 3, 5 or 6).
    fn naa_kind(&self) -> Option<u8> {
        if self.designator_type != DesignatorType::Naa || self.code_set != CodeSet::Binary {
            return None;
        }
        let naa = byte(&self.identifier, 0)? >> 4;
        let len_ok = match naa {
            2 | 3 | 5 => self.identifier.len() == 8,
            6 => self.identifier.len() == 16,
            _ => false,
        };
        len_ok.then_some(naa)
    }
}

/// VPD 0x83 decoded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct DeviceIdentification {
    /// Complete designation descriptors, in page order.
    pub designators: Vec<Designator>,
    /// The page ended inside a descriptor (that descriptor is dropped), or the
    /// buffer was shorter than the PAGE LENGTH.
    pub truncated: bool,
}

impl DeviceIdentification {
    /// World wide name of the logical unit: the binary NAA designator with
    /// association "logical unit" (IEEE registered extended NAA 6 preferred,
    /// then 5, 3, 2), else a logical-unit EUI-64 designator (8, 12 or 16 bytes),
    /// formatted as `0x` + lower-case hex (e.g. `0x5000c500a1b2c3d4`).
    pub fn wwn(&self) -> Option<String> {
        let lu = || {
            self.designators
                .iter()
                .filter(|d| d.association == Association::LogicalUnit)
        };
        let naa = [6u8, 5, 3, 2]
            .iter()
            .find_map(|&want| lu().find(|d| d.naa_kind() == Some(want)));
        let eui = || {
            lu().find(|d| {
                d.designator_type == DesignatorType::Eui64
                    && d.code_set == CodeSet::Binary
                    && matches!(d.identifier.len(), 8 | 12 | 16)
            })
        };
        naa.or_else(eui)
            .map(|d| format!("0x{}", hex(&d.identifier)))
    }
}

/// VPD 0x83: device identification designators.
pub fn parse_vpd_device_identification(buf: &[u8]) -> Result<DeviceIdentification, ParseError> {
    let (page, short) = vpd_page(buf, vpd_page::DEVICE_IDENTIFICATION)?;
    let mut out = DeviceIdentification {
        designators: Vec::new(),
        truncated: short,
    };
    let mut rest = page.get(4..).unwrap_or(&[]);
    while !rest.is_empty() {
        let (Some(b0), Some(b1), Some(len)) = (byte(rest, 0), byte(rest, 1), byte(rest, 3)) else {
            out.truncated = true;
            break;
        };
        let end = 4usize.saturating_add(usize::from(len));
        let (Some(ident), Some(next)) = (rest.get(4..end), rest.get(end..)) else {
            out.truncated = true;
            break;
        };
        out.designators.push(Designator {
            protocol_identifier: b0 >> 4,
            code_set: match b0 & 0x0F {
                1 => CodeSet::Binary,
                2 => CodeSet::Ascii,
                3 => CodeSet::Utf8,
                v => CodeSet::Other(v),
            },
            piv: b1 & 0x80 != 0,
            association: match (b1 >> 4) & 0x03 {
                0 => Association::LogicalUnit,
                1 => Association::TargetPort,
                2 => Association::TargetDevice,
                _ => Association::Reserved,
            },
            designator_type: DesignatorType::from_nibble(b1),
            identifier: ident.to_vec(),
        });
        rest = next;
    }
    Ok(out)
}

/// VPD 0xB0 Block Limits (SBC-4 §6.6.4). Every length is in logical blocks.
/// A field is `None` when it is 0 ("not reported"/"no limit reported") or
/// lies beyond the end of the page (older devices return a 16-byte page).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BlockLimits {
    /// WSNZ: WRITE SAME with 0 blocks is refused (`None` if truncated before byte 4).
    pub wsnz: Option<bool>,
    /// MAXIMUM COMPARE AND WRITE LENGTH.
    pub max_compare_and_write: Option<u8>,
    /// OPTIMAL TRANSFER LENGTH GRANULARITY.
    pub optimal_transfer_length_granularity: Option<u16>,
    /// MAXIMUM TRANSFER LENGTH: the largest READ/WRITE the device accepts.
    pub max_transfer_length: Option<u32>,
    /// OPTIMAL TRANSFER LENGTH.
    pub optimal_transfer_length: Option<u32>,
    /// MAXIMUM PREFETCH LENGTH.
    pub max_prefetch_length: Option<u32>,
    /// MAXIMUM UNMAP LBA COUNT (0xFFFFFFFF = no limit; `None` = UNMAP not supported/reported).
    pub max_unmap_lba_count: Option<u32>,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT (0xFFFFFFFF = no limit).
    pub max_unmap_block_descriptor_count: Option<u32>,
    /// OPTIMAL UNMAP GRANULARITY.
    pub optimal_unmap_granularity: Option<u32>,
    /// UNMAP GRANULARITY ALIGNMENT, only when UGAVALID is set (may be 0).
    pub unmap_granularity_alignment: Option<u32>,
    /// MAXIMUM WRITE SAME LENGTH.
    pub max_write_same_length: Option<u64>,
}

/// VPD 0xB0: block limits.
pub fn parse_vpd_block_limits(buf: &[u8]) -> Result<BlockLimits, ParseError> {
    let (p, _) = vpd_page(buf, vpd_page::BLOCK_LIMITS)?;
    let nz32 = |at| be32(p, at).filter(|&v| v != 0);
    Ok(BlockLimits {
        wsnz: byte(p, 4).map(|b| b & 0x01 != 0),
        max_compare_and_write: byte(p, 5).filter(|&v| v != 0),
        optimal_transfer_length_granularity: be16(p, 6).filter(|&v| v != 0),
        max_transfer_length: nz32(8),
        optimal_transfer_length: nz32(12),
        max_prefetch_length: nz32(16),
        max_unmap_lba_count: nz32(20),
        max_unmap_block_descriptor_count: nz32(24),
        optimal_unmap_granularity: nz32(28),
        unmap_granularity_alignment: be32(p, 32)
            .filter(|&v| v & 0x8000_0000 != 0)
            .map(|v| v & 0x7FFF_FFFF),
        max_write_same_length: be64(p, 36).filter(|&v| v != 0),
    })
}

/// MEDIUM ROTATION RATE (VPD 0xB1 bytes 4..6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RotationRate {
    /// 0: not reported.
    NotReported,
    /// 1: non-rotating medium (solid state).
    NonRotating,
    /// 0x0401..=0xFFFE: nominal revolutions per minute.
    Rpm(u16),
    /// Reserved values (2..=0x400, 0xFFFF).
    Reserved(u16),
}

/// NOMINAL FORM FACTOR (VPD 0xB1 byte 7, bits 3..0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FormFactor {
    /// 0: not reported.
    NotReported,
    /// 1: 5.25 inch.
    Inch5_25,
    /// 2: 3.5 inch.
    Inch3_5,
    /// 3: 2.5 inch.
    Inch2_5,
    /// 4: 1.8 inch.
    Inch1_8,
    /// 5: less than 1.8 inch.
    LessThan1_8,
    /// Reserved values.
    Reserved(u8),
}

/// VPD 0xB1 Block Device Characteristics (SBC-4 §6.6.2); `None` = truncated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockDeviceCharacteristics {
    /// MEDIUM ROTATION RATE.
    pub rotation_rate: Option<RotationRate>,
    /// PRODUCT TYPE (0 = not indicated).
    pub product_type: Option<u8>,
    /// NOMINAL FORM FACTOR.
    pub form_factor: Option<FormFactor>,
    /// FUAB: SYNCHRONIZE CACHE is also honoured as FUA for prior writes.
    pub fuab: Option<bool>,
    /// VBULS: VERIFY byte check unmapped LBA supported.
    pub vbuls: Option<bool>,
}

/// VPD 0xB1: block device characteristics.
pub fn parse_vpd_block_device_characteristics(
    buf: &[u8],
) -> Result<BlockDeviceCharacteristics, ParseError> {
    let (p, _) = vpd_page(buf, vpd_page::BLOCK_DEVICE_CHARACTERISTICS)?;
    Ok(BlockDeviceCharacteristics {
        rotation_rate: be16(p, 4).map(|v| match v {
            0 => RotationRate::NotReported,
            1 => RotationRate::NonRotating,
            0x0401..=0xFFFE => RotationRate::Rpm(v),
            _ => RotationRate::Reserved(v),
        }),
        product_type: byte(p, 6),
        form_factor: byte(p, 7).map(|b| match b & 0x0F {
            0 => FormFactor::NotReported,
            1 => FormFactor::Inch5_25,
            2 => FormFactor::Inch3_5,
            3 => FormFactor::Inch2_5,
            4 => FormFactor::Inch1_8,
            5 => FormFactor::LessThan1_8,
            v => FormFactor::Reserved(v),
        }),
        fuab: byte(p, 8).map(|b| b & 0x02 != 0),
        vbuls: byte(p, 8).map(|b| b & 0x01 != 0),
    })
}

/// VPD 0xB2 Logical Block Provisioning (SBC-4 §6.6.6): which discard
/// commands the device supports. Flags missing because of truncation are `false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LogicalBlockProvisioning {
    /// THRESHOLD EXPONENT.
    pub threshold_exponent: u8,
    /// LBPU: UNMAP is supported.
    pub lbpu: bool,
    /// LBPWS: WRITE SAME(16) with UNMAP is supported.
    pub lbpws: bool,
    /// LBPWS10: WRITE SAME(10) with UNMAP is supported.
    pub lbpws10: bool,
    /// LBPRZ (3 bits): 0 = unmapped blocks read back unspecified data,
    /// 1 = zeros, 2 = the provisioning initialization pattern.
    pub lbprz: u8,
    /// ANC_SUP: ANCHOR supported.
    pub anc_sup: bool,
    /// DP: a provisioning group descriptor is present.
    pub dp: bool,
    /// PROVISIONING TYPE: 0 not reported, 1 resource provisioned, 2 thin.
    pub provisioning_type: u8,
    /// The page ended before byte 7.
    pub truncated: bool,
}

/// VPD 0xB2: logical block provisioning.
pub fn parse_vpd_logical_block_provisioning(
    buf: &[u8],
) -> Result<LogicalBlockProvisioning, ParseError> {
    let (p, _) = vpd_page(buf, vpd_page::LOGICAL_BLOCK_PROVISIONING)?;
    let b5 = byte(p, 5).unwrap_or(0);
    Ok(LogicalBlockProvisioning {
        threshold_exponent: byte(p, 4).unwrap_or(0),
        lbpu: b5 & 0x80 != 0,
        lbpws: b5 & 0x40 != 0,
        lbpws10: b5 & 0x20 != 0,
        lbprz: (b5 >> 2) & 0x07,
        anc_sup: b5 & 0x02 != 0,
        dp: b5 & 0x01 != 0,
        provisioning_type: byte(p, 6).unwrap_or(0) & 0x07,
        truncated: p.len() < 8,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn qemu_inquiry() -> Vec<u8> {
        let mut b = vec![0u8; 36];
        b[0] = 0x00;
        b[2] = 0x05;
        b[3] = 0x12; // HISUP, format 2
        b[4] = 31;
        b[7] = 0x02; // CmdQue
        b[8..16].copy_from_slice(b"QEMU    ");
        b[16..32].copy_from_slice(b"QEMU HARDDISK   ");
        b[32..36].copy_from_slice(b"2.5+");
        b
    }

    #[test]
    fn standard_inquiry_good() {
        let i = StandardInquiry::parse(&qemu_inquiry()).unwrap();
        assert_eq!(i.qualifier, PeripheralQualifier::Connected);
        assert_eq!(i.device_type, DeviceType::DirectAccess);
        assert!(!i.removable);
        assert_eq!(i.version, 5);
        assert_eq!(i.response_data_format, 2);
        assert!(i.hisup);
        assert!(i.cmdque);
        assert_eq!(i.vendor, "QEMU");
        assert_eq!(i.product, "QEMU HARDDISK");
        assert_eq!(i.revision, "2.5+");
        assert!(!i.truncated);
        assert!(i.lu_present());
        assert!(i.is_disk());
    }

    #[test]
    fn standard_inquiry_no_lun_and_removable() {
        let mut b = qemu_inquiry();
        b[0] = 0x7F;
        let i = StandardInquiry::parse(&b).unwrap();
        assert_eq!(i.qualifier, PeripheralQualifier::NotSupported);
        assert_eq!(i.device_type, DeviceType::Unknown);
        assert!(!i.lu_present());
        let mut b = qemu_inquiry();
        b[0] = 0x05;
        b[1] = 0x80;
        b[9] = 0xC3;
        let i = StandardInquiry::parse(&b).unwrap();
        assert!(i.removable);
        assert_eq!(i.device_type, DeviceType::CdDvd);
        assert!(!i.is_disk());
        assert_eq!(i.vendor, "Q?MU");
    }

    #[test]
    fn standard_inquiry_truncated() {
        let b = qemu_inquiry();
        for len in 0..5 {
            assert_eq!(
                StandardInquiry::parse(&b[..len]),
                Err(ParseError::Truncated {
                    needed: 5,
                    got: len
                })
            );
        }
        let i = StandardInquiry::parse(&b[..20]).unwrap();
        assert_eq!(i.vendor, "QEMU");
        assert_eq!(i.product, "QEMU");
        assert_eq!(i.revision, "");
        assert!(i.truncated);
        // ADDITIONAL LENGTH shorter than the buffer is honoured.
        let mut b = qemu_inquiry();
        b[4] = 11; // data ends at byte 16
        let i = StandardInquiry::parse(&b).unwrap();
        assert_eq!(i.vendor, "QEMU");
        assert_eq!(i.product, "");
        assert!(i.truncated);
    }

    #[test]
    fn supported_pages_and_serial() {
        let b = [0x00, 0x00, 0x00, 0x04, 0x00, 0x80, 0x83, 0xB0, 0xEE];
        assert_eq!(
            parse_vpd_supported_pages(&b).unwrap(),
            vec![0x00, 0x80, 0x83, 0xB0]
        );
        assert_eq!(
            parse_vpd_supported_pages(&b[..6]).unwrap(),
            vec![0x00, 0x80]
        );
        assert_eq!(
            parse_vpd_supported_pages(&[0, 0x80, 0, 0]),
            Err(ParseError::PageCodeMismatch {
                expected: 0,
                got: 0x80
            })
        );
        assert_eq!(
            parse_vpd_supported_pages(&[0, 0, 0]),
            Err(ParseError::Truncated { needed: 4, got: 3 })
        );
        let s = [
            0x00, 0x80, 0x00, 0x08, b' ', b' ', b'S', b'N', b'1', b'2', 0, 0,
        ];
        assert_eq!(parse_vpd_unit_serial(&s).unwrap(), "SN12");
    }

    pub(crate) fn devid_page() -> Vec<u8> {
        let mut body = Vec::new();
        // ASCII vendor-specific, LU.
        body.extend_from_slice(&[0x02, 0x00, 0x00, 0x06]);
        body.extend_from_slice(b"drive0");
        // EUI-64, LU.
        body.extend_from_slice(&[0x01, 0x02, 0x00, 0x08, 1, 2, 3, 4, 5, 6, 7, 8]);
        // NAA 5, target port (must be ignored by wwn()).
        body.extend_from_slice(&[0x61, 0x93, 0x00, 0x08, 0x50, 0, 0, 0, 0, 0, 0, 0x99]);
        // NAA 5, LU.
        body.extend_from_slice(&[
            0x01, 0x03, 0x00, 0x08, 0x50, 0x00, 0xc5, 0x00, 0xa1, 0xb2, 0xc3, 0xd4,
        ]);
        let mut p = vec![0x00, 0x83];
        p.extend_from_slice(&(body.len() as u16).to_be_bytes());
        p.extend_from_slice(&body);
        p
    }

    #[test]
    fn device_identification() {
        let p = devid_page();
        let id = parse_vpd_device_identification(&p).unwrap();
        assert!(!id.truncated);
        assert_eq!(id.designators.len(), 4);
        let d0 = &id.designators[0];
        assert_eq!(d0.code_set, CodeSet::Ascii);
        assert_eq!(d0.designator_type, DesignatorType::VendorSpecific);
        assert_eq!(d0.identifier_text(), "drive0");
        let d2 = &id.designators[2];
        assert!(d2.piv);
        assert_eq!(d2.protocol_identifier, 6);
        assert_eq!(d2.association, Association::TargetPort);
        assert_eq!(id.wwn().as_deref(), Some("0x5000c500a1b2c3d4"));
        // Without the NAA LU designator the EUI-64 is used.
        let id = parse_vpd_device_identification(&p[..p.len() - 12]).unwrap();
        assert!(id.truncated);
        assert_eq!(id.designators.len(), 3);
        assert_eq!(id.wwn().as_deref(), Some("0x0102030405060708"));
        // Cut inside a descriptor: dropped, flagged.
        let id = parse_vpd_device_identification(&p[..p.len() - 3]).unwrap();
        assert!(id.truncated);
        assert_eq!(id.designators.len(), 3);
        // No LU designators that qualify.
        let id = parse_vpd_device_identification(&p[..14]).unwrap();
        assert_eq!(id.wwn(), None);
    }

    pub(crate) fn block_limits_page() -> Vec<u8> {
        let mut p = vec![0u8; 64];
        p[1] = 0xB0;
        p[3] = 0x3C;
        p[4] = 0x01;
        p[5] = 0x01;
        p[6..8].copy_from_slice(&8u16.to_be_bytes());
        p[8..12].copy_from_slice(&0x4000u32.to_be_bytes());
        p[12..16].copy_from_slice(&0x800u32.to_be_bytes());
        p[20..24].copy_from_slice(&0x40_0000u32.to_be_bytes());
        p[24..28].copy_from_slice(&255u32.to_be_bytes());
        p[28..32].copy_from_slice(&8u32.to_be_bytes());
        p[32..36].copy_from_slice(&0x8000_0000u32.to_be_bytes());
        p[36..44].copy_from_slice(&0x40_0000u64.to_be_bytes());
        p
    }

    #[test]
    fn block_limits() {
        let p = block_limits_page();
        let l = parse_vpd_block_limits(&p).unwrap();
        assert_eq!(l.wsnz, Some(true));
        assert_eq!(l.max_compare_and_write, Some(1));
        assert_eq!(l.optimal_transfer_length_granularity, Some(8));
        assert_eq!(l.max_transfer_length, Some(0x4000));
        assert_eq!(l.optimal_transfer_length, Some(0x800));
        assert_eq!(l.max_prefetch_length, None);
        assert_eq!(l.max_unmap_lba_count, Some(0x40_0000));
        assert_eq!(l.max_unmap_block_descriptor_count, Some(255));
        assert_eq!(l.optimal_unmap_granularity, Some(8));
        assert_eq!(l.unmap_granularity_alignment, Some(0));
        assert_eq!(l.max_write_same_length, Some(0x40_0000));
        // Old 16-byte page (SBC-2): later fields absent.
        let mut old = p[..20].to_vec();
        old[3] = 0x10;
        let l = parse_vpd_block_limits(&old).unwrap();
        assert_eq!(l.max_transfer_length, Some(0x4000));
        assert_eq!(l.max_unmap_lba_count, None);
        assert_eq!(l.max_write_same_length, None);
        // PAGE LENGTH shorter than the buffer: fields past it are ignored.
        let mut short = p.clone();
        short[3] = 8; // through byte 11
        let l = parse_vpd_block_limits(&short).unwrap();
        assert_eq!(l.max_transfer_length, Some(0x4000));
        assert_eq!(l.optimal_transfer_length, None);
        // UGAVALID clear.
        let mut p2 = p.clone();
        p2[32] = 0x00;
        p2[35] = 0x04;
        assert_eq!(
            parse_vpd_block_limits(&p2)
                .unwrap()
                .unmap_granularity_alignment,
            None
        );
    }

    #[test]
    fn block_device_characteristics() {
        let mut p = vec![0u8; 64];
        p[1] = 0xB1;
        p[3] = 0x3C;
        p[5] = 0x01;
        p[7] = 0x03;
        p[8] = 0x02;
        let c = parse_vpd_block_device_characteristics(&p).unwrap();
        assert_eq!(c.rotation_rate, Some(RotationRate::NonRotating));
        assert_eq!(c.form_factor, Some(FormFactor::Inch2_5));
        assert_eq!(c.fuab, Some(true));
        assert_eq!(c.vbuls, Some(false));
        p[4..6].copy_from_slice(&7200u16.to_be_bytes());
        let c = parse_vpd_block_device_characteristics(&p[..6]).unwrap();
        assert_eq!(c.rotation_rate, Some(RotationRate::Rpm(7200)));
        assert_eq!(c.form_factor, None);
        p[4..6].copy_from_slice(&2u16.to_be_bytes());
        let c = parse_vpd_block_device_characteristics(&p).unwrap();
        assert_eq!(c.rotation_rate, Some(RotationRate::Reserved(2)));
    }

    #[test]
    fn logical_block_provisioning() {
        let p = [0x00, 0xB2, 0x00, 0x04, 0x00, 0xC4, 0x02, 0x00];
        let l = parse_vpd_logical_block_provisioning(&p).unwrap();
        assert!(l.lbpu && l.lbpws && !l.lbpws10);
        assert_eq!(l.lbprz, 1);
        assert_eq!(l.provisioning_type, 2);
        assert!(!l.truncated);
        let l = parse_vpd_logical_block_provisioning(&p[..5]).unwrap();
        assert!(!l.lbpu);
        assert!(l.truncated);
    }
}
