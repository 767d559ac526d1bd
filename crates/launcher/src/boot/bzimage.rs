//! Reading a bzImage's setup header (x86 boot protocol, `Documentation/
//! arch/x86/boot.rst`) and deciding, before anything is loaded, whether
//! and where the kernel can run.
//!
//! The user may pass any file as `--kernel`, so every header field is
//! treated as hostile input: sizes and addresses are combined with checked
//! arithmetic only, and a header that would place the kernel outside the
//! memory it can use is refused with a sentence, never wrapped around.
//! Written here rather than taken from `linux-loader`'s `BzImage`, which
//! loads without looking at `pref_address`, `init_size` or
//! `kernel_alignment`.

use linux_loader::loader::bootparam::setup_header;
use vm_memory::ByteValued;

use crate::layout;

/// Where the setup header starts in the file (and in the zero page).
pub const HEADER_START: usize = 0x1f1;
/// Bytes of the file that hold the boot sector and the setup header.
pub const HEADER_END: usize = HEADER_START + std::mem::size_of::<setup_header>();
/// The 64-bit entry point is this far into the protected-mode part.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// The boot vCPU's page tables identity-map the first GiB
/// ([`super::paging`]); the 64-bit entry point needs everything it touches
/// before it builds its own tables — the loaded image, the area it
/// decompresses into — mapped there.
pub const IDENTITY_MAPPED_END: u64 = 1 << 30;

const BOOT_FLAG: u16 = 0xaa55;
const HDRS: u32 = 0x5372_6448;
/// Boot protocol 2.12: the first with a 64-bit entry point (`xloadflags`).
const MIN_VERSION: u16 = 0x020c;
const LOADED_HIGH: u8 = 1 << 0;
const XLF_KERNEL_64: u16 = 1 << 0;
/// A sector of the real-mode setup code.
const SECTOR: u64 = 512;
/// `setup_sects == 0` means 4, for very old kernels.
const DEFAULT_SETUP_SECTS: u64 = 4;

/// Why a file is not a bzImage kickvm can boot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("is empty; kickvm boots a bzImage such as /boot/vmlinuz-* or an ELF vmlinux with a PVH entry point")]
    Empty,
    #[error("is not a bzImage (only {0} bytes, too short for a setup header); kickvm boots a bzImage such as /boot/vmlinuz-* or an ELF vmlinux with a PVH entry point")]
    TooShort(u64),
    #[error("is not a bzImage (no \"HdrS\" setup header); kickvm boots a bzImage such as /boot/vmlinuz-* or an ELF vmlinux with a PVH entry point")]
    NoHeader,
    #[error("has no 64-bit entry point (boot protocol {major}.{minor:02} found; 2.12+ with XLF_KERNEL_64 needed)", major = .0 >> 8, minor = .0 & 0xff)]
    No64BitEntry(u16),
    #[error("is a zImage that loads below 1 MiB; kickvm boots bzImage kernels")]
    NotLoadedHigh,
    #[error("is truncated: its header says the setup code takes {setup} bytes, and the file has {len}")]
    TruncatedSetup { setup: u64, len: u64 },
    #[error("is truncated: its header says the kernel proper is {want} bytes, and the file has {have} after the setup code")]
    TruncatedKernel { want: u64, have: u64 },
    #[error("is {} MiB; the kernel proper of a bzImage must fit below 1 GiB (is this a kernel?)", .0 >> 20)]
    TooLarge(u64),
    #[error("has a corrupt header: kernel_alignment {0:#x} of a relocatable kernel is not a power of two")]
    BadAlignment(u32),
    #[error("has a corrupt header: init_size is 0")]
    NoInitSize,
    #[error("has a corrupt header: it asks to run at {0:#x}, below 1 MiB where the boot structures are")]
    RunsTooLow(u64),
    #[error("has a corrupt header: pref_address {pref:#x} + init_size {init:#x} runs past the end of the address space")]
    Overflow { pref: u64, init: u32 },
    #[error("cannot start: it needs {start:#x}..{end:#x} identity-mapped at its 64-bit entry, beyond the first GiB kickvm maps (corrupt header?)")]
    BeyondIdentityMap { start: u64, end: u64 },
}

/// A bzImage whose header was found sound, and the memory it needs.
#[derive(Debug, Clone, Copy)]
pub struct KernelImage {
    /// The setup header, to be copied into the zero page.
    pub header: setup_header,
    /// Where the protected-mode part starts in the file, and its length:
    /// what is loaded at [`layout::HIGH_RAM_START`].
    pub payload_offset: u64,
    pub payload_len: u64,
    /// The 64-bit entry point (RIP of the boot vCPU).
    pub entry: u64,
    /// Where the kernel decompresses itself and runs.
    pub run_at: u64,
    /// End of everything the kernel uses while it starts (the loaded image
    /// and `[run_at, run_at + init_size)`): nothing else may be placed
    /// between 1 MiB and here.
    pub reserved_end: u64,
}

impl KernelImage {
    /// Checks the header in `head` (the file's first [`HEADER_END`] bytes,
    /// or all of a shorter file) of a file of `file_len` bytes.
    pub fn parse(head: &[u8], file_len: u64) -> Result<KernelImage, ImageError> {
        if file_len == 0 {
            return Err(ImageError::Empty);
        }
        let Some(bytes) = head.get(HEADER_START..HEADER_END) else {
            return Err(ImageError::TooShort(file_len));
        };
        let header = *setup_header::from_slice(bytes).ok_or(ImageError::TooShort(file_len))?;
        // Copies of the packed fields, to use them freely.
        let (boot_flag, magic, version) = (header.boot_flag, header.header, header.version);
        if boot_flag != BOOT_FLAG || magic != HDRS {
            return Err(ImageError::NoHeader);
        }
        if version < MIN_VERSION || header.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(ImageError::No64BitEntry(version));
        }
        if header.loadflags & LOADED_HIGH == 0 {
            return Err(ImageError::NotLoadedHigh);
        }

        // The real-mode part: the boot sector and `setup_sects` sectors
        // (at most 256 · 512 bytes, no overflow possible).
        let sects = match u64::from(header.setup_sects) {
            0 => DEFAULT_SETUP_SECTS,
            n => n,
        };
        let setup = (sects + 1) * SECTOR;
        // The protected-mode part must at least reach the 64-bit entry.
        let payload_len = match file_len.checked_sub(setup) {
            Some(n) if n > ENTRY_64_OFFSET => n,
            _ => return Err(ImageError::TruncatedSetup { setup, len: file_len }),
        };
        // `syssize` counts 16-byte paragraphs of the protected-mode part; a
        // file shorter than that was cut off (padding after it is fine, and
        // so is a last paragraph the file does not fill).
        let want = u64::from(header.syssize) * 16;
        if want > payload_len.saturating_add(15) {
            return Err(ImageError::TruncatedKernel { want, have: payload_len });
        }

        let load = layout::HIGH_RAM_START;
        let load_end = load.saturating_add(payload_len);
        if load_end > IDENTITY_MAPPED_END {
            return Err(ImageError::TooLarge(file_len));
        }
        let run_at = run_address(&header, load)?;
        let init_size = header.init_size;
        if init_size == 0 {
            return Err(ImageError::NoInitSize);
        }
        let run_end = run_at
            .checked_add(u64::from(init_size))
            .ok_or(ImageError::Overflow { pref: header.pref_address, init: init_size })?;
        let reserved_end = run_end.max(load_end);
        if reserved_end > IDENTITY_MAPPED_END {
            return Err(ImageError::BeyondIdentityMap { start: load.min(run_at), end: reserved_end });
        }
        Ok(KernelImage {
            header,
            payload_offset: setup,
            payload_len,
            entry: load + ENTRY_64_OFFSET,
            run_at,
            reserved_end,
        })
    }

    /// The longest command line the kernel takes (without the NUL).
    pub fn cmdline_max(&self) -> usize {
        let size = self.header.cmdline_size;
        // Protocol 2.06+ always says; 255 is the old fixed limit.
        let max = if size == 0 { 255 } else { usize::try_from(size).unwrap_or(usize::MAX) };
        max.min(layout::CMDLINE_MAX_SIZE - 1)
    }
}

/// Where the 64-bit entry code decompresses and runs the kernel: a
/// relocatable kernel at the load address rounded up to its alignment but
/// not below `pref_address`; any other at `pref_address` (the
/// `LOAD_PHYSICAL_ADDR` it was linked for). This is the computation at the
/// start of `arch/x86/boot/compressed/head_64.S`.
fn run_address(header: &setup_header, load: u64) -> Result<u64, ImageError> {
    let pref = header.pref_address;
    let run_at = if header.relocatable_kernel != 0 {
        let align = header.kernel_alignment;
        if !align.is_power_of_two() {
            return Err(ImageError::BadAlignment(align));
        }
        // Both below 2^33: no overflow.
        load.next_multiple_of(u64::from(align)).max(pref)
    } else {
        pref
    };
    if run_at < layout::HIGH_RAM_START {
        return Err(ImageError::RunsTooLow(run_at));
    }
    Ok(run_at)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal header that parses: boot protocol 2.12, 64-bit entry,
    /// one setup sector, 1 MiB init_size at 1 MiB, and `payload` bytes of
    /// kernel. Tests change fields with [`put`].
    pub(crate) fn image(payload: usize) -> Vec<u8> {
        let mut img = vec![0u8; 1024 + payload];
        put(&mut img, 0x1f1, &[1]);
        put(&mut img, 0x1fe, &BOOT_FLAG.to_le_bytes());
        put(&mut img, 0x202, &HDRS.to_le_bytes());
        put(&mut img, 0x206, &0x020cu16.to_le_bytes());
        put(&mut img, 0x211, &[LOADED_HIGH]);
        put(&mut img, 0x236, &XLF_KERNEL_64.to_le_bytes());
        put(&mut img, 0x238, &2047u32.to_le_bytes());
        put(&mut img, 0x258, &0x10_0000u64.to_le_bytes());
        put(&mut img, 0x260, &0x10_0000u32.to_le_bytes());
        img
    }

    pub(crate) fn put(img: &mut [u8], off: usize, bytes: &[u8]) {
        img[off..off + bytes.len()].copy_from_slice(bytes);
    }

    fn parse(img: &[u8]) -> Result<KernelImage, ImageError> {
        KernelImage::parse(&img[..img.len().min(HEADER_END)], img.len() as u64)
    }

    #[test]
    fn a_sound_header_parses() {
        let k = parse(&image(0x1000)).unwrap();
        assert_eq!((k.payload_offset, k.payload_len), (1024, 0x1000));
        assert_eq!(k.entry, 0x10_0200);
        assert_eq!((k.run_at, k.reserved_end), (0x10_0000, 0x20_0000));
        assert_eq!(k.cmdline_max(), 2047);
    }

    #[test]
    fn files_too_short_or_without_a_header_are_refused() {
        assert_eq!(KernelImage::parse(&[], 0).unwrap_err(), ImageError::Empty);
        assert_eq!(KernelImage::parse(b"tiny", 4).unwrap_err(), ImageError::TooShort(4));
        let img = image(0x1000);
        assert_eq!(parse(&img[..HEADER_END - 1]).unwrap_err(), ImageError::TooShort(HEADER_END as u64 - 1));
        let mut bad = img.clone();
        put(&mut bad, 0x202, b"HdrZ");
        assert_eq!(parse(&bad).unwrap_err(), ImageError::NoHeader);
        let mut bad = img.clone();
        put(&mut bad, 0x1fe, &[0, 0]);
        assert_eq!(parse(&bad).unwrap_err(), ImageError::NoHeader);
        let mut bad = img.clone();
        put(&mut bad, 0x206, &0x020bu16.to_le_bytes());
        assert!(parse(&bad).unwrap_err().to_string().contains("2.11 found"));
        let mut bad = img.clone();
        put(&mut bad, 0x236, &[0, 0]);
        assert_eq!(parse(&bad).unwrap_err(), ImageError::No64BitEntry(0x020c));
        let mut bad = img;
        put(&mut bad, 0x211, &[0]);
        assert_eq!(parse(&bad).unwrap_err(), ImageError::NotLoadedHigh);
    }

    #[test]
    fn setup_sects_zero_and_255() {
        // 0 means 4 sectors: the payload starts at 5 · 512.
        let mut img = image(0x1000);
        put(&mut img, 0x1f1, &[0]);
        let k = parse(&img).unwrap();
        assert_eq!((k.payload_offset, k.payload_len), (2560, 1024 + 0x1000 - 2560));
        // 255 sectors: 128 KiB of setup code that this file does not have.
        put(&mut img, 0x1f1, &[255]);
        assert_eq!(parse(&img).unwrap_err(), ImageError::TruncatedSetup { setup: 256 * 512, len: 1024 + 0x1000 });
        let mut big = image(256 * 512);
        put(&mut big, 0x1f1, &[255]);
        let k = parse(&big).unwrap();
        assert_eq!((k.payload_offset, k.payload_len), (256 * 512, 1024));
        // A payload that does not reach the 64-bit entry.
        let img = image(0x200);
        assert!(matches!(parse(&img).unwrap_err(), ImageError::TruncatedSetup { .. }));
    }

    #[test]
    fn truncated_kernel_is_refused() {
        let mut img = image(0x1008);
        put(&mut img, 0x1f4, &(0x1000u32 / 16).to_le_bytes());
        parse(&img).unwrap();
        // A last paragraph the file does not fill: accepted.
        put(&mut img, 0x1f4, &(0x1010u32 / 16).to_le_bytes());
        parse(&img).unwrap();
        put(&mut img, 0x1f4, &(0x1020u32 / 16).to_le_bytes());
        assert_eq!(parse(&img).unwrap_err(), ImageError::TruncatedKernel { want: 0x1020, have: 0x1008 });
        put(&mut img, 0x1f4, &u32::MAX.to_le_bytes());
        assert!(matches!(parse(&img).unwrap_err(), ImageError::TruncatedKernel { .. }));
    }

    #[test]
    fn pref_address_near_the_top_of_the_address_space_is_refused() {
        for pref in [u64::MAX, u64::MAX - 0xfffff, u64::MAX - 0x1000] {
            let mut img = image(0x1000);
            put(&mut img, 0x258, &pref.to_le_bytes());
            assert_eq!(parse(&img).unwrap_err(), ImageError::Overflow { pref, init: 0x10_0000 }, "{pref:#x}");
        }
        // Fits in 64 bits but not in the identity map (nor in any guest).
        let mut img = image(0x1000);
        put(&mut img, 0x258, &(u64::MAX - 0x20_0000).to_le_bytes());
        assert!(matches!(parse(&img).unwrap_err(), ImageError::BeyondIdentityMap { .. }));
        // A relocatable kernel takes the larger of both.
        put(&mut img, 0x234, &[1]);
        put(&mut img, 0x230, &0x20_0000u32.to_le_bytes());
        assert!(matches!(parse(&img).unwrap_err(), ImageError::BeyondIdentityMap { .. }));
        put(&mut img, 0x258, &0x100_0000u64.to_le_bytes());
        let k = parse(&img).unwrap();
        assert_eq!((k.run_at, k.reserved_end), (0x100_0000, 0x110_0000));
    }

    #[test]
    fn huge_init_size_and_odd_alignments_are_refused() {
        let mut img = image(0x1000);
        put(&mut img, 0x260, &u32::MAX.to_le_bytes());
        assert_eq!(
            parse(&img).unwrap_err(),
            ImageError::BeyondIdentityMap { start: 0x10_0000, end: 0x10_0000 + u64::from(u32::MAX) }
        );
        put(&mut img, 0x260, &0u32.to_le_bytes());
        assert_eq!(parse(&img).unwrap_err(), ImageError::NoInitSize);
        put(&mut img, 0x260, &0x10_0000u32.to_le_bytes());
        put(&mut img, 0x234, &[1]);
        for align in [0u32, 3, 0x30_0000, u32::MAX] {
            put(&mut img, 0x230, &align.to_le_bytes());
            assert_eq!(parse(&img).unwrap_err(), ImageError::BadAlignment(align));
        }
        // The largest power of two: run at 2 GiB, beyond the identity map.
        put(&mut img, 0x230, &(1u32 << 31).to_le_bytes());
        assert!(matches!(parse(&img).unwrap_err(), ImageError::BeyondIdentityMap { start: 0x10_0000, .. }));
        put(&mut img, 0x230, &0x20_0000u32.to_le_bytes());
        assert_eq!(parse(&img).unwrap().run_at, 0x20_0000);
    }

    #[test]
    fn a_file_too_large_to_be_a_kernel_is_refused() {
        let img = image(0x1000);
        let len = 2u64 << 30;
        assert_eq!(KernelImage::parse(&img[..HEADER_END], len).unwrap_err(), ImageError::TooLarge(len));
        assert!(KernelImage::parse(&img[..HEADER_END], u64::MAX).is_err());
    }

    #[test]
    fn a_kernel_linked_below_1_mib_is_refused() {
        let mut img = image(0x1000);
        put(&mut img, 0x258, &0x8000u64.to_le_bytes());
        assert_eq!(parse(&img).unwrap_err(), ImageError::RunsTooLow(0x8000));
    }

    #[test]
    fn cmdline_size_is_bounded() {
        let mut img = image(0x1000);
        put(&mut img, 0x238, &0u32.to_le_bytes());
        assert_eq!(parse(&img).unwrap().cmdline_max(), 255);
        put(&mut img, 0x238, &u32::MAX.to_le_bytes());
        assert_eq!(parse(&img).unwrap().cmdline_max(), layout::CMDLINE_MAX_SIZE - 1);
    }

    #[test]
    fn any_header_bytes_parse_or_fail_without_panicking() {
        // Every field set to every extreme in turn, and random bytes.
        let base = image(0x2000);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut img = base.clone();
            let off = HEADER_START + (x as usize % (HEADER_END - HEADER_START));
            let v = [0u8, 0xff, 0x80, 1][(x >> 32) as usize % 4];
            let len = 1 + (x >> 40) as usize % 8;
            for b in img.iter_mut().skip(off).take(len) {
                *b = v ^ (x >> 48) as u8;
            }
            let cut = if x & 1 == 0 { img.len() } else { (x >> 20) as usize % img.len() };
            if let Ok(k) = parse(&img[..cut]) {
                assert!(k.reserved_end <= IDENTITY_MAPPED_END);
                assert!(k.payload_offset + k.payload_len == cut as u64);
                assert!(k.run_at >= layout::HIGH_RAM_START);
            }
        }
    }
}
