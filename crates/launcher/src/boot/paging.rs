//! The identity page tables the boot vCPU starts with: the 64-bit kernel
//! entry point expects paging on, and maps itself from there. The first
//! GiB mapped with 2 MiB pages covers the kernel, its boot parameters, the
//! command line and the initramfs as long as they sit below 1 GiB — the
//! kernel builds its own tables before it touches anything higher.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{PDE_START, PDPTE_START, PML4_START};
use kickvm_virtio::GuestMemory;

const PRESENT_WRITABLE: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// The three tables (PML4, PDPT, PD) as `(guest address, 512 entries)`.
pub fn identity_tables() -> [(u64, [u64; 512]); 3] {
    let mut pml4 = [0u64; 512];
    pml4[0] = PDPTE_START | PRESENT_WRITABLE;
    let mut pdpt = [0u64; 512];
    pdpt[0] = PDE_START | PRESENT_WRITABLE;
    let mut pd = [0u64; 512];
    for (i, e) in pd.iter_mut().enumerate() {
        *e = ((i as u64) << 21) | PAGE_SIZE_2M | PRESENT_WRITABLE;
    }
    [(PML4_START, pml4), (PDPTE_START, pdpt), (PDE_START, pd)]
}

/// Writes the identity tables into guest memory; returns the CR3 value.
pub fn write_identity_tables(mem: &GuestMemory) -> Result<u64, vm_memory::GuestMemoryError> {
    for (addr, table) in identity_tables() {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr))?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables like the MMU does for a 2 MiB page.
    fn translate(mem: &GuestMemory, cr3: u64, va: u64) -> Option<u64> {
        let pml4e: u64 = mem.read_obj(GuestAddress(cr3 + ((va >> 39) & 511) * 8)).ok()?;
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte: u64 = mem.read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 511) * 8)).ok()?;
        if pdpte & 1 == 0 {
            return None;
        }
        let pde: u64 = mem.read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8)).ok()?;
        if pde & 1 == 0 || pde & PAGE_SIZE_2M == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff) | (va & 0x1f_ffff))
    }

    #[test]
    fn first_gib_is_identity_mapped() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let cr3 = write_identity_tables(&mem).unwrap();
        for va in [0u64, 0x1000, 0x100_0000, 0x1234_5678, (1 << 30) - 1] {
            assert_eq!(translate(&mem, cr3, va), Some(va));
        }
        assert_eq!(translate(&mem, cr3, 1 << 30), None);
    }
}
