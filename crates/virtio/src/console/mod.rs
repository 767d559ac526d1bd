//! virtio-console (the guest's `hvc0`): port 0's receive queue is filled
//! from an input fd, its transmit queue is written to an output fd, both
//! straight from/into guest buffers.
//!
//! Backends: the launcher's stdin/stdout (in raw mode while the device
//! lives, always restored), a pseudo-terminal, a unix socket (one client at
//! a time), or an output file.

mod backend;

pub use backend::{Backend, ConsoleBackend};

use std::os::fd::RawFd;
use std::sync::Arc;

use crate::counters::DeviceCounters;
use crate::memory::GuestIovecs;
use crate::device::{ActivateError, VirtioDevice, COMMON_FEATURES};
use crate::threads::{QueueWorker, Wait};
use crate::queue::{QueueCtx, Stopped};
use crate::sys;

pub const VIRTIO_ID_CONSOLE: u32 = 3;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;

/// Output written per chain at most: the guest controls the chain length.
const MAX_TX_BYTES: u64 = 1 << 20;

pub struct Console {
    name: String,
    backend: Arc<ConsoleBackend>,
    counters: Arc<DeviceCounters>,
}

impl Console {
    pub fn new(name: &str, backend: Backend) -> std::io::Result<Console> {
        Ok(Console {
            name: name.to_string(),
            backend: Arc::new(ConsoleBackend::open(backend)?),
            counters: DeviceCounters::new(2),
        })
    }

    /// The pseudo-terminal's path (`/dev/pts/N`) for the `Pty` backend.
    pub fn pty_path(&self) -> Option<&std::path::Path> {
        self.backend.pty_path()
    }
}

impl VirtioDevice for Console {
    fn name(&self) -> &str {
        &self.name
    }
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2]
    }
    fn features(&self) -> u64 {
        COMMON_FEATURES
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, _features: u64) -> Result<Vec<Box<dyn QueueWorker>>, ActivateError> {
        Ok(vec![
            Box::new(Receive { backend: self.backend.clone(), closed: false }),
            Box::new(Transmit { backend: self.backend.clone() }),
        ])
    }
    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }
}

/// receiveq: guest buffers wait here for input.
struct Receive {
    backend: Arc<ConsoleBackend>,
    /// The input ended (EOF on stdin): serve nothing until reset.
    closed: bool,
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
    loop {
        let r = if blocking {
            sys::readv(fd, iov)
        } else {
            match sys::readv_nowait(fd, iov) {
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                    if sys::would_block(fd) {
                        Err(std::io::Error::from(std::io::ErrorKind::WouldBlock))
                    } else {
                        sys::readv(fd, iov)
                    }
                }
                r => r,
            }
        };
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
            // A pty master whose other side is not open reads EIO.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(Input::Closed),
            Err(e) => {
                q.count_error(&format!("console input failed: {e}"));
                return Ok(Input::Closed);
            }
        }
    }
}

/// transmitq: the guest's output goes straight to the output fd.
struct Transmit {
    backend: Arc<ConsoleBackend>,
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
    let mut rest = iov.clone();
    while !rest.is_empty() {
        match sys::writev(fd, &rest) {
            Ok(n) => rest = rest.skip(n as u64),
            Err(e) if q.retry_after(&e)? => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut p = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 100) };
                q.check_stop()?;
            }
            Err(e) => {
                // A vanished reader is not the guest's fault: drop the output.
                if e.raw_os_error() != Some(libc::EPIPE) {
                    q.count_error(&format!("console output failed: {e}"));
                }
                return Ok(());
            }
        }
    }
    Ok(())
}
