//! `--vhost-user TYPE,socket=PATH`: a virtio-pci device whose queues an
//! external vhost-user back-end serves (`kickvm backend`,
//! `qemu-storage-daemon`, any other), through the `vhost` crate's frontend.
//!
//! The launcher only sets the back-end up: at DRIVER_OK it sends the memory
//! table (guest RAM is a memfd, see [`crate::memory::Backing::for_config`])
//! and each ring's addresses, and hands over the queue's KVM ioeventfd as
//! the *kick* and its MSI-X irqfd as the *call*. A guest kick then wakes the
//! back-end's queue thread inside KVM, and the back-end raises the guest's
//! interrupt itself: no launcher thread is in the data path.
//!
//! # A back-end that goes away
//!
//! One thread per device, `<name>-vhost`, sleeps in `poll` on the socket and
//! is woken only when the back-end hangs up. It then marks the device
//! DEVICE_NEEDS_RESET and raises the configuration interrupt (what the
//! virtio spec gives a device to say it is broken), and tries to connect
//! again, backing off from 0.1 s to 2 s. When the back-end accepts again:
//!
//! - if the driver has not reset the device (Linux 6.1's virtio-blk and
//!   virtio-net never act on NEEDS_RESET), the rings are restored
//!   *transparently*: the same memory table and ring addresses, each ring
//!   resuming at the used index the guest sees (`used->idx`, in guest
//!   memory), each queue kicked once so requests made meanwhile are seen,
//!   and NEEDS_RESET cleared. The guest's requests waited; none failed.
//! - if the driver did reset (and perhaps set DRIVER_OK again meanwhile),
//!   the back-end gets the driver's new rings, from index 0.
//!
//! Why transparent: a guest whose driver ignores NEEDS_RESET would
//! otherwise keep a dead disk or NIC until someone rebinds its driver by
//! hand. The limit: resuming at `used->idx` is exact for a back-end that
//! completes each queue's requests in order (kickvm's back-ends, one thread
//! per queue, do) or that had nothing in flight; a back-end that completes
//! out of order and dies with requests in flight can have them replayed or
//! lost (QEMU solves that with INFLIGHT_SHMFD, which kickvm does not
//! implement). State a back-end keeps beyond the rings is the new
//! back-end's to rebuild: a multi-queue net back-end starts with one queue
//! pair active until the driver's next `VIRTIO_NET_CTRL_MQ` (the guest's
//! packets on the other pairs go nowhere meanwhile).

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kickvm_virtio::ratelimit::Throttle;
use kickvm_virtio::seccomp::SeccompMode;
use kickvm_virtio::{ActivateError, DeviceState, ExternalQueues, GuestMemory, QueueSetup, QueueWorker, VirtioDevice};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET, VIRTIO_ID_RNG};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceError, DeviceKind};
use crate::config::validate::MAX_SOCKET_PATH;
use crate::config::{err, ConfigError, VhostUserKind, VhostUserSpec, VmConfig};

/// The vhost-user protocol features this frontend implements; whatever
/// else a back-end offers (qemu-storage-daemon: INFLIGHT_SHMFD, STATUS,
/// BACKEND_REQ, ...) is masked off.
const PROTOCOL: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG);

/// Feature bits a back-end offers that belong to vhost-user or to the
/// host, not to the device: never offered to the driver. PROTOCOL_FEATURES
/// (30), dirty logging (`VHOST_F_LOG_ALL`, 26), and ACCESS_PLATFORM (33,
/// an IOMMU kickvm does not have).
const NOT_FOR_DRIVER: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | (1 << 26) | (1 << 33);

/// How long a back-end may take to answer one message before the launcher
/// takes it for dead: a vCPU waits for the answer (a guest's DRIVER_OK or
/// reset), so a hung back-end must not hang it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnection attempts: the first after this long, then twice as long
/// each time up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The bytes of `virtio_blk_config` up to `write_zeroes_may_unmap` and its
/// padding: what QEMU 7.2's back-ends (qemu-storage-daemon) serve; they
/// refuse a longer GET_CONFIG.
const BLK_CONFIG_LEN: u32 = 60;
/// `num_queues` in `virtio_blk_config`.
const BLK_NUM_QUEUES_AT: usize = 34;
const VIRTIO_BLK_F_MQ: u32 = 12;
/// `virtio_net_config` up to `mtu`: MAC, status, queue pairs, MTU.
const NET_CONFIG_LEN: u32 = 12;
/// `max_virtqueue_pairs` in `virtio_net_config`.
const NET_PAIRS_AT: usize = 8;
/// virtio-net features that live in its configuration space.
const NET_CONFIG_FEATURES: u64 = (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MAC)
    | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_STATUS)
    | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MTU)
    | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MQ)
    | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_SPEED_DUPLEX);
/// virtio-console features this frontend does not relay (they need its
/// configuration space or multiport control, which kickvm's guests do not
/// use): size, multiport, emergency write.
const CONSOLE_UNRELAYED: u64 = 0b111;

/// What a vCPU does beyond its own list when a vhost-user device's driver
/// sets DRIVER_OK or resets it: messages (with fds) on the socket, and
/// shutting the socket down when the back-end misbehaves.
pub const SYSCALLS: &[i64] = &[libc::SYS_sendmsg, libc::SYS_recvmsg, libc::SYS_shutdown];

/// The `<name>-vhost` thread's own calls: sleep on the socket and its stop
/// eventfd, connect again, and talk to the back-end.
const MONITOR_SYSCALLS: &[i64] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_setsockopt,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_dup,
];

/// The "served by" lines of the devices set up so far.
static SERVED: Throttle = Throttle::new();

pub struct VhostUsers;

impl DeviceKind for VhostUsers {
    fn syscalls(&self) -> &'static [i64] {
        SYSCALLS
    }
    fn count(&self, cfg: &VmConfig) -> usize {
        cfg.vhost_users.len()
    }
    fn check(&self, cfg: &VmConfig) -> Result<(), ConfigError> {
        for (i, s) in cfg.vhost_users.iter().enumerate() {
            check_socket(s)?;
            if cfg.vhost_users[..i].iter().any(|o| o.socket == s.socket) {
                return err(format!("{}: the socket is given twice; a back-end serves one frontend", s.describe()));
            }
        }
        Ok(())
    }
    fn build(&self, cfg: &VmConfig, out: &mut Vec<Box<dyn VirtioDevice>>) -> Result<(), DeviceError> {
        for (i, s) in cfg.vhost_users.iter().enumerate() {
            let dev = VhostUserDevice::connect(&format!("vu{}{i}", s.kind.word()), s, cfg.seccomp)
                .map_err(|source| DeviceError::VhostUser { spec: s.describe(), source })?;
            out.push(Box::new(dev));
        }
        Ok(())
    }
}

/// The socket is a path a unix socket can have, and a socket is there.
fn check_socket(s: &VhostUserSpec) -> Result<(), ConfigError> {
    let d = s.describe();
    if s.socket.as_os_str().len() > MAX_SOCKET_PATH {
        return err(format!("{d}: a unix socket path is at most {MAX_SOCKET_PATH} bytes; use a shorter one"));
    }
    match std::fs::metadata(&s.socket) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => err(format!("{d}: not a unix socket")),
        Err(e) => err(format!(
            "{d}: {}; start the back-end first (e.g. kickvm backend {} --socket {} ...)",
            crate::config::io_reason(&e),
            s.kind.word(),
            s.socket.display()
        )),
    }
}

/// Why a vhost-user device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("cannot connect: {0}; is the back-end running?")]
    Connect(std::io::Error),
    #[error("the back-end refused {what}: {source}")]
    Protocol { what: &'static str, source: vhost::Error },
    #[error("the back-end does not offer VIRTIO_F_VERSION_1 (kickvm's virtio-pci is virtio 1.x only)")]
    NotVersion1,
    #[error("the back-end serves {has} queues and this device needs {needs}; {hint}")]
    TooFewQueues { has: u64, needs: usize, hint: &'static str },
    #[error("the back-end has no configuration space (vhost-user CONFIG), which a virtio-blk device needs")]
    NoConfig,
}

/// One connection to the back-end, negotiated.
struct Session {
    fe: Frontend,
    /// The virtio features the back-end offers.
    offered: u64,
    protocol: VhostUserProtocolFeatures,
}

impl Session {
    /// Connects to `socket` and negotiates: owner, features, the protocol
    /// features both sides have, the number of queues, and an ack for
    /// every request where the back-end can give one.
    fn open(socket: &Path, vrings: usize) -> Result<Session, VhostUserError> {
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

    fn has_enable(&self) -> bool {
        self.offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Hands `rings` to the back-end: features, memory table, and per ring
    /// its size, addresses, where it resumes, call, kick, enable.
    /// `restore`: the back-end is a new one taking over running rings.
    fn hand_over(&mut self, rings: &Rings, restore: bool) -> Result<(), String> {
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
    fn stop(&mut self, rings: &Rings) -> Result<(), String> {
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
    fn hang_up(&self) {
        // SAFETY: shutdown on a socket this session owns; no memory is
        // passed.
        unsafe { libc::shutdown(self.fe.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// Guest RAM as a vhost memory table describes it: each region's guest
/// address, where this process maps it, and (for a back-end in another
/// process) the memfd and offset it maps (`-1` where RAM is private).
pub(super) fn regions(mem: &GuestMemory) -> Vec<VhostUserMemoryRegionInfo> {
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
fn used_index(mem: &GuestMemory, used: u64) -> u16 {
    mem.read_obj::<u16>(GuestAddress(used + 2)).map(u16::from_le).unwrap_or(0)
}

/// One ring as the driver laid it out (guest addresses) and its eventfds.
pub(super) struct Ring {
    pub index: usize,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The queue's KVM ioeventfd.
    pub kick: EventFd,
    /// The queue's MSI-X irqfd.
    pub call: EventFd,
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
struct Rings {
    features: u64,
    mem: GuestMemory,
    queues: Vec<Ring>,
    config_call: Option<EventFd>,
}

/// The device's side of the connection, shared by the vCPUs (DRIVER_OK,
/// reset, configuration writes) and the `<name>-vhost` thread.
struct Link {
    name: String,
    spec: VhostUserSpec,
    vrings: usize,
    /// Written to end the `<name>-vhost` thread.
    stop: EventFd,
    state: Arc<DeviceState>,
    inner: Mutex<Inner>,
    /// Log lines about the back-end coming and going, and about a driver
    /// starting the device while it is away: a back-end that crashes in a
    /// loop, or a guest that resets in a loop, must not flood the log.
    gone: Throttle,
    back: Throttle,
    refused: Throttle,
    waiting: Throttle,
}

struct Inner {
    /// `None` while the back-end is away.
    session: Option<Session>,
    /// The driver's rings while the device is live.
    rings: Option<Rings>,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start(&self, rings: Rings) {
        let mut inner = self.lock();
        let Inner { session, rings: live } = &mut *inner;
        let rings = live.insert(rings);
        match session {
            Some(s) => {
                if let Err(e) = s.hand_over(rings, false) {
                    kickvm_virtio::warn_limited!(self.refused, "{}: back-end refused the rings: {e}; connecting again", self.name);
                    s.hang_up();
                }
            }
            None => kickvm_virtio::warn_limited!(self.waiting, "{}: the back-end is away; the device starts when it is back", self.name),
        }
    }

    fn reset(&self) {
        let mut inner = self.lock();
        let Inner { session, rings } = &mut *inner;
        if let (Some(s), Some(r)) = (session.as_mut(), rings.take()) {
            if let Err(e) = s.stop(&r) {
                kickvm_virtio::warn_limited!(self.refused, "{}: back-end refused to stop the rings: {e}; connecting again", self.name);
                s.hang_up();
            }
        }
    }

    /// The back-end hung up: forget the session, tell the driver, and
    /// leave the rings to the next back-end.
    fn lost(&self) {
        let mut inner = self.lock();
        inner.session = None;
        let live = inner.rings.as_ref();
        kickvm_virtio::warn_limited!(
            self.gone,
            "{}: vhost-user back-end on {} hung up{}; connecting again",
            self.name,
            self.spec.socket.display(),
            if live.is_some() { "; its queues wait, DEVICE_NEEDS_RESET set" } else { "" }
        );
        if let Some(r) = live {
            self.state.needs_reset.store(true, Ordering::SeqCst);
            if let Some(c) = &r.config_call {
                let _ = c.write(1);
            }
        }
    }

    /// A back-end accepted again: give it the live rings, if any.
    fn back(&self, mut s: Session) -> bool {
        let mut inner = self.lock();
        if let Some(r) = &inner.rings {
            if let Err(e) = s.hand_over(r, true) {
                kickvm_virtio::warn_limited!(self.refused, "{}: new back-end refused the rings: {e}", self.name);
                return false;
            }
            self.state.needs_reset.store(false, Ordering::SeqCst);
        }
        let what = inner.rings.as_ref().map_or(String::new(), |r| format!("; {} rings restored", r.queues.len()));
        kickvm_virtio::warn_limited!(self.back, "{}: vhost-user back-end on {} is back{what}", self.name, self.spec.socket.display());
        inner.session = Some(s);
        true
    }

    /// The socket while connected.
    fn socket_fd(&self) -> Option<RawFd> {
        self.lock().session.as_ref().map(|s| s.fe.as_raw_fd())
    }
}

/// What `<name>-vhost` woke up for.
enum Woken {
    Stop,
    HungUp,
    Timeout,
}

/// Sleeps until `stop` is written, `socket` (if any) hangs up, or
/// `timeout` passes.
fn sleep_on(stop: &EventFd, socket: Option<RawFd>, timeout: Option<Duration>) -> Woken {
    let mut fds = vec![libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    if let Some(fd) = socket {
        // Not POLLIN: replies to a vCPU's requests are not ours to see.
        fds.push(libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 });
    }
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return Woken::Timeout; // also EINTR: look again
    }
    if fds[0].revents != 0 {
        Woken::Stop
    } else if fds.get(1).is_some_and(|f| f.revents != 0) {
        Woken::HungUp
    } else {
        Woken::Timeout
    }
}

/// The `<name>-vhost` thread: asleep while the back-end is there,
/// reconnecting while it is not.
fn watch(link: Arc<Link>, seccomp: SeccompMode) {
    if let Err(e) = kickvm_virtio::seccomp::apply("vhost-user", &[MONITOR_SYSCALLS], seccomp) {
        log::error!("{}: {e}", link.name);
        return;
    }
    let mut retry = RETRY_MIN;
    // Failed attempts since the back-end went away: the hang-up was said
    // once; its absence is said again after 16, 32, 64, ... attempts.
    let mut attempts = 0u64;
    loop {
        match link.socket_fd() {
            Some(fd) => match sleep_on(&link.stop, Some(fd), None) {
                Woken::Stop => return,
                Woken::HungUp => link.lost(),
                Woken::Timeout => {}
            },
            None => {
                if let Woken::Stop = sleep_on(&link.stop, None, Some(retry)) {
                    return;
                }
                let ok = match Session::open(&link.spec.socket, link.vrings) {
                    Ok(s) => link.back(s),
                    Err(e) => {
                        attempts += 1;
                        if attempts >= 16 && attempts.is_power_of_two() {
                            log::warn!("{}: back-end still away after {attempts} attempts: {e}", link.name);
                        }
                        false
                    }
                };
                if ok {
                    attempts = 0;
                }
                retry = if ok { RETRY_MIN } else { (retry * 2).min(RETRY_MAX) };
            }
        }
    }
}

/// A virtio device served by a vhost-user back-end.
pub struct VhostUserDevice {
    name: String,
    device_type: u32,
    queue_sizes: Vec<u16>,
    /// What the driver is offered: the back-end's features, less what is
    /// vhost-user's own or not relayed.
    features: u64,
    /// The device's configuration space as the back-end gave it, with the
    /// queue count set to this device's.
    config: Vec<u8>,
    state: Arc<DeviceState>,
    link: Arc<Link>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

impl VhostUserDevice {
    /// Connects to the back-end, negotiates, reads its configuration space
    /// and starts the `<name>-vhost` thread.
    pub fn connect(name: &str, spec: &VhostUserSpec, seccomp: SeccompMode) -> Result<VhostUserDevice, VhostUserError> {
        // The queue count may depend on the configuration space (blk
        // without queues=), which needs a session: negotiate with as many
        // queues as asked, then check the back-end's count.
        let asked = vrings_asked(spec);
        let mut s = Session::open(&spec.socket, asked)?;
        let has_config = s.protocol.contains(VhostUserProtocolFeatures::CONFIG);
        let mut features = s.offered & !NOT_FOR_DRIVER;
        let mut config = Vec::new();
        let refused = |what| move |source| VhostUserError::Protocol { what, source };
        let (device_type, vrings) = match spec.kind {
            VhostUserKind::Blk => {
                if !has_config {
                    return Err(VhostUserError::NoConfig);
                }
                let len = BLK_CONFIG_LEN;
                let (_, c) = s.fe.get_config(0, len, VhostUserConfigFlags::WRITABLE, &vec![0; len as usize]).map_err(refused("GET_CONFIG"))?;
                config = c;
                let mq = features & (1 << VIRTIO_BLK_F_MQ) != 0;
                let served = if mq { u16::from_le_bytes([config[BLK_NUM_QUEUES_AT], config[BLK_NUM_QUEUES_AT + 1]]).max(1) } else { 1 };
                let n = spec.queues.unwrap_or(served);
                if n > served {
                    let hint = "give the back-end more (qemu-storage-daemon: num-queues=) or this device fewer (queues=)";
                    return Err(VhostUserError::TooFewQueues { has: u64::from(served), needs: usize::from(n), hint });
                }
                if mq {
                    config[BLK_NUM_QUEUES_AT..BLK_NUM_QUEUES_AT + 2].copy_from_slice(&n.to_le_bytes());
                }
                (VIRTIO_ID_BLOCK, usize::from(n))
            }
            VhostUserKind::Net => {
                let pairs = spec.queues.unwrap_or(1);
                let mq = features & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MQ) != 0;
                if has_config {
                    let len = NET_CONFIG_LEN;
                    let (_, c) = s.fe.get_config(0, len, VhostUserConfigFlags::WRITABLE, &vec![0; len as usize]).map_err(refused("GET_CONFIG"))?;
                    config = c;
                } else {
                    features &= !NET_CONFIG_FEATURES;
                }
                let served = if mq && has_config { u16::from_le_bytes([config[NET_PAIRS_AT], config[NET_PAIRS_AT + 1]]).max(1) } else { 1 };
                if pairs > served {
                    let hint = "start the back-end with more queue pairs (kickvm backend net tap=T,queues=N) or give this device fewer (queues=)";
                    return Err(VhostUserError::TooFewQueues { has: u64::from(served), needs: usize::from(pairs), hint });
                }
                if pairs == 1 {
                    features &= !(1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MQ);
                } else {
                    config[NET_PAIRS_AT..NET_PAIRS_AT + 2].copy_from_slice(&pairs.to_le_bytes());
                }
                let ctrl = features & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ) != 0;
                (VIRTIO_ID_NET, 2 * usize::from(pairs) + usize::from(ctrl))
            }
            VhostUserKind::Console => {
                features &= !CONSOLE_UNRELAYED;
                (VIRTIO_ID_CONSOLE, 2)
            }
            VhostUserKind::Rng => (VIRTIO_ID_RNG, 1),
        };
        if vrings != asked {
            // The count changed with the configuration (blk): check it with
            // the back-end on a fresh session.
            s = Session::open(&spec.socket, vrings)?;
        }
        let state = DeviceState::new(vrings);
        let link = Arc::new(Link {
            name: name.to_string(),
            spec: spec.clone(),
            vrings,
            stop: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK).map_err(VhostUserError::Connect)?,
            state: state.clone(),
            inner: Mutex::new(Inner { session: Some(s), rings: None }),
            gone: Throttle::new(),
            back: Throttle::new(),
            refused: Throttle::new(),
            waiting: Throttle::new(),
        });
        let l = link.clone();
        let watcher = std::thread::Builder::new()
            .name(format!("{name}-vhost"))
            .spawn(move || watch(l, seccomp))
            .map_err(VhostUserError::Connect)?;
        // Said at the first boots only: a guest rebooting in a loop must
        // not repeat it forever.
        if SERVED.hit().is_some() {
            log::info!(
                "{name}: {} served by the vhost-user back-end on {} (queues: {vrings})",
                spec.kind.word(),
                spec.socket.display()
            );
        }
        Ok(VhostUserDevice {
            name: name.to_string(),
            device_type,
            queue_sizes: vec![spec.queue_size; vrings],
            features,
            config,
            state,
            link,
            watcher: Some(watcher),
        })
    }
}

/// Queues asked for before the back-end's configuration is known.
fn vrings_asked(spec: &VhostUserSpec) -> usize {
    let n = usize::from(spec.queues.unwrap_or(1));
    match spec.kind {
        VhostUserKind::Blk => n,
        // With the control queue.
        VhostUserKind::Net => 2 * n + 1,
        VhostUserKind::Console => 2,
        VhostUserKind::Rng => 1,
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        let _ = self.link.stop.write(1);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

impl VirtioDevice for VhostUserDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn device_type(&self) -> u32 {
        self.device_type
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        self.queue_sizes.clone()
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn config_space(&self) -> Vec<u8> {
        self.config.clone()
    }
    /// The driver's write goes to the back-end too (virtio-blk's `wce`).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Some(end) = usize::try_from(offset).ok().and_then(|o| o.checked_add(data.len())) else { return };
        let Some(bytes) = self.config.get_mut(end - data.len()..end) else { return };
        bytes.copy_from_slice(data);
        let mut inner = self.link.lock();
        if let Some(s) = inner.session.as_mut().filter(|s| s.protocol.contains(VhostUserProtocolFeatures::CONFIG)) {
            if let Err(e) = s.fe.set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data) {
                kickvm_virtio::warn_limited!(self.link.refused, "{}: back-end refused SET_CONFIG: {e}", self.name);
            }
        }
    }
    fn activate(&mut self, _features: u64) -> Result<Vec<Box<dyn QueueWorker>>, ActivateError> {
        Err(ActivateError::Backend("a vhost-user back-end serves this device's queues".into()))
    }
    fn reset(&mut self) {
        self.link.reset();
    }
    fn state(&self) -> Arc<DeviceState> {
        self.state.clone()
    }
    fn external(&mut self) -> Option<&mut dyn ExternalQueues> {
        Some(self)
    }
}

impl ExternalQueues for VhostUserDevice {
    fn start(
        &mut self,
        features: u64,
        mem: &GuestMemory,
        queues: Vec<QueueSetup>,
        config_call: Option<EventFd>,
    ) -> Result<(), ActivateError> {
        let queues = queues.into_iter().map(Ring::from).collect();
        self.link.start(Rings { features, mem: mem.clone(), queues, config_call });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `<dev>-vhost` thread may reconnect (socket, connect) but not
    /// open files or start programs.
    #[test]
    fn the_vhost_thread_is_refused_files_and_programs() {
        let r = std::thread::spawn(|| {
            kickvm_virtio::seccomp::apply("vhost-user", &[MONITOR_SYSCALLS], SeccompMode::On).unwrap();
            let open = std::fs::File::open("/proc/self/status").map(|_| ()).map_err(|e| e.raw_os_error());
            let exec = std::process::Command::new("/bin/true").status().map(|_| ()).map_err(|e| e.raw_os_error());
            // SAFETY: socket(2) with constant arguments; the fd is closed.
            let sock = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            if sock >= 0 {
                // SAFETY: closes the fd just created.
                unsafe { libc::close(sock) };
            }
            (open, exec, sock >= 0)
        })
        .join()
        .unwrap();
        assert_eq!(r.0, Err(Some(libc::EPERM)), "open");
        assert!(r.1.is_err(), "execve");
        assert!(r.2, "socket is needed to reconnect");
    }

    #[test]
    fn the_memory_table_names_the_memfd() {
        let ram = crate::memory::create(64 << 20, crate::memory::Backing::Shared).unwrap();
        let t = regions(&ram.mem);
        assert_eq!(t.len(), 1);
        assert!(t[0].mmap_handle >= 0);
        assert_eq!((t[0].guest_phys_addr, t[0].memory_size, t[0].mmap_offset), (0, 64 << 20, 0));
        let private = crate::memory::create(64 << 20, crate::memory::Backing::Private).unwrap();
        assert!(regions(&private.mem).iter().all(|r| r.mmap_handle < 0));
    }
}
