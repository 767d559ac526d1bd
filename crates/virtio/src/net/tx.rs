//! Transmit: the guest's packets go to the TAP straight from its buffers.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::backend::Tap;
use super::MAX_FRAME_LEN;
use crate::backend_fault::BackendFault;
use crate::chain::Chain;
use crate::threads::{QueueWorker, Wait};
use crate::queue::{QueueCtx, Stopped};
use crate::sys;

/// Serves one transmit queue: each chain is a virtio-net header followed by
/// a frame, and the TAP takes exactly that, so one `writev` per packet.
pub struct TxWorker {
    tap: Arc<Tap>,
    hdr_len: usize,
    /// The TAP's own failures (the interface was deleted or detached).
    fault: BackendFault,
}

impl TxWorker {
    pub fn new(tap: Arc<Tap>, hdr_len: usize) -> TxWorker {
        TxWorker { tap, hdr_len, fault: BackendFault::default() }
    }

    /// Sends one chain's packet. The chain always goes back to the guest
    /// (with length 0: the device writes nothing into transmit buffers);
    /// a packet the guest got wrong or the kernel refused is counted.
    fn net_output(&mut self, q: &mut QueueCtx, c: Chain) -> Result<(), Stopped> {
        if !c.writable.is_empty() {
            q.fail_chain(c.head, "transmit chain has device-writable descriptors");
            return Ok(());
        }
        let len = usize::try_from(c.readable.len()).unwrap_or(usize::MAX);
        if len < self.hdr_len {
            q.fail_chain(c.head, &format!("transmit chain of {len} bytes is shorter than the virtio-net header"));
            return Ok(());
        }
        if len - self.hdr_len > MAX_FRAME_LEN {
            q.fail_chain(
                c.head,
                &format!("transmit frame of {} bytes is larger than {MAX_FRAME_LEN}", len - self.hdr_len),
            );
            return Ok(());
        }
        loop {
            match sys::writev(self.tap.as_raw_fd(), &c.readable) {
                Ok(n) => {
                    q.add_bytes(n as u64);
                    self.fault.worked(q);
                    break;
                }
                Err(e) => {
                    if q.retry_after(&e)? {
                        continue;
                    }
                    // EINVAL: a GSO/checksum header the kernel rejects (the
                    // guest's doing); EIO/EBADFD: the interface went away
                    // (the host's). The packet is lost either way.
                    let why = format!("TAP `{}` refused a packet: {e}", self.tap.name());
                    if e.raw_os_error() == Some(libc::EINVAL) {
                        q.count_error(&why);
                    } else {
                        self.fault.failed(q, &why);
                    }
                    break;
                }
            }
        }
        q.add_used(c.head, 0);
        Ok(())
    }
}

impl QueueWorker for TxWorker {
    fn serve(&mut self, q: &mut QueueCtx) -> Result<Wait, Stopped> {
        while let Some(c) = q.pop() {
            self.net_output(q, c)?;
        }
        Ok(Wait::Kick)
    }
}
