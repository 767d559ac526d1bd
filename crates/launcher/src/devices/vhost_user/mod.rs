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

use std::os::unix::fs::FileTypeExt;
use std::sync::{Arc, Mutex};

use kickvm_virtio::ratelimit::Throttle;
use kickvm_virtio::seccomp::SeccompMode;
use kickvm_virtio::{ActivateError, DeviceState, ExternalQueues, GuestMemory, QueueSetup, QueueWorker, VirtioDevice};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::VhostUserFrontend;
use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET, VIRTIO_ID_RNG};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceError, DeviceKind};
use crate::config::validate::MAX_SOCKET_PATH;
use crate::config::{err, ConfigError, VhostUserKind, VhostUserSpec, VmConfig};

mod link;
mod session;

use link::{watch, Inner, Link};
pub(crate) use link::MONITOR_SYSCALLS;
pub(crate) use session::{regions, Ring};
use session::{Rings, Session};

/// Feature bits a back-end offers that belong to vhost-user or to the
/// host, not to the device: never offered to the driver. PROTOCOL_FEATURES
/// (30), dirty logging (`VHOST_F_LOG_ALL`, 26), and ACCESS_PLATFORM (33,
/// an IOMMU kickvm does not have).
const NOT_FOR_DRIVER: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | (1 << 26) | (1 << 33);

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
