//! virtio-console (the guest's `hvc0`): port 0's receive queue is filled
//! from an input fd, its transmit queue is written to an output fd, both
//! straight from/into guest buffers.
//!
//! Backends: the launcher's stdin/stdout (in raw mode while the device
//! lives, always restored), a pseudo-terminal, a unix socket (one client at
//! a time), or an output file.

mod backend;
mod rx;
mod tx;

pub use backend::{Backend, ConsoleBackend};

use std::sync::Arc;

use crate::counters::DeviceState;
use crate::device::{ActivateError, VirtioDevice, COMMON_FEATURES};
use crate::threads::QueueWorker;
use rx::Receive;
use tx::Transmit;

pub use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
const QUEUE_SIZE: u16 = 256;

/// System calls the queues make beyond a queue thread's own
/// (`seccomp::QUEUE_THREAD`): input and output, and taking the next client
/// of a socket console.
pub const SYSCALLS: &[i64] = &[libc::SYS_readv, libc::SYS_writev, libc::SYS_preadv2, libc::SYS_accept4, libc::SYS_accept];
/// The receive queue's index (port 0's receiveq).
pub(crate) const RX: usize = 0;

/// Output written per chain at most: the guest controls the chain length.
pub(crate) const MAX_TX_BYTES: u64 = 1 << 20;

pub struct Console {
    name: String,
    backend: Arc<ConsoleBackend>,
    counters: Arc<DeviceState>,
}

impl Console {
    pub fn new(name: &str, backend: Backend) -> std::io::Result<Console> {
        Ok(Console {
            name: name.to_string(),
            backend: Arc::new(ConsoleBackend::open(backend)?),
            counters: DeviceState::new(2),
        })
    }

    /// The pseudo-terminal's path (`/dev/pts/N`) for the `Pty` backend.
    pub fn pty_path(&self) -> Option<&std::path::Path> {
        self.backend.pty_path()
    }
}

impl VirtioDevice for Console {
    fn syscalls(&self) -> &'static [i64] {
        SYSCALLS
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2]
    }
    fn features(&self) -> u64 {
        COMMON_FEATURES
    }
    fn activate(&mut self, _features: u64) -> Result<Vec<Box<dyn QueueWorker>>, ActivateError> {
        Ok(vec![
            Box::new(Receive { backend: self.backend.clone(), closed: false }),
            Box::new(Transmit { backend: self.backend.clone(), fault: Default::default() }),
        ])
    }
    fn state(&self) -> Arc<DeviceState> {
        self.counters.clone()
    }
}

