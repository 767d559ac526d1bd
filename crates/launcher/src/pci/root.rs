//! PCI bus 0 and the two ways a guest reaches its configuration space:
//! configuration mechanism #1 (ports 0xCF8/0xCFC) and ECAM (memory-mapped,
//! 4 KiB per function).
//!
//! Linux on x86 uses mechanism #1 for the first 256 bytes of every function
//! on segment 0 and ECAM only for the extended space, so both must agree;
//! they share one [`PciRoot`].

use std::sync::{Arc, Mutex};

use super::config::{PciConfig, PciIds, ECAM_FUNCTION_SIZE};
use super::PciDevice;
use crate::bus::{Bus, BusDevice, BusError};
use crate::layout;

/// Devices (slots) on bus 0. Every function is function 0.
pub const SLOTS: usize = 32;

/// The host bridge: 00:00.0, an Intel vendor/device pair that Linux knows
/// as a plain host bridge, class 06/00.
struct HostBridge(PciConfig);

impl PciDevice for HostBridge {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.0.write(offset, data);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("PCI bus 0 is full ({SLOTS} slots)")]
    Full,
    #[error("cannot place the PCI configuration space on the bus: {0}")]
    Bus(#[from] BusError),
}

/// A slot on bus 0, empty or holding a function.
type Slot = Option<Arc<Mutex<dyn PciDevice>>>;

/// Bus 0: the host bridge in slot 0 and up to 31 devices.
pub struct PciRoot {
    slots: Mutex<Vec<Slot>>,
}

impl PciRoot {
    pub fn new() -> Arc<Self> {
        let bridge = HostBridge(PciConfig::new(PciIds {
            vendor: 0x8086,
            device: 0x0d57,
            revision: 0,
            class: (0x06, 0x00, 0x00),
            subsystem_vendor: 0,
            subsystem: 0,
        }));
        let mut slots: Vec<Slot> = vec![None; SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(bridge)));
        Arc::new(PciRoot { slots: Mutex::new(slots) })
    }

    /// Puts `dev` in the first free slot; returns the slot (the device is
    /// then `00:<slot>.0`).
    pub fn add(&self, dev: Arc<Mutex<dyn PciDevice>>) -> Result<u8, RootError> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let free = slots.iter().position(Option::is_none).ok_or(RootError::Full)?;
        slots[free] = Some(dev);
        Ok(free as u8)
    }

    /// Takes the function out of `slot` (the guest ejected it) and stops
    /// it. The host bridge never leaves.
    pub fn eject(&self, slot: u8) {
        if slot == 0 {
            return;
        }
        let dev = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.get_mut(usize::from(slot)).and_then(Option::take)
        };
        if let Some(d) = dev {
            d.lock().unwrap_or_else(|e| e.into_inner()).unplug();
        }
    }

    /// Inserts the configuration mechanisms: ports 0xCF8..0xCFF on `pio`
    /// and the ECAM window at [`layout::PCI_ECAM_START`] on `mmio`.
    pub fn register(self: &Arc<Self>, pio: &Bus, mmio: &Bus) -> Result<(), RootError> {
        let io = PciConfigIo { root: self.clone(), address: 0 };
        pio.insert(Arc::new(Mutex::new(io)), layout::PCI_CONFIG_PORT, 8)?;
        let ecam = PciConfigEcam { root: self.clone() };
        mmio.insert(Arc::new(Mutex::new(ecam)), layout::PCI_ECAM_START, layout::PCI_ECAM_SIZE)?;
        Ok(())
    }

    /// Empties every slot (VM teardown), so that nothing the buses still
    /// hold keeps a device alive.
    pub fn clear(&self) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.iter_mut().for_each(|s| *s = None);
    }

    fn device(&self, bus: u8, slot: u8, function: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || function != 0 {
            return None;
        }
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get(usize::from(slot))?.clone()
    }

    /// A configuration read. Nobody there (or an access crossing the end of
    /// the function's space) reads all ones, as on real hardware.
    pub fn config_read(&self, bus: u8, slot: u8, function: u8, offset: usize, data: &mut [u8]) {
        match self.device(bus, slot, function) {
            Some(d) if offset + data.len() <= ECAM_FUNCTION_SIZE => {
                d.lock().unwrap_or_else(|e| e.into_inner()).read_config(offset, data)
            }
            _ => data.fill(0xff),
        }
    }

    /// A configuration write; dropped when nobody is there.
    pub fn config_write(&self, bus: u8, slot: u8, function: u8, offset: usize, data: &[u8]) {
        if let Some(d) = self.device(bus, slot, function) {
            if offset + data.len() <= ECAM_FUNCTION_SIZE {
                d.lock().unwrap_or_else(|e| e.into_inner()).write_config(offset, data);
            }
        }
    }
}

/// Configuration mechanism #1: a dword address register at 0xCF8 and a
/// data window at 0xCFC..0xCFF that may be accessed as bytes or words.
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

const CONFIG_ENABLE: u32 = 1 << 31;

impl PciConfigIo {
    /// (bus, slot, function, register offset) selected by the address
    /// register, if enabled.
    fn target(&self, data_offset: usize) -> Option<(u8, u8, u8, usize)> {
        if self.address & CONFIG_ENABLE == 0 {
            return None;
        }
        let a = self.address;
        let bus = (a >> 16) as u8;
        let slot = ((a >> 11) & 0x1f) as u8;
        let function = ((a >> 8) & 0x7) as u8;
        let reg = (a & 0xfc) as usize;
        Some((bus, slot, function, reg + data_offset))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let offset = offset as usize;
        if offset < 4 {
            let a = self.address.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = a.get(offset + i).copied().unwrap_or(0xff);
            }
            return;
        }
        // An access may not run past 0xCFF.
        let d = offset - 4;
        match self.target(d) {
            Some((bus, slot, f, reg)) if d + data.len() <= 4 => {
                self.root.config_read(bus, slot, f, reg, data)
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let offset = offset as usize;
        if offset < 4 {
            // Only a dword write at 0xCF8 sets the address register; Linux's
            // probe (`pci_check_type1`) pokes a byte at 0xCFB, which real
            // chipsets route elsewhere.
            if offset == 0 && data.len() == 4 {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & 0x80ff_fffc;
            }
            return;
        }
        let d = offset - 4;
        if let Some((bus, slot, f, reg)) = self.target(d) {
            if d + data.len() <= 4 {
                self.root.config_write(bus, slot, f, reg, data);
            }
        }
    }
}

/// ECAM (PCI Express enhanced configuration access): the address is
/// bus << 20 | slot << 15 | function << 12 | register.
pub struct PciConfigEcam {
    root: Arc<PciRoot>,
}

fn ecam_decode(offset: u64) -> (u8, u8, u8, usize) {
    let bus = (offset >> 20) as u8;
    let slot = ((offset >> 15) & 0x1f) as u8;
    let function = ((offset >> 12) & 0x7) as u8;
    (bus, slot, function, (offset & 0xfff) as usize)
}

impl BusDevice for PciConfigEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, slot, f, reg) = ecam_decode(offset);
        self.root.config_read(bus, slot, f, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bus, slot, f, reg) = ecam_decode(offset);
        self.root.config_write(bus, slot, f, reg, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dummy(PciConfig);
    impl PciDevice for Dummy {
        fn read_config(&mut self, offset: usize, data: &mut [u8]) {
            self.0.read(offset, data);
        }
        fn write_config(&mut self, offset: usize, data: &[u8]) {
            self.0.write(offset, data);
        }
    }

    fn setup() -> (Bus, Bus) {
        let root = PciRoot::new();
        let ids = PciIds {
            vendor: 0x1af4,
            device: 0x1041,
            revision: 1,
            class: (2, 0, 0),
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        };
        assert_eq!(root.add(Arc::new(Mutex::new(Dummy(PciConfig::new(ids))))).unwrap(), 1);
        let (pio, mmio) = (Bus::new(), Bus::new());
        root.register(&pio, &mmio).unwrap();
        (pio, mmio)
    }

    fn cf8(pio: &Bus, slot: u32, reg: u32) {
        assert!(pio.write(0xcf8, &(0x8000_0000 | slot << 11 | reg).to_le_bytes()));
    }

    #[test]
    fn mechanism_1_dword_word_byte() {
        let (pio, _) = setup();
        let mut d = [0u8; 4];
        cf8(&pio, 0, 0);
        pio.read(0xcfc, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086, "host bridge at 00:00.0");
        cf8(&pio, 1, 0);
        pio.read(0xcfc, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1041_1af4);
        let mut w = [0u8; 2];
        pio.read(0xcfe, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1041, "word at 0xCFE is the device ID");
        cf8(&pio, 1, 8);
        let mut b = [0u8; 1];
        pio.read(0xcff, &mut b);
        assert_eq!(b[0], 2, "byte at 0xCFF is the base class");
        // A byte write at 0xCFD reaches register 0x3d's neighbour 0x3c+1.
        cf8(&pio, 1, 0x3c);
        pio.write(0xcfc, &[0x0b]);
        pio.read(0xcfc, &mut b);
        assert_eq!(b[0], 0x0b, "interrupt line is writable");
        // The address register reads back (Linux's type 1 probe).
        pio.write(0xcfb, &[1]);
        cf8(&pio, 0, 0);
        pio.read(0xcf8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        // Empty slot, disabled address, wrong function: all ones.
        cf8(&pio, 7, 0);
        pio.read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
        pio.write(0xcf8, &0x0000_0800u32.to_le_bytes());
        pio.read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
        pio.write(0xcf8, &(0x8000_0800u32 | 1 << 8).to_le_bytes());
        pio.read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn ecam_reaches_the_same_functions() {
        let (_, mmio) = setup();
        let mut d = [0u8; 4];
        mmio.read(layout::PCI_ECAM_START + (1 << 15), &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1041_1af4);
        mmio.read(layout::PCI_ECAM_START + (1 << 15) + 0x100, &mut d);
        assert_eq!(d, [0; 4], "no extended capabilities");
        mmio.read(layout::PCI_ECAM_START + (1 << 20), &mut d);
        assert_eq!(d, [0xff; 4], "bus 1 does not exist");
        mmio.write(layout::PCI_ECAM_START + (1 << 15) + 0x3c, &[0x0a]);
        let mut b = [0u8; 1];
        mmio.read(layout::PCI_ECAM_START + (1 << 15) + 0x3c, &mut b);
        assert_eq!(b[0], 0x0a);
        // Header type: single-function type 0.
        mmio.read(layout::PCI_ECAM_START + 0xe, &mut b);
        assert_eq!(b[0], 0);
    }
}
