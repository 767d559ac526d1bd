//! The `bzimage` target: kickvm's kernel loader over a kernel file the host
//! user gave (`--kernel`), with a structured setup header.
//!
//! A run builds a bzImage (setup sectors with a setup header whose fields
//! come from the input, raw patches, a sparse protected-mode payload) in a
//! memfd, and calls what `vm::run` calls, as it calls it:
//! `boot::load_kernel` (`/proc/self/fd/N`), `initrd_placement`,
//! `load_initrd` (a sparse memfd of the input's size), and
//! `write_boot_structures`, on 4..32 MiB of guest memory.
//!
//! Beyond "no panic", each result is checked against what the functions
//! promise: the kernel's reserved area ends below `low_end` and covers
//! `max(load, pref_address) + init_size` without wrapping; an initrd
//! placement is page-aligned, above the kernel's reserved area, below
//! `low_end` and below `initrd_addr_max`.

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
    pub cmdline: Text<4096>,
}

/// The setup header fields the loader looks at.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub setup_sects: u8,
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
    put(&mut img, 0x1f1, &[h.setup_sects]);
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
    let total = match input.payload {
        Payload::Len(v) => setup_len as u64 + u64::from(v) % MAX_PAYLOAD,
        Payload::Truncated(v) => u64::from(v) % 0x1_0000,
    };
    img.truncate(total.min(img.len() as u64) as usize);
    if img.len() > setup_len {
        // A recognisable start of the protected-mode code.
        put(&mut img, setup_len, b"\x0f\x01\xd9kickvm-fuzz");
    }
    (img, total)
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

/// Runs one input; panics on any violation.
pub fn run(input: &BzInput) {
    checks::log_begin();
    static KERNEL: std::sync::OnceLock<(i32, String)> = std::sync::OnceLock::new();
    static INITRD: std::sync::OnceLock<(i32, String)> = std::sync::OnceLock::new();

    let mem_size = (4 + u64::from(input.mem_mib % 29)) << 20;
    let mem = kickvm_virtio::GuestMemory::from_ranges(&[(GuestAddress(0), mem_size as usize)])
        .expect("fuzz guest memory");
    // What vm::run passes: RAM below the 32-bit gap, and all of RAM.
    let low_end = mem_size.min(kickvm::layout::MEM_32BIT_GAP_START);

    let (head, total) = image(input);
    let (mut f, kpath) = memfd(c"kickvm-fuzz-kernel", &KERNEL);
    f.set_len(0).expect("truncate kernel memfd");
    f.write_all(&head).expect("write kernel memfd");
    f.set_len(total).expect("size kernel memfd");
    drop(f);

    let k = match boot::load_kernel(&mem, kpath.as_ref(), low_end) {
        Ok(k) => k,
        Err(e) => {
            one_line(&e.to_string());
            checks::log_end();
            return;
        }
    };
    let hdr = k.header;
    assert!(k.reserved_end <= low_end, "kernel reserved area ends at {:#x}, past RAM ({low_end:#x})", k.reserved_end);
    let load = k.entry.checked_sub(0x200).expect("entry below 0x200");
    let want_end = u128::from(load.max(hdr.pref_address)) + u128::from(hdr.init_size);
    assert!(
        u128::from(k.reserved_end) >= want_end,
        "kernel reserved area ends at {:#x}, but the kernel may run at {:#x} and needs {:#x} bytes there",
        k.reserved_end,
        load.max(hdr.pref_address),
        { hdr.init_size }
    );

    let check_place = |size: u64, addr: u64| {
        let max = match hdr.initrd_addr_max {
            0 => 0x37ff_ffff,
            m => u64::from(m),
        };
        assert_eq!(addr % 4096, 0, "initrd at {addr:#x} is not page-aligned");
        assert!(addr >= k.reserved_end, "initrd at {addr:#x} overlaps the kernel (reserved to {:#x})", k.reserved_end);
        let end = u128::from(addr) + u128::from(size);
        assert!(end <= u128::from(low_end), "initrd {addr:#x}+{size:#x} ends past RAM ({low_end:#x})");
        assert!(end <= u128::from(max) + 1, "initrd {addr:#x}+{size:#x} ends past initrd_addr_max {max:#x}");
    };
    for s in input.probes.iter().take(64) {
        let size = s.get();
        if let Some(addr) = boot::initrd_placement(size, low_end, &k) {
            check_place(size, addr);
        }
    }

    let mut initrd = None;
    if let Some(s) = input.initrd {
        let size = s.get().min(i64::MAX as u64);
        let (f, ipath) = memfd(c"kickvm-fuzz-initrd", &INITRD);
        f.set_len(0).expect("truncate initrd memfd");
        f.set_len(size).expect("size initrd memfd");
        drop(f);
        match boot::load_initrd(&mem, ipath.as_ref(), low_end, &k) {
            Ok((addr, sz)) => {
                assert_eq!(sz, size, "initrd size");
                check_place(sz, addr);
                initrd = Some((addr, sz));
            }
            Err(e) => one_line(&e.to_string()),
        }
    }

    let cmdline = input.cmdline.lossy();
    if let Err(e) = boot::write_boot_structures(&mem, &k, &cmdline, initrd, mem_size) {
        one_line(&e.to_string());
    }
    checks::log_end();
}

/// Strict: an error the user sees is one line.
fn one_line(msg: &str) {
    if checks::strict() {
        assert!(!msg.contains('\n'), "error message is not one line: {msg:?}");
    }
}
