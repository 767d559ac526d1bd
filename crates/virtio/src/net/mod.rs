//! virtio-net over a Linux TAP.
//!
//! One packet's path, by function name:
//! - transmit: the guest kicks `tx<N>`; [`tx::TxWorker`] pops the chain and
//!   `writev`s it — virtio-net header and frame, straight from guest
//!   memory — to the TAP queue fd (the TAP expects the same header: "what a
//!   coincidence!", as lguest put it).
//! - receive, inverted (as lguest and QEMU's "invert network receive" proposal did): [`rx::RxWorker`] first holds guest
//!   buffers from `rx<N>`, then reads the TAP straight into them. No packet
//!   is ever copied or queued in between. Its thread sleeps in that `readv`
//!   and interrupts the guest only just before it does.
//! - control: [`ctrl::CtrlWorker`] answers the driver's commands (number of
//!   queue pairs, receive modes).
//!
//! Queues are `rx0, tx0, rx1, tx1, …, ctrl`; with more than one pair the
//! TAP is opened once per pair (`IFF_MULTI_QUEUE`).

pub mod ctrl;
pub mod device;
pub mod rx;
pub mod tap;
pub mod tx;

pub use device::{NetConfig, NetDevice};
pub use tap::{Tap, TapError};

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
