//! One frontend connection: the vhost-user requests, turned into
//! `kickvm_virtio::activate` / `ActiveDevice::stop` of the device's queue
//! threads.
//!
//! A ring runs when the frontend has given it everything (size, addresses,
//! base, kick eventfd: SET_VRING_KICK starts it) and enabled it
//! (SET_VRING_ENABLE; without PROTOCOL_FEATURES a ring starts enabled),
//! and guest memory is mapped. GET_VRING_BASE stops it. Whenever what
//! should run changes — a ring starts or stops, the memory table or a
//! running ring's call eventfd changes — every queue thread of the device
//! stops, the change is made, and the threads start again where they
//! stopped, on the current guest memory ([`Connection::change`]). That is
//! the one place a queue thread's inputs change, so none can keep an old
//! mapping or an old eventfd; it costs a few thread restarts while the
//! frontend sets up.
//!
//! Where a stopped ring resumes: at its *used* index. kickvm's workers
//! return chains in the order they took them; a chain taken but not yet
//! used is one the worker was holding (net receive holds guest buffers
//! while it waits for a packet), and rewinding the avail index to the used
//! index hands those chains back to the ring instead of losing them. So
//! GET_VRING_BASE answers the used index, which is also what QEMU assumes
//! after a back-end disconnects (it restarts from the used index in guest
//! memory).
//!
//! Every refusal is one log line naming the request and why; the
//! connection goes on (or, for a request whose reply we cannot give,
//! [`Connection::must_close`] asks the caller to drop it).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::Arc;

use kickvm_virtio::{activate, ActiveDevice, QueueSetup, Runtime, VirtioDevice};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight, VhostUserLog,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::{RegionDesc, RegionTable, MAX_MEM_SLOTS};

/// The protocol features we implement. Not INFLIGHT_SHMFD or STATUS (the
/// vhost crate's handler does not carry them through), not LOG_SHMFD (no
/// dirty logging, so no live migration).
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// The largest device configuration space a frontend may read or write
/// (virtio-pci gives it at most a page; ours are under 64 bytes).
const MAX_CONFIG_LEN: u32 = 256;

/// Ring addresses as the frontend gave them: its own user addresses.
#[derive(Debug, Clone, Copy)]
struct RingAddr {
    desc: u64,
    avail: u64,
    used: u64,
}

/// What the frontend told us about one virtqueue.
#[derive(Default)]
struct Vring {
    size: u16,
    addr: Option<RingAddr>,
    /// Where the ring starts (SET_VRING_BASE) or stopped.
    base: u16,
    kick: Option<EventFd>,
    call: Option<EventFd>,
    /// SET_VRING_KICK came and no GET_VRING_BASE since.
    started: bool,
    enabled: bool,
    /// Its queue thread runs.
    running: bool,
}

/// The back-end state of one frontend connection, around one device.
pub struct Connection {
    device: Box<dyn VirtioDevice>,
    runtime: Arc<Runtime>,
    owner: bool,
    /// Virtio features the frontend acked (PROTOCOL_FEATURES included).
    acked: u64,
    memory: RegionTable,
    vrings: Vec<Vring>,
    active: Option<ActiveDevice>,
    /// A request we could not answer: the frontend is waiting for a reply
    /// that will not come, so the connection must end.
    close: bool,
    /// A SET_VRING_ENABLE came before PROTOCOL_FEATURES was negotiated
    /// (see [`Connection::enable_came_early`]).
    early_enable: bool,
}

/// Refuses the current request with one log line (rate-limited: a
/// frontend can repeat a bad request, or reconnect and repeat it, without
/// end).
fn refuse<T>(what: &str, why: impl std::fmt::Display) -> Result<T> {
    kickvm_virtio::warn_limited!(crate::REFUSED, "vhost-user {what} refused: {why}");
    Err(Error::ReqHandlerError(std::io::Error::other(format!("{what}: {why}"))))
}

impl Connection {
    pub fn new(device: Box<dyn VirtioDevice>, runtime: Arc<Runtime>) -> Connection {
        let queues = device.queue_max_sizes().len();
        Connection {
            device,
            runtime,
            owner: false,
            acked: 0,
            memory: RegionTable::default(),
            vrings: (0..queues).map(|_| Vring::default()).collect(),
            active: None,
            close: false,
            early_enable: false,
        }
    }

    /// Stops the queue threads and gives the device back, reset, for the
    /// next frontend.
    pub fn finish(mut self) -> Box<dyn VirtioDevice> {
        self.stop_threads();
        self.device.reset();
        self.device
    }

    /// The vhost crate refused a SET_VRING_ENABLE sent before
    /// PROTOCOL_FEATURES was negotiated. QEMU 7.2 does that for net: it
    /// enables the rings when the device is created, before SET_FEATURES,
    /// and never again, so a back-end that drops those requests never
    /// serves a packet. The request's index and value are not known here;
    /// every ring is taken as enabled once the features are set (an
    /// explicit SET_VRING_ENABLE(0) afterwards still disables one).
    pub fn enable_came_early(&mut self) {
        self.early_enable = true;
    }

    /// True after a request whose reply could not be given.
    pub fn must_close(&self) -> bool {
        self.close
    }

    /// Rings whose queue threads run now (for tests and logs).
    pub fn running(&self) -> Vec<u16> {
        (0..self.vrings.len()).filter(|&i| self.vrings[i].running).map(|i| i as u16).collect()
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_negotiated(&self) -> bool {
        self.acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    fn vring(&mut self, what: &str, index: u32) -> Result<&mut Vring> {
        let n = self.vrings.len();
        match usize::try_from(index).ok().and_then(|i| self.vrings.get_mut(i)) {
            Some(v) => Ok(v),
            None => refuse(what, format!("queue {index} does not exist (the device has {n})")),
        }
    }

    /// A ring already kicked and enabled whose size, addresses or base
    /// came later (messages out of the usual order) may now have all it
    /// needs: start it. Other rings' threads are left alone otherwise.
    fn start_if_ready(&mut self, index: u32) -> Result<()> {
        match self.vrings.get(index as usize) {
            Some(v) if v.started && v.enabled && !v.running => self.change(|_| Ok(())),
            _ => Ok(()),
        }
    }

    /// Makes a change with every queue thread stopped, then starts the
    /// rings that should run. See the module doc.
    fn change<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let was: Vec<bool> = self.vrings.iter().map(|v| v.running).collect();
        self.stop_threads();
        let r = f(self);
        self.start_threads(&was);
        r
    }

    /// Stops the queue threads; each ring remembers where it stopped (its
    /// used index: see the module doc).
    fn stop_threads(&mut self) {
        let Some(mut active) = self.active.take() else { return };
        for s in active.stop() {
            if let Some(v) = self.vrings.get_mut(usize::from(s.index)) {
                if s.next_avail != s.next_used {
                    log::debug!(
                        "queue {}: {} chains taken but not used go back to the ring",
                        s.index,
                        s.next_avail.wrapping_sub(s.next_used)
                    );
                }
                v.base = s.next_used;
            }
        }
        for v in &mut self.vrings {
            v.running = false;
        }
    }

    /// Starts a thread for every ring that is started, enabled and lies in
    /// guest memory. `was`: which rings ran before the change (they get
    /// one interrupt, in case the stop swallowed one).
    fn start_threads(&mut self, was: &[bool]) {
        let Some(mem) = self.memory.guest_memory() else { return };
        let max = self.device.queue_max_sizes();
        let mut setups = Vec::new();
        for (i, v) in self.vrings.iter().enumerate() {
            if !(v.started && v.enabled) {
                continue;
            }
            match self.queue_setup(i, v, max.get(i).copied().unwrap_or(0), &mem) {
                Ok(s) => setups.push(s),
                Err(why) => kickvm_virtio::warn_limited!(crate::QUEUES_NOT_RUN, "vhost-user: queue {i} cannot run: {why}"),
            }
        }
        if setups.is_empty() {
            return;
        }
        let indexes: Vec<u16> = setups.iter().map(|s| s.index).collect();
        let features = self.acked & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        match activate(&mut *self.device, features, &mem, setups, &self.runtime, None) {
            Ok(active) => {
                self.active = Some(active);
                for &i in &indexes {
                    let v = &mut self.vrings[usize::from(i)];
                    v.running = true;
                    if was.get(usize::from(i)).copied().unwrap_or(false) {
                        if let Some(call) = &v.call {
                            let _ = call.write(1);
                        }
                    }
                }
                log::debug!("vhost-user: {} serves queues {indexes:?}", self.device.name());
            }
            Err(e) => kickvm_virtio::warn_limited!(
                crate::QUEUES_NOT_RUN,
                "vhost-user: cannot start the queues of {}: {e}",
                self.device.name()
            ),
        }
    }

    /// The queue as the device's thread will see it: sizes, ring addresses
    /// translated to guest addresses, base, eventfds.
    fn queue_setup(&self, i: usize, v: &Vring, max: u16, mem: &kickvm_virtio::GuestMemory) -> std::result::Result<QueueSetup, String> {
        let addr = v.addr.ok_or("its ring addresses were never set")?;
        let kick = v.kick.as_ref().ok_or("it has no kick eventfd")?;
        let kick = kick.try_clone().map_err(|e| format!("cannot duplicate its kick eventfd: {e}"))?;
        let call = match &v.call {
            Some(c) => c.try_clone(),
            // No call eventfd (yet): interrupts go nowhere.
            None => EventFd::new(libc::EFD_NONBLOCK),
        }
        .map_err(|e| format!("cannot set up its call eventfd: {e}"))?;
        let size = u64::from(v.size);
        let translate = |what: &str, user: u64, len: u64| {
            self.memory
                .user_to_guest(user, len)
                .ok_or_else(|| format!("its {what} ring at user address {user:#x} (+{len:#x}) is outside guest memory"))
        };
        let desc = translate("descriptor", addr.desc, 16 * size)?;
        let avail = translate("avail", addr.avail, 6 + 2 * size)?;
        let used = translate("used", addr.used, 6 + 8 * size)?;
        let mut queue = Queue::new(max).map_err(|e| format!("bad maximum size {max}: {e}"))?;
        // The `try_` setters: the plain ones log an `error!` per refusal,
        // which a frontend could repeat without end.
        let bad = |what: &str, e: virtio_queue::Error| format!("{what}: {e}");
        queue.try_set_size(v.size).map_err(|e| bad("ring size", e))?;
        queue.try_set_desc_table_address(vm_memory::GuestAddress(desc)).map_err(|e| bad("descriptor table", e))?;
        queue.try_set_avail_ring_address(vm_memory::GuestAddress(avail)).map_err(|e| bad("avail ring", e))?;
        queue.try_set_used_ring_address(vm_memory::GuestAddress(used)).map_err(|e| bad("used ring", e))?;
        queue.set_next_avail(v.base);
        queue.set_next_used(v.base);
        queue.set_ready(true);
        if !kickvm_virtio::queue::rings_fit(&queue, mem) {
            return Err(format!("size {} or ring addresses are not valid in guest memory", v.size));
        }
        Ok(QueueSetup { index: i as u16, queue, kick, call })
    }
}

/// An fd the frontend passed as a kick or call: it must be an eventfd
/// (a queue thread blocks reading it, and the frontend writes it).
fn eventfd_from(what: &str, file: File) -> Result<EventFd> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap_or_default();
    if link.as_os_str() != "anon_inode:[eventfd]" {
        return refuse(what, format!("the fd passed is not an eventfd ({})", link.display()));
    }
    // SAFETY: the fd is an open eventfd that `file` owned; ownership moves
    // to the EventFd.
    Ok(unsafe { EventFd::from_raw_fd(file.into_raw_fd()) })
}

impl VhostUserBackendReqHandlerMut for Connection {
    fn set_owner(&mut self) -> Result<()> {
        if self.owner {
            return refuse("SET_OWNER", "the connection already has an owner");
        }
        self.owner = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.reset_device()
    }

    fn reset_device(&mut self) -> Result<()> {
        self.stop_threads();
        self.device.reset();
        let queues = self.vrings.len();
        self.vrings = (0..queues).map(|_| Vring::default()).collect();
        self.acked = 0;
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.offered_features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        log::debug!("vhost-user SET_FEATURES {features:#x}");
        let unknown = features & !self.offered_features();
        if unknown != 0 {
            return refuse("SET_FEATURES", format!("features {unknown:#x} were not offered"));
        }
        self.change(|c| {
            c.acked = features;
            // Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE:
            // rings are enabled from the start.
            // Neither is there when it came too early (see
            // `enable_came_early`).
            if !c.protocol_negotiated() || std::mem::take(&mut c.early_enable) {
                for v in &mut c.vrings {
                    v.enabled = true;
                }
            }
            Ok(())
        })
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        log::debug!("vhost-user SET_MEM_TABLE with {} regions", regions.len());
        let descs: Vec<RegionDesc> = regions
            .iter()
            .map(|r| RegionDesc {
                guest_addr: r.guest_phys_addr,
                size: r.memory_size,
                user_addr: r.user_addr,
                mmap_offset: r.mmap_offset,
            })
            .collect();
        self.change(|c| match c.memory.replace(&descs, files) {
            Ok(()) => Ok(None),
            Err(e) => refuse("SET_MEM_TABLE", e),
        })
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let max = self.device.queue_max_sizes().get(index as usize).copied().unwrap_or(0);
        let v = self.vring("SET_VRING_NUM", index)?;
        if num == 0 || !num.is_power_of_two() || num > u32::from(max) {
            return refuse("SET_VRING_NUM", format!("queue {index}: size {num} (use a power of two up to {max})"));
        }
        if v.running {
            return refuse("SET_VRING_NUM", format!("queue {index} is running"));
        }
        v.size = num as u16;
        self.start_if_ready(index)
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        let v = self.vring("SET_VRING_ADDR", index)?;
        if v.running {
            return refuse("SET_VRING_ADDR", format!("queue {index} is running"));
        }
        let size = u64::from(v.size.max(1));
        v.addr = Some(RingAddr { desc: descriptor, avail: available, used });
        // Checked again when the ring starts, on the memory of that time.
        if !self.memory.is_empty() {
            let ok = self.memory.user_to_guest(descriptor, 16 * size).is_some()
                && self.memory.user_to_guest(available, 6 + 2 * size).is_some()
                && self.memory.user_to_guest(used, 6 + 8 * size).is_some();
            if !ok {
                self.vrings[index as usize].addr = None;
                return refuse("SET_VRING_ADDR", format!("queue {index}: a ring is outside guest memory"));
            }
        }
        self.start_if_ready(index)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let v = self.vring("SET_VRING_BASE", index)?;
        if v.running {
            return refuse("SET_VRING_BASE", format!("queue {index} is running"));
        }
        let Ok(base) = u16::try_from(base) else {
            return refuse("SET_VRING_BASE", format!("queue {index}: base {base} does not fit a split ring"));
        };
        v.base = base;
        self.start_if_ready(index)
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        log::debug!("vhost-user GET_VRING_BASE {index}");
        if self.vring("GET_VRING_BASE", index).is_err() {
            // The frontend waits for a reply we cannot give.
            self.close = true;
            return Err(Error::InvalidParam);
        }
        self.change(|c| {
            let v = &mut c.vrings[index as usize];
            v.started = false;
            v.kick = None;
            v.call = None;
            Ok(VhostUserVringState::new(index, u32::from(v.base)))
        })
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        log::debug!("vhost-user SET_VRING_KICK {index}");
        self.vring("SET_VRING_KICK", index.into())?;
        let Some(file) = fd else {
            return refuse("SET_VRING_KICK", format!("queue {index}: polling without a kick eventfd is not supported"));
        };
        let kick = eventfd_from("SET_VRING_KICK", file)?;
        self.change(|c| {
            let v = &mut c.vrings[usize::from(index)];
            v.kick = Some(kick);
            v.started = true;
            Ok(())
        })
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.vring("SET_VRING_CALL", index.into())?;
        let call = match fd {
            Some(f) => Some(eventfd_from("SET_VRING_CALL", f)?),
            None => None,
        };
        let running = self.vrings[usize::from(index)].running;
        let set = |c: &mut Self| {
            c.vrings[usize::from(index)].call = call;
            Ok(())
        };
        if running {
            self.change(set)
        } else {
            set(self)
        }
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> Result<()> {
        // Errors are counted and reported through virtio status, not here.
        self.vring("SET_VRING_ERR", index.into()).map(|_| ())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        match VhostUserProtocolFeatures::from_bits(features) {
            Some(f) if protocol_features().contains(f) => Ok(()),
            _ => refuse(
                "SET_PROTOCOL_FEATURES",
                format!("{:#x} were not offered", features & !protocol_features().bits()),
            ),
        }
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        log::debug!("vhost-user SET_VRING_ENABLE {index} {enable}");
        self.vring("SET_VRING_ENABLE", index)?;
        if self.vrings[index as usize].enabled == enable {
            return Ok(());
        }
        self.change(|c| {
            c.vrings[index as usize].enabled = enable;
            Ok(())
        })
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> Result<Vec<u8>> {
        if offset.checked_add(size).is_none_or(|end| end > MAX_CONFIG_LEN) {
            // The crate answers a failed GET_CONFIG with an empty payload.
            return refuse("GET_CONFIG", format!("offset {offset} + size {size} is past {MAX_CONFIG_LEN}"));
        }
        let mut buf = vec![0u8; size as usize];
        self.device.read_config(offset.into(), &mut buf);
        Ok(buf)
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        let end = u64::from(offset) + buf.len() as u64;
        if end > u64::from(MAX_CONFIG_LEN) {
            return refuse("SET_CONFIG", format!("offset {offset} + size {} is past {MAX_CONFIG_LEN}", buf.len()));
        }
        // Devices take what they allow (blk: the writeback cache flag).
        self.device.write_config(offset.into(), buf);
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> Result<()> {
        refuse("GPU_SET_SOCKET", "not a GPU")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        self.close = true;
        refuse("GET_SHARED_OBJECT", "not supported")
    }

    fn get_inflight_fd(&mut self, _inflight: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        self.close = true;
        refuse("GET_INFLIGHT_FD", "INFLIGHT_SHMFD is not offered")
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> Result<()> {
        refuse("SET_INFLIGHT_FD", "INFLIGHT_SHMFD is not offered")
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        r: &VhostUserSingleMemoryRegion,
        file: File,
        _postcopy: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        let desc =
            RegionDesc { guest_addr: r.guest_phys_addr, size: r.memory_size, user_addr: r.user_addr, mmap_offset: r.mmap_offset };
        self.change(|c| match c.memory.add(desc, file) {
            Ok(()) => Ok(None),
            Err(e) => refuse("ADD_MEM_REG", e),
        })
    }

    fn remove_mem_region(&mut self, r: &VhostUserSingleMemoryRegion) -> Result<()> {
        let (guest, size) = (r.guest_phys_addr, r.memory_size);
        self.change(|c| match c.memory.remove(guest, size) {
            Ok(()) => Ok(()),
            Err(e) => refuse("REM_MEM_REG", e),
        })
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        refuse("SET_DEVICE_STATE_FD", "migration is not supported")
    }

    fn check_device_state(&mut self) -> Result<()> {
        refuse("CHECK_DEVICE_STATE", "migration is not supported")
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        self.close = true;
        refuse("GET_SHMEM_CONFIG", "SHMEM is not offered")
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
        refuse("SET_LOG_BASE", "LOG_SHMFD is not offered")
    }
}
