//! The driver's error type and its mapping to Redox errno values.

use platform::PlatformError;
use scsi_commands::ScsiError;
use syscall::error as errno;

use crate::queue::QueueError;
use crate::transport::TransportError;
use crate::wire::{Response, ResponseError};

/// Why a driver operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The platform (the machine) failed.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// Bringing up the PCI transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Device initialisation failed.
    #[error("device initialisation: {0}")]
    Init(String),
    /// The request queue failed the command.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The device's response was malformed.
    #[error(transparent)]
    Response(#[from] ResponseError),
    /// The virtio-scsi layer did not complete the command.
    #[error("virtio-scsi response {0:?}")]
    Virtio(Response),
    /// The command completed with a SCSI error.
    #[error(transparent)]
    Scsi(#[from] ScsiError),
    /// The device moved fewer bytes than asked.
    #[error("short transfer: {transferred} of {expected} bytes")]
    ShortTransfer {
        /// Bytes asked for.
        expected: usize,
        /// Bytes the device reported as moved.
        transferred: usize,
    },
    /// A request the driver refuses before it reaches the device.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The disk does not have the command this operation needs (e.g. no WRITE SAME).
    #[error("not supported by the disk: {0}")]
    Unsupported(String),
    /// The disk is not (or no longer) there.
    #[error("no such disk")]
    NoDisk,
    /// The disk is read-only.
    #[error("disk is read-only")]
    ReadOnly,
    /// The command did not complete in time; recovery (abort, resets) ended it.
    #[error("command timed out and was aborted ({0})")]
    TimedOut(String),
    /// The host was shut down or its machine is gone.
    #[error("host is down: {0}")]
    Down(String),
}

impl DriverError {
    /// The Redox errno a client sees for this error.
    pub fn errno(&self) -> i32 {
        match self {
            DriverError::Scsi(e) => match e.errno_class() {
                scsi_commands::ErrnoClass::ReadOnly => errno::EROFS,
                scsi_commands::ErrnoClass::NoDevice => errno::ENODEV,
                scsi_commands::ErrnoClass::Invalid => errno::EINVAL,
                scsi_commands::ErrnoClass::Busy => errno::EBUSY,
                _ => errno::EIO,
            },
            DriverError::Virtio(Response::BadTarget) | DriverError::NoDisk => errno::ENODEV,
            DriverError::Invalid(_) => errno::EINVAL,
            DriverError::ReadOnly => errno::EROFS,
            DriverError::Unsupported(_) => errno::EOPNOTSUPP,
            _ => errno::EIO,
        }
    }

    /// Whether trying the same command again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            DriverError::Scsi(e) => e.is_retryable(),
            DriverError::Virtio(r) => matches!(r, Response::Busy | Response::Reset),
            // Dropped by a device reset that something else caused (a command that timed out
            // itself is reported as `TimedOut`, never retried).
            DriverError::Queue(QueueError::Reset { .. }) => true,
            _ => false,
        }
    }
}
