//! Guest RAM: one memfd, mapped at the RAM ranges of [`crate::layout`].
//!
//! A memfd (rather than anonymous memory) so that a vhost-user back-end can
//! map the very same pages later: the launcher passes the fd and each
//! region's offset over the socket.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use kickvm_virtio::GuestMemory;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout;

/// The smallest guest we build: room for the boot structures in the first
/// MiB plus a little kernel.
pub const MIN_RAM: u64 = 4 << 20;
/// KVM maps guest RAM in whole host pages: a memory slot's size must be a
/// multiple of 4 KiB (`KVM_SET_USER_MEMORY_REGION` refuses anything else).
pub const RAM_GRANULE: u64 = 4 << 10;
const HUGE_PAGE: u64 = 2 << 20;
/// Boots at which the host refused huge-page advice for guest RAM.
static MADVISE_REFUSED: kickvm_virtio::ratelimit::Throttle = kickvm_virtio::ratelimit::Throttle::new();

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} bytes is too small (at least {min} MiB)", min = MIN_RAM >> 20)]
    TooSmall(u64),
    #[error(
        "guest memory of {0} bytes is not a multiple of 4 KiB, the page size KVM maps guest RAM in; use e.g. --memory {k}K",
        k = .0.div_ceil(RAM_GRANULE) * (RAM_GRANULE >> 10)
    )]
    NotPageMultiple(u64),
    #[error(
        "guest memory of {0} bytes is not a multiple of 2 MiB, which --hugepages needs; use e.g. --memory {m}M",
        m = .0.div_ceil(HUGE_PAGE) * (HUGE_PAGE >> 20)
    )]
    NotHugePageMultiple(u64),
    #[error(
        "guest memory of {asked} MiB is more than kickvm supports ({max} MiB)",
        asked = .0 >> 20, max = layout::MAX_RAM >> 20
    )]
    TooLargeForLayout(u64),
    #[error("guest memory of {asked} MiB is more than this host has ({host} MiB of RAM)", asked = .asked >> 20, host = .host >> 20)]
    TooLargeForHost { asked: u64, host: u64 },
    #[error(
        "--hugepages needs {need} free 2 MiB huge pages but the host has {free} (set /proc/sys/vm/nr_hugepages)"
    )]
    NotEnoughHugePages { need: u64, free: u64 },
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest memory file to {size} bytes: {err}")]
    Truncate { size: u64, err: std::io::Error },
    #[error("cannot map guest memory: {0}")]
    Map(String),
}

/// Guest RAM and the memfd behind it.
pub struct GuestRam {
    /// The mappings every thread reads and writes guest memory through.
    pub mem: GuestMemory,
    /// The memfd. Regions follow each other in it: the RAM above 4 GiB
    /// starts at file offset [`GuestRam::low_end`].
    pub file: Arc<File>,
    pub size: u64,
}

/// The guest-physical RAM ranges `(start, len)` for `size` bytes of RAM:
/// up to [`layout::MEM_32BIT_GAP_START`] below 4 GiB, the rest from
/// [`layout::RAM_64BIT_START`].
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(layout::MEM_32BIT_GAP_START);
    let mut ranges = vec![(0, low)];
    if size > low {
        ranges.push((layout::RAM_64BIT_START, size - low));
    }
    ranges
}

/// Top of RAM below 4 GiB for a guest of `size` bytes.
pub fn low_end(size: u64) -> u64 {
    size.min(layout::MEM_32BIT_GAP_START)
}

/// Checks `size` against the layout and the host before anything is
/// allocated, so a too-large request is one clear line, not an OOM kill.
pub fn check_size(size: u64, hugepages: bool) -> Result<(), MemoryError> {
    if size < MIN_RAM {
        return Err(MemoryError::TooSmall(size));
    }
    if size > layout::MAX_RAM {
        return Err(MemoryError::TooLargeForLayout(size));
    }
    if size & (RAM_GRANULE - 1) != 0 {
        return Err(MemoryError::NotPageMultiple(size));
    }
    // A hugetlb mapping is unmapped in whole huge pages.
    if hugepages && size & (HUGE_PAGE - 1) != 0 {
        return Err(MemoryError::NotHugePageMultiple(size));
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let Some(host) = meminfo_kib(&meminfo, "MemTotal").map(|k| k * 1024) {
        if size > host {
            return Err(MemoryError::TooLargeForHost { asked: size, host });
        }
    }
    if hugepages {
        let need = size.div_ceil(HUGE_PAGE);
        let free = meminfo_kib(&meminfo, "HugePages_Free").unwrap_or(0);
        let page_kib = meminfo_kib(&meminfo, "Hugepagesize").unwrap_or(2048);
        // HugePages_Free counts pages of the default size.
        let free = if page_kib == HUGE_PAGE / 1024 { free } else { 0 };
        if free < need {
            return Err(MemoryError::NotEnoughHugePages { need, free });
        }
    }
    Ok(())
}

/// The number of `/proc/meminfo` line `key` (kB for sizes, a count for
/// `HugePages_*`).
fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Allocates `size` bytes of guest RAM in a memfd (of 2 MiB huge pages with
/// `hugepages`) and maps it at [`ram_ranges`].
pub fn create(size: u64, hugepages: bool) -> Result<GuestRam, MemoryError> {
    check_size(size, hugepages)?;
    let mut flags = libc::MFD_CLOEXEC;
    if hugepages {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: the name is a NUL-terminated string literal; the call has no
    // other memory effects.
    let fd = unsafe { libc::memfd_create(c"kickvm-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|err| MemoryError::Truncate { size, err })?;
    let file = Arc::new(file);
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(size) {
        regions.push((GuestAddress(start), len as usize, Some(FileOffset::from_arc(file.clone(), offset))));
        offset += len;
    }
    let mem = GuestMemory::from_ranges_with_files(&regions).map_err(|e| MemoryError::Map(e.to_string()))?;
    if !hugepages {
        advise_huge_pages(&mem);
    }
    Ok(GuestRam { mem, file, size })
}

/// Asks for transparent huge pages on guest RAM. Each guest page the guest
/// touches first costs a fault in the host (an EPT violation); 2 MiB pages
/// make 512 times fewer. Effective where the host allows huge pages in
/// shared memory (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` set
/// to `advise` or `always`; the nested rig sets `advise`), harmless
/// elsewhere.
fn advise_huge_pages(mem: &GuestMemory) {
    for region in mem.iter() {
        // SAFETY: advice on a mapping owned by `mem`; it changes no contents.
        let r = unsafe { libc::madvise(region.as_ptr().cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
        // The same answer at every boot: said at the first few only.
        if r != 0 && MADVISE_REFUSED.hit().is_some() {
            log::debug!("MADV_HUGEPAGE on guest RAM: {}", std::io::Error::last_os_error());
        }
    }
}

impl GuestRam {
    /// Registers every region with KVM as a memory slot (slot = region index).
    pub fn register(&self, vm: &kvm_ioctls::VmFd) -> Result<(), kvm_ioctls::Error> {
        for (slot, region) in self.mem.iter().enumerate() {
            let host = region.as_ptr() as u64;
            let region_desc = kvm_bindings::kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
            };
            // SAFETY: the region is a live mapping of `region.len()` bytes
            // owned by `self.mem`, which outlives the VM (the VM is dropped
            // before the memory in `vm::Vm`).
            unsafe { vm.set_user_memory_region(region_desc) }?;
        }
        Ok(())
    }

    /// Top of RAM below 4 GiB.
    pub fn low_end(&self) -> u64 {
        low_end(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ram_skips_the_pci_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }

    #[test]
    fn sizes_are_checked_before_allocating() {
        assert!(matches!(check_size(1 << 20, false), Err(MemoryError::TooSmall(_))));
        assert!(matches!(check_size(2 << 40, false), Err(MemoryError::TooLargeForLayout(_))));
        let e = check_size(4097 << 10, false).unwrap_err();
        assert!(matches!(e, MemoryError::NotPageMultiple(_)), "{e}");
        assert!(e.to_string().contains("use e.g. --memory 4100K"), "{e}");
        assert!(matches!(check_size((16 << 20) + 1, false), Err(MemoryError::NotPageMultiple(_))));
        let e = check_size(5 << 20, true).unwrap_err();
        assert!(e.to_string().contains("use e.g. --memory 6M"), "{e}");
        let e = check_size(layout::MAX_RAM, false).unwrap_err().to_string();
        assert!(e.contains("more than this host has"), "{e}");
    }

    #[test]
    fn meminfo_parses() {
        let m = "MemTotal:       24000000 kB\nHugePages_Free:        3\nHugepagesize:       2048 kB\n";
        assert_eq!(meminfo_kib(m, "MemTotal"), Some(24000000));
        assert_eq!(meminfo_kib(m, "HugePages_Free"), Some(3));
        assert_eq!(meminfo_kib(m, "Nope"), None);
    }

    #[test]
    fn memfd_backs_guest_memory() {
        let ram = create(16 << 20, false).unwrap();
        ram.mem.write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        ram.file.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0x1234_5678);
    }
}
