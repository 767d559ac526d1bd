//! Guest memory and split virtqueues as a fuzz target's guest writes them.
//!
//! Shared by every target that plays the guest: the transport target
//! (`virtio_pci`) now, the chain-walker and per-device targets later (they
//! can build a [`GuestRam`] from an arbitrary [`MemLayout`], lay rings out
//! with [`SplitRing`] and hand the queue to `kickvm_virtio::activate` or to
//! the chain walker directly).

use arbitrary::Arbitrary;
use kickvm_virtio::GuestMemory;
use vm_memory::{Bytes as _, GuestAddress};

use crate::enc::{Enc, Encode};

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Guest RAM layouts a target may ask for: small, so a run is cheap, and
/// with the shapes that matter to address translation (a gap, a region
/// above 4 GiB, a region ending at the top of the address space).
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemLayout {
    /// One region at 0 of 1 MiB.
    Flat1M,
    /// 1 MiB at 0, 64 KiB more after a 64 KiB hole.
    Holey,
    /// 1 MiB at 0 and 64 KiB at 4 GiB.
    High,
    /// 1 MiB at 0 and 64 KiB ending 64 KiB below 2^64 (as high as
    /// vm-memory allows a region).
    Top,
}

impl MemLayout {
    pub fn ranges(self) -> Vec<(GuestAddress, usize)> {
        let low = (GuestAddress(0), 0x10_0000);
        match self {
            MemLayout::Flat1M => vec![low],
            MemLayout::Holey => vec![low, (GuestAddress(0x11_0000), 0x1_0000)],
            MemLayout::High => vec![low, (GuestAddress(1 << 32), 0x1_0000)],
            MemLayout::Top => vec![low, (GuestAddress(0u64.wrapping_sub(0x2_0000)), 0x1_0000)],
        }
    }
}

impl Encode for MemLayout {
    fn encode(&self, e: &mut Enc) {
        e.tag(*self as u32, 4);
    }
}

/// Fresh, zeroed guest memory of `layout`.
pub fn memory(layout: MemLayout) -> GuestMemory {
    GuestMemory::from_ranges(&layout.ranges()).expect("cannot map fuzz guest memory")
}

/// Bytes of guest RAM starting at address 0 (the first region).
pub const LOW_RAM: u64 = 0x10_0000;

/// Where a split virtqueue lives and what the guest has put on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitRing {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The driver's next avail index.
    pub avail_idx: u16,
}

impl SplitRing {
    /// The canonical layout used by the targets' drivers: queue `n` in its
    /// own 8 KiB slot at `base + n * 0x2000` (desc, avail at +0x1000,
    /// used at +0x1800; fits any size up to 256).
    pub fn canonical(base: u64, n: u16, size: u16) -> SplitRing {
        // Wrapping: a hostile driver may put rings at the top of the address space.
        let at = base.wrapping_add(u64::from(n) * 0x2000);
        SplitRing { size, desc: at, avail: at.wrapping_add(0x1000), used: at.wrapping_add(0x1800), avail_idx: 0 }
    }

    /// Writes descriptor `i` (the table entry, modulo the queue size).
    pub fn write_desc(&self, mem: &GuestMemory, i: u16, d: &Desc) {
        let i = if self.size == 0 { i } else { i % self.size };
        write_desc_at(mem, self.desc.wrapping_add(16 * u64::from(i)), d);
    }

    /// Makes `head` available and publishes the new avail index.
    pub fn push_avail(&mut self, mem: &GuestMemory, head: u16) {
        let slot = if self.size == 0 { 0 } else { self.avail_idx % self.size };
        let _ = mem.write_obj(head, GuestAddress(self.avail.wrapping_add(4 + 2 * u64::from(slot))));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(self.avail.wrapping_add(2)));
    }

    /// The device's used index, if the used ring is in guest memory.
    pub fn used_idx(&self, mem: &GuestMemory) -> Option<u16> {
        mem.read_obj(GuestAddress(self.used.wrapping_add(2))).ok()
    }
}

/// One descriptor as the guest writes it (addresses outside guest memory
/// allowed: writes there are dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// Writes a descriptor at guest address `at` (dropped if outside memory).
pub fn write_desc_at(mem: &GuestMemory, at: u64, d: &Desc) {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&d.addr.to_le_bytes());
    b[8..12].copy_from_slice(&d.len.to_le_bytes());
    b[12..14].copy_from_slice(&d.flags.to_le_bytes());
    b[14..16].copy_from_slice(&d.next.to_le_bytes());
    let _ = mem.write_slice(&b, GuestAddress(at));
}

/// Writes `data` at `at`, byte by byte where it crosses out of guest
/// memory (what lands in RAM lands; the rest is dropped).
pub fn write_bytes(mem: &GuestMemory, at: u64, data: &[u8]) {
    if mem.write_slice(data, GuestAddress(at)).is_err() {
        for (i, b) in data.iter().enumerate() {
            let _ = mem.write_obj(*b, GuestAddress(at.wrapping_add(i as u64)));
        }
    }
}
