//! Linux direct boot (x86 64-bit boot protocol): load the bzImage and the
//! initramfs into guest memory, write the command line, the zero page, the
//! GDT and identity page tables, so the boot vCPU can start at the kernel's
//! 64-bit entry point.

pub mod gdt;
pub mod paging;
pub mod params;

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use kickvm_virtio::GuestMemory;

/// `xloadflags` bit: the kernel has a 64-bit entry point at load + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
const ENTRY_64_OFFSET: u64 = 0x200;
const PAGE: u64 = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {err}")]
    OpenKernel { path: String, err: std::io::Error },
    #[error("kernel {0} is not a bzImage (no \"HdrS\" setup header); kickvm boots bzImage kernels such as /boot/vmlinuz-*")]
    NotBzImage(String),
    #[error("cannot load kernel {path}: {err}")]
    LoadKernel { path: String, err: String },
    #[error("kernel {0} has no 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64 needed)")]
    No64BitEntry(String),
    #[error("cannot read initrd {path}: {err}")]
    OpenInitrd { path: String, err: std::io::Error },
    #[error("initrd {path} ({size} MiB) does not fit in guest memory next to the kernel; give the guest more --memory", size = .size >> 20)]
    InitrdTooLarge { path: String, size: u64 },
    #[error("kernel {path} needs at least {need} MiB of guest memory to start; give the guest more --memory", need = .need.div_ceil(1 << 20))]
    KernelTooLarge { path: String, need: u64 },
    #[error("kernel command line is {len} bytes, more than the kernel accepts ({max})")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("guest memory map has too many entries for the zero page")]
    TooManyE820Entries,
    #[error("cannot write boot structures to guest memory: {0}")]
    Write(String),
}

/// A kernel loaded into guest memory.
pub struct LoadedKernel {
    /// The 64-bit entry point (RIP of the boot vCPU).
    pub entry: u64,
    /// The setup header from the image, to be copied to the zero page.
    pub header: setup_header,
    /// Lowest address the kernel may use while it decompresses and starts:
    /// nothing else may be placed below this (and above 1 MiB).
    pub reserved_end: u64,
}

/// Loads a bzImage at its preferred 32-bit start (1 MiB) into a guest
/// whose RAM below 4 GiB ends at `low_end`.
pub fn load_kernel(mem: &GuestMemory, path: &Path, low_end: u64) -> Result<LoadedKernel, BootError> {
    let name = path.display().to_string();
    let mut file =
        File::open(path).map_err(|err| BootError::OpenKernel { path: name.clone(), err })?;
    let loaded = BzImage::load(mem, None, &mut file, Some(GuestAddress(layout::HIGH_RAM_START)))
        .map_err(|e| match e {
            linux_loader::loader::Error::Bzimage(linux_loader::loader::bzimage::Error::InvalidBzImage)
            | linux_loader::loader::Error::Bzimage(linux_loader::loader::bzimage::Error::ReadBzImageHeader)
            | linux_loader::loader::Error::Bzimage(linux_loader::loader::bzimage::Error::Underflow) => {
                BootError::NotBzImage(name.clone())
            }
            linux_loader::loader::Error::Bzimage(
                linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel,
            ) => BootError::KernelTooLarge { path: name.clone(), need: file_len(path) },
            other => BootError::LoadKernel { path: name.clone(), err: other.to_string() },
        })?;
    let Some(header) = loaded.setup_header else {
        return Err(BootError::NotBzImage(name));
    };
    if header.version < 0x020c || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry(name));
    }
    // The decompressor runs in place or at `pref_address`, and needs
    // `init_size` bytes from wherever it ends up.
    let run_at = loaded.kernel_load.0.max(header.pref_address);
    let reserved_end = (run_at + u64::from(header.init_size)).max(loaded.kernel_end);
    if reserved_end > low_end {
        return Err(BootError::KernelTooLarge { path: name, need: reserved_end });
    }
    Ok(LoadedKernel { entry: loaded.kernel_load.0 + ENTRY_64_OFFSET, header, reserved_end })
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len() + layout::HIGH_RAM_START).unwrap_or(0)
}

/// Where an initramfs of `size` bytes goes: as high as possible below
/// `low_end` (and below what the kernel can address), page-aligned, and
/// above the kernel's reserved area.
pub fn initrd_placement(size: u64, low_end: u64, kernel: &LoadedKernel) -> Option<u64> {
    let addr_max = match kernel.header.initrd_addr_max {
        0 => 0x37ff_ffff, // protocol < 2.03 default
        m => u64::from(m),
    };
    let top = low_end.min(addr_max + 1);
    let addr = top.checked_sub(size)? & !(PAGE - 1);
    (addr >= kernel.reserved_end).then_some(addr)
}

/// Reads the initramfs into guest memory; returns `(address, size)`.
pub fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    low_end: u64,
    kernel: &LoadedKernel,
) -> Result<(u64, u64), BootError> {
    let name = path.display().to_string();
    let mut file = File::open(path).map_err(|err| BootError::OpenInitrd { path: name.clone(), err })?;
    let size = file
        .metadata()
        .map_err(|err| BootError::OpenInitrd { path: name.clone(), err })?
        .len();
    let addr = initrd_placement(size, low_end, kernel)
        .ok_or(BootError::InitrdTooLarge { path: name.clone(), size })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::OpenInitrd { path: name, err: std::io::Error::other(e.to_string()) })?;
    Ok((addr, size))
}

/// Writes the command line, zero page, GDT, IDT and page tables.
pub fn write_boot_structures(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    ram: u64,
) -> Result<(), BootError> {
    let max = match kernel.header.cmdline_size {
        0 => 255,
        n => n as usize,
    }
    .min(layout::CMDLINE_MAX_SIZE - 1);
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong { len: cmdline.len(), max });
    }
    let mut cl = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cl)
        .map_err(|e| BootError::Write(e.to_string()))?;

    let zero_page = params::boot_params_for(&params::BootInfo {
        header: kernel.header,
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

    fn kernel(reserved_end: u64) -> LoadedKernel {
        let header = setup_header { initrd_addr_max: 0x7fff_ffff, ..Default::default() };
        LoadedKernel { entry: 0x10_0200, header, reserved_end }
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
    }

    #[test]
    fn a_file_that_is_not_a_bzimage_is_refused() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        std::fs::write(f.as_path(), vec![0x7fu8; 8192]).unwrap();
        let e = load_kernel(&mem, f.as_path(), 16 << 20).err().unwrap();
        assert!(matches!(e, BootError::NotBzImage(_)), "{e}");
        std::fs::write(f.as_path(), b"tiny").unwrap();
        let e = load_kernel(&mem, f.as_path(), 16 << 20).err().unwrap();
        assert!(matches!(e, BootError::NotBzImage(_)), "{e}");
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
    }
}
