//! The transmit queue: packets from the guest, checked, then acted on —
//! data written from guest memory straight to the host socket.

use std::sync::{Arc, Mutex};

use super::muxer::Muxer;
use super::packet::parse_tx;
use crate::queue::{QueueCtx, Stopped};
use crate::threads::{QueueWorker, Wait};

pub(super) struct TxWorker {
    pub muxer: Arc<Mutex<Muxer>>,
    pub guest_cid: u64,
}

impl QueueWorker for TxWorker {
    fn serve(&mut self, q: &mut QueueCtx) -> Result<Wait, Stopped> {
        let mut served = false;
        while let Some(chain) = q.pop() {
            served = true;
            match parse_tx(&chain.readable, &chain.writable, self.guest_cid) {
                Ok(p) => self.muxer.lock().unwrap_or_else(|e| e.into_inner()).guest_packet(q, p),
                Err((e, hdr)) => {
                    q.count_error(&e.to_string());
                    if let Some(h) = hdr {
                        self.muxer.lock().unwrap_or_else(|e| e.into_inner()).bad_packet(q, &h);
                    }
                }
            }
            q.add_used(chain.head, 0);
        }
        if served {
            // Replies, credit and host sockets to watch: the receive thread.
            self.muxer.lock().unwrap_or_else(|e| e.into_inner()).wake_rx();
        }
        Ok(Wait::Kick)
    }
}
