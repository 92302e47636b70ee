//! Sense data (SPC-4 §4.5): strict decoding of fixed (0x70/0x71) and
//! descriptor (0x72/0x73) formats, sense keys, and human-readable ASC/ASCQ text.

use std::fmt;

use thiserror::Error;

use crate::bytes::{be16, be32, be64, byte, prefix};

/// The 4-bit sense key (SPC-4 table 48).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SenseKey {
    /// 0x0: no specific sense key information.
    NoSense,
    /// 0x1: the command completed after recovery action by the device.
    RecoveredError,
    /// 0x2: the logical unit is not accessible.
    NotReady,
    /// 0x3: a nonrecoverable error probably caused by a flaw in the medium.
    MediumError,
    /// 0x4: a nonrecoverable hardware failure.
    HardwareError,
    /// 0x5: the command or its parameters were rejected.
    IllegalRequest,
    /// 0x6: a unit attention condition (reset, medium or parameters changed, …).
    UnitAttention,
    /// 0x7: the operation is prohibited (write protection, …).
    DataProtect,
    /// 0x8: blank or formatted-only medium / end of data (mostly tape).
    BlankCheck,
    /// 0x9: vendor-specific condition.
    VendorSpecific,
    /// 0xA: an EXTENDED COPY command was aborted.
    CopyAborted,
    /// 0xB: the device aborted the command; retrying may succeed.
    AbortedCommand,
    /// 0xC: reserved (formerly EQUAL).
    Reserved0C,
    /// 0xD: a buffered device reached the end of a partition.
    VolumeOverflow,
    /// 0xE: source data did not match the medium (VERIFY, COMPARE AND WRITE).
    Miscompare,
    /// 0xF: reserved.
    Reserved0F,
}

impl SenseKey {
    /// Decodes the low four bits of `v`.
    pub const fn from_nibble(v: u8) -> Self {
        match v & 0x0F {
            0x0 => Self::NoSense,
            0x1 => Self::RecoveredError,
            0x2 => Self::NotReady,
            0x3 => Self::MediumError,
            0x4 => Self::HardwareError,
            0x5 => Self::IllegalRequest,
            0x6 => Self::UnitAttention,
            0x7 => Self::DataProtect,
            0x8 => Self::BlankCheck,
            0x9 => Self::VendorSpecific,
            0xA => Self::CopyAborted,
            0xB => Self::AbortedCommand,
            0xC => Self::Reserved0C,
            0xD => Self::VolumeOverflow,
            0xE => Self::Miscompare,
            _ => Self::Reserved0F,
        }
    }

    /// The 4-bit code.
    pub const fn code(self) -> u8 {
        match self {
            Self::NoSense => 0x0,
            Self::RecoveredError => 0x1,
            Self::NotReady => 0x2,
            Self::MediumError => 0x3,
            Self::HardwareError => 0x4,
            Self::IllegalRequest => 0x5,
            Self::UnitAttention => 0x6,
            Self::DataProtect => 0x7,
            Self::BlankCheck => 0x8,
            Self::VendorSpecific => 0x9,
            Self::CopyAborted => 0xA,
            Self::AbortedCommand => 0xB,
            Self::Reserved0C => 0xC,
            Self::VolumeOverflow => 0xD,
            Self::Miscompare => 0xE,
            Self::Reserved0F => 0xF,
        }
    }

    /// The name as written in SPC ("MEDIUM ERROR", …).
    pub const fn name(self) -> &'static str {
        match self {
            Self::NoSense => "NO SENSE",
            Self::RecoveredError => "RECOVERED ERROR",
            Self::NotReady => "NOT READY",
            Self::MediumError => "MEDIUM ERROR",
            Self::HardwareError => "HARDWARE ERROR",
            Self::IllegalRequest => "ILLEGAL REQUEST",
            Self::UnitAttention => "UNIT ATTENTION",
            Self::DataProtect => "DATA PROTECT",
            Self::BlankCheck => "BLANK CHECK",
            Self::VendorSpecific => "VENDOR SPECIFIC",
            Self::CopyAborted => "COPY ABORTED",
            Self::AbortedCommand => "ABORTED COMMAND",
            Self::Reserved0C => "RESERVED (0xC)",
            Self::VolumeOverflow => "VOLUME OVERFLOW",
            Self::Miscompare => "MISCOMPARE",
            Self::Reserved0F => "RESERVED (0xF)",
        }
    }
}

impl fmt::Display for SenseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which of the two sense data formats the device used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SenseFormat {
    /// Fixed format, response codes 0x70 (current) / 0x71 (deferred).
    Fixed,
    /// Descriptor format, response codes 0x72 (current) / 0x73 (deferred).
    Descriptor,
}

/// Why a sense buffer could not be decoded at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
pub enum SenseError {
    /// The device returned no sense bytes.
    #[error("no sense data")]
    Empty,
    /// Too few bytes to reach the sense key.
    #[error("sense data too short: {len} bytes, {needed} needed for the sense key")]
    TooShort {
        /// Bytes available.
        len: usize,
        /// Bytes needed to reach the sense key.
        needed: usize,
    },
    /// Response code other than 0x70..=0x73 (e.g. 0x7F vendor specific).
    #[error("unsupported sense response code 0x{0:02x}")]
    UnsupportedResponseCode(u8),
}

/// Decoded sense data.
///
/// Fields that the device did not report (or that fall outside the valid part
/// of the buffer) are `None`/`false`; `asc`/`ascq` read as 0 when missing, and
/// `truncated` says so.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sense {
    /// Fixed or descriptor format.
    pub format: SenseFormat,
    /// The response code byte with the VALID bit masked off (0x70..=0x73).
    pub response_code: u8,
    /// `true` for current errors, `false` for deferred errors. A deferred error
    /// belongs to an earlier command that already completed (for example a
    /// write acknowledged from cache); the command that received it was not
    /// processed.
    pub current: bool,
    /// The sense key.
    pub key: SenseKey,
    /// Additional sense code (0 when absent).
    pub asc: u8,
    /// Additional sense code qualifier (0 when absent).
    pub ascq: u8,
    /// INFORMATION field: fixed format only when the VALID bit is set (4 bytes);
    /// descriptor format from the information descriptor (type 0x00) with VALID set.
    /// For read/write errors it is usually the first failing LBA.
    pub information: Option<u64>,
    /// COMMAND-SPECIFIC INFORMATION: fixed format when non-zero; descriptor
    /// format from descriptor type 0x01.
    pub command_specific: Option<u64>,
    /// The three SENSE KEY SPECIFIC bytes when the SKSV bit is set; the first
    /// byte still contains the SKSV bit (0x80). See [`Sense::field_pointer`]
    /// and [`Sense::progress`].
    pub sense_key_specific: Option<[u8; 3]>,
    /// FIELD REPLACEABLE UNIT CODE when non-zero.
    pub fru_code: Option<u8>,
    /// FILEMARK bit (fixed byte 2, or stream commands descriptor).
    pub filemark: bool,
    /// EOM bit (fixed byte 2, or stream commands descriptor).
    pub eom: bool,
    /// ILI bit (fixed byte 2, or block/stream commands descriptor).
    pub ili: bool,
    /// SDAT_OVFL: the device had more sense data than fitted.
    pub sdat_ovfl: bool,
    /// The sense data (bounded by the buffer and by the ADDITIONAL SENSE
    /// LENGTH) ended before the end of the format's fixed fields (18 bytes
    /// for fixed format, 8 for descriptor format) or inside a descriptor.
    pub truncated: bool,
}

/// Decoded SENSE KEY SPECIFIC field pointer (ILLEGAL REQUEST, SPC-4 §4.5.2.4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FieldPointer {
    /// `true`: the bad field is in the CDB; `false`: in the parameter data.
    pub in_cdb: bool,
    /// Byte offset of the bad field.
    pub byte: u16,
    /// Bit offset (0..=7) of the bad field, when the device reported it.
    pub bit: Option<u8>,
}

const SKSV: u8 = 0x80;

impl Sense {
    /// Decodes sense data returned by the device.
    ///
    /// The buffer may be shorter or longer than the sense data it carries:
    /// the ADDITIONAL SENSE LENGTH is honoured but never trusted beyond the
    /// buffer. A buffer that reaches the sense key is decoded as far as it
    /// goes; one that does not is a [`SenseError`].
    pub fn parse(buf: &[u8]) -> Result<Sense, SenseError> {
        let first = byte(buf, 0).ok_or(SenseError::Empty)?;
        let response_code = first & 0x7F;
        match response_code {
            0x70 | 0x71 => Ok(Self::parse_fixed(buf, first)?),
            0x72 | 0x73 => Ok(Self::parse_descriptor(buf)?),
            other => Err(SenseError::UnsupportedResponseCode(other)),
        }
    }

    /// Valid part of the sense data: 8 header bytes plus ADDITIONAL SENSE
    /// LENGTH, clipped to the buffer.
    fn valid_part(buf: &[u8]) -> &[u8] {
        match byte(buf, 7) {
            Some(additional) => prefix(buf, 8usize.saturating_add(usize::from(additional))),
            None => buf,
        }
    }

    fn parse_fixed(buf: &[u8], first: u8) -> Result<Sense, SenseError> {
        const NEEDED: usize = 3;
        let b2 = byte(buf, 2).ok_or(SenseError::TooShort {
            len: buf.len(),
            needed: NEEDED,
        })?;
        let d = Self::valid_part(buf);
        let response_code = first & 0x7F;
        let information = if first & 0x80 != 0 {
            be32(d, 3).map(u64::from)
        } else {
            None
        };
        let asc = byte(d, 12);
        let ascq = byte(d, 13);
        let sense_key_specific = match (byte(d, 15), byte(d, 16), byte(d, 17)) {
            (Some(a), Some(b), Some(c)) if a & SKSV != 0 => Some([a, b, c]),
            _ => None,
        };
        Ok(Sense {
            format: SenseFormat::Fixed,
            response_code,
            current: response_code == 0x70,
            key: SenseKey::from_nibble(b2),
            asc: asc.unwrap_or(0),
            ascq: ascq.unwrap_or(0),
            information,
            command_specific: be32(d, 8).filter(|&v| v != 0).map(u64::from),
            sense_key_specific,
            fru_code: byte(d, 14).filter(|&v| v != 0),
            filemark: b2 & 0x80 != 0,
            eom: b2 & 0x40 != 0,
            ili: b2 & 0x20 != 0,
            sdat_ovfl: b2 & 0x10 != 0,
            truncated: d.len() < 18,
        })
    }

    fn parse_descriptor(buf: &[u8]) -> Result<Sense, SenseError> {
        const NEEDED: usize = 2;
        let b1 = byte(buf, 1).ok_or(SenseError::TooShort {
            len: buf.len(),
            needed: NEEDED,
        })?;
        let d = Self::valid_part(buf);
        let response_code = byte(d, 0).unwrap_or(0) & 0x7F;
        let mut sense = Sense {
            format: SenseFormat::Descriptor,
            response_code,
            current: response_code == 0x72,
            key: SenseKey::from_nibble(b1),
            asc: byte(d, 2).unwrap_or(0),
            ascq: byte(d, 3).unwrap_or(0),
            information: None,
            command_specific: None,
            sense_key_specific: None,
            fru_code: None,
            filemark: false,
            eom: false,
            ili: false,
            sdat_ovfl: byte(d, 4).is_some_and(|b| b & 0x80 != 0),
            truncated: d.len() < 8,
        };
        let descriptors = d.get(8..).unwrap_or(&[]);
        let mut rest = descriptors;
        while !rest.is_empty() {
            let (Some(kind), Some(additional)) = (byte(rest, 0), byte(rest, 1)) else {
                sense.truncated = true;
                break;
            };
            let total = 2usize.saturating_add(usize::from(additional));
            let (Some(desc), Some(next)) = (rest.get(..total), rest.get(total..)) else {
                sense.truncated = true;
                break;
            };
            sense.apply_descriptor(kind, desc);
            rest = next;
        }
        Ok(sense)
    }

    /// Applies one complete sense data descriptor (`desc` includes its 2-byte header).
    fn apply_descriptor(&mut self, kind: u8, desc: &[u8]) {
        match kind {
            // Information (SPC-4 §4.5.2.2): VALID in byte 2, value in bytes 4..12.
            0x00 if self.information.is_none() && byte(desc, 2).is_some_and(|b| b & 0x80 != 0) => {
                self.information = be64(desc, 4);
            }
            // Command-specific information (§4.5.2.3).
            0x01 if self.command_specific.is_none() => {
                self.command_specific = be64(desc, 4);
            }
            // Sense key specific (§4.5.2.4): SKSV + 3 bytes at 4..7.
            0x02 if self.sense_key_specific.is_none() => {
                self.sense_key_specific = match (byte(desc, 4), byte(desc, 5), byte(desc, 6)) {
                    (Some(a), Some(b), Some(c)) if a & SKSV != 0 => Some([a, b, c]),
                    _ => None,
                };
            }
            // Field replaceable unit (§4.5.2.5).
            0x03 => {
                if let Some(code) = byte(desc, 3).filter(|&c| c != 0) {
                    self.fru_code = Some(code);
                }
            }
            // Stream commands (SSC): FILEMARK, EOM, ILI in byte 3.
            0x04 => {
                if let Some(b) = byte(desc, 3) {
                    self.filemark |= b & 0x80 != 0;
                    self.eom |= b & 0x40 != 0;
                    self.ili |= b & 0x20 != 0;
                }
            }
            // Block commands (SBC): ILI in byte 3.
            0x05 => {
                if let Some(b) = byte(desc, 3) {
                    self.ili |= b & 0x20 != 0;
                }
            }
            _ => {}
        }
    }

    /// `true` if this is a deferred error (response code 0x71/0x73).
    pub const fn is_deferred(&self) -> bool {
        !self.current
    }

    /// `true` if the additional sense code and qualifier are exactly `asc`/`ascq`.
    pub const fn is(&self, asc: u8, ascq: u8) -> bool {
        self.asc == asc && self.ascq == ascq
    }

    /// For ILLEGAL REQUEST: which CDB or parameter byte the device objected to.
    pub fn field_pointer(&self) -> Option<FieldPointer> {
        if self.key != SenseKey::IllegalRequest {
            return None;
        }
        let [a, b, c] = self.sense_key_specific?;
        Some(FieldPointer {
            in_cdb: a & 0x40 != 0,
            byte: u16::from_be_bytes([b, c]),
            bit: (a & 0x08 != 0).then_some(a & 0x07),
        })
    }

    /// For NOT READY and NO SENSE: progress indication of an operation in
    /// progress (format, sanitize, …), as a fraction of 65536.
    pub fn progress(&self) -> Option<u16> {
        if !matches!(self.key, SenseKey::NotReady | SenseKey::NoSense) {
            return None;
        }
        let sks = self.sense_key_specific?;
        be16(&sks, 1)
    }

    /// Human-readable text for the ASC/ASCQ pair, falling back to
    /// `"ASC 0xNN ASCQ 0xNN"` for codes not in the table.
    pub fn describe(&self) -> String {
        describe_asc_ascq(self.asc, self.ascq)
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.describe())?;
        if !self.current {
            f.write_str(" (deferred error)")?;
        }
        if let Some(info) = self.information {
            write!(f, ", information 0x{info:x}")?;
        }
        Ok(())
    }
}

/// Human-readable text for an ASC/ASCQ pair (SPC-4 Annex D), with a fallback
/// of `"ASC 0xNN ASCQ 0xNN"`.
pub fn describe_asc_ascq(asc: u8, ascq: u8) -> String {
    if let Some(text) = asc_ascq_text(asc, ascq) {
        return text.to_owned();
    }
    let family = match asc {
        0x04 => Some("Logical unit not ready"),
        0x0C => Some("Write error"),
        0x11 => Some("Unrecovered read error"),
        0x27 => Some("Write protected"),
        0x29 => Some("Power on, reset, or bus device reset occurred"),
        0x2A => Some("Parameters changed"),
        0x3A => Some("Medium not present"),
        0x3F => Some("Target operating conditions have changed"),
        _ => None,
    };
    match family {
        Some(text) => format!("{text} (ASCQ 0x{ascq:02x})"),
        None => format!("ASC 0x{asc:02x} ASCQ 0x{ascq:02x}"),
    }
}

/// Exact-match table of the ASC/ASCQ pairs a block driver is likely to meet.
pub fn asc_ascq_text(asc: u8, ascq: u8) -> Option<&'static str> {
    let text = match (asc, ascq) {
        (0x00, 0x00) => "No additional sense information",
        (0x00, 0x06) => "I/O process terminated",
        (0x00, 0x16) => "Operation in progress",
        (0x02, 0x00) => "No seek complete",
        (0x03, 0x00) => "Peripheral device write fault",
        (0x04, 0x00) => "Logical unit not ready, cause not reportable",
        (0x04, 0x01) => "Logical unit is in process of becoming ready",
        (0x04, 0x02) => "Logical unit not ready, initializing command required",
        (0x04, 0x03) => "Logical unit not ready, manual intervention required",
        (0x04, 0x04) => "Logical unit not ready, format in progress",
        (0x04, 0x05) => "Logical unit not ready, rebuild in progress",
        (0x04, 0x06) => "Logical unit not ready, recalculation in progress",
        (0x04, 0x07) => "Logical unit not ready, operation in progress",
        (0x04, 0x08) => "Logical unit not ready, long write in progress",
        (0x04, 0x09) => "Logical unit not ready, self-test in progress",
        (0x04, 0x0A) => "Logical unit not accessible, asymmetric access state transition",
        (0x04, 0x0B) => "Logical unit not accessible, target port in standby state",
        (0x04, 0x0C) => "Logical unit not accessible, target port in unavailable state",
        (0x04, 0x11) => "Logical unit not ready, notify (enable spinup) required",
        (0x04, 0x12) => "Logical unit not ready, offline",
        (0x04, 0x14) => "Logical unit not ready, space allocation in progress",
        (0x04, 0x1A) => "Logical unit not ready, start stop unit command in progress",
        (0x04, 0x1B) => "Logical unit not ready, sanitize in progress",
        (0x05, 0x00) => "Logical unit does not respond to selection",
        (0x08, 0x00) => "Logical unit communication failure",
        (0x08, 0x01) => "Logical unit communication time-out",
        (0x08, 0x02) => "Logical unit communication parity error",
        (0x0C, 0x00) => "Write error",
        (0x0C, 0x02) => "Write error, auto reallocation failed",
        (0x0C, 0x03) => "Write error, recommend reassignment",
        (0x10, 0x00) => "ID CRC or ECC error",
        (0x10, 0x01) => "Logical block guard check failed",
        (0x10, 0x02) => "Logical block application tag check failed",
        (0x10, 0x03) => "Logical block reference tag check failed",
        (0x11, 0x00) => "Unrecovered read error",
        (0x11, 0x01) => "Read retries exhausted",
        (0x11, 0x02) => "Error too long to correct",
        (0x11, 0x04) => "Unrecovered read error, auto reallocate failed",
        (0x11, 0x0B) => "Unrecovered read error, recommend reassignment",
        (0x11, 0x0C) => "Unrecovered read error, recommend rewrite the data",
        (0x14, 0x01) => "Record not found",
        (0x15, 0x00) => "Random positioning error",
        (0x17, 0x00) => "Recovered data with no error correction applied",
        (0x18, 0x00) => "Recovered data with error correction applied",
        (0x1A, 0x00) => "Parameter list length error",
        (0x1D, 0x00) => "Miscompare during verify operation",
        (0x20, 0x00) => "Invalid command operation code",
        (0x21, 0x00) => "Logical block address out of range",
        (0x24, 0x00) => "Invalid field in CDB",
        (0x25, 0x00) => "Logical unit not supported",
        (0x26, 0x00) => "Invalid field in parameter list",
        (0x26, 0x01) => "Parameter not supported",
        (0x26, 0x02) => "Parameter value invalid",
        (0x27, 0x00) => "Write protected",
        (0x27, 0x01) => "Hardware write protected",
        (0x27, 0x02) => "Logical unit software write protected",
        (0x27, 0x07) => "Space allocation failed write protect",
        (0x28, 0x00) => "Not ready to ready change, medium may have changed",
        (0x29, 0x00) => "Power on, reset, or bus device reset occurred",
        (0x29, 0x01) => "Power on occurred",
        (0x29, 0x02) => "SCSI bus reset occurred",
        (0x29, 0x03) => "Bus device reset function occurred",
        (0x29, 0x04) => "Device internal reset",
        (0x29, 0x07) => "I_T nexus loss occurred",
        (0x2A, 0x00) => "Parameters changed",
        (0x2A, 0x01) => "Mode parameters changed",
        (0x2A, 0x02) => "Log parameters changed",
        (0x2A, 0x03) => "Reservations preempted",
        (0x2A, 0x04) => "Reservations released",
        (0x2A, 0x05) => "Registrations preempted",
        (0x2A, 0x06) => "Asymmetric access state changed",
        (0x2A, 0x09) => "Capacity data has changed",
        (0x2C, 0x00) => "Command sequence error",
        (0x2F, 0x00) => "Commands cleared by another initiator",
        (0x2F, 0x01) => "Commands cleared by power loss notification",
        (0x2F, 0x02) => "Commands cleared by device server",
        (0x31, 0x00) => "Medium format corrupted",
        (0x31, 0x01) => "Format command failed",
        (0x32, 0x00) => "No defect spare location available",
        (0x38, 0x07) => "Thin provisioning soft threshold reached",
        (0x3A, 0x00) => "Medium not present",
        (0x3A, 0x01) => "Medium not present, tray closed",
        (0x3A, 0x02) => "Medium not present, tray open",
        (0x3E, 0x00) => "Logical unit has not self-configured yet",
        (0x3E, 0x01) => "Logical unit failure",
        (0x3E, 0x02) => "Timeout on logical unit",
        (0x3F, 0x00) => "Target operating conditions have changed",
        (0x3F, 0x01) => "Microcode has been changed",
        (0x3F, 0x02) => "Changed operating definition",
        (0x3F, 0x03) => "Inquiry data has changed",
        (0x3F, 0x05) => "Device identifier changed",
        (0x3F, 0x0E) => "Reported LUNs data has changed",
        (0x44, 0x00) => "Internal target failure",
        (0x47, 0x00) => "SCSI parity error",
        (0x4B, 0x00) => "Data phase error",
        (0x4E, 0x00) => "Overlapped commands attempted",
        (0x53, 0x02) => "Medium removal prevented",
        (0x55, 0x03) => "Insufficient resources",
        (0x5D, 0x00) => "Failure prediction threshold exceeded",
        (0x5E, 0x00) => "Low power condition on",
        _ => return None,
    };
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 18-byte fixed-format sense as QEMU produces it.
    fn fixed(key: u8, asc: u8, ascq: u8) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = 0x70;
        s[2] = key;
        s[7] = 10;
        s[12] = asc;
        s[13] = ascq;
        s
    }

    #[test]
    fn all_sense_keys_round_trip() {
        for v in 0..16u8 {
            assert_eq!(SenseKey::from_nibble(v).code(), v);
        }
        assert_eq!(SenseKey::from_nibble(0xF5), SenseKey::IllegalRequest);
    }

    #[test]
    fn fixed_current() {
        let s = Sense::parse(&fixed(0x05, 0x24, 0x00)).unwrap();
        assert_eq!(s.format, SenseFormat::Fixed);
        assert!(s.current);
        assert_eq!(s.key, SenseKey::IllegalRequest);
        assert_eq!((s.asc, s.ascq), (0x24, 0x00));
        assert_eq!(s.information, None);
        assert_eq!(s.command_specific, None);
        assert_eq!(s.sense_key_specific, None);
        assert!(!s.truncated);
        assert_eq!(s.describe(), "Invalid field in CDB");
        assert_eq!(s.to_string(), "ILLEGAL REQUEST: Invalid field in CDB");
    }

    #[test]
    fn fixed_deferred_with_information() {
        let mut b = fixed(0x03, 0x0C, 0x00);
        b[0] = 0xF1; // VALID + deferred
        b[3..7].copy_from_slice(&0x0012_3456u32.to_be_bytes());
        b[8..12].copy_from_slice(&7u32.to_be_bytes());
        b[14] = 0x42;
        let s = Sense::parse(&b).unwrap();
        assert!(!s.current);
        assert!(s.is_deferred());
        assert_eq!(s.response_code, 0x71);
        assert_eq!(s.key, SenseKey::MediumError);
        assert_eq!(s.information, Some(0x12_3456));
        assert_eq!(s.command_specific, Some(7));
        assert_eq!(s.fru_code, Some(0x42));
        assert_eq!(
            s.to_string(),
            "MEDIUM ERROR: Write error (deferred error), information 0x123456"
        );
    }

    #[test]
    fn fixed_information_ignored_without_valid() {
        let mut b = fixed(0x03, 0x11, 0x00);
        b[3..7].copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(Sense::parse(&b).unwrap().information, None);
    }

    #[test]
    fn fixed_bits_and_field_pointer() {
        let mut b = fixed(0xE5, 0x24, 0x00); // FILEMARK | EOM | ILI + ILLEGAL REQUEST
        b[15] = 0x80 | 0x40 | 0x08 | 0x03; // SKSV, C/D, BPV, bit 3
        b[16] = 0x00;
        b[17] = 0x02;
        let s = Sense::parse(&b).unwrap();
        assert!(s.filemark && s.eom && s.ili);
        assert_eq!(s.sense_key_specific, Some([0xCB, 0x00, 0x02]));
        assert_eq!(
            s.field_pointer(),
            Some(FieldPointer {
                in_cdb: true,
                byte: 2,
                bit: Some(3)
            })
        );
        assert_eq!(s.progress(), None);
    }

    #[test]
    fn not_ready_progress() {
        let mut b = fixed(0x02, 0x04, 0x04);
        b[15] = 0x80;
        b[16] = 0x80;
        b[17] = 0x00;
        let s = Sense::parse(&b).unwrap();
        assert_eq!(s.progress(), Some(0x8000));
        assert_eq!(s.field_pointer(), None);
    }

    #[test]
    fn fixed_additional_length_respected() {
        // Additional length 0: only the 8-byte header is valid, even though the
        // buffer has more bytes.
        let mut b = fixed(0x06, 0x29, 0x00);
        b[7] = 0;
        let s = Sense::parse(&b).unwrap();
        assert_eq!(s.key, SenseKey::UnitAttention);
        assert_eq!((s.asc, s.ascq), (0, 0));
        assert!(s.truncated);
        // Additional length larger than the buffer: decode what is there.
        let mut b = fixed(0x06, 0x29, 0x00);
        b[7] = 0xFF;
        let s = Sense::parse(&b).unwrap();
        assert_eq!((s.asc, s.ascq), (0x29, 0x00));
        assert!(!s.truncated);
    }

    #[test]
    fn fixed_truncated() {
        let b = fixed(0x06, 0x28, 0x00);
        assert_eq!(Sense::parse(&[]), Err(SenseError::Empty));
        assert_eq!(
            Sense::parse(&b[..2]),
            Err(SenseError::TooShort { len: 2, needed: 3 })
        );
        let s = Sense::parse(&b[..3]).unwrap();
        assert_eq!(s.key, SenseKey::UnitAttention);
        assert!(s.truncated);
        let s = Sense::parse(&b[..14]).unwrap();
        assert_eq!((s.asc, s.ascq), (0x28, 0x00));
        assert!(s.truncated);
        let s = Sense::parse(&b[..13]).unwrap();
        assert_eq!((s.asc, s.ascq), (0x28, 0x00));
        for len in 0..=b.len() {
            let _ = Sense::parse(&b[..len]);
        }
    }

    #[test]
    fn descriptor_with_information_and_sks() {
        let b = [
            0x72, 0x03, 0x11, 0x00, 0x00, 0x00, 0x00, 28, // header, 28 bytes of descriptors
            0x00, 0x0A, 0x80, 0x00, 0, 0, 0, 1, 0, 0, 0, 2, // information = 0x1_0000_0002
            0x02, 0x06, 0x00, 0x00, 0x80, 0x12, 0x34, 0x00, // sense key specific
            0x05, 0x02, 0x00, 0x20, // block commands: ILI
        ];
        let s = Sense::parse(&b).unwrap();
        assert_eq!(s.format, SenseFormat::Descriptor);
        assert!(s.current);
        assert_eq!(s.key, SenseKey::MediumError);
        assert_eq!((s.asc, s.ascq), (0x11, 0x00));
        assert_eq!(s.information, Some(0x1_0000_0002));
        assert_eq!(s.sense_key_specific, Some([0x80, 0x12, 0x34]));
        assert!(s.ili);
        assert!(!s.truncated);
        assert_eq!(s.describe(), "Unrecovered read error");
    }

    #[test]
    fn descriptor_deferred_and_truncated() {
        let b = [
            0x73, 0x06, 0x2A, 0x09, 0x00, 0x00, 0x00, 12, //
            0x00, 0x0A, 0x80, 0x00, 0, 0, 0, 0, 0, 0, 0, 9,
        ];
        let s = Sense::parse(&b).unwrap();
        assert!(!s.current);
        assert_eq!(s.key, SenseKey::UnitAttention);
        assert_eq!(s.describe(), "Capacity data has changed");
        assert_eq!(s.information, Some(9));
        // Cut inside the information descriptor.
        let s = Sense::parse(&b[..15]).unwrap();
        assert_eq!(s.information, None);
        assert!(s.truncated);
        assert_eq!(
            Sense::parse(&b[..1]),
            Err(SenseError::TooShort { len: 1, needed: 2 })
        );
        let s = Sense::parse(&b[..2]).unwrap();
        assert_eq!(s.key, SenseKey::UnitAttention);
        assert!(s.truncated);
    }

    #[test]
    fn descriptor_information_requires_valid() {
        let b = [
            0x72, 0x03, 0x11, 0x00, 0, 0, 0, 12, //
            0x00, 0x0A, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 9,
        ];
        assert_eq!(Sense::parse(&b).unwrap().information, None);
    }

    #[test]
    fn unsupported_response_codes() {
        assert_eq!(
            Sense::parse(&[0x7F, 0, 0, 0]),
            Err(SenseError::UnsupportedResponseCode(0x7F))
        );
        assert_eq!(
            Sense::parse(&[0x00; 18]),
            Err(SenseError::UnsupportedResponseCode(0x00))
        );
    }

    #[test]
    fn describe_fallbacks() {
        assert_eq!(describe_asc_ascq(0x3A, 0x00), "Medium not present");
        assert_eq!(
            describe_asc_ascq(0x04, 0x77),
            "Logical unit not ready (ASCQ 0x77)"
        );
        assert_eq!(describe_asc_ascq(0x99, 0x01), "ASC 0x99 ASCQ 0x01");
        assert_eq!(
            describe_asc_ascq(0x3F, 0x0E),
            "Reported LUNs data has changed"
        );
    }
}
