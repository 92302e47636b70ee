//! The SCSI host: brings the device up, finds its disks, and runs block I/O on them.
//!
//! Data flow for one block request: split into commands that honour the device's limits
//! (`max_sectors`, the Block Limits VPD page, the slot size) → pick a request queue → fill a
//! slot → add to the ring and notify → the completion thread pops the used entry → the
//! submitter decodes the response and copies data out. Retries happen only for conditions
//! where retrying is right (UNIT ATTENTION, BUSY, TASK SET FULL, becoming ready).
//!
//! Threads: any number of submitters (each blocks on its own command), plus one completion
//! thread that sleeps on the device interrupt (`Platform::wait_irq`) and drains the used rings.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use platform::{IrqWait, Platform};
use scsi_commands as scsi;
use target_steering::{LockKind, Policy, Steering, SteeringStats, Tracker};
use virtio_drivers::transport::{DeviceStatus, Transport};

use crate::control::{ControlQueue, Epoch, Tmf, tmf_succeeded};
use crate::disk::Disk;
use crate::error::DriverError;
use crate::events::{Event, EventQueue};
use crate::hal::{self, DmaArena};
use crate::queue::{DataDir, QueueError, RequestQueue, SlotGuard};
use crate::transport::{IsrReader, PciTransport};
use crate::wire::{self, CmdResponse, Response, ScsiConfig};
use crate::wire::{Features, WANTED_FEATURES};

/// How often the completion thread wakes without an interrupt (a safety net and a health check;
/// nothing spins).
const IDLE_WAKE: Duration = Duration::from_millis(250);
/// Device-requested resets (DEVICE_NEEDS_RESET) tolerated in a row, each within
/// `NEEDS_RESET_WINDOW` of the previous one, before the device is given up on.
const MAX_NEEDS_RESET_RUN: u32 = 5;
/// See `MAX_NEEDS_RESET_RUN`.
const NEEDS_RESET_WINDOW: Duration = Duration::from_secs(10);
/// Longest stretch of busy polling before the completion thread looks at the interrupt line
/// (events, task management answers and configuration changes still arrive by interrupt).
const POLL_SLICE: Duration = Duration::from_millis(10);
/// Most bytes one WRITE SAME of zeros covers (see `ScsiHost::write_zeroes`).
const WRITE_SAME_MAX_BYTES: u64 = 1 << 30;
/// Commands of one block request in flight at once.
const MAX_CHUNKS_IN_FLIGHT: usize = 16;
/// Attempts for a command whose error says "try again".
const MAX_ATTEMPTS: u32 = 8;

/// Host settings.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Request queues to use (capped by the device's `num_queues`); `None` = all.
    pub queues: Option<usize>,
    /// Data bytes per command slot (larger requests are split).
    pub slot_bytes: usize,
    /// How long one command may take before recovery starts (ABORT TASK, then LOGICAL UNIT
    /// RESET, then I_T NEXUS RESET, then a device reset).
    pub command_timeout: Duration,
    /// How long each recovery step waits for the command to come back.
    pub tmf_timeout: Duration,
    /// Highest target id to scan (capped by the device's `max_target`).
    pub max_scan_target: u16,
    /// How a request queue is chosen for each block request.
    pub steering: Policy,
    /// The per-target state's synchronisation (seqcount is the design; the others exist to be
    /// measured against it).
    pub steering_lock: LockKind,
    /// Check on live traffic that all in-flight requests of a target share one queue (costs a
    /// mutex per request; for tests). Violations are counted in [`HostStats`].
    pub check_steering: bool,
    /// Busy polling: while the device holds commands, the completion thread polls the used
    /// rings (with the request queues' interrupts suppressed) instead of sleeping on the
    /// interrupt, and goes back to interrupts after this long without a completion. Costs a
    /// CPU while I/O is in flight and saves the interrupt path (on Linux with UIO: a kernel
    /// handler, a wake-up and a config-space write per interrupt). Zero, the default:
    /// interrupts only.
    pub poll: Duration,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            queues: None,
            slot_bytes: 128 * 1024,
            command_timeout: Duration::from_secs(30),
            tmf_timeout: Duration::from_secs(5),
            max_scan_target: 255,
            steering: Policy::PerTarget,
            steering_lock: LockKind::Seqcount,
            check_steering: false,
            poll: Duration::ZERO,
        }
    }
}

/// Data of one command.
pub enum Data<'a> {
    /// No data phase.
    None,
    /// The device fills this buffer.
    In(&'a mut [u8]),
    /// The device reads this buffer.
    Out(&'a [u8]),
}

impl Data<'_> {
    fn reborrow(&mut self) -> Data<'_> {
        match self {
            Data::None => Data::None,
            Data::In(b) => Data::In(b),
            Data::Out(b) => Data::Out(b),
        }
    }
    fn len(&self) -> usize {
        match self {
            Data::None => 0,
            Data::In(b) => b.len(),
            Data::Out(b) => b.len(),
        }
    }
}

/// What the device reported for a command that succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transferred(pub usize);

/// A running virtio-scsi host adapter.
pub struct ScsiHost {
    platform: Arc<dyn Platform>,
    /// Config-space and status accesses (not on the I/O path).
    transport: Mutex<PciTransport>,
    config: ScsiConfig,
    features: u64,
    queues: Vec<RequestQueue>,
    /// Which request queue each block request uses (see the `target-steering` crate for its
    /// concurrency rules). Never held together with a queue lock: a route is picked before a
    /// slot is taken and completed after the slot is released.
    steering: Steering,
    /// Live invariant check, when enabled.
    tracker: Option<Tracker>,
    /// Picks the tracker found on a queue other than the target's in-flight queue.
    violations: AtomicU64,
    /// Task management. Lock order: `control` before a request queue's lock (a TMF caller
    /// may hold it while a reset re-creates queues).
    control: Mutex<ControlQueue>,
    /// Bumped by the completion thread after every wake-up (TMF callers wait on it).
    epoch: Epoch,
    /// Threads busy-polling the request queues now ([`ScsiHost::begin_busy_poll`] and the
    /// completion thread's `poll_busy`). The request queues' interrupts are off exactly while
    /// this is above 0: changed, with the flags, only under this lock, so the last one out
    /// always turns them back on (and drains once more, for what came in between).
    pollers: Mutex<usize>,
    /// Hotplug and parameter-change events (drained by the completion thread, handled by the
    /// event thread through `events_tx`).
    event: Mutex<EventQueue>,
    events_tx: Mutex<Option<std::sync::mpsc::Sender<Event>>>,
    /// Serialises device resets.
    reset_lock: Mutex<()>,
    /// Recovery counters: commands that timed out, TMFs sent, device resets.
    timeouts: AtomicU64,
    /// Completions collected by busy polls (`busy_poll`), not by the interrupt path.
    busy_polled: AtomicU64,
    tmfs: AtomicU64,
    resets: AtomicU64,
    /// When the device last asked for a reset itself (DEVICE_NEEDS_RESET), and how many
    /// such resets came in a row shortly after each other. Only the completion thread
    /// touches it (see `check_needs_reset`).
    needs_reset_run: Mutex<(Option<Instant>, u32)>,
    /// Logical units (target, LUN) that refused WRITE SAME (see `write_zeroes`).
    no_write_same: Mutex<Vec<(u8, u16)>>,
    /// Disk number → disk. A number is never reused for another (target, LUN); a removed
    /// disk leaves `None` (a LUN that comes back gets its old number).
    disks: RwLock<Vec<Option<Arc<Disk>>>>,
    /// Bumped whenever a disk appears, disappears or changes (capacity).
    disk_generation: AtomicU64,
    /// Numbers of removed disks with their (target, LUN), so a returning LUN keeps its number.
    gone: Mutex<Vec<(usize, (u8, u16))>>,
    next_tag: AtomicU64,
    stop: AtomicBool,
    down: Mutex<Option<String>>,
    isr: IsrReader,
    completion: Mutex<Option<JoinHandle<()>>>,
    cfg: HostConfig,
    /// Client windows registered for zero-copy I/O (see `alloc_shared_window`).
    shared: Mutex<Vec<DmaArena>>,
    /// Last: queues and slots above point into it.
    arena: DmaArena,
}

impl ScsiHost {
    /// Finds the device, initialises it (virtio 1.2 §3.1.1), sets up every queue, starts the
    /// completion thread and scans for disks.
    pub fn start(platform: Arc<dyn Platform>, cfg: HostConfig) -> Result<Arc<Self>, DriverError> {
        // SAFETY: the platform keeps its DMA window mapped for its own lifetime, and the host
        // holds an Arc to the platform for at least as long as the arena lives; the window is
        // used by nothing else in the process.
        let arena = unsafe { DmaArena::register(platform.dma_window()) }
            .map_err(|e| DriverError::Init(e.to_string()))?;
        let mut transport = PciTransport::probe(platform.clone())?;

        // Reset, then negotiate (see `WANTED_FEATURES` for what and why).
        transport.set_status(DeviceStatus::empty());
        let negotiated = transport.begin_init(WANTED_FEATURES);
        if !negotiated.contains(Features::VERSION_1) {
            return Err(DriverError::Init(
                "device does not offer VIRTIO_F_VERSION_1".into(),
            ));
        }
        if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
            return Err(DriverError::Init("device refused our features".into()));
        }
        platform.health()?;
        let config = read_config(&mut transport)?;
        log::info!("virtio-scsi config: {config:?}");

        let device_queues = transport.num_queues();
        if device_queues < 3 {
            return Err(DriverError::Init(format!(
                "device has {device_queues} virtqueues, needs at least 3"
            )));
        }
        let available = usize::from(device_queues - 2).min(config.num_queues.max(1) as usize);
        let nreq = cfg.queues.unwrap_or(available).clamp(1, available);

        let control = ControlQueue::new(&mut transport, &arena).map_err(DriverError::Init)?;
        let event = EventQueue::new(&mut transport, &arena).map_err(DriverError::Init)?;
        let mut queues = Vec::with_capacity(nreq);
        for i in 0..nreq {
            queues.push(
                RequestQueue::new(
                    &mut transport,
                    &arena,
                    2 + i as u16,
                    config.cdb_size as usize,
                    config.sense_size as usize,
                    cfg.slot_bytes,
                )
                .map_err(DriverError::Init)?,
            );
        }
        transport.finish_init();
        platform.health()?;
        if transport
            .get_status()
            .contains(DeviceStatus::DEVICE_NEEDS_RESET)
        {
            return Err(DriverError::Init(
                "device needs reset right after init".into(),
            ));
        }
        log::info!(
            "virtio-scsi at {}: {nreq} request queues, {} slots of {} KiB each",
            transport.pci_address(),
            queues[0].depth(),
            cfg.slot_bytes / 1024
        );

        let isr = transport.isr_reader();
        let steering = Steering::new(cfg.steering, cfg.steering_lock, nreq, 256);
        let tracker = (cfg.check_steering && cfg.steering != Policy::PerCpu).then(Tracker::new);
        let host = Arc::new(ScsiHost {
            platform,
            transport: Mutex::new(transport),
            config,
            features: negotiated.bits(),
            queues,
            steering,
            tracker,
            violations: AtomicU64::new(0),
            control: Mutex::new(control),
            epoch: Epoch::default(),
            pollers: Mutex::new(0),
            event: Mutex::new(event),
            events_tx: Mutex::new(None),
            gone: Mutex::new(Vec::new()),
            disk_generation: AtomicU64::new(0),
            reset_lock: Mutex::new(()),
            timeouts: AtomicU64::new(0),
            busy_polled: AtomicU64::new(0),
            tmfs: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            needs_reset_run: Mutex::new((None, 0)),
            no_write_same: Mutex::new(Vec::new()),
            disks: RwLock::new(Vec::new()),
            next_tag: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            down: Mutex::new(None),
            isr,
            completion: Mutex::new(None),
            cfg,
            shared: Mutex::new(Vec::new()),
            arena,
        });
        let weak = Arc::downgrade(&host);
        let handle = std::thread::Builder::new()
            .name("vscsi-completion".into())
            .spawn(move || completion_loop(weak))
            .map_err(|e| DriverError::Init(format!("completion thread: {e}")))?;
        *host.completion.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);

        let disks = host.scan();
        if let Err(e) = host.health() {
            host.shutdown();
            return Err(e);
        }
        log::info!("found {} disk(s)", disks.len());
        *host.disks.write().unwrap_or_else(|p| p.into_inner()) =
            disks.into_iter().map(|d| Some(Arc::new(d))).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        *host.events_tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        let weak = Arc::downgrade(&host);
        std::thread::Builder::new()
            .name("vscsi-events".into())
            .spawn(move || event_loop(weak, rx))
            .map_err(|e| DriverError::Init(format!("event thread: {e}")))?;
        Ok(host)
    }

    /// The device configuration as read at start-up.
    pub fn config(&self) -> &ScsiConfig {
        &self.config
    }

    /// Negotiated feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The request queues.
    pub fn queues(&self) -> &[RequestQueue] {
        &self.queues
    }

    /// The disks present now, in disk-number order.
    pub fn disks(&self) -> Vec<Arc<Disk>> {
        self.disks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// How many disk numbers were ever given out.
    pub fn disk_count(&self) -> usize {
        self.disks.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Every disk number ever given out, with the disk if it is present now.
    pub fn disk_slots(&self) -> Vec<Option<Arc<Disk>>> {
        self.disks.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes whenever a disk appears, disappears or changes size.
    pub fn disk_generation(&self) -> u64 {
        self.disk_generation.load(Ordering::Acquire)
    }

    /// Puts `disk` in the table: at its old number if its (target, LUN) had one, else at a
    /// new number.
    fn install_disk(&self, disk: Disk) {
        let mut table = self.disks.write().unwrap_or_else(|p| p.into_inner());
        let (t, l) = (disk.target, disk.lun);
        let d = Arc::new(disk);
        let existing = table
            .iter()
            .position(|s| s.as_ref().is_some_and(|x| x.target == t && x.lun == l))
            .or_else(|| {
                self.gone
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .find(|(_, tl)| *tl == (t, l))
                    .map(|(i, _)| *i)
            });
        match existing {
            Some(i) => {
                log::info!("disk {i}: {d}");
                table[i] = Some(d);
            }
            None => {
                log::info!("disk {}: {d} (new)", table.len());
                table.push(Some(d));
            }
        }
        self.disk_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Removes the disk at (target, LUN), keeping its number for its return.
    fn remove_disk(&self, target: u8, lun: u16) {
        let mut table = self.disks.write().unwrap_or_else(|p| p.into_inner());
        for (i, s) in table.iter_mut().enumerate() {
            if s.as_ref()
                .is_some_and(|d| d.target == target && d.lun == lun)
            {
                log::info!("disk {i} (target {target} lun {lun}) removed");
                *s = None;
                self.gone
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((i, (target, lun)));
                self.disk_generation.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Acts on one event (on the event thread: probing sends commands).
    fn handle_event(&self, e: Event) {
        log::info!("event: {e:?}");
        match e {
            Event::Rescan { target, lun } | Event::ParamChange { target, lun, .. } => {
                match Disk::probe(self, target, lun) {
                    Ok(Some(d)) => self.install_disk(d),
                    Ok(None) => self.remove_disk(target, lun),
                    Err(err) => {
                        log::warn!("probing target {target} lun {lun} after {e:?}: {err}");
                        if matches!(err, DriverError::Virtio(Response::BadTarget))
                            || matches!(&err, DriverError::Scsi(s) if s.is_lun_not_supported())
                        {
                            self.remove_disk(target, lun);
                        }
                    }
                }
            }
            Event::Removed { target, lun } => self.remove_disk(target, lun),
            Event::Missed => {
                let found = self.scan();
                let present: Vec<(u8, u16)> = found.iter().map(|d| (d.target, d.lun)).collect();
                for d in self.disks() {
                    if !present.contains(&(d.target, d.lun)) {
                        self.remove_disk(d.target, d.lun);
                    }
                }
                for d in found {
                    self.install_disk(d);
                }
            }
        }
    }

    /// Disk number `index`, if present.
    pub fn disk(&self, index: usize) -> Option<Arc<Disk>> {
        self.disks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(index)
            .cloned()
            .flatten()
    }

    /// `Ok` while the host works.
    pub fn health(&self) -> Result<(), DriverError> {
        if let Some(reason) = self.down.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(DriverError::Down(reason));
        }
        Ok(self.platform.health()?)
    }

    /// Fails everything still in flight, resets the device (so it stops using our memory)
    /// and stops the completion thread. Idempotent.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // A reset in progress finishes first (and sees `stop` afterwards), so it cannot bring
        // the queues back to life after they are failed here.
        let _no_reset = self.reset_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.mark_down("host shut down");
        if self.platform.health().is_ok() {
            self.transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_status(DeviceStatus::empty());
        }
        let handle = self
            .completion
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(_no_reset);
        if let Some(h) = handle
            && h.thread().id() != std::thread::current().id()
        {
            let _ = h.join();
        }
    }

    fn mark_down(&self, reason: &str) {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        if down.is_none() {
            *down = Some(reason.to_string());
        }
        drop(down);
        for q in &self.queues {
            q.fail_all(reason);
        }
    }

    /// Picks the request queue for one block request to `disk` from the calling thread (whose
    /// CPU is the "current CPU" of the steering policy). The route stays picked until dropped,
    /// which must be after the request's last command completed.
    fn route(&self, disk: &Disk) -> Route<'_> {
        Route {
            host: self,
            id: self.pick_route(disk),
        }
    }

    /// [`ScsiHost::route`] without the guard (for a command token that owns its route): every
    /// pick must be ended by exactly one [`ScsiHost::end_route`], after the request's last use
    /// of the queue (the target-steering rule: complete after the last use).
    pub(crate) fn pick_route(&self, disk: &Disk) -> RouteId {
        let queue = self
            .steering
            .pick_raw(disk.target, self.platform.current_cpu());
        let tracked = match &self.tracker {
            Some(t) => match t.try_begin(disk.target, queue) {
                Ok(()) => true,
                Err(v) => {
                    self.violations.fetch_add(1, Ordering::Relaxed);
                    log::error!("steering invariant violated: {v}");
                    false
                }
            },
            None => false,
        };
        RouteId {
            target: disk.target,
            queue,
            tracked,
        }
    }

    /// Ends a route picked with [`ScsiHost::pick_route`].
    pub(crate) fn end_route(&self, id: RouteId) {
        // The invariant record ends before the steering pick completes, so the record never
        // shows a request the steering no longer counts.
        if id.tracked
            && let Some(t) = &self.tracker
        {
            t.end(id.target);
        }
        self.steering.complete_raw(id.target);
    }

    /// Request queue `index` (as picked by the steering).
    pub(crate) fn queue_at(&self, index: usize) -> &RequestQueue {
        &self.queues[index]
    }

    /// Settings of the host.
    pub(crate) fn host_config(&self) -> &HostConfig {
        &self.cfg
    }

    /// The host's own DMA memory.
    pub(crate) fn dma_arena(&self) -> &DmaArena {
        &self.arena
    }

    /// A new device-visible window for a client's zero-copy arena: block I/O whose buffer lies
    /// inside it goes to the device with no copy. The window lives as long as the host.
    pub fn alloc_shared_window(&self, len: usize) -> Result<platform::SharedWindow, DriverError> {
        let shared = self.platform.alloc_shared_window(len)?;
        // SAFETY: the platform keeps the window mapped for its lifetime (the `Platform`
        // contract of `alloc_shared_window`), and the host holds the platform; the window is
        // new, so nothing else in this process uses it as DMA memory.
        let arena = unsafe { DmaArena::register(shared.window) }
            .map_err(|e| DriverError::Init(e.to_string()))?;
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(arena);
        Ok(shared)
    }

    /// Counters of the request path.
    pub fn stats(&self) -> HostStats {
        let q = |f: fn(&RequestQueue) -> &AtomicU64| {
            self.queues
                .iter()
                .map(|x| f(x).load(Ordering::Relaxed))
                .collect()
        };
        HostStats {
            policy: self.steering.policy(),
            lock: self.steering.lock_kind(),
            submitted: q(|x| &x.stats.submitted),
            completed: q(|x| &x.stats.completed),
            kicks: q(|x| &x.stats.kicks),
            steering: self.steering.stats(),
            invariant_checked: self.tracker.is_some(),
            invariant_violations: self.violations.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            busy_polled: self.busy_polled.load(Ordering::Relaxed),
            tmfs: self.tmfs.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
        }
    }

    /// Runs one command on `queue`, once, and checks its response.
    fn execute_once(
        &self,
        queue: &RequestQueue,
        lun: &[u8; 8],
        cdb: &[u8],
        data: Data<'_>,
    ) -> Result<Transferred, DriverError> {
        let len = data.len();
        if len > queue.data_cap() {
            return Err(DriverError::Invalid(format!(
                "{len} data bytes exceed the {}-byte slot",
                queue.data_cap()
            )));
        }
        let mut slot = queue.acquire()?;
        let dir = match &data {
            Data::None => DataDir::None,
            Data::In(_) => DataDir::In,
            Data::Out(out) => {
                self.fill(&mut slot, lun, cdb, Some(out));
                DataDir::Out
            }
        };
        if dir != DataDir::Out {
            self.fill(&mut slot, lun, cdb, None);
        }
        slot.submit(dir, len)?;
        self.finish(&mut slot, data)
    }

    /// Writes the request header, and the out-data if any, into a slot.
    pub(crate) fn fill(
        &self,
        slot: &mut SlotGuard<'_>,
        lun: &[u8; 8],
        cdb: &[u8],
        out: Option<&[u8]>,
    ) {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        slot.lun = *lun;
        slot.tag = tag;
        let (header, buf) = slot.buffers_mut();
        wire::encode_request(header, lun, tag, cdb);
        if let Some(out) = out {
            buf[..out.len()].copy_from_slice(out);
        }
    }

    /// Waits for a submitted slot and decodes its response, copying in-data out.
    fn finish(&self, slot: &mut SlotGuard<'_>, data: Data<'_>) -> Result<Transferred, DriverError> {
        self.finish_inner(slot, data, true)
    }

    /// Waits for a submitted slot and checks its response; with `copy_in`, in-data is copied
    /// from the slot buffer to `data` (without, it is already there: zero-copy).
    fn finish_inner(
        &self,
        slot: &mut SlotGuard<'_>,
        data: Data<'_>,
        copy_in: bool,
    ) -> Result<Transferred, DriverError> {
        let (used, recovered) = self.wait_used(slot, self.cfg.command_timeout)?;
        let transferred = self.decode(slot, used, recovered, data.len())?;
        if copy_in && let Data::In(dst) = data {
            let (_, buf) = slot.response();
            dst[..transferred.0].copy_from_slice(&buf[..transferred.0]);
        }
        Ok(transferred)
    }

    /// Waits up to `timeout` for a submitted slot, then recovers the command (see `recover`).
    /// Returns the used length and whether recovery was needed.
    pub(crate) fn wait_used(
        &self,
        slot: &mut SlotGuard<'_>,
        timeout: Duration,
    ) -> Result<(usize, bool), DriverError> {
        match slot.wait(Some(timeout)) {
            Ok(used) => Ok((used as usize, false)),
            Err(QueueError::Timeout(_)) => match self.recover(slot) {
                Ok(used) => Ok((used as usize, true)),
                Err(e) => Err(DriverError::TimedOut(e.to_string())),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// Decodes the response of a completed command (`used` bytes reported by the device,
    /// `expected` data bytes asked for) into the bytes transferred, or the error it reports.
    /// `recovered`: the command came back through recovery (then anything but success is a
    /// timeout, not retried). The one decoder of every command's response, blocking or not.
    pub(crate) fn decode(
        &self,
        slot: &SlotGuard<'_>,
        used: usize,
        recovered: bool,
        expected: usize,
    ) -> Result<Transferred, DriverError> {
        let (resp_area, _) = slot.response();
        // One copy of the response (on the stack: no allocation per command), decoded from
        // the copy so every field is read once.
        let mut copy = [0u8; wire::RESP_HEADER_LEN + wire::MAX_SENSE_SIZE as usize];
        let n = resp_area.len().min(copy.len());
        copy[..n].copy_from_slice(&resp_area[..n]);
        // `used` counts response + data bytes; the response comes first.
        let resp = CmdResponse::decode(&copy[..n], used)?;
        if recovered && (resp.response != Response::Ok || resp.status != scsi::ScsiStatus::Good) {
            // Aborted or reset by the recovery: report the timeout, do not retry it.
            return Err(DriverError::TimedOut(format!(
                "ended with {:?} / {:?}",
                resp.response, resp.status
            )));
        }
        if resp.response != Response::Ok {
            return Err(DriverError::Virtio(resp.response));
        }
        scsi::ScsiError::from_status(resp.status.into(), resp.sense)?;
        let resid = resp.resid as usize;
        if resid > expected {
            return Err(DriverError::Invalid(format!(
                "device reported residual {resid} for a {expected}-byte transfer"
            )));
        }
        Ok(Transferred(expected - resid))
    }

    /// Settles one read or write command of a block request (`n` bytes at block `lba`) whose
    /// first attempt ended with `first`: the full transfer is success; a short one is an
    /// error; a retryable error is retried on its own through a slot buffer (after giving
    /// `slot` up) with the bounded retry policy, when the piece fits a slot. `data` is the
    /// piece's buffer, asked for only to retry (after the first attempt was answered).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn settle<'d>(
        &self,
        queue: &RequestQueue,
        lun: &[u8; 8],
        is_write: bool,
        lba: u64,
        n: usize,
        first: Result<Transferred, DriverError>,
        slot: SlotGuard<'_>,
        data: impl FnOnce() -> Data<'d>,
        bs: usize,
    ) -> Result<(), DriverError> {
        let whole = |r: Result<Transferred, DriverError>| match r {
            Ok(Transferred(t)) if t == n => Ok(()),
            Ok(Transferred(t)) => Err(DriverError::ShortTransfer {
                expected: n,
                transferred: t,
            }),
            Err(e) => Err(e),
        };
        match first {
            Err(e) if e.is_retryable() && n <= queue.data_cap() => {
                drop(slot);
                let cdb = rw_cdb(is_write, lba, (n / bs.max(1)) as u64)
                    .map_err(|e| DriverError::Invalid(e.to_string()))?;
                whole(self.execute_on(queue, lun, cdb.as_slice(), data()))
            }
            other => whole(other),
        }
    }

    /// A command in `slot` did not complete in time. Escalates until it does: ABORT TASK,
    /// LOGICAL UNIT RESET, I_T NEXUS RESET (each followed by a bounded wait for the command),
    /// then a device reset, which fails it. Returns the used length if the command came back
    /// (then its response says how it ended: data, ABORTED, RESET...). Either way the command
    /// is answered exactly once, and only after the device is done with its buffers.
    fn recover(&self, slot: &mut SlotGuard<'_>) -> Result<u32, DriverError> {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
        let (lun, tag) = (slot.lun, slot.tag);
        log::warn!(
            "command tag {tag} to target {} timed out after {:?}; recovering",
            lun[1],
            self.cfg.command_timeout
        );
        for tmf in [Tmf::AbortTask, Tmf::LogicalUnitReset, Tmf::ITNexusReset] {
            self.health()?;
            self.tmfs.fetch_add(1, Ordering::Relaxed);
            let answer = self.control.lock().unwrap_or_else(|p| p.into_inner()).tmf(
                &self.epoch,
                tmf,
                &lun,
                tag,
                self.cfg.tmf_timeout,
            );
            match answer {
                Some(r) if tmf_succeeded(r) => log::info!("{tmf:?} for tag {tag}: done"),
                Some(r) => log::warn!("{tmf:?} for tag {tag}: device answered {r}"),
                None => log::warn!("{tmf:?} for tag {tag}: no answer"),
            }
            match slot.wait(Some(self.cfg.tmf_timeout)) {
                Ok(used) => return Ok(used),
                Err(QueueError::Timeout(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        self.reset_device(&format!("command tag {tag} never came back"))?;
        // The reset failed the command (it was in flight): collect that result.
        match slot.wait(Some(self.cfg.tmf_timeout)) {
            Ok(used) => Ok(used),
            Err(e) => Err(e.into()),
        }
    }

    /// Resets the device and sets it up again: every command in flight fails (exactly once),
    /// every queue gets a fresh ring, and the disks stay as they were (they report a UNIT
    /// ATTENTION next, which is retried).
    pub fn reset_device(&self, reason: &str) -> Result<(), DriverError> {
        let _one = self.reset_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.stop.load(Ordering::SeqCst) {
            return Err(DriverError::Down("host shut down".into()));
        }
        self.resets.fetch_add(1, Ordering::Relaxed);
        log::warn!("resetting the virtio-scsi device: {reason}");
        let reason = format!("device reset ({reason})");
        let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let mut t = self.transport.lock().unwrap_or_else(|p| p.into_inner());
        t.set_status(DeviceStatus::empty());
        // The spec has the driver wait until the status reads back 0.
        for _ in 0..1000 {
            if t.get_status().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.platform.health()?;
        let negotiated = t.begin_init(WANTED_FEATURES);
        if !negotiated.contains(Features::VERSION_1)
            || !t.get_status().contains(DeviceStatus::FEATURES_OK)
        {
            let e = "device refused our features after reset".to_string();
            self.mark_down(&e);
            return Err(DriverError::Init(e));
        }
        let fail = |e: String| {
            self.mark_down(&e);
            DriverError::Init(e)
        };
        // The reset restored the device's default CDB and sense sizes; the queues' slots are
        // laid out for the ones chosen at start-up.
        restore_sizes(&mut t, &self.config).map_err(fail)?;
        control.reinit(&mut t, &self.arena).map_err(fail)?;
        self.event
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reinit(&mut t, &self.arena)
            .map_err(fail)?;
        for q in &self.queues {
            q.reinit(&mut t, &self.arena, &reason).map_err(fail)?;
        }
        t.finish_init();
        log::info!("virtio-scsi device reset and set up again");
        Ok(())
    }

    /// After a configuration-change interrupt (ISR bit 1): a device that hit an error it
    /// cannot recover from sets DEVICE_NEEDS_RESET in its status and stops processing
    /// (virtio 1.2 §2.1.2). Waiting for each command in flight to time out and climb the
    /// TMF ladder would take seconds per command; reset now instead, which fails what was in
    /// flight (exactly once) and brings the queues back. A device that asks again and again
    /// (more than `MAX_NEEDS_RESET_RUN` times, each within `NEEDS_RESET_WINDOW` of the last)
    /// is given up on: the host goes down with a clear reason rather than resetting forever.
    fn check_needs_reset(&self) {
        if self.stop.load(Ordering::SeqCst) || self.health().is_err() {
            return;
        }
        let status = self
            .transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_status();
        if !status.contains(DeviceStatus::DEVICE_NEEDS_RESET) {
            log::info!("virtio-scsi configuration changed (status {status:?})");
            return;
        }
        let run = {
            let mut r = self
                .needs_reset_run
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            r.1 = match r.0 {
                Some(t) if now.duration_since(t) < NEEDS_RESET_WINDOW => r.1 + 1,
                _ => 1,
            };
            r.0 = Some(now);
            r.1
        };
        if run > MAX_NEEDS_RESET_RUN {
            let e = format!("the device asked for a reset {run} times in a row; giving up on it");
            log::error!("{e}");
            self.mark_down(&e);
            return;
        }
        if let Err(e) = self.reset_device("the device set DEVICE_NEEDS_RESET") {
            log::error!("device reset failed: {e}");
        }
    }

    /// Runs a command, retrying where the error says so (bounded, with backoff).
    pub fn execute(
        &self,
        lun: &[u8; 8],
        cdb: &[u8],
        mut data: Data<'_>,
    ) -> Result<Transferred, DriverError> {
        self.execute_on(&self.queues[0], lun, cdb, data.reborrow())
    }

    fn execute_on(
        &self,
        queue: &RequestQueue,
        lun: &[u8; 8],
        cdb: &[u8],
        mut data: Data<'_>,
    ) -> Result<Transferred, DriverError> {
        let mut attempt = 0;
        loop {
            self.health()?;
            match self.execute_once(queue, lun, cdb, data.reborrow()) {
                Err(e) if e.is_retryable() && attempt + 1 < MAX_ATTEMPTS => {
                    attempt += 1;
                    log::debug!("retrying ({attempt}) after: {e}");
                    std::thread::sleep(backoff(attempt, &e));
                }
                other => return other,
            }
        }
    }

    /// Reads whole blocks of `disk` starting at `lba` into `buf`.
    pub fn read(&self, disk: &Disk, lba: u64, buf: &mut [u8]) -> Result<(), DriverError> {
        self.block_io(disk, lba, BlockBuf::Read(buf))
    }

    /// Writes whole blocks of `disk` starting at `lba` from `buf`.
    pub fn write(&self, disk: &Disk, lba: u64, buf: &[u8]) -> Result<(), DriverError> {
        if disk.readonly {
            return Err(DriverError::ReadOnly);
        }
        self.block_io(disk, lba, BlockBuf::Write(buf))
    }

    /// Discards `blocks` blocks from `lba` (UNMAP or WRITE SAME(16) with UNMAP, whichever the
    /// disk offers; split to its limits). `Err(Invalid)` when the disk cannot discard. What
    /// discarded blocks read back as is the disk's business (`Disk::discard`, LBPRZ).
    pub fn discard(&self, disk: &Disk, lba: u64, blocks: u64) -> Result<(), DriverError> {
        if disk.readonly {
            return Err(DriverError::ReadOnly);
        }
        if blocks == 0 {
            return Ok(());
        }
        if lba.checked_add(blocks).is_none_or(|end| end > disk.blocks) {
            return Err(DriverError::Invalid(format!(
                "discard of blocks {lba}+{blocks} beyond the end of a {}-block disk",
                disk.blocks
            )));
        }
        let route = self.route(disk);
        let (max, unmap) = match disk.discard {
            crate::disk::Discard::None => {
                return Err(DriverError::Invalid("the disk cannot discard".into()));
            }
            crate::disk::Discard::Unmap { max_blocks } => (max_blocks, true),
            crate::disk::Discard::WriteSame { max_blocks } => (max_blocks, false),
        };
        let mut at = lba;
        let end = lba + blocks;
        while at < end {
            let n = (end - at).min(u64::from(max.max(1))) as u32;
            let bad = |e: scsi::CdbError| DriverError::Invalid(e.to_string());
            if unmap {
                let (cdb, list) =
                    scsi::unmap(&[scsi::UnmapRange { lba: at, blocks: n }]).map_err(bad)?;
                self.execute_on(
                    route.queue(),
                    &disk.lun_field,
                    cdb.as_slice(),
                    Data::Out(&list),
                )?;
            } else {
                let cdb = scsi::Cdb::write_same16(at, n, true, true).map_err(bad)?;
                self.execute_on(route.queue(), &disk.lun_field, cdb.as_slice(), Data::None)?;
            }
            at += u64::from(n);
        }
        Ok(())
    }

    /// Writes zeros to `blocks` blocks from `lba` with WRITE SAME(16): one zero block as data,
    /// no UNMAP bit, so the blocks read back as zeros and stay allocated. Split to the Block
    /// Limits' maximum WRITE SAME length and to `WRITE_SAME_MAX_BYTES` per command, so one
    /// command on a backend that really writes stays well inside the command timeout.
    /// `Err(Unsupported)` when the disk has no WRITE SAME (ILLEGAL REQUEST: invalid opcode or
    /// field in the CDB on the first command, or a block too large for a command slot); the
    /// caller then writes zeros as data. A unit that refused once is not asked again.
    pub fn write_zeroes(&self, disk: &Disk, lba: u64, blocks: u64) -> Result<(), DriverError> {
        if disk.readonly {
            return Err(DriverError::ReadOnly);
        }
        if blocks == 0 {
            return Ok(());
        }
        let end = lba
            .checked_add(blocks)
            .filter(|&e| e <= disk.blocks)
            .ok_or_else(|| {
                DriverError::Invalid(format!(
                    "write zeroes of blocks {lba}+{blocks} beyond the end of a {}-block disk",
                    disk.blocks
                ))
            })?;
        let unit = (disk.target, disk.lun);
        let refused = || self.no_write_same.lock().unwrap_or_else(|p| p.into_inner());
        if refused().contains(&unit) {
            return Err(DriverError::Unsupported("WRITE SAME".into()));
        }
        let bs = u64::from(disk.block_size.max(1));
        let limit = disk
            .block_limits
            .as_ref()
            .and_then(|l| l.max_write_same_length)
            .filter(|&n| n > 0)
            .unwrap_or(u64::MAX)
            .min(WRITE_SAME_MAX_BYTES / bs)
            .clamp(1, u64::from(u32::MAX));
        // One zero block: on the stack up to 4 KiB blocks (no allocation), else on the heap.
        let mut small = [0u8; 4096];
        let mut large = Vec::new();
        let zero: &[u8] = match small.get_mut(..disk.block_size as usize) {
            Some(b) => b,
            None => {
                large.resize(disk.block_size as usize, 0);
                &large
            }
        };
        let route = self.route(disk);
        let mut at = lba;
        while at < end {
            // At most `limit`, which fits in u32.
            let n = (end - at).min(limit) as u32;
            let cdb = scsi::Cdb::write_same16(at, n, false, false)
                .map_err(|e| DriverError::Invalid(e.to_string()))?;
            match self.execute_on(
                route.queue(),
                &disk.lun_field,
                cdb.as_slice(),
                Data::Out(zero),
            ) {
                Ok(_) => at += u64::from(n),
                Err(e) if at == lba && write_same_refused(&e) => {
                    log::info!(
                        "target {} lun {} has no WRITE SAME ({e}); zeros go as data from now on",
                        disk.target,
                        disk.lun
                    );
                    refused().push(unit);
                    return Err(DriverError::Unsupported(format!("WRITE SAME: {e}")));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// SYNCHRONIZE CACHE on the whole disk: every completed write is on the backend after.
    pub fn flush(&self, disk: &Disk) -> Result<(), DriverError> {
        let cdb = scsi::Cdb::synchronize_cache10();
        let route = self.route(disk);
        self.execute_on(route.queue(), &disk.lun_field, cdb.as_slice(), Data::None)
            .map(|_| ())
    }

    /// Splits a block request into commands and keeps several in flight at once. A buffer
    /// that lies in a registered DMA window (a client's arena) is used in place: no copy.
    fn block_io(&self, disk: &Disk, lba: u64, mut buf: BlockBuf<'_>) -> Result<(), DriverError> {
        let bs = disk.block_size as usize;
        let len = buf.len();
        if len == 0 || !len.is_multiple_of(bs) {
            return Err(DriverError::Invalid(format!(
                "{len} bytes is not a whole number of {bs}-byte blocks"
            )));
        }
        let blocks = (len / bs) as u64;
        if lba.checked_add(blocks).is_none_or(|end| end > disk.blocks) {
            return Err(DriverError::Invalid(format!(
                "blocks {lba}+{blocks} beyond the end of a {}-block disk",
                disk.blocks
            )));
        }
        let route = self.route(disk);
        let queue = route.queue();
        let zero_copy = hal::is_device_visible(buf.ptr(), len);
        let cap = if zero_copy {
            disk.max_transfer_bytes
        } else {
            disk.max_transfer_bytes.min(queue.data_cap())
        };
        let chunk = cap / bs * bs;
        if chunk == 0 {
            return Err(DriverError::Invalid(
                "block larger than a command slot".into(),
            ));
        }
        let is_write = matches!(buf, BlockBuf::Write(_));
        // Commands in flight, oldest first: (slot, byte offset, length). A fixed ring, so a
        // request allocates nothing.
        let mut ring: [Option<(SlotGuard<'_>, usize, usize)>; MAX_CHUNKS_IN_FLIGHT] =
            std::array::from_fn(|_| None);
        let (mut head, mut count) = (0usize, 0usize);
        let mut result = Ok(());
        let mut offset = 0;
        while offset < len || count > 0 {
            // Submit while there is work, room in the ring and a free slot.
            if offset < len && result.is_ok() && count < MAX_CHUNKS_IN_FLIGHT {
                let slot = if count == 0 {
                    Some(queue.acquire()?)
                } else {
                    queue.try_acquire()?
                };
                if let Some(mut slot) = slot {
                    let n = chunk.min(len - offset);
                    let at = lba + (offset / bs) as u64;
                    let cdb = rw_cdb(is_write, at, (n / bs) as u64)
                        .map_err(|e| DriverError::Invalid(e.to_string()))?;
                    let dir = if is_write { DataDir::Out } else { DataDir::In };
                    if zero_copy {
                        self.fill(&mut slot, &disk.lun_field, cdb.as_slice(), None);
                        let piece = buf.piece_mut(offset, n);
                        // SAFETY: `piece` is inside a registered DMA window (checked above),
                        // and the caller's buffer outlives this call, which does not return
                        // before every chunk's slot is waited for below (a timed-out slot is
                        // orphaned by its guard and the window memory stays mapped for the
                        // platform's lifetime, so a late device write cannot hit freed memory).
                        unsafe { slot.submit_external(dir, piece)? };
                    } else {
                        let out = match &buf {
                            BlockBuf::Read(_) => None,
                            BlockBuf::Write(b) => Some(&b[offset..offset + n]),
                        };
                        self.fill(&mut slot, &disk.lun_field, cdb.as_slice(), out);
                        slot.submit(dir, n)?;
                    }
                    ring[(head + count) % MAX_CHUNKS_IN_FLIGHT] = Some((slot, offset, n));
                    count += 1;
                    offset += n;
                    continue;
                }
            }
            // Complete the oldest command.
            let Some((mut slot, at, n)) = ring[head].take() else {
                break;
            };
            head = (head + 1) % MAX_CHUNKS_IN_FLIGHT;
            count -= 1;
            let data = match &mut buf {
                BlockBuf::Read(b) => Data::In(&mut b[at..at + n]),
                BlockBuf::Write(b) => Data::Out(&b[at..at + n]),
            };
            let first = self.finish_inner(&mut slot, data, !zero_copy);
            let piece = &mut buf;
            let data = move || {
                let piece = piece; // moved in: the closure runs once
                match piece {
                    BlockBuf::Read(b) => Data::In(&mut b[at..at + n]),
                    BlockBuf::Write(b) => Data::Out(&b[at..at + n]),
                }
            };
            let at_lba = lba + (at / bs) as u64;
            let outcome = self.settle(
                queue,
                &disk.lun_field,
                is_write,
                at_lba,
                n,
                first,
                slot,
                data,
                bs,
            );
            if let Err(e) = outcome
                && result.is_ok()
            {
                // Stop submitting; still reap what is in flight so no slot is abandoned.
                result = Err(e);
            }
        }
        result
    }

    /// Finds targets and LUNs and probes each LUN.
    fn scan(&self) -> Vec<Disk> {
        let max_target = self.config.max_target.min(self.cfg.max_scan_target);
        let mut disks = Vec::new();
        for target in 0..=max_target {
            let Ok(target) = u8::try_from(target) else {
                break;
            };
            let lun0 = wire::lun_field(target, 0);
            let mut inq = [0u8; 96];
            let cdb = scsi::Cdb::inquiry(inq.len() as u16);
            match self.execute(&lun0, cdb.as_slice(), Data::In(&mut inq)) {
                Ok(_) => {}
                Err(DriverError::Virtio(Response::BadTarget)) => continue,
                Err(e) => {
                    log::warn!("target {target}: INQUIRY failed: {e}");
                    if self.health().is_err() {
                        break;
                    }
                    continue;
                }
            }
            for lun in self.luns_of(target) {
                match Disk::probe(self, target, lun) {
                    Ok(Some(d)) => {
                        log::info!("disk {}: {d}", disks.len());
                        disks.push(d)
                    }
                    Ok(None) => {}
                    Err(e) => log::warn!("target {target} lun {lun}: {e}"),
                }
            }
        }
        disks
    }

    /// The LUNs of `target`: REPORT LUNS, or a scan of LUNs 0-7 when that fails.
    fn luns_of(&self, target: u8) -> Vec<u16> {
        let lun0 = wire::lun_field(target, 0);
        let mut buf = vec![0u8; 8 + 8 * 512];
        let Ok(cdb) = scsi::Cdb::report_luns(buf.len() as u32) else {
            return vec![0];
        };
        let max_lun = self.config.max_lun.min(0x3fff);
        match self.execute(&lun0, cdb.as_slice(), Data::In(&mut buf)) {
            Ok(Transferred(n)) => match scsi::ReportLuns::parse(&buf[..n]) {
                Ok(list) => {
                    let mut luns: Vec<u16> = list
                        .luns
                        .iter()
                        .filter_map(|l| l.number().ok())
                        .filter(|&l| u32::from(l) <= max_lun)
                        .collect();
                    luns.sort_unstable();
                    luns.dedup();
                    return luns;
                }
                Err(e) => log::warn!("target {target}: bad REPORT LUNS data: {e}"),
            },
            Err(e) => log::info!("target {target}: REPORT LUNS failed ({e}); scanning LUNs"),
        }
        (0..=max_lun.min(7) as u16).collect()
    }
}

impl Drop for ScsiHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A picked request queue as plain values (see [`ScsiHost::pick_route`]).
#[derive(Debug)]
#[must_use = "a picked route is ended with ScsiHost::end_route"]
pub(crate) struct RouteId {
    target: u8,
    queue: usize,
    /// Recorded in the live invariant check (ended with the route).
    tracked: bool,
}

impl RouteId {
    /// The request queue (index into `ScsiHost::queues`).
    pub(crate) fn queue(&self) -> usize {
        self.queue
    }
}

/// A picked request queue; ends the route on drop.
struct Route<'h> {
    host: &'h ScsiHost,
    id: RouteId,
}

impl Route<'_> {
    fn queue(&self) -> &RequestQueue {
        &self.host.queues[self.id.queue]
    }
}

impl Drop for Route<'_> {
    fn drop(&mut self) {
        let id = RouteId {
            target: self.id.target,
            queue: self.id.queue,
            tracked: self.id.tracked,
        };
        self.host.end_route(id);
    }
}

/// Counters of the request path, for `vscsi stats`.
#[derive(Clone, Debug)]
pub struct HostStats {
    /// Steering policy.
    pub policy: Policy,
    /// Per-target synchronisation.
    pub lock: LockKind,
    /// Commands submitted per request queue.
    pub submitted: Vec<u64>,
    /// Commands completed per request queue.
    pub completed: Vec<u64>,
    /// Notifications sent per request queue.
    pub kicks: Vec<u64>,
    /// Steering counters (seqcount read retries, changes per target).
    pub steering: SteeringStats,
    /// Whether the live invariant check runs.
    pub invariant_checked: bool,
    /// Violations the live check found.
    pub invariant_violations: u64,
    /// Commands that timed out.
    pub timeouts: u64,
    /// Completions collected by busy polling (`--poll-us`), not by the interrupt path.
    pub busy_polled: u64,
    /// Task management functions sent.
    pub tmfs: u64,
    /// Device resets.
    pub resets: u64,
}

impl std::fmt::Display for HostStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "steering {} lock {}", self.policy, self.lock)?;
        for i in 0..self.submitted.len() {
            writeln!(
                f,
                "queue {i} submitted {} completed {} kicks {}",
                self.submitted[i], self.completed[i], self.kicks[i]
            )?;
        }
        writeln!(f, "seqcount_read_retries {}", self.steering.seq_retries)?;
        writeln!(f, "seqcount_writer_kept {}", self.steering.writer_kept)?;
        for (t, n) in self.steering.changes_per_target.iter().enumerate() {
            if *n > 0 {
                writeln!(f, "target {t} steering_changes {n}")?;
            }
        }
        if self.invariant_checked {
            writeln!(f, "invariant_violations {}", self.invariant_violations)?;
        }
        writeln!(f, "command_timeouts {}", self.timeouts)?;
        writeln!(f, "busy_polled_completions {}", self.busy_polled)?;
        writeln!(f, "task_management_functions {}", self.tmfs)?;
        writeln!(f, "device_resets {}", self.resets)?;
        Ok(())
    }
}

enum BlockBuf<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl BlockBuf<'_> {
    fn len(&self) -> usize {
        match self {
            BlockBuf::Read(b) => b.len(),
            BlockBuf::Write(b) => b.len(),
        }
    }

    fn ptr(&self) -> *const u8 {
        match self {
            BlockBuf::Read(b) => b.as_ptr(),
            BlockBuf::Write(b) => b.as_ptr(),
        }
    }

    /// `n` bytes at `offset` as the device's data buffer. For a write the device only reads
    /// it; the `&mut` is what the virtqueue API takes for any device-accessed buffer.
    fn piece_mut(&mut self, offset: usize, n: usize) -> &mut [u8] {
        match self {
            BlockBuf::Read(b) => &mut b[offset..offset + n],
            // SAFETY: the write buffer is only read by the device (DataDir::Out puts it in a
            // device-readable descriptor); nothing writes through this pointer.
            BlockBuf::Write(b) => unsafe {
                std::slice::from_raw_parts_mut(b[offset..offset + n].as_ptr().cast_mut(), n)
            },
        }
    }
}

/// Whether a failed WRITE SAME says the disk does not have it (ILLEGAL REQUEST with INVALID
/// COMMAND OPERATION CODE or INVALID FIELD IN CDB), or the driver cannot send it (a block
/// larger than a command slot), rather than that this one command failed. The range was
/// checked against the disk first, so neither is about the range.
fn write_same_refused(e: &DriverError) -> bool {
    match e {
        DriverError::Scsi(s) => matches!(s.asc_ascq(), Some((0x20 | 0x24, 0x00))),
        DriverError::Invalid(_) => true,
        _ => false,
    }
}

pub(crate) fn rw_cdb(write: bool, lba: u64, blocks: u64) -> Result<scsi::Cdb, scsi::CdbError> {
    if write {
        scsi::Cdb::write(lba, blocks, false)
    } else {
        scsi::Cdb::read(lba, blocks, false)
    }
}

fn backoff(attempt: u32, e: &DriverError) -> Duration {
    let unit_attention = matches!(e, DriverError::Scsi(s) if s.is_unit_attention());
    if unit_attention {
        // The condition is cleared by reporting it: retry at once.
        return Duration::ZERO;
    }
    Duration::from_millis((1u64 << attempt.min(7)).min(100))
}

/// `Transport::read_consistent` with a bound: a device whose configuration generation never
/// settles is refused instead of hanging the driver.
fn read_consistent_bounded<T>(
    t: &PciTransport,
    f: impl Fn() -> Result<T, virtio_drivers::Error>,
) -> Result<T, virtio_drivers::Error> {
    for _ in 0..64 {
        let before = t.read_config_generation();
        let result = f();
        if t.read_config_generation() == before {
            return result;
        }
    }
    log::error!("the device's configuration generation never settles");
    Err(virtio_drivers::Error::IoError)
}

/// Writes back the CDB and sense sizes chosen at start-up if the device forgot them.
fn restore_sizes(t: &mut PciTransport, chosen: &ScsiConfig) -> Result<(), String> {
    use wire::cfg;
    let now = read_config(t).map_err(|e| e.to_string())?;
    if now.cdb_size == chosen.cdb_size && now.sense_size == chosen.sense_size {
        return Ok(());
    }
    t.write_config_space::<u32>(cfg::CDB_SIZE, chosen.cdb_size)
        .and_then(|()| t.write_config_space::<u32>(cfg::SENSE_SIZE, chosen.sense_size))
        .map_err(|e| format!("config: {e}"))?;
    let after = read_config(t).map_err(|e| e.to_string())?;
    if after.cdb_size != chosen.cdb_size || after.sense_size != chosen.sense_size {
        return Err(format!(
            "device will not take back cdb_size {} / sense_size {} after a reset",
            chosen.cdb_size, chosen.sense_size
        ));
    }
    Ok(())
}

/// Reads the device configuration consistently (generation counter) and fixes the sizes we
/// depend on if the device reports nonsense.
fn read_config(t: &mut PciTransport) -> Result<ScsiConfig, DriverError> {
    use wire::cfg;
    let read = |t: &PciTransport| -> Result<ScsiConfig, virtio_drivers::Error> {
        read_consistent_bounded(t, || {
            Ok(ScsiConfig {
                num_queues: t.read_config_space::<u32>(cfg::NUM_QUEUES)?,
                seg_max: t.read_config_space::<u32>(cfg::SEG_MAX)?,
                max_sectors: t.read_config_space::<u32>(cfg::MAX_SECTORS)?,
                cmd_per_lun: t.read_config_space::<u32>(cfg::CMD_PER_LUN)?,
                event_info_size: t.read_config_space::<u32>(cfg::EVENT_INFO_SIZE)?,
                sense_size: t.read_config_space::<u32>(cfg::SENSE_SIZE)?,
                cdb_size: t.read_config_space::<u32>(cfg::CDB_SIZE)?,
                max_channel: t.read_config_space::<u16>(cfg::MAX_CHANNEL)?,
                max_target: t.read_config_space::<u16>(cfg::MAX_TARGET)?,
                max_lun: t.read_config_space::<u32>(cfg::MAX_LUN)?,
            })
        })
    };
    let mut c = read(t).map_err(|e| DriverError::Init(format!("config: {e}")))?;
    // cdb_size and sense_size are driver-writable: insist on sizes we can use.
    if !(16..=wire::MAX_CDB_SIZE).contains(&c.cdb_size) {
        t.write_config_space::<u32>(cfg::CDB_SIZE, 32)
            .map_err(|e| DriverError::Init(format!("config: {e}")))?;
    }
    if !(18..=wire::MAX_SENSE_SIZE).contains(&c.sense_size) {
        t.write_config_space::<u32>(cfg::SENSE_SIZE, 96)
            .map_err(|e| DriverError::Init(format!("config: {e}")))?;
    }
    c = read(t).map_err(|e| DriverError::Init(format!("config: {e}")))?;
    if !(16..=wire::MAX_CDB_SIZE).contains(&c.cdb_size)
        || !(18..=wire::MAX_SENSE_SIZE).contains(&c.sense_size)
    {
        return Err(DriverError::Init(format!(
            "device insists on cdb_size {} / sense_size {}",
            c.cdb_size, c.sense_size
        )));
    }
    if c.seg_max == 0 {
        // One contiguous data segment per command is all we ever use.
        log::warn!("device reports seg_max 0; using 1 data segment per command");
    }
    Ok(c)
}

/// The event thread: acts on hotplug and parameter-change events.
fn event_loop(host: Weak<ScsiHost>, rx: std::sync::mpsc::Receiver<Event>) {
    while let Ok(e) = rx.recv() {
        let Some(h) = host.upgrade() else { return };
        if h.stop.load(Ordering::SeqCst) {
            return;
        }
        h.handle_event(e);
    }
}

/// The completion thread: sleep until the interrupt line is asserted, acknowledge it at the
/// device (ISR read, which deasserts it), then drain every request queue.
impl ScsiHost {
    /// Whether the device holds commands on any request queue now.
    fn device_busy(&self) -> bool {
        self.queues.iter().any(|q| q.in_flight() > 0)
    }

    /// Busy-polls the request queues while the device holds commands (see
    /// `HostConfig::poll`). Returns what it drained, and whether it stopped only because its
    /// slice (`POLL_SLICE`) ended while completions kept coming (then the caller just checks
    /// the interrupt line and polls again); otherwise it stopped because nothing is in flight
    /// or nothing completed for `poll`, and the caller sleeps on the interrupt.
    ///
    /// Interrupts of the request queues are off only inside this call, and every exit turns
    /// them on and drains once more, so a completion that slipped in between is not missed.
    ///
    /// Not while an owner busy-polls (`begin_busy_poll`): its polls answer every queue's
    /// commands, blocking waiters' included, and one spinning thread is enough.
    fn poll_busy(&self) -> (usize, bool) {
        let budget = self.cfg.poll;
        if budget.is_zero() || !self.device_busy() || self.owners_polling() {
            return (0, false);
        }
        self.begin_busy_poll();
        let started = Instant::now();
        let mut last = started;
        let mut work = 0;
        let mut spins = 0u32;
        let slice_ended = loop {
            if self.stop.load(Ordering::Relaxed) {
                break false;
            }
            let n = self.busy_poll();
            if n > 0 {
                work += n;
                last = Instant::now();
                self.epoch.bump();
                if last.duration_since(started) >= POLL_SLICE {
                    break true;
                }
                continue;
            }
            spins = spins.wrapping_add(1);
            // The clock only now and then: where it is not the TSC (hpet in many guests) each
            // reading is a system call and an emulated device access.
            if spins.is_multiple_of(CLOCK_EVERY)
                && (!self.device_busy() || last.elapsed() >= budget)
            {
                break false;
            }
            if spins.is_multiple_of(64 * CLOCK_EVERY) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        };
        work += self.end_busy_poll();
        (work, slice_ended)
    }

    /// Whether a thread other than the completion thread busy-polls now.
    fn owners_polling(&self) -> bool {
        *self.pollers.lock().unwrap_or_else(|p| p.into_inner()) > 0
    }

    /// Starts busy polling by the calling thread (e.g. a server's poller waiting for its
    /// split-phase commands, [`crate::AsyncIo`]): the request queues stop interrupting for
    /// completions until the last poller calls [`ScsiHost::end_busy_poll`]. Until then the
    /// caller must call [`ScsiHost::busy_poll`] continually (every queue's completions,
    /// blocking waiters' included, are answered only by polls and by the completion thread's
    /// periodic wake-up); each `begin` needs exactly one `end`.
    pub fn begin_busy_poll(&self) {
        let mut n = self.pollers.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        if *n == 1 {
            for q in &self.queues {
                q.set_interrupts(false);
            }
        }
    }

    /// Collects every completion the device has posted on the request queues now, answering
    /// their commands (waking blocked waiters, calling wakers) as the completion thread does.
    /// Returns how many. Never blocks on the device; cheap when nothing came (a look at each
    /// used index under its queue's lock).
    pub fn busy_poll(&self) -> usize {
        let n = self.queues.iter().map(RequestQueue::drain).sum();
        if n > 0 {
            self.busy_polled.fetch_add(n as u64, Ordering::Relaxed);
        }
        n
    }

    /// Ends a [`ScsiHost::begin_busy_poll`]. The last poller turns the interrupts back on and
    /// then drains once more (a completion posted while they were off raised none). Returns
    /// what that drain collected.
    pub fn end_busy_poll(&self) -> usize {
        let mut n = self.pollers.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        if *n > 0 {
            return 0;
        }
        for q in &self.queues {
            q.set_interrupts(true);
        }
        drop(n);
        // The flag stores before the used-index loads of the drain (the device orders its
        // used-index store before its flag load the same way), or a completion could slip
        // between the two sides unseen.
        std::sync::atomic::fence(Ordering::SeqCst);
        self.busy_poll()
    }
}

/// Busy-poll loops read the clock once per this many empty spins.
const CLOCK_EVERY: u32 = 32;

fn completion_loop(host: Weak<ScsiHost>) {
    // Interrupts in a row that brought nothing (ISR 0, no used entries): a line stuck high
    // must not turn this thread into a busy loop.
    let mut spurious = 0u32;
    // Commands completed on all request queues as of the previous pass.
    let mut seen_completed = 0u64;
    loop {
        let Some(h) = host.upgrade() else { return };
        if h.stop.load(Ordering::SeqCst) {
            return;
        }
        let (polled, keep_polling) = h.poll_busy();
        let wait = if keep_polling {
            Duration::ZERO
        } else {
            IDLE_WAKE
        };
        let woke = h.platform.wait_irq(Some(wait));
        let res = match woke {
            Ok(IrqWait::Asserted) => h.isr.read().map(|isr| Some(isr.bits())),
            Ok(IrqWait::TimedOut) => Ok(None),
            Err(e) => Err(e),
        };
        let isr = match res {
            Ok(isr) => isr,
            Err(e) => {
                log::error!("machine failed: {e}");
                h.mark_down(&e.to_string());
                return;
            }
        };
        let mut work = polled;
        for q in &h.queues {
            work += q.drain();
        }
        // ISR bit 1: the device's configuration or status changed (it may need a reset).
        if isr.is_some_and(|bits| bits & 2 != 0) {
            work += 1;
            h.check_needs_reset();
        }
        h.epoch.bump();
        let events = h.event.lock().unwrap_or_else(|p| p.into_inner()).drain();
        work += events.len();
        if !events.is_empty()
            && let Some(tx) = h
                .events_tx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
        {
            for e in events {
                let _ = tx.send(e);
            }
        }
        // A queue the device broke (an answer that made no sense) is not trusted to have
        // stopped using its buffers: reset the device, which stops all DMA and restores the
        // queues. Not when the host is going down.
        let broken = h.queues.iter().any(RequestQueue::is_broken)
            || h.event
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_broken()
            || h.control
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_broken();
        if broken
            && !h.stop.load(Ordering::SeqCst)
            && h.health().is_ok()
            && let Err(e) = h.reset_device("a queue received a nonsensical answer")
        {
            log::error!("device reset failed: {e}");
        }
        // An interrupt that brought nothing: spurious, or a line stuck high (the ISR read
        // did not lower it). Back off, 1 ms, 2 ms, ... up to IDLE_WAKE, so a stuck line
        // costs a few wake-ups a second instead of a busy CPU. Real work resets it.
        // (Entries a polling owner drained since the last pass, `AsyncIo::poll`, explain an
        // interrupt too: only an interrupt with nothing done by anyone counts.)
        let completed: u64 = h
            .queues
            .iter()
            .map(|q| q.stats.completed.load(Ordering::Relaxed))
            .sum();
        let drained_elsewhere = std::mem::replace(&mut seen_completed, completed) != completed;
        if isr.is_some() && work == 0 && !drained_elsewhere {
            spurious = spurious.saturating_add(1);
            if spurious == 64 {
                log::warn!("interrupt line asserted with nothing to do; backing off");
            }
            // The first few in a row are normal (an interrupt for entries an earlier pass
            // already drained); only a run of them means a stuck line.
            if spurious > 8 {
                let pause = Duration::from_millis(1u64 << (spurious - 8).min(8)).min(IDLE_WAKE);
                drop(h);
                std::thread::sleep(pause);
            }
        } else {
            spurious = 0;
        }
    }
}
