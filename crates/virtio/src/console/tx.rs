//! The transmit queue: the guest's output goes straight from its buffers
//! to the output fd.

use std::os::fd::RawFd;
use std::sync::Arc;

use super::backend::ConsoleBackend;
use super::MAX_TX_BYTES;
use crate::backend_fault::BackendFault;
use crate::memory::GuestIovecs;
use crate::queue::{QueueCtx, Stopped};
use crate::sys;
use crate::threads::{QueueWorker, Wait};

/// transmitq: the guest's output goes straight to the output fd.
pub(super) struct Transmit {
    pub backend: Arc<ConsoleBackend>,
    /// Output failures other than a reader that left (EPIPE).
    pub fault: BackendFault,
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
            if let Some(out) = self.backend.output() {
                self.write_all(q, out.fd(), &chain.readable)?;
            }
            q.add_bytes(len);
            q.add_used(chain.head, 0);
        }
        Ok(Wait::Kick)
    }
}

impl Transmit {
    fn write_all(&mut self, q: &QueueCtx, fd: RawFd, iov: &GuestIovecs) -> Result<(), Stopped> {
        match q.io_all(iov, |rest, _| sys::writev(fd, rest))? {
            Ok(_) => self.fault.worked(q),
            // A vanished reader is not the guest's fault: the output is dropped.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
            Err(e) => self.fault.failed(q, &format!("console output failed: {e}")),
        }
        Ok(())
    }
}
