//! The Linux "zero page" (`struct boot_params`): the memory map (e820),
//! where the command line and the initramfs are, and the setup header the
//! kernel image carries. linux-loader writes it to guest memory
//! ([`linux_loader::configurator::linux::LinuxBootConfigurator`]); this
//! module decides what goes in it.

use linux_loader::loader::bootparam::{boot_params, setup_header, CAN_USE_HEAP, KEEP_SEGMENTS};

use crate::layout;
use crate::memory::ram_ranges;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// `type_of_loader` for a boot loader without an assigned ID.
const LOADER_UNDEFINED: u8 = 0xff;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;

/// One e820 entry: `[addr, addr + size)` of `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820 {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map the guest sees for `ram` bytes of RAM: the first 640 KiB
/// less the EBDA, the legacy BIOS area (where the ACPI RSDP lives)
/// reserved, RAM from 1 MiB, the PCI ECAM reserved (Linux only uses
/// MMCONFIG that the firmware reserved), and RAM above 4 GiB past the PCI
/// hole. The hole itself stays unlisted so PCI BARs can live there.
pub fn e820_map(ram: u64) -> Vec<E820> {
    let mut map = Vec::new();
    for (start, len) in ram_ranges(ram) {
        if start == 0 {
            map.push(E820 { addr: 0, size: layout::EBDA_START, kind: E820_RAM });
            map.push(E820 {
                addr: layout::EBDA_START,
                size: layout::HIGH_RAM_START - layout::EBDA_START,
                kind: E820_RESERVED,
            });
            map.push(E820 {
                addr: layout::HIGH_RAM_START,
                size: len - layout::HIGH_RAM_START,
                kind: E820_RAM,
            });
            map.push(E820 { addr: layout::PCI_ECAM_START, size: layout::PCI_ECAM_SIZE, kind: E820_RESERVED });
        } else {
            map.push(E820 { addr: start, size: len, kind: E820_RAM });
        }
    }
    map
}

/// Where things are, for [`boot_params_for`].
pub struct BootInfo {
    pub header: setup_header,
    pub ram: u64,
    pub cmdline_addr: u64,
    pub cmdline_len: usize,
    /// `(address, size)` of the initramfs.
    pub initrd: Option<(u64, u64)>,
    pub rsdp_addr: u64,
}

/// Fills the zero page.
pub fn boot_params_for(info: &BootInfo) -> Result<boot_params, super::BootError> {
    let mut p = boot_params { hdr: info.header, ..Default::default() };
    p.hdr.type_of_loader = LOADER_UNDEFINED;
    p.hdr.boot_flag = BOOT_FLAG_MAGIC;
    p.hdr.header = HDRS_MAGIC;
    p.hdr.loadflags |= KEEP_SEGMENTS | CAN_USE_HEAP;
    // The heap end is relative to the real-mode code's start; unused by a
    // 64-bit entry but boot loaders are expected to set it.
    p.hdr.heap_end_ptr = 0xfe00;
    // Fields the boot loader owns, whatever the image file held: no
    // setup_data list (a pointer the kernel would follow), a plain PC.
    p.hdr.setup_data = 0;
    p.hdr.hardware_subarch = 0;
    p.hdr.hardware_subarch_data = 0;
    p.hdr.ramdisk_image = 0;
    p.hdr.ramdisk_size = 0;
    p.hdr.cmd_line_ptr = info.cmdline_addr as u32;
    p.hdr.cmdline_size = info.cmdline_len as u32;
    if let Some((addr, size)) = info.initrd {
        // Placed below 4 GiB by `initrd_placement`; checked, not truncated.
        let (Ok(addr), Ok(size)) = (u32::try_from(addr), u32::try_from(size)) else {
            return Err(super::BootError::Write(format!("initrd at {addr:#x}+{size:#x} is not below 4 GiB")));
        };
        p.hdr.ramdisk_image = addr;
        p.hdr.ramdisk_size = size;
    }
    p.acpi_rsdp_addr = info.rsdp_addr;
    let map = e820_map(info.ram);
    if map.len() > p.e820_table.len() {
        return Err(super::BootError::TooManyE820Entries);
    }
    for (slot, e) in p.e820_table.iter_mut().zip(&map) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    p.e820_entries = map.len() as u8;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_has_the_gaps_and_reserves_ecam() {
        let m = e820_map(512 << 20);
        assert_eq!(m[0], E820 { addr: 0, size: 0x9fc00, kind: E820_RAM });
        assert_eq!(m[1].kind, E820_RESERVED);
        assert_eq!(m[2], E820 { addr: 0x10_0000, size: (512 << 20) - 0x10_0000, kind: E820_RAM });
        assert_eq!(m[3], E820 { addr: 0xe000_0000, size: 0x1000_0000, kind: E820_RESERVED });
        assert_eq!(m.len(), 4);

        let big = e820_map(6 << 30);
        assert_eq!(big[2].addr + big[2].size, 0xc000_0000);
        assert_eq!(big[4], E820 { addr: 1 << 32, size: 3 << 30, kind: E820_RAM });
        // Entries never overlap and are sorted.
        for w in big.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn loader_fields_from_the_image_file_are_not_passed_on() {
        let header = setup_header {
            setup_data: 0xdead_beef_0000,
            hardware_subarch: 3,
            ramdisk_image: 0x1234_0000,
            ramdisk_size: 77,
            ..Default::default()
        };
        let info = BootInfo {
            header,
            ram: 64 << 20,
            cmdline_addr: layout::CMDLINE_START,
            cmdline_len: 1,
            initrd: None,
            rsdp_addr: layout::RSDP_START,
        };
        let hdr = boot_params_for(&info).unwrap().hdr;
        assert_eq!(({ hdr.setup_data }, { hdr.hardware_subarch }), (0, 0));
        assert_eq!(({ hdr.ramdisk_image }, { hdr.ramdisk_size }), (0, 0));
        let big = BootInfo { initrd: Some((1 << 32, 1)), ..info };
        assert!(boot_params_for(&big).is_err(), "an initrd above 4 GiB cannot be described");
    }

    #[test]
    fn zero_page_carries_loader_fields() {
        let info = BootInfo {
            header: setup_header::default(),
            ram: 256 << 20,
            cmdline_addr: layout::CMDLINE_START,
            cmdline_len: 12,
            initrd: Some((0x0f00_0000, 0x1234)),
            rsdp_addr: layout::RSDP_START,
        };
        let p = boot_params_for(&info).unwrap();
        let hdr = p.hdr;
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_ne!(hdr.loadflags & KEEP_SEGMENTS, 0);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!(({ hdr.ramdisk_image }, { hdr.ramdisk_size }), (0x0f00_0000, 0x1234));
        assert_eq!(p.e820_entries, 4);
        let rsdp = p.acpi_rsdp_addr;
        assert_eq!(rsdp, 0xe0000);
    }
}
