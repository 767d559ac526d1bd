//! The transport driven the way Linux's virtio_pci_modern driver drives it:
//! through port 0xCF8/0xCFC and the BAR on the MMIO bus, with a small
//! device whose queue thread fills buffers. First with fake KVM wiring,
//! then ([`kvm`]) on the real /dev/kvm.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kickvm_virtio::{
    ActivateError, DeviceState, GuestMemory, QueueCtx, QueueWorker, Runtime, Stopped, ThreadingMode,
    VirtioDevice, Wait,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::common_cfg as cc;
use super::msix::tests::FakeRouting;
use super::virtio_pci::*;
use super::*;

// ---- a device ---------------------------------------------------------

pub(crate) const FILL: u8 = 0x5a;
const QUEUE_MAX: u16 = 16;

/// One queue; every writable buffer is filled with [`FILL`].
pub(crate) struct FillDevice {
    counters: Arc<DeviceState>,
    pub resets: Arc<std::sync::atomic::AtomicU32>,
}

impl FillDevice {
    pub(crate) fn new() -> Self {
        FillDevice { counters: DeviceState::new(1), resets: Arc::default() }
    }
}

struct FillWorker;

impl QueueWorker for FillWorker {
    fn serve(&mut self, q: &mut QueueCtx) -> Result<Wait, Stopped> {
        while let Some(chain) = q.pop() {
            let data = vec![FILL; chain.writable.len() as usize];
            let n = chain.writable.write_at(0, &data);
            q.add_used(chain.head, n as u32);
        }
        Ok(Wait::Kick)
    }
}

impl VirtioDevice for FillDevice {
    fn name(&self) -> &str {
        "fill0"
    }
    fn device_type(&self) -> u32 {
        4
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX]
    }
    fn features(&self) -> u64 {
        kickvm_virtio::device::COMMON_FEATURES | (1 << 34) // packed: the transport must hide it
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8);
        }
    }
    fn activate(&mut self, _features: u64) -> Result<Vec<Box<dyn QueueWorker>>, ActivateError> {
        Ok(vec![Box::new(FillWorker)])
    }
    fn reset(&mut self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
    }
    fn state(&self) -> Arc<DeviceState> {
        self.counters.clone()
    }
}

// ---- fake KVM ioeventfds ----------------------------------------------

#[derive(Default)]
struct FakeIoeventfds(Mutex<Vec<u64>>);

impl Ioeventfds for FakeIoeventfds {
    fn attach_ioeventfd(&self, _fd: &EventFd, a: u64) -> Result<(), kvm_ioctls::Error> {
        self.0.lock().unwrap().push(a);
        Ok(())
    }
    fn detach_ioeventfd(&self, _fd: &EventFd, a: u64) -> Result<(), kvm_ioctls::Error> {
        self.0.lock().unwrap().retain(|&x| x != a);
        Ok(())
    }
}

// ---- a driver, from outside the guest ---------------------------------

/// (cfg_type, bar, offset, length) of a virtio vendor capability.
pub(crate) type VirtioCap = (u8, u8, u32, u32);

/// Config space through 0xCF8/0xCFC, BAR through the MMIO bus: what the
/// guest kernel would do, as exits would deliver it.
pub(crate) struct Driver {
    pub pio: Bus,
    pub mmio: Bus,
    pub slot: u32,
    pub bar: u64,
}

impl Driver {
    pub fn cfg_read(&self, off: u32, len: usize) -> u32 {
        self.pio.write(0xcf8, &(0x8000_0000 | self.slot << 11 | (off & 0xfc)).to_le_bytes());
        let mut d = [0u8; 4];
        self.pio.read(0xcfc + u64::from(off & 3), &mut d[..len]);
        u32::from_le_bytes(d)
    }
    pub fn cfg_write(&self, off: u32, len: usize, v: u32) {
        self.pio.write(0xcf8, &(0x8000_0000 | self.slot << 11 | (off & 0xfc)).to_le_bytes());
        self.pio.write(0xcfc + u64::from(off & 3), &v.to_le_bytes()[..len]);
    }
    pub fn bar_read(&self, off: u64, len: usize) -> u64 {
        let mut d = [0u8; 8];
        assert!(self.mmio.read(self.bar + off, &mut d[..len]), "BAR not decoding at {:#x}", self.bar);
        u64::from_le_bytes(d)
    }
    pub fn bar_write(&self, off: u64, len: usize, v: u64) {
        assert!(self.mmio.write(self.bar + off, &v.to_le_bytes()[..len]));
    }

    /// Walks the capability list: the virtio capabilities, the notify
    /// multiplier, and the MSI-X capability offset.
    pub fn caps(&self) -> (Vec<VirtioCap>, u32, u32) {
        assert_ne!(self.cfg_read(0x06, 2) & 0x10, 0, "capability list bit");
        let mut at = self.cfg_read(0x34, 1);
        let (mut virtio, mut mult, mut msix) = (Vec::new(), 0, 0);
        let mut seen = 0;
        while at != 0 {
            seen += 1;
            assert!(seen < 16 && at & 3 == 0 && at >= 0x40);
            match self.cfg_read(at, 1) {
                0x09 => {
                    let ty = self.cfg_read(at + 3, 1) as u8;
                    let bar = self.cfg_read(at + 4, 1) as u8;
                    virtio.push((ty, bar, self.cfg_read(at + 8, 4), self.cfg_read(at + 12, 4)));
                    if ty == CFG_TYPE_NOTIFY {
                        mult = self.cfg_read(at + 16, 4);
                    }
                }
                0x11 => msix = at,
                other => panic!("unexpected capability {other:#x}"),
            }
            at = self.cfg_read(at + 1, 1);
        }
        (virtio, mult, msix)
    }

    /// Linux's `__pci_read_base` on a 64-bit BAR, decoding off.
    pub fn size_bar0(&self) -> u64 {
        let (lo, hi) = (self.cfg_read(0x10, 4), self.cfg_read(0x14, 4));
        self.cfg_write(0x10, 4, 0xffff_ffff);
        self.cfg_write(0x14, 4, 0xffff_ffff);
        let mask = (u64::from(self.cfg_read(0x14, 4)) << 32) | u64::from(self.cfg_read(0x10, 4) & !0xf);
        self.cfg_write(0x10, 4, lo);
        self.cfg_write(0x14, 4, hi);
        (!mask).wrapping_add(1)
    }

    pub fn status(&self) -> u8 {
        self.bar_read(cc::DEVICE_STATUS as u64, 1) as u8
    }

    pub fn set_status(&self, s: u8) {
        self.bar_write(cc::DEVICE_STATUS as u64, 1, s.into());
    }

    /// MSI-X on, vectors 0 and 1 programmed and unmasked (as Linux does
    /// for the config vector and queue 0's vector).
    pub fn enable_msix(&self, msix_cap: u32) {
        let ctrl = self.cfg_read(msix_cap + 2, 2);
        self.cfg_write(msix_cap + 2, 2, ctrl | 0xc000);
        for v in 0..2u64 {
            let e = 0x4000 + 16 * v;
            self.bar_write(e, 4, 0xfee0_0000);
            self.bar_write(e + 4, 4, 0);
            self.bar_write(e + 8, 4, 0x40 + v);
        }
        self.cfg_write(msix_cap + 2, 2, ctrl | 0x8000);
        for v in 0..2u64 {
            self.bar_write(0x4000 + 16 * v + 12, 4, 0);
        }
    }

    /// Acknowledge, negotiate `features`; returns the status read back.
    pub fn negotiate(&self, features: u64) -> u8 {
        self.set_status(0);
        self.set_status(1);
        self.set_status(1 | 2);
        for sel in 0..2u32 {
            self.bar_write(cc::DRIVER_FEATURE_SELECT as u64, 4, sel.into());
            self.bar_write(cc::DRIVER_FEATURE as u64, 4, (features >> (32 * sel)) & 0xffff_ffff);
        }
        self.set_status(1 | 2 | 8);
        self.status()
    }

    /// Programs queue 0 at `ring` (desc, avail at +0x100, used at +0x200)
    /// with vector 1, and enables it.
    pub fn setup_queue0(&self, ring: u64) {
        self.bar_write(cc::QUEUE_SELECT as u64, 2, 0);
        assert_eq!(self.bar_read(cc::QUEUE_SIZE as u64, 2), u64::from(QUEUE_MAX));
        assert_eq!(self.bar_read(cc::QUEUE_ENABLE as u64, 2), 0);
        self.bar_write(cc::QUEUE_SIZE as u64, 2, 8);
        for (off, addr) in
            [(cc::QUEUE_DESC, ring), (cc::QUEUE_DRIVER, ring + 0x100), (cc::QUEUE_DEVICE, ring + 0x200)]
        {
            self.bar_write(off as u64, 4, addr & 0xffff_ffff);
            self.bar_write(off as u64 + 4, 4, addr >> 32);
        }
        self.bar_write(cc::QUEUE_MSIX_VECTOR as u64, 2, 1);
        assert_eq!(self.bar_read(cc::QUEUE_MSIX_VECTOR as u64, 2), 1);
        self.bar_write(cc::MSIX_CONFIG as u64, 2, 0);
        self.bar_write(cc::QUEUE_ENABLE as u64, 2, 1);
    }
}

/// Puts one 64-byte device-writable buffer at `buf` on the avail ring of
/// the queue at `ring` (size 8), as avail entry `n`.
pub(crate) fn offer_buffer(mem: &GuestMemory, ring: u64, n: u16, buf: u64) {
    let d = GuestAddress(ring + 16 * u64::from(n));
    mem.write_obj(buf, d).unwrap();
    mem.write_obj(64u32, GuestAddress(d.0 + 8)).unwrap();
    mem.write_obj(2u16, GuestAddress(d.0 + 12)).unwrap(); // VIRTQ_DESC_F_WRITE
    mem.write_obj(n, GuestAddress(ring + 0x100 + 4 + 2 * u64::from(n % 8))).unwrap();
    mem.write_obj(n + 1, GuestAddress(ring + 0x102)).unwrap();
}

pub(crate) fn wait_used(mem: &GuestMemory, ring: u64, idx: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if mem.read_obj::<u16>(GuestAddress(ring + 0x202)).unwrap() == idx {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

pub(crate) fn guest_mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

struct Rig {
    drv: Driver,
    mem: GuestMemory,
    dev: Arc<Mutex<VirtioPciDevice>>,
    routing: Arc<FakeRouting>,
    ioev: Arc<FakeIoeventfds>,
    resets: Arc<std::sync::atomic::AtomicU32>,
    host: PciHost,
}

fn rig() -> Rig {
    let (pio, mmio) = (Bus::new(), Bus::new());
    let routing = Arc::new(FakeRouting::default());
    let ioev = Arc::new(FakeIoeventfds::default());
    let mut host = PciHost::new(&pio, &mmio, ioev.clone(), routing.clone()).unwrap();
    let mem = guest_mem();
    let device = FillDevice::new();
    let resets = device.resets.clone();
    let dev = host.add_virtio(Box::new(device), &mem, &Runtime::new(ThreadingMode::PerQueue)).unwrap();
    let drv = Driver { pio, mmio, slot: 1, bar: layout::PCI_MMIO_START };
    Rig { drv, mem, dev, routing, ioev, resets, host }
}

#[test]
fn enumerates_like_a_modern_virtio_device() {
    let r = rig();
    let d = &r.drv;
    assert_eq!(d.cfg_read(0, 4), 0x1044_1af4, "vendor 0x1af4, device 0x1040 + type 4");
    assert_eq!(d.cfg_read(0x08, 1), 1, "revision 1: not transitional");
    assert_eq!(d.cfg_read(0x0b, 1), 0xff);
    assert_eq!(d.cfg_read(0x2c, 4), 0x1100_1af4);
    assert_eq!(d.cfg_read(0x0e, 1), 0, "type 0 header, one function");
    assert_eq!(d.cfg_read(0x3d, 1), 0, "no INTx pin");
    assert_eq!(d.cfg_read(0x10, 4), 0xc000_0004, "64-bit memory BAR, pre-assigned");

    let (caps, mult, msix_cap) = d.caps();
    let find = |t: u8| *caps.iter().find(|c| c.0 == t).unwrap();
    assert_eq!(find(CFG_TYPE_COMMON), (1, 0, 0, cc::LEN as u32));
    assert_eq!(find(CFG_TYPE_ISR).2, 0x1000);
    assert_eq!(find(CFG_TYPE_DEVICE).2, 0x2000);
    assert_eq!(find(CFG_TYPE_NOTIFY), (2, 0, 0x3000, 4));
    assert!(caps.iter().any(|c| c.0 == CFG_TYPE_PCI));
    assert_eq!(mult, 4);
    assert_ne!(msix_cap, 0);
    assert_eq!(d.cfg_read(msix_cap + 2, 2) & 0x7ff, 1, "queues + 1 vectors");
    assert_eq!(d.cfg_read(msix_cap + 4, 4), 0x4000);
    assert_eq!(d.cfg_read(msix_cap + 8, 4), 0x6000);

    assert_eq!(d.size_bar0(), BAR_SIZE);
    assert_eq!(d.cfg_read(0x10, 4), 0xc000_0004, "restored after sizing");
}

#[test]
fn bar_decodes_only_with_memory_enabled_and_follows_the_guest() {
    let r = rig();
    let d = &r.drv;
    let mut b = [0u8; 2];
    assert!(!d.mmio.read(d.bar + cc::NUM_QUEUES as u64, &mut b), "decoding starts off");
    assert!(r.ioev.0.lock().unwrap().is_empty());
    d.cfg_write(0x04, 2, 0x6); // memory + bus master, as pci_enable_device does
    assert_eq!(d.bar_read(cc::NUM_QUEUES as u64, 2), 1);
    assert_eq!(*r.ioev.0.lock().unwrap(), vec![d.bar + 0x3000]);
    assert_eq!(r.dev.lock().unwrap().notify_address(0), Some(d.bar + 0x3000));

    // Sizing with decoding off does not move anything.
    d.cfg_write(0x04, 2, 0x4);
    assert!(r.ioev.0.lock().unwrap().is_empty());
    d.size_bar0();
    // The guest moves the BAR above 4 GiB.
    d.cfg_write(0x10, 4, 0x0010_0000);
    d.cfg_write(0x14, 4, 0x1);
    d.cfg_write(0x04, 2, 0x6);
    let moved = Driver { bar: 0x1_0010_0000, pio: d.pio.clone(), mmio: d.mmio.clone(), slot: 1 };
    assert_eq!(moved.bar_read(cc::NUM_QUEUES as u64, 2), 1);
    assert!(!d.mmio.read(layout::PCI_MMIO_START, &mut b), "old range is free");
    assert_eq!(*r.ioev.0.lock().unwrap(), vec![0x1_0010_0000 + 0x3000]);
}

#[test]
fn pci_cfg_capability_reaches_the_bar() {
    let r = rig();
    let d = &r.drv;
    let (_, _, _) = d.caps();
    let mut at = d.cfg_read(0x34, 1);
    while !(d.cfg_read(at, 1) == 0x09 && d.cfg_read(at + 3, 1) == u32::from(CFG_TYPE_PCI)) {
        at = d.cfg_read(at + 1, 1);
    }
    // Works without memory decoding: that is what it is for.
    d.cfg_write(at + 4, 1, 0);
    d.cfg_write(at + 8, 4, cc::NUM_QUEUES as u32);
    d.cfg_write(at + 12, 4, 2);
    assert_eq!(d.cfg_read(at + 16, 2), 1);
    d.cfg_write(at + 8, 4, cc::DEVICE_STATUS as u32);
    d.cfg_write(at + 12, 4, 1);
    d.cfg_write(at + 16, 1, 1);
    assert_eq!(d.cfg_read(at + 16, 1), 1, "ACKNOWLEDGE written through the window");
    // Misaligned or too long: reads zero, no effect.
    d.cfg_write(at + 8, 4, 1);
    d.cfg_write(at + 12, 4, 4);
    assert_eq!(d.cfg_read(at + 16, 4), 0);
}

#[test]
fn device_config_and_isr() {
    let r = rig();
    let d = &r.drv;
    d.cfg_write(0x04, 2, 0x6);
    assert_eq!(d.bar_read(0x2000 + 5, 1), 5);
    assert_eq!(d.bar_read(0x1000, 1), 0);
    r.dev.lock().unwrap().state().needs_reset.store(true, Ordering::SeqCst);
    assert_eq!(d.bar_read(0x1000, 1), 2, "config change reported once");
    assert_eq!(d.bar_read(0x1000, 1), 0, "read clears");
    assert_ne!(d.status() & cc::NEEDS_RESET, 0);
}

#[test]
fn driver_ok_starts_the_queue_and_reset_stops_it() {
    let r = rig();
    let d = &r.drv;
    d.cfg_write(0x04, 2, 0x6);
    let (_, _, msix_cap) = d.caps();
    d.enable_msix(msix_cap);
    let gsi = r.dev.lock().unwrap().msix().gsi(1).unwrap();
    assert!(r.routing.is_attached(gsi));

    // The transport hides the packed ring bit the device offered.
    d.bar_write(cc::DEVICE_FEATURE_SELECT as u64, 4, 1);
    assert_eq!(d.bar_read(cc::DEVICE_FEATURE as u64, 4) & (1 << 2), 0);
    assert_eq!(d.negotiate(1 << 32 | 1 << 34) & 8, 0, "packed refused");
    assert_ne!(d.negotiate(1 << 32) & 8, 0);

    let ring = 0x1_0000;
    d.setup_queue0(ring);
    d.set_status(1 | 2 | 8 | 4);
    assert!(r.dev.lock().unwrap().is_active());
    assert_eq!(d.status(), 1 | 2 | 4 | 8);
    let resets = r.resets.load(Ordering::SeqCst);
    // Let the queue thread go to sleep on its kick first.
    std::thread::sleep(Duration::from_millis(50));
    offer_buffer(&r.mem, ring, 0, 0x8000);

    // Kick through the notify region (the MMIO-exit fallback path).
    d.bar_write(0x3000, 2, 0);
    assert!(wait_used(&r.mem, ring, 1));
    assert_eq!(r.mem.read_obj::<u32>(GuestAddress(ring + 0x208)).unwrap(), 64, "used len");
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(0x8000 + 63)).unwrap(), FILL);

    // Kick through the eventfd KVM would signal.
    offer_buffer(&r.mem, ring, 1, 0x9000);
    r.dev.lock().unwrap().kick(0).unwrap().write(1).unwrap();
    assert!(wait_used(&r.mem, ring, 2));
    let c = r.dev.lock().unwrap().state().queue(0);
    assert_eq!(c.chains, 2);
    assert!(c.interrupts >= 1);
    assert_eq!(c.errors, 0);

    // Mask vector 1: the next interrupt waits in the PBA.
    d.bar_write(0x4000 + 16 + 12, 4, 1);
    offer_buffer(&r.mem, ring, 2, 0xa000);
    r.dev.lock().unwrap().kick(0).unwrap().write(1).unwrap();
    assert!(wait_used(&r.mem, ring, 3));
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.bar_read(0x6000, 8) & 0b10 == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(d.bar_read(0x6000, 8), 0b10);

    d.set_status(0);
    assert!(!r.dev.lock().unwrap().is_active());
    assert_eq!(d.status(), 0);
    assert_eq!(r.resets.load(Ordering::SeqCst), resets + 1);
    d.bar_write(cc::QUEUE_SELECT as u64, 2, 0);
    assert_eq!(d.bar_read(cc::QUEUE_ENABLE as u64, 2), 0);
    assert_eq!(d.bar_read(cc::QUEUE_SIZE as u64, 2), u64::from(QUEUE_MAX));
}

#[test]
fn dropping_the_host_stops_threads_and_frees_the_device() {
    let r = rig();
    let d = &r.drv;
    d.cfg_write(0x04, 2, 0x6);
    d.negotiate(1 << 32);
    d.setup_queue0(0x1_0000);
    d.set_status(1 | 2 | 8 | 4);
    assert!(r.dev.lock().unwrap().is_active());
    let counters = r.dev.lock().unwrap().state();
    drop(r.host);
    assert!(!r.dev.lock().unwrap().is_active());
    assert!(r.ioev.0.lock().unwrap().is_empty(), "ioeventfds detached");
    let mut b = [0u8; 4];
    assert!(!d.mmio.read(d.bar, &mut b), "BAR gone from the bus");
    assert_eq!(d.cfg_read(0, 4), 0xffff_ffff, "slot empty");
    assert_eq!(Arc::strong_count(&r.dev), 1, "no cycle keeps the device alive");
    drop(counters);
}

/// A device plugged into a running bus goes into the next free slot and
/// is flagged for the guest's `PCNT`; it works as a cold-plugged one does.
/// The guest's `_EJ0` write takes it out only once the launcher asked for
/// it back: then its queue thread stops, its BAR and ioeventfds go, the
/// slot reads empty, and the next device plugged in reuses the slot.
#[test]
fn hotplugged_device_runs_and_leaves_only_when_asked() {
    let mut r = rig();
    let (dev, slot) = r.host.hotplug_virtio(Box::new(FillDevice::new()), &r.mem, &Runtime::new(ThreadingMode::PerQueue)).unwrap();
    assert_eq!(slot, 2);
    let pciu = layout::PCI_HOTPLUG_PORT;
    let mut b = [0u8; 4];
    r.drv.pio.read(pciu, &mut b);
    assert_eq!(u32::from_le_bytes(b), 1 << 2, "PCNT sees slot 2 arrive, once");
    r.drv.pio.read(pciu, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0);

    let d = Driver { pio: r.drv.pio.clone(), mmio: r.drv.mmio.clone(), slot: 2, bar: layout::PCI_MMIO_START + BAR_SIZE };
    assert_eq!(d.cfg_read(0, 4), 0x1044_1af4);
    d.cfg_write(0x04, 2, 0x6);
    d.negotiate(1 << 32);
    d.setup_queue0(0x2_0000);
    d.set_status(1 | 2 | 8 | 4);
    assert!(dev.lock().unwrap().is_active());
    assert_eq!(r.ioev.0.lock().unwrap().len(), 1, "one kick ioeventfd: the new device's");
    offer_buffer(&r.mem, 0x2_0000, 0, 0x8000);
    d.bar_write(0x3000, 2, 0);
    assert!(wait_used(&r.mem, 0x2_0000, 1));

    // An eject nobody asked for changes nothing.
    let b0ej = layout::PCI_HOTPLUG_PORT + 8;
    r.drv.pio.write(b0ej, &u32::MAX.to_le_bytes());
    assert!(dev.lock().unwrap().is_active());
    assert_eq!(d.cfg_read(0, 4), 0x1044_1af4);

    r.host.hotplug().request_removal(2);
    r.drv.pio.read(layout::PCI_HOTPLUG_PORT + 4, &mut b);
    assert_eq!(u32::from_le_bytes(b), 1 << 2, "PCNT sees the eject request");
    r.drv.pio.write(b0ej, &(1u32 << 2).to_le_bytes());
    assert!(!dev.lock().unwrap().is_active(), "queue thread stopped");
    assert!(r.ioev.0.lock().unwrap().is_empty(), "ioeventfd detached");
    assert!(!d.mmio.read(d.bar, &mut b), "BAR gone from the bus");
    assert_eq!(d.cfg_read(0, 4), 0xffff_ffff, "slot empty");
    assert_eq!(r.drv.cfg_read(0, 4), 0x1044_1af4, "slot 1 untouched");
    let (_, again) = r.host.hotplug_virtio(Box::new(FillDevice::new()), &r.mem, &Runtime::new(ThreadingMode::PerQueue)).unwrap();
    assert_eq!(again, 2, "the slot is free again");
}

#[test]
fn bad_rings_at_driver_ok_set_needs_reset() {
    let r = rig();
    let d = &r.drv;
    d.cfg_write(0x04, 2, 0x6);
    d.negotiate(1 << 32);
    d.setup_queue0(0x7fff_0000); // outside guest memory
    d.set_status(1 | 2 | 8 | 4);
    assert!(!r.dev.lock().unwrap().is_active());
    assert_ne!(d.status() & cc::NEEDS_RESET, 0);
    d.set_status(0);
    assert_eq!(d.status(), 0);
}

#[test]
fn guest_garbage_does_not_panic() {
    let r = rig();
    let d = &r.drv;
    d.cfg_write(0x04, 2, 0x6);
    let mut x: u64 = 0x1234_5678_9abc_def1;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = [1usize, 2, 4, 8][(x & 3) as usize];
        let off = (x >> 8) % (BAR_SIZE + 16);
        if x & 0x100_0000 != 0 {
            let mut b = vec![0u8; len];
            d.mmio.read(d.bar + off, &mut b);
        } else if off != cc::DEVICE_STATUS as u64 || x & 0x200_0000 != 0 {
            d.mmio.write(d.bar + off, &x.to_le_bytes()[..len]);
        }
        let cfg_off = ((x >> 40) % 0x100) as u32;
        // Keep the BAR and command register where they are.
        if !(0x04..0x18).contains(&cfg_off) {
            d.cfg_write(cfg_off, [1usize, 2, 4][((x >> 50) % 3) as usize], (x >> 20) as u32);
        }
    }
}

/// Like [`guest_garbage_does_not_panic`], but nothing is off limits: the
/// command register, BAR0 (placed anywhere, over ECAM, over itself,
/// wrapping the address space), the MSI-X capability, the 0xCF8 address
/// register with any bus/slot/function, ECAM anywhere in its window, and
/// accesses of odd widths at odd offsets.
#[test]
fn any_access_from_any_vcpu_exit_is_answered() {
    let r = rig();
    let d = &r.drv;
    let mut x: u64 = 0x0123_4567_89ab_cdef;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..50_000 {
        let v = next();
        let len = [1usize, 2, 3, 4, 8][(v % 5) as usize];
        let bytes = next().to_le_bytes();
        let mut buf = vec![0u8; len];
        match (v >> 8) % 6 {
            0 => {
                let port = 0xcf8 + (v >> 16) % 8;
                if v & (1 << 40) != 0 {
                    d.pio.write(port, &bytes[..len]);
                } else {
                    d.pio.read(port, &mut buf);
                }
            }
            1 => {
                let at = layout::PCI_ECAM_START + (v >> 16) % layout::PCI_ECAM_SIZE;
                if v & (1 << 60) != 0 {
                    d.mmio.write(at, &bytes[..len]);
                } else {
                    d.mmio.read(at, &mut buf);
                }
            }
            2 => d.cfg_write(((v >> 16) % 0x100) as u32, [1, 2, 4][((v >> 30) % 3) as usize], bytes_u32(&bytes)),
            3 => d.cfg_write(0x04 + 4 * ((v >> 16) % 5) as u32, 4, bytes_u32(&bytes)),
            _ => {
                // Wherever BAR0 decodes now, if anywhere.
                let base = r.dev.lock().unwrap().placed_at().unwrap_or(d.bar);
                let at = base.wrapping_add((v >> 16) % (BAR_SIZE + 0x10));
                if v & (1 << 61) != 0 {
                    d.mmio.write(at, &bytes[..len]);
                } else {
                    d.mmio.read(at, &mut buf);
                }
            }
        }
    }
    // Still a working function afterwards.
    d.cfg_write(0x04, 2, 0);
    d.cfg_write(0x10, 4, d.bar as u32);
    d.cfg_write(0x14, 4, (d.bar >> 32) as u32);
    d.cfg_write(0x04, 2, 0x6);
    d.set_status(0);
    assert_eq!(d.cfg_read(0, 4), 0x1044_1af4);
    assert_eq!(d.bar_read(cc::NUM_QUEUES as u64, 2), 1);
}

fn bytes_u32(b: &[u8; 8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

mod cycles;
mod flood;
mod kvm;
