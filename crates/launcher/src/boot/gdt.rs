//! The GDT and segment registers of a vCPU entering the kernel in 64-bit
//! long mode. No crate of the field provides this; it is the few
//! descriptors the Linux 64-bit boot protocol requires (`__BOOT_CS` =
//! 0x10, `__BOOT_DS` = 0x18, flat).

use kvm_bindings::kvm_segment;

/// Index → descriptor: null, 32-bit code, 64-bit code, data, TSS.
pub const GDT: [u64; 5] = [
    0,
    descriptor(0xc09b, 0, 0xfffff), // code: present, DPL0, exec/read, D=1, G=1
    descriptor(0xa09b, 0, 0xfffff), // code: present, DPL0, exec/read, L=1, G=1
    descriptor(0xc093, 0, 0xfffff), // data: present, DPL0, read/write, D/B=1, G=1
    descriptor(0x808b, 0, 0xfffff), // TSS (busy); only so TR is valid
];
pub const CODE32_INDEX: u16 = 1;
pub const CODE_INDEX: u16 = 2;
pub const DATA_INDEX: u16 = 3;
pub const TSS_INDEX: u16 = 4;

/// Packs a segment descriptor. `flags` holds the access byte in bits 0..8
/// and the granularity/size nibble in bits 12..16, as written in the SDM.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0xf_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The `kvm_segment` a vCPU register holds once loaded from `GDT[index]`.
pub fn segment(index: u16) -> kvm_segment {
    let d = GDT[usize::from(index)];
    let base = ((d >> 16) & 0xff_ffff) | ((d >> 32) & 0xff00_0000);
    let raw_limit = (d & 0xffff) | ((d >> 32) & 0xf_0000);
    let g = ((d >> 55) & 1) as u8;
    let limit = if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit };
    kvm_segment {
        base,
        limit: limit as u32,
        selector: index * 8,
        type_: ((d >> 40) & 0xf) as u8,
        present: ((d >> 47) & 1) as u8,
        dpl: ((d >> 45) & 3) as u8,
        db: ((d >> 54) & 1) as u8,
        s: ((d >> 44) & 1) as u8,
        l: ((d >> 53) & 1) as u8,
        g,
        avl: ((d >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// The GDT as bytes, to be written at `layout::BOOT_GDT_START`.
pub fn gdt_bytes() -> Vec<u8> {
    GDT.iter().flat_map(|d| d.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_sdm_encoding() {
        // The same flat descriptors every x86 boot loader writes.
        assert_eq!(descriptor(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(descriptor(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn code_segment_is_64_bit() {
        let cs = segment(CODE_INDEX);
        assert_eq!((cs.selector, cs.l, cs.db, cs.present, cs.s, cs.type_), (0x10, 1, 0, 1, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(DATA_INDEX);
        assert_eq!((ds.selector, ds.l, ds.db, ds.type_), (0x18, 0, 1, 3));
        let tr = segment(TSS_INDEX);
        assert_eq!((tr.s, tr.type_), (0, 0xb));
        let cs32 = segment(CODE32_INDEX);
        assert_eq!((cs32.selector, cs32.l, cs32.db, cs32.type_, cs32.limit), (0x8, 0, 1, 0xb, 0xffff_ffff));
    }
}
