//! virtio-rng (entropy device): fills the guest's buffers straight from the
//! kernel's random source with `readv` on `/dev/urandom`.

mod backend;
mod requestq;

pub use backend::TokenBucket;

use std::fs::File;
use std::sync::{Arc, Mutex};

use crate::counters::DeviceState;
use crate::device::{ActivateError, VirtioDevice, COMMON_FEATURES};
use crate::threads::QueueWorker;
use requestq::RequestQueue;

pub use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
const QUEUE_SIZE: u16 = 256;

/// System calls the request queue makes beyond a queue thread's own
/// (`seccomp::QUEUE_THREAD`): reading the entropy source.
pub const SYSCALLS: &[i64] = &[libc::SYS_readv];

/// Bytes served per request at most. A chain's writable length is
/// guest-controlled (overlapping descriptors can claim far more than the
/// guest has); Linux asks for at most a page-sized buffer anyway.
pub const MAX_BYTES_PER_REQUEST: u64 = 64 * 1024;

/// Options for the rng device.
#[derive(Debug, Clone, Default)]
pub struct RngConfig {
    /// Source of randomness (default `/dev/urandom`).
    pub source: Option<std::path::PathBuf>,
    /// Cap on bytes per second served to the guest (`None`: unlimited).
    pub rate_limit: Option<u64>,
}

pub struct Rng {
    name: String,
    source: Arc<File>,
    limiter: Option<Arc<Mutex<TokenBucket>>>,
    counters: Arc<DeviceState>,
}

impl Rng {
    pub fn new(name: &str, cfg: RngConfig) -> std::io::Result<Rng> {
        let path = cfg.source.unwrap_or_else(|| "/dev/urandom".into());
        let source = File::open(&path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot open entropy source {}: {e}", path.display()))
        })?;
        Ok(Rng {
            name: name.to_string(),
            source: Arc::new(source),
            limiter: cfg.rate_limit.map(|r| Arc::new(Mutex::new(TokenBucket::new(r)))),
            counters: DeviceState::new(1),
        })
    }
}

impl VirtioDevice for Rng {
    fn syscalls(&self) -> &'static [i64] {
        SYSCALLS
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        COMMON_FEATURES
    }
    fn activate(&mut self, _features: u64) -> Result<Vec<Box<dyn QueueWorker>>, ActivateError> {
        Ok(vec![Box::new(RequestQueue { source: self.source.clone(), limiter: self.limiter.clone() })])
    }
    fn state(&self) -> Arc<DeviceState> {
        self.counters.clone()
    }
}

