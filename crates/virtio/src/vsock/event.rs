//! The event queue: the device tells the driver that the transport was
//! reset (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`), so the guest drops every
//! connection it still has — after the host side of them was closed by a
//! device reset.
//!
//! The driver keeps event buffers posted; they are held here (popped, so
//! the ring looks empty to the "may I sleep?" check) until there is an
//! event to put in one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::chain::Chain;
use crate::queue::{QueueCtx, Stopped};
use crate::threads::{QueueWorker, Wait};

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, the one event the spec defines.
const TRANSPORT_RESET: u32 = 0;

/// Event buffers held at most. A driver needs only a few; one that posts
/// more (or republishes the same ones forever) gets the excess back
/// unused, so the held list is bounded by the queue size.
const MAX_HELD: usize = 256;

pub(super) struct EventWorker {
    /// Set when the guest must be told of a transport reset.
    pub reset_pending: Arc<AtomicBool>,
    pub held: Vec<Chain>,
}

impl QueueWorker for EventWorker {
    fn serve(&mut self, q: &mut QueueCtx) -> Result<Wait, Stopped> {
        while let Some(chain) = q.pop() {
            if chain.writable.len() < 4 || !chain.readable.is_empty() {
                q.fail_chain(chain.head, "vsock event buffer is not a device-writable buffer of at least 4 bytes");
            } else if self.held.len() >= MAX_HELD {
                q.fail_chain(chain.head, "vsock event queue: more event buffers than the device holds");
            } else {
                self.held.push(chain);
            }
        }
        if !self.held.is_empty() && self.reset_pending.swap(false, Ordering::AcqRel) {
            let chain = self.held.remove(0);
            chain.writable.write_at(0, &TRANSPORT_RESET.to_le_bytes());
            q.add_used(chain.head, 4);
        }
        Ok(Wait::Kick)
    }
}
