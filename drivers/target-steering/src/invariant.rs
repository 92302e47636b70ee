//! Checking the steering invariant — "while requests of a target are in flight, every pick for
//! that target returns the queue the others are on" — on live traffic: the violation type and
//! `Tracker`, an independent mutex-protected record of (target → queue, requests in flight).

use std::fmt;

use crate::sync::Mutex;
use crate::{Picked, Steering};

/// Two requests of one target in flight at the same time on different queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvariantViolation {
    /// The SCSI target.
    pub target: u8,
    /// The queue the target's other in-flight requests are on.
    pub in_flight_queue: usize,
    /// The queue the offending pick returned.
    pub picked_queue: usize,
    /// How many other requests of the target were in flight (0 when not known, as for
    /// `Steering::check_invariant`).
    pub in_flight: usize,
}

impl fmt::Display for InvariantViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "steering invariant violated: target {} picked queue {} while its in-flight requests \
             ({}) are on queue {}",
            self.target,
            self.picked_queue,
            if self.in_flight == 0 {
                "some".to_string()
            } else {
                self.in_flight.to_string()
            },
            self.in_flight_queue
        )
    }
}

impl std::error::Error for InvariantViolation {}

/// An independent record of which queue each target's in-flight requests are on, for tests and
/// stress runs (the driver's QEMU stress test wraps its picks with it).
///
/// Call [`Tracker::begin`] after a pick returns and [`Tracker::end`] before the request is
/// completed (or use [`Tracker::pick`], whose guard does both in that order). The tracked
/// window then lies inside the steering window, so the tracker can miss an overlap but never
/// invent one: a panic is always a real violation.
///
/// Only meaningful for `Policy::PerTarget` and `Policy::Single`: `Policy::PerCpu` spreads one
/// target's requests over queues by design.
pub struct Tracker {
    /// Indexed by target: (queue, requests in flight).
    slots: Mutex<Vec<(usize, usize)>>,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker").finish_non_exhaustive()
    }
}

impl Tracker {
    /// An empty record (no request in flight).
    pub fn new() -> Tracker {
        Tracker {
            slots: Mutex::new(vec![(0, 0); 256]),
        }
    }

    /// Records that a request of `target` is now in flight on `queue`, or reports that others
    /// of the target are in flight on a different queue (then nothing is recorded).
    pub fn try_begin(&self, target: u8, queue: usize) -> Result<(), InvariantViolation> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut slots[usize::from(target)];
        if slot.1 > 0 && slot.0 != queue {
            return Err(InvariantViolation {
                target,
                in_flight_queue: slot.0,
                picked_queue: queue,
                in_flight: slot.1,
            });
        }
        *slot = (queue, slot.1 + 1);
        Ok(())
    }

    /// Like [`Tracker::try_begin`], but panics on a violation.
    #[track_caller]
    pub fn begin(&self, target: u8, queue: usize) {
        if let Err(violation) = self.try_begin(target, queue) {
            panic!("{violation}");
        }
    }

    /// Records that one request of `target` is no longer in flight.
    #[track_caller]
    pub fn end(&self, target: u8) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut slots[usize::from(target)];
        let in_flight = slot.1;
        if in_flight > 0 {
            slot.1 -= 1;
        }
        drop(slots);
        assert!(in_flight > 0, "Tracker::end({target}) without a begin");
    }

    /// Requests of `target` recorded as in flight.
    pub fn in_flight(&self, target: u8) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())[usize::from(target)].1
    }

    /// Picks through `steering` and records the pick; panics on a violation. Dropping the
    /// guard ends the record, then completes the request.
    #[track_caller]
    pub fn pick<'a>(&'a self, steering: &'a Steering, target: u8, cpu: usize) -> Tracked<'a> {
        let picked = steering.pick(target, cpu);
        self.begin(target, picked.queue());
        Tracked {
            tracker: self,
            picked,
        }
    }
}

/// A tracked in-flight request: see [`Tracker::pick`].
#[must_use = "dropping the guard completes the request at once"]
#[derive(Debug)]
pub struct Tracked<'a> {
    tracker: &'a Tracker,
    picked: Picked<'a>,
}

impl Tracked<'_> {
    /// The request queue the request was steered to.
    pub fn queue(&self) -> usize {
        self.picked.queue()
    }

    /// The underlying steering guard.
    pub fn picked(&self) -> &Picked<'_> {
        &self.picked
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        // End the record first; `picked` is dropped (and completes) after this body.
        self.tracker.end(self.picked.target());
    }
}
