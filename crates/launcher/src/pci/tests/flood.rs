//! A guest repeating a mistake as fast as it can (docs/security.md, class 4): each
//! attempt is counted and the count is readable, but the host's log gets
//! a few lines, not one per attempt. Driven through the same port and MMIO
//! bus accesses a vCPU's exits deliver.

use super::*;
use crate::testlog::capture;

const ATTEMPTS: u64 = 10_000;
/// Log lines one kind of mistake may cost for [`ATTEMPTS`] attempts: the
/// throttle logs the first 10 and then the powers of two (20 in all).
const MAX_LINES: usize = 25;

/// Lines that mention `needle`.
fn lines_with<'a>(lines: &'a [String], needle: &str) -> Vec<&'a String> {
    lines.iter().filter(|l| l.contains(needle)).collect()
}

/// Asserts a flood of `ATTEMPTS` left at least the first few lines (the
/// logger works) and at most [`MAX_LINES`].
fn assert_few(lines: &[String], needle: &str) {
    let hits = lines_with(lines, needle);
    assert!(hits.len() >= 10, "the first attempts are logged: {lines:#?}");
    assert!(hits.len() <= MAX_LINES, "{} lines for {ATTEMPTS} attempts", hits.len());
    assert!(hits.iter().all(|l| l.starts_with("WARN fill0: ")), "{hits:#?}");
    assert!(hits.last().is_some_and(|l| l.contains("(#8192)")), "{hits:#?}");
}

#[test]
fn ten_thousand_refused_features_ok_are_counted_not_logged() {
    let r = rig();
    let d = &r.drv;
    d.cfg_write(0x04, 2, 0x6);
    d.set_status(1);
    d.set_status(1 | 2);
    // No VERSION_1: FEATURES_OK is refused, as often as the driver asks.
    d.bar_write(cc::DRIVER_FEATURE as u64, 4, 0);
    let ((), lines) = capture(|| {
        for _ in 0..ATTEMPTS {
            d.set_status(1 | 2 | 8);
        }
    });
    assert_eq!(d.status(), 1 | 2, "never accepted");
    let e = r.dev.lock().unwrap().guest_errors();
    assert_eq!((e.features_refused, e.transport_errors), (ATTEMPTS, ATTEMPTS));
    assert_few(&lines, "refusing FEATURES_OK");
    assert_eq!(lines.len(), lines_with(&lines, "refusing FEATURES_OK").len(), "{lines:#?}");
}

#[test]
fn ten_thousand_driver_oks_with_rings_outside_memory() {
    let r = rig();
    let d = &r.drv;
    d.cfg_write(0x04, 2, 0x6);
    let ((), lines) = capture(|| {
        for _ in 0..ATTEMPTS {
            assert_ne!(d.negotiate(1 << 32) & 8, 0);
            d.setup_queue0(0x7fff_0000); // past the end of guest memory
            d.set_status(1 | 2 | 8 | 4);
        }
    });
    let dev = r.dev.lock().unwrap();
    assert!(!dev.is_active());
    let e = dev.guest_errors();
    assert_eq!((e.start_failed, e.transport_errors), (ATTEMPTS, ATTEMPTS));
    assert!(e.needs_reset, "the last attempt left DEVICE_NEEDS_RESET set");
    assert_eq!(e.queue_errors, 0);
    assert_few(&lines, "cannot start the device");
    // Every line, not only kickvm's own: virtio-queue's `is_valid` used to
    // log one `error!` per attempt (found by the virtio_pci fuzz target).
    assert!(lines.len() <= MAX_LINES, "{} lines in all for {ATTEMPTS} attempts: {:?}", lines.len(), &lines[..lines.len().min(30)]);
}

#[test]
fn ten_thousand_memory_decode_toggles_with_the_bar_over_ecam() {
    let r = rig();
    let d = &r.drv;
    // Decoding off, BAR0 moved over the ECAM window, which the MMIO bus
    // already holds.
    d.cfg_write(0x04, 2, 0);
    d.cfg_write(0x10, 4, layout::PCI_ECAM_START as u32);
    d.cfg_write(0x14, 4, 0);
    let ((), lines) = capture(|| {
        for _ in 0..ATTEMPTS {
            d.cfg_write(0x04, 2, 0x6);
            d.cfg_write(0x04, 2, 0x4);
        }
    });
    let dev = r.dev.lock().unwrap();
    assert_eq!(dev.placed_at(), None, "never placed");
    let e = dev.guest_errors();
    assert_eq!((e.bar_misplaced, e.transport_errors), (ATTEMPTS, ATTEMPTS));
    assert_few(&lines, "guest placed BAR0 where it cannot go");
    drop(dev);
    // ECAM still answers: the host bridge is at 00:00.0.
    let mut id = [0u8; 4];
    assert!(d.mmio.read(layout::PCI_ECAM_START, &mut id));
    assert_eq!(u32::from_le_bytes(id), 0x0d57_8086);
}

#[test]
fn one_flood_does_not_hide_the_first_mistakes_of_another_kind() {
    let r = rig();
    let d = &r.drv;
    d.cfg_write(0x04, 2, 0x6);
    d.set_status(1 | 2);
    for _ in 0..ATTEMPTS {
        d.set_status(1 | 2 | 8);
    }
    d.cfg_write(0x04, 2, 0);
    d.cfg_write(0x10, 4, layout::PCI_ECAM_START as u32);
    let ((), lines) = capture(|| d.cfg_write(0x04, 2, 0x6));
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("guest placed BAR0 where it cannot go") && lines[0].contains("(#1)"), "{lines:#?}");
    assert_eq!(r.dev.lock().unwrap().guest_errors().transport_errors, ATTEMPTS + 1);
}

#[test]
fn the_exit_report_is_one_line_per_device_with_the_counts() {
    let r = rig();
    let d = &r.drv;
    d.cfg_write(0x04, 2, 0x6);
    d.set_status(1 | 2);
    for _ in 0..100 {
        d.set_status(1 | 2 | 8);
    }
    let ((), lines) = capture(|| crate::vm::report_guest_errors(std::slice::from_ref(&r.dev)));
    let dev_lines = lines_with(&lines, "fill0");
    assert_eq!(dev_lines.len(), 1, "{lines:#?}");
    assert_eq!(dev_lines[0], "INFO fill0: guest errors: transport errors 100, features refused 100");
    // A device whose guest did nothing wrong is not mentioned.
    let clean = rig();
    let ((), lines) = capture(|| crate::vm::report_guest_errors(std::slice::from_ref(&clean.dev)));
    assert!(lines_with(&lines, "fill0").is_empty(), "{lines:#?}");
}

/// KVM refusing every route: what a guest's MSI-X programming would run
/// into if KVM did not like it.
#[derive(Default)]
struct RefusingRouting(FakeRouting);

impl crate::irq::MsiRouting for RefusingRouting {
    fn allocate_gsi(&self) -> Result<u32, crate::irq::IrqError> {
        self.0.allocate_gsi()
    }
    fn route_msi(&self, gsi: u32, _: crate::irq::MsiMessage) -> Result<(), crate::irq::IrqError> {
        Err(crate::irq::IrqError::NotAllocated(gsi))
    }
    fn attach_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), crate::irq::IrqError> {
        self.0.attach_irqfd(fd, gsi)
    }
    fn detach_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), crate::irq::IrqError> {
        self.0.detach_irqfd(fd, gsi)
    }
}

#[test]
fn ten_thousand_refused_msix_routes() {
    let (pio, mmio) = (Bus::new(), Bus::new());
    let mut host =
        PciHost::new(&pio, &mmio, Arc::new(FakeIoeventfds::default()), Arc::new(RefusingRouting::default())).unwrap();
    let mem = guest_mem();
    let _dev = host.add_virtio(Box::new(FillDevice::new()), &mem, &Runtime::new(ThreadingMode::PerQueue)).unwrap();
    let d = Driver { pio, mmio, slot: 1, bar: layout::PCI_MMIO_START };
    d.cfg_write(0x04, 2, 0x6);
    let (_, _, msix_cap) = d.caps();
    d.cfg_write(msix_cap + 2, 2, 0x8000);
    let before = crate::throttles::MSIX_ROUTING.count();
    let ((), lines) = capture(|| {
        for _ in 0..ATTEMPTS {
            d.bar_write(0x4000 + 12, 4, 0); // unmask vector 0: route it
            d.bar_write(0x4000 + 12, 4, 1); // mask it again
        }
    });
    assert!(crate::throttles::MSIX_ROUTING.count() - before >= ATTEMPTS);
    let hits = lines_with(&lines, "MSI-X vector 0");
    assert!(!hits.is_empty() && hits.len() <= MAX_LINES, "{} lines: {lines:#?}", hits.len());
    assert!(crate::throttles::summary().is_some_and(|s| s.contains("MSI-X routing failures")));
}
