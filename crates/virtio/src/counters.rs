//! Per-queue counters, readable by the embedding program at any time.
//!
//! virtio has no way to return an error code to the guest for most faults,
//! so, as in vhost, errors are counted here (and logged once in a while).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Counters of one virtqueue. Only its queue thread writes them.
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Guest notifications received (summed eventfd counts).
    pub kicks: AtomicU64,
    /// Descriptor chains completed (returned on the used ring).
    pub chains: AtomicU64,
    /// Bytes moved between guest memory and the backend.
    pub bytes: AtomicU64,
    /// Interrupts raised (call eventfd writes).
    pub interrupts: AtomicU64,
    /// Times the queue had used buffers to report but the guest had asked
    /// not to be interrupted (EVENT_IDX / NO_INTERRUPT).
    pub suppressed: AtomicU64,
    /// Malformed chains, bad rings and backend I/O errors.
    pub errors: AtomicU64,
    /// Times polling the avail ring before sleeping found a request: a
    /// thread wake-up (and the guest's kick) saved.
    pub polled: AtomicU64,
}

/// A copy of [`QueueCounters`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueCountersSnapshot {
    pub kicks: u64,
    pub chains: u64,
    pub bytes: u64,
    pub interrupts: u64,
    pub suppressed: u64,
    pub errors: u64,
    pub polled: u64,
}

impl QueueCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn snapshot(&self) -> QueueCountersSnapshot {
        QueueCountersSnapshot {
            kicks: self.kicks.load(Relaxed),
            chains: self.chains.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            interrupts: self.interrupts.load(Relaxed),
            suppressed: self.suppressed.load(Relaxed),
            errors: self.errors.load(Relaxed),
            polled: self.polled.load(Relaxed),
        }
    }
}

/// What a device reports about itself, readable at any time: one
/// [`QueueCounters`] per queue, its transport's error count, and its
/// DEVICE_NEEDS_RESET status bit.
#[derive(Debug)]
pub struct DeviceState {
    pub queues: Vec<Arc<QueueCounters>>,
    /// DEVICE_NEEDS_RESET: the device has stopped serving (a corrupt ring,
    /// a worker's panic, a failed start) until the driver resets it. A
    /// status bit, set by the device, cleared by a reset.
    pub needs_reset: AtomicBool,
    /// Guest mistakes seen by the transport rather than a queue (a refused
    /// FEATURES_OK, DRIVER_OK with rings outside memory, a BAR placed
    /// where it cannot go): counted, and logged through this throttle.
    pub transport_errors: crate::ratelimit::Throttle,
    /// How the device's queue threads poll before they sleep (`poll=`):
    /// set before the device is activated, read at each activation.
    pub poll: std::sync::Mutex<crate::poll::Poll>,
}

impl DeviceState {
    pub fn new(num_queues: usize) -> Arc<Self> {
        Arc::new(DeviceState {
            queues: (0..num_queues).map(|_| Arc::default()).collect(),
            needs_reset: AtomicBool::new(false),
            transport_errors: crate::ratelimit::Throttle::new(),
            poll: std::sync::Mutex::default(),
        })
    }

    /// Sets how the device's queue threads poll from its next activation.
    pub fn set_poll(&self, poll: crate::poll::Poll) {
        *self.poll.lock().unwrap_or_else(|e| e.into_inner()) = poll;
    }

    /// How the device's queue threads poll.
    pub fn poll(&self) -> crate::poll::Poll {
        *self.poll.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn queue(&self, index: usize) -> QueueCountersSnapshot {
        self.queues.get(index).map(|q| q.snapshot()).unwrap_or_default()
    }

    /// Sum over all queues.
    pub fn total(&self) -> QueueCountersSnapshot {
        let mut t = QueueCountersSnapshot::default();
        for q in &self.queues {
            let s = q.snapshot();
            t.kicks += s.kicks;
            t.chains += s.chains;
            t.bytes += s.bytes;
            t.interrupts += s.interrupts;
            t.suppressed += s.suppressed;
            t.errors += s.errors;
            t.polled += s.polled;
        }
        t
    }
}
