//! ACPI PCI hotplug on bus 0, in the shape Linux's `acpiphp` drives (and
//! QEMU's and Cloud Hypervisor's hardware-reduced machines offer): the
//! DSDT gives every slot an ACPI device (`_ADR`, `_SUN`, `_EJ0`) and a
//! method `PCNT` that reads two bitmaps here and notifies the slots
//! (see [`crate::acpi`]); the launcher sets a bit and raises the Generic
//! Event Device's interrupt ([`crate::platform::Ged`]).
//!
//! Three dwords at [`crate::layout::PCI_HOTPLUG_PORT`]:
//!
//! | offset | name | meaning |
//! |---|---|---|
//! | 0 | `PCIU` | slots whose device arrived: `PCNT` sends them Device Check (1); a read clears what it returned |
//! | 4 | `PCID` | slots whose device the launcher wants back: Eject Request (3); a read clears what it returned |
//! | 8 | `B0EJ` | the guest's `_EJ0` writes a slot's bit once it let go of the device; reads 0 |
//!
//! A guest can only eject what the launcher asked for: a `B0EJ` bit for
//! any other slot (the host bridge's, a device nobody asked back) changes
//! nothing, so a hostile guest cannot tear down devices at will nor make
//! the launcher's view of the bus differ from its own requests.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::bus::BusDevice;

/// Register offsets.
const PCIU: u64 = 0;
const PCID: u64 = 4;
const B0EJ: u64 = 8;

/// What the launcher does once the guest ejected a slot: take the device
/// out of it and stop it.
pub type EjectFn = Box<dyn Fn(u8) + Send + Sync>;

/// The hotplug state of bus 0's slots.
pub struct HotplugSlots {
    up: AtomicU32,
    down: AtomicU32,
    /// Slots whose removal the launcher asked for and the guest has not
    /// ejected yet.
    removing: AtomicU32,
    eject: EjectFn,
}

impl HotplugSlots {
    pub fn new(eject: EjectFn) -> Arc<HotplugSlots> {
        Arc::new(HotplugSlots { up: AtomicU32::new(0), down: AtomicU32::new(0), removing: AtomicU32::new(0), eject })
    }

    /// A device was put in `slot`: the next `PCNT` tells the guest.
    pub fn device_arrived(&self, slot: u8) {
        self.up.fetch_or(bit(slot), Ordering::SeqCst);
    }

    /// The launcher wants the device in `slot` back: the next `PCNT` asks
    /// the guest to eject it.
    pub fn request_removal(&self, slot: u8) {
        self.removing.fetch_or(bit(slot), Ordering::SeqCst);
        self.down.fetch_or(bit(slot), Ordering::SeqCst);
    }

    /// True while the removal of `slot` is asked for and not done.
    pub fn removal_pending(&self, slot: u8) -> bool {
        self.removing.load(Ordering::SeqCst) & bit(slot) != 0
    }

    /// The guest's `_EJ0` wrote `slots`: eject those whose removal was
    /// asked for, ignore the rest. A slot's request ends only once its
    /// device is out (whoever waits on [`Self::removal_pending`] then
    /// finds it stopped); two vCPUs ejecting the same slot eject it once.
    fn ejected(&self, slots: u32) {
        let asked = self.removing.load(Ordering::SeqCst) & slots;
        for slot in 0..32u8 {
            if asked & bit(slot) != 0 {
                (self.eject)(slot);
                self.removing.fetch_and(!bit(slot), Ordering::SeqCst);
            }
        }
    }
}

fn bit(slot: u8) -> u32 {
    1u32.checked_shl(u32::from(slot)).unwrap_or(0)
}

/// The registers on the I/O bus.
pub struct HotplugRegisters(pub Arc<HotplugSlots>);

/// Clears the bytes `[at, at + len)` of `reg` and returns them, as the
/// guest reads them (little-endian).
fn take_bytes(reg: &AtomicU32, at: u64, data: &mut [u8]) {
    let mask = data.iter().enumerate().fold(0u32, |m, (i, _)| m | 0xff << (8 * (at as usize + i)));
    let v = reg.fetch_and(!mask, Ordering::SeqCst) & mask;
    for (i, b) in data.iter_mut().enumerate() {
        *b = (v >> (8 * (at as usize + i))) as u8;
    }
}

impl BusDevice for HotplugRegisters {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // One register per access: an access that spans two reads zeroes.
        let (reg, at) = (offset & !3, offset & 3);
        if at as usize + data.len() > 4 {
            return;
        }
        match reg {
            PCIU => take_bytes(&self.0.up, at, data),
            PCID => take_bytes(&self.0.down, at, data),
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let at = (offset & 3) as usize;
        if offset & !3 != B0EJ || at + data.len() > 4 {
            return;
        }
        let slots = data.iter().enumerate().fold(0u32, |v, (i, b)| v | u32::from(*b) << (8 * (at + i)));
        self.0.ejected(slots);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn setup() -> (Arc<HotplugSlots>, HotplugRegisters, Arc<Mutex<Vec<u8>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let slots = HotplugSlots::new(Box::new(move |slot| s.lock().unwrap().push(slot)));
        (slots.clone(), HotplugRegisters(slots), seen)
    }

    fn read32(r: &mut HotplugRegisters, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        r.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn arrivals_and_removal_requests_read_once() {
        let (slots, mut r, _) = setup();
        slots.device_arrived(3);
        slots.device_arrived(31);
        slots.request_removal(2);
        assert_eq!(read32(&mut r, PCIU), 1 << 3 | 1 << 31);
        assert_eq!(read32(&mut r, PCIU), 0, "a read clears");
        // A byte read clears only the byte it returned.
        slots.device_arrived(9);
        slots.device_arrived(1);
        let mut b = [0u8; 1];
        r.read(PCIU + 1, &mut b);
        assert_eq!(b[0], 1 << 1, "slot 9 is bit 1 of byte 1");
        assert_eq!(read32(&mut r, PCIU), 1 << 1, "slot 1 is still pending");
        assert_eq!(read32(&mut r, PCID), 1 << 2);
        assert_eq!(read32(&mut r, B0EJ), 0);
    }

    /// The guest ejects only what was asked back, once; writes anywhere
    /// else, of any width and value, change nothing; reads past the
    /// registers or across two of them read zeroes and clear nothing.
    #[test]
    fn hostile_accesses_eject_nothing_unasked() {
        let (slots, mut r, seen) = setup();
        r.write(B0EJ, &u32::MAX.to_le_bytes());
        r.write(PCIU, &u32::MAX.to_le_bytes());
        r.write(B0EJ + 2, &[0xff, 0xff, 0xff, 0xff]);
        r.write(B0EJ + 4, &[0xff]);
        assert!(seen.lock().unwrap().is_empty());
        slots.request_removal(4);
        slots.device_arrived(5);
        let mut d = [0u8; 4];
        r.read(PCIU + 2, &mut d);
        assert_eq!(d, [0; 4], "an access across two registers");
        r.read(0x40, &mut d);
        assert_eq!(d, [0; 4]);
        assert_eq!(read32(&mut r, PCIU), 1 << 5, "still pending after the odd reads");
        assert!(slots.removal_pending(4));
        r.write(B0EJ, &u32::MAX.to_le_bytes());
        r.write(B0EJ, &(1u32 << 4).to_le_bytes());
        assert_eq!(*seen.lock().unwrap(), vec![4], "slot 4 ejected once");
        assert!(!slots.removal_pending(4));
        assert_eq!(bit(40), 0);
    }
}
