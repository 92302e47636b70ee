//! virtio-scsi wire formats (virtio 1.2 §5.6): feature bits, the device configuration, the
//! request header the driver writes and the response the device writes back.
//!
//! Encoding writes into DMA memory through raw pointers owned by the caller; decoding reads a
//! byte copy, so a device that rewrites memory while we decode cannot make us read two values.

use scsi_commands::ScsiStatus;

bitflags::bitflags! {
    /// Feature bits: virtio-scsi's own (0-3) and the transport bits we care about.
    /// (`virtio_drivers`' `Feature` type drops device-specific bits in `begin_init`.)
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Features: u64 {
        /// A request may carry both data-out and data-in buffers.
        const INOUT = 1 << 0;
        /// The device reports hotplug events on the event queue.
        const HOTPLUG = 1 << 1;
        /// The device reports parameter changes on the event queue.
        const CHANGE = 1 << 2;
        /// T10 protection information.
        const T10_PI = 1 << 3;
        /// Indirect descriptors.
        const RING_INDIRECT_DESC = 1 << 28;
        /// used_event / avail_event.
        const RING_EVENT_IDX = 1 << 29;
        /// Virtio 1.0 or later.
        const VERSION_1 = 1 << 32;
    }
}

/// What this driver negotiates when the device offers it. Not negotiated, on purpose:
/// RING_EVENT_IDX (virtio-drivers 0.13's `should_notify` compares `avail_idx >= avail_event +
/// 1` without wrap-around, so it would stop notifying after 65536 commands; the used ring's
/// NO_NOTIFY flag gives batching instead), RING_INDIRECT_DESC (a heap allocation per command,
/// and three direct descriptors suffice), T10_PI and INOUT (no use for them).
pub const WANTED_FEATURES: Features = Features::VERSION_1
    .union(Features::HOTPLUG)
    .union(Features::CHANGE);

/// Task attribute SIMPLE.
pub const TASK_ATTR_SIMPLE: u8 = 0;
/// Size of the response header before the sense bytes.
pub const RESP_HEADER_LEN: usize = 12;
/// Size of the request header before the CDB.
pub const REQ_HEADER_LEN: usize = 19;
/// Largest CDB and sense sizes we accept from the device configuration.
pub const MAX_CDB_SIZE: u32 = 256;
/// See [`MAX_CDB_SIZE`].
pub const MAX_SENSE_SIZE: u32 = 256;

/// The virtio-scsi device configuration (every field as the device reported it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScsiConfig {
    /// Number of request queues.
    pub num_queues: u32,
    /// Largest number of data segments in one command.
    pub seg_max: u32,
    /// Largest transfer of one command, in 512-byte sectors.
    pub max_sectors: u32,
    /// Commands per LUN the device can queue.
    pub cmd_per_lun: u32,
    /// Size of an event buffer.
    pub event_info_size: u32,
    /// Size of the sense area in a response.
    pub sense_size: u32,
    /// Size of the CDB area in a request.
    pub cdb_size: u32,
    /// Highest channel (always 0).
    pub max_channel: u16,
    /// Highest target id.
    pub max_target: u16,
    /// Highest LUN.
    pub max_lun: u32,
}

/// Byte offsets of the configuration fields.
pub mod cfg {
    /// `num_queues`.
    pub const NUM_QUEUES: usize = 0;
    /// `seg_max`.
    pub const SEG_MAX: usize = 4;
    /// `max_sectors`.
    pub const MAX_SECTORS: usize = 8;
    /// `cmd_per_lun`.
    pub const CMD_PER_LUN: usize = 12;
    /// `event_info_size`.
    pub const EVENT_INFO_SIZE: usize = 16;
    /// `sense_size` (driver-writable).
    pub const SENSE_SIZE: usize = 20;
    /// `cdb_size` (driver-writable).
    pub const CDB_SIZE: usize = 24;
    /// `max_channel`.
    pub const MAX_CHANNEL: usize = 28;
    /// `max_target`.
    pub const MAX_TARGET: usize = 30;
    /// `max_lun`.
    pub const MAX_LUN: usize = 32;
}

/// virtio-scsi response codes (`response` byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Response {
    /// The command completed; look at `status`.
    Ok,
    /// The data buffer was too small for what the device had.
    Overrun,
    /// The command was aborted by a task management function.
    Aborted,
    /// No such target.
    BadTarget,
    /// The command was aborted by a reset.
    Reset,
    /// The device is busy: retry.
    Busy,
    /// Transport failure.
    TransportFailure,
    /// Target failure: do not retry on another path.
    TargetFailure,
    /// Nexus failure.
    NexusFailure,
    /// Any other failure.
    Failure,
    /// A value the spec does not define.
    Unknown(u8),
}

impl Response {
    /// Decodes the response byte.
    pub fn from_byte(b: u8) -> Self {
        match b {
            0 => Response::Ok,
            1 => Response::Overrun,
            2 => Response::Aborted,
            3 => Response::BadTarget,
            4 => Response::Reset,
            5 => Response::Busy,
            6 => Response::TransportFailure,
            7 => Response::TargetFailure,
            8 => Response::NexusFailure,
            9 => Response::Failure,
            other => Response::Unknown(other),
        }
    }
}

/// A decoded command response (borrowing its sense bytes from the decoded buffer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmdResponse<'a> {
    /// Residual: data bytes not transferred.
    pub resid: u32,
    /// SCSI status.
    pub status: ScsiStatus,
    /// virtio response code.
    pub response: Response,
    /// Sense bytes (already cut to the valid length).
    pub sense: &'a [u8],
}

/// Why a response could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// The device wrote fewer bytes than the response header.
    #[error("device wrote {0} response bytes, less than the {RESP_HEADER_LEN}-byte header")]
    Short(usize),
}

impl<'a> CmdResponse<'a> {
    /// Decodes `bytes` (a copy of the response area; `written` is how much of it the device
    /// says it wrote).
    pub fn decode(bytes: &'a [u8], written: usize) -> Result<Self, ResponseError> {
        let written = written.min(bytes.len());
        if written < RESP_HEADER_LEN {
            return Err(ResponseError::Short(written));
        }
        let le32 = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let sense_len = le32(0) as usize;
        let resid = le32(4);
        let status = ScsiStatus::from(bytes[10]);
        let response = Response::from_byte(bytes[11]);
        let sense_end = RESP_HEADER_LEN + sense_len.min(written - RESP_HEADER_LEN);
        Ok(CmdResponse {
            resid,
            status,
            response,
            sense: &bytes[RESP_HEADER_LEN..sense_end],
        })
    }
}

/// Encodes a request header (LUN, tag, SIMPLE task attribute, CDB padded with zeros to
/// `cdb_size`) into `out`, which must be `REQ_HEADER_LEN + cdb_size` bytes.
pub fn encode_request(out: &mut [u8], lun: &[u8; 8], tag: u64, cdb: &[u8]) {
    out.fill(0);
    out[0..8].copy_from_slice(lun);
    out[8..16].copy_from_slice(&tag.to_le_bytes());
    out[16] = TASK_ATTR_SIMPLE;
    // prio (17) and crn (18) stay 0.
    let n = cdb.len().min(out.len() - REQ_HEADER_LEN);
    out[REQ_HEADER_LEN..REQ_HEADER_LEN + n].copy_from_slice(&cdb[..n]);
}

/// The virtio-scsi LUN field for (target, lun): byte 0 is 1, byte 1 the target, bytes 2-3 the
/// LUN in the flat addressing method (0x4000 | lun), as QEMU decodes it (`& 0x3fff`).
pub fn lun_field(target: u8, lun: u16) -> [u8; 8] {
    let v = 0x4000 | (lun & 0x3fff);
    [1, target, (v >> 8) as u8, v as u8, 0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_layout() {
        let mut out = [0xffu8; REQ_HEADER_LEN + 32];
        encode_request(
            &mut out,
            &lun_field(3, 1),
            0x0102_0304_0506_0708,
            &[0x28, 0, 1],
        );
        assert_eq!(&out[..8], &[1, 3, 0x40, 1, 0, 0, 0, 0]);
        assert_eq!(&out[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&out[16..19], &[0, 0, 0]);
        assert_eq!(&out[19..22], &[0x28, 0, 1]);
        assert!(out[22..].iter().all(|&b| b == 0));
    }

    #[test]
    fn response_decoding_is_strict() {
        let mut r = [0u8; RESP_HEADER_LEN + 96];
        r[0] = 200; // sense_len larger than what was written
        r[4] = 16; // resid
        r[10] = 2; // CHECK CONDITION
        r[11] = 0;
        assert_eq!(CmdResponse::decode(&r, 11), Err(ResponseError::Short(11)));
        let d = CmdResponse::decode(&r, RESP_HEADER_LEN + 18).expect("decodes");
        assert_eq!(d.resid, 16);
        assert_eq!(d.sense.len(), 18);
        assert_eq!(d.response, Response::Ok);
        // written larger than the buffer is clamped, never out of bounds
        let d = CmdResponse::decode(&r, 10_000).expect("decodes");
        assert_eq!(d.sense.len(), 96);
    }
}
