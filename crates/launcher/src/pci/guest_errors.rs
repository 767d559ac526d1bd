//! Guest mistakes the virtio-pci transport sees, counted per device and
//! per kind, and logged through a [`Throttle`] each.
//!
//! A guest can repeat any of them as fast as a vCPU runs — 10 000 refused
//! FEATURES_OK writes take well under a second — so none may cost a log
//! line each. Each kind has its own throttle, so that a flood of one kind
//! does not hide the first occurrences of another; every occurrence also
//! counts in the device's [`DeviceState::transport_errors`], the total
//! the device's other users (queue threads, statistics) see.

use std::fmt;

use kickvm_virtio::ratelimit::Throttle;
use kickvm_virtio::DeviceState;

/// One device's throttles, one per kind of transport-level guest mistake.
#[derive(Debug, Default)]
pub struct TransportErrors {
    /// FEATURES_OK refused: features not offered, or no VERSION_1.
    pub features_refused: Throttle,
    /// BAR0 placed (memory decoding on) where the MMIO bus has something.
    pub bar_misplaced: Throttle,
    /// KVM refused to bind or unbind a queue's notify address.
    pub notify_unbound: Throttle,
    /// DRIVER_OK with queues that cannot start (rings outside memory, ...).
    pub start_failed: Throttle,
}

/// What a device's guest got wrong so far, for the exit report and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestErrorCounts {
    pub features_refused: u64,
    pub bar_misplaced: u64,
    pub notify_unbound: u64,
    pub start_failed: u64,
    /// All transport-level mistakes (`DeviceState::transport_errors`).
    pub transport_errors: u64,
    /// Bad chains and requests seen by the queue threads, all queues.
    pub queue_errors: u64,
    /// DEVICE_NEEDS_RESET is set now.
    pub needs_reset: bool,
}

impl GuestErrorCounts {
    pub fn of(errors: &TransportErrors, counters: &DeviceState) -> Self {
        GuestErrorCounts {
            features_refused: errors.features_refused.count(),
            bar_misplaced: errors.bar_misplaced.count(),
            notify_unbound: errors.notify_unbound.count(),
            start_failed: errors.start_failed.count(),
            transport_errors: counters.transport_errors.count(),
            queue_errors: counters.total().errors,
            needs_reset: counters.needs_reset.load(std::sync::atomic::Ordering::SeqCst),
        }
    }

    /// True when the guest made no mistake this device saw.
    pub fn is_clean(&self) -> bool {
        *self == GuestErrorCounts::default()
    }
}

/// `queue errors 3, features refused 10000, needs reset`: the non-zero
/// counts only.
impl fmt::Display for GuestErrorCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counts = [
            ("queue errors", self.queue_errors),
            ("transport errors", self.transport_errors),
            ("features refused", self.features_refused),
            ("BAR misplaced", self.bar_misplaced),
            ("notify not bound", self.notify_unbound),
            ("start failed", self.start_failed),
        ];
        let mut parts: Vec<String> =
            counts.iter().filter(|(_, n)| *n > 0).map(|(what, n)| format!("{what} {n}")).collect();
        if self.needs_reset {
            parts.push("needs reset".into());
        }
        if parts.is_empty() {
            parts.push("none".into());
        }
        f.write_str(&parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_non_zero_counts_are_shown() {
        let e = TransportErrors::default();
        let c = DeviceState::new(1);
        assert!(GuestErrorCounts::of(&e, &c).is_clean());
        assert_eq!(GuestErrorCounts::of(&e, &c).to_string(), "none");
        e.features_refused.hit();
        c.transport_errors.hit();
        c.needs_reset.store(true, std::sync::atomic::Ordering::SeqCst);
        let g = GuestErrorCounts::of(&e, &c);
        assert_eq!(g.to_string(), "transport errors 1, features refused 1, needs reset");
    }
}
