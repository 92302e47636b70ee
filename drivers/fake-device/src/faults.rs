//! The misbehaviour plan: everything a hostile (or merely broken) device may do, as data.
//!
//! A [`FaultPlan`] is plain data so tests (and proptest strategies) can build it, print it and
//! shrink it. The fake consults it at each point where a real device chooses a value: PCI
//! config space, the common and device configuration, feature negotiation, and every command it
//! completes. An empty plan (`FaultPlan::default()`) is a well-behaved device.

use std::collections::BTreeMap;

/// Which virtio PCI capability a fault is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CapKind {
    /// `VIRTIO_PCI_CAP_COMMON_CFG`.
    Common,
    /// `VIRTIO_PCI_CAP_NOTIFY_CFG`.
    Notify,
    /// `VIRTIO_PCI_CAP_ISR_CFG`.
    Isr,
    /// `VIRTIO_PCI_CAP_DEVICE_CFG`.
    Device,
}

/// Replacement values for one capability's fields (`None` keeps the true value).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CapOverride {
    /// The BAR index the capability names.
    pub bar: Option<u8>,
    /// Offset of the structure inside the BAR.
    pub offset: Option<u32>,
    /// Length of the structure.
    pub length: Option<u32>,
}

/// Lies in PCI configuration space.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PciFaults {
    /// What BAR4 (the virtio BAR) reads back after all ones were written to it (both halves),
    /// flag bits included. `None` = a 16 KiB 64-bit memory BAR.
    pub bar4_sizing: Option<u64>,
    /// Type bits of BAR4's low dword (bits 0..4); `None` = 0b0100 (64-bit memory).
    pub bar4_flags: Option<u32>,
    /// Per-capability field overrides.
    pub caps: BTreeMap<CapKind, CapOverride>,
    /// Capabilities left out of the list.
    pub missing: Vec<CapKind>,
    /// The last capability points back at the first (an endless list).
    pub cyclic_list: bool,
    /// `notify_off_multiplier` of the notify capability; `None` = 4.
    pub notify_multiplier: Option<u32>,
}

/// Lies in the common configuration structure and feature negotiation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportFaults {
    /// What `num_queues` (the number of virtqueues) reads as.
    pub num_queues: Option<u16>,
    /// What `queue_size` reads as before the driver writes it (the maximum).
    pub queue_max_size: Option<u16>,
    /// What `queue_notify_off` reads as, for every queue.
    pub queue_notify_off: Option<u16>,
    /// What `queue_enable` reads as, for every queue.
    pub queue_enable_reads: Option<u16>,
    /// Device feature bits offered instead of VERSION_1 (bit 32).
    pub features: Option<u64>,
    /// FEATURES_OK never sticks.
    pub refuse_features: bool,
    /// `config_generation` changes on every read.
    pub generation_churn: bool,
    /// After this many commands the device sets DEVICE_NEEDS_RESET and stops processing.
    pub needs_reset_after: Option<u64>,
    /// DEVICE_NEEDS_RESET is set as soon as the driver sets DRIVER_OK.
    pub needs_reset_at_driver_ok: bool,
    /// Reading the ISR register does not deassert the interrupt line (a stuck line).
    pub isr_stuck: bool,
}

/// Replacement values for the virtio-scsi device configuration (`None` keeps the true value).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigFaults {
    /// `num_queues` (request queues).
    pub num_queues: Option<u32>,
    /// `seg_max`.
    pub seg_max: Option<u32>,
    /// `max_sectors`.
    pub max_sectors: Option<u32>,
    /// `cmd_per_lun`.
    pub cmd_per_lun: Option<u32>,
    /// `event_info_size`.
    pub event_info_size: Option<u32>,
    /// `sense_size` as read (and kept after the driver writes it, if `ignore_writes`).
    pub sense_size: Option<u32>,
    /// `cdb_size` as read (and kept after the driver writes it, if `ignore_writes`).
    pub cdb_size: Option<u32>,
    /// `max_channel`.
    pub max_channel: Option<u16>,
    /// `max_target`.
    pub max_target: Option<u16>,
    /// `max_lun`.
    pub max_lun: Option<u32>,
    /// Driver writes of `sense_size` / `cdb_size` are ignored.
    pub ignore_writes: bool,
    /// A device reset restores `sense_size` / `cdb_size` to the values above rather than to
    /// the spec's defaults (96 / 32).
    pub sizes_survive_reset: bool,
}

/// What the device does wrong with one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandFault {
    /// Takes the chain and does not return it until a task management function (ABORT TASK,
    /// LOGICAL UNIT RESET, I_T NEXUS RESET) or a device reset ends it.
    NeverComplete,
    /// Executes honestly but returns the chain only after `ms` milliseconds of device time
    /// (released by later notifications or by the driver waiting for the interrupt).
    Delay {
        /// Milliseconds.
        ms: u32,
    },
    /// Returns the chain twice.
    CompleteTwice,
    /// Returns this id in the used element instead of the chain's head.
    UsedId(u32),
    /// Returns an in-range id that is not a chain the device holds.
    UsedIdNeverIssued,
    /// Returns the chain's head plus `n << 16` as the id (a 32-bit id whose low 16 bits name
    /// the right chain).
    UsedIdHigh(u16),
    /// Advances `used.idx` by this many extra entries (whatever stale elements are there).
    UsedIdxJump(u16),
    /// Reports this used length.
    UsedLen(u32),
    /// Writes only this many response bytes (less than the 12-byte header) and reports that as
    /// the used length.
    ShortResponse(u8),
    /// Reports this `sense_len`.
    SenseLen(u32),
    /// Reports this residual.
    Resid(u32),
    /// Reports this SCSI status byte.
    Status(u8),
    /// Reports this virtio response byte.
    Response(u8),
    /// Replaces the data-in payload with random bytes and reports success.
    RandomPayload,
    /// Fills the whole response area with random bytes.
    RandomResponse,
    /// Reports GOOD with no residual but transfers nothing.
    NoData,
    /// Reports BUSY (honest: the command was not executed).
    Busy,
    /// Reports CHECK CONDITION with this sense key / ASC / ASCQ (not executed).
    CheckCondition {
        /// Sense key.
        key: u8,
        /// Additional sense code.
        asc: u8,
        /// Additional sense code qualifier.
        ascq: u8,
    },
    /// The machine dies while processing this command.
    Die,
}

impl CommandFault {
    /// Whether this fault can make a driver see success for data it did not get (a lie no
    /// driver can detect). Tests switch their data checks off once one of these happened.
    pub fn can_lie(&self) -> bool {
        match self {
            CommandFault::NeverComplete
            | CommandFault::Delay { .. }
            | CommandFault::UsedLen(_)
            | CommandFault::ShortResponse(_)
            | CommandFault::SenseLen(_)
            | CommandFault::Busy
            | CommandFault::CheckCondition { .. }
            | CommandFault::Die => false,
            // Decided per command in the device (an out-of-range id, a residual that does not
            // hide bytes, a status on a command that succeeded anyway are not lies).
            CommandFault::UsedId(_)
            | CommandFault::Resid(_)
            | CommandFault::Status(_)
            | CommandFault::Response(_) => false,
            // An id above the queue size is out of range: a careful driver refuses it.
            CommandFault::UsedIdHigh(_) => false,
            CommandFault::CompleteTwice
            | CommandFault::UsedIdNeverIssued
            | CommandFault::UsedIdxJump(_)
            | CommandFault::RandomPayload
            | CommandFault::RandomResponse
            | CommandFault::NoData => true,
        }
    }
}

/// Which commands get which fault.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandFaults {
    /// By sequence number: the n-th request-queue command the device takes (from 0, counted
    /// from construction or the last `FakeMachine::set_plan`).
    pub by_index: BTreeMap<u64, CommandFault>,
    /// By SCSI opcode (CDB byte 0), every time; checked after `by_index`.
    pub by_opcode: Vec<(u8, CommandFault)>,
    /// From this sequence number on, every command.
    pub from: Option<(u64, CommandFault)>,
}

/// How the device treats task management functions (control queue).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TmfFaults {
    /// Control-queue requests are taken and never answered.
    pub ignore: bool,
    /// This response byte is reported instead of the true one.
    pub response: Option<u8>,
    /// The TMF is answered but the commands it names stay held (neither aborted nor reset).
    pub keep_commands: bool,
}

/// The whole misbehaviour plan. `Default` is an honest device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// PCI configuration space.
    pub pci: PciFaults,
    /// Common configuration and negotiation.
    pub transport: TransportFaults,
    /// Device configuration.
    pub config: ConfigFaults,
    /// Per-command faults.
    pub commands: CommandFaults,
    /// Task management.
    pub tmf: TmfFaults,
    /// The machine dies after this many platform accesses (PCI, MMIO, port, IRQ waits).
    pub die_after_accesses: Option<u64>,
    /// `Platform::health` takes this many milliseconds (a slow transport; widens races).
    pub slow_health_ms: u32,
    /// Seed for random payloads.
    pub seed: u64,
}

impl FaultPlan {
    /// The fault for command number `seq` with opcode `op`, if any.
    pub fn command_fault(&self, seq: u64, op: u8) -> Option<CommandFault> {
        if let Some(f) = self.commands.by_index.get(&seq) {
            return Some(f.clone());
        }
        if let Some((_, f)) = self.commands.by_opcode.iter().find(|(o, _)| *o == op) {
            return Some(f.clone());
        }
        match &self.commands.from {
            Some((start, f)) if seq >= *start => Some(f.clone()),
            _ => None,
        }
    }
}
