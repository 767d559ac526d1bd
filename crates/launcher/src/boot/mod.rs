//! Linux direct boot: load the kernel and the initramfs into guest memory
//! and write what the kernel expects to find at its entry point. Two kinds
//! of kernel file, told apart by their first bytes:
//!
//! - a bzImage ([`bzimage`]): its protected-mode part is loaded at 1 MiB and
//!   entered at its 64-bit entry point (x86 64-bit boot protocol) with the
//!   command line, the zero page ([`params`]), the GDT ([`gdt`]) and
//!   identity page tables ([`paging`]); it decompresses itself in the guest;
//! - an ELF `vmlinux` ([`elf`]): its segments are read straight into guest
//!   memory where they run, and it is entered at its PVH entry point in
//!   32-bit protected mode with an `hvm_start_info` ([`pvh`]): nothing to
//!   decompress;
//! - a bzImage whose compressed kernel kickvm can decompress itself (LZ4,
//!   as Debian's; [`unpack`]) is by default booted as that ELF kernel:
//!   decompressed on the host straight into place, entered through PVH.

pub mod bzimage;
pub mod elf;
pub mod gdt;
pub mod paging;
pub mod params;
pub mod pvh;
pub mod unpack;

use std::io::Read;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::setup_header;
use vm_memory::{Bytes, GuestAddress};

use crate::hostfile::{self, FileError};
use crate::layout;
pub use bzimage::{ImageError, KernelImage};
pub use elf::{ElfError, ElfKernel};
use kickvm_virtio::GuestMemory;

const PAGE: u64 = 0x1000;
/// Where an initramfs may end under an ELF kernel: a module may be
/// anywhere in the RAM the memory map lists; below the PCI hole here, so
/// that [`initrd_placement`] stays below 4 GiB.
const ELF_INITRD_TOP: u64 = layout::MEM_32BIT_GAP_START;
/// Where an initramfs may end when the kernel does not say
/// (`initrd_addr_max` of boot protocols before 2.03).
const DEFAULT_INITRD_ADDR_MAX: u32 = 0x37ff_ffff;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("cannot read kernel {path}: {err}")]
    ReadKernel { path: String, err: std::io::Error },
    #[error("kernel {path} {err}")]
    Image { path: String, err: ImageError },
    #[error("kernel {path} {err}")]
    Elf { path: String, err: ElfError },
    #[error("kernel {path} {what}; --decompress-in-guest lets the kernel's own decompressor try it")]
    Unpack { path: String, what: String },
    #[error("kernel {path} needs at least {need} MiB of guest memory to start; give the guest more --memory", need = .need.div_ceil(1 << 20))]
    KernelTooLarge { path: String, need: u64 },
    #[error("cannot read initrd {path}: {err}")]
    ReadInitrd { path: String, err: std::io::Error },
    #[error("initrd {path} ({size}) does not fit in guest memory next to the kernel; give the guest more --memory", size = mib(.size))]
    InitrdTooLarge { path: String, size: u64 },
    #[error("initrd {path} ({size}) does not fit between the end of the kernel ({kernel_end:#x}) and {addr_max:#x}, the highest address it may use; use a smaller initrd", size = mib(.size))]
    InitrdAboveAddrMax { path: String, size: u64, kernel_end: u64, addr_max: u64 },
    #[error("kernel command line is {len} bytes, more than the kernel accepts ({max})")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains {0:?}; it takes printable ASCII only (no tabs, newlines or other characters)")]
    CmdlineChar(char),
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("guest memory map has too many entries for the zero page")]
    TooManyE820Entries,
    #[error("cannot write boot structures to guest memory: {0}")]
    Write(String),
}

/// A size for a message: "5.2 MiB", "512 KiB" (not rounded up to a whole
/// MiB, which made a 1.1 MiB initrd read "2 MiB").
fn mib(bytes: &u64) -> String {
    if *bytes < 1 << 20 {
        format!("{} KiB", bytes.div_ceil(1 << 10))
    } else {
        format!("{:.1} MiB", *bytes as f64 / f64::from(1 << 20))
    }
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 64-bit long mode at `rip`, paging on, `%rsi` at the zero page.
    Linux64(u64),
    /// 32-bit protected mode at `eip`, paging off, `%ebx` at the
    /// `hvm_start_info`.
    Pvh32(u64),
}

/// What the boot structures of a kernel depend on: where it may let an
/// initramfs and a command line go, and which boot protocol it speaks.
pub trait BootImage {
    /// Nothing else may be placed between 1 MiB and here.
    fn reserved_end(&self) -> u64;
    /// One past the highest address the kernel takes an initramfs at.
    fn initrd_top(&self) -> u64;
    /// The longest command line the kernel takes (without the NUL).
    fn cmdline_max(&self) -> usize;
    /// The bzImage setup header for the zero page, or `None` for PVH.
    fn setup_header(&self) -> Option<&setup_header>;
    fn entry(&self) -> Entry;
}

impl BootImage for KernelImage {
    fn reserved_end(&self) -> u64 {
        self.reserved_end
    }
    fn initrd_top(&self) -> u64 {
        let max = match self.header.initrd_addr_max {
            0 => DEFAULT_INITRD_ADDR_MAX,
            m => m,
        };
        u64::from(max) + 1
    }
    fn cmdline_max(&self) -> usize {
        KernelImage::cmdline_max(self)
    }
    fn setup_header(&self) -> Option<&setup_header> {
        Some(&self.header)
    }
    fn entry(&self) -> Entry {
        Entry::Linux64(self.entry)
    }
}

impl BootImage for ElfKernel {
    fn reserved_end(&self) -> u64 {
        self.reserved_end
    }
    fn initrd_top(&self) -> u64 {
        ELF_INITRD_TOP
    }
    fn cmdline_max(&self) -> usize {
        ElfKernel::cmdline_max(self)
    }
    fn setup_header(&self) -> Option<&setup_header> {
        None
    }
    fn entry(&self) -> Entry {
        Entry::Pvh32(self.entry)
    }
}

/// A kernel file of either kind, checked.
#[derive(Debug, Clone)]
pub enum Kernel {
    BzImage(KernelImage),
    Elf(ElfKernel),
}

impl Kernel {
    fn image(&self) -> &dyn BootImage {
        match self {
            Kernel::BzImage(k) => k,
            Kernel::Elf(k) => k,
        }
    }
}

impl BootImage for Kernel {
    fn reserved_end(&self) -> u64 {
        self.image().reserved_end()
    }
    fn initrd_top(&self) -> u64 {
        self.image().initrd_top()
    }
    fn cmdline_max(&self) -> usize {
        self.image().cmdline_max()
    }
    fn setup_header(&self) -> Option<&setup_header> {
        self.image().setup_header()
    }
    fn entry(&self) -> Entry {
        self.image().entry()
    }
}

/// Opens the kernel at `path`, tells a vmlinux (ELF) from a bzImage by its
/// first bytes and checks its headers; returns the open file and what the
/// headers say. Nothing is loaded.
pub fn inspect(path: &Path) -> Result<(std::fs::File, Kernel), BootError> {
    let name = || path.display().to_string();
    let (file, len) = hostfile::open("kernel", path, hostfile::Accept::Regular, false)?;
    let mut magic = [0u8; 4];
    if len >= 4 {
        elf::ReadAt::read_exact_at(&file, &mut magic, 0).map_err(|err| BootError::ReadKernel { path: name(), err })?;
    }
    if &magic == elf::ELF_MAGIC {
        let k = ElfKernel::parse(&file, len).map_err(|err| BootError::Elf { path: name(), err })?;
        return Ok((file, Kernel::Elf(k)));
    }
    drop(file);
    let (file, k) = inspect_kernel(path)?;
    Ok((file, Kernel::BzImage(k)))
}

/// Loads the kernel at `path`, of either kind, into a guest whose RAM
/// below 4 GiB ends at `low_end`. The headers are checked again here: the
/// file may have changed since the options were validated (every reboot
/// loads it anew). A bzImage is decompressed on the host when it can be
/// ([`unpack`]), unless `in_guest`; for the log, how it was (`None` for an
/// ELF kernel, or a bzImage with `in_guest`).
pub fn load(mem: &GuestMemory, path: &Path, low_end: u64, in_guest: bool) -> Result<(Kernel, Option<String>), BootError> {
    load_with_initrd(mem, path, None, low_end, in_guest).map(|l| (l.kernel, l.how))
}

/// What [`load_with_initrd`] loaded.
pub struct Loaded {
    pub kernel: Kernel,
    /// The initramfs's guest address and size.
    pub initrd: Option<(u64, u64)>,
    /// How a bzImage was decompressed, for the log.
    pub how: Option<String>,
}

/// [`load`], and the initramfs at `initrd` ([`load_initrd`]). A kernel
/// that is copied as it is (a vmlinux's segments, a bzImage left to
/// decompress itself) and the initramfs are read together, in pieces on
/// the same threads: where each goes is known from the headers (the
/// initramfs above the kernel's reserved area), and the first touch of
/// guest memory, not the reading, is what costs. A kernel decompressed on
/// the host ([`unpack`]) takes the initramfs onto its decompressing threads
/// when it can place it clear of the file before the kernel's headers are
/// read, and reads it after when not.
pub fn load_with_initrd(
    mem: &GuestMemory,
    path: &Path,
    initrd: Option<&Path>,
    low_end: u64,
    in_guest: bool,
) -> Result<Loaded, BootError> {
    let (file, kernel) = inspect(path)?;
    check_kernel_fits(path, &kernel, low_end)?;
    // The initramfs, opened once; (file, size).
    let rd = match initrd {
        Some(p) => {
            let (file, size) = hostfile::open_nonempty("initrd", p)?;
            Some((Source { file, path: p, initrd: true }, size))
        }
        None => None,
    };
    let mut how = None;
    // (file offset, guest address, length) of each run of kernel bytes.
    let mut runs = Vec::new();
    match &kernel {
        Kernel::BzImage(image) => {
            if !in_guest {
                let rd_arg = rd.as_ref().map(|(src, size)| (src, *size));
                match unpack::load(mem, &file, image, low_end, &path.display().to_string(), rd_arg)? {
                    unpack::Unpacked::Loaded(k, unpacked, read) => {
                        let kernel = Kernel::Elf(k);
                        let initrd = match (&rd, read) {
                            (Some(_), Some(at)) => Some(at),
                            (Some((src, size)), None) => {
                                let addr = check_initrd_fits(src.path, *size, low_end, &kernel)?;
                                read_pieces(mem, &src.pieces(0, addr, *size)?)?;
                                Some((addr, *size))
                            }
                            (None, _) => None,
                        };
                        return Ok(Loaded { kernel, initrd, how: Some(unpacked) });
                    }
                    unpack::Unpacked::InGuest(why) => how = Some(format!("decompressed by the guest: {why}")),
                }
            }
            // The protected-mode part, at 1 MiB.
            runs.push((image.payload_offset, layout::HIGH_RAM_START, image.payload_len));
        }
        // Each segment's file bytes go straight into the guest memory it
        // runs from. The rest of a segment (its .bss) is left as it is:
        // guest RAM is fresh (zero) at every boot, and the kernel clears
        // its .bss itself; writing zeroes would only make the host back
        // those pages. The file's holes are left out for the same reason
        // ([`data_runs`]).
        Kernel::Elf(k) => runs.extend(k.segments.iter().map(|s| (s.offset, s.addr, s.file_len))),
    }
    let rd = match rd {
        Some((src, size)) => Some((check_initrd_fits(src.path, size, low_end, &kernel)?, size, src)),
        None => None,
    };
    let k = Source { file, path, initrd: false };
    let mut pieces = Vec::new();
    for (offset, addr, len) in runs {
        pieces.extend(k.pieces(offset, addr, len)?);
    }
    if let Some((addr, size, src)) = &rd {
        pieces.extend(src.pieces(0, *addr, *size)?);
    }
    read_pieces(mem, &pieces)?;
    Ok(Loaded { kernel, initrd: rd.map(|(addr, size, _)| (addr, size)), how })
}

/// A file the loader reads into guest memory: the kernel or the initramfs.
struct Source<'a> {
    file: std::fs::File,
    path: &'a Path,
    initrd: bool,
}

impl<'a> Source<'a> {
    /// The pieces that bring `len` bytes of the file from `offset` to
    /// guest address `addr`: its data in pieces of [`LOAD_PIECE`], its
    /// holes left out ([`data_runs`]).
    fn pieces(&'a self, offset: u64, addr: u64, len: u64) -> Result<Vec<Piece<'a>>, BootError> {
        let runs = data_runs(&self.file, offset, len).map_err(|e| self.error(e))?;
        Ok(runs.into_iter().flat_map(|(at, n)| Piece::split(self, at, addr + (at - offset), n)).collect())
    }

    fn error(&self, err: std::io::Error) -> BootError {
        let path = self.path.display().to_string();
        match self.initrd {
            true => BootError::ReadInitrd { path, err },
            false => BootError::ReadKernel { path, err },
        }
    }
}

/// Where the `len` bytes of `file` from `offset` hold data, as (offset,
/// length) runs: its holes are left out. A hole reads as zeroes, and guest
/// RAM is fresh (zero) at every boot, so copying one would only make the
/// host back guest pages for nothing. A vmlinux is a third zeroes (its
/// .bss and .brk are in the file): `kickvm-rig image` writes its vmlinux
/// with holes there, and `fallocate --dig-holes` makes any file so. Where
/// the filesystem does not report holes (9p, NFS) it is all data.
///
/// A file that no longer holds `offset + len` bytes is an error, not a
/// run cut short.
fn data_runs(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let size = file.metadata()?.len();
    let end = offset.checked_add(len).filter(|&end| end <= size);
    let Some(end) = end else {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file ended early"));
    };
    let seek = |at: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        let at = libc::off_t::try_from(at).map_err(std::io::Error::other)?;
        // SAFETY: lseek on an open descriptor. The loader reads with
        // pread, so the file position this moves is never used.
        match unsafe { libc::lseek(file.as_raw_fd(), at, whence) } {
            -1 => match std::io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                e => Err(e),
            },
            to => Ok(Some(to as u64)),
        }
    };
    Ok(runs_of_data(offset, end, seek))
}

/// The runs of data in `at..end`, as `seek` (`lseek` with `SEEK_DATA` or
/// `SEEK_HOLE`; `None` for ENXIO, no data from there on) reports them.
/// An answer that makes no sense — an error (a filesystem without
/// `SEEK_DATA`), an offset before the one asked (one whose `lseek` ignores
/// `whence`), a hole where data was just found — makes the rest data:
/// reading a hole as data costs only time, skipping data would corrupt
/// the guest's kernel.
fn runs_of_data(mut at: u64, end: u64, seek: impl Fn(u64, libc::c_int) -> std::io::Result<Option<u64>>) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    while at < end {
        let data = match seek(at, libc::SEEK_DATA) {
            Ok(None) => break,
            Ok(Some(d)) if d >= at => d,
            _ => {
                runs.push((at, end - at));
                break;
            }
        };
        if data >= end {
            break;
        }
        let hole = match seek(data, libc::SEEK_HOLE) {
            Ok(Some(h)) if h > data => h.min(end),
            _ => end,
        };
        runs.push((data, hole - data));
        at = hole;
    }
    runs
}

/// A piece of a [`Source`]: `len` bytes at `offset` go to guest address
/// `addr`.
struct Piece<'a> {
    src: &'a Source<'a>,
    offset: u64,
    addr: u64,
    len: u64,
}

impl<'a> Piece<'a> {
    /// `len` bytes of `src` from `offset` to `addr`, in pieces of [`LOAD_PIECE`].
    fn split(src: &'a Source<'a>, offset: u64, addr: u64, len: u64) -> impl Iterator<Item = Piece<'a>> {
        (0..len.div_ceil(LOAD_PIECE)).map(move |i| {
            let at = i * LOAD_PIECE;
            Piece { src, offset: offset + at, addr: addr + at, len: LOAD_PIECE.min(len - at) }
        })
    }
}

/// Reads `pieces` into guest memory on up to [`MAX_LOAD_THREADS`] threads.
/// What it costs is mostly the host backing each page of guest memory the
/// first time (zeroing it), which threads share.
fn read_pieces(mem: &GuestMemory, pieces: &[Piece]) -> Result<(), BootError> {
    in_parallel(pieces.len(), |i| read_piece(mem, &pieces[i])).map(|_| ())
}

/// Reads one piece into guest memory.
fn read_piece(mem: &GuestMemory, p: &Piece) -> Result<(), BootError> {
    // Pieces are at most LOAD_PIECE bytes, so in usize.
    with_guest_bytes(mem, p.addr, p.len as usize, |buf| elf::ReadAt::read_exact_at(&p.src.file, buf, p.offset))
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|e| match e.kind() {
            // Shorter than when it was opened: changed meanwhile.
            std::io::ErrorKind::UnexpectedEof => p.src.error(std::io::Error::new(e.kind(), "the file ended early")),
            _ => p.src.error(e),
        })
}

/// The pieces an ELF kernel's segments are read in, a thread each.
const LOAD_PIECE: u64 = 4 << 20;
/// Threads that load a kernel at most (this one included): past a few,
/// the host's page faults on guest memory, not the CPUs, set the pace.
const MAX_LOAD_THREADS: usize = 4;

/// Runs `job(0)` .. `job(n - 1)` on up to [`MAX_LOAD_THREADS`] threads
/// (this one among them), each taking the next job not yet taken; the
/// first error stops them and is returned. Returns how many threads ran.
fn in_parallel<E: Send>(n: usize, job: impl Fn(usize) -> Result<(), E> + Sync) -> Result<usize, E> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let threads = cpus_to_run_on().clamp(1, MAX_LOAD_THREADS).min(n.max(1));
    let next = AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(None);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n || failed.lock().is_ok_and(|f| f.is_some()) {
            return;
        }
        if let Err(e) = job(i) {
            if let Ok(mut f) = failed.lock() {
                f.get_or_insert(e);
            }
            return;
        }
    };
    std::thread::scope(|s| {
        for t in 1..threads {
            // A thread that cannot start leaves its share to the others.
            let _ = std::thread::Builder::new().name(format!("kickvm-load{t}")).spawn_scoped(s, work);
        }
        work();
    });
    match failed.into_inner().ok().flatten() {
        Some(e) => Err(e),
        None => Ok(threads),
    }
}

/// The CPUs this thread may run on. Not `available_parallelism`, which
/// also reads the cgroup's CPU quota through /proc and /sys: a few
/// milliseconds on the set-up's critical path under QEMU TCG, for a limit
/// that only time-slices loader threads that are few anyway.
fn cpus_to_run_on() -> usize {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity
    // writes at most its size into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return 1;
        }
        usize::try_from(libc::CPU_COUNT(&set)).unwrap_or(1)
    }
}

/// Calls `f` with the `len` bytes of guest memory at `at` as a byte slice,
/// for code that writes into a slice (a decompressor, `pread`).
fn with_guest_bytes<R>(mem: &GuestMemory, at: u64, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> Result<R, String> {
    use vm_memory::GuestMemoryBackend as _;
    let slice = mem.get_slice(GuestAddress(at), len).map_err(|e| format!("cannot write guest memory at {at:#x}: {e}"))?;
    let guard = slice.ptr_guard_mut();
    // SAFETY: `get_slice` checked that `len` bytes from `at` are mapped in
    // one region, and the guard keeps them mapped. Nothing else reads or
    // writes them while `f` runs: the kernel is loaded before the guest
    // starts, each caller's thread writes its own range, and no other
    // thread of the launcher touches the memory a kernel goes in.
    let bytes = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), len) };
    Ok(f(bytes))
}

/// Opens the bzImage at `path` and checks its header; returns the open
/// file and what the header says. Nothing is loaded.
pub fn inspect_kernel(path: &Path) -> Result<(std::fs::File, KernelImage), BootError> {
    let name = || path.display().to_string();
    let (mut file, len) = hostfile::open("kernel", path, hostfile::Accept::Regular, false)?;
    let mut head = Vec::new();
    (&mut file)
        .take(bzimage::HEADER_END as u64)
        .read_to_end(&mut head)
        .map_err(|err| BootError::ReadKernel { path: name(), err })?;
    let image = KernelImage::parse(&head, len).map_err(|err| BootError::Image { path: name(), err })?;
    Ok((file, image))
}

/// Checks that `kernel` can start in a guest whose RAM below 4 GiB ends at
/// `low_end`.
pub fn check_kernel_fits(path: &Path, kernel: &impl BootImage, low_end: u64) -> Result<(), BootError> {
    if kernel.reserved_end() > low_end {
        return Err(BootError::KernelTooLarge { path: path.display().to_string(), need: kernel.reserved_end() });
    }
    Ok(())
}

/// Loads a bzImage's protected-mode part at 1 MiB into a guest whose RAM
/// below 4 GiB ends at `low_end`. The header is checked again here: the
/// file may have changed since the options were validated (every reboot
/// loads it anew).
pub fn load_kernel(mem: &GuestMemory, path: &Path, low_end: u64) -> Result<KernelImage, BootError> {
    let (file, kernel) = inspect_kernel(path)?;
    check_kernel_fits(path, &kernel, low_end)?;
    let k = Source { file, path, initrd: false };
    read_pieces(mem, &Piece::split(&k, kernel.payload_offset, layout::HIGH_RAM_START, kernel.payload_len).collect::<Vec<_>>())?;
    Ok(kernel)
}

/// Where an initramfs of `size` bytes goes: as high as possible below
/// `low_end` (and below what the kernel can address), page-aligned, and
/// above the kernel's reserved area.
pub fn initrd_placement(size: u64, low_end: u64, kernel: &impl BootImage) -> Option<u64> {
    let addr = initrd_below(low_end.min(kernel.initrd_top()), size)?;
    (size > 0 && addr >= kernel.reserved_end()).then_some(addr)
}

/// The highest page-aligned address an initramfs of `size` bytes ending
/// by `top` can start at.
fn initrd_below(top: u64, size: u64) -> Option<u64> {
    Some(top.checked_sub(size)? & !(PAGE - 1))
}

/// Checks that an initramfs of `size` bytes fits; says why not.
pub fn check_initrd_fits(path: &Path, size: u64, low_end: u64, kernel: &impl BootImage) -> Result<u64, BootError> {
    if let Some(addr) = initrd_placement(size, low_end, kernel) {
        return Ok(addr);
    }
    let path = path.display().to_string();
    let top = kernel.initrd_top();
    // More memory helps only when RAM, not the kernel's limit, is short.
    if top < low_end || low_end >= layout::MEM_32BIT_GAP_START {
        let addr_max = top.min(low_end) - 1;
        return Err(BootError::InitrdAboveAddrMax { path, size, kernel_end: kernel.reserved_end(), addr_max });
    }
    Err(BootError::InitrdTooLarge { path, size })
}

/// Reads the initramfs into guest memory; returns `(address, size)`.
pub fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    low_end: u64,
    kernel: &impl BootImage,
) -> Result<(u64, u64), BootError> {
    let (file, size) = hostfile::open_nonempty("initrd", path)?;
    let addr = check_initrd_fits(path, size, low_end, kernel)?;
    let rd = Source { file, path, initrd: true };
    read_pieces(mem, &rd.pieces(0, addr, size)?)?;
    Ok((addr, size))
}

/// Checks `cmdline` against what the kernel and the zero page take.
pub fn check_cmdline(cmdline: &str, kernel: &impl BootImage) -> Result<(), BootError> {
    if let Some(c) = cmdline.chars().find(|c| !matches!(c, ' '..='~')) {
        return Err(BootError::CmdlineChar(c));
    }
    let max = kernel.cmdline_max();
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong { len: cmdline.len(), max });
    }
    Ok(())
}

/// Writes the command line, the zero page (bzImage) or the
/// `hvm_start_info` (PVH), the GDT, IDT and page tables.
pub fn write_boot_structures(
    mem: &GuestMemory,
    kernel: &impl BootImage,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    ram: u64,
) -> Result<(), BootError> {
    check_cmdline(cmdline, kernel)?;
    let mut cl = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cl)
        .map_err(|e| BootError::Write(e.to_string()))?;

    match kernel.setup_header() {
        Some(header) => {
            let zero_page = params::boot_params_for(&params::BootInfo {
                header: *header,
                ram,
                cmdline_addr: layout::CMDLINE_START,
                cmdline_len: cmdline.len() + 1,
                initrd,
                rsdp_addr: layout::RSDP_START,
            })?;
            LinuxBootConfigurator::write_bootparams(
                &BootParams::new(&zero_page, GuestAddress(layout::ZERO_PAGE_START)),
                mem,
            )
            .map_err(|e| BootError::Write(e.to_string()))?;
        }
        None => pvh::write_start_info(
            mem,
            &pvh::StartInfo { ram, cmdline_addr: layout::CMDLINE_START, initrd, rsdp_addr: layout::RSDP_START },
        )?,
    }

    // The PVH entry does not use the page tables; its GDT's 32-bit code
    // descriptor is the one CS holds at entry.
    mem.write_slice(&gdt::gdt_bytes(), GuestAddress(layout::BOOT_GDT_START))
        .map_err(|e| BootError::Write(e.to_string()))?;
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(|e| BootError::Write(e.to_string()))?;
    paging::write_identity_tables(mem).map_err(|e| BootError::Write(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bzimage::tests::{image, put};

    #[test]
    fn sizes_in_messages_are_not_rounded_up_to_whole_mib() {
        assert_eq!(mib(&(1_153_434)), "1.1 MiB");
        assert_eq!(mib(&(5 << 20)), "5.0 MiB");
        assert_eq!(mib(&1000), "1 KiB");
    }

    fn kernel(reserved_end: u64) -> KernelImage {
        let mut img = image(0x1000);
        put(&mut img, 0x22c, &0x7fff_ffffu32.to_le_bytes());
        let mut k = KernelImage::parse(&img[..bzimage::HEADER_END], img.len() as u64).unwrap();
        k.reserved_end = reserved_end;
        k
    }

    fn file(bytes: &[u8]) -> vmm_sys_util::tempfile::TempFile {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        std::fs::write(f.as_path(), bytes).unwrap();
        f
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let k = kernel(64 << 20);
        assert_eq!(initrd_placement(0x1800, 512 << 20, &k), Some((512 << 20) - 0x2000));
        // Capped by initrd_addr_max on a big guest.
        assert_eq!(initrd_placement(0x1000, 3 << 30, &k), Some(0x8000_0000 - 0x1000));
        // No room above the kernel.
        assert_eq!(initrd_placement(100 << 20, 128 << 20, &k), None);
        assert_eq!(initrd_placement(1 << 40, 128 << 20, &k), None);
        assert_eq!(initrd_placement(u64::MAX, u64::MAX, &k), None);
        assert_eq!(initrd_placement(0, 128 << 20, &k), None, "an empty initrd is not placed");
    }

    #[test]
    fn an_initrd_that_does_not_fit_says_why() {
        let p = Path::new("rd");
        let e = check_initrd_fits(p, 100 << 20, 128 << 20, &kernel(64 << 20)).unwrap_err();
        assert!(matches!(e, BootError::InitrdTooLarge { .. }), "{e}");
        assert!(e.to_string().contains("more --memory"), "{e}");
        // The kernel's initrd_addr_max, not RAM, is the limit.
        let mut k = kernel(64 << 20);
        k.header.initrd_addr_max = (96 << 20) - 1;
        let e = check_initrd_fits(p, 64 << 20, 1 << 30, &k).unwrap_err();
        assert!(matches!(e, BootError::InitrdAboveAddrMax { addr_max: 0x5ff_ffff, .. }), "{e}");
        assert!(!e.to_string().contains("more --memory"), "{e}");
        // initrd_addr_max 0 means the old default, 0x37ffffff.
        k.header.initrd_addr_max = 0;
        assert_eq!(check_initrd_fits(p, 0x1000, 3 << 30, &k).unwrap(), 0x3800_0000 - 0x1000);
    }

    #[test]
    fn files_that_are_not_a_bzimage_are_refused() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let f = file(&[0x7fu8; 8192]);
        let e = load_kernel(&mem, f.as_path(), 16 << 20).err().unwrap();
        assert!(matches!(e, BootError::Image { err: ImageError::NoHeader, .. }), "{e}");
        assert!(e.to_string().contains("is not a bzImage"), "{e}");
        let f = file(b"tiny");
        let e = load_kernel(&mem, f.as_path(), 16 << 20).err().unwrap();
        assert!(matches!(e, BootError::Image { err: ImageError::TooShort(4), .. }), "{e}");
        let f = file(b"");
        let e = load_kernel(&mem, f.as_path(), 16 << 20).err().unwrap();
        assert!(e.to_string().ends_with("is empty; kickvm boots a bzImage such as /boot/vmlinuz-* or an ELF vmlinux with a PVH entry point"), "{e}");
        let e = load_kernel(&mem, Path::new("/tmp"), 16 << 20).err().unwrap();
        assert_eq!(e.to_string(), "kernel /tmp is a directory, not a regular file");
    }

    #[test]
    fn a_crafted_header_is_refused_before_anything_is_loaded() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let mut img = image(0x1000);
        img[1024..].fill(0xcc);
        put(&mut img, 0x258, &(u64::MAX - 0x1000).to_le_bytes());
        let f = file(&img);
        let e = load_kernel(&mem, f.as_path(), 16 << 20).err().unwrap();
        assert!(matches!(e, BootError::Image { err: ImageError::Overflow { .. }, .. }), "{e}");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(layout::HIGH_RAM_START)).unwrap(), 0, "nothing loaded");
        // init_size that needs more than the guest has.
        put(&mut img, 0x258, &0x10_0000u64.to_le_bytes());
        put(&mut img, 0x260, &(32u32 << 20).to_le_bytes());
        let f = file(&img);
        let e = load_kernel(&mem, f.as_path(), 16 << 20).err().unwrap();
        assert!(matches!(e, BootError::KernelTooLarge { need: 0x210_0000, .. }), "{e}");
        assert!(e.to_string().contains("at least 33 MiB"), "{e}");
        // The same image loads into a guest big enough.
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let k = load_kernel(&mem, f.as_path(), 64 << 20).unwrap();
        assert_eq!(k.entry, 0x10_0200);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(layout::HIGH_RAM_START + 0xfff)).unwrap(), 0xcc);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(layout::HIGH_RAM_START + 0x1000)).unwrap(), 0);
    }

    #[test]
    fn a_vmlinux_is_loaded_where_its_segments_say_and_boots_through_pvh() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let img = elf::tests::vmlinux(&[0xf4, 0xcc], 0x10_0000);
        let f = file(&img);
        let (k, _) = load(&mem, f.as_path(), 64 << 20, false).unwrap();
        assert_eq!(k.entry(), Entry::Pvh32(elf::tests::ENTRY));
        assert_eq!(k.reserved_end(), 0x100_0042 + 0x10_0000);
        let mut got = [0u8; 3];
        mem.read_slice(&mut got, GuestAddress(elf::tests::ENTRY)).unwrap();
        assert_eq!(got, [0xf4, 0xcc, 0], "the code, then its untouched .bss");
        // The initramfs goes above the segments, the start info says where.
        let (addr, size) = load_initrd(&mem, file(b"0707").as_path(), 64 << 20, &k).unwrap();
        assert!(addr >= k.reserved_end());
        write_boot_structures(&mem, &k, "console=ttyS0", Some((addr, size)), 64 << 20).unwrap();
        let info: linux_loader::loader::elf::start_info::hvm_start_info =
            mem.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
        assert_eq!((info.cmdline_paddr, info.nr_modules), (layout::CMDLINE_START, 1));
        assert_eq!(mem.read_obj::<u64>(GuestAddress(layout::ZERO_PAGE_START)).unwrap(), 0, "no zero page");
        // A guest too small for the segments, or a command line too long.
        let small = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let e = load(&small, f.as_path(), 16 << 20, false).unwrap_err();
        assert!(matches!(e, BootError::KernelTooLarge { .. }), "{e}");
        assert!(matches!(
            write_boot_structures(&mem, &k, &"x".repeat(2048), None, 64 << 20),
            Err(BootError::CmdlineTooLong { max: 2047, .. })
        ));
    }

    #[test]
    fn a_broken_vmlinux_loads_nothing() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let mut img = elf::tests::vmlinux(&[0xf4], 0);
        // A second load segment that overlaps the first, listed after it.
        elf::tests::edit_phdr(&mut img, 1, |p| (p.p_type, p.p_paddr, p.p_memsz) = (linux_loader::elf::PT_LOAD, 0x100_0010, 0x40));
        let e = load(&mem, file(&img).as_path(), 64 << 20, false).unwrap_err();
        assert!(e.to_string().contains("overlapping"), "{e}");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(elf::tests::ENTRY)).unwrap(), 0, "nothing loaded");
        let e = inspect(file(b"\x7fELF").as_path()).unwrap_err();
        assert!(e.to_string().ends_with("is an ELF file of 4 bytes, too short for an ELF header"), "{e}");
    }

    #[test]
    fn a_truncated_initrd_read_is_an_error() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let e = load_initrd(&mem, file(b"").as_path(), 16 << 20, &kernel(8 << 20)).unwrap_err();
        assert!(e.to_string().ends_with("is empty"), "{e}");
        let (addr, size) = load_initrd(&mem, file(b"0707").as_path(), 16 << 20, &kernel(8 << 20)).unwrap();
        assert_eq!((addr, size), ((16 << 20) - 0x1000, 4));
    }

    #[test]
    fn boot_structures_fit_and_cmdline_is_bounded() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let mut k = kernel(8 << 20);
        k.header.cmdline_size = 2047;
        write_boot_structures(&mem, &k, "console=ttyS0", None, 16 << 20).unwrap();
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(layout::CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        let long = "x".repeat(3000);
        assert!(matches!(
            write_boot_structures(&mem, &k, &long, None, 16 << 20),
            Err(BootError::CmdlineTooLong { .. })
        ));
        for bad in ["console=ttyS0\tquiet", "a\nb", "init=/bin/\u{e9}"] {
            assert!(matches!(check_cmdline(bad, &k), Err(BootError::CmdlineChar(_))), "{bad:?}");
        }
    }

    /// A file's holes are not read: the guest memory under them is never
    /// backed, reads as zeroes, and the data around them lands in place.
    #[test]
    fn a_files_holes_are_not_read_and_leave_guest_memory_untouched() {
        use std::os::unix::fs::FileExt;
        use vm_memory::{Bytes, GuestMemoryBackend};
        const MIB: u64 = 1 << 20;
        // Data 0..4 MiB and 12..13 MiB + 5, a hole between.
        let head: Vec<u8> = (0..4 * MIB).map(|i| (i % 253) as u8 | 1).collect();
        let tail: Vec<u8> = (0..MIB + 5).map(|i| (i % 241) as u8 | 1).collect();
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let file = f.as_file();
        file.write_all_at(&head, 0).unwrap();
        file.write_all_at(&tail, 12 * MIB).unwrap();
        let len = 13 * MIB + 5;
        let src = Source { file: std::fs::File::open(f.as_path()).unwrap(), path: f.as_path(), initrd: false };
        // 20 MiB of guest memory, the file at 2 MiB.
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 20 << 20)]).unwrap();
        let pieces = src.pieces(0, 2 * MIB, len).unwrap();
        read_pieces(&mem, &pieces).unwrap();
        // SAFETY: lseek on an open descriptor.
        let first_hole = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(file), 0, libc::SEEK_HOLE) };
        if first_hole < 0 || first_hole as u64 >= len {
            eprintln!("skipped the untouched-memory check: {}'s filesystem does not report holes", f.as_path().display());
        } else {
            assert_eq!(pieces.iter().map(|p| p.len).sum::<u64>(), 5 * MIB + 5, "only the data is read");
            // The middle of the hole (guest 8..12 MiB: away from its edges,
            // which may share a host huge page with data) was never backed.
            // Checked before anything reads it (a read maps the zero page).
            let host = mem.get_host_address(GuestAddress(8 * MIB)).unwrap();
            let mut resident = vec![0u8; (4 * MIB / 4096) as usize];
            // SAFETY: 4 MiB from `host` are mapped guest memory; mincore
            // writes one byte per page into `resident`, which holds that many.
            assert_eq!(unsafe { libc::mincore(host.cast(), (4 * MIB) as usize, resident.as_mut_ptr()) }, 0);
            assert!(resident.iter().all(|&r| r & 1 == 0), "a page in the hole was backed");
        }
        let mut back = vec![0u8; len as usize];
        mem.read_slice(&mut back, GuestAddress(2 * MIB)).unwrap();
        assert!(back[..head.len()] == head[..], "data before the hole");
        assert!(back[4 * MIB as usize..12 * MIB as usize].iter().all(|&b| b == 0), "the hole reads as zeroes");
        assert!(back[12 * MIB as usize..] == tail[..], "data after the hole");
        // A file shorter than the run asked for is an error, holes or not.
        let e = src.pieces(0, 2 * MIB, len + 1).err().expect("a run past the end");
        assert!(e.to_string().contains("the file ended early"), "{e}");
    }

    /// What `lseek` says is trusted only where it makes sense: a
    /// filesystem without `SEEK_DATA`, or one whose `lseek` ignores
    /// `whence`, leaves the rest of the file to be read as data.
    #[test]
    fn odd_lseek_answers_make_the_rest_data_never_skip_it() {
        use std::io::{Error, ErrorKind};
        // Data at 4096..8192 and 12288..16384 of a 16 KiB file.
        let holes = |at: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
            Ok(match whence {
                libc::SEEK_DATA if at < 4096 => Some(4096),
                libc::SEEK_DATA if at < 8192 => Some(at),
                libc::SEEK_DATA if at < 12288 => Some(12288),
                libc::SEEK_DATA if at < 16384 => Some(at),
                libc::SEEK_DATA => None,
                _ if at < 8192 => Some(8192),
                _ => Some(16384),
            })
        };
        assert_eq!(runs_of_data(0, 16384, holes), [(4096, 4096), (12288, 4096)]);
        assert_eq!(runs_of_data(5000, 14000, holes), [(5000, 3192), (12288, 1712)]);
        assert_eq!(runs_of_data(8192, 12288, holes), []);
        let unsupported = |_: u64, _: libc::c_int| Err(Error::from_raw_os_error(libc::EINVAL));
        assert_eq!(runs_of_data(100, 16384, unsupported), [(100, 16284)]);
        // An lseek that ignores `whence` and returns the file position.
        let position = |_: u64, _: libc::c_int| Ok(Some(0));
        assert_eq!(runs_of_data(0, 16384, position), [(0, 16384)]);
        assert_eq!(runs_of_data(4096, 16384, position), [(4096, 12288)]);
        // Data, then an error where its hole was asked for.
        let half = |at: u64, whence: libc::c_int| match whence {
            libc::SEEK_DATA => Ok(Some(at)),
            _ => Err(Error::from(ErrorKind::Other)),
        };
        assert_eq!(runs_of_data(0, 16384, half), [(0, 16384)]);
    }

    /// The kernel and the initramfs are read in pieces on several threads:
    /// every byte lands where it belongs, and a file that turns out shorter
    /// than its pieces is an error naming that file.
    #[test]
    fn pieces_of_two_files_land_in_place_and_a_short_file_is_named() {
        use vm_memory::Bytes;
        let made = |len: usize, seed: u8| {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ seed).collect();
            (file(&bytes), bytes)
        };
        let (k, kbytes) = made((9 << 20) + 123, 0x55);
        let (rd, rdbytes) = made((4 << 20) + 7, 0xaa);
        let open = |f: &vmm_sys_util::tempfile::TempFile| std::fs::File::open(f.as_path()).unwrap();
        let ks = Source { file: open(&k), path: k.as_path(), initrd: false };
        let rds = Source { file: open(&rd), path: rd.as_path(), initrd: true };
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let mut pieces: Vec<Piece> = Piece::split(&ks, 0, 1 << 20, kbytes.len() as u64).collect();
        pieces.extend(Piece::split(&rds, 0, 16 << 20, rdbytes.len() as u64));
        assert_eq!(pieces.len(), 3 + 2);
        read_pieces(&mem, &pieces).unwrap();
        let mut back = vec![0u8; kbytes.len()];
        mem.read_slice(&mut back, GuestAddress(1 << 20)).unwrap();
        assert!(back == kbytes, "kernel bytes");
        let mut back = vec![0u8; rdbytes.len()];
        mem.read_slice(&mut back, GuestAddress(16 << 20)).unwrap();
        assert!(back == rdbytes, "initramfs bytes");
        // The initramfs shrank after it was measured.
        let pieces: Vec<Piece> = Piece::split(&rds, 0, 16 << 20, rdbytes.len() as u64 + 1).collect();
        let e = read_pieces(&mem, &pieces).unwrap_err();
        assert!(matches!(e, BootError::ReadInitrd { .. }), "{e}");
        assert!(e.to_string().contains("the file ended early"), "{e}");
        let pieces: Vec<Piece> = Piece::split(&ks, 0, 1 << 20, kbytes.len() as u64 + 1).collect();
        let e = read_pieces(&mem, &pieces).unwrap_err();
        assert!(matches!(e, BootError::ReadKernel { .. }), "{e}");
    }
}
