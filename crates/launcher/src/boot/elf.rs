//! Reading an uncompressed ELF `vmlinux` and deciding, before anything is
//! loaded, where its segments go and where it starts: the PVH entry point
//! its `XEN_ELFNOTE_PHYS32_ENTRY` note names (32-bit protected mode,
//! paging off, `%ebx` pointing at an `hvm_start_info`; see [`super::pvh`]).
//! Booting the vmlinux skips the decompressor a bzImage runs in the guest.
//!
//! The user may pass any file as `--kernel`, so every field is hostile
//! input, as in [`super::bzimage`]: a truncated file, segments that
//! overlap, lie below the boot structures, outside the RAM below the PCI
//! hole, or whose `p_memsz` wraps around are refused with a sentence.
//! Written here rather than taken from `linux-loader`'s `Elf`, which loads
//! segments as it reads their headers (a bad later header leaves a
//! half-loaded guest), does not check overlaps, `p_filesz > p_memsz` or
//! where the entry point is, and says only "Unable to read kernel image".
//! The ELF structures and their byte layout are linux-loader's.

use linux_loader::elf::{Elf64_Ehdr, Elf64_Nhdr, Elf64_Phdr, ELFCLASS64, ELFDATA2LSB, EM_X86_64, ET_EXEC, PT_LOAD, PT_NOTE};
use vm_memory::ByteValued;

use crate::layout;

pub const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// A vmlinux has a handful of program headers; more is not a kernel, and
/// the bound keeps the headers read small.
pub const MAX_PHDRS: u16 = 64;
/// Notes a PVH entry point is looked for in: a vmlinux's are a few hundred
/// bytes. Bounds what a crafted note segment makes the launcher read.
pub const MAX_NOTES_LEN: u64 = 64 << 10;
/// `XEN_ELFNOTE_PHYS32_ENTRY` (Xen's `include/public/elfnote.h`): the
/// 32-bit physical address of the PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const XEN_NOTE_NAME: &[u8] = b"Xen\0";
/// Linux's `COMMAND_LINE_SIZE` on x86, less the NUL.
const CMDLINE_MAX: usize = 2047;

/// Why a file is not an ELF kernel kickvm can boot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("is an ELF file of {0} bytes, too short for an ELF header")]
    TooShort(u64),
    #[error("is an ELF file but not a 64-bit little-endian x86-64 one (class {class}, data {data}, machine {machine}); kickvm boots x86-64 kernels")]
    NotX86_64 { class: u8, data: u8, machine: u16 },
    #[error("is an ELF file of type {0} but not an executable (a vmlinux is type 2, ET_EXEC)")]
    NotExecutable(u16),
    #[error("has a corrupt ELF header: program header entries of {0} bytes (56 expected)")]
    PhdrSize(u16),
    #[error("has {0} program headers, more than the {MAX_PHDRS} a kernel could have (is this a kernel?)")]
    TooManyPhdrs(u16),
    #[error("is truncated: its program headers end at byte {end:#x} and the file has {len:#x} bytes")]
    PhdrsBeyondEof { end: u64, len: u64 },
    #[error("has no loadable segment (is this a kernel?)")]
    NoLoadSegment,
    #[error("is truncated: segment {index} needs the file's bytes up to {end:#x} and the file has {len:#x}")]
    SegmentBeyondEof { index: usize, end: u64, len: u64 },
    #[error("has a corrupt segment {index}: {filesz:#x} bytes in the file but only {memsz:#x} in memory")]
    FileszOverMemsz { index: usize, filesz: u64, memsz: u64 },
    #[error("has segment {index} at {addr:#x}, below 1 MiB where the boot structures are")]
    SegmentTooLow { index: usize, addr: u64 },
    #[error("has segment {index} at {addr:#x} of {memsz:#x} bytes, which does not end below {limit:#x}: a kernel entered through PVH loads in the RAM below the PCI hole (corrupt header?)", limit = layout::MEM_32BIT_GAP_START)]
    SegmentTooHigh { index: usize, addr: u64, memsz: u64 },
    #[error("has segments {0} and {1} overlapping in guest memory (corrupt header?)")]
    Overlap(usize, usize),
    #[error("has a corrupt note segment {index}: {what}")]
    BadNote { index: usize, what: &'static str },
    #[error("has no PVH entry point (no XEN_ELFNOTE_PHYS32_ENTRY note): boot a kernel built with CONFIG_PVH=y, or its bzImage")]
    NoPvhEntry,
    #[error("has its PVH entry point at {0:#x}, outside every segment it loads (corrupt note?)")]
    EntryOutside(u64),
    #[error("cannot be read: {0}")]
    Read(String),
}

/// Reads at an offset: a file (`pread`), or bytes in memory (tests, fuzz).
pub trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// One loadable segment: `file_len` bytes from `offset` in the file go to
/// guest-physical `addr`; the rest up to `mem_len` is zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub file_len: u64,
    pub addr: u64,
    pub mem_len: u64,
}

/// An ELF kernel whose headers were found sound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfKernel {
    /// Sorted by address, not overlapping, all in `[1 MiB, 3 GiB)`.
    pub segments: Vec<Segment>,
    /// The PVH entry point (EIP of the boot vCPU, paging off).
    pub entry: u64,
    /// One past the highest byte a segment occupies.
    pub reserved_end: u64,
}

fn read<T: ByteValued + Default>(f: &(impl ReadAt + ?Sized), offset: u64) -> Result<T, ElfError> {
    let mut v = T::default();
    f.read_exact_at(v.as_mut_slice(), offset).map_err(|e| ElfError::Read(e.to_string()))?;
    Ok(v)
}

/// What an ELF kernel's headers say, checked: where its segments go. Its
/// PVH entry point is not looked for yet: when the kernel is decompressed
/// on the host, the note that names it is at hand only once the segments
/// are loaded ([`super::unpack`]).
#[derive(Debug, Clone)]
pub struct ElfLayout {
    /// Sorted by address, not overlapping, all in `[1 MiB, 3 GiB)`.
    pub segments: Vec<Segment>,
    /// One past the highest byte a segment occupies.
    pub reserved_end: u64,
    /// The note segments' headers, in file order, with their indices.
    notes: Vec<(usize, Elf64_Phdr)>,
    file_len: u64,
}

impl ElfLayout {
    /// Checks the ELF header and program headers of the ELF file `f` of
    /// `file_len` bytes (only its first bytes are read); loads nothing.
    pub fn parse(f: &(impl ReadAt + ?Sized), file_len: u64) -> Result<ElfLayout, ElfError> {
        let ehdr_len = std::mem::size_of::<Elf64_Ehdr>() as u64;
        if file_len < ehdr_len {
            return Err(ElfError::TooShort(file_len));
        }
        let ehdr: Elf64_Ehdr = read(f, 0)?;
        let (class, data, machine) = (ehdr.e_ident[4], ehdr.e_ident[5], ehdr.e_machine);
        if ehdr.e_ident[..4] != ELF_MAGIC[..] || class != ELFCLASS64 || data != ELFDATA2LSB || machine != EM_X86_64 {
            return Err(ElfError::NotX86_64 { class, data, machine });
        }
        if ehdr.e_type != ET_EXEC {
            return Err(ElfError::NotExecutable(ehdr.e_type));
        }
        let phdr_len = std::mem::size_of::<Elf64_Phdr>() as u64;
        if u64::from(ehdr.e_phentsize) != phdr_len {
            return Err(ElfError::PhdrSize(ehdr.e_phentsize));
        }
        if ehdr.e_phnum > MAX_PHDRS {
            return Err(ElfError::TooManyPhdrs(ehdr.e_phnum));
        }
        // At most 64 · 56 bytes past e_phoff: only e_phoff can overflow.
        let phdrs_end = ehdr.e_phoff.saturating_add(u64::from(ehdr.e_phnum) * phdr_len);
        if phdrs_end > file_len {
            return Err(ElfError::PhdrsBeyondEof { end: phdrs_end, len: file_len });
        }

        let mut segments: Vec<(usize, Segment)> = Vec::new();
        let mut notes = Vec::new();
        for index in 0..usize::from(ehdr.e_phnum) {
            let p: Elf64_Phdr = read(f, ehdr.e_phoff + index as u64 * phdr_len)?;
            match p.p_type {
                PT_LOAD if p.p_memsz > 0 => segments.push((index, check_segment(index, &p, file_len)?)),
                PT_NOTE => notes.push((index, p)),
                _ => {}
            }
        }
        if segments.is_empty() {
            return Err(ElfError::NoLoadSegment);
        }
        segments.sort_by_key(|(_, s)| s.addr);
        for w in segments.windows(2) {
            let ((a, first), (b, second)) = (w[0], w[1]);
            // Both end below 3 GiB: no overflow.
            if first.addr + first.mem_len > second.addr {
                return Err(ElfError::Overlap(a.min(b), a.max(b)));
            }
        }
        let reserved_end = segments.iter().map(|(_, s)| s.addr + s.mem_len).max().unwrap_or(0);
        Ok(ElfLayout { segments: segments.into_iter().map(|(_, s)| s).collect(), reserved_end, notes, file_len })
    }

    /// Finds the PVH entry point in the note segments of `f` (the same
    /// file, or a view of it) and checks it: the kernel, ready to load.
    pub fn entry(self, f: &(impl ReadAt + ?Sized)) -> Result<ElfKernel, ElfError> {
        let mut entry = None;
        for (index, p) in &self.notes {
            entry = pvh_entry(f, *index, p, self.file_len)?;
            if entry.is_some() {
                break;
            }
        }
        let entry = entry.ok_or(ElfError::NoPvhEntry)?;
        // The first instruction must come from the file, not from zeroes.
        if !self.segments.iter().any(|s| entry >= s.addr && entry < s.addr + s.file_len) {
            return Err(ElfError::EntryOutside(entry));
        }
        Ok(ElfKernel { segments: self.segments, entry, reserved_end: self.reserved_end })
    }
}

impl ElfKernel {
    /// Checks the ELF file `f` of `file_len` bytes. Reads the ELF header,
    /// the program headers and the note segments (bounded); loads nothing.
    pub fn parse(f: &(impl ReadAt + ?Sized), file_len: u64) -> Result<ElfKernel, ElfError> {
        ElfLayout::parse(f, file_len)?.entry(f)
    }

    /// The longest command line the kernel takes (without the NUL).
    pub fn cmdline_max(&self) -> usize {
        CMDLINE_MAX
    }
}

/// A `PT_LOAD` header, checked: its file bytes exist, it fits in memory
/// between the boot structures and the PCI hole.
fn check_segment(index: usize, p: &Elf64_Phdr, file_len: u64) -> Result<Segment, ElfError> {
    let (offset, filesz, addr, memsz) = (p.p_offset, p.p_filesz, p.p_paddr, p.p_memsz);
    match offset.checked_add(filesz) {
        Some(end) if end <= file_len => {}
        end => return Err(ElfError::SegmentBeyondEof { index, end: end.unwrap_or(u64::MAX), len: file_len }),
    }
    if filesz > memsz {
        return Err(ElfError::FileszOverMemsz { index, filesz, memsz });
    }
    if addr < layout::HIGH_RAM_START {
        return Err(ElfError::SegmentTooLow { index, addr });
    }
    if addr.checked_add(memsz).is_none_or(|end| end > layout::MEM_32BIT_GAP_START) {
        return Err(ElfError::SegmentTooHigh { index, addr, memsz });
    }
    Ok(Segment { offset, file_len: filesz, addr, mem_len: memsz })
}

/// Walks the notes of `PT_NOTE` segment `index`; returns the PVH entry
/// point if one of them is `XEN_ELFNOTE_PHYS32_ENTRY`.
fn pvh_entry(f: &(impl ReadAt + ?Sized), index: usize, p: &Elf64_Phdr, file_len: u64) -> Result<Option<u64>, ElfError> {
    let bad = |what| ElfError::BadNote { index, what };
    let end = match p.p_offset.checked_add(p.p_filesz) {
        Some(end) if end <= file_len => end,
        _ => return Err(bad("it lies beyond the end of the file")),
    };
    if p.p_filesz > MAX_NOTES_LEN {
        return Err(bad("it is larger than the 64 KiB of notes a kernel has"));
    }
    // Notes are 4-byte aligned, or 8 in a segment that says so.
    let align = if p.p_align == 8 { 8 } else { 4 };
    let nhdr_len = std::mem::size_of::<Elf64_Nhdr>() as u64;
    let mut at = p.p_offset;
    while at < end {
        if end - at < nhdr_len {
            return Err(bad("a note header is cut off"));
        }
        let n: Elf64_Nhdr = read(f, at)?;
        // Each at most 4 GiB + 7: no overflow below `end` ≤ 2^64 - 2^33.
        let name_len = u64::from(n.n_namesz).next_multiple_of(align);
        let desc_len = u64::from(n.n_descsz).next_multiple_of(align);
        let name_at = at + nhdr_len;
        let desc_at = name_at.saturating_add(name_len);
        let next = desc_at.saturating_add(desc_len);
        if next > end.next_multiple_of(align) {
            return Err(bad("a note runs past the end of its segment"));
        }
        if n.n_type == XEN_ELFNOTE_PHYS32_ENTRY && n.n_namesz as usize == XEN_NOTE_NAME.len() {
            let mut name = [0u8; 4];
            f.read_exact_at(&mut name, name_at).map_err(|e| ElfError::Read(e.to_string()))?;
            if name == XEN_NOTE_NAME {
                // The entry is a 32-bit physical address (a wider
                // descriptor holds it in its low bytes).
                if n.n_descsz < 4 || desc_at + 4 > end {
                    return Err(bad("its PVH entry note is shorter than 4 bytes"));
                }
                let entry: u32 = read(f, desc_at)?;
                return Ok(Some(u64::from(entry)));
            }
        }
        at = next;
    }
    Ok(None)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const ENTRY: u64 = 0x100_0040;

    /// An ELF vmlinux in miniature: one loadable segment of `code` at
    /// 16 MiB (the PVH entry 0x40 bytes into it), `bss` more bytes of
    /// memory, and a note segment with a non-Xen note before the PVH one.
    pub(crate) fn vmlinux(code: &[u8], bss: u64) -> Vec<u8> {
        let mut notes = Vec::new();
        for (name, kind, desc) in [(&b"GNU\0"[..], 3u32, &[0xaau8; 6][..]), (XEN_NOTE_NAME, 18, &(ENTRY as u32).to_le_bytes()[..])] {
            notes.extend_from_slice(&(name.len() as u32).to_le_bytes());
            notes.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            notes.extend_from_slice(&kind.to_le_bytes());
            notes.extend_from_slice(name);
            notes.resize(notes.len().next_multiple_of(4), 0);
            notes.extend_from_slice(desc);
            notes.resize(notes.len().next_multiple_of(4), 0);
        }
        let phoff = 64u64;
        let text_at = 0x1000u64;
        let mut text = vec![0x90u8; 0x40];
        text.extend_from_slice(code);
        let notes_at = text_at + text.len() as u64;
        let phdrs = [
            Elf64_Phdr { p_type: PT_LOAD, p_offset: text_at, p_paddr: 0x100_0000, p_vaddr: 0xffff_ffff_8100_0000, p_filesz: text.len() as u64, p_memsz: text.len() as u64 + bss, p_align: 0x20_0000, ..Default::default() },
            Elf64_Phdr { p_type: PT_NOTE, p_offset: notes_at, p_filesz: notes.len() as u64, p_align: 4, ..Default::default() },
        ];
        assert_eq!(phoff, 64);
        let mut f = headers(&phdrs);
        f.resize(text_at as usize, 0);
        f.extend_from_slice(&text);
        f.extend_from_slice(&notes);
        f
    }

    /// An x86-64 ELF executable's header, its program headers `phdrs`
    /// right after it.
    pub(crate) fn headers(phdrs: &[Elf64_Phdr]) -> Vec<u8> {
        let ehdr = Elf64_Ehdr {
            e_ident: [0x7f, b'E', b'L', b'F', ELFCLASS64, ELFDATA2LSB, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            e_type: ET_EXEC,
            e_machine: EM_X86_64,
            e_version: 1,
            e_entry: 0x100_0000,
            e_phoff: 64,
            e_ehsize: 64,
            e_phentsize: 56,
            e_phnum: phdrs.len() as u16,
            ..Default::default()
        };
        let mut f = ehdr.as_slice().to_vec();
        for p in phdrs {
            f.extend_from_slice(p.as_slice());
        }
        f
    }

    /// Program header `i` of `img`, changed by `edit`.
    pub(crate) fn edit_phdr(img: &mut [u8], i: usize, edit: impl FnOnce(&mut Elf64_Phdr)) {
        let at = 64 + i * 56;
        let mut p = *Elf64_Phdr::from_slice(&img[at..at + 56]).unwrap();
        edit(&mut p);
        img[at..at + 56].copy_from_slice(p.as_slice());
    }

    fn parse(img: &[u8]) -> Result<ElfKernel, ElfError> {
        ElfKernel::parse(img, img.len() as u64)
    }

    #[test]
    fn a_sound_vmlinux_parses() {
        let k = parse(&vmlinux(&[0xf4], 0x5000)).unwrap();
        assert_eq!(k.entry, ENTRY);
        assert_eq!(k.segments, vec![Segment { offset: 0x1000, file_len: 0x41, addr: 0x100_0000, mem_len: 0x5041 }]);
        assert_eq!(k.reserved_end, 0x100_5041);
    }

    #[test]
    fn short_or_foreign_elf_files_are_refused() {
        let img = vmlinux(&[0xf4], 0);
        assert_eq!(parse(&img[..63]).unwrap_err(), ElfError::TooShort(63));
        let mut bad = img.clone();
        bad[4] = 1; // ELFCLASS32
        assert!(matches!(parse(&bad).unwrap_err(), ElfError::NotX86_64 { class: 1, .. }));
        let mut bad = img.clone();
        bad[18] = 183; // EM_AARCH64
        assert!(parse(&bad).unwrap_err().to_string().contains("machine 183"));
        let mut bad = img.clone();
        bad[16] = 3; // ET_DYN
        assert_eq!(parse(&bad).unwrap_err(), ElfError::NotExecutable(3));
        let mut bad = img.clone();
        bad[54] = 32;
        assert_eq!(parse(&bad).unwrap_err(), ElfError::PhdrSize(32));
        let mut bad = img.clone();
        bad[56..58].copy_from_slice(&65535u16.to_le_bytes());
        assert_eq!(parse(&bad).unwrap_err(), ElfError::TooManyPhdrs(65535));
        let mut bad = img.clone();
        bad[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(parse(&bad).unwrap_err(), ElfError::PhdrsBeyondEof { end: u64::MAX, .. }));
        assert!(matches!(parse(&img[..100]).unwrap_err(), ElfError::PhdrsBeyondEof { end: 176, len: 100 }));
    }

    #[test]
    fn truncated_files_are_refused() {
        let img = vmlinux(&[0xf4; 64], 0);
        // Cut inside the loadable segment (the notes go first).
        let e = parse(&img[..0x1010]).unwrap_err();
        assert!(matches!(e, ElfError::BadNote { index: 1, .. } | ElfError::SegmentBeyondEof { index: 0, .. }), "{e}");
        let mut img2 = img.clone();
        edit_phdr(&mut img2, 0, |p| p.p_offset = u64::MAX - 8);
        assert!(matches!(parse(&img2).unwrap_err(), ElfError::SegmentBeyondEof { index: 0, end: u64::MAX, .. }));
        let mut img2 = img;
        edit_phdr(&mut img2, 0, |p| p.p_filesz += 0x100_0000);
        let e = parse(&img2).unwrap_err();
        assert!(e.to_string().starts_with("is truncated: segment 0 needs the file's bytes up to"), "{e}");
    }

    #[test]
    fn segments_outside_ram_or_overlapping_are_refused() {
        let img = vmlinux(&[0xf4], 0);
        let mut bad = img.clone();
        edit_phdr(&mut bad, 0, |p| p.p_paddr = 0x8000);
        assert_eq!(parse(&bad).unwrap_err(), ElfError::SegmentTooLow { index: 0, addr: 0x8000 });
        for (addr, memsz) in [(0x100_0000, u64::MAX), (u64::MAX - 0x10, 0x41), (0xbfff_fff0, 0x41), (0x100_0000, 1 << 40)] {
            let mut bad = img.clone();
            edit_phdr(&mut bad, 0, |p| (p.p_paddr, p.p_memsz) = (addr, memsz));
            assert!(matches!(parse(&bad).unwrap_err(), ElfError::SegmentTooHigh { index: 0, .. }), "{addr:#x} {memsz:#x}");
        }
        let mut bad = img.clone();
        edit_phdr(&mut bad, 0, |p| p.p_memsz = 0x10);
        assert_eq!(parse(&bad).unwrap_err(), ElfError::FileszOverMemsz { index: 0, filesz: 0x41, memsz: 0x10 });
        // The note header turned into a second load segment overlapping
        // the first: refused whichever comes first in memory.
        for paddr in [0x100_0020u64, 0xff_fff0] {
            let mut bad = img.clone();
            edit_phdr(&mut bad, 1, |p| (p.p_type, p.p_paddr, p.p_memsz) = (PT_LOAD, paddr, 0x30));
            assert_eq!(parse(&bad).unwrap_err(), ElfError::Overlap(0, 1), "{paddr:#x}");
        }
        // Adjacent is fine, but then the PVH note is gone.
        let mut ok = img;
        edit_phdr(&mut ok, 1, |p| (p.p_type, p.p_paddr, p.p_memsz) = (PT_LOAD, 0x100_0041, 0x30));
        assert_eq!(parse(&ok).unwrap_err(), ElfError::NoPvhEntry);
    }

    #[test]
    fn the_pvh_note_is_required_and_checked() {
        let img = vmlinux(&[0xf4], 0);
        let Elf64_Phdr { p_offset: at, p_filesz: len, .. } = *Elf64_Phdr::from_slice(&img[120..176]).unwrap();
        let (at, len) = (at as usize, len as usize);
        // The Xen note follows the GNU one (12 + 4 + 8 bytes); its type.
        let mut bad = img.clone();
        bad[at + 24 + 8] = 17;
        assert_eq!(parse(&bad).unwrap_err(), ElfError::NoPvhEntry);
        // A name of another owner.
        let mut bad = img.clone();
        bad[at + 24 + 12] = b'Y';
        assert_eq!(parse(&bad).unwrap_err(), ElfError::NoPvhEntry);
        // A descriptor too short for an address.
        let mut bad = img.clone();
        bad[at + 24 + 4] = 2;
        assert!(matches!(parse(&bad).unwrap_err(), ElfError::BadNote { index: 1, .. }));
        // A note size that runs past the segment, or wraps.
        for size in [0x1000u32, u32::MAX] {
            let mut bad = img.clone();
            bad[at..at + 4].copy_from_slice(&size.to_le_bytes());
            assert!(matches!(parse(&bad).unwrap_err(), ElfError::BadNote { index: 1, .. }), "{size:#x}");
        }
        // A segment cut in the middle of a header, huge, or past the file.
        for (filesz, offset) in [(len as u64 - 30, at as u64), (1 << 40, at as u64), (len as u64, img.len() as u64 - 4)] {
            let mut bad = img.clone();
            edit_phdr(&mut bad, 1, |p| (p.p_filesz, p.p_offset) = (filesz, offset));
            assert!(matches!(parse(&bad).unwrap_err(), ElfError::BadNote { index: 1, .. }), "{filesz:#x}");
        }
        // An entry point outside what the file loads (in the bss, or past it).
        for entry in [0x100_0041u32, 0x100_2000, 0] {
            let mut bad = vmlinux(&[0xf4], 0x1000);
            bad[at + 24 + 16..at + 24 + 20].copy_from_slice(&entry.to_le_bytes());
            assert_eq!(parse(&bad).unwrap_err(), ElfError::EntryOutside(u64::from(entry)));
        }
    }

    #[test]
    fn any_header_bytes_parse_or_fail_without_panicking() {
        let base = vmlinux(&[0xf4; 32], 0x3000);
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut img = base.clone();
            // Headers, program headers and notes: the bytes parse reads.
            let span = if x & 2 == 0 { 176 } else { img.len() };
            let off = (x as usize >> 8) % span;
            let v = [0u8, 0xff, 0x80, 1][(x >> 32) as usize % 4];
            for b in img.iter_mut().skip(off).take(1 + (x >> 40) as usize % 8) {
                *b = v ^ (x >> 48) as u8;
            }
            let cut = if x & 1 == 0 { img.len() } else { (x >> 20) as usize % img.len() };
            if let Ok(k) = parse(&img[..cut]) {
                for s in &k.segments {
                    assert!(s.addr >= layout::HIGH_RAM_START && s.addr + s.mem_len <= layout::MEM_32BIT_GAP_START);
                    assert!(s.file_len <= s.mem_len && s.offset + s.file_len <= cut as u64);
                }
                for w in k.segments.windows(2) {
                    assert!(w[0].addr + w[0].mem_len <= w[1].addr);
                }
                assert!(k.segments.iter().any(|s| (s.addr..s.addr + s.file_len).contains(&k.entry)));
            }
        }
    }
}
