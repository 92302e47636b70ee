//! SCSI command encoding and strict response decoding for the virtio-scsi
//! driver: CDB builders ([`cdb`]), status bytes ([`status`]), sense data
//! ([`sense`]), typed command errors ([`error`]), INQUIRY and VPD pages
//! ([`inquiry`]), READ CAPACITY ([`capacity`]), REPORT LUNS and virtio LUN
//! fields ([`luns`]), and MODE SENSE ([`mode`]).
//!
//! The crate is pure: no I/O. Everything it decodes comes from an untrusted
//! device, so every parser takes a `&[u8]` of any length and returns a
//! `Result`; none of them panics or indexes out of bounds.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::arithmetic_side_effects
    )
)]

mod bytes;
pub mod capacity;
pub mod cdb;
pub mod error;
pub mod inquiry;
pub mod luns;
pub mod mode;
pub mod sense;
pub mod status;

pub use capacity::{Capacity, ReadCapacity10, ReadCapacity16};
pub use cdb::{Cdb, DataDirection, UnmapRange, unmap, unmap_parameter_list};
pub use error::{CdbError, ErrnoClass, LunError, ParseError, ScsiError};
pub use inquiry::{
    BlockDeviceCharacteristics, BlockLimits, Designator, DeviceIdentification,
    LogicalBlockProvisioning, StandardInquiry,
};
pub use luns::{Lun, LunAddress, ReportLuns, parse_virtio_lun, virtio_lun};
pub use mode::{CachingPage, ModePage, ModeParameterHeader, ModeSense};
pub use sense::{Sense, SenseError, SenseFormat, SenseKey};
pub use status::ScsiStatus;
