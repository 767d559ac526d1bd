//! The transmit queue: the guest's output goes straight from its buffers
//! to the output fd.

use std::os::fd::RawFd;
use std::sync::Arc;

use super::backend::ConsoleBackend;
use super::MAX_TX_BYTES;
use crate::memory::GuestIovecs;
use crate::queue::{QueueCtx, Stopped};
use crate::sys;
use crate::threads::{QueueWorker, Wait};

/// transmitq: the guest's output goes straight to the output fd.
pub(super) struct Transmit {
    pub backend: Arc<ConsoleBackend>,
}

impl QueueWorker for Transmit {
    fn serve(&mut self, q: &mut QueueCtx) -> Result<Wait, Stopped> {
        while let Some(mut chain) = q.pop() {
            if !chain.writable.is_empty() {
                q.fail_chain(chain.head, "console output buffer is device-writable");
                continue;
            }
            chain.readable.truncate(MAX_TX_BYTES);
            let len = chain.readable.len();
            if let Some(fd) = self.backend.output_fd() {
                write_all(q, fd, &chain.readable)?;
            }
            q.add_bytes(len);
            q.add_used(chain.head, 0);
        }
        Ok(Wait::Kick)
    }
}

fn write_all(q: &QueueCtx, fd: RawFd, iov: &GuestIovecs) -> Result<(), Stopped> {
    if let Err(e) = q.io_all(iov, |rest, _| sys::writev(fd, rest))? {
        // A vanished reader is not the guest's fault: the output is dropped.
        if e.raw_os_error() != Some(libc::EPIPE) {
            q.count_error(&format!("console output failed: {e}"));
        }
    }
    Ok(())
}
