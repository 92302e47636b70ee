//! Error types: CDB building errors, response parsing errors, LUN encoding
//! errors, and the typed command error [`ScsiError`] with the classification
//! helpers the driver's retry and errno logic relies on.

use thiserror::Error;

use crate::sense::{Sense, SenseKey};
use crate::status::ScsiStatus;

/// A CDB could not be built from the given arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
pub enum CdbError {
    /// A transfer of zero blocks was requested where that is not allowed
    /// (READ/WRITE via the size-picking helpers; WRITE SAME, where 0 would mean
    /// "to the end of the medium").
    #[error("block count is zero")]
    ZeroBlocks,
    /// The block count does not fit the largest CDB of this command.
    #[error("block count {0} does not fit the command")]
    TooManyBlocks(u64),
    /// `lba + blocks` goes past the largest addressable LBA.
    #[error("LBA range {lba:#x} + {blocks} blocks overflows the LBA space")]
    LbaRangeOverflow {
        /// First LBA.
        lba: u64,
        /// Block count.
        blocks: u64,
    },
    /// Page code out of range (MODE SENSE page codes are 6 bits).
    #[error("invalid page code {0:#04x}")]
    InvalidPageCode(u8),
    /// Allocation length below the minimum the command requires.
    #[error("allocation length {got} is below the minimum {min}")]
    AllocationLengthTooSmall {
        /// Requested allocation length.
        got: u32,
        /// Minimum the standard requires.
        min: u32,
    },
    /// A parameter list (UNMAP) with no entries, or too many to encode.
    #[error("parameter list has {0} entries, outside the encodable range")]
    BadListLength(usize),
    /// Raw CDB bytes of a length that is not 1..=16.
    #[error("CDB length {0} is not in 1..=16")]
    BadCdbLength(usize),
}

/// A device response could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
pub enum ParseError {
    /// Fewer bytes than the minimum needed for the response's header.
    #[error("response truncated: {got} bytes, {needed} needed")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// A VPD page with a different page code than requested.
    #[error("VPD page code mismatch: asked for {expected:#04x}, got {got:#04x}")]
    PageCodeMismatch {
        /// Requested page.
        expected: u8,
        /// Page code in the response.
        got: u8,
    },
    /// READ CAPACITY(10) returned 0xFFFFFFFF: issue READ CAPACITY(16).
    #[error("capacity exceeds READ CAPACITY(10); READ CAPACITY(16) needed")]
    NeedsReadCapacity16,
    /// The last LBA is u64::MAX, so the block count does not fit in u64.
    #[error("last LBA {0:#x} gives a block count that does not fit in 64 bits")]
    LastLbaOverflow(u64),
    /// Block length 0, not a power of two, below 512 or above 64 KiB.
    #[error("unsupported logical block length {0}")]
    InvalidBlockLength(u32),
    /// Capacity in bytes does not fit in u64.
    #[error("capacity of {blocks} blocks of {block_size} bytes overflows 64 bits")]
    CapacityOverflow {
        /// Number of blocks.
        blocks: u64,
        /// Block size.
        block_size: u32,
    },
}

/// A LUN cannot be expressed in virtio-scsi's single-level 14-bit LUN field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
pub enum LunError {
    /// The LUN uses more than the first addressing level.
    #[error("multi-level LUN is not addressable through virtio-scsi")]
    MultiLevel,
    /// Address method other than peripheral (bus 0) or flat space.
    #[error("LUN address method is not addressable through virtio-scsi")]
    UnsupportedAddressMethod,
    /// LUN number above 16383.
    #[error("LUN {0} exceeds the 14-bit virtio-scsi LUN space")]
    TooLarge(u16),
}

/// How a failed command should be reported to a client; the driver maps each
/// class to an errno value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrnoClass {
    /// Generic I/O error (EIO): medium/hardware errors, aborted commands,
    /// unit attentions that outlived the retries, deferred errors, anything
    /// unexpected.
    Io,
    /// The medium or logical unit is write protected (EROFS).
    ReadOnly,
    /// The logical unit does not exist or has no medium (ENODEV / ENXIO).
    NoDevice,
    /// The request was invalid for this device (EINVAL): invalid field in the
    /// CDB or parameter list, LBA out of range.
    Invalid,
    /// The device does not implement the command (EOPNOTSUPP), e.g. UNMAP.
    Unsupported,
    /// Transient: busy, task set full, reservation conflict, becoming ready
    /// (EBUSY / EAGAIN) after the retries ran out.
    Busy,
    /// Thin-provisioned space is exhausted (ENOSPC): DATA PROTECT 27/07.
    NoSpace,
}

/// A SCSI command that did not complete with GOOD or CONDITION MET.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Error)]
pub enum ScsiError {
    /// CHECK CONDITION with decodable sense data.
    #[error("CHECK CONDITION: {0}")]
    CheckCondition(Sense),
    /// CHECK CONDITION without sense data, or with sense data that could not be decoded.
    #[error("CHECK CONDITION without usable sense data")]
    CheckConditionNoSense,
    /// BUSY status.
    #[error("device busy")]
    Busy,
    /// RESERVATION CONFLICT status.
    #[error("reservation conflict")]
    ReservationConflict,
    /// TASK SET FULL status.
    #[error("task set full")]
    TaskSetFull,
    /// TASK ABORTED status.
    #[error("task aborted")]
    TaskAborted,
    /// ACA ACTIVE status.
    #[error("ACA active")]
    AcaActive,
    /// Any other non-success status byte.
    #[error("unexpected SCSI status 0x{0:02x}")]
    UnexpectedStatus(u8),
}

/// NOT READY additional sense codes that describe a state that ends by
/// itself (becoming ready, or an operation in progress).
fn not_ready_transient(asc: u8, ascq: u8) -> bool {
    asc == 0x04 && matches!(ascq, 0x01 | 0x04..=0x0A | 0x14 | 0x1A | 0x1B)
}

impl ScsiError {
    /// Maps a completed command's status byte and sense buffer to a result.
    /// GOOD and CONDITION MET are `Ok(())`; every other status is an error.
    ///
    /// Note that CHECK CONDITION with RECOVERED ERROR is returned as an error
    /// too: the command did complete, see [`ScsiError::is_recovered`].
    pub fn from_status(status: u8, sense: &[u8]) -> Result<(), ScsiError> {
        match ScsiStatus::from_u8(status) {
            ScsiStatus::Good | ScsiStatus::ConditionMet => Ok(()),
            ScsiStatus::CheckCondition => Err(match Sense::parse(sense) {
                Ok(sense) => ScsiError::CheckCondition(sense),
                Err(_) => ScsiError::CheckConditionNoSense,
            }),
            ScsiStatus::Busy => Err(ScsiError::Busy),
            ScsiStatus::ReservationConflict => Err(ScsiError::ReservationConflict),
            ScsiStatus::TaskSetFull => Err(ScsiError::TaskSetFull),
            ScsiStatus::TaskAborted => Err(ScsiError::TaskAborted),
            ScsiStatus::AcaActive => Err(ScsiError::AcaActive),
            ScsiStatus::Other(v) => Err(ScsiError::UnexpectedStatus(v)),
        }
    }

    /// The sense data, for CHECK CONDITION with decodable sense.
    pub fn sense(&self) -> Option<&Sense> {
        match self {
            ScsiError::CheckCondition(s) => Some(s),
            _ => None,
        }
    }

    /// The sense key, if any.
    pub fn sense_key(&self) -> Option<SenseKey> {
        self.sense().map(|s| s.key)
    }

    /// The (ASC, ASCQ) pair, if any.
    pub fn asc_ascq(&self) -> Option<(u8, u8)> {
        self.sense().map(|s| (s.asc, s.ascq))
    }

    fn current_sense(&self) -> Option<&Sense> {
        self.sense().filter(|s| s.current)
    }

    /// UNIT ATTENTION (current). The driver should look at the ASC to react
    /// (e.g. 2A/09 capacity changed, 3F/0E LUNs changed) and then retry.
    pub fn is_unit_attention(&self) -> bool {
        self.current_sense()
            .is_some_and(|s| s.key == SenseKey::UnitAttention)
    }

    /// The command completed after the device recovered an error (RECOVERED
    /// ERROR): the data transfer is valid and the driver may treat it as success.
    pub fn is_recovered(&self) -> bool {
        self.current_sense()
            .is_some_and(|s| s.key == SenseKey::RecoveredError)
    }

    /// A deferred error: it belongs to an earlier command that already
    /// reported success (typically a cached write that later failed), and the
    /// command that received it was not processed. The driver should latch it
    /// (e.g. fail the next flush) rather than drop it.
    pub fn is_deferred(&self) -> bool {
        self.sense().is_some_and(|s| !s.current)
    }

    /// Whether re-issuing the same command may succeed: UNIT ATTENTION, NOT
    /// READY while becoming ready or with an operation in progress (04/01,
    /// 04/04..04/0A, 04/14, 04/1A, 04/1B), ABORTED COMMAND (except protection
    /// information errors 10/xx), BUSY, TASK SET FULL, TASK ABORTED and ACA
    /// ACTIVE. Never for MEDIUM ERROR, HARDWARE ERROR, ILLEGAL REQUEST, DATA
    /// PROTECT, RESERVATION CONFLICT, or deferred errors (those must be
    /// surfaced, see [`ScsiError::is_deferred`]). The caller bounds the number
    /// of retries.
    pub fn is_retryable(&self) -> bool {
        match self {
            ScsiError::Busy
            | ScsiError::TaskSetFull
            | ScsiError::TaskAborted
            | ScsiError::AcaActive => true,
            ScsiError::CheckCondition(s) if s.current => match s.key {
                SenseKey::UnitAttention => true,
                SenseKey::NotReady => not_ready_transient(s.asc, s.ascq),
                SenseKey::AbortedCommand => s.asc != 0x10,
                _ => false,
            },
            _ => false,
        }
    }

    /// DATA PROTECT, or any additional sense code 27/xx (write protected).
    pub fn is_write_protected(&self) -> bool {
        self.sense()
            .is_some_and(|s| s.key == SenseKey::DataProtect || s.asc == 0x27)
    }

    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE (21/00).
    pub fn is_lba_out_of_range(&self) -> bool {
        self.current_sense()
            .is_some_and(|s| s.key == SenseKey::IllegalRequest && s.is(0x21, 0x00))
    }

    /// MEDIUM ERROR sense key.
    pub fn is_medium_error(&self) -> bool {
        self.sense().is_some_and(|s| s.key == SenseKey::MediumError)
    }

    /// NOT READY sense key (any ASC; see [`ScsiError::is_retryable`] for the transient ones).
    pub fn is_not_ready(&self) -> bool {
        self.current_sense()
            .is_some_and(|s| s.key == SenseKey::NotReady)
    }

    /// MEDIUM NOT PRESENT (3A/xx).
    pub fn is_medium_not_present(&self) -> bool {
        self.current_sense().is_some_and(|s| s.asc == 0x3A)
    }

    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (25/00): the addressed LUN
    /// does not exist (used by the LUN scan fallback).
    pub fn is_lun_not_supported(&self) -> bool {
        self.current_sense()
            .is_some_and(|s| s.key == SenseKey::IllegalRequest && s.is(0x25, 0x00))
    }

    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE (20/00): the command is
    /// not implemented (e.g. UNMAP on a device without thin provisioning).
    pub fn is_unsupported_command(&self) -> bool {
        self.current_sense()
            .is_some_and(|s| s.key == SenseKey::IllegalRequest && s.is(0x20, 0x00))
    }

    /// How to report this error to a client.
    ///
    /// LBA out of range (21/00) maps to [`ErrnoClass::Invalid`], not
    /// [`ErrnoClass::NoSpace`]: the scheme checks every request against the
    /// known capacity first, so the device refusing an LBA means the request's
    /// addressing is invalid for the device as it is now (capacity shrank, or
    /// a bug) — nothing ran out of space, and ENOSPC on a read would be
    /// nonsense and would mislead a filesystem into "disk full" handling.
    /// NoSpace is reserved for thin-provisioning exhaustion (27/07).
    pub fn errno_class(&self) -> ErrnoClass {
        let s = match self {
            ScsiError::Busy
            | ScsiError::TaskSetFull
            | ScsiError::ReservationConflict
            | ScsiError::AcaActive => return ErrnoClass::Busy,
            ScsiError::TaskAborted
            | ScsiError::CheckConditionNoSense
            | ScsiError::UnexpectedStatus(_) => return ErrnoClass::Io,
            ScsiError::CheckCondition(s) => s,
        };
        if !s.current {
            return ErrnoClass::Io;
        }
        if s.is(0x27, 0x07) {
            return ErrnoClass::NoSpace;
        }
        if s.key == SenseKey::DataProtect || s.asc == 0x27 {
            return ErrnoClass::ReadOnly;
        }
        match s.key {
            SenseKey::IllegalRequest => match (s.asc, s.ascq) {
                (0x25, 0x00) => ErrnoClass::NoDevice,
                (0x20, 0x00) => ErrnoClass::Unsupported,
                _ => ErrnoClass::Invalid,
            },
            SenseKey::NotReady if s.asc == 0x3A => ErrnoClass::NoDevice,
            SenseKey::NotReady if not_ready_transient(s.asc, s.ascq) => ErrnoClass::Busy,
            _ => ErrnoClass::Io,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sense(code: u8, key: u8, asc: u8, ascq: u8) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = code;
        s[2] = key;
        s[7] = 10;
        s[12] = asc;
        s[13] = ascq;
        s
    }

    fn cc(key: u8, asc: u8, ascq: u8) -> ScsiError {
        ScsiError::from_status(0x02, &sense(0x70, key, asc, ascq)).unwrap_err()
    }

    #[test]
    fn status_mapping() {
        assert_eq!(ScsiError::from_status(0x00, &[]), Ok(()));
        assert_eq!(ScsiError::from_status(0x04, &[]), Ok(()));
        assert_eq!(
            ScsiError::from_status(0x02, &[]),
            Err(ScsiError::CheckConditionNoSense)
        );
        assert_eq!(
            ScsiError::from_status(0x02, &[0x7F, 0, 0]),
            Err(ScsiError::CheckConditionNoSense)
        );
        assert_eq!(ScsiError::from_status(0x08, &[]), Err(ScsiError::Busy));
        assert_eq!(
            ScsiError::from_status(0x18, &[]),
            Err(ScsiError::ReservationConflict)
        );
        assert_eq!(
            ScsiError::from_status(0x28, &[]),
            Err(ScsiError::TaskSetFull)
        );
        assert_eq!(ScsiError::from_status(0x30, &[]), Err(ScsiError::AcaActive));
        assert_eq!(
            ScsiError::from_status(0x40, &[]),
            Err(ScsiError::TaskAborted)
        );
        assert_eq!(
            ScsiError::from_status(0x22, &[]),
            Err(ScsiError::UnexpectedStatus(0x22))
        );
        let e = cc(0x03, 0x11, 0x00);
        assert_eq!(e.sense_key(), Some(SenseKey::MediumError));
        assert_eq!(e.asc_ascq(), Some((0x11, 0x00)));
        assert_eq!(
            e.to_string(),
            "CHECK CONDITION: MEDIUM ERROR: Unrecovered read error"
        );
    }

    #[test]
    fn retry_classification() {
        assert!(cc(0x06, 0x29, 0x00).is_retryable());
        assert!(cc(0x06, 0x29, 0x00).is_unit_attention());
        assert!(cc(0x02, 0x04, 0x01).is_retryable());
        assert!(!cc(0x02, 0x04, 0x02).is_retryable());
        assert!(!cc(0x02, 0x3A, 0x00).is_retryable());
        assert!(cc(0x0B, 0x47, 0x00).is_retryable());
        assert!(!cc(0x0B, 0x10, 0x01).is_retryable());
        assert!(!cc(0x03, 0x11, 0x00).is_retryable());
        assert!(!cc(0x04, 0x44, 0x00).is_retryable());
        assert!(!cc(0x05, 0x24, 0x00).is_retryable());
        assert!(!cc(0x07, 0x27, 0x00).is_retryable());
        assert!(ScsiError::Busy.is_retryable());
        assert!(ScsiError::TaskSetFull.is_retryable());
        assert!(!ScsiError::ReservationConflict.is_retryable());
        assert!(!ScsiError::CheckConditionNoSense.is_retryable());
        // A deferred UNIT ATTENTION is surfaced, not retried.
        let deferred = ScsiError::from_status(0x02, &sense(0x71, 0x03, 0x0C, 0x00)).unwrap_err();
        assert!(deferred.is_deferred());
        assert!(!deferred.is_retryable());
        assert_eq!(deferred.errno_class(), ErrnoClass::Io);
        assert!(cc(0x01, 0x17, 0x00).is_recovered());
    }

    #[test]
    fn predicates() {
        assert!(cc(0x07, 0x27, 0x00).is_write_protected());
        assert!(cc(0x07, 0x00, 0x00).is_write_protected());
        assert!(!cc(0x05, 0x24, 0x00).is_write_protected());
        assert!(cc(0x05, 0x21, 0x00).is_lba_out_of_range());
        assert!(!cc(0x05, 0x24, 0x00).is_lba_out_of_range());
        assert!(cc(0x03, 0x11, 0x00).is_medium_error());
        assert!(cc(0x02, 0x04, 0x01).is_not_ready());
        assert!(cc(0x05, 0x25, 0x00).is_lun_not_supported());
        assert!(!cc(0x05, 0x24, 0x00).is_lun_not_supported());
        assert!(cc(0x05, 0x20, 0x00).is_unsupported_command());
        assert!(cc(0x02, 0x3A, 0x01).is_medium_not_present());
    }

    #[test]
    fn errno_classes() {
        assert_eq!(cc(0x07, 0x27, 0x00).errno_class(), ErrnoClass::ReadOnly);
        assert_eq!(cc(0x07, 0x27, 0x07).errno_class(), ErrnoClass::NoSpace);
        assert_eq!(cc(0x05, 0x25, 0x00).errno_class(), ErrnoClass::NoDevice);
        assert_eq!(cc(0x02, 0x3A, 0x00).errno_class(), ErrnoClass::NoDevice);
        assert_eq!(cc(0x05, 0x21, 0x00).errno_class(), ErrnoClass::Invalid);
        assert_eq!(cc(0x05, 0x24, 0x00).errno_class(), ErrnoClass::Invalid);
        assert_eq!(cc(0x05, 0x20, 0x00).errno_class(), ErrnoClass::Unsupported);
        assert_eq!(cc(0x03, 0x11, 0x00).errno_class(), ErrnoClass::Io);
        assert_eq!(cc(0x04, 0x44, 0x00).errno_class(), ErrnoClass::Io);
        assert_eq!(cc(0x06, 0x29, 0x00).errno_class(), ErrnoClass::Io);
        assert_eq!(cc(0x02, 0x04, 0x01).errno_class(), ErrnoClass::Busy);
        assert_eq!(ScsiError::Busy.errno_class(), ErrnoClass::Busy);
        assert_eq!(
            ScsiError::ReservationConflict.errno_class(),
            ErrnoClass::Busy
        );
        assert_eq!(
            ScsiError::CheckConditionNoSense.errno_class(),
            ErrnoClass::Io
        );
        assert_eq!(
            ScsiError::UnexpectedStatus(0x22).errno_class(),
            ErrnoClass::Io
        );
    }
}
