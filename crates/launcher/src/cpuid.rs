//! What each vCPU finds in CPUID: the host's KVM-supported leaves
//! (`KVM_GET_SUPPORTED_CPUID`), patched so the guest sees its own APIC ID,
//! a topology of `count` single-thread cores in one package, that it runs
//! on a hypervisor, and KVM's paravirtual signature.
//!
//! Hand-written: rust-vmm publishes no CPUID normalisation crate.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_AMD_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZE: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;

/// Topology level types in leaf 0xB/0x1F ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Bits needed to number `n` items (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Patches `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `id` of
/// `count`. The APIC ID equals the vCPU index.
pub fn patch(cpuid: &mut CpuId, id: u32, count: u32, tsc_deadline: bool) {
    let core_bits = bits_for(count);
    for e in cpuid.as_mut_slice() {
        patch_entry(e, id, count, core_bits, tsc_deadline);
    }
}

fn patch_entry(e: &mut kvm_cpuid_entry2, id: u32, count: u32, core_bits: u32, tsc_deadline: bool) {
    match e.function {
        LEAF_FEATURES => {
            // EBX: [31:24] initial APIC ID, [23:16] logical processors per
            // package, [15:8] CLFLUSH line size in 8-byte units.
            e.ebx = (id << 24) | ((count.min(255)) << 16) | (8 << 8) | (e.ebx & 0xff);
            e.ecx |= ECX_HYPERVISOR;
            if tsc_deadline {
                e.ecx |= ECX_TSC_DEADLINE;
            }
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX[31:26]: cores per package - 1; [25:14]: threads sharing
            // this cache - 1 (a core's own caches: 1 thread; L3: all).
            let level = (e.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count.saturating_sub(1) } else { 0 };
            e.eax = (e.eax & 0x3fff) | ((count.saturating_sub(1) & 0x3f) << 26) | ((sharing & 0xfff) << 14);
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            e.edx = id; // x2APIC ID
            let (shift, n, kind) = match e.index {
                0 => (0, 1, LEVEL_SMT),
                1 => (core_bits, count, LEVEL_CORE),
                _ => (0, 0, 0),
            };
            e.eax = shift;
            e.ebx = n;
            e.ecx = (kind << 8) | (e.index & 0xff);
        }
        LEAF_HYPERVISOR => {
            e.ebx = KVM_SIGNATURE[0];
            e.ecx = KVM_SIGNATURE[1];
            e.edx = KVM_SIGNATURE[2];
        }
        LEAF_AMD_FEATURES => {
            if count > 1 {
                e.ecx |= AMD_ECX_CMP_LEGACY;
            } else {
                e.ecx &= !AMD_ECX_CMP_LEGACY;
            }
        }
        LEAF_AMD_SIZE => {
            // ECX[15:12] APIC ID bits for cores, [7:0] cores - 1.
            e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count.saturating_sub(1) & 0xff);
        }
        _ => {}
    }
}

/// Makes sure leaf 0xB reports both topology levels even if the host's
/// table only had sub-leaf 0 (its entries are per sub-leaf).
pub fn ensure_topology_leaves(cpuid: &mut CpuId) {
    let has = |c: &CpuId, idx| c.as_slice().iter().any(|e| e.function == LEAF_TOPOLOGY && e.index == idx);
    if !cpuid.as_slice().iter().any(|e| e.function == 0 && e.eax >= LEAF_TOPOLOGY) {
        return;
    }
    for idx in 0..2 {
        if !has(cpuid, idx) {
            let _ = cpuid.push(kvm_cpuid_entry2 {
                function: LEAF_TOPOLOGY,
                index: idx,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 { function: 0, eax: 0xd, ..Default::default() },
            kvm_cpuid_entry2 { function: 1, ebx: 0xff00_0000, edx: EDX_HTT, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xb, index: 0, ..Default::default() },
            kvm_cpuid_entry2 { function: 0x4000_0000, eax: 0x4000_0001, ..Default::default() },
            kvm_cpuid_entry2 { function: 0x8000_0008, ecx: 0x7, ..Default::default() },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice().iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn each_vcpu_sees_its_apic_id_and_the_topology() {
        let mut c = table();
        ensure_topology_leaves(&mut c);
        patch(&mut c, 3, 4, true);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        let smt = find(&c, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 3));
        let core = find(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 3));
        let sig = find(&c, 0x4000_0000, 0);
        let mut s = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            s.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&s, b"KVMKVMKVM\0\0\0");
        assert_eq!(find(&c, 0x8000_0008, 0).ecx & 0xf0ff, 0x2003);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut c = table();
        patch(&mut c, 0, 1, false);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.edx & EDX_HTT, 0);
        assert_eq!(l1.ebx >> 24, 0);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(5), 3);
    }
}
