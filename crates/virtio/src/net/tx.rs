//! Transmit: the guest's packets go to the TAP straight from its buffers.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::backend::Tap;
use super::link::Link;
use super::MAX_FRAME_LEN;
use crate::backend_fault::BackendFault;
use crate::chain::Chain;
use crate::counters::QueueCounters;
use crate::threads::{QueueWorker, Wait};
use crate::queue::{QueueCtx, Stopped};
use crate::sys;

/// Serves one transmit queue: each chain is a virtio-net header followed by
/// a frame, and the TAP takes exactly that, so one `writev` per packet.
pub struct TxWorker {
    tap: Arc<Tap>,
    hdr_len: usize,
    /// The device's link status, checked on every TAP failure.
    link: Arc<Link>,
    /// The link has not been looked at since the device started.
    fresh: bool,
    /// The TAP's own failures that the link does not explain.
    fault: BackendFault,
}

impl TxWorker {
    pub fn new(tap: Arc<Tap>, link: Arc<Link>, hdr_len: usize) -> TxWorker {
        TxWorker { tap, hdr_len, link, fresh: true, fault: BackendFault::default() }
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
                    // guest's doing); EIO/EBADFD: the interface was set
                    // down or deleted (the host's: the link goes down for
                    // the guest, with its own log line). The packet is
                    // lost either way.
                    let why = format!("TAP `{}` refused a packet: {e}", self.tap.name());
                    if e.raw_os_error() == Some(libc::EINVAL) {
                        q.count_error(&why);
                    } else if self.link.check(q) {
                        self.fault.failed(q, &why);
                    } else {
                        QueueCounters::add(&q.counters.errors, 1);
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
        if std::mem::take(&mut self.fresh) {
            self.link.check(q);
        }
        while let Some(c) = q.pop() {
            self.net_output(q, c)?;
        }
        // A guest whose link is down sends nothing that would show the TAP
        // is back: look at it from time to time.
        if self.link.is_up() || self.link.check(q) {
            Ok(Wait::Kick)
        } else {
            Ok(self.link.wait())
        }
    }
}
