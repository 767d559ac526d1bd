//! virtio-rng (entropy device): fills the guest's buffers straight from the
//! kernel's random source with `readv` on `/dev/urandom`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::counters::DeviceCounters;
use crate::device::{ActivateError, VirtioDevice, COMMON_FEATURES};
use crate::threads::{QueueWorker, Wait};
use crate::queue::{QueueCtx, Stopped};
use crate::sys;

pub const VIRTIO_ID_RNG: u32 = 4;
const QUEUE_SIZE: u16 = 256;

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
    counters: Arc<DeviceCounters>,
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
            counters: DeviceCounters::new(1),
        })
    }
}

impl VirtioDevice for Rng {
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
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, _features: u64) -> Result<Vec<Box<dyn QueueWorker>>, ActivateError> {
        Ok(vec![Box::new(RequestQueue { source: self.source.clone(), limiter: self.limiter.clone() })])
    }
    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }
}

struct RequestQueue {
    source: Arc<File>,
    limiter: Option<Arc<Mutex<TokenBucket>>>,
}

impl QueueWorker for RequestQueue {
    fn serve(&mut self, q: &mut QueueCtx) -> Result<Wait, Stopped> {
        while let Some(mut chain) = q.pop() {
            if chain.writable.is_empty() {
                q.fail_chain(chain.head, "rng request has no device-writable buffer");
                continue;
            }
            let mut want = chain.writable.len().min(MAX_BYTES_PER_REQUEST);
            if let Some(l) = &self.limiter {
                want = take_tokens(l, want, q)?;
            }
            chain.writable.truncate(want);
            let n = loop {
                match sys::readv(self.source.as_raw_fd(), &chain.writable) {
                    Ok(n) => break n,
                    Err(e) if q.retry_after(&e)? => continue,
                    Err(e) => {
                        q.count_error(&format!("entropy source read failed: {e}"));
                        break 0;
                    }
                }
            };
            q.add_bytes(n as u64);
            q.add_used(chain.head, n as u32);
        }
        Ok(Wait::Kick)
    }
}

/// Waits until at least one byte may be served; returns how many.
fn take_tokens(l: &Mutex<TokenBucket>, want: u64, q: &mut QueueCtx) -> Result<u64, Stopped> {
    loop {
        let wait = {
            let mut b = l.lock().unwrap_or_else(|e| e.into_inner());
            match b.take(want) {
                Ok(n) => return Ok(n),
                Err(wait) => wait,
            }
        };
        // Report what is done before sleeping, as before any sleep.
        q.notify();
        sys::pause(wait);
        q.check_stop()?;
    }
}

/// A token bucket: `rate` bytes per second, bursts up to one second's worth.
pub struct TokenBucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u64) -> Self {
        let rate = rate.max(1);
        TokenBucket { rate, tokens: rate as f64, last: Instant::now() }
    }

    /// Takes up to `want` tokens; if none are left, says how long to wait.
    pub fn take(&mut self, want: u64) -> Result<u64, Duration> {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.rate as f64);
        if self.tokens >= 1.0 {
            let n = want.min(self.tokens as u64);
            self.tokens -= n as f64;
            Ok(n)
        } else {
            Err(Duration::from_secs_f64(((1.0 - self.tokens) / self.rate as f64).max(0.0005)))
        }
    }
}
