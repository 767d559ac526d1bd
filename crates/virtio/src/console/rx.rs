//! The receive queue: guest buffers wait here for input, which is read
//! straight into them.

use std::os::fd::RawFd;
use std::sync::Arc;

use super::backend::ConsoleBackend;
use super::RX;
use crate::memory::GuestIovecs;
use crate::queue::{QueueCtx, Stopped};
use crate::sys;
use crate::threads::{QueueWorker, Wait};

/// receiveq: guest buffers wait here for input.
pub(super) struct Receive {
    pub backend: Arc<ConsoleBackend>,
    /// The input ended (EOF on stdin): serve nothing until reset.
    pub closed: bool,
}

impl QueueWorker for Receive {
    fn serve(&mut self, q: &mut QueueCtx) -> Result<Wait, Stopped> {
        debug_assert_eq!(q.index as usize, RX);
        loop {
            if self.closed {
                return Ok(Wait::Backend);
            }
            let Some(chain) = q.pop() else { return Ok(Wait::Kick) };
            if chain.writable.is_empty() {
                q.fail_chain(chain.head, "console receive buffer is not device-writable");
                continue;
            }
            let Some(fd) = self.backend.input_fd(q)? else {
                // No input now (no socket client yet, in a shared thread).
                q.unpop();
                return Ok(Wait::Backend);
            };
            match read_input(q, fd, &chain.writable)? {
                Input::Data(n) => {
                    q.add_bytes(n as u64);
                    q.add_used(chain.head, n as u32);
                }
                Input::NotNow => {
                    q.unpop();
                    return Ok(Wait::Backend);
                }
                Input::Closed => {
                    q.unpop();
                    if !self.backend.input_closed(fd) {
                        self.closed = true;
                    }
                }
            }
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        if self.closed {
            None
        } else {
            self.backend.poll_fd()
        }
    }
}

enum Input {
    Data(usize),
    NotNow,
    Closed,
}

/// Reads input straight into the guest's buffer. In a thread of its own,
/// this is where the receive queue sleeps: first a read that cannot block;
/// if there is nothing, interrupt the guest for what is done, then block.
fn read_input(q: &mut QueueCtx, fd: RawFd, iov: &GuestIovecs) -> Result<Input, Stopped> {
    let mut blocking = false;
    let mut nowait = true;
    loop {
        let r = if blocking { sys::readv(fd, iov) } else { sys::read_nowait(fd, iov, &mut nowait) };
        match r {
            Ok(0) => return Ok(Input::Closed),
            Ok(n) => return Ok(Input::Data(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !q.blocking() {
                    return Ok(Input::NotNow);
                }
                q.notify();
                blocking = true;
            }
            Err(e) if q.retry_after(&e)? => {}
            // A pty master whose other side is not open reads EIO; a socket
            // client that left with output still unread reads ECONNRESET.
            // Both are the other side going away, not a fault.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::ECONNRESET)) => return Ok(Input::Closed),
            Err(e) => {
                q.count_error(&format!("console input failed: {e}"));
                return Ok(Input::Closed);
            }
        }
    }
}

