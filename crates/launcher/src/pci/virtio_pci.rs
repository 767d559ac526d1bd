//! The modern virtio-pci transport (virtio 1.x only, no legacy I/O BAR):
//! how a driver finds a device's registers, negotiates, lays out its
//! rings, and where its kicks and interrupts go.
//!
//! Everything lives in one 64-bit memory BAR (BAR0):
//!
//! ```text
//! 0x0000  common configuration   (virtio_pci_common_cfg)
//! 0x1000  ISR status             (read clears; unused with MSI-X)
//! 0x2000  device configuration   (the device's read_config/write_config)
//! 0x3000  notifications          (queue N at 0x3000 + 4·N: a KVM ioeventfd)
//! 0x4000  MSI-X table            (16 bytes per vector: queues + 1)
//! 0x6000  MSI-X pending bits
//! ```
//!
//! The data path never comes here: a kick is a guest write to the queue's
//! notify address, which KVM turns into a write to the queue's *kick*
//! eventfd (ioeventfd) that only its queue thread reads; the thread's
//! *call* eventfd is an irqfd on the queue's MSI-X vector. This file only
//! wires those eventfds when the guest places the BAR, programs vectors and
//! sets DRIVER_OK.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use kickvm_virtio::ratelimit::Throttle;
use kickvm_virtio::{ActiveDevice, DeviceState, GuestMemory, QueueSetup, Runtime, VirtioDevice};
use virtio_bindings::virtio_config::{
    VIRTIO_F_ADMIN_VQ, VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET, VIRTIO_F_SR_IOV,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::common_cfg::{self, CommonConfig, StatusChange};
use super::config::{self, touches, PciConfig, PciIds};
use super::guest_errors::{GuestErrorCounts, TransportErrors};
use super::msix::{self, Msix};
use super::{Ioeventfds, PciDevice, PciError};
use crate::bus::{Bus, BusDevice};
use crate::irq::MsiRouting;

/// BAR0 layout.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const NOTIFY_OFFSET: u64 = 0x3000;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
const REGION_SIZE: u64 = 0x1000;
/// Each queue has its own 4-byte notify address.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// The MSI-X table may use 0x4000..0x6000: 512 vectors.
const MAX_VECTORS: usize = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / msix::ENTRY_SIZE as u64) as usize;

/// PCI identity of virtio devices (virtio 1.x, 4.1.2).
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
const VIRTIO_PCI_SUBSYSTEM: u16 = 0x1100;

/// Vendor-specific capability types (`cfg_type`).
const CAP_ID_VENDOR: u8 = 0x09;
pub const CFG_TYPE_COMMON: u8 = 1;
pub const CFG_TYPE_NOTIFY: u8 = 2;
pub const CFG_TYPE_ISR: u8 = 3;
pub const CFG_TYPE_DEVICE: u8 = 4;
pub const CFG_TYPE_PCI: u8 = 5;
/// Where in the VIRTIO_PCI_CAP_PCI_CFG capability its window lies.
const PCI_CFG_CAP_BAR: usize = 4;
const PCI_CFG_CAP_OFFSET: usize = 8;
const PCI_CFG_CAP_LENGTH: usize = 12;
const PCI_CFG_CAP_DATA: usize = 16;

/// ISR bit for a configuration change.
const ISR_CONFIG: u8 = 2;

/// Features this transport cannot serve whatever the device says: the
/// queue threads speak split rings only, and the transport has no
/// notification data, per-queue reset, SR-IOV or admin queues.
const TRANSPORT_UNSUPPORTED: u64 = (1 << VIRTIO_F_RING_PACKED)
    | (1 << VIRTIO_F_NOTIFICATION_DATA)
    | (1 << VIRTIO_F_RING_RESET)
    | (1 << VIRTIO_F_SR_IOV)
    | (1 << VIRTIO_F_ADMIN_VQ);

/// Class code a driver-less OS shows for each device type.
fn class_of(device_type: u32) -> (u8, u8, u8) {
    use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET};
    match device_type {
        VIRTIO_ID_NET => (0x02, 0x00, 0x00),     // network controller, ethernet
        VIRTIO_ID_BLOCK => (0x01, 0x80, 0x00),   // mass storage, other
        VIRTIO_ID_CONSOLE => (0x07, 0x80, 0x00), // communication, other
        _ => (0xff, 0x00, 0x00),                 // unassigned class
    }
}

/// Why the device could not start at DRIVER_OK (the driver's rings, or
/// the host).
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("queue {queue}: {source}")]
    Ring { queue: usize, source: virtio_queue::Error },
    #[error("queue {0} does not exist")]
    NoSuchQueue(usize),
    #[error("{}cannot duplicate an eventfd: {source}", queue.map_or(String::new(), |q| format!("queue {q}: ")))]
    EventFd { queue: Option<usize>, source: std::io::Error },
    #[error(transparent)]
    Activate(#[from] kickvm_virtio::ActivateError),
}

/// What [`VirtioPciDevice::new`] needs besides the device.
pub struct VirtioPciParams {
    pub mem: GuestMemory,
    pub runtime: Arc<Runtime>,
    pub msi: Arc<dyn MsiRouting>,
    pub ioeventfds: Arc<dyn Ioeventfds>,
    /// The MMIO bus the BAR is placed on (and moved on).
    pub mmio_bus: Bus,
    /// Where BAR0 starts out (the guest may move it).
    pub bar_address: u64,
}

/// One virtio device behind the virtio-pci transport: a PCI function on
/// the root bus and its BAR0 on the MMIO bus.
pub struct VirtioPciDevice {
    config: PciConfig,
    msix_cap: usize,
    pci_cfg_cap: usize,
    common: CommonConfig,
    msix: Msix,
    device: Box<dyn VirtioDevice>,
    counters: Arc<DeviceState>,
    /// Guest mistakes seen here, by kind, each with its log throttle.
    errors: TransportErrors,
    active: Option<ActiveDevice>,
    /// One kick eventfd per queue, for the life of the device.
    kicks: Vec<EventFd>,
    /// Which kicks are registered as ioeventfds at the placed BAR.
    ioeventfd_on: Vec<bool>,
    /// Where BAR0 decodes now, if anywhere.
    placed: Option<u64>,
    isr: u8,
    isr_reset_reported: bool,
    mem: GuestMemory,
    runtime: Arc<Runtime>,
    ioeventfds: Arc<dyn Ioeventfds>,
    mmio_bus: Bus,
    this: Weak<Mutex<VirtioPciDevice>>,
    /// The guest ejected it: it is off the bus for good.
    unplugged: bool,
}

impl VirtioPciDevice {
    /// Builds the function for `device`. Nothing is on a bus yet: add it to
    /// the [`super::PciRoot`]; the BAR appears on `mmio_bus` when the guest
    /// enables memory decoding.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        p: VirtioPciParams,
    ) -> Result<Arc<Mutex<VirtioPciDevice>>, PciError> {
        let name = device.name().to_string();
        let max_sizes = device.queue_max_sizes();
        let num_queues = max_sizes.len();
        if num_queues + 1 > MAX_VECTORS {
            return Err(PciError::TooManyQueues { name, queues: num_queues });
        }
        if let Some(&bad) = max_sizes.iter().find(|&&s| Queue::new(s).is_err()) {
            return Err(PciError::BadQueueSize { name, size: bad });
        }
        let device_type = device.device_type();
        let pci_device = u16::try_from(device_type).ok().and_then(|t| VIRTIO_PCI_DEVICE_BASE.checked_add(t));
        // Modern virtio-pci device IDs end at 0x107f.
        let Some(pci_device) = pci_device.filter(|&d| d <= 0x107f) else {
            return Err(PciError::BadDeviceType { name, device_type });
        };
        let vectors = (num_queues + 1) as u16;
        let msix = Msix::new(vectors, p.msi).map_err(|e| PciError::Msix { name: name.clone(), err: e })?;
        // Blocking: the queue thread sleeps in `read` on its kick.
        let mut kicks = Vec::with_capacity(num_queues);
        for _ in 0..num_queues {
            kicks.push(
                EventFd::new(libc::EFD_CLOEXEC)
                    .map_err(|e| PciError::EventFd { name: name.clone(), err: e })?,
            );
        }

        let mut config = PciConfig::new(PciIds {
            vendor: VIRTIO_PCI_VENDOR,
            device: pci_device,
            revision: 1,
            class: class_of(device_type),
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: VIRTIO_PCI_SUBSYSTEM,
        });
        config.add_bar64(0, BAR_SIZE, p.bar_address);
        let caps = add_capabilities(&mut config, &msix, num_queues).ok_or(PciError::ConfigSpaceFull)?;

        let features = (device.features()) & !TRANSPORT_UNSUPPORTED;
        let counters = device.state();
        let dev = VirtioPciDevice {
            config,
            msix_cap: caps.0,
            pci_cfg_cap: caps.1,
            common: CommonConfig::new(features, &max_sizes, vectors),
            msix,
            device,
            counters,
            errors: TransportErrors::default(),
            active: None,
            ioeventfd_on: vec![false; num_queues],
            kicks,
            placed: None,
            isr: 0,
            isr_reset_reported: false,
            mem: p.mem,
            runtime: p.runtime,
            ioeventfds: p.ioeventfds,
            mmio_bus: p.mmio_bus,
            this: Weak::new(),
            unplugged: false,
        };
        Ok(Arc::new_cyclic(|this| {
            let mut dev = dev;
            dev.this = this.clone();
            Mutex::new(dev)
        }))
    }

    pub fn name(&self) -> &str {
        self.device.name()
    }

    /// The device's per-queue counters.
    pub fn state(&self) -> Arc<DeviceState> {
        self.counters.clone()
    }

    /// What the guest got wrong on this device so far: transport mistakes
    /// by kind, queue errors, DEVICE_NEEDS_RESET.
    pub fn guest_errors(&self) -> GuestErrorCounts {
        GuestErrorCounts::of(&self.errors, &self.counters)
    }

    /// Where BAR0 is programmed (whether or not it decodes).
    pub fn bar_address(&self) -> u64 {
        self.config.bar_address(0)
    }

    /// Where BAR0 decodes now, if memory decoding is on.
    pub fn placed_at(&self) -> Option<u64> {
        self.placed
    }

    /// The guest-physical notify address of queue `index` (for tests and
    /// for a vhost-user frontend that wants to know).
    pub fn notify_address(&self, index: u16) -> Option<u64> {
        let base = self.placed?;
        (usize::from(index) < self.kicks.len())
            .then(|| base + NOTIFY_OFFSET + u64::from(NOTIFY_OFF_MULTIPLIER) * u64::from(index))
    }

    /// True while queue threads run.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Stops the queue threads and takes the BAR off the MMIO bus for
    /// good (VM teardown). This also breaks the reference cycle between the
    /// device and the bus it is placed on.
    pub fn shutdown(&mut self) {
        if let Some(mut active) = self.active.take() {
            active.stop();
        }
        if let Some(base) = self.placed.take() {
            self.unplace(base);
        }
        // Without a handle on itself the device can never be placed again.
        self.this = Weak::new();
    }

    /// True once the guest ejected it (PCI hotplug removal).
    pub fn is_unplugged(&self) -> bool {
        self.unplugged
    }

    #[cfg(test)]
    pub(crate) fn kick(&self, index: usize) -> Option<&EventFd> {
        self.kicks.get(index)
    }

    #[cfg(test)]
    pub(crate) fn msix(&self) -> &Msix {
        &self.msix
    }

    fn needs_reset(&self) -> bool {
        self.counters.needs_reset.load(Ordering::SeqCst)
    }

    /// A guest mistake of the kind `kind` counts: counted there and in the
    /// device's transport errors, and logged only when the kind's throttle
    /// says so — the guest may repeat it as fast as it runs.
    fn guest_error(&self, kind: &Throttle, what: std::fmt::Arguments<'_>) {
        self.counters.transport_errors.hit();
        kickvm_virtio::warn_limited!(kind, "{}: {what}", self.device.name());
    }

    // ---- BAR placement -------------------------------------------------

    /// Makes the MMIO bus and KVM's ioeventfds match the BAR register and
    /// the command register's memory-enable bit.
    fn update_placement(&mut self) {
        let addr = self.config.bar_address(0);
        let want = (self.config.memory_enabled() && addr != 0 && addr.checked_add(BAR_SIZE).is_some())
            .then_some(addr);
        if want == self.placed {
            return;
        }
        if let Some(old) = self.placed.take() {
            self.unplace(old);
        }
        if let Some(new) = want {
            self.place(new);
        }
    }

    fn place(&mut self, base: u64) {
        let Some(me) = self.this.upgrade() else { return };
        if let Err(e) = self.mmio_bus.insert(me, base, BAR_SIZE) {
            self.guest_error(&self.errors.bar_misplaced, format_args!("guest placed BAR0 where it cannot go: {e}"));
            return;
        }
        for (i, (kick, on)) in self.kicks.iter().zip(self.ioeventfd_on.iter_mut()).enumerate() {
            let addr = base + NOTIFY_OFFSET + u64::from(NOTIFY_OFF_MULTIPLIER) * i as u64;
            match self.ioeventfds.attach_ioeventfd(kick, addr) {
                Ok(()) => *on = true,
                // Kicks still work, through an MMIO exit: see `write_notify`.
                Err(e) => {
                    self.counters.transport_errors.hit();
                    let name = self.device.name();
                    kickvm_virtio::warn_limited!(self.errors.notify_unbound, "{name}: queue {i} notify at {addr:#x}: {e}");
                }
            }
        }
        self.placed = Some(base);
    }

    fn unplace(&mut self, base: u64) {
        self.mmio_bus.remove(base);
        for (i, (kick, on)) in self.kicks.iter().zip(self.ioeventfd_on.iter_mut()).enumerate() {
            if std::mem::take(on) {
                let addr = base + NOTIFY_OFFSET + u64::from(NOTIFY_OFF_MULTIPLIER) * i as u64;
                if let Err(e) = self.ioeventfds.detach_ioeventfd(kick, addr) {
                    self.counters.transport_errors.hit();
                    let name = self.device.name();
                    kickvm_virtio::warn_limited!(self.errors.notify_unbound, "{name}: queue {i} notify at {addr:#x}: {e}");
                }
            }
        }
    }

    // ---- device status -------------------------------------------------

    /// The driver wrote 0 to device_status: stop every queue thread, then
    /// forget all negotiation and queue state.
    fn reset(&mut self) {
        if let Some(mut active) = self.active.take() {
            active.stop();
        }
        self.device.reset();
        self.counters.needs_reset.store(false, Ordering::SeqCst);
        self.common.reset();
        self.isr = 0;
        self.isr_reset_reported = false;
    }

    /// The driver set DRIVER_OK: hand every enabled queue, its kick and its
    /// vector's call eventfd to the queue threads.
    fn activate(&mut self) {
        if self.active.is_some() {
            return;
        }
        match self.start() {
            Ok(active) => self.active = Some(active),
            Err(e) => {
                self.guest_error(&self.errors.start_failed, format_args!("cannot start the device: {e}"));
                self.counters.needs_reset.store(true, Ordering::SeqCst);
            }
        }
    }

    fn start(&mut self) -> Result<ActiveDevice, StartError> {
        let mut setups = Vec::new();
        for (i, q) in self.common.queues().iter().enumerate().filter(|(_, q)| q.enabled) {
            let ring = |source| StartError::Ring { queue: i, source };
            let eventfd = |source| StartError::EventFd { queue: Some(i), source };
            let mut queue = Queue::new(q.max_size).map_err(ring)?;
            queue.try_set_size(q.size).map_err(ring)?;
            queue.try_set_desc_table_address(GuestAddress(q.desc)).map_err(ring)?;
            queue.try_set_avail_ring_address(GuestAddress(q.driver)).map_err(ring)?;
            queue.try_set_used_ring_address(GuestAddress(q.device)).map_err(ring)?;
            queue.set_ready(true);
            let kick = self.kicks.get(i).ok_or(StartError::NoSuchQueue(i))?;
            let kick = kick.try_clone().map_err(eventfd)?;
            let call = self.call_for(q.msix_vector).map_err(eventfd)?;
            setups.push(QueueSetup { index: i as u16, queue, kick, call });
        }
        let config_call =
            self.call_for(self.common.msix_config).map_err(|source| StartError::EventFd { queue: None, source })?;
        Ok(kickvm_virtio::activate(
            &mut *self.device,
            self.common.driver_features(),
            &self.mem,
            setups,
            &self.runtime,
            Some(config_call),
        )?)
    }

    /// The eventfd that raises `vector`; with no vector, one that nobody
    /// listens to (the driver asked for no interrupt).
    fn call_for(&self, vector: u16) -> std::io::Result<EventFd> {
        match self.msix.call(vector) {
            Some(fd) => fd.try_clone(),
            None => EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC),
        }
    }

    // ---- BAR0 regions --------------------------------------------------

    fn read_isr(&mut self) -> u8 {
        if self.needs_reset() && !self.isr_reset_reported {
            self.isr_reset_reported = true;
            self.isr |= ISR_CONFIG;
        }
        std::mem::take(&mut self.isr)
    }

    /// A notify write that KVM did not catch with an ioeventfd.
    fn write_notify(&mut self, offset: u64) {
        let index = offset / u64::from(NOTIFY_OFF_MULTIPLIER);
        if let Some(kick) = self.kicks.get(index as usize) {
            let _ = kick.write(1);
        }
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let (region, off) = (offset & !(REGION_SIZE - 1), offset & (REGION_SIZE - 1));
        // Only the MSI-X table spans more than one region.
        if off + data.len() as u64 > REGION_SIZE && !(MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&region) {
            return;
        }
        match region {
            COMMON_OFFSET => self.common.read(off as usize, data, self.needs_reset()),
            ISR_OFFSET if off == 0 => {
                if let Some(b) = data.first_mut() {
                    *b = self.read_isr();
                }
            }
            DEVICE_OFFSET => self.device.read_config(off, data),
            MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET => self.msix.read_table(offset - MSIX_TABLE_OFFSET, data),
            MSIX_PBA_OFFSET => self.msix.read_pba(off, data),
            _ => {}
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        let (region, off) = (offset & !(REGION_SIZE - 1), offset & (REGION_SIZE - 1));
        // Only the MSI-X table spans more than one region.
        if off + data.len() as u64 > REGION_SIZE && !(MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&region) {
            return;
        }
        match region {
            COMMON_OFFSET => match self.common.write(off as usize, data) {
                Some(StatusChange::Reset) => self.reset(),
                Some(StatusChange::DriverOk) => self.activate(),
                Some(StatusChange::FeaturesRefused { driver, offered }) => self.guest_error(
                    &self.errors.features_refused,
                    format_args!("driver asked for features {driver:#x}, device offers {offered:#x}: refusing FEATURES_OK"),
                ),
                None => {}
            },
            DEVICE_OFFSET => self.device.write_config(off, data),
            NOTIFY_OFFSET => self.write_notify(off),
            MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET => self.msix.write_table(offset - MSIX_TABLE_OFFSET, data),
            _ => {}
        }
    }

    // ---- VIRTIO_PCI_CAP_PCI_CFG: BAR access through config space -------

    /// The window the driver selected, if it is a legal access.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let bar = self.config.byte(cap + PCI_CFG_CAP_BAR);
        let offset = u64::from(self.config.dword(cap + PCI_CFG_CAP_OFFSET));
        let len = self.config.dword(cap + PCI_CFG_CAP_LENGTH) as usize;
        let ok = bar == 0
            && matches!(len, 1 | 2 | 4)
            && offset % len as u64 == 0
            && offset + len as u64 <= BAR_SIZE;
        ok.then_some((offset, len))
    }
}

/// Adds MSI-X and the five virtio capabilities; returns the offsets of the
/// MSI-X and PCI_CFG capabilities.
fn add_capabilities(config: &mut PciConfig, msix: &Msix, num_queues: usize) -> Option<(usize, usize)> {
    let msix_cap =
        config.add_capability(&msix.capability(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32))?;
    config.set_writable(msix_cap + msix::CAP_CONTROL, &msix::CONTROL_WRITABLE.to_le_bytes());
    let notify_len = (num_queues as u32 * NOTIFY_OFF_MULTIPLIER).max(NOTIFY_OFF_MULTIPLIER);
    config.add_capability(&virtio_cap(CFG_TYPE_COMMON, COMMON_OFFSET, common_cfg::LEN as u32, &[]))?;
    config.add_capability(&virtio_cap(CFG_TYPE_ISR, ISR_OFFSET, 1, &[]))?;
    config.add_capability(&virtio_cap(CFG_TYPE_DEVICE, DEVICE_OFFSET, REGION_SIZE as u32, &[]))?;
    config.add_capability(&virtio_cap(
        CFG_TYPE_NOTIFY,
        NOTIFY_OFFSET,
        notify_len,
        &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
    ))?;
    let pci_cfg = config.add_capability(&virtio_cap(CFG_TYPE_PCI, 0, 0, &[0; 4]))?;
    config.set_writable(pci_cfg + PCI_CFG_CAP_BAR, &[0xff]);
    config.set_writable(pci_cfg + PCI_CFG_CAP_OFFSET, &[0xff; 8]);
    Some((msix_cap, pci_cfg))
}

/// `struct virtio_pci_cap` (+ `extra`, e.g. notify_off_multiplier).
fn virtio_cap(cfg_type: u8, offset: u64, length: u32, extra: &[u8]) -> Vec<u8> {
    let len = 16 + extra.len();
    let mut c = vec![CAP_ID_VENDOR, 0, len as u8, cfg_type, 0, 0, 0, 0];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&length.to_le_bytes());
    c.extend_from_slice(extra);
    c
}

impl PciDevice for VirtioPciDevice {
    fn unplug(&mut self) {
        self.shutdown();
        self.unplugged = true;
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        let data_at = self.pci_cfg_cap + PCI_CFG_CAP_DATA;
        if touches(offset, data.len(), data_at, 4) {
            let mut window = [0u8; 4];
            if let Some((off, len)) = self.pci_cfg_window() {
                self.bar_read(off, &mut window[..len]);
            }
            self.config.put(data_at, &window);
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let len = data.len();
        if touches(offset, len, config::COMMAND, 2) || touches(offset, len, config::BAR0, 8) {
            self.update_placement();
        }
        if touches(offset, len, self.msix_cap + msix::CAP_CONTROL, 2) {
            self.msix.set_control(self.config.word(self.msix_cap + msix::CAP_CONTROL));
        }
        let data_at = self.pci_cfg_cap + PCI_CFG_CAP_DATA;
        if touches(offset, len, data_at, 4) {
            // The data bytes are not writable config space: take them from
            // the access itself.
            let mut window = [0u8; 4];
            for (i, &b) in data.iter().enumerate() {
                if let Some(w) = (offset + i).checked_sub(data_at).and_then(|j| window.get_mut(j)) {
                    *w = b;
                }
            }
            if let Some((off, wlen)) = self.pci_cfg_window() {
                self.bar_write(off, &window[..wlen]);
            }
        }
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.bar_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.bar_write(offset, data);
    }
}
