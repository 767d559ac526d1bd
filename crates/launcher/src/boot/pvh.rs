//! The PVH boot protocol's start of day (Xen's `arch-x86/hvm/start_info.h`,
//! which Linux implements in `arch/x86/platform/pvh/`): the boot vCPU
//! starts in 32-bit protected mode, paging off, at the vmlinux's PVH entry
//! point with `%ebx` holding the address of an `hvm_start_info` that says
//! where the command line, the memory map, the ACPI RSDP and the modules
//! (the initramfs is module 0) are. linux-loader's structures and its
//! configurator write it; this module decides what goes in it.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::GuestAddress;

use super::params::e820_map;
use super::BootError;
use crate::layout;
use kickvm_virtio::GuestMemory;

/// `hvm_start_info` version 1: the memory map is in it.
const START_INFO_VERSION: u32 = 1;
/// Memory map entries that fit between the memory map's address and the
/// module list's.
const MAX_MEMMAP: usize =
    (layout::PVH_MODLIST_START - layout::PVH_MEMMAP_START) as usize / std::mem::size_of::<hvm_memmap_table_entry>();

// The start info, the memory map and the one-entry module list do not
// overlap each other or the zero page's place.
const _: () = assert!(layout::PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64 <= layout::PVH_MEMMAP_START);
const _: () = assert!(layout::PVH_MODLIST_START + std::mem::size_of::<hvm_modlist_entry>() as u64 <= layout::ZERO_PAGE_START);

/// Where things are, for [`write_start_info`].
pub struct StartInfo {
    pub ram: u64,
    pub cmdline_addr: u64,
    /// `(address, size)` of the initramfs.
    pub initrd: Option<(u64, u64)>,
    pub rsdp_addr: u64,
}

/// The `hvm_start_info`, the memory map and the module list for `info`,
/// as linux-loader writes them.
pub fn boot_params_for(info: &StartInfo) -> Result<BootParams, BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(info.ram)
        .into_iter()
        .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind, reserved: 0 })
        .collect();
    if memmap.len() > MAX_MEMMAP {
        return Err(BootError::TooManyE820Entries);
    }
    let mut start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        cmdline_paddr: info.cmdline_addr,
        rsdp_paddr: info.rsdp_addr,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let modules = info.initrd.map(|(paddr, size)| hvm_modlist_entry { paddr, size, ..Default::default() });
    if modules.is_some() {
        start.nr_modules = 1;
        start.modlist_paddr = layout::PVH_MODLIST_START;
    }
    let mut params = BootParams::new(&start, GuestAddress(layout::PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_START));
    if let Some(m) = modules {
        params.set_modules(&[m], GuestAddress(layout::PVH_MODLIST_START));
    }
    Ok(params)
}

/// Writes the start of day for `info` into guest memory.
pub fn write_start_info(mem: &GuestMemory, info: &StartInfo) -> Result<(), BootError> {
    PvhBootConfigurator::write_bootparams(&boot_params_for(info)?, mem).map_err(|e| BootError::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn start_info_points_at_everything() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let info = StartInfo {
            ram: 64 << 20,
            cmdline_addr: layout::CMDLINE_START,
            initrd: Some((0x300_0000, 0x1234)),
            rsdp_addr: layout::RSDP_START,
        };
        write_start_info(&mem, &info).unwrap();
        let s: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
        assert_eq!((s.magic, s.version), (0x336e_c578, 1));
        assert_eq!((s.cmdline_paddr, s.rsdp_paddr), (0x20000, 0xe0000));
        assert_eq!((s.nr_modules, s.modlist_paddr), (1, layout::PVH_MODLIST_START));
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(s.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size, m.cmdline_paddr), (0x300_0000, 0x1234, 0));
        assert_eq!(s.memmap_entries as usize, e820_map(64 << 20).len());
        let e: hvm_memmap_table_entry = mem.read_obj(GuestAddress(s.memmap_paddr + 2 * 24)).unwrap();
        assert_eq!((e.addr, e.size, e.type_), (0x10_0000, (64 << 20) - 0x10_0000, 1));
        assert!(layout::PVH_MEMMAP_START + 24 * u64::from(s.memmap_entries) <= layout::PVH_MODLIST_START);
    }

    #[test]
    fn without_an_initrd_there_is_no_module() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let info = StartInfo { ram: 16 << 20, cmdline_addr: layout::CMDLINE_START, initrd: None, rsdp_addr: layout::RSDP_START };
        write_start_info(&mem, &info).unwrap();
        let s: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
        assert_eq!((s.nr_modules, s.modlist_paddr), (0, 0));
        // Every memory map a guest of any size gets fits.
        for ram in [16u64 << 20, 3 << 30, 6 << 30, layout::MAX_RAM] {
            boot_params_for(&StartInfo { ram, ..info }).unwrap();
        }
    }
}
