//! VM-wide throttles for log lines a guest can cause that belong to no
//! single virtio device (those count in [`crate::pci::guest_errors`]).
//!
//! Each is a process-wide [`Throttle`]: every occurrence is counted, the
//! first few are logged, then only the 16th, 32nd, 64th, … — so neither a
//! guest hammering a register nor one rebooting in a loop can flood the
//! host's log. Counts run over the life of the process (across reboots)
//! and [`report`] logs the non-zero ones when a VM ends.

use kickvm_virtio::ratelimit::Throttle;

/// KVM refused an MSI route or irqfd for a vector the guest programmed.
pub static MSIX_ROUTING: Throttle = Throttle::new();
/// A VM whose serial output could not be written (stdout closed, full).
pub static SERIAL_OUTPUT: Throttle = Throttle::new();
/// Triple faults (the guest resets by crashing its CPU).
pub static TRIPLE_FAULTS: Throttle = Throttle::new();
/// VMs built: one per boot. The set-up lines of a boot (timings, memory,
/// MSRs) are logged when this says so — a guest that reboots in a loop
/// would otherwise repeat them at every boot.
pub static BOOTS: Throttle = Throttle::new();
/// A vCPU thread that panicked while it answered a guest access.
pub static VCPU_PANICS: Throttle = Throttle::new();

/// The guest-caused VM-wide counts, `name count` each, non-zero only.
pub fn summary() -> Option<String> {
    let counts = [
        ("MSI-X routing failures", MSIX_ROUTING.count()),
        ("boots with serial output lost", SERIAL_OUTPUT.count()),
        ("triple faults", TRIPLE_FAULTS.count()),
        ("vCPU thread panics", VCPU_PANICS.count()),
    ];
    let parts: Vec<String> = counts.iter().filter(|(_, n)| *n > 0).map(|(w, n)| format!("{w} {n}")).collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// Logs [`summary`] at info level, if there is anything to say.
pub fn report() {
    if let Some(s) = summary() {
        log::info!("guest platform errors since start: {s}");
    }
}
