//! SCSI status byte codes (SAM-5 §5.3) returned with every completed command.

use std::fmt;

/// A SCSI status byte as returned by the device server.
///
/// Obsolete or unassigned codes (INTERMEDIATE 0x10, INTERMEDIATE-CONDITION MET
/// 0x14, COMMAND TERMINATED 0x22, …) are kept as [`ScsiStatus::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScsiStatus {
    /// 0x00: the command completed successfully.
    Good,
    /// 0x02: the command failed; sense data describes why.
    CheckCondition,
    /// 0x04: successful completion of PRE-FETCH (the range fits in cache).
    ConditionMet,
    /// 0x08: the logical unit is busy; try again later.
    Busy,
    /// 0x18: another initiator holds a conflicting reservation.
    ReservationConflict,
    /// 0x28: the task set is full; try again when a command completes.
    TaskSetFull,
    /// 0x30: an auto contingent allegiance condition exists.
    AcaActive,
    /// 0x40: the command was aborted by another I_T nexus or task management.
    TaskAborted,
    /// Any other status byte.
    Other(u8),
}

impl ScsiStatus {
    /// Decodes a status byte.
    pub const fn from_u8(status: u8) -> Self {
        match status {
            0x00 => Self::Good,
            0x02 => Self::CheckCondition,
            0x04 => Self::ConditionMet,
            0x08 => Self::Busy,
            0x18 => Self::ReservationConflict,
            0x28 => Self::TaskSetFull,
            0x30 => Self::AcaActive,
            0x40 => Self::TaskAborted,
            other => Self::Other(other),
        }
    }

    /// The status byte value.
    pub const fn as_u8(self) -> u8 {
        match self {
            Self::Good => 0x00,
            Self::CheckCondition => 0x02,
            Self::ConditionMet => 0x04,
            Self::Busy => 0x08,
            Self::ReservationConflict => 0x18,
            Self::TaskSetFull => 0x28,
            Self::AcaActive => 0x30,
            Self::TaskAborted => 0x40,
            Self::Other(v) => v,
        }
    }

    /// True for GOOD and CONDITION MET, the two successful completions.
    pub const fn is_success(self) -> bool {
        matches!(self, Self::Good | Self::ConditionMet)
    }
}

impl From<u8> for ScsiStatus {
    fn from(status: u8) -> Self {
        Self::from_u8(status)
    }
}

impl From<ScsiStatus> for u8 {
    fn from(status: ScsiStatus) -> Self {
        status.as_u8()
    }
}

impl fmt::Display for ScsiStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Good => f.write_str("GOOD"),
            Self::CheckCondition => f.write_str("CHECK CONDITION"),
            Self::ConditionMet => f.write_str("CONDITION MET"),
            Self::Busy => f.write_str("BUSY"),
            Self::ReservationConflict => f.write_str("RESERVATION CONFLICT"),
            Self::TaskSetFull => f.write_str("TASK SET FULL"),
            Self::AcaActive => f.write_str("ACA ACTIVE"),
            Self::TaskAborted => f.write_str("TASK ABORTED"),
            Self::Other(v) => write!(f, "status 0x{v:02x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_byte() {
        for b in 0..=u8::MAX {
            assert_eq!(ScsiStatus::from_u8(b).as_u8(), b);
        }
        assert_eq!(ScsiStatus::from(0x02), ScsiStatus::CheckCondition);
        assert_eq!(ScsiStatus::from(0x28), ScsiStatus::TaskSetFull);
        assert_eq!(ScsiStatus::from(0x22), ScsiStatus::Other(0x22));
        assert!(ScsiStatus::ConditionMet.is_success());
        assert!(!ScsiStatus::Busy.is_success());
    }
}
