//! Guest RAM, mapped at the RAM ranges of [`crate::layout`].
//!
//! Three kinds, by what the VM asks for:
//!
//! - **private** (the default, as in QEMU, Cloud Hypervisor and
//!   Firecracker): anonymous private memory with `MADV_HUGEPAGE`, mapped at
//!   a 2 MiB-aligned address (as QEMU maps its RAM). It gets transparent huge pages wherever
//!   `/sys/kernel/mm/transparent_hugepage/enabled` is `always` or `madvise`
//!   (what distributions ship), so the guest's first touch of its RAM costs
//!   one host fault per 2 MiB, not per 4 KiB;
//! - **shared** ([`Backing::Shared`]: for a device served by another
//!   process, e.g. a vhost-user back-end, which maps the very same pages
//!   from the fd and each region's offset): a memfd. Shared memory gets
//!   huge pages only where `.../transparent_hugepage/shmem_enabled` allows
//!   them, which most distributions do not (`never`): a one-line warning
//!   then says what to set;
//! - **hugetlbfs** (`--hugepages`): a memfd of reserved 2 MiB huge pages,
//!   which can be shared as well.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use kickvm_virtio::GuestMemory;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

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
/// Boots whose shared guest RAM could not get transparent huge pages.
static SHMEM_NO_THP: kickvm_virtio::ratelimit::Throttle = kickvm_virtio::ratelimit::Throttle::new();
/// Boots whose private guest RAM outlived its VM (not unmapped, see [`PrivateMappings`]).
static RAM_KEPT: kickvm_virtio::ratelimit::Throttle = kickvm_virtio::ratelimit::Throttle::new();
/// Where the host says which shared memory may use transparent huge pages.
pub const SHMEM_THP_SETTING: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

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

/// What guest RAM is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous private memory with transparent huge pages (the default).
    Private,
    /// A memfd, for devices served by another process.
    Shared,
    /// A memfd of 2 MiB hugetlbfs pages (`--hugepages`).
    HugeTlb,
}

impl Backing {
    /// The backing `cfg` needs: shared when asked (`--memory-shared`) and
    /// whenever a vhost-user back-end, another process, must map guest
    /// RAM to serve its queues (`--vhost-user`); hugetlbfs RAM is a memfd,
    /// shareable as it is.
    pub fn for_config(cfg: &crate::config::VmConfig) -> Backing {
        Backing::of(cfg.hugepages, cfg.memory_shared || !cfg.vhost_users.is_empty())
    }

    /// The backing for `--hugepages` and shared memory as asked.
    pub fn of(hugepages: bool, shared: bool) -> Backing {
        match (hugepages, shared) {
            (true, _) => Backing::HugeTlb,
            (false, true) => Backing::Shared,
            (false, false) => Backing::Private,
        }
    }
}

/// Guest RAM, and the memfd behind it when it is shared.
pub struct GuestRam {
    /// The mappings every thread reads and writes guest memory through.
    pub mem: GuestMemory,
    /// The memfd of shared or hugetlbfs RAM (`None` for private RAM).
    /// Regions follow each other in it: the RAM above 4 GiB starts at file
    /// offset [`GuestRam::low_end`].
    pub file: Option<Arc<File>>,
    pub size: u64,
    /// Unmaps private RAM; declared after `mem`, so dropped after it.
    _private: Option<PrivateMappings>,
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

/// Allocates `size` bytes of guest RAM of the kind `backing` says and maps
/// it at [`ram_ranges`].
pub fn create(size: u64, backing: Backing) -> Result<GuestRam, MemoryError> {
    check_size(size, backing == Backing::HugeTlb)?;
    match backing {
        Backing::Private => create_private(size),
        Backing::Shared | Backing::HugeTlb => {
            let ram = create_memfd(size, backing == Backing::HugeTlb)?;
            if backing == Backing::Shared {
                advise_huge_pages(&ram.mem);
                let setting = std::fs::read_to_string(SHMEM_THP_SETTING).unwrap_or_default();
                if let Some(current) = shmem_thp_refused(&setting) {
                    if SHMEM_NO_THP.hit().is_some() {
                        log::warn!(
                            "shared guest RAM gets no transparent huge pages ({SHMEM_THP_SETTING} is `{current}`): \
                             boots are slower; `echo advise > {SHMEM_THP_SETTING}` as root allows them"
                        );
                    }
                }
            }
            Ok(ram)
        }
    }
}

/// The current value of `shmem_enabled` (the bracketed word of
/// [`SHMEM_THP_SETTING`]'s contents `setting`) when it keeps shared memory
/// that asks for huge pages (`MADV_HUGEPAGE`) from getting them: `never`
/// (what Debian ships) or `deny`. `None` when it allows them (`always`,
/// `within_size`, `advise`, `force`) or the setting is unknown (no THP in
/// this kernel: nothing to set).
pub fn shmem_thp_refused(setting: &str) -> Option<&str> {
    let current = setting.split_whitespace().find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))?;
    matches!(current, "never" | "deny").then_some(current)
}

/// Private RAM: one anonymous private mapping per range, each at a 2 MiB
/// aligned address so that a transparent huge page of the host backs a
/// whole 2 MiB page of the guest (KVM maps a guest page huge only when host
/// and guest addresses agree modulo 2 MiB; the host kernel aligns large
/// anonymous mappings itself only since Linux 6.7).
fn create_private(size: u64) -> Result<GuestRam, MemoryError> {
    // Declared before `regions`, so dropped after them on an early return.
    let mut private = PrivateMappings(Vec::new());
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(size) {
        let len = len as usize;
        let addr = map_aligned(len)?;
        let builder = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(PRIVATE_FLAGS);
        // SAFETY: `addr` is a live, page-aligned mapping of `len` bytes made
        // just above; `PrivateMappings` unmaps it only once no region uses it.
        let built = unsafe { builder.with_raw_mmap_pointer(addr) }.build();
        let mapping = match built {
            Ok(m) => Arc::new(m),
            Err(e) => {
                // SAFETY: nothing refers to the mapping made above.
                unsafe { libc::munmap(addr.cast(), len) };
                return Err(MemoryError::Map(e.to_string()));
            }
        };
        private.0.push(mapping.clone());
        let region = GuestRegionMmap::with_arc(mapping, GuestAddress(start))
            .ok_or_else(|| MemoryError::Map(format!("region at {start:#x} overflows")))?;
        regions.push(Arc::new(region));
    }
    let mem = GuestMemory::from_arc_regions(regions).map_err(|e| MemoryError::Map(e.to_string()))?;
    advise_huge_pages(&mem);
    Ok(GuestRam { mem, file: None, size, _private: Some(private) })
}

const PRIVATE_FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// Maps `len` bytes of anonymous private memory at a 2 MiB-aligned address:
/// 2 MiB more than needed, then the ends are given back.
fn map_aligned(len: usize) -> Result<*mut u8, MemoryError> {
    let huge = HUGE_PAGE as usize;
    let over = len + huge;
    // SAFETY: a new anonymous mapping at an address the kernel picks; no
    // existing memory is affected.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), over, libc::PROT_READ | libc::PROT_WRITE, PRIVATE_FLAGS, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err(MemoryError::Map(std::io::Error::last_os_error().to_string()));
    }
    let p = p as usize;
    let a = p.next_multiple_of(huge);
    // SAFETY: both ranges lie inside the mapping just made, outside [a, a + len).
    unsafe {
        if a > p {
            libc::munmap(p as *mut libc::c_void, a - p);
        }
        if p + over > a + len {
            libc::munmap((a + len) as *mut libc::c_void, p + over - (a + len));
        }
    }
    Ok(a as *mut u8)
}

/// The anonymous mappings of private RAM. vm-memory does not unmap memory
/// it did not map itself, so this does: when dropped (after
/// [`GuestRam::mem`]) it unmaps each mapping that no copy of the guest
/// memory refers to any more. One still in use somewhere is left mapped
/// (kept, not freed under a thread that may still touch it).
struct PrivateMappings(Vec<Arc<MmapRegion>>);

impl Drop for PrivateMappings {
    fn drop(&mut self) {
        for m in self.0.drain(..) {
            match Arc::into_inner(m) {
                // SAFETY: the last reference to the mapping is gone: nothing
                // can read or write it any more.
                Some(m) => unsafe {
                    libc::munmap(m.as_ptr().cast(), m.size());
                },
                None => {
                    if RAM_KEPT.hit().is_some() {
                        log::debug!("guest RAM still in use after its VM stopped: left mapped");
                    }
                }
            }
        }
    }
}

/// Shared or hugetlbfs RAM: a memfd (of 2 MiB huge pages with `hugepages`),
/// mapped shared.
fn create_memfd(size: u64, hugepages: bool) -> Result<GuestRam, MemoryError> {
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
    Ok(GuestRam { mem, file: Some(file), size, _private: None })
}

/// Asks for transparent huge pages on guest RAM. Each guest page the guest
/// touches first costs a fault in the host (an EPT violation); 2 MiB pages
/// make 512 times fewer. For private RAM, effective wherever THP is
/// `always` or `madvise`; for shared RAM, only where `shmem_enabled`
/// allows it ([`shmem_thp_refused`]); harmless elsewhere.
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

    /// The `/proc/self/maps` line of the mapping that holds `addr`.
    fn maps_line(addr: *const u8) -> String {
        let addr = addr as usize;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .find(|l| {
                let range = l.split_whitespace().next().unwrap();
                let (a, b) = range.split_once('-').unwrap();
                let (a, b) = (usize::from_str_radix(a, 16).unwrap(), usize::from_str_radix(b, 16).unwrap());
                (a..b).contains(&addr)
            })
            .unwrap_or_else(|| panic!("{addr:#x} is not mapped"))
            .to_string()
    }

    /// The path column of a maps line (empty for anonymous memory).
    fn maps_path(line: &str) -> String {
        line.split_whitespace().skip(5).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn guest_ram_is_anonymous_private_memory_by_default() {
        let ram = create(36 << 20, Backing::of(false, false)).unwrap();
        assert!(ram.file.is_none());
        ram.mem.write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(ram.mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x1234_5678);
        let region = ram.mem.iter().next().unwrap();
        let addr = region.as_ptr();
        assert_eq!(addr as usize % HUGE_PAGE as usize, 0, "not 2 MiB aligned");
        let line = maps_line(addr);
        let path = maps_path(&line);
        assert!(path.is_empty() || path.starts_with("[anon:"), "not anonymous: {line}");
        assert!(line.split_whitespace().nth(1).unwrap().ends_with('p'), "not private: {line}");

        // A copy of the memory still in use keeps it mapped...
        let copy = ram.mem.clone();
        drop(ram);
        assert_eq!(copy.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x1234_5678);
        drop(copy);
        // ...and once the VM's own is dropped last, it is unmapped.
        let ram = create(36 << 20, Backing::Private).unwrap();
        let region = ram.mem.iter().next().unwrap();
        let (addr, len) = (region.as_ptr(), region.len() as usize);
        drop(ram);
        let mut vec = vec![0u8; len / 4096];
        // SAFETY: mincore only reads the page tables of the range.
        let r = unsafe { libc::mincore(addr.cast(), len, vec.as_mut_ptr()) };
        assert_eq!(r, -1, "guest RAM still mapped after the VM was dropped");
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ENOMEM));
    }

    #[test]
    fn shared_guest_ram_is_a_memfd() {
        let ram = create(16 << 20, Backing::of(false, true)).unwrap();
        ram.mem.write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        ram.file.as_ref().unwrap().read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0x1234_5678);
        let line = maps_line(ram.mem.iter().next().unwrap().as_ptr());
        assert!(maps_path(&line).starts_with("/memfd:kickvm-guest-ram"), "not the memfd: {line}");
        assert!(line.split_whitespace().nth(1).unwrap().ends_with('s'), "not shared: {line}");
    }

    #[test]
    fn hugepages_win_over_shared() {
        assert_eq!(Backing::of(true, false), Backing::HugeTlb);
        assert_eq!(Backing::of(true, true), Backing::HugeTlb);
    }

    #[test]
    fn warning_when_shmem_setting_refuses_huge_pages() {
        // Debian's (and the kernel's) default: no huge pages in shared memory.
        assert_eq!(shmem_thp_refused("always within_size advise [never] deny force\n"), Some("never"));
        assert_eq!(shmem_thp_refused("always within_size advise never [deny] force\n"), Some("deny"));
        // What the warning asks for, and the other settings that allow them.
        assert_eq!(shmem_thp_refused("always within_size [advise] never deny force\n"), None);
        assert_eq!(shmem_thp_refused("[always] within_size advise never deny force\n"), None);
        assert_eq!(shmem_thp_refused("always [within_size] advise never deny force\n"), None);
        assert_eq!(shmem_thp_refused("always within_size advise never deny [force]\n"), None);
        // A kernel without THP has no such file: nothing to set.
        assert_eq!(shmem_thp_refused(""), None);
    }
}
