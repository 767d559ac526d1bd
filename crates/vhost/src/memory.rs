//! Guest memory as a vhost-user frontend describes it: a table of regions,
//! each a file descriptor (a memfd, a hugetlbfs file) and an offset into
//! it, at a guest physical address and at a *user* address in the
//! frontend's own process.
//!
//! The queue threads see guest physical addresses (descriptors, buffers);
//! the frontend names the rings by its user addresses, which
//! [`RegionTable::user_to_guest`] translates. Every table change builds a
//! new [`GuestMemory`]; the caller stops the queue threads first and
//! restarts them on the new one, so no thread keeps an old mapping (and
//! the old mappings go away with the last chain that held them).
//!
//! A region that cannot be mapped whole is refused before `mmap`: a
//! mapping past the end of its file would raise SIGBUS on first touch.
//! (A frontend that shrinks the file *after* we mapped it can still do
//! that; every vhost-user back-end shares this limit.)

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use kickvm_virtio::GuestMemory;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

/// Memory slots the back-end offers (`GET_MAX_MEM_SLOTS`). QEMU needs a
/// handful for a plain VM; this bounds the mappings a frontend can make
/// us hold.
pub const MAX_MEM_SLOTS: usize = 64;

/// A region the frontend asked us to map, as it described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionDesc {
    pub guest_addr: u64,
    pub size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
}

/// Why a region or table is refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory region at guest {0:#x} has size 0")]
    Empty(u64),
    #[error("memory region at guest {guest:#x} (+{size:#x}) wraps around the address space")]
    Wraps { guest: u64, size: u64 },
    #[error("memory region at guest {0:#x}: its fd is not a regular file or memfd ({1})")]
    NotAFile(u64, String),
    #[error("memory region at guest {guest:#x}: offset {offset:#x} + size {size:#x} is past the end of its file ({file_size:#x} bytes)")]
    PastEndOfFile { guest: u64, offset: u64, size: u64, file_size: u64 },
    #[error("memory region at guest {0:#x} cannot be mapped: {1}")]
    Map(u64, String),
    #[error("memory regions overlap or are out of order: {0}")]
    Layout(String),
    #[error("more than {MAX_MEM_SLOTS} memory regions")]
    TooMany,
    #[error("no memory region at guest {0:#x} to remove")]
    NoSuchRegion(u64),
}

struct Mapped {
    desc: RegionDesc,
    region: Arc<GuestRegionMmap<()>>,
}

/// The frontend's memory table and our mappings of it.
#[derive(Default)]
pub struct RegionTable {
    regions: Vec<Mapped>,
}

impl RegionTable {
    /// Replaces the whole table (SET_MEM_TABLE). On error the old table
    /// stays.
    pub fn replace(&mut self, descs: &[RegionDesc], files: Vec<File>) -> Result<(), MemoryError> {
        if descs.len() > MAX_MEM_SLOTS {
            return Err(MemoryError::TooMany);
        }
        let mut new = Vec::new();
        for (d, f) in descs.iter().zip(files) {
            new.push(Mapped { desc: *d, region: Arc::new(map(d, f)?) });
        }
        check_layout(&new)?;
        self.regions = new;
        Ok(())
    }

    /// Adds one region (ADD_MEM_REG).
    pub fn add(&mut self, desc: RegionDesc, file: File) -> Result<(), MemoryError> {
        if self.regions.len() >= MAX_MEM_SLOTS {
            return Err(MemoryError::TooMany);
        }
        let region = Arc::new(map(&desc, file)?);
        let mut regions: Vec<Mapped> =
            self.regions.iter().map(|m| Mapped { desc: m.desc, region: m.region.clone() }).collect();
        regions.push(Mapped { desc, region });
        check_layout(&regions)?;
        self.regions = regions;
        Ok(())
    }

    /// Removes the region at `guest_addr` with `size` (REM_MEM_REG).
    pub fn remove(&mut self, guest_addr: u64, size: u64) -> Result<(), MemoryError> {
        let before = self.regions.len();
        self.regions.retain(|m| !(m.desc.guest_addr == guest_addr && m.desc.size == size));
        if self.regions.len() == before {
            return Err(MemoryError::NoSuchRegion(guest_addr));
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Guest memory over the current table (`None` while it is empty).
    pub fn guest_memory(&self) -> Option<GuestMemory> {
        let mut regions: Vec<Arc<GuestRegionMmap<()>>> = self.regions.iter().map(|m| m.region.clone()).collect();
        regions.sort_by_key(|r| vm_memory::GuestMemoryRegion::start_addr(&**r));
        GuestMemory::from_arc_regions(regions).ok()
    }

    /// The guest physical address of frontend user address `user`, if
    /// `[user, user + len)` lies inside one region.
    pub fn user_to_guest(&self, user: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|m| {
            let off = user.checked_sub(m.desc.user_addr)?;
            (off.checked_add(len)? <= m.desc.size).then(|| m.desc.guest_addr + off)
        })
    }
}

/// Maps one region, after checking it lies inside its file.
fn map(d: &RegionDesc, file: File) -> Result<GuestRegionMmap<()>, MemoryError> {
    if d.size == 0 {
        return Err(MemoryError::Empty(d.guest_addr));
    }
    let wraps = |a: u64| a.checked_add(d.size - 1).is_none();
    if wraps(d.guest_addr) || wraps(d.user_addr) || wraps(d.mmap_offset) {
        return Err(MemoryError::Wraps { guest: d.guest_addr, size: d.size });
    }
    let size = usize::try_from(d.size).map_err(|_| MemoryError::Wraps { guest: d.guest_addr, size: d.size })?;
    let meta = file.metadata().map_err(|e| MemoryError::NotAFile(d.guest_addr, e.to_string()))?;
    if !meta.file_type().is_file() {
        let what = format!("fd {} is a {:?}", file.as_raw_fd(), meta.file_type());
        return Err(MemoryError::NotAFile(d.guest_addr, what));
    }
    if d.mmap_offset.checked_add(d.size).is_none_or(|end| end > meta.len()) {
        return Err(MemoryError::PastEndOfFile {
            guest: d.guest_addr,
            offset: d.mmap_offset,
            size: d.size,
            file_size: meta.len(),
        });
    }
    let mapping = MmapRegion::from_file(FileOffset::new(file, d.mmap_offset), size)
        .map_err(|e| MemoryError::Map(d.guest_addr, e.to_string()))?;
    GuestRegionMmap::new(mapping, GuestAddress(d.guest_addr))
        .ok_or(MemoryError::Wraps { guest: d.guest_addr, size: d.size })
}

/// Guest ranges must not overlap (the frontend's user ranges may: QEMU
/// maps one memfd at several guest addresses).
fn check_layout(regions: &[Mapped]) -> Result<(), MemoryError> {
    let mut r: Vec<&RegionDesc> = regions.iter().map(|m| &m.desc).collect();
    r.sort_by_key(|d| d.guest_addr);
    for w in r.windows(2) {
        // `map` made sure `guest_addr + size - 1` does not wrap.
        if w[0].guest_addr + (w[0].size - 1) >= w[1].guest_addr {
            return Err(MemoryError::Layout(format!(
                "guest {:#x}+{:#x} overlaps guest {:#x}",
                w[0].guest_addr, w[0].size, w[1].guest_addr
            )));
        }
    }
    Ok(())
}
