//! The request queue's worker: each chain's device-writable buffers are
//! filled straight from the entropy source with one `readv`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use super::backend::TokenBucket;
use super::MAX_BYTES_PER_REQUEST;
use crate::queue::{QueueCtx, Stopped};
use crate::sys;
use crate::threads::{QueueWorker, Wait};

pub(super) struct RequestQueue {
    pub source: Arc<File>,
    pub limiter: Option<Arc<Mutex<TokenBucket>>>,
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

