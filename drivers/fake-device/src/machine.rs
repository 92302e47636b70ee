//! The fake machine: a [`Platform`] whose bus holds one modern virtio-scsi function, emulated
//! in process.
//!
//! Everything device-side lives behind one mutex ([`State`]). A notification (a posted MMIO
//! write to the notify area) is processed inline, in the caller's thread: the device takes every
//! available chain, executes it against the SCSI target, writes the response, puts the used
//! element, sets ISR bit 0 and asserts the interrupt line, which wakes `wait_irq`. Reading the
//! ISR register clears it and deasserts the line. Completions the fault plan delays are
//! released by later notifications or while the driver waits for the interrupt, so "device
//! time" passes without a device thread and every run is deterministic for a given plan.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use platform::{
    DmaWindow, IrqWait, MmioWindow, PciAddress, Platform, PlatformError, Result, Width,
};

use crate::dma::DmaMemory;
use crate::faults::{CommandFault, FaultPlan};
use crate::pci::{self, PciFunction};
use crate::scsi::{self, DiskSpec, Outcome, Target};
use crate::virtq::{Chain, DevQueue};

/// Feature bits the honest device offers (what QEMU's virtio-scsi-pci offers, less the
/// transport bits we do not emulate): HOTPLUG, CHANGE, INDIRECT_DESC, EVENT_IDX, VERSION_1.
pub const OFFERED_FEATURES: u64 = (1 << 1) | (1 << 2) | (1 << 28) | (1 << 29) | (1 << 32);
const VERSION_1: u64 = 1 << 32;

/// Device status bits.
pub mod status {
    /// ACKNOWLEDGE.
    pub const ACKNOWLEDGE: u8 = 1;
    /// DRIVER.
    pub const DRIVER: u8 = 2;
    /// DRIVER_OK.
    pub const DRIVER_OK: u8 = 4;
    /// FEATURES_OK.
    pub const FEATURES_OK: u8 = 8;
    /// DEVICE_NEEDS_RESET.
    pub const NEEDS_RESET: u8 = 0x40;
    /// FAILED.
    pub const FAILED: u8 = 0x80;
}

const REQ_HEADER: usize = 19;
const RESP_HEADER: usize = 12;
const DEFAULT_SENSE_SIZE: u32 = 96;
const DEFAULT_CDB_SIZE: u32 = 32;

/// How the device reports the used length of a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsedLen {
    /// As QEMU does: response size plus data buffer size, in both directions.
    Qemu,
    /// As the spec says: bytes written into device-writable buffers.
    Spec,
}

/// What to build.
#[derive(Clone, Debug)]
pub struct FakeSpec {
    /// Logical units.
    pub disks: Vec<DiskSpec>,
    /// Request queues the device has (virtqueues = this + 2).
    pub request_queues: u16,
    /// Largest queue size the device accepts.
    pub queue_max_size: u16,
    /// Bytes of DMA memory.
    pub dma_bytes: usize,
    /// Bus address of the DMA memory.
    pub dma_base: u64,
    /// Where the driver may place BARs.
    pub mmio_window: MmioWindow,
    /// PCI device number of the virtio function on bus 0.
    pub slot: u8,
    /// CPUs reported to the driver.
    pub cpu_count: usize,
    /// Used-length convention.
    pub used_len: UsedLen,
    /// Misbehaviour.
    pub plan: FaultPlan,
}

impl Default for FakeSpec {
    fn default() -> Self {
        FakeSpec {
            disks: vec![DiskSpec::new(0, 512, 4096)],
            request_queues: 2,
            queue_max_size: 256,
            dma_bytes: 16 << 20,
            dma_base: 0x1000_0000,
            mmio_window: MmioWindow {
                base: 0xc000_0000,
                len: 0x1000_0000,
            },
            slot: 1,
            cpu_count: 2,
            used_len: UsedLen::Qemu,
            plan: FaultPlan::default(),
        }
    }
}

/// Counters and findings of one fake machine.
#[derive(Clone, Debug, Default)]
pub struct FakeStats {
    /// Request-queue commands the device took (since the machine was built).
    pub commands: u64,
    /// Used elements put (all queues).
    pub completions: u64,
    /// Commands a fault applied to.
    pub faults_applied: u64,
    /// Faults that may have made the driver see success for data it did not get.
    pub lies: u64,
    /// Things the driver did wrong (bad descriptors, rings outside DMA memory, ...).
    pub driver_faults: Vec<String>,
    /// Ring confusion after the device lied (not held against the driver).
    pub confusion_after_lie: Vec<String>,
    /// MMIO accesses outside every BAR.
    pub stray_mmio: u64,
    /// The first few of them.
    pub stray_log: Vec<String>,
    /// Device resets (status 0 written).
    pub resets: u64,
    /// Interrupts raised (line went from low to high).
    pub interrupts: u64,
    /// Notifications received.
    pub notifies: u64,
    /// Chains taken and never returned (so far).
    pub held: usize,
    /// Current device status.
    pub status: u8,
    /// Task management functions answered.
    pub tmfs: u64,
    /// Commands ended by a TMF (aborted or reset).
    pub aborted: u64,
    /// Events delivered on the event queue.
    pub events: u64,
    /// The machine is dead.
    pub dead: bool,
    /// `wait_irq` calls (how often the driver's completion thread woke).
    pub irq_waits: u64,
}

/// A command the device holds without answering (a `NeverComplete` fault), until a TMF or a
/// device reset ends it.
struct HeldCmd {
    queue: usize,
    chain: Chain,
    lun: [u8; 8],
    tag: u64,
    resp_len: usize,
    buffer: usize,
}

struct Deferred {
    queue: usize,
    id: u32,
    len: u32,
    due: Instant,
}

/// Small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

struct State {
    plan: FaultPlan,
    pci: PciFunction,
    dev_feature_sel: u32,
    drv_feature_sel: u32,
    driver_features: u64,
    status: u8,
    generation: u8,
    queue_sel: u16,
    queues: Vec<DevQueue>,
    isr: u8,
    line: bool,
    sense_size: u32,
    cdb_size: u32,
    /// The driver wrote `sense_size` or `cdb_size`.
    sizes_written: bool,
    target: Target,
    deferred: Vec<Deferred>,
    held: Vec<HeldCmd>,
    event_bufs: VecDeque<Chain>,
    seq: u64,
    stopped: bool,
    dead: Option<String>,
    rng: Rng,
    stats: FakeStats,
}

/// The fake machine. Build with [`FakeMachine::new`]; hand [`FakeMachine::platform`] to the
/// driver; inspect with [`FakeMachine::stats`] and [`FakeMachine::disk_read`].
pub struct FakeMachine {
    dma: DmaMemory,
    mmio_window: MmioWindow,
    slot: u8,
    cpu_count: usize,
    request_queues: u16,
    queue_max_size: u16,
    used_len: UsedLen,
    state: Mutex<State>,
    irq: Condvar,
    accesses: AtomicU64,
    access_base: AtomicU64,
}

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static THREAD_CPU: usize = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
}

impl FakeMachine {
    /// Builds the machine (devices powered on, BARs unassigned).
    pub fn new(spec: FakeSpec) -> std::result::Result<Arc<FakeMachine>, String> {
        let dma = DmaMemory::new(spec.dma_bytes, spec.dma_base)?;
        let nq = usize::from(spec.request_queues) + 2;
        let max = spec
            .plan
            .transport
            .queue_max_size
            .unwrap_or(spec.queue_max_size);
        let state = State {
            pci: PciFunction::new(spec.plan.pci.clone()),
            sense_size: spec.plan.config.sense_size.unwrap_or(DEFAULT_SENSE_SIZE),
            cdb_size: spec.plan.config.cdb_size.unwrap_or(DEFAULT_CDB_SIZE),
            sizes_written: false,
            rng: Rng(spec.plan.seed),
            plan: spec.plan,
            dev_feature_sel: 0,
            drv_feature_sel: 0,
            driver_features: 0,
            status: 0,
            generation: 0,
            queue_sel: 0,
            queues: vec![DevQueue::new(max); nq],
            isr: 0,
            line: false,
            target: Target::new(&spec.disks),
            deferred: Vec::new(),
            held: Vec::new(),
            event_bufs: VecDeque::new(),
            seq: 0,
            stopped: false,
            dead: None,
            stats: FakeStats::default(),
        };
        Ok(Arc::new(FakeMachine {
            dma,
            mmio_window: spec.mmio_window,
            slot: spec.slot,
            cpu_count: spec.cpu_count.max(1),
            request_queues: spec.request_queues,
            queue_max_size: max,
            used_len: spec.used_len,
            state: Mutex::new(state),
            irq: Condvar::new(),
            accesses: AtomicU64::new(0),
            access_base: AtomicU64::new(0),
        }))
    }

    /// This machine as the driver's platform.
    pub fn platform(self: &Arc<Self>) -> Arc<dyn Platform> {
        self.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the fault plan from now on. Command sequence numbers (`by_index`, `from`) and
    /// the access count of `die_after_accesses` start again from 0. PCI capability faults only
    /// apply at construction.
    pub fn set_plan(&self, plan: FaultPlan) {
        let mut st = self.lock();
        st.rng = Rng(plan.seed);
        st.plan = plan;
        st.seq = 0;
        self.access_base
            .store(self.accesses.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The machine dies: every later access fails with `Gone`.
    pub fn kill(&self, reason: &str) {
        let mut st = self.lock();
        self.die(&mut st, reason);
    }

    fn die(&self, st: &mut State, reason: &str) {
        if st.dead.is_none() {
            st.dead = Some(reason.to_string());
        }
        self.irq.notify_all();
    }

    /// Counters and findings so far.
    pub fn stats(&self) -> FakeStats {
        let st = self.lock();
        let mut s = st.stats.clone();
        s.held = st.queues.iter().skip(2).map(|q| q.held.len()).sum();
        s.status = st.status;
        s.dead = st.dead.is_some();
        s
    }

    /// Bytes of the medium of (target, lun), if the unit exists and the range fits.
    pub fn disk_read(&self, target: u8, lun: u16, offset: u64, len: usize) -> Option<Vec<u8>> {
        let st = self.lock();
        let lu = st
            .target
            .lus
            .iter()
            .find(|l| l.spec.target == target && l.spec.lun == lun)?;
        let at = usize::try_from(offset).ok()?;
        lu.data.get(at..at.checked_add(len)?).map(<[u8]>::to_vec)
    }

    /// Overwrites bytes of the medium (test set-up); false if out of range.
    pub fn disk_write(&self, target: u8, lun: u16, offset: u64, data: &[u8]) -> bool {
        let mut st = self.lock();
        let Some(lu) = st
            .target
            .lus
            .iter_mut()
            .find(|l| l.spec.target == target && l.spec.lun == lun)
        else {
            return false;
        };
        let Ok(at) = usize::try_from(offset) else {
            return false;
        };
        match at
            .checked_add(data.len())
            .and_then(|end| lu.data.get_mut(at..end))
        {
            Some(dst) => {
                dst.copy_from_slice(data);
                true
            }
            None => false,
        }
    }

    /// SYNCHRONIZE CACHE commands (target, lun) received.
    pub fn flushes(&self, target: u8, lun: u16) -> Option<u64> {
        let st = self.lock();
        st.target
            .lus
            .iter()
            .find(|l| l.spec.target == target && l.spec.lun == lun)
            .map(|l| l.flushes)
    }

    /// Delivers an event: `bytes` go into the next event buffer the driver posted, whose used
    /// length is `used_len` (default: the bytes written), and the interrupt is raised. False
    /// if the driver has no event buffer posted (or the queue is not running).
    pub fn inject_event(&self, bytes: &[u8], used_len: Option<u32>) -> bool {
        let mut st = self.lock();
        if st.dead.is_some() || st.stopped || !st.queues.get(1).is_some_and(|q| q.enabled) {
            return false;
        }
        let taken = self.take_chains(&mut st, 1);
        st.event_bufs.extend(taken);
        let Some(c) = st.event_bufs.pop_front() else {
            return false;
        };
        let n = match c.scatter(&self.dma, 0, bytes) {
            Ok(n) => n,
            Err(e) => {
                self.driver_fault(&mut st, format!("event queue: {}", e.0));
                return false;
            }
        };
        self.push(&mut st, 1, u32::from(c.head), used_len.unwrap_or(n as u32));
        st.stats.events += 1;
        self.queue_interrupt(&mut st, 1);
        true
    }

    /// Puts an arbitrary used element on virtqueue `queue` (whatever the driver has posted)
    /// and raises the interrupt. False if the queue is not running.
    pub fn inject_used(&self, queue: u16, id: u32, len: u32) -> bool {
        let mut st = self.lock();
        let q = usize::from(queue);
        if st.dead.is_some() || !st.queues.get(q).is_some_and(|dq| dq.enabled) {
            return false;
        }
        if let Some(l) = st.stats.lies.checked_add(1) {
            st.stats.lies = l;
        }
        self.push(&mut st, q, id, len);
        self.queue_interrupt(&mut st, q);
        true
    }

    fn event_bytes(event: u32, target: u8, lun: u16, reason: u32) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&event.to_le_bytes());
        b[4] = 1;
        b[5] = target;
        b[6..8].copy_from_slice(&(0x4000 | (lun & 0x3fff)).to_be_bytes());
        b[12..16].copy_from_slice(&reason.to_le_bytes());
        b
    }

    /// Hot-plugs a logical unit (zeroed medium) and reports it (TRANSPORT_RESET / RESCAN).
    /// Returns whether the event could be delivered.
    pub fn hotplug(&self, spec: DiskSpec) -> bool {
        let (target, lun) = (spec.target, spec.lun);
        {
            let mut st = self.lock();
            st.target
                .lus
                .retain(|l| (l.spec.target, l.spec.lun) != (target, lun));
            st.target.lus.extend(Target::new(&[spec]).lus);
        }
        self.inject_event(&Self::event_bytes(1, target, lun, 1), None)
    }

    /// Removes a logical unit and reports it (TRANSPORT_RESET / REMOVED).
    pub fn unplug(&self, target: u8, lun: u16) -> bool {
        self.lock()
            .target
            .lus
            .retain(|l| (l.spec.target, l.spec.lun) != (target, lun));
        self.inject_event(&Self::event_bytes(1, target, lun, 2), None)
    }

    /// Changes a unit's capacity (the medium grows with zeros or is cut), sets the CAPACITY
    /// DATA HAS CHANGED unit attention and reports it (PARAM_CHANGE 2A/09).
    pub fn resize(&self, target: u8, lun: u16, blocks: u64) -> bool {
        {
            let mut st = self.lock();
            let Some(lu) = st
                .target
                .lus
                .iter_mut()
                .find(|l| (l.spec.target, l.spec.lun) == (target, lun))
            else {
                return false;
            };
            let bytes = blocks.saturating_mul(u64::from(lu.spec.block_size));
            lu.data.resize(usize::try_from(bytes).unwrap_or(0), 0);
            lu.spec.blocks = blocks;
            lu.unit_attention = Some((0x2a, 0x09));
        }
        self.inject_event(&Self::event_bytes(3, target, lun, 0x092a), None)
    }

    /// Counts one platform access; the machine dies when the plan says so.
    fn access(&self) -> Result<MutexGuard<'_, State>> {
        let n = (self.accesses.fetch_add(1, Ordering::Relaxed) + 1)
            .saturating_sub(self.access_base.load(Ordering::Relaxed));
        let mut st = self.lock();
        if let Some(limit) = st.plan.die_after_accesses
            && n > limit
        {
            self.die(&mut st, "fault plan: machine died");
        }
        match &st.dead {
            Some(r) => Err(PlatformError::Gone(r.clone())),
            None => Ok(st),
        }
    }

    fn stray(&self, st: &mut State, what: String) {
        st.stats.stray_mmio += 1;
        if st.stats.stray_log.len() < 8 {
            st.stats.stray_log.push(what);
        }
    }

    /// Where `addr` decodes: (which BAR, offset).
    fn decode(&self, st: &State, addr: u64, width: Width) -> Option<(u8, u64)> {
        let end = addr.checked_add(width.bytes() as u64)?;
        if let Some((base, size)) = st.pci.bar4()
            && addr >= base
            && end <= base + size
        {
            return Some((4, addr - base));
        }
        if let Some((base, size)) = st.pci.bar1()
            && base != 0
            && addr >= base
            && end <= base + size
        {
            return Some((1, addr - base));
        }
        None
    }

    fn num_vqs(&self, st: &State) -> u16 {
        st.plan
            .transport
            .num_queues
            .unwrap_or(self.request_queues + 2)
    }

    fn offered(&self, st: &State) -> u64 {
        st.plan.transport.features.unwrap_or(OFFERED_FEATURES)
    }

    /// The common configuration as bytes (0x40), for reads and read-modify-write.
    fn common_bytes(&self, st: &State) -> [u8; 0x40] {
        let mut b = [0u8; 0x40];
        let feat = self.offered(st);
        let dev_feat = match st.dev_feature_sel {
            0 => feat as u32,
            1 => (feat >> 32) as u32,
            _ => 0,
        };
        let drv_feat = match st.drv_feature_sel {
            0 => st.driver_features as u32,
            1 => (st.driver_features >> 32) as u32,
            _ => 0,
        };
        b[0x00..0x04].copy_from_slice(&st.dev_feature_sel.to_le_bytes());
        b[0x04..0x08].copy_from_slice(&dev_feat.to_le_bytes());
        b[0x08..0x0c].copy_from_slice(&st.drv_feature_sel.to_le_bytes());
        b[0x0c..0x10].copy_from_slice(&drv_feat.to_le_bytes());
        b[0x10..0x12].copy_from_slice(&0xffffu16.to_le_bytes());
        b[0x12..0x14].copy_from_slice(&self.num_vqs(st).to_le_bytes());
        b[0x14] = st.status;
        b[0x15] = st.generation;
        b[0x16..0x18].copy_from_slice(&st.queue_sel.to_le_bytes());
        let q = usize::from(st.queue_sel);
        let t = &st.plan.transport;
        if let Some(dq) = st.queues.get(q) {
            b[0x18..0x1a].copy_from_slice(&dq.size.to_le_bytes());
            b[0x1a..0x1c].copy_from_slice(&dq.msix.to_le_bytes());
            let enable = t.queue_enable_reads.unwrap_or(u16::from(dq.enabled));
            b[0x1c..0x1e].copy_from_slice(&enable.to_le_bytes());
            let off = t.queue_notify_off.unwrap_or(st.queue_sel);
            b[0x1e..0x20].copy_from_slice(&off.to_le_bytes());
            b[0x20..0x28].copy_from_slice(&dq.desc.to_le_bytes());
            b[0x28..0x30].copy_from_slice(&dq.avail.to_le_bytes());
            b[0x30..0x38].copy_from_slice(&dq.used.to_le_bytes());
        } else if let Some(e) = t.queue_enable_reads {
            b[0x1c..0x1e].copy_from_slice(&e.to_le_bytes());
        }
        b
    }

    fn common_read(&self, st: &mut State, off: u64, width: Width) -> u64 {
        let n = width.bytes();
        if st.plan.transport.generation_churn && off <= 0x15 && 0x15 < off + n as u64 {
            st.generation = st.generation.wrapping_add(1);
        }
        let b = self.common_bytes(st);
        let off = off as usize;
        match b.get(off..off + n) {
            Some(s) => {
                let mut w = [0u8; 8];
                w[..n].copy_from_slice(s);
                u64::from_le_bytes(w)
            }
            None => 0,
        }
    }

    fn common_write(&self, st: &mut State, off: u64, width: Width, value: u64) {
        let n = width.bytes();
        let off = off as usize;
        let mut b = self.common_bytes(st);
        let Some(dst) = b.get_mut(off..off + n) else {
            return;
        };
        dst.copy_from_slice(&value.to_le_bytes()[..n]);
        let touches = |start: usize, len: usize| off < start + len && start < off + n;
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| u64::from(u32_at(at)) | (u64::from(u32_at(at + 4)) << 32);
        if touches(0x00, 4) {
            st.dev_feature_sel = u32_at(0x00);
        }
        if touches(0x08, 4) {
            st.drv_feature_sel = u32_at(0x08);
        }
        if touches(0x0c, 4) {
            let v = u64::from(u32_at(0x0c));
            match st.drv_feature_sel {
                0 => st.driver_features = (st.driver_features & !0xffff_ffff) | v,
                1 => st.driver_features = (st.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            }
        }
        if touches(0x16, 2) {
            st.queue_sel = u16_at(0x16);
        }
        if touches(0x14, 1) {
            self.write_status(st, b[0x14]);
        }
        let q = usize::from(st.queue_sel);
        let Some(dq) = st.queues.get_mut(q) else {
            return;
        };
        let enabled = dq.enabled;
        if touches(0x1a, 2) {
            dq.msix = u16_at(0x1a);
        }
        if !enabled {
            if touches(0x18, 2) {
                dq.size = u16_at(0x18);
            }
            if touches(0x20, 8) {
                dq.desc = u64_at(0x20);
            }
            if touches(0x28, 8) {
                dq.avail = u64_at(0x28);
            }
            if touches(0x30, 8) {
                dq.used = u64_at(0x30);
            }
        }
        if touches(0x1c, 2) && u16_at(0x1c) == 1 && !enabled {
            match dq.validate(&self.dma) {
                Ok(()) => dq.enabled = true,
                Err(e) => self.driver_fault(st, format!("queue {q} enable: {e}")),
            }
        }
    }

    fn write_status(&self, st: &mut State, v: u8) {
        if v == 0 {
            self.reset(st);
            return;
        }
        let mut v = v;
        let t = &st.plan.transport;
        if v & status::FEATURES_OK != 0 && st.status & status::FEATURES_OK == 0 {
            let offered = t.features.unwrap_or(OFFERED_FEATURES);
            let ok = !t.refuse_features
                && st.driver_features & !offered == 0
                && st.driver_features & VERSION_1 != 0;
            if !ok {
                v &= !status::FEATURES_OK;
            }
        }
        let mut needs_reset = st.status & status::NEEDS_RESET;
        if v & status::DRIVER_OK != 0 && t.needs_reset_at_driver_ok {
            needs_reset = status::NEEDS_RESET;
            st.stopped = true;
        }
        st.status = (v & !status::NEEDS_RESET) | needs_reset;
    }

    fn reset(&self, st: &mut State) {
        let max = self.queue_max_size;
        for q in st.queues.iter_mut() {
            *q = DevQueue::new(max);
        }
        st.status = 0;
        st.driver_features = 0;
        st.dev_feature_sel = 0;
        st.drv_feature_sel = 0;
        st.queue_sel = 0;
        st.isr = 0;
        st.line = false;
        st.deferred.clear();
        st.held.clear();
        st.event_bufs.clear();
        st.stopped = false;
        // virtio 1.2 §5.6.4: both are restored to their defaults (96 / 32) on a device reset.
        // A faulty device's "default" is its fault value; once the driver has written sizes,
        // a reset gives the spec's defaults back unless the plan says the fault survives.
        let c = &st.plan.config;
        let fault = !st.sizes_written || c.sizes_survive_reset;
        st.sense_size = c.sense_size.filter(|_| fault).unwrap_or(DEFAULT_SENSE_SIZE);
        st.cdb_size = c.cdb_size.filter(|_| fault).unwrap_or(DEFAULT_CDB_SIZE);
        st.target.bus_reset();
        st.stats.resets += 1;
    }

    /// The virtio-scsi configuration as bytes (36).
    fn config_bytes(&self, st: &State) -> [u8; 36] {
        let c = &st.plan.config;
        let mut b = [0u8; 36];
        let put32 = |b: &mut [u8; 36], at: usize, v: u32| {
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        };
        put32(
            &mut b,
            0,
            c.num_queues.unwrap_or(u32::from(self.request_queues)),
        );
        put32(
            &mut b,
            4,
            c.seg_max
                .unwrap_or(u32::from(self.queue_max_size).saturating_sub(2)),
        );
        put32(&mut b, 8, c.max_sectors.unwrap_or(0xffff));
        put32(&mut b, 12, c.cmd_per_lun.unwrap_or(128));
        put32(&mut b, 16, c.event_info_size.unwrap_or(16));
        put32(&mut b, 20, st.sense_size);
        put32(&mut b, 24, st.cdb_size);
        b[28..30].copy_from_slice(&c.max_channel.unwrap_or(0).to_le_bytes());
        b[30..32].copy_from_slice(&c.max_target.unwrap_or(255).to_le_bytes());
        put32(&mut b, 32, c.max_lun.unwrap_or(16383));
        b
    }

    fn config_read(&self, st: &State, off: u64, width: Width) -> u64 {
        let b = self.config_bytes(st);
        let mut w = [0u8; 8];
        for (i, byte) in w.iter_mut().enumerate().take(width.bytes()) {
            *byte = usize::try_from(off)
                .ok()
                .and_then(|o| b.get(o + i))
                .copied()
                .unwrap_or(0);
        }
        u64::from_le_bytes(w)
    }

    fn config_write(&self, st: &mut State, off: u64, width: Width, value: u64) {
        let mut b = self.config_bytes(st);
        let Ok(off) = usize::try_from(off) else {
            return;
        };
        let n = width.bytes();
        let Some(dst) = off.checked_add(n).and_then(|end| b.get_mut(off..end)) else {
            return;
        };
        dst.copy_from_slice(&value.to_le_bytes()[..n]);
        if st.plan.config.ignore_writes {
            return;
        }
        let touches = |start: usize| off < start + 4 && start < off + n;
        if touches(20) {
            st.sense_size = u32::from_le_bytes([b[20], b[21], b[22], b[23]]);
            st.sizes_written = true;
        }
        if touches(24) {
            st.cdb_size = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
            st.sizes_written = true;
        }
    }

    fn driver_fault(&self, st: &mut State, what: String) {
        log::warn!("fake virtio-scsi: driver fault: {what}");
        if st.stats.lies > 0 {
            st.stats.confusion_after_lie.push(what);
        } else {
            st.stats.driver_faults.push(what);
        }
        // As QEMU's virtio_error: the device stops and asks for a reset.
        st.status |= status::NEEDS_RESET;
        st.stopped = true;
        st.isr |= 2;
        self.raise(st);
    }

    fn raise(&self, st: &mut State) {
        if !st.line {
            st.line = true;
            st.stats.interrupts += 1;
        }
        self.irq.notify_all();
    }

    fn queue_interrupt(&self, st: &mut State, queue: usize) {
        let suppressed = st
            .queues
            .get(queue)
            .is_some_and(|q| q.avail_flags(&self.dma).is_ok_and(|f| f & 1 != 0));
        st.isr |= 1;
        if !suppressed {
            self.raise(st);
        }
    }

    fn push(&self, st: &mut State, queue: usize, id: u32, len: u32) {
        let Some(dq) = st.queues.get_mut(queue) else {
            return;
        };
        match dq.push_used(&self.dma, id, len) {
            Ok(()) => st.stats.completions += 1,
            Err(e) => self.driver_fault(st, format!("queue {queue}: used ring: {}", e.0)),
        }
    }

    /// Releases delayed completions whose time has come; true if any was released.
    fn release_due(&self, st: &mut State) -> bool {
        if st.stopped || st.deferred.is_empty() {
            return false;
        }
        let now = Instant::now();
        let (due, later): (Vec<Deferred>, Vec<Deferred>) =
            st.deferred.drain(..).partition(|d| d.due <= now);
        st.deferred = later;
        let mut queues = Vec::new();
        for d in due {
            self.push(st, d.queue, d.id, d.len);
            queues.push(d.queue);
        }
        for q in &queues {
            self.queue_interrupt(st, *q);
        }
        !queues.is_empty()
    }

    fn notify(&self, st: &mut State, off: u64) {
        st.stats.notifies += 1;
        let q = (off / u64::from(pci::NOTIFY_MULTIPLIER)) as usize;
        self.release_due(st);
        if st.stopped || st.queues.get(q).is_none_or(|dq| !dq.enabled) {
            return;
        }
        match q {
            0 => self.process_control(st),
            1 => {
                // Event buffers stay with the device until an event is delivered.
                let taken = self.take_chains(st, 1);
                st.event_bufs.extend(taken);
            }
            _ => self.process_requests(st, q),
        }
    }

    fn take_chains(&self, st: &mut State, q: usize) -> Vec<Chain> {
        let mut chains = Vec::new();
        loop {
            let popped = match st.queues.get_mut(q) {
                Some(dq) => dq.pop_avail(&self.dma),
                None => return chains,
            };
            let head = match popped {
                Ok(Some(h)) => h,
                Ok(None) => return chains,
                Err(e) => {
                    self.driver_fault(st, format!("queue {q}: {e}"));
                    return chains;
                }
            };
            let walked = st.queues[q].walk(&self.dma, head);
            match walked {
                Ok(c) => chains.push(c),
                Err(e) => {
                    self.driver_fault(st, format!("queue {q}: {e}"));
                    return chains;
                }
            }
        }
    }

    fn process_control(&self, st: &mut State) {
        for c in self.take_chains(st, 0) {
            if st.plan.tmf.ignore {
                continue; // taken, never answered
            }
            let req = match c.gather(&self.dma) {
                Ok(r) => r,
                Err(e) => {
                    self.driver_fault(st, format!("control queue: {}", e.0));
                    return;
                }
            };
            let le32 = |at: usize| {
                req.get(at..at + 4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            };
            let answer: Vec<u8> = match le32(0) {
                Some(0) if req.len() >= 24 => {
                    let mut lun = [0u8; 8];
                    lun.copy_from_slice(&req[8..16]);
                    let mut id = [0u8; 8];
                    id.copy_from_slice(&req[16..24]);
                    let r = self.tmf(
                        st,
                        le32(4).unwrap_or(u32::MAX),
                        &lun,
                        u64::from_le_bytes(id),
                    );
                    st.stats.tmfs += 1;
                    vec![st.plan.tmf.response.unwrap_or(r)]
                }
                // Asynchronous notification query/subscribe: nothing supported.
                Some(1 | 2) => vec![0, 0, 0, 0, 0],
                other => {
                    self.driver_fault(
                        st,
                        format!(
                            "control queue: request type {other:?} of {} bytes",
                            req.len()
                        ),
                    );
                    return;
                }
            };
            let n = match c.scatter(&self.dma, 0, &answer) {
                Ok(n) => n,
                Err(e) => {
                    self.driver_fault(st, format!("control queue: {}", e.0));
                    return;
                }
            };
            self.push(st, 0, u32::from(c.head), n as u32);
            self.queue_interrupt(st, 0);
        }
    }

    /// Carries out one TMF; returns its response code.
    fn tmf(&self, st: &mut State, subtype: u32, lun: &[u8; 8], tag: u64) -> u8 {
        const COMPLETE: u8 = 0;
        const REJECTED: u8 = 11;
        let Some((target, lun_no)) = scsi::parse_lun_field(lun) else {
            return scsi::response::BAD_TARGET;
        };
        if !st.target.lus.iter().any(|l| l.spec.target == target) {
            return scsi::response::BAD_TARGET;
        }
        // Which held commands the TMF ends: (only this tag, whole target), response code, UA.
        let (only_tag, whole_target, code, ua) = match subtype {
            // ABORT TASK
            0 => (Some(tag), false, 2, None),
            // ABORT TASK SET, CLEAR TASK SET
            1 | 3 => (None, false, 2, None),
            // I_T NEXUS RESET
            4 => (None, true, 4, Some((0x29, 0x07))),
            // LOGICAL UNIT RESET
            5 => (None, false, 4, Some((0x29, 0x03))),
            // CLEAR ACA, QUERY TASK (SET): nothing to do
            2 | 6 | 7 => return COMPLETE,
            _ => return REJECTED,
        };
        let pick = |h: &HeldCmd| {
            if whole_target {
                h.lun[1] == target
            } else {
                scsi::parse_lun_field(&h.lun) == Some((target, lun_no))
                    && only_tag.is_none_or(|t| t == h.tag)
            }
        };
        if let Some(ua) = ua {
            for lu in st
                .target
                .lus
                .iter_mut()
                .filter(|l| l.spec.target == target && (subtype == 4 || l.spec.lun == lun_no))
            {
                lu.unit_attention.get_or_insert(ua);
            }
        }
        if st.plan.tmf.keep_commands {
            return COMPLETE;
        }
        let (ended, kept): (Vec<HeldCmd>, Vec<HeldCmd>) = std::mem::take(&mut st.held)
            .into_iter()
            .partition(|h| pick(h));
        st.held = kept;
        let mut queues = Vec::new();
        for h in ended {
            let mut resp = vec![0u8; h.resp_len];
            resp[4..8].copy_from_slice(&(h.buffer as u32).to_le_bytes());
            resp[11] = code;
            if let Err(e) = h.chain.scatter(&self.dma, 0, &resp) {
                self.driver_fault(st, format!("queue {}: {}", h.queue, e.0));
                continue;
            }
            let used = match self.used_len {
                UsedLen::Qemu => h.resp_len + h.buffer,
                UsedLen::Spec => h.resp_len,
            };
            self.push(st, h.queue, u32::from(h.chain.head), used as u32);
            st.stats.aborted += 1;
            queues.push(h.queue);
        }
        for q in queues {
            self.queue_interrupt(st, q);
        }
        COMPLETE
    }

    fn process_requests(&self, st: &mut State, q: usize) {
        let chains = self.take_chains(st, q);
        let mut completed = false;
        for c in chains {
            if st.stopped || st.dead.is_some() {
                break;
            }
            completed |= self.process_one(st, q, c);
        }
        if completed {
            self.queue_interrupt(st, q);
        }
    }

    /// Executes one request chain; true if a used element was put.
    fn process_one(&self, st: &mut State, q: usize, c: Chain) -> bool {
        let seq = st.seq;
        st.seq += 1;
        st.stats.commands += 1;
        if st
            .plan
            .transport
            .needs_reset_after
            .is_some_and(|n| seq >= n)
        {
            st.status |= status::NEEDS_RESET;
            st.stopped = true;
            st.isr |= 2;
            self.raise(st);
            return false;
        }
        let req = match c.gather(&self.dma) {
            Ok(r) => r,
            Err(e) => {
                self.driver_fault(st, format!("queue {q}: {}", e.0));
                return false;
            }
        };
        let cdb_size = st.cdb_size as usize;
        let sense_size = st.sense_size as usize;
        let req_len = REQ_HEADER + cdb_size;
        let resp_len = RESP_HEADER + sense_size;
        let wlen = c.writable_len();
        if req.len() < req_len || wlen < resp_len {
            self.driver_fault(
                st,
                format!(
                    "queue {q}: request of {} / response of {wlen} bytes, expected {req_len} / {resp_len}",
                    req.len()
                ),
            );
            return false;
        }
        let out = &req[req_len..];
        let in_cap = wlen - resp_len;
        if !out.is_empty() && in_cap > 0 {
            self.driver_fault(
                st,
                format!("queue {q}: data in both directions without VIRTIO_SCSI_F_INOUT"),
            );
            return false;
        }
        let mut lun = [0u8; 8];
        lun.copy_from_slice(&req[..8]);
        let cdb = &req[REQ_HEADER..req_len];
        let op = cdb.first().copied().unwrap_or(0);
        let fault = st.plan.command_fault(seq, op);
        if fault.is_some() {
            st.stats.faults_applied += 1;
        }
        let buffer = in_cap.max(out.len());
        let mut lie = fault.as_ref().is_some_and(CommandFault::can_lie);
        let outcome: Outcome = match &fault {
            Some(CommandFault::Die) => {
                self.die(st, "fault plan: machine died during a command");
                return false;
            }
            Some(CommandFault::NeverComplete) => {
                let mut tag = [0u8; 8];
                tag.copy_from_slice(&req[8..16]);
                st.held.push(HeldCmd {
                    queue: q,
                    chain: c,
                    lun,
                    tag: u64::from_le_bytes(tag),
                    resp_len,
                    buffer,
                });
                return false;
            }
            Some(CommandFault::Busy) => Outcome {
                status: scsi::BUSY,
                resid: buffer as u32,
                ..Outcome::default()
            },
            Some(CommandFault::CheckCondition { key, asc, ascq }) => {
                Outcome::check(*key, *asc, *ascq, buffer)
            }
            Some(CommandFault::NoData) => Outcome::default(),
            _ => st.target.execute(&lun, cdb, out, in_cap),
        };
        let honest = outcome.clone();

        // Data-in.
        let mut data_in = outcome.data_in.clone();
        let mut resid = outcome.resid;
        if fault == Some(CommandFault::RandomPayload) && in_cap > 0 {
            let n = if data_in.is_empty() {
                (st.rng.next() as usize) % (in_cap + 1)
            } else {
                data_in.len()
            };
            data_in = st.rng.bytes(n);
            resid = (in_cap - n) as u32;
        }
        let written = match c.scatter(&self.dma, resp_len, &data_in) {
            Ok(n) => n,
            Err(e) => {
                self.driver_fault(st, format!("queue {q}: {}", e.0));
                return false;
            }
        };

        // Response.
        let mut resp = vec![0u8; resp_len];
        let sense_len = outcome.sense.len().min(sense_size);
        resp[0..4].copy_from_slice(&(sense_len as u32).to_le_bytes());
        resp[4..8].copy_from_slice(&resid.to_le_bytes());
        resp[10] = outcome.status;
        resp[11] = outcome.response;
        resp[RESP_HEADER..RESP_HEADER + sense_len].copy_from_slice(&outcome.sense[..sense_len]);
        let mut used = match self.used_len {
            UsedLen::Qemu => resp_len + buffer,
            UsedLen::Spec => resp_len + written,
        } as u32;
        let mut resp_written = resp_len;
        match &fault {
            Some(CommandFault::UsedLen(n)) => used = *n,
            Some(CommandFault::ShortResponse(n)) => {
                resp_written = usize::from(*n).min(RESP_HEADER - 1);
                used = resp_written as u32;
            }
            Some(CommandFault::SenseLen(n)) => resp[0..4].copy_from_slice(&n.to_le_bytes()),
            Some(CommandFault::Resid(r)) => {
                resp[4..8].copy_from_slice(&r.to_le_bytes());
                // A smaller residual than the truth claims bytes that never arrived.
                lie |= *r < honest.resid && honest.is_success();
            }
            Some(CommandFault::Status(s)) => {
                resp[10] = *s;
                lie |= matches!(*s, 0 | 4) && honest.response == 0 && !honest.is_success();
            }
            Some(CommandFault::Response(r)) => {
                resp[11] = *r;
                lie |= *r == 0 && honest.response != 0 && matches!(honest.status, 0 | 4);
            }
            Some(CommandFault::RandomResponse) => {
                resp = st.rng.bytes(resp_len);
            }
            _ => {}
        }
        if let Err(e) = c.scatter(&self.dma, 0, &resp[..resp_written]) {
            self.driver_fault(st, format!("queue {q}: {}", e.0));
            return false;
        }

        // Completion.
        let head = u32::from(c.head);
        let size = st.queues.get(q).map_or(0, |dq| dq.size);
        match &fault {
            Some(CommandFault::Delay { ms }) => {
                st.deferred.push(Deferred {
                    queue: q,
                    id: head,
                    len: used,
                    due: Instant::now() + Duration::from_millis(u64::from(*ms)),
                });
                if lie {
                    st.stats.lies += 1;
                }
                return false;
            }
            Some(CommandFault::CompleteTwice) => {
                self.push(st, q, head, used);
                self.push(st, q, head, used);
            }
            Some(CommandFault::UsedId(id)) => {
                let held_other = u16::try_from(*id).is_ok_and(|h| {
                    h != c.head && st.queues.get(q).is_some_and(|dq| dq.held.contains(&h))
                });
                lie |= held_other;
                self.push(st, q, *id, used);
            }
            Some(CommandFault::UsedIdHigh(n)) => {
                self.push(st, q, head | (u32::from((*n).max(1)) << 16), used);
            }
            Some(CommandFault::UsedIdNeverIssued) => {
                let id = st
                    .queues
                    .get(q)
                    .and_then(|dq| (0..size).rev().find(|h| !dq.held.contains(h)))
                    .unwrap_or(size);
                self.push(st, q, u32::from(id), used);
            }
            Some(CommandFault::UsedIdxJump(n)) => {
                self.push(st, q, head, used);
                if let Some(dq) = st.queues.get_mut(q)
                    && let Err(e) = dq.jump_used(&self.dma, *n)
                {
                    self.driver_fault(st, format!("queue {q}: {}", e.0));
                }
            }
            _ => self.push(st, q, head, used),
        }
        // Whatever id it reported, the device is done with its own chain.
        if let Some(dq) = st.queues.get_mut(q) {
            dq.held.remove(&c.head);
        }
        if lie {
            st.stats.lies += 1;
        }
        true
    }
}

impl Platform for FakeMachine {
    fn pci_read32(&self, dev: PciAddress, offset: u8) -> Result<u32> {
        let st = self.access()?;
        if !offset.is_multiple_of(4) {
            return Err(PlatformError::Invalid(format!(
                "unaligned config read at {offset:#x}"
            )));
        }
        Ok(match (dev.bus, dev.device, dev.function) {
            (0, 0, 0) => pci::host_bridge_read32(offset),
            (0, d, 0) if d == self.slot => st.pci.read32(offset),
            _ => u32::MAX,
        })
    }

    fn pci_write32(&self, dev: PciAddress, offset: u8, value: u32) -> Result<()> {
        let mut st = self.access()?;
        if !offset.is_multiple_of(4) {
            return Err(PlatformError::Invalid(format!(
                "unaligned config write at {offset:#x}"
            )));
        }
        if (dev.bus, dev.device, dev.function) == (0, self.slot, 0) {
            st.pci.write32(offset, value);
        }
        Ok(())
    }

    fn mmio_read(&self, addr: u64, width: Width) -> Result<u64> {
        let mut st = self.access()?;
        let all_ones = u64::MAX >> (64 - 8 * width.bytes());
        let Some((bar, off)) = self.decode(&st, addr, width) else {
            self.stray(&mut st, format!("read {width:?} at {addr:#x}"));
            return Ok(all_ones);
        };
        if bar != 4 {
            return Ok(0);
        }
        let region = off / pci::STRUCT_LEN * pci::STRUCT_LEN;
        let within = off - region;
        Ok(match region {
            pci::COMMON_OFF => self.common_read(&mut st, within, width),
            pci::ISR_OFF if within == 0 => {
                let v = st.isr;
                if !st.plan.transport.isr_stuck {
                    st.isr = 0;
                    st.line = false;
                }
                u64::from(v)
            }
            pci::DEVICE_OFF => self.config_read(&st, within, width),
            _ => 0,
        })
    }

    fn mmio_write(&self, addr: u64, width: Width, value: u64) -> Result<()> {
        let mut st = self.access()?;
        let Some((bar, off)) = self.decode(&st, addr, width) else {
            self.stray(&mut st, format!("write {width:?} {value:#x} at {addr:#x}"));
            return Ok(());
        };
        if bar != 4 {
            return Ok(());
        }
        let region = off / pci::STRUCT_LEN * pci::STRUCT_LEN;
        let within = off - region;
        match region {
            pci::COMMON_OFF => self.common_write(&mut st, within, width, value),
            pci::DEVICE_OFF => self.config_write(&mut st, within, width, value),
            pci::NOTIFY_OFF => self.notify(&mut st, within),
            _ => {}
        }
        Ok(())
    }

    fn mmio_write_posted(&self, addr: u64, width: Width, value: u64) -> Result<()> {
        self.mmio_write(addr, width, value)
    }

    fn port_read(&self, _port: u16, width: Width) -> Result<u32> {
        let _st = self.access()?;
        Ok((u64::MAX >> (64 - 8 * width.bytes())) as u32)
    }

    fn port_write(&self, _port: u16, _width: Width, _value: u32) -> Result<()> {
        let _st = self.access()?;
        Ok(())
    }

    fn dma_window(&self) -> DmaWindow {
        self.dma.window()
    }

    fn mmio_window(&self) -> MmioWindow {
        self.mmio_window
    }

    fn wait_irq(&self, timeout: Option<Duration>) -> Result<IrqWait> {
        let mut st = self.access()?;
        st.stats.irq_waits += 1;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(r) = &st.dead {
                return Err(PlatformError::Gone(r.clone()));
            }
            self.release_due(&mut st);
            if st.line {
                return Ok(IrqWait::Asserted);
            }
            let next_due = if st.stopped {
                None
            } else {
                st.deferred.iter().map(|d| d.due).min()
            };
            let until = match (deadline, next_due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            st = match until {
                None => self.irq.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(t) => {
                    let now = Instant::now();
                    if deadline.is_some_and(|d| now >= d) {
                        return Ok(IrqWait::TimedOut);
                    }
                    let d = t.saturating_duration_since(now);
                    self.irq
                        .wait_timeout(st, d)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    fn cpu_count(&self) -> usize {
        self.cpu_count
    }

    fn current_cpu(&self) -> usize {
        THREAD_CPU.with(|c| *c) % self.cpu_count
    }

    fn health(&self) -> Result<()> {
        let delay = self.lock().plan.slow_health_ms;
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(u64::from(delay)));
        }
        match &self.lock().dead {
            Some(r) => Err(PlatformError::Gone(r.clone())),
            None => Ok(()),
        }
    }
}
