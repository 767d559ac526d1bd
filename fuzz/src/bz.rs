//! The `bzimage` target: kickvm's kernel loader over a kernel file the host
//! user gave (`--kernel`), with a structured setup header.
//!
//! A run builds a bzImage (setup sectors with a setup header whose fields
//! come from the input, raw patches, a sparse protected-mode payload) in a
//! memfd, and calls what `kickvm run` calls, as it calls them: the checks
//! of `VmConfig::validate` (`boot::inspect_kernel`, `check_kernel_fits`,
//! `check_cmdline`, `check_initrd_fits`), then `boot::load` (host
//! decompression of an LZ4 payload, `boot::unpack`), `boot::load_kernel`
//! (`/proc/self/fd/N`), `load_initrd` (a sparse memfd of the input's
//! size) and `write_boot_structures`, on 4..32 MiB of guest memory; and
//! `KernelImage::parse` on the same header with other file lengths, and
//! `initrd_placement` with other initrd sizes.
//!
//! Beyond "no panic", each result is checked against what the functions
//! promise: an accepted kernel's entry point is inside its loaded payload,
//! it runs at or above `pref_address` and 1 MiB, its reserved area covers
//! the payload and `run_at + init_size` without wrapping and ends inside
//! RAM and the identity map; an initrd placement is page-aligned, above
//! the kernel's reserved area, below `low_end` and `initrd_addr_max`;
//! every error is one line.

use std::io::Write;

use arbitrary::Arbitrary;
use kickvm::boot;
use vm_memory::GuestAddress;

use crate::checks;
use crate::enc::{Bytes, Enc, Encode, Text};

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct BzInput {
    /// Guest RAM: 4 + mem_mib % 29 MiB.
    pub mem_mib: u8,
    pub header: Header,
    /// Raw bytes over the first 4 KiB of the file, after the header.
    pub patches: Vec<Patch>,
    pub payload: Payload,
    pub initrd: Option<Size>,
    /// More initrd sizes to place (`initrd_placement` only).
    pub probes: Vec<Size>,
    /// More file lengths to parse the header with (`KernelImage::parse`).
    pub lens: Vec<Size>,
    pub cmdline: Text<4096>,
}

/// The setup header fields the loader looks at.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub setup_sects: u8,
    pub syssize: Syssize,
    pub magic: Magic,
    pub version: u16,
    pub loadflags: u8,
    pub code32_start: Code32,
    pub initrd_addr_max: u32,
    pub kernel_alignment: u32,
    pub relocatable: u8,
    pub xloadflags: u16,
    pub cmdline_size: u32,
    pub pref_address: Pref,
    pub init_size: u32,
    pub boot_flag: bool,
}

/// `syssize`: 16-byte paragraphs of the protected-mode part.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syssize {
    /// What the payload is.
    Auto,
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Magic {
    /// "HdrS"
    HdrS,
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code32 {
    /// 0x100000
    Default,
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pref {
    /// 0x1000000 (16 MiB, as x86_64 defconfig kernels say)
    Default,
    Raw(u64),
    /// `u64::MAX - v`
    NearTop(u16),
    Low(u32),
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    pub offset: u16,
    pub data: Bytes<16>,
}

/// The protected-mode part after the setup sectors.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// `v % 8 MiB` bytes.
    Len(u32),
    /// Shorter than the setup sectors say: the file ends after `v % 64 KiB` bytes.
    Truncated(u16),
}

/// A file size.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// `v` pages plus `extra % 4096` bytes.
    Pages { pages: u16, extra: u16 },
    Raw(u64),
}

impl Size {
    pub fn get(self) -> u64 {
        match self {
            Size::Pages { pages, extra } => u64::from(pages) * 4096 + u64::from(extra % 4096),
            Size::Raw(v) => v,
        }
    }
}

// ---- encoders --------------------------------------------------------

impl Encode for Syssize {
    fn encode(&self, e: &mut Enc) {
        match *self {
            Syssize::Auto => e.tag(0, 2),
            Syssize::Raw(v) => e.tag(1, 2).u32(v),
        };
    }
}
impl Encode for Magic {
    fn encode(&self, e: &mut Enc) {
        match *self {
            Magic::HdrS => e.tag(0, 2),
            Magic::Raw(v) => e.tag(1, 2).u32(v),
        };
    }
}
impl Encode for Code32 {
    fn encode(&self, e: &mut Enc) {
        match *self {
            Code32::Default => e.tag(0, 2),
            Code32::Raw(v) => e.tag(1, 2).u32(v),
        };
    }
}
impl Encode for Pref {
    fn encode(&self, e: &mut Enc) {
        match *self {
            Pref::Default => e.tag(0, 4),
            Pref::Raw(v) => e.tag(1, 4).u64(v),
            Pref::NearTop(v) => e.tag(2, 4).u16(v),
            Pref::Low(v) => e.tag(3, 4).u32(v),
        };
    }
}
impl Encode for Header {
    fn encode(&self, e: &mut Enc) {
        e.u8(self.setup_sects)
            .put(&self.syssize)
            .put(&self.magic)
            .u16(self.version)
            .u8(self.loadflags)
            .put(&self.code32_start)
            .u32(self.initrd_addr_max)
            .u32(self.kernel_alignment)
            .u8(self.relocatable)
            .u16(self.xloadflags)
            .u32(self.cmdline_size)
            .put(&self.pref_address)
            .u32(self.init_size)
            .bool(self.boot_flag);
    }
}
impl Encode for Patch {
    fn encode(&self, e: &mut Enc) {
        e.u16(self.offset).put(&self.data);
    }
}
impl Encode for Payload {
    fn encode(&self, e: &mut Enc) {
        match *self {
            Payload::Len(v) => e.tag(0, 2).u32(v),
            Payload::Truncated(v) => e.tag(1, 2).u16(v),
        };
    }
}
impl Encode for Size {
    fn encode(&self, e: &mut Enc) {
        match *self {
            Size::Pages { pages, extra } => e.tag(0, 2).u16(pages).u16(extra),
            Size::Raw(v) => e.tag(1, 2).u64(v),
        };
    }
}
impl Encode for BzInput {
    fn encode(&self, e: &mut Enc) {
        e.u8(self.mem_mib)
            .put(&self.header)
            .vec(&self.patches)
            .put(&self.payload)
            .option(&self.initrd)
            .vec(&self.probes)
            .vec(&self.lens)
            .put(&self.cmdline);
    }
}

// ---- the image -------------------------------------------------------

pub const HDRS: u32 = 0x5372_6448;
const MAX_PAYLOAD: u64 = 8 << 20;

fn put(img: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = img.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

/// The file: setup sectors (with the header at 0x1f1, boot protocol
/// offsets), then the payload; returns `(head bytes, total length)` — the
/// rest of the file is zeroes (sparse).
pub fn image(input: &BzInput) -> (Vec<u8>, u64) {
    let h = &input.header;
    let sects = if h.setup_sects == 0 { 4 } else { usize::from(h.setup_sects) };
    let setup_len = (sects + 1) * 512;
    let mut img = vec![0u8; setup_len.max(0x1000)];
    let total = match input.payload {
        Payload::Len(v) => setup_len as u64 + u64::from(v) % MAX_PAYLOAD,
        Payload::Truncated(v) => u64::from(v) % 0x1_0000,
    };
    put(&mut img, 0x1f1, &[h.setup_sects]);
    let syssize = match h.syssize {
        Syssize::Auto => (total.saturating_sub(setup_len as u64) / 16) as u32,
        Syssize::Raw(v) => v,
    };
    put(&mut img, 0x1f4, &syssize.to_le_bytes());
    if h.boot_flag {
        put(&mut img, 0x1fe, &0xaa55u16.to_le_bytes());
    }
    let magic = match h.magic {
        Magic::HdrS => HDRS,
        Magic::Raw(v) => v,
    };
    put(&mut img, 0x202, &magic.to_le_bytes());
    put(&mut img, 0x206, &h.version.to_le_bytes());
    put(&mut img, 0x211, &[h.loadflags]);
    let code32 = match h.code32_start {
        Code32::Default => 0x10_0000,
        Code32::Raw(v) => v,
    };
    put(&mut img, 0x214, &code32.to_le_bytes());
    put(&mut img, 0x22c, &h.initrd_addr_max.to_le_bytes());
    put(&mut img, 0x230, &h.kernel_alignment.to_le_bytes());
    put(&mut img, 0x234, &[h.relocatable]);
    put(&mut img, 0x236, &h.xloadflags.to_le_bytes());
    put(&mut img, 0x238, &h.cmdline_size.to_le_bytes());
    put(&mut img, 0x258, &pref(h.pref_address).to_le_bytes());
    put(&mut img, 0x260, &h.init_size.to_le_bytes());
    for p in &input.patches {
        put(&mut img, usize::from(p.offset % 0x1000), &p.data.0);
    }
    img.truncate(total.min(img.len() as u64) as usize);
    if img.len() > setup_len {
        // A recognisable start of the protected-mode code.
        put(&mut img, setup_len, b"\x0f\x01\xd9kickvm-fuzz");
    }
    (img, total)
}

/// A bzImage that passes every check (a Debian-like header, 1 MiB of
/// payload): `(head bytes, file length)`.
pub fn sample_kernel() -> (Vec<u8>, u64) {
    let input = crate::seeds::bzimage().into_iter().find(|(n, _)| *n == "debian-like").expect("seed").1;
    image(&input)
}

pub fn pref(p: Pref) -> u64 {
    match p {
        Pref::Default => 0x100_0000,
        Pref::Raw(v) => v,
        Pref::NearTop(v) => u64::MAX - u64::from(v),
        Pref::Low(v) => v.into(),
    }
}

/// A memfd reused by every run; returns its `/proc/self/fd` path.
fn memfd(name: &'static std::ffi::CStr, slot: &'static std::sync::OnceLock<(i32, String)>) -> (std::fs::File, String) {
    let (fd, path) = slot.get_or_init(|| {
        // SAFETY: memfd_create with a valid C string; the fd lives as long
        // as the process, on purpose.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        (fd, format!("/proc/self/fd/{fd}"))
    });
    let _ = fd;
    let f = std::fs::OpenOptions::new().write(true).open(path).expect("reopen memfd");
    (f, path.clone())
}

/// Checks an accepted kernel against what `KernelImage` promises.
fn check_image(k: &boot::KernelImage, file_len: u64, low_end: Option<u64>) {
    let hdr = k.header;
    let (pref, init) = (hdr.pref_address, u64::from(hdr.init_size));
    let load = kickvm::layout::HIGH_RAM_START;
    assert_eq!(k.payload_offset + k.payload_len, file_len, "payload does not end at the end of the file");
    assert!(
        k.entry >= load + 0x200 && k.entry < load + k.payload_len,
        "entry {:#x} is outside the loaded payload {load:#x}+{:#x}",
        k.entry,
        k.payload_len
    );
    assert!(k.run_at >= load && k.run_at >= pref, "runs at {:#x}, below 1 MiB or pref_address {pref:#x}", k.run_at);
    let need = (u128::from(k.run_at) + u128::from(init)).max(u128::from(load) + u128::from(k.payload_len));
    assert!(
        u128::from(k.reserved_end) >= need,
        "reserved area ends at {:#x}, but the kernel runs at {:#x} with init_size {init:#x} and payload {:#x}",
        k.reserved_end,
        k.run_at,
        k.payload_len
    );
    assert!(k.reserved_end <= boot::bzimage::IDENTITY_MAPPED_END, "reserved area ends at {:#x}, past the identity map", k.reserved_end);
    if let Some(low_end) = low_end {
        assert!(k.reserved_end <= low_end, "reserved area ends at {:#x}, past RAM ({low_end:#x})", k.reserved_end);
    }
}

/// Checks an initrd placement against what `initrd_placement` promises.
fn check_place(k: &boot::KernelImage, low_end: u64, size: u64, addr: u64) {
    let max = match k.header.initrd_addr_max {
        0 => 0x37ff_ffff,
        m => u64::from(m),
    };
    assert!(size > 0, "an empty initrd was placed");
    assert_eq!(addr % 4096, 0, "initrd at {addr:#x} is not page-aligned");
    assert!(addr >= k.reserved_end, "initrd at {addr:#x} overlaps the kernel (reserved to {:#x})", k.reserved_end);
    let end = u128::from(addr) + u128::from(size);
    assert!(end <= u128::from(low_end), "initrd {addr:#x}+{size:#x} ends past RAM ({low_end:#x})");
    assert!(end <= u128::from(max) + 1, "initrd {addr:#x}+{size:#x} ends past initrd_addr_max {max:#x}");
}

/// Runs one input; panics on any violation.
pub fn run(input: &BzInput) {
    checks::log_begin();
    static KERNEL: std::sync::OnceLock<(i32, String)> = std::sync::OnceLock::new();
    static INITRD: std::sync::OnceLock<(i32, String)> = std::sync::OnceLock::new();

    let mem_size = (4 + u64::from(input.mem_mib % 29)) << 20;
    let mem = kickvm_virtio::GuestMemory::from_ranges(&[(GuestAddress(0), mem_size as usize)])
        .expect("fuzz guest memory");
    // What vm::run passes: RAM below the 32-bit gap, and all of RAM.
    let low_end = kickvm::memory::low_end(mem_size);

    let (head, total) = image(input);
    for len in input.lens.iter().take(16) {
        let len = len.get();
        let cut = &head[..head.len().min(usize::try_from(len).unwrap_or(usize::MAX))];
        match boot::KernelImage::parse(cut, len) {
            Ok(k) => check_image(&k, len, None),
            Err(e) => one_line(&e.to_string()),
        }
    }
    let (mut f, kpath) = memfd(c"kickvm-fuzz-kernel", &KERNEL);
    f.set_len(0).expect("truncate kernel memfd");
    f.write_all(&head).expect("write kernel memfd");
    f.set_len(total).expect("size kernel memfd");
    drop(f);
    let kpath: &std::path::Path = kpath.as_ref();

    let initrd_path = input.initrd.map(|s| {
        let size = s.get().min(i64::MAX as u64);
        let (f, ipath) = memfd(c"kickvm-fuzz-initrd", &INITRD);
        f.set_len(0).expect("truncate initrd memfd");
        f.set_len(size).expect("size initrd memfd");
        (size, std::path::PathBuf::from(ipath))
    });
    let cmdline = input.cmdline.lossy();

    // What `VmConfig::validate` checks, before anything is created.
    let mut valid = true;
    match boot::inspect_kernel(kpath) {
        Ok((_, k)) => {
            check_image(&k, total, None);
            let checks = [
                boot::check_kernel_fits(kpath, &k, low_end),
                boot::check_cmdline(&cmdline, &k),
                match &initrd_path {
                    Some((size, p)) => boot::check_initrd_fits(p, *size, low_end, &k).map(|_| ()),
                    None => Ok(()),
                },
            ];
            for c in checks {
                if let Err(e) = c {
                    one_line(&e.to_string());
                    valid = false;
                }
            }
        }
        Err(e) => {
            one_line(&e.to_string());
            valid = false;
        }
    }

    // Loading, as the VM build does; it stops at the first error.
    let loaded = load(input, &mem, (kpath, total), low_end, initrd_path.as_ref(), &cmdline, mem_size);
    match loaded {
        Ok(()) => assert!(valid, "the kernel loads and boots, but validate()'s checks refuse it"),
        Err(e) => {
            one_line(&e);
            assert!(!valid, "validate()'s checks passed, but loading failed: {e}");
        }
    }
    checks::log_end();
}

/// `vm::run`'s loading steps.
fn load(
    input: &BzInput,
    mem: &kickvm_virtio::GuestMemory,
    (kpath, total): (&std::path::Path, u64),
    low_end: u64,
    initrd: Option<&(u64, std::path::PathBuf)>,
    cmdline: &str,
    ram: u64,
) -> Result<(), String> {
    // What `kickvm run` does by default: decompress on the host when the
    // payload is LZ4 (else the same as `load_kernel`).
    // The initramfs, if any, is read alongside the blocks when it can be.
    match boot::load_with_initrd(mem, kpath, initrd.map(|(_, p)| p.as_path()), low_end, false) {
        Ok(boot::Loaded { kernel: boot::Kernel::Elf(e), initrd: rd, .. }) => {
            assert!(e.reserved_end <= low_end, "host-decompressed kernel past RAM");
            assert!(e.segments.iter().any(|s| e.entry >= s.addr && e.entry < s.addr + s.file_len), "entry outside");
            if let (Some((addr, sz)), Some((size, p))) = (rd, initrd) {
                assert_eq!(sz, *size, "initrd size");
                assert!(addr >= e.reserved_end && addr + sz <= low_end, "initrd at {addr:#x}+{sz:#x} over the kernel or past RAM");
                let want = std::fs::read(p).expect("the initrd file");
                let mut got = vec![0u8; want.len()];
                vm_memory::Bytes::read_slice(mem, &mut got, GuestAddress(addr)).expect("initrd in RAM");
                assert!(got == want, "the initrd in guest memory is not the file");
            }
        }
        Ok(_) => {}
        Err(e) => one_line(&e.to_string()),
    }
    let k = boot::load_kernel(mem, kpath, low_end).map_err(|e| e.to_string())?;
    check_image(&k, total, Some(low_end));
    for s in input.probes.iter().take(64) {
        let size = s.get();
        if let Some(addr) = boot::initrd_placement(size, low_end, &k) {
            check_place(&k, low_end, size, addr);
        }
        if let Err(e) = boot::check_initrd_fits(kpath, size, low_end, &k) {
            one_line(&e.to_string());
        }
    }
    let initrd = match initrd {
        Some((size, p)) => {
            let (addr, sz) = boot::load_initrd(mem, p, low_end, &k).map_err(|e| e.to_string())?;
            assert_eq!(sz, *size, "initrd size");
            check_place(&k, low_end, sz, addr);
            Some((addr, sz))
        }
        None => None,
    };
    boot::write_boot_structures(mem, &k, cmdline, initrd, ram).map_err(|e| e.to_string())
}

/// An error the user sees is one line.
fn one_line(msg: &str) {
    assert!(!msg.contains('\n'), "error message is not one line: {msg:?}");
}
