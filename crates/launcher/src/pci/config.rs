//! A type-0 PCI configuration header: the 256 bytes a driver reads to learn
//! what a function is, plus its capability list and BARs.
//!
//! Every byte has a write mask, so the guest can only change what hardware
//! lets it change. BAR sizing falls out of that: the low bits of a BAR
//! below its size are read-only zero, so after the guest writes all ones it
//! reads back the size mask.

/// Standard header offsets.
pub const VENDOR_ID: usize = 0x00;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION_ID: usize = 0x08;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
/// Size of the conventional configuration space. ECAM exposes 4 KiB per
/// function; the extended part reads as zero (no extended capabilities).
pub const CONFIG_SPACE_SIZE: usize = 256;
pub const ECAM_FUNCTION_SIZE: usize = 4096;

/// Command register bits.
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_WRITABLE: u16 = COMMAND_MEMORY | COMMAND_BUS_MASTER | (1 << 6) | (1 << 8) | (1 << 10);
const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
const FIRST_CAPABILITY: usize = 0x40;

/// BAR type bits: 64-bit memory BAR.
const BAR_MEM_64: u32 = 0b100;

/// What identifies a function.
#[derive(Debug, Clone, Copy)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class code: base class, subclass, programming interface.
    pub class: (u8, u8, u8),
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// The configuration space of one function.
pub struct PciConfig {
    bytes: [u8; CONFIG_SPACE_SIZE],
    wmask: [u8; CONFIG_SPACE_SIZE],
    /// Size of each 64-bit memory BAR, by the index of its low half.
    bar_sizes: [u64; 6],
    /// Where the next capability goes, and the last one's `next` byte.
    next_cap: usize,
    last_cap_next: usize,
}

impl PciConfig {
    pub fn new(ids: PciIds) -> Self {
        let mut c = PciConfig {
            bytes: [0; CONFIG_SPACE_SIZE],
            wmask: [0; CONFIG_SPACE_SIZE],
            bar_sizes: [0; 6],
            next_cap: FIRST_CAPABILITY,
            last_cap_next: CAPABILITIES_POINTER,
        };
        c.put(VENDOR_ID, &ids.vendor.to_le_bytes());
        c.put(VENDOR_ID + 2, &ids.device.to_le_bytes());
        c.put(REVISION_ID, &[ids.revision, ids.class.2, ids.class.1, ids.class.0]);
        c.put(SUBSYSTEM_VENDOR_ID, &ids.subsystem_vendor.to_le_bytes());
        c.put(SUBSYSTEM_VENDOR_ID + 2, &ids.subsystem.to_le_bytes());
        c.set_writable(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        // Cache line size and latency timer are plain scratch registers,
        // as is the interrupt line (firmware's note to the OS).
        c.set_writable(0x0c, &[0xff, 0xff]);
        c.set_writable(INTERRUPT_LINE, &[0xff]);
        c
    }

    /// Stores bytes, ignoring the write mask (device side).
    pub fn put(&mut self, offset: usize, data: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(offset..offset + data.len()) {
            dst.copy_from_slice(data);
        }
    }

    /// Declares which bits of `[offset, offset + mask.len())` the guest may
    /// write.
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        if let Some(dst) = self.wmask.get_mut(offset..offset + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }

    /// Adds a 64-bit, non-prefetchable memory BAR using BAR slots `index`
    /// and `index + 1`, at `addr`. `size` must be a power of two ≥ 16.
    pub fn add_bar64(&mut self, index: usize, size: u64, addr: u64) {
        debug_assert!(index < 5 && size.is_power_of_two() && size >= 16);
        let Some(slot) = self.bar_sizes.get_mut(index) else { return };
        *slot = size;
        let off = BAR0 + 4 * index;
        let mask = !(size - 1) & !0xf;
        self.set_writable(off, &(mask as u32).to_le_bytes());
        self.set_writable(off + 4, &((mask >> 32) as u32).to_le_bytes());
        self.put(off, &((addr & mask) as u32 | BAR_MEM_64).to_le_bytes());
        self.put(off + 4, &((addr >> 32) as u32).to_le_bytes());
    }

    /// The address BAR `index` is programmed to (the guest may have moved
    /// it, or be in the middle of sizing it).
    pub fn bar_address(&self, index: usize) -> u64 {
        let off = BAR0 + 4 * index;
        let lo = self.dword(off) & !0xf;
        let hi = self.dword(off + 4);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Size of BAR `index` (0 if it is not implemented).
    pub fn bar_size(&self, index: usize) -> u64 {
        self.bar_sizes.get(index).copied().unwrap_or(0)
    }

    /// Appends a capability. `body` starts with the capability ID; its
    /// second byte (the `next` pointer) is filled in here. Returns the
    /// capability's offset in config space, or None if it does not fit.
    pub fn add_capability(&mut self, body: &[u8]) -> Option<usize> {
        let off = self.next_cap;
        if body.len() < 2 || off + body.len() > CONFIG_SPACE_SIZE {
            return None;
        }
        self.put(off, body);
        self.bytes[off + 1] = 0;
        self.bytes[self.last_cap_next] = off as u8;
        self.last_cap_next = off + 1;
        // Capabilities are dword-aligned.
        self.next_cap = (off + body.len() + 3) & !3;
        let status = self.word(STATUS) | STATUS_CAPABILITIES_LIST;
        self.put(STATUS, &status.to_le_bytes());
        Some(off)
    }

    pub fn command(&self) -> u16 {
        self.word(COMMAND)
    }

    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    pub fn byte(&self, offset: usize) -> u8 {
        self.bytes.get(offset).copied().unwrap_or(0)
    }

    pub fn word(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.byte(offset), self.byte(offset + 1)])
    }

    pub fn dword(&self, offset: usize) -> u32 {
        u32::from_le_bytes([
            self.byte(offset),
            self.byte(offset + 1),
            self.byte(offset + 2),
            self.byte(offset + 3),
        ])
    }

    /// A guest read. Offsets past the conventional 256 bytes read zero.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.byte(offset + i);
        }
    }

    /// A guest write: only bits the write mask allows change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let at = offset + i;
            if at >= CONFIG_SPACE_SIZE {
                break;
            }
            let m = self.wmask[at];
            self.bytes[at] = (self.bytes[at] & !m) | (v & m);
        }
    }
}

/// True when a write at `[offset, offset + len)` touches `[reg, reg + reg_len)`.
pub fn touches(offset: usize, len: usize, reg: usize, reg_len: usize) -> bool {
    offset < reg + reg_len && reg < offset + len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfig {
        PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1044,
            revision: 1,
            class: (0xff, 0, 0),
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        })
    }

    #[test]
    fn ids_are_read_only() {
        let mut c = cfg();
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(c.dword(0), 0x1044_1af4);
        assert_eq!(c.byte(REVISION_ID), 1);
        assert_eq!(c.byte(0x0b), 0xff);
    }

    #[test]
    fn bar64_sizing_and_relocation() {
        let mut c = cfg();
        c.add_bar64(0, 0x8000, 0xc000_0000);
        assert_eq!(c.dword(BAR0), 0xc000_0004);
        assert_eq!(c.bar_address(0), 0xc000_0000);
        // Sizing as Linux does it: all ones, read back, restore.
        c.write(BAR0, &[0xff; 4]);
        assert_eq!(c.dword(BAR0), 0xffff_8004);
        c.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(c.dword(BAR0 + 4), 0xffff_ffff);
        c.write(BAR0, &0xd000_0000u32.to_le_bytes());
        c.write(BAR0 + 4, &1u32.to_le_bytes());
        assert_eq!(c.bar_address(0), 0x1_d000_0000);
        // An unimplemented BAR sizes to zero.
        c.write(BAR0 + 8, &[0xff; 4]);
        assert_eq!(c.dword(BAR0 + 8), 0);
        // The expansion ROM BAR is absent too.
        c.write(0x30, &[0xff; 4]);
        assert_eq!(c.dword(0x30), 0);
    }

    #[test]
    fn capability_chain_is_linked() {
        let mut c = cfg();
        assert_eq!(c.word(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        let a = c.add_capability(&[0x11, 0xaa, 1, 2, 3]).unwrap();
        let b = c.add_capability(&[0x09, 0xaa, 16]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48, "dword aligned");
        assert_ne!(c.word(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        assert_eq!(c.byte(CAPABILITIES_POINTER), 0x40);
        assert_eq!(c.byte(0x41), 0x48);
        assert_eq!(c.byte(0x49), 0);
        assert!(c.add_capability(&[0x09; 200]).is_none());
    }

    #[test]
    fn command_only_takes_writable_bits() {
        let mut c = cfg();
        c.write(COMMAND, &[0xff, 0xff]);
        assert_eq!(c.command(), COMMAND_WRITABLE);
        assert!(c.memory_enabled());
        c.write(COMMAND, &[0]);
        assert!(!c.memory_enabled());
        // Writes past the end are ignored, reads there are zero.
        c.write(0xff, &[1, 2, 3, 4]);
        let mut d = [9u8; 4];
        c.read(0x100, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
