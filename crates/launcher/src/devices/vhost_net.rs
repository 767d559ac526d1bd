//! `--net tap=NAME,vhost=on`: virtio-net whose two queues the host
//! kernel's vhost-net serves (the seed's "virtio server in the kernel, a
//! thread per device"), through the `vhost` crate's kernel back-end.
//!
//! The launcher opens `/dev/vhost-net` and the TAP, and at DRIVER_OK gives
//! the kernel the memory table, each ring's addresses, the queue's KVM
//! ioeventfd as its kick and its MSI-X irqfd as its call, and the TAP as
//! the queue's back-end. Packets then go TAP ↔ guest buffers inside the
//! kernel; no launcher thread is in the data path. A guest reset detaches
//! the TAP and stops the rings (GET_VRING_BASE).
//!
//! One queue pair, no control queue: vhost-net serves data queues only
//! (multi-queue needs one vhost-net fd per pair and a control queue served
//! in user space, which kickvm does not do here).

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;

use kickvm_virtio::device::ConfigSpace;
use kickvm_virtio::net::{features as nf, offload_flags, NetConfig, Tap, TapError, NET_HDR_LEN};
use kickvm_virtio::{ActivateError, DeviceState, ExternalQueues, GuestMemory, QueueSetup, QueueWorker, VirtioDevice};
use vhost::net::VhostNet;
use vhost::vhost_kern::net::Net;
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::eventfd::EventFd;

use super::vhost_user::{regions, Ring};
use crate::config::validate::check_char_device;
use crate::config::{ConfigError, NetSpec};

/// The kernel's vhost-net device.
pub const VHOST_NET: &str = "/dev/vhost-net";
/// Receive and transmit.
const QUEUES: usize = 2;
const QUEUE_SIZE: u16 = 256;

/// Ring features vhost-net may serve (masked with what it says it does).
const RING_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << nf::VIRTIO_NET_F_MRG_RXBUF);
/// What the TAP does for vhost-net (checksums and segmentation offloads),
/// and what the configuration space says (MAC, link status).
const DEVICE_FEATURES: u64 = (1 << nf::VIRTIO_NET_F_CSUM)
    | (1 << nf::VIRTIO_NET_F_GUEST_CSUM)
    | (1 << nf::VIRTIO_NET_F_HOST_TSO4)
    | (1 << nf::VIRTIO_NET_F_HOST_TSO6)
    | (1 << nf::VIRTIO_NET_F_GUEST_TSO4)
    | (1 << nf::VIRTIO_NET_F_GUEST_TSO6)
    | (1 << nf::VIRTIO_NET_F_MAC)
    | (1 << nf::VIRTIO_NET_F_STATUS);

/// `vhost=on` can be served here: the host has vhost-net, and the card
/// has one queue pair.
pub fn check(n: &NetSpec) -> Result<(), ConfigError> {
    if !n.vhost {
        return Ok(());
    }
    if n.queues > 1 {
        return crate::config::err(format!(
            "--net tap={},queues={},vhost=on: vhost-net serves one queue pair here; drop queues= or vhost=on",
            n.tap, n.queues
        ));
    }
    let hint = format!("; --net tap={},vhost=on needs it: load the module (modprobe vhost_net) or drop vhost=on", n.tap);
    check_char_device("vhost-net device", Path::new(VHOST_NET), libc::R_OK | libc::W_OK, &hint)
}

/// Why a vhost-net card could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VhostNetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("{what}: {source}")]
    Vhost { what: &'static str, source: vhost::Error },
}

/// virtio-net served by the kernel's vhost-net.
pub struct VhostNetDevice {
    config: NetConfig,
    tap: Tap,
    /// The TAP as vhost-net's back-end takes it (a second fd on it).
    tap_file: File,
    /// Guest memory as vhost-net translates ring addresses with it: set at
    /// each DRIVER_OK (the device exists before guest RAM is known to it).
    mem: GuestMemoryAtomic<GuestMemory>,
    net: Net<GuestMemoryAtomic<GuestMemory>>,
    /// What vhost-net serves (VHOST_GET_FEATURES).
    vhost_features: u64,
    /// Queues handed to the kernel, to stop at reset.
    running: Vec<usize>,
    state: Arc<DeviceState>,
}

impl VhostNetDevice {
    /// Opens the TAP and `/dev/vhost-net`, and makes this process its
    /// owner (the kernel starts its worker thread for this device).
    pub fn new(config: NetConfig) -> Result<VhostNetDevice, VhostNetError> {
        let tap = Tap::open(&config.tap, 1)?.remove(0);
        // SAFETY: the TAP's fd is open for as long as `tap`, and the
        // borrow ends with this statement (the clone is a new fd).
        let dup = unsafe { BorrowedFd::borrow_raw(tap.as_raw_fd()) }.try_clone_to_owned();
        let tap_file = File::from(dup.map_err(|source| VhostNetError::Tap(TapError::OpenTun { name: config.tap.clone(), source }))?);
        let vhost = |what| move |source| VhostNetError::Vhost { what, source };
        let mem = GuestMemoryAtomic::new(GuestMemory::default());
        let net = Net::new(mem.clone()).map_err(vhost("cannot open /dev/vhost-net"))?;
        net.set_owner().map_err(vhost("VHOST_SET_OWNER"))?;
        let vhost_features = net.get_features().map_err(vhost("VHOST_GET_FEATURES"))?;
        let mut config = config;
        config.tap = tap.name().to_string();
        Ok(VhostNetDevice { config, tap, tap_file, mem, net, vhost_features, running: Vec::new(), state: DeviceState::new(QUEUES) })
    }

    fn hand_over(&mut self, features: u64, mem: &GuestMemory, rings: &[Ring]) -> Result<(), String> {
        let step = |what: &'static str| move |e: vhost::Error| format!("{what}: {e}");
        let tap = |e: TapError| e.to_string();
        self.tap.set_vnet_hdr_size(NET_HDR_LEN).map_err(tap)?;
        self.tap.set_offload(offload_flags(features)).map_err(tap)?;
        self.mem.lock().map_err(|e| e.to_string())?.replace(mem.clone());
        self.net.set_features(features & self.vhost_features).map_err(step("VHOST_SET_FEATURES"))?;
        self.net.set_mem_table(&regions(mem)).map_err(step("VHOST_SET_MEM_TABLE"))?;
        for q in rings {
            let addr = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: q.desc,
                used_ring_addr: q.used,
                avail_ring_addr: q.avail,
                log_addr: None,
            };
            self.net.set_vring_num(q.index, q.size).map_err(step("VHOST_SET_VRING_NUM"))?;
            self.net.set_vring_addr(q.index, &addr).map_err(step("VHOST_SET_VRING_ADDR"))?;
            self.net.set_vring_base(q.index, 0).map_err(step("VHOST_SET_VRING_BASE"))?;
            self.net.set_vring_call(q.index, &q.call).map_err(step("VHOST_SET_VRING_CALL"))?;
            self.net.set_vring_kick(q.index, &q.kick).map_err(step("VHOST_SET_VRING_KICK"))?;
            self.running.push(q.index);
            self.net.set_backend(q.index, Some(&self.tap_file)).map_err(step("VHOST_NET_SET_BACKEND"))?;
        }
        Ok(())
    }
}

impl VirtioDevice for VhostNetDevice {
    fn name(&self) -> &str {
        &self.config.name
    }
    fn device_type(&self) -> u32 {
        kickvm_virtio::net::VIRTIO_ID_NET
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; QUEUES]
    }
    fn features(&self) -> u64 {
        (RING_FEATURES & self.vhost_features) | DEVICE_FEATURES
    }
    fn config_space(&self) -> Vec<u8> {
        virtio_bindings::virtio_net::virtio_net_config {
            mac: self.config.mac,
            status: (virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP as u16).to_le(),
            ..Default::default()
        }
        .bytes()
    }
    fn activate(&mut self, _features: u64) -> Result<Vec<Box<dyn QueueWorker>>, ActivateError> {
        Err(ActivateError::Backend("the kernel's vhost-net serves this device's queues".into()))
    }
    /// Detaches the TAP and stops the rings: the kernel touches guest
    /// memory no more for this device.
    fn reset(&mut self) {
        for q in std::mem::take(&mut self.running) {
            let _ = self.net.set_backend(q, None);
            let _ = self.net.get_vring_base(q);
        }
    }
    fn state(&self) -> Arc<DeviceState> {
        self.state.clone()
    }
    fn external(&mut self) -> Option<&mut dyn ExternalQueues> {
        Some(self)
    }
}

impl ExternalQueues for VhostNetDevice {
    fn start(
        &mut self,
        features: u64,
        mem: &GuestMemory,
        queues: Vec<QueueSetup>,
        _config_call: Option<EventFd>,
    ) -> Result<(), ActivateError> {
        let rings: Vec<Ring> = queues.into_iter().map(Ring::from).collect();
        self.hand_over(features, mem, &rings).map_err(|e| {
            self.reset();
            ActivateError::Backend(format!("vhost-net: {e}").into())
        })
    }
}

impl Drop for VhostNetDevice {
    fn drop(&mut self) {
        self.reset();
    }
}
