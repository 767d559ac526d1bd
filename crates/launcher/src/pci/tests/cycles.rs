//! Issue 8 through the PCI transport, as a vCPU's exits deliver it, in
//! every threading mode: a real device (virtio-rng on /dev/urandom)
//! survives any number of reset / DRIVER_OK cycles, and a reset the guest
//! writes while its ring is full of a looping 65 535-entry indirect table
//! returns at once.

use super::*;

const MODES: [ThreadingMode; 3] = [ThreadingMode::PerQueue, ThreadingMode::PerDevice, ThreadingMode::Single];
const RING: u64 = 0x1_0000;
const VERSION_1: u64 = 1 << 32;
const INDIRECT_DESC: u64 = 1 << 28;

struct RngRig {
    drv: Driver,
    mem: GuestMemory,
    dev: Arc<Mutex<VirtioPciDevice>>,
    _host: PciHost,
}

fn rng_rig(mode: ThreadingMode) -> RngRig {
    let (pio, mmio) = (Bus::new(), Bus::new());
    let routing = Arc::new(FakeRouting::default());
    let mut host = PciHost::new(&pio, &mmio, Arc::new(FakeIoeventfds::default()), routing).unwrap();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap();
    let rng = kickvm_virtio::rng::Rng::new("rng0", Default::default()).unwrap();
    let dev = host.add_virtio(Box::new(rng), &mem, &Runtime::new(mode)).unwrap();
    let drv = Driver { pio, mmio, slot: 1, bar: layout::PCI_MMIO_START };
    drv.cfg_write(0x04, 2, 0x6);
    let (_, _, msix_cap) = drv.caps();
    drv.enable_msix(msix_cap);
    RngRig { drv, mem, dev, _host: host }
}

/// What Linux does from reset to DRIVER_OK: negotiate, lay out queue 0 (8
/// entries at [`RING`], rings zeroed as a fresh allocation would be), go.
fn bring_up(r: &RngRig, features: u64) {
    let d = &r.drv;
    assert_ne!(d.negotiate(features) & 8, 0, "FEATURES_OK accepted");
    r.mem.write_slice(&[0u8; 0x300], GuestAddress(RING)).unwrap();
    d.bar_write(cc::QUEUE_SELECT as u64, 2, 0);
    d.bar_write(cc::QUEUE_SIZE as u64, 2, 8);
    for (off, addr) in [(cc::QUEUE_DESC, RING), (cc::QUEUE_DRIVER, RING + 0x100), (cc::QUEUE_DEVICE, RING + 0x200)] {
        d.bar_write(off as u64, 4, addr & 0xffff_ffff);
        d.bar_write(off as u64 + 4, 4, addr >> 32);
    }
    d.bar_write(cc::QUEUE_MSIX_VECTOR as u64, 2, 1);
    d.bar_write(cc::MSIX_CONFIG as u64, 2, 0);
    d.bar_write(cc::QUEUE_ENABLE as u64, 2, 1);
    d.set_status(1 | 2 | 8 | 4);
    assert!(r.dev.lock().unwrap().is_active());
    assert_eq!(d.status() & NEEDS_RESET_BIT, 0);
}

const NEEDS_RESET_BIT: u8 = 0x40;

/// The guest writes 0 to device_status (from its vCPU): returns how long
/// the write took.
fn reset(r: &RngRig) -> Duration {
    let t = Instant::now();
    r.drv.set_status(0);
    let took = t.elapsed();
    assert_eq!(r.drv.status(), 0);
    assert!(!r.dev.lock().unwrap().is_active());
    took
}

#[test]
fn a_real_device_survives_reset_cycles_in_every_mode() {
    for mode in MODES {
        let r = rng_rig(mode);
        for cycle in 0..20u16 {
            bring_up(&r, VERSION_1 | INDIRECT_DESC);
            offer_buffer(&r.mem, RING, 0, 0x8000);
            r.drv.bar_write(0x3000, 2, 0);
            assert!(wait_used(&r.mem, RING, 1), "{mode}: cycle {cycle} serves a request");
            assert_eq!(r.mem.read_obj::<u32>(GuestAddress(RING + 0x208)).unwrap(), 64);
            let took = reset(&r);
            assert!(took < Duration::from_millis(500), "{mode}: reset took {took:?}");
        }
        assert_eq!(r.dev.lock().unwrap().state().total().errors, 0, "{mode}");
    }
}

/// The review's critical case through the transport: every avail entry is
/// an indirect descriptor to a 65 535-entry table whose entries loop. The
/// device refuses each chain, and the guest's reset returns at once.
#[test]
fn looping_indirect_tables_then_reset_in_every_mode() {
    for mode in MODES {
        let r = rng_rig(mode);
        bring_up(&r, VERSION_1 | INDIRECT_DESC);
        let table = 0x10_0000u64;
        let entries = 0xffffu64;
        for i in 0..entries {
            let e = GuestAddress(table + 16 * i);
            r.mem.write_obj(0x9000u64, e).unwrap();
            r.mem.write_obj(1u32, GuestAddress(e.0 + 8)).unwrap();
            r.mem.write_obj(1u16 | 2, GuestAddress(e.0 + 12)).unwrap(); // NEXT | WRITE
            r.mem.write_obj(((i + 1) % entries) as u16, GuestAddress(e.0 + 14)).unwrap();
        }
        for n in 0..8u16 {
            let d = GuestAddress(RING + 16 * u64::from(n));
            r.mem.write_obj(table, d).unwrap();
            r.mem.write_obj((entries * 16) as u32, GuestAddress(d.0 + 8)).unwrap();
            r.mem.write_obj(4u16, GuestAddress(d.0 + 12)).unwrap(); // INDIRECT
            r.mem.write_obj(n, GuestAddress(RING + 0x100 + 4 + 2 * u64::from(n))).unwrap();
        }
        r.mem.write_obj(8u16, GuestAddress(RING + 0x102)).unwrap();
        r.drv.bar_write(0x3000, 2, 0);
        assert!(wait_used(&r.mem, RING, 8), "{mode}: every bad chain is returned");
        assert_eq!(r.dev.lock().unwrap().state().queue(0).errors, 8);
        let took = reset(&r);
        assert!(took < Duration::from_millis(500), "{mode}: reset took {took:?}");
        // And the device works after the reset.
        bring_up(&r, VERSION_1 | INDIRECT_DESC);
        offer_buffer(&r.mem, RING, 0, 0x8000);
        r.drv.bar_write(0x3000, 2, 0);
        assert!(wait_used(&r.mem, RING, 1), "{mode}");
    }
}
