//! A bzImage decompressed on the host: its compressed kernel (an ELF
//! `vmlinux` in an LZ4 legacy frame, as Debian builds it) is decompressed
//! by the launcher, on several threads, straight into the guest memory its
//! segments run from, and the kernel is entered at its PVH entry point as
//! an ELF kernel is ([`super::elf`], [`super::pvh`]).
//!
//! Against letting the bzImage decompress itself in the guest, this skips
//! the decompressor's own work there — copying the compressed kernel out
//! of its way, decompressing it on one vCPU, moving the segments into
//! place, applying relocations — and the guest memory that work touches
//! (~40 MiB more host RSS with Debian's kernel). The launcher reads the
//! 14 MiB bzImage instead of a 53 MiB vmlinux. What the guest loses is the
//! decompressor's choice of a random physical and virtual address for the
//! kernel image (KASLR of the image; memory-region KASLR stays), exactly as
//! when a vmlinux is booted; `--decompress-in-guest` keeps it.
//!
//! A payload in another compression, or a kernel without a PVH entry
//! point (`CONFIG_PVH=n`), is left to the guest ([`Unpacked::InGuest`]).
//! A corrupt LZ4 frame is an error: the kernel's own decompressor would
//! fail on it too, later and with less to say.

use std::cell::RefCell;
use std::fs::File;

use kickvm_bzimage::{Lz4Index, LZ4_LEGACY_BLOCK, LZ4_LEGACY_MAGIC};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};

use super::elf::{ElfError, ElfLayout, ReadAt, Segment};
use super::{BootError, ElfKernel, KernelImage, Source, PAGE};
use crate::layout;
use kickvm_virtio::GuestMemory;

/// What became of a bzImage's kernel.
pub enum Unpacked {
    /// Decompressed into guest memory, to be entered at its PVH entry;
    /// how long that took, for the log; where the initramfs went if it
    /// was read alongside (address, size).
    Loaded(ElfKernel, String, Option<(u64, u64)>),
    /// Left to the bzImage's own decompressor, for this reason.
    InGuest(String),
}

/// Decompresses the kernel of the bzImage `file` (whose header `image`
/// says where its payload is) into the guest memory below `low_end`.
///
/// The ELF file is decompressed whole and in place: at the guest address
/// `base` where its largest segment's bytes land where that segment runs
/// (with Debian's kernel the text and data segments, 30 of its 45 MiB), each
/// 8 MiB block straight into guest memory on one of several threads. The
/// other segments are then moved into place and the memory this dirtied
/// inside a segment's zero-filled tail is cleared. No buffer the size of
/// the kernel is allocated and nothing is copied twice: in the rig, where
/// every first touch of a page costs ~10 ms per MiB (QEMU TCG zeroing it),
/// what is touched is what the boot costs.
///
/// `initrd` (the file and its size), if given, is read into place on the
/// same threads when it can be told where before the kernel's headers are
/// read ([`Unpacked::Loaded`] says where it went, or that it was not).
pub(super) fn load(
    mem: &GuestMemory,
    file: &File,
    image: &KernelImage,
    low_end: u64,
    path: &str,
    initrd: Option<(&Source, u64)>,
) -> Result<Unpacked, BootError> {
    let t0 = std::time::Instant::now();
    let read_err = |err| BootError::ReadKernel { path: path.to_string(), err };
    let corrupt = |what: String| BootError::Unpack { path: path.to_string(), what };
    let elf_err = |err| BootError::Elf { path: path.to_string(), err };
    // `payload_offset` counts from the protected-mode part; `payload_len`
    // (all of that part) is below 1 GiB, checked by the header's parser.
    let (offset, len) = (u64::from(image.header.payload_offset), u64::from(image.header.payload_length));
    if len < 8 || offset.saturating_add(len) > image.payload_len {
        return Ok(Unpacked::InGuest(format!(
            "its header puts the compressed kernel at {offset:#x}+{len:#x}, outside the image"
        )));
    }
    // The frame is read a block at a time, each into its thread's buffer
    // (below): never all 14 MiB at once, which in the rig cost ~0.2 s of
    // first touches on the loader's critical path.
    let frame_at = image.payload_offset + offset;
    let u32_at = |at: u64| {
        let mut b = [0u8; 4];
        ReadAt::read_exact_at(file, &mut b, frame_at + at).map(|()| u32::from_le_bytes(b))
    };
    let magic = u32_at(0).map_err(read_err)?;
    if magic != LZ4_LEGACY_MAGIC {
        return Ok(Unpacked::InGuest(format!("its compressed kernel is not LZ4 (it starts {:08x})", magic.swap_bytes())));
    }
    let frame = Lz4Index::scan(len, |at| u32_at(at).map_err(|e| format!("could not be read: {e}"))).map_err(corrupt)?;
    let block = |i: usize, out: &mut [u8]| decompress_from_file(file, frame_at, &frame, i, out);
    let read_ms = t0.elapsed().as_secs_f64() * 1e3;

    // Block 0 holds the ELF and program headers, which say where
    // everything goes. The blocks are decompressed before those are read,
    // at `guess`: where the file's start lands if the kernel is laid out
    // as Linux lays it out (its first segment at `pref_address`,
    // `kernel_alignment` into the file), and the file moved if not. When
    // the whole file does not fit there, block 0 goes first, alone, and
    // the others once the headers say where.
    let head_len = frame.block_len(0) as u64;
    let guess = image.header.pref_address.saturating_sub(u64::from(image.header.kernel_alignment));
    let guess = if guess >= layout::HIGH_RAM_START && guess.saturating_add(head_len) <= low_end {
        guess
    } else {
        low_end.saturating_sub(head_len).max(layout::HIGH_RAM_START) & !(PAGE - 1)
    };
    let blocks = frame.blocks.len();
    let all_at_guess = guess.saturating_add(frame.len) <= low_end;
    // The initramfs is read alongside, where it goes under an ELF kernel
    // (the top of RAM below 4 GiB), if that is clear of the file.
    let rd = initrd.filter(|_| all_at_guess).and_then(|(src, size)| {
        let at = super::initrd_below(low_end.min(super::ELF_INITRD_TOP), size)?;
        (at >= guess + frame.len).then_some((src, size, at))
    });
    let rd_pieces = match rd {
        Some((src, size, at)) => src.pieces(0, at, size)?,
        None => Vec::new(),
    };
    let first = if all_at_guess { blocks } else { 1 };
    let mut threads = super::in_parallel(first + rd_pieces.len(), |j| match j.checked_sub(first) {
        None => super::with_guest_bytes(mem, guess + (j * LZ4_LEGACY_BLOCK) as u64, frame.block_len(j), |out| block(j, out))
            .and_then(|r| r)
            .map_err(corrupt),
        Some(p) => super::read_piece(mem, &rd_pieces[p]),
    })?;
    let layout = ElfLayout::parse(&InGuest { mem, at: guess, len: head_len }, frame.len).map_err(|e| match e {
        // The headers reach past block 0: only a corrupt ELF does that.
        ElfError::Read(_) => corrupt("decompresses to an ELF file whose headers do not fit in its first 8 MiB".into()),
        e => elf_err(e),
    })?;
    if layout.reserved_end > low_end {
        return Err(BootError::KernelTooLarge { path: path.to_string(), need: layout.reserved_end });
    }
    let Some(base) = place(&layout.segments, frame.len, low_end) else {
        return Ok(Unpacked::InGuest("its segments leave no room to decompress it in place".into()));
    };
    let done = if all_at_guess { frame.len } else { head_len };
    let mut dirtied = vec![(guess, done)];
    if base != guess {
        move_within(mem, guess, base, done)?;
        dirtied.push((base, done));
    }
    if first < blocks {
        dirtied.push((base, frame.len));
        // The other blocks, each straight into its place, in parallel.
        let n = super::in_parallel(blocks - first, |n| {
            let i = n + first;
            super::with_guest_bytes(mem, base + (i * LZ4_LEGACY_BLOCK) as u64, frame.block_len(i), |out| block(i, out))
                .and_then(|r| r)
        })
        .map_err(corrupt)?;
        threads = threads.max(n);
    }
    if !move_segments(mem, &layout.segments, base)? {
        return Ok(Unpacked::InGuest("its segments cannot be moved into place one by one".into()));
    }
    clear_tails(mem, &layout.segments, &dirtied)?;
    // The huge pages under an initramfs read alongside are kept, unless
    // the file moved: then it may lie where the move wrote, and the
    // caller reads it again into pages whose stale bytes must go.
    let keep = rd.filter(|_| base == guess).map(|(_, size, at)| (at, size));
    release_gaps(mem, &layout.segments, &dirtied, keep, low_end);

    // The PVH note is read where its bytes now are: in a loaded segment.
    let segments = layout.segments.clone();
    let kernel = match layout.entry(&Loaded { mem, segments: &segments }) {
        Ok(k) => k,
        Err(ElfError::NoPvhEntry) => return Ok(Unpacked::InGuest("it has no PVH entry point (CONFIG_PVH=n)".into())),
        Err(ElfError::Read(_)) => return Ok(Unpacked::InGuest("its notes are outside the segments it loads".into())),
        Err(e) => return Err(elf_err(e)),
    };
    // The initramfs read alongside stays where it is if that is where it
    // belongs under this kernel (above its reserved area) and the file
    // was not moved over it; else the caller reads it again.
    let rd = rd
        .filter(|&(_, size, at)| base == guess && super::initrd_placement(size, low_end, &kernel) == Some(at))
        .map(|(_, size, at)| (at, size));
    let how = format!(
        "{} MiB decompressed on the host in {:.1} ms ({read_ms:.1} ms finding the {blocks} blocks of {} KiB), on {threads} threads{}",
        frame.len >> 20,
        t0.elapsed().as_secs_f64() * 1e3,
        len >> 10,
        if rd.is_some() { ", the initramfs read alongside" } else { "" },
    );
    Ok(Unpacked::Loaded(kernel, how, rd))
}

thread_local! {
    /// Each loader thread's buffer for the compressed block it works on:
    /// grown to the largest block it has read, reused for the next.
    static COMPRESSED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Reads block `i` of the LZ4 frame at `frame_at` in `file` into this
/// thread's buffer and decompresses it into `out`.
fn decompress_from_file(file: &File, frame_at: u64, frame: &Lz4Index, i: usize, out: &mut [u8]) -> Result<(), String> {
    let r = &frame.blocks[i];
    // A block is at most the frame's length, which is below 1 GiB.
    let n = (r.end - r.start) as usize;
    COMPRESSED.with_borrow_mut(|buf| {
        if buf.len() < n {
            buf.resize(n, 0);
        }
        ReadAt::read_exact_at(file, &mut buf[..n], frame_at + r.start)
            .map_err(|e| format!("could not be read (LZ4 block {i}): {e}"))?;
        frame.decompress_block(i, &buf[..n], out)
    })
}

/// Where the ELF file of `file_len` bytes goes whole: so that the segment
/// with the most file bytes is already in place, between 1 MiB and
/// `low_end`. `None` if that does not fit.
fn place(segments: &[Segment], file_len: u64, low_end: u64) -> Option<u64> {
    let largest = segments.iter().max_by_key(|s| s.file_len)?;
    let base = largest.addr.checked_sub(largest.offset)?;
    (base >= layout::HIGH_RAM_START && base.checked_add(file_len)? <= low_end).then_some(base)
}

/// Moves `len` bytes of guest memory from `from` to `to` (the ranges may
/// overlap), a MiB at a time.
fn move_within(mem: &GuestMemory, from: u64, to: u64, len: u64) -> Result<(), BootError> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK.min(len) as usize];
    let write_err = |e: vm_memory::GuestMemoryError| BootError::Write(e.to_string());
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        // Down: front to back; up: back to front. Either way no chunk is
        // overwritten before it is read.
        let at = if to <= from { done } else { len - done - n };
        let chunk = &mut buf[..n as usize];
        mem.read_slice(chunk, GuestAddress(from + at)).map_err(write_err)?;
        mem.write_slice(chunk, GuestAddress(to + at)).map_err(write_err)?;
        done += n;
    }
    Ok(())
}

/// Moves every segment whose bytes did not land in place (the file is at
/// `base`). A move goes first when its destination holds no bytes another
/// move still has to read; `false` if the moves wait on each other.
fn move_segments(mem: &GuestMemory, segments: &[Segment], base: u64) -> Result<bool, BootError> {
    let overlap = |a: u64, al: u64, b: u64, bl: u64| a < b + bl && b < a + al;
    let mut pending: Vec<&Segment> = segments.iter().filter(|s| base + s.offset != s.addr && s.file_len > 0).collect();
    while !pending.is_empty() {
        let Some(i) = (0..pending.len()).find(|&i| {
            let s = pending[i];
            pending.iter().enumerate().all(|(j, o)| j == i || !overlap(s.addr, s.file_len, base + o.offset, o.file_len))
        }) else {
            return Ok(false);
        };
        let s = pending.swap_remove(i);
        move_within(mem, base + s.offset, s.addr, s.file_len)?;
    }
    Ok(true)
}

/// Zeroes what decompressing dirtied (the `(address, length)` ranges) in
/// the part of each segment that is not from the file: the memory a
/// segment's `.bss` starts with is zero.
fn clear_tails(mem: &GuestMemory, segments: &[Segment], dirtied: &[(u64, u64)]) -> Result<(), BootError> {
    let zeroes = [0u8; 1 << 16];
    for s in segments {
        let (tail, tail_end) = (s.addr + s.file_len, s.addr + s.mem_len);
        for &(at, len) in dirtied {
            let (mut lo, hi) = (tail.max(at), tail_end.min(at + len));
            while lo < hi {
                let n = (hi - lo).min(zeroes.len() as u64) as usize;
                mem.write_slice(&zeroes[..n], GuestAddress(lo)).map_err(|e| BootError::Write(e.to_string()))?;
                lo += n as u64;
            }
        }
    }
    Ok(())
}

/// Gives back to the host the huge pages decompressing touched that hold
/// nothing the kernel runs from (the ELF header, the bytes past the last
/// segment): the guest sees zeroes there, or what was there when guest
/// RAM is shared; neither is memory the kernel expects anything in. Only
/// whole 2 MiB pages clear of every segment, so that no huge page under
/// the kernel is split, and none that holds any of `keep` (the initramfs,
/// if it was read alongside). Nothing else is above 1 MiB yet.
fn release_gaps(mem: &GuestMemory, segments: &[Segment], dirtied: &[(u64, u64)], keep: Option<(u64, u64)>, low_end: u64) {
    const HUGE: u64 = 2 << 20;
    let holds_kernel = |page: u64| {
        segments.iter().map(|s| (s.addr, s.mem_len)).chain(keep).any(|(at, len)| at < page + HUGE && page < at + len)
    };
    for &(at, len) in dirtied {
        let mut page = at & !(HUGE - 1);
        while page < at + len {
            if page >= layout::HIGH_RAM_START && page + HUGE <= low_end && !holds_kernel(page) {
                if let Ok(host) = mem.get_host_address(GuestAddress(page)) {
                    // SAFETY: `host` is the start of 2 MiB of guest RAM
                    // (the page is below `low_end`, and RAM below the PCI
                    // hole is one mapping) that no Rust reference points
                    // into and nothing reads before the guest runs; the
                    // mapping stays valid, only its contents go.
                    // Only an optimization: where it fails, the page stays.
                    let _ = unsafe { libc::madvise(host.cast(), HUGE as usize, libc::MADV_DONTNEED) };
                }
            }
            page += HUGE;
        }
    }
}

/// Block 0 of the file, decompressed into guest memory at `at`.
struct InGuest<'a> {
    mem: &'a GuestMemory,
    at: u64,
    len: u64,
}

impl ReadAt for InGuest<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => self
                .mem
                .read_slice(buf, GuestAddress(self.at + offset))
                .map_err(|e| std::io::Error::other(e.to_string())),
            _ => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// The decompressed ELF file as far as it is loaded: bytes that belong to
/// a segment, read back from guest memory.
struct Loaded<'a> {
    mem: &'a GuestMemory,
    segments: &'a [Segment],
}

impl ReadAt for Loaded<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).ok_or(std::io::ErrorKind::InvalidInput)?;
        let s = self
            .segments
            .iter()
            .find(|s| offset >= s.offset && end <= s.offset + s.file_len)
            .ok_or_else(|| std::io::Error::other("the note is not inside a loaded segment"))?;
        self.mem
            .read_slice(buf, GuestAddress(s.addr + (offset - s.offset)))
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::bzimage::tests::{image, put};
    use crate::memory::{self, Backing};
    use linux_loader::elf::{Elf64_Phdr, PT_LOAD, PT_NOTE};

    /// A loadable segment: file offset, guest address, bytes in the file,
    /// bytes in memory.
    type Seg = (u64, u64, u64, u64);

    /// The test kernel's segments: A holds the PVH note and is the largest
    /// (so the file goes at 0xe0_0000); C must move up before B can, B up
    /// before D can move down; B's zero tail lies where D's bytes and the
    /// file's last bytes (0xee) were decompressed.
    const SEGS: [Seg; 4] = [
        (0x20_0000, 0x100_0000, 0x20_0000, 0x20_0000), // A, in place
        (0x40_0000, 0x130_0000, 0x10_0000, 0x18_0000), // B, up 1 MiB, zero tail
        (0x50_0000, 0x150_0000, 0x8_0000, 0x8_0000),   // C, up 2 MiB
        (0x60_0000, 0x120_0000, 0x4_0000, 0x4_0000),   // D, down 2 MiB
    ];
    const FILE_LEN: usize = 0x70_0000;
    const ENTRY: u64 = 0x100_0040;

    /// The bytes at file offset `i` of a segment.
    fn byte(i: u64) -> u8 {
        (i % 251) as u8
    }

    /// An ELF kernel with `segs`, the PVH note (if `pvh`) inside the first.
    fn elf(segs: &[Seg], pvh: bool) -> Vec<u8> {
        let mut f = vec![0xeeu8; FILE_LEN];
        for &(off, _, len, _) in segs {
            for i in off..off + len {
                f[i as usize] = byte(i);
            }
        }
        let mut note = Vec::new();
        for v in [4u32, 4, if pvh { 18 } else { 3 }] {
            note.extend_from_slice(&v.to_le_bytes());
        }
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&(ENTRY as u32).to_le_bytes());
        let note_at = segs[0].0 as usize + 0x100;
        f[note_at..note_at + note.len()].copy_from_slice(&note);
        let mut phdrs: Vec<Elf64_Phdr> = segs
            .iter()
            .map(|&(off, addr, len, mem)| Elf64_Phdr { p_type: PT_LOAD, p_offset: off, p_paddr: addr, p_filesz: len, p_memsz: mem, ..Default::default() })
            .collect();
        phdrs.push(Elf64_Phdr { p_type: PT_NOTE, p_offset: note_at as u64, p_filesz: note.len() as u64, p_align: 4, ..Default::default() });
        let head = crate::boot::elf::tests::headers(&phdrs);
        f[..head.len()].copy_from_slice(&head);
        f
    }

    /// A bzImage whose payload is `payload`, asking to run at `pref` with
    /// `align`: where block 0 is decompressed first.
    fn bzimage(payload: &[u8], pref: u64, align: u32) -> (std::fs::File, KernelImage) {
        let img = bzimage_bytes(payload, pref, align);
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        std::fs::write(f.as_path(), &img).unwrap();
        let file = std::fs::File::open(f.as_path()).unwrap();
        let k = KernelImage::parse(&img[..crate::boot::bzimage::HEADER_END], img.len() as u64).unwrap();
        (file, k)
    }

    /// The bytes of [`bzimage`]'s file.
    fn bzimage_bytes(payload: &[u8], pref: u64, align: u32) -> Vec<u8> {
        let mut img = image(payload.len());
        put(&mut img, 0x248, &0u32.to_le_bytes());
        put(&mut img, 0x24c, &(payload.len() as u32).to_le_bytes());
        put(&mut img, 0x258, &pref.to_le_bytes());
        put(&mut img, 0x230, &align.to_le_bytes());
        img[1024..].copy_from_slice(payload);
        img
    }

    fn unpack(payload: &[u8], pref: u64, align: u32) -> (memory::GuestRam, Result<Unpacked, BootError>) {
        let ram = memory::create(64 << 20, Backing::Private).unwrap();
        // Whatever was in guest memory must not show through.
        ram.mem.write_slice(&vec![0x55u8; 32 << 20], GuestAddress(1 << 20)).unwrap();
        let (file, k) = bzimage(payload, pref, align);
        let r = load(&ram.mem, &file, &k, ram.low_end(), "bz", None);
        (ram, r)
    }

    #[test]
    fn segments_land_in_place_whatever_their_order_with_zero_tails() {
        let frame = kickvm_bzimage::stored_frame(&elf(&SEGS, true));
        // Block 0 first at 1 MiB and moved, then where it belongs.
        for (pref, align) in [(0x10_0000, 0), (0x100_0000, 0x20_0000)] {
            let (ram, r) = unpack(&frame, pref, align);
            let k = match r {
                Ok(Unpacked::Loaded(k, _, _)) => k,
                Ok(Unpacked::InGuest(why)) => panic!("left to the guest: {why}"),
                Err(e) => panic!("{e}"),
            };
            assert_eq!(k.entry, ENTRY);
            assert_eq!(k.segments.len(), 4);
            // The huge page under the ELF header (file offset 0 at
            // 0xe0_0000) holds no segment: given back, it reads zero.
            let mut head = [0xffu8; 4];
            ram.mem.read_slice(&mut head, GuestAddress(0xe0_0000)).unwrap();
            assert_eq!(head, [0; 4], "the ELF header stays in guest memory");
            for &(off, addr, len, mem) in &SEGS {
                let mut got = vec![0u8; mem as usize];
                ram.mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
                let want: Vec<u8> = (off..off + len).map(byte).chain((len..mem).map(|_| 0)).collect();
                // Segment A holds the note at 0x100.
                let note = if off == SEGS[0].0 { 0x100..0x114 } else { 0..0 };
                let first_diff = (0..got.len()).find(|&i| got[i] != want[i] && !note.contains(&i));
                assert_eq!(first_diff, None, "segment at {addr:#x} (pref {pref:#x})");
            }
        }
    }

    #[test]
    fn what_the_host_cannot_decompress_is_left_to_the_guest() {
        let not_lz4 = [&[0x1f, 0x8b, 8, 0][..], &[0u8; 0x1000]].concat();
        assert!(matches!(unpack(&not_lz4, 0x100_0000, 0x20_0000).1, Ok(Unpacked::InGuest(w)) if w.contains("not LZ4 (it starts 1f8b0800)")));
        let no_pvh = kickvm_bzimage::stored_frame(&elf(&SEGS, false));
        assert!(matches!(unpack(&no_pvh, 0x100_0000, 0x20_0000).1, Ok(Unpacked::InGuest(w)) if w.contains("no PVH entry")));
        // Two segments each sitting where the other's bytes are.
        let mut crossed = SEGS;
        crossed[2] = (0x50_0000, 0x120_0000, 0x8_0000, 0x8_0000);
        crossed[3] = (0x58_0000, 0x150_0000, 0x4_0000, 0x4_0000);
        crossed[1] = (0x40_0000, 0x130_0000, 0x10_0000, 0x10_0000);
        let frame = kickvm_bzimage::stored_frame(&elf(&crossed, true));
        assert!(matches!(unpack(&frame, 0x100_0000, 0x20_0000).1, Ok(Unpacked::InGuest(w)) if w.contains("cannot be moved")));
    }

    #[test]
    fn corrupt_or_oversized_kernels_are_refused_with_a_reason() {
        let good = kickvm_bzimage::stored_frame(&elf(&SEGS, true));
        // Block 0 cut short: its literals run past its end.
        let mut frame = good.clone();
        frame[4..8].copy_from_slice(&1000u32.to_le_bytes());
        let e = unpack(&frame, 0x100_0000, 0x20_0000).1.err().expect("a corrupt frame loads");
        assert!(e.to_string().contains("LZ4") && e.to_string().contains("--decompress-in-guest"), "{e}");
        // A block that decompresses to fewer bytes than the frame says.
        let mut frame = good;
        let n = frame.len();
        frame[n - 4..].copy_from_slice(&(FILE_LEN as u32 + 1).to_le_bytes());
        let e = unpack(&frame, 0x100_0000, 0x20_0000).1.err().expect("a short block loads");
        assert!(e.to_string().contains("block 0 decompresses to 7340032 bytes, and the frame says 7340033"), "{e}");
        let mut big = SEGS;
        big[0] = (0x20_0000, 0x3f0_0000, 0x20_0000, 0x20_0000);
        let frame = kickvm_bzimage::stored_frame(&elf(&big, true));
        let e = unpack(&frame, 0x100_0000, 0x20_0000).1.err().expect("a kernel past the RAM loads");
        assert!(matches!(e, BootError::KernelTooLarge { .. }), "{e}");
    }

    /// The initramfs is read on the decompressing threads when it can be
    /// placed before the kernel's headers are read, and where it belongs
    /// either way: with the file in place (read alongside, in a roomy
    /// guest and in a tight one), with the file moved (read again after);
    /// and where it does not fit, the same error as without.
    #[test]
    fn the_initramfs_is_read_alongside_the_blocks_when_it_can_be() {
        let frame = kickvm_bzimage::stored_frame(&elf(&SEGS, true));
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let rd: Vec<u8> = (0..0x12_3456u32).map(|i| (i % 241) as u8 + 1).collect();
        let rd_path = dir.as_path().join("initrd");
        std::fs::write(&rd_path, &rd).unwrap();
        for (pref, align, mib, alongside) in
            [(0x100_0000u64, 0x20_0000u32, 64u64, true), (0x10_0000, 0, 64, false), (0x100_0000, 0x20_0000, 24, true)]
        {
            let bz = dir.as_path().join("bz");
            std::fs::write(&bz, bzimage_bytes(&frame, pref, align)).unwrap();
            let ram = memory::create(mib << 20, Backing::Private).unwrap();
            ram.mem.write_slice(&vec![0x55u8; ((mib - 1) << 20) as usize], GuestAddress(1 << 20)).unwrap();
            let l = super::super::load_with_initrd(&ram.mem, &bz, Some(&rd_path), ram.low_end(), false).unwrap();
            let case = format!("pref {pref:#x}, {mib} MiB");
            let how = l.how.unwrap_or_default();
            assert_eq!(how.contains("initramfs read alongside"), alongside, "{case}: {how}");
            let want_at = ((mib << 20) - rd.len() as u64) & !(PAGE - 1);
            assert_eq!(l.initrd, Some((want_at, rd.len() as u64)), "{case}");
            let mut got = vec![0u8; rd.len()];
            ram.mem.read_slice(&mut got, GuestAddress(want_at)).unwrap();
            assert!(got == rd, "{case}: the initramfs in guest memory is not the file");
            let super::super::Kernel::Elf(k) = l.kernel else { panic!("{case}: not decompressed on the host") };
            assert_eq!(k.entry, ENTRY, "{case}");
            for &(off, addr, len, _) in &SEGS {
                let mut seg = vec![0u8; len as usize];
                ram.mem.read_slice(&mut seg, GuestAddress(addr)).unwrap();
                let bad = (0..len).find(|&i| seg[i as usize] != byte(off + i) && !(off == SEGS[0].0 && (0x100..0x114).contains(&i)));
                assert_eq!(bad, None, "{case}: segment at {addr:#x}");
            }
        }
        // 22 MiB: the initramfs would end up under the kernel's last segment.
        let ram = memory::create(22 << 20, Backing::Private).unwrap();
        let e = super::super::load_with_initrd(&ram.mem, &dir.as_path().join("bz"), Some(&rd_path), ram.low_end(), false)
            .err()
            .expect("an initramfs over the kernel loads");
        assert!(matches!(e, BootError::InitrdTooLarge { .. }), "{e}");
        // An initramfs that shrinks after it was opened is an error naming
        // it, on the decompressing threads as anywhere.
        let big: Vec<u8> = vec![0x77; 5 << 20];
        std::fs::write(&rd_path, &big).unwrap();
        let bz = dir.as_path().join("bz");
        let ram = memory::create(64 << 20, Backing::Private).unwrap();
        let (file, size) = crate::hostfile::open_nonempty("initrd", &rd_path).unwrap();
        std::fs::File::options().write(true).open(&rd_path).unwrap().set_len(1 << 20).unwrap();
        let src = Source { file, path: &rd_path, initrd: true };
        let (kf, k) = super::super::inspect_kernel(&bz).unwrap();
        let e = load(&ram.mem, &kf, &k, ram.low_end(), "bz", Some((&src, size))).err().expect("a shrunk initramfs loads");
        assert!(e.to_string().contains("initrd") && e.to_string().contains("ended early"), "{e}");
    }

    /// The default guest image's bzImage and the vmlinux the rig extracts
    /// from it (built from Debian packages on first use).
    fn debian_kernel() -> Result<(std::path::PathBuf, std::path::PathBuf), String> {
        let image = kickvm_rig::image::image(kickvm_rig::image::Variant::Guest).map_err(|e| e.to_string())?;
        Ok((image.kernel.clone(), image.vmlinux().map_err(|e| e.to_string())?))
    }

    #[test]
    fn debian_bzimage_decompresses_on_the_host_to_its_vmlinux_segments_as_the_vmlinux_loads() {
        let (bz, vmlinux) = match debian_kernel() {
            Ok(paths) => paths,
            Err(e) => return eprintln!("skipped: no default guest image: {e}"),
        };
        let ram = memory::create(256 << 20, Backing::Private).unwrap();
        let (file, kernel) = super::super::inspect(&bz).unwrap();
        let super::super::Kernel::BzImage(image) = kernel else { panic!("{} is not a bzImage", bz.display()) };
        let t0 = std::time::Instant::now();
        let Unpacked::Loaded(k, _, _) = load(&ram.mem, &file, &image, ram.low_end(), "bz", None).unwrap() else {
            panic!("Debian's kernel was left to the guest")
        };
        eprintln!("decompressed on the host in {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
        let elf = std::fs::read(&vmlinux).unwrap();
        assert_eq!(k, ElfKernel::parse(&elf[..], elf.len() as u64).unwrap());
        // And the vmlinux itself, read in 4 MiB pieces on several threads.
        let ram2 = memory::create(256 << 20, Backing::Private).unwrap();
        let (super::super::Kernel::Elf(k2), _) = super::super::load(&ram2.mem, &vmlinux, ram2.low_end(), false).unwrap() else {
            panic!("the vmlinux is not loaded as an ELF kernel")
        };
        assert_eq!(k2, k);
        for s in &k.segments {
            let want = &elf[s.offset as usize..(s.offset + s.file_len) as usize];
            for mem in [&ram.mem, &ram2.mem] {
                let mut got = vec![0u8; s.file_len as usize];
                mem.read_slice(&mut got, GuestAddress(s.addr)).unwrap();
                assert!(got == want, "segment at {:#x} differs", s.addr);
            }
        }
    }
}
