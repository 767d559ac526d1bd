//! One connection to a vhost-user back-end: negotiation, handing the
//! driver's rings over (memory table, addresses, kick, call, enable) and
//! stopping them. Written with the `vhost` crate's `Frontend`.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use kickvm_virtio::{GuestMemory, QueueSetup};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::VhostUserError;

/// The vhost-user protocol features this frontend implements; whatever
/// else a back-end offers (qemu-storage-daemon: INFLIGHT_SHMFD, STATUS,
/// BACKEND_REQ, ...) is masked off.
const PROTOCOL: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG);

/// How long a back-end may take to answer one message before the launcher
/// takes it for dead: a vCPU waits for the answer (a guest's DRIVER_OK or
/// reset), so a hung back-end must not hang it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// One connection to the back-end, negotiated.
pub(crate) struct Session {
    pub(crate) fe: Frontend,
    /// The virtio features the back-end offers.
    pub(crate) offered: u64,
    pub(crate) protocol: VhostUserProtocolFeatures,
}

impl Session {
    /// Connects to `socket` and negotiates: owner, features, the protocol
    /// features both sides have, the number of queues, and an ack for
    /// every request where the back-end can give one.
    pub(crate) fn open(socket: &Path, vrings: usize) -> Result<Session, VhostUserError> {
        let stream = UnixStream::connect(socket).map_err(VhostUserError::Connect)?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(VhostUserError::Connect)?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(VhostUserError::Connect)?;
        let mut fe = Frontend::from_stream(stream, vrings as u64);
        let refused = |what| move |source| VhostUserError::Protocol { what, source };
        fe.set_owner().map_err(refused("SET_OWNER"))?;
        let offered = fe.get_features().map_err(refused("GET_FEATURES"))?;
        if offered & (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1) == 0 {
            return Err(VhostUserError::NotVersion1);
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            protocol = fe.get_protocol_features().map_err(refused("GET_PROTOCOL_FEATURES"))? & PROTOCOL;
            fe.set_protocol_features(protocol).map_err(refused("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                let has = fe.get_queue_num().map_err(refused("GET_QUEUE_NUM"))?;
                if has < vrings as u64 {
                    let hint = "give the back-end more queues (qemu-storage-daemon: num-queues=) or this device fewer (queues=)";
                    return Err(VhostUserError::TooFewQueues { has, needs: vrings, hint });
                }
            }
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        Ok(Session { fe, offered, protocol })
    }

    pub(crate) fn has_enable(&self) -> bool {
        self.offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Hands `rings` to the back-end: features, memory table, and per ring
    /// its size, addresses, where it resumes, call, kick, enable.
    /// `restore`: the back-end is a new one taking over running rings.
    pub(crate) fn hand_over(&mut self, rings: &Rings, restore: bool) -> Result<(), String> {
        let step = |what: &'static str| move |e: vhost::Error| format!("{what}: {e}");
        let pf = if self.has_enable() { VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() } else { 0 };
        self.fe.set_features(rings.features | pf).map_err(step("SET_FEATURES"))?;
        let table = regions(&rings.mem);
        if table.iter().any(|r| r.mmap_handle < 0) {
            return Err("guest RAM is not shared memory, which a vhost-user back-end needs (a kickvm bug)".into());
        }
        self.fe.set_mem_table(&table).map_err(step("SET_MEM_TABLE"))?;
        for q in &rings.queues {
            let host = |a: u64| {
                rings.mem.get_host_address(GuestAddress(a)).map(|p| p as u64).map_err(|e| format!("queue {}: {e}", q.index))
            };
            let addr = VringConfigData {
                queue_max_size: q.size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: host(q.desc)?,
                used_ring_addr: host(q.used)?,
                avail_ring_addr: host(q.avail)?,
                log_addr: None,
            };
            let base = if restore { used_index(&rings.mem, q.used) } else { 0 };
            self.fe.set_vring_num(q.index, q.size).map_err(step("SET_VRING_NUM"))?;
            self.fe.set_vring_addr(q.index, &addr).map_err(step("SET_VRING_ADDR"))?;
            self.fe.set_vring_base(q.index, base).map_err(step("SET_VRING_BASE"))?;
            self.fe.set_vring_call(q.index, &q.call).map_err(step("SET_VRING_CALL"))?;
            self.fe.set_vring_kick(q.index, &q.kick).map_err(step("SET_VRING_KICK"))?;
            if self.has_enable() {
                self.fe.set_vring_enable(q.index, true).map_err(step("SET_VRING_ENABLE"))?;
            }
        }
        if restore {
            // Requests the guest queued while the back-end was away.
            for q in &rings.queues {
                let _ = q.kick.write(1);
            }
        }
        Ok(())
    }

    /// Stops every ring of `rings` (disable, then GET_VRING_BASE, after
    /// which the back-end touches them no more).
    pub(crate) fn stop(&mut self, rings: &Rings) -> Result<(), String> {
        for q in &rings.queues {
            if self.has_enable() {
                self.fe.set_vring_enable(q.index, false).map_err(|e| format!("SET_VRING_ENABLE: {e}"))?;
            }
            self.fe.get_vring_base(q.index).map_err(|e| format!("GET_VRING_BASE: {e}"))?;
        }
        Ok(())
    }

    /// Makes the `<name>-vhost` thread see a hang-up: after a refused or
    /// unanswered request the connection's state is unknown, and only a
    /// new one can be trusted.
    pub(crate) fn hang_up(&self) {
        // SAFETY: shutdown on a socket this session owns; no memory is
        // passed.
        unsafe { libc::shutdown(self.fe.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// Guest RAM as a vhost memory table describes it: each region's guest
/// address, where this process maps it, and (for a back-end in another
/// process) the memfd and offset it maps (`-1` where RAM is private).
pub(crate) fn regions(mem: &GuestMemory) -> Vec<VhostUserMemoryRegionInfo> {
    mem.iter()
        .map(|r| VhostUserMemoryRegionInfo {
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
            mmap_offset: r.file_offset().map_or(0, |fo| fo.start()),
            mmap_handle: r.file_offset().map_or(-1, |fo| fo.file().as_raw_fd()),
        })
        .collect()
}

/// The used ring's `idx`: how many requests the last back-end completed.
pub(crate) fn used_index(mem: &GuestMemory, used: u64) -> u16 {
    mem.read_obj::<u16>(GuestAddress(used + 2)).map(u16::from_le).unwrap_or(0)
}

/// One ring as the driver laid it out (guest addresses) and its eventfds.
pub(crate) struct Ring {
    pub(crate) index: usize,
    pub(crate) size: u16,
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
    /// The queue's KVM ioeventfd.
    pub(crate) kick: EventFd,
    /// The queue's MSI-X irqfd.
    pub(crate) call: EventFd,
}

impl From<QueueSetup> for Ring {
    fn from(s: QueueSetup) -> Ring {
        Ring {
            index: usize::from(s.index),
            size: s.queue.size(),
            desc: s.queue.desc_table(),
            avail: s.queue.avail_ring(),
            used: s.queue.used_ring(),
            kick: s.kick,
            call: s.call,
        }
    }
}

/// What the driver set up at DRIVER_OK: the back-end must serve this.
pub(crate) struct Rings {
    pub(crate) features: u64,
    pub(crate) mem: GuestMemory,
    pub(crate) queues: Vec<Ring>,
    pub(crate) config_call: Option<EventFd>,
}

