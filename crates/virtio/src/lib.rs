//! kickvm's virtio device servers.
//!
//! Every virtqueue is served by its own thread (see [`threads`]). The thread
//! sleeps on the queue's *kick* eventfd (which the guest's notification
//! signals), moves data straight between the backend and guest memory, and
//! raises the guest's interrupt itself through the queue's *call* eventfd —
//! only when the guest asked for it and only when the thread is about to
//! sleep.
//!
//! This crate knows nothing about KVM or sockets. A transport (the
//! launcher's virtio-pci, a vhost-user back-end, or the test [`driver`])
//! negotiates features, lays out the rings, and hands each queue to
//! [`activate`] together with its kick and call eventfds.
//!
//! Where a kick goes:
//! 1. the transport turns a guest notification into a kick eventfd write
//!    (a KVM ioeventfd in the launcher);
//! 2. [`threads`] wakes the one thread serving that queue and runs the
//!    device's [`QueueWorker`];
//! 3. the device (`net`, `block`, `console`, `rng`) pops chains with
//!    [`queue::QueueCtx::pop`], does the I/O on iovecs that point into
//!    guest memory, and returns them with [`queue::QueueCtx::add_used`].

/// `eprintln!` that does not panic when stderr is gone (a closed pipe, a
/// full disk): for the launcher's and back-ends' own messages. A message
/// nobody can read is no reason to crash, and a panic would replace the
/// exit status a supervisor waits for (`--no-reboot`'s 3 and 4 among them)
/// with 101.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod backend_fault;
pub mod block;
pub mod chain;
pub mod console;
pub mod counters;
pub mod device;
#[cfg(feature = "test-driver")]
pub mod driver;
pub mod inline;
pub mod memory;
pub mod net;
pub mod options;
pub mod poll;
pub mod queue;
pub mod ratelimit;
pub mod rng;
pub mod seccomp;
pub mod sys;
pub mod terminal;
pub mod threads;
pub mod vsock;

pub use counters::{DeviceState, QueueCounters, QueueCountersSnapshot};
pub use device::{activate, ActivateError, ActiveDevice, ExternalQueues, VirtioDevice};
pub use memory::GuestMemory;
pub use queue::{DeviceEvents, QueueCtx, QueueSetup, QueueState, Stopped};
pub use threads::{QueueWorker, Runtime, ThreadingMode, Wait};
