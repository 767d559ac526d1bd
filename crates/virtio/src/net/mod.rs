//! virtio-net over a Linux TAP.
//!
//! One packet's path, by function name:
//! - transmit: the guest kicks `tx<N>`; [`tx::TxWorker`] pops the chain and
//!   `writev`s it — virtio-net header and frame, straight from guest
//!   memory — to the TAP queue fd (the TAP expects the same header: "what a
//!   coincidence!", as lguest put it).
//! - receive, inverted (as lguest did, and as QEMU's "invert network
//!   receive" proposal asked): [`rx::RxWorker`] first holds guest buffers
//!   from `rx<N>`, then reads the TAP straight into them. No packet
//!   is ever copied or queued in between. Its thread sleeps in that `readv`
//!   and interrupts the guest only just before it does.
//! - control: [`ctrl::CtrlWorker`] answers the driver's commands (number of
//!   queue pairs, receive modes).
//! - link: [`link::Link`] keeps the `status` the driver reads in step with
//!   the TAP (a deleted or downed TAP is a link down for the guest).
//!
//! Queues are `rx0, tx0, rx1, tx1, …, ctrl`; with more than one pair the
//! TAP is opened once per pair (`IFF_MULTI_QUEUE`).
//!
//! Files: `mod.rs` the device and its configuration space; `rx.rs`,
//! `tx.rs`, `ctrl.rs` one worker each; `backend.rs` the TAP; `link.rs`
//! the link status.

mod backend;
mod ctrl;
mod link;
mod rx;
mod tx;

pub use backend::{Tap, TapError, TapState};

use std::sync::Arc;

use crate::counters::DeviceState;
use crate::device::{ActivateError, ConfigSpace, VirtioDevice, COMMON_FEATURES};
use virtio_bindings::virtio_net::virtio_net_config;
use crate::queue::{QueueCtx, Stopped};
use crate::threads::{QueueWorker, Wait};
pub use backend::offload_flags;
use ctrl::{CtrlWorker, QueuePairs};
use link::Link;
use features::*;
use rx::RxWorker;
use tx::TxWorker;

/// virtio-net feature bits and header constants, from virtio-bindings.
pub mod features {
    pub use virtio_bindings::virtio_net::{
        VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_ERR, VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
        VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
        VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_OK, VIRTIO_NET_S_LINK_UP,
    };
}

/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers. Legacy drivers without mergeable buffers use
/// the first 10 bytes only.
pub const NET_HDR_LEN: usize = 12;
/// Legacy header without `num_buffers`.
pub const NET_HDR_LEN_LEGACY: usize = 10;
/// Where `num_buffers` sits in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// The largest frame a packet may carry, header excluded: a 64 KiB GSO
/// packet plus its Ethernet header (the spec's 65562 − 12). Bigger
/// transmit chains are refused rather than handed to the kernel.
pub const MAX_FRAME_LEN: usize = 65550;

pub use crate::memory::MAX_IOVECS;

/// Ethernet header length, for frame sizes derived from the MTU.
pub const ETH_HLEN: usize = 14;

/// Whether feature `bit` is set in `features`.
pub(crate) fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

pub use virtio_bindings::virtio_ids::VIRTIO_ID_NET;

/// System calls the queues make beyond a queue thread's own
/// (`seccomp::QUEUE_THREAD`): packets in and out of the TAP (`RWF_NOWAIT`
/// reads are `preadv2`), and the control queue's TUNSETQUEUE.
pub const SYSCALLS: &[i64] = &[libc::SYS_readv, libc::SYS_writev, libc::SYS_preadv2, libc::SYS_ioctl];

/// Largest queue the device offers. Linux sizes its rings to what the
/// device offers; 256 entries hold far more than one 64 KiB GSO packet in
/// mergeable buffers.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// The offloads and ring features every net device here offers.
const NET_FEATURES: u64 = (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_STATUS)
    | (1 << VIRTIO_NET_F_CTRL_VQ);

/// How to build a net device.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Device name for threads and logs (`net0` → threads `net0-q0`, …).
    pub name: String,
    /// TAP interface name (empty: the kernel picks `tapN`).
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// Queue pairs (each one a TAP queue fd and two queue threads).
    pub queue_pairs: u16,
    /// MTU to advertise (VIRTIO_NET_F_MTU); `None` leaves it to the guest.
    pub mtu: Option<u16>,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            name: "net0".into(),
            tap: String::new(),
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            queue_pairs: 1,
            mtu: None,
        }
    }
}

/// A virtio-net device backed by a TAP interface.
pub struct NetDevice {
    config: NetConfig,
    taps: Arc<Vec<Arc<Tap>>>,
    /// Which TAP queues are attached. It lives as long as the TAP fds (not
    /// one activation): after a reset the TAP queues are as the last
    /// activation left them, and re-activating must start from that.
    pairs: Arc<QueuePairs>,
    /// VIRTIO_NET_S_LINK_UP, as the workers last saw the TAP.
    link: Arc<Link>,
    counters: Arc<DeviceState>,
}

impl NetDevice {
    /// Opens the TAP (one fd per queue pair). The interface lives in the
    /// network namespace of the calling thread.
    pub fn new(mut config: NetConfig) -> Result<NetDevice, TapError> {
        config.queue_pairs = config.queue_pairs.max(1);
        let taps = Tap::open(&config.tap, usize::from(config.queue_pairs))?;
        Ok(NetDevice::with_taps(config, taps))
    }

    /// A device on TAP queue fds opened elsewhere (one per queue pair, see
    /// [`Tap::from_fd`]); `config.tap` and `config.queue_pairs` are taken
    /// from them.
    pub fn with_taps(mut config: NetConfig, taps: Vec<Tap>) -> NetDevice {
        config.queue_pairs = u16::try_from(taps.len().max(1)).unwrap_or(u16::MAX);
        config.tap = taps.first().map(|t| t.name().to_string()).unwrap_or_default();
        let queues = 2 * usize::from(config.queue_pairs) + 1;
        let taps = Arc::new(taps.into_iter().map(Arc::new).collect::<Vec<_>>());
        let link = Link::new(&config.name, taps.first().cloned());
        NetDevice { config, pairs: QueuePairs::new(taps.clone()), taps, link, counters: DeviceState::new(queues) }
    }

    /// The TAP interface's name.
    pub fn tap_name(&self) -> &str {
        &self.config.tap
    }

    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// Index of the control queue once `features` are negotiated: after the
    /// last pair with MQ, after the first pair without.
    pub fn ctrl_queue_index(&self, features: u64) -> u16 {
        if has(features, VIRTIO_NET_F_MQ) {
            2 * self.config.queue_pairs
        } else {
            2
        }
    }

    /// Whether the guest sees the link up (VIRTIO_NET_S_LINK_UP).
    pub fn link_up(&self) -> bool {
        self.link.is_up()
    }

    /// `virtio_net_config`: MAC, link status, queue pairs, MTU.
    fn net_config(&self) -> virtio_net_config {
        let status = if self.link.is_up() { VIRTIO_NET_S_LINK_UP as u16 } else { 0 };
        virtio_net_config {
            mac: self.config.mac,
            status: status.to_le(),
            max_virtqueue_pairs: self.config.queue_pairs.to_le(),
            mtu: self.config.mtu.unwrap_or(1500).to_le(),
            ..Default::default()
        }
    }
}

impl VirtioDevice for NetDevice {
    fn syscalls(&self) -> &'static [i64] {
        SYSCALLS
    }
    fn name(&self) -> &str {
        &self.config.name
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX_SIZE; 2 * usize::from(self.config.queue_pairs) + 1]
    }

    fn features(&self) -> u64 {
        let mut f = COMMON_FEATURES | NET_FEATURES;
        if self.config.queue_pairs > 1 {
            f |= 1 << VIRTIO_NET_F_MQ;
        }
        if self.config.mtu.is_some() {
            f |= 1 << VIRTIO_NET_F_MTU;
        }
        f
    }

    fn config_space(&self) -> Vec<u8> {
        self.net_config().bytes()
    }

    fn activate(&mut self, features: u64) -> Result<Vec<Box<dyn QueueWorker>>, ActivateError> {
        let features = features & self.features();
        let version_1 = has(features, virtio_bindings::virtio_config::VIRTIO_F_VERSION_1);
        let mergeable = has(features, VIRTIO_NET_F_MRG_RXBUF);
        let hdr_len = if version_1 || mergeable { NET_HDR_LEN } else { NET_HDR_LEN_LEGACY };
        let offloads = offload_flags(features);
        let backend = |e: TapError| ActivateError::Backend(Box::new(e));
        for tap in self.taps.iter() {
            tap.set_vnet_hdr_size(hdr_len).map_err(backend)?;
            tap.set_offload(offloads).map_err(backend)?;
        }
        // A packet may need up to this many bytes of guest buffers.
        let gso = offloads & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO) != 0;
        let mtu = usize::from(self.config.mtu.unwrap_or(1500));
        let frame_max = hdr_len + if gso { MAX_FRAME_LEN } else { ETH_HLEN + mtu };
        let min_frame = hdr_len + ETH_HLEN + mtu;

        // Multiqueue is off until the driver asks for more pairs.
        let pairs = self.pairs.clone();
        pairs.set_active(1).map_err(backend)?;

        let n = 2 * usize::from(self.config.queue_pairs) + 1;
        let used_pairs = if has(features, VIRTIO_NET_F_MQ) { self.config.queue_pairs } else { 1 };
        let ctrl_index = usize::from(self.ctrl_queue_index(features));
        let mut workers: Vec<Box<dyn QueueWorker>> = Vec::with_capacity(n);
        for i in 0..n {
            let pair = i / 2;
            let w: Box<dyn QueueWorker> = if i == ctrl_index {
                Box::new(CtrlWorker::new(pairs.clone(), features))
            } else if pair >= usize::from(used_pairs) {
                Box::new(UnusedQueue)
            } else if i % 2 == 0 {
                Box::new(RxWorker::new(self.taps[pair].clone(), self.link.clone(), hdr_len, mergeable, frame_max, min_frame))
            } else {
                Box::new(TxWorker::new(self.taps[pair].clone(), self.link.clone(), hdr_len))
            };
            workers.push(w);
        }
        Ok(workers)
    }

    fn state(&self) -> Arc<DeviceState> {
        self.counters.clone()
    }
}

/// A queue the negotiated features leave without a role (the pairs past
/// the first without MQ, or the last slot when the control queue moved to
/// index 2). A driver should not use it; chains it posts anyway are
/// counted and returned.
struct UnusedQueue;

impl QueueWorker for UnusedQueue {
    fn serve(&mut self, q: &mut QueueCtx) -> Result<Wait, Stopped> {
        while let Some(c) = q.pop() {
            q.fail_chain(c.head, "chain posted on a queue the negotiated features do not use");
        }
        Ok(Wait::Kick)
    }
}
