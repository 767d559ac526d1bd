//! The receive queue: packets for the guest — control packets the
//! connection table owes it, and data read from host sockets straight
//! into the guest's buffers.
//!
//! Its thread waits for two things: a kick (more receive buffers) and the
//! host (a new connection, input on a socket, room to write buffered data,
//! or the transmit thread's word that a packet is owed). The host side is
//! one epoll set, whose fd the thread polls together with its kick in
//! every threading mode (`Wait::Backend`), so a stop's wake signal ends
//! the wait like any other.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use super::muxer::Muxer;
use crate::queue::{QueueCtx, Stopped};
use crate::threads::{QueueWorker, Wait};

pub(super) struct RxWorker {
    pub muxer: Arc<Mutex<Muxer>>,
    pub poll_fd: RawFd,
    /// Connections with input, kept between rounds (scratch).
    pub readable: Vec<(u64, u32)>,
}

impl QueueWorker for RxWorker {
    fn serve(&mut self, q: &mut QueueCtx) -> Result<Wait, Stopped> {
        q.check_stop()?;
        let mut m = self.muxer.lock().unwrap_or_else(|e| e.into_inner());
        Ok(m.fill_rx(q, &mut self.readable))
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.poll_fd)
    }
}
