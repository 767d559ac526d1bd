//! virtio-vsock with Cloud Hypervisor's hybrid vsock on the host: guest
//! `AF_VSOCK` stream sockets meet host programs on Unix sockets.
//!
//! - host → guest: a host program connects to `SOCKET`, writes
//!   `CONNECT <port>\n`, reads `OK <hostport>\n`, and then has a byte
//!   stream to the guest's listener on that port (how Kata reaches its
//!   agent: `hvsock://SOCKET:1024`).
//! - guest → host: a guest connection to host port P reaches the Unix
//!   socket `SOCKET_P`.
//!
//! One packet's path, by function name: the guest's packets arrive on the
//! transmit queue ([`tx::TxWorker`]), are checked ([`packet::parse_tx`])
//! and acted on by the connection table ([`muxer::Muxer::guest_packet`]),
//! data going from guest memory straight to the host socket
//! (`sendmsg`). The receive queue ([`rx::RxWorker`]) sleeps on its kick
//! and on an epoll set of the host sockets, and fills guest buffers with
//! the control packets owed and with data read from a host socket
//! straight into them (`readv`) — within the credit the guest gave.
//! The event queue ([`event::EventWorker`]) reports transport resets.
//!
//! Files: `mod.rs` the device; `packet.rs` the header; `muxer.rs` the
//! connections and flow control; `backend.rs` the host sockets;
//! `rx.rs`, `tx.rs`, `event.rs` one worker each.

mod backend;
mod event;
mod muxer;
pub mod packet;
mod rx;
mod tx;

pub use backend::{HostListener, CONNECTOR_SYSCALLS};
pub use muxer::{BUF_ALLOC, MAX_CONNECTIONS};

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::counters::DeviceState;
use crate::device::{ActivateError, VirtioDevice, COMMON_FEATURES};
use crate::threads::QueueWorker;
use muxer::Muxer;

pub use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

/// Queue indexes: receive, transmit, event.
pub const RX: usize = 0;
pub const TX: usize = 1;
pub const EVENT: usize = 2;

/// Largest queue the device offers (Linux posts 4 KiB receive buffers;
/// 256 of them are a megabyte in flight).
pub const QUEUE_MAX_SIZE: u16 = 256;

/// Context IDs 0, 1 and 2 are the hypervisor, local and host; `u32::MAX`
/// is `VMADDR_CID_ANY`. A guest's CID lies between.
pub const MIN_GUEST_CID: u64 = 3;
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// System calls the queues make beyond a queue thread's own
/// (`seccomp::QUEUE_THREAD`): waiting on and changing the host socket set
/// (epoll), taking host connections (accept4), connecting to `SOCKET_P`
/// (socket, connect), moving data (readv, sendmsg, sendto, recvfrom), and
/// half-closing a stream (shutdown).
pub const SYSCALLS: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_readv,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
];

/// How to build a vsock device.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// Device name for threads and logs (`vsock0` → `vsock0-q0`, …).
    pub name: String,
    /// The guest's context ID.
    pub cid: u64,
    /// The Unix socket host programs connect to; guest connections to
    /// port P go to `SOCKET_P`.
    pub socket: PathBuf,
    /// The connector thread's seccomp filter (`--seccomp`).
    pub seccomp: crate::seccomp::SeccompMode,
}

pub struct Vsock {
    config: VsockConfig,
    listener: Arc<HostListener>,
    /// The connection table of the running activation.
    muxer: Option<Arc<Mutex<Muxer>>>,
    /// A reset closed connections: the next activation tells the guest.
    reset_pending: Arc<AtomicBool>,
    counters: Arc<DeviceState>,
}

impl Vsock {
    /// Listens on the host socket (replacing a stale socket file there)
    /// and starts the connector thread.
    pub fn new(config: VsockConfig) -> std::io::Result<Vsock> {
        let listener = Arc::new(HostListener::bind(&config.socket, &config.name, config.seccomp)?);
        Ok(Vsock {
            config,
            listener,
            muxer: None,
            reset_pending: Arc::new(AtomicBool::new(false)),
            counters: DeviceState::new(3),
        })
    }

    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    /// Host connections open now (0 when the device is not running).
    pub fn connections(&self) -> usize {
        self.muxer.as_ref().map_or(0, |m| m.lock().unwrap_or_else(|e| e.into_inner()).connections())
    }
}

impl VirtioDevice for Vsock {
    fn name(&self) -> &str {
        &self.config.name
    }
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX_SIZE; 3]
    }
    fn features(&self) -> u64 {
        COMMON_FEATURES
    }
    /// `struct virtio_vsock_config { le64 guest_cid; }`
    fn config_space(&self) -> Vec<u8> {
        self.config.cid.to_le_bytes().to_vec()
    }
    fn activate(&mut self, _features: u64) -> Result<Vec<Box<dyn QueueWorker>>, ActivateError> {
        let muxer = Muxer::new(self.config.cid, self.listener.clone()).map_err(|e| ActivateError::Backend(Box::new(e)))?;
        let poll_fd = muxer.poll_fd();
        let muxer = Arc::new(Mutex::new(muxer));
        self.muxer = Some(muxer.clone());
        Ok(vec![
            Box::new(rx::RxWorker { muxer: muxer.clone(), poll_fd, readable: Vec::new() }),
            Box::new(tx::TxWorker { muxer, guest_cid: self.config.cid }),
            Box::new(event::EventWorker { reset_pending: self.reset_pending.clone(), held: Vec::new() }),
        ])
    }
    /// Closes every host connection (their programs see EOF); the next
    /// activation tells the guest the transport was reset.
    fn reset(&mut self) {
        if self.connections() > 0 {
            self.reset_pending.store(true, Ordering::Release);
        }
        self.muxer = None;
    }
    fn syscalls(&self) -> &'static [i64] {
        SYSCALLS
    }
    fn state(&self) -> Arc<DeviceState> {
        self.counters.clone()
    }
}
