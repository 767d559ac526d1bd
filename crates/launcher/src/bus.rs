//! Port-I/O and MMIO dispatch: which emulated device answers a vCPU's
//! access that KVM handed to user space.
//!
//! Only slow-path accesses arrive here (config space, the serial port,
//! virtio-pci common configuration). Queue notifications never do: they are
//! KVM ioeventfds that wake the queue thread directly.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on the I/O or MMIO bus. `offset` is relative to the start of
/// the range the device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

/// An address space of devices: port I/O or MMIO.
#[derive(Default, Clone)]
pub struct Bus {
    /// base → (length, device)
    devices: Arc<Mutex<BTreeMap<u64, Entry>>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `dev` at `[base, base + len)`.
    pub fn insert(&self, dev: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        let mut map = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let overlaps = map
            .range(..base + len)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        map.insert(base, (len, dev));
        Ok(())
    }

    /// Removes the device inserted at exactly `base` (e.g. a BAR that the
    /// guest is moving).
    pub fn remove(&self, base: u64) -> bool {
        let mut map = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&base).is_some()
    }

    fn lookup(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let map = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let (base, (len, dev)) = map.range(..=addr).next_back()?;
        if addr < base + len {
            Some((*base, dev.clone()))
        } else {
            None
        }
    }

    /// Dispatches a read; returns false (and fills `data` with 0xff, as
    /// real hardware reads an unclaimed address) if no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr) {
            Some((base, dev)) => {
                dev.lock().unwrap_or_else(|e| e.into_inner()).read(addr - base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr) {
            Some((base, dev)) => {
                dev.lock().unwrap_or_else(|e| e.into_inner()).write(addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_refuses_overlaps() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Reg(1))), 0x100, 0x10).unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Reg(2))), 0x108, 0x10).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Reg(2))), 0xf8, 0x10).is_err());
        bus.insert(Arc::new(Mutex::new(Reg(2))), 0x110, 0x10).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x110, &[7]));
        assert!(bus.read(0x110, &mut b));
        assert_eq!(b[0], 7);
        assert!(!bus.read(0x200, &mut b));
        assert_eq!(b[0], 0xff);
    }
}
