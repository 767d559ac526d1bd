//! A bzImage's compressed kernel ("payload"), for the launcher (which
//! decompresses it on the host and boots the ELF inside through its PVH
//! entry) and the rig (which extracts the `vmlinux` for the VMMs that boot
//! only ELF kernels).
//!
//! The setup header's `payload_offset` and `payload_length` (boot protocol
//! 2.08+) say where the payload is, counted from the protected-mode part
//! (after the setup sectors). Debian compresses it with LZ4 in the legacy
//! frame format Linux's `lz4 -l` writes: a magic number, then blocks
//! preceded by their compressed length, each decompressing to exactly
//! 8 MiB but the last, followed by the kernel build's 4-byte
//! little-endian length of the uncompressed data. Blocks are independent,
//! so they can be decompressed in any order, on any thread; [`Lz4Frame`]
//! lists them and [`Lz4Frame::decompress_block`] decompresses one with
//! `lz4_flex`. Any other compression is reported, not guessed at.
//!
//! Every byte is hostile input: a truncated file, lengths that point past
//! it or blocks that do not decompress to what the frame says fail with a
//! sentence, never a panic or an oversized allocation.

/// The legacy LZ4 frame's magic number.
pub const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// A legacy frame's blocks decompress to 8 MiB each, the last to at most.
pub const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// A larger kernel is not a kernel; bounds what a corrupt file makes a
/// caller allocate.
pub const MAX_KERNEL: usize = 1 << 30;
/// Bytes of the file that hold the setup header fields read here.
pub const HEADER_END: usize = PAYLOAD_LENGTH_AT + 4;
const SETUP_SECTS: usize = 0x1f1;
const HDRS_AT: usize = 0x202;
const VERSION_AT: usize = 0x206;
const PAYLOAD_OFFSET_AT: usize = 0x248;
const PAYLOAD_LENGTH_AT: usize = 0x24c;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

/// Where in the file the payload of the bzImage whose first bytes are
/// `head` (at least [`HEADER_END`]) lies: `(offset, length)`.
pub fn payload_range(head: &[u8]) -> Result<(u64, u64), String> {
    if head.get(HDRS_AT..HDRS_AT + 4) != Some(b"HdrS") {
        return Err("is not a bzImage (no HdrS setup header)".into());
    }
    let version = u16::from_le_bytes([head[VERSION_AT], head[VERSION_AT + 1]]);
    if version < 0x0208 {
        return Err(format!("has boot protocol {version:#06x}: before 2.08 the header does not say where the payload is"));
    }
    let sects = match head[SETUP_SECTS] {
        0 => 4,
        n => u64::from(n),
    };
    let (Some(offset), Some(len)) = (u32_at(head, PAYLOAD_OFFSET_AT), u32_at(head, PAYLOAD_LENGTH_AT)) else {
        return Err("is truncated inside its setup header".into());
    };
    // `payload_offset` counts from the protected-mode part, after the
    // setup sectors; each term is below 2^32, no overflow in u64.
    Ok(((sects + 1) * 512 + u64::from(offset), u64::from(len)))
}

/// The payload of the whole bzImage `bz`.
pub fn payload(bz: &[u8]) -> Result<&[u8], String> {
    let (start, len) = payload_range(bz)?;
    let end = start + len;
    usize::try_from(start)
        .ok()
        .zip(usize::try_from(end).ok())
        .and_then(|(s, e)| bz.get(s..e))
        .ok_or_else(|| format!("is truncated: its payload ends at byte {end} of {}", bz.len()))
}

/// Where the blocks of a legacy LZ4 frame are, found from their 4-byte
/// headers alone: the frame itself need not be in memory (the launcher
/// reads each block from the file when it decompresses it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lz4Index {
    /// Block `i`'s compressed bytes, as offsets into the frame; it
    /// decompresses to bytes `i · 8 MiB ..` of the kernel.
    pub blocks: Vec<std::ops::Range<u64>>,
    /// The decompressed length the kernel build appended.
    pub len: u64,
}

impl Lz4Index {
    /// Lists the blocks of the legacy LZ4 frame of `frame_len` bytes whose
    /// little-endian `u32`s `read_u32(offset)` reads (called only for
    /// offsets whose 4 bytes lie inside the frame; its error, a read that
    /// failed, is returned as it is).
    pub fn scan(frame_len: u64, mut read_u32: impl FnMut(u64) -> Result<u32, String>) -> Result<Lz4Index, String> {
        let magic = if frame_len >= 4 { read_u32(0)? } else { 0 };
        if magic != LZ4_LEGACY_MAGIC {
            return Err(format!("has a payload starting {:08x}, not an LZ4 legacy frame (02214c18)", magic.swap_bytes()));
        }
        let mut at = 4u64;
        let mut blocks = Vec::new();
        loop {
            if frame_len - at == 4 {
                let len = u64::from(read_u32(at)?);
                let most = blocks.len() as u64 * LZ4_LEGACY_BLOCK as u64;
                let least = most.saturating_sub(LZ4_LEGACY_BLOCK as u64 - 1);
                if blocks.is_empty() || len < least || len > most {
                    return Err(format!(
                        "has a corrupt LZ4 payload: {} blocks, and its appended length says {len} bytes",
                        blocks.len()
                    ));
                }
                return Ok(Lz4Index { blocks, len });
            }
            if frame_len - at < 4 {
                return Err("is truncated inside an LZ4 block header (or lacks its appended length)".into());
            }
            let size = u64::from(read_u32(at)?);
            at += 4;
            if size == u64::from(LZ4_LEGACY_MAGIC) {
                continue; // a concatenated frame
            }
            if size > frame_len - at {
                return Err("is truncated inside an LZ4 block".into());
            }
            if (blocks.len() + 1) * LZ4_LEGACY_BLOCK > MAX_KERNEL {
                return Err(format!("decompresses to more than {} MiB: not a kernel", MAX_KERNEL >> 20));
            }
            blocks.push(at..at + size);
            at += size;
        }
    }

    /// How many bytes block `i` decompresses to.
    pub fn block_len(&self, i: usize) -> usize {
        let start = i as u64 * LZ4_LEGACY_BLOCK as u64;
        // `len` is checked against the block count: at most 8 MiB.
        self.len.saturating_sub(start).min(LZ4_LEGACY_BLOCK as u64) as usize
    }

    /// Decompresses block `i`, whose compressed bytes are `compressed`,
    /// into `out` (at least [`Self::block_len`] bytes); fails unless it
    /// yields exactly that many bytes.
    pub fn decompress_block(&self, i: usize, compressed: &[u8], out: &mut [u8]) -> Result<(), String> {
        let want = self.block_len(i);
        let out = out.get_mut(..want).ok_or("got a buffer too small for an LZ4 block")?;
        let n = lz4_flex::block::decompress_into(compressed, out).map_err(|e| format!("has a corrupt LZ4 block {i}: {e}"))?;
        if n != want {
            return Err(format!(
                "has a corrupt LZ4 payload: block {i} decompresses to {n} bytes, and the frame says {want}"
            ));
        }
        Ok(())
    }
}

/// A legacy LZ4 frame in memory, its blocks listed (nothing decompressed yet).
#[derive(Debug)]
pub struct Lz4Frame<'a> {
    /// Where the blocks are.
    pub index: Lz4Index,
    /// The compressed blocks, in order (`index.blocks` of the frame).
    pub blocks: Vec<&'a [u8]>,
    /// The decompressed length the kernel build appended.
    pub len: u64,
}

impl<'a> Lz4Frame<'a> {
    /// Whether `payload` starts as a legacy LZ4 frame does; anything else
    /// is another compression (gzip, xz, zstd...).
    pub fn is_lz4_legacy(payload: &[u8]) -> bool {
        u32_at(payload, 0) == Some(LZ4_LEGACY_MAGIC)
    }

    /// Lists the blocks of the legacy LZ4 frame `payload`.
    pub fn parse(payload: &'a [u8]) -> Result<Lz4Frame<'a>, String> {
        // `scan` reads only within the frame.
        let index = Lz4Index::scan(payload.len() as u64, |at| Ok(u32_at(payload, at as usize).unwrap_or(0)))?;
        let blocks = index.blocks.iter().map(|r| &payload[r.start as usize..r.end as usize]).collect();
        Ok(Lz4Frame { len: index.len, index, blocks })
    }

    /// How many bytes block `i` decompresses to.
    pub fn block_len(&self, i: usize) -> usize {
        self.index.block_len(i)
    }

    /// Decompresses block `i` into `out` (at least [`Self::block_len`]
    /// bytes); fails unless it yields exactly that many bytes.
    pub fn decompress_block(&self, i: usize, out: &mut [u8]) -> Result<(), String> {
        self.index.decompress_block(i, self.blocks[i], out)
    }

    /// Decompresses the whole frame.
    pub fn decompress(&self) -> Result<Vec<u8>, String> {
        // At most MAX_KERNEL (checked in `parse`).
        let mut out = vec![0u8; self.len as usize];
        for (i, chunk) in out.chunks_mut(LZ4_LEGACY_BLOCK).enumerate() {
            self.decompress_block(i, chunk)?;
        }
        Ok(out)
    }
}

/// Decompresses the `vmlinux` (an ELF file) out of bzImage `bz`.
pub fn extract(bz: &[u8]) -> Result<Vec<u8>, String> {
    let elf = Lz4Frame::parse(payload(bz)?)
        .map_err(|e| format!("{e}: only LZ4-compressed kernels are extracted"))?
        .decompress()?;
    if !elf.starts_with(b"\x7fELF") {
        return Err("decompresses to something that is not an ELF file".into());
    }
    Ok(elf)
}

/// A legacy LZ4 frame that stores `data` as literal-only blocks (no
/// compression), with the appended length: what tests and fuzz seeds need
/// to make a bzImage payload without an LZ4 compressor.
pub fn stored_frame(data: &[u8]) -> Vec<u8> {
    let mut frame = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
    for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
        // Token (literal length 15 = "more follows"), the length's rest in
        // 255s, the bytes: an LZ4 sequence with no match.
        let mut block = Vec::with_capacity(chunk.len() + chunk.len() / 255 + 2);
        if chunk.len() < 15 {
            block.push((chunk.len() as u8) << 4);
        } else {
            block.push(0xf0);
            let mut n = chunk.len() - 15;
            while n >= 255 {
                block.push(255);
                n -= 255;
            }
            block.push(n as u8);
        }
        block.extend_from_slice(chunk);
        frame.extend_from_slice(&(block.len() as u32).to_le_bytes());
        frame.extend_from_slice(&block);
    }
    frame.extend_from_slice(&(data.len() as u32).to_le_bytes());
    frame
}

/// A minimal bzImage header (one setup sector, boot protocol 2.15) whose
/// payload is `payload`, followed by 100 bytes of what a real image has
/// after it: for tests of the code that finds and reads the payload.
pub fn image_with_payload(payload: &[u8]) -> Vec<u8> {
    let mut bz = vec![0u8; 2 * 512 + 0x40];
    bz[SETUP_SECTS] = 1;
    bz[HDRS_AT..HDRS_AT + 4].copy_from_slice(b"HdrS");
    bz[VERSION_AT..VERSION_AT + 2].copy_from_slice(&0x020fu16.to_le_bytes());
    bz[PAYLOAD_OFFSET_AT..PAYLOAD_OFFSET_AT + 4].copy_from_slice(&0x40u32.to_le_bytes());
    bz[PAYLOAD_LENGTH_AT..PAYLOAD_LENGTH_AT + 4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    bz.extend_from_slice(payload);
    bz.extend_from_slice(&[0xee; 100]);
    bz
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where `image_with_payload` puts the payload.
    const AT: usize = 1024 + 0x40;

    fn with_len(mut frame: Vec<u8>, len: u32) -> Vec<u8> {
        let n = frame.len();
        frame[n - 4..].copy_from_slice(&len.to_le_bytes());
        frame
    }

    #[test]
    fn the_payload_is_found_through_the_header_and_decompressed() {
        let elf = [&b"\x7fELF"[..], &[7u8; 300]].concat();
        let bz = image_with_payload(&stored_frame(&elf));
        assert_eq!(payload_range(&bz).unwrap(), (AT as u64, bz.len() as u64 - AT as u64 - 100));
        assert_eq!(extract(&bz).unwrap(), elf);
    }

    #[test]
    fn the_index_reads_only_the_block_headers_and_finds_what_parse_finds() {
        let data: Vec<u8> = (0..2 * LZ4_LEGACY_BLOCK + 5).map(|i| (i % 251) as u8).collect();
        let frame = stored_frame(&data);
        let word = |f: &[u8], at: u64| u32::from_le_bytes(f[at as usize..at as usize + 4].try_into().unwrap());
        let mut reads = 0;
        let index = Lz4Index::scan(frame.len() as u64, |at| {
            reads += 1;
            Ok(word(&frame, at))
        })
        .unwrap();
        assert_eq!(index, Lz4Frame::parse(&frame).unwrap().index);
        assert_eq!(reads, 1 + 3 + 1, "the magic, one header per block, the appended length");
        for (i, r) in index.blocks.iter().enumerate() {
            let mut out = vec![0u8; index.block_len(i)];
            index.decompress_block(i, &frame[r.start as usize..r.end as usize], &mut out).unwrap();
            assert_eq!(out, data[i * LZ4_LEGACY_BLOCK..][..out.len()], "block {i}");
        }
        // Cut anywhere: an error, and never a read past the cut.
        for cut in [0, 3, 4, 7, 8, 100, frame.len() - 9, frame.len() - 4, frame.len() - 1] {
            let short = &frame[..cut];
            let r = Lz4Index::scan(cut as u64, |at| {
                assert!(at + 4 <= cut as u64, "read at {at} of a frame cut at {cut}");
                Ok(word(short, at))
            });
            assert!(r.is_err(), "a frame cut at {cut} of {}", frame.len());
        }
        // A read that fails is said as it is.
        let failing = Lz4Index::scan(frame.len() as u64, |at| if at == 0 { Ok(LZ4_LEGACY_MAGIC) } else { Err("disk gone".into()) });
        assert_eq!(failing, Err("disk gone".to_string()));
    }

    #[test]
    fn blocks_are_8_mib_and_decompress_alone_in_any_order() {
        // Three blocks: 8 MiB, 8 MiB, 5 bytes.
        let data: Vec<u8> = (0..2 * LZ4_LEGACY_BLOCK + 5).map(|i| (i % 251) as u8).collect();
        let frame = stored_frame(&data);
        let f = Lz4Frame::parse(&frame).unwrap();
        assert_eq!((f.blocks.len(), f.len), (3, data.len() as u64));
        assert_eq!([f.block_len(0), f.block_len(1), f.block_len(2)], [LZ4_LEGACY_BLOCK, LZ4_LEGACY_BLOCK, 5]);
        let mut out = vec![0u8; LZ4_LEGACY_BLOCK];
        for i in [2, 0, 1] {
            f.decompress_block(i, &mut out).unwrap();
            let start = i * LZ4_LEGACY_BLOCK;
            assert_eq!(&out[..f.block_len(i)], &data[start..start + f.block_len(i)]);
        }
        assert!(f.decompress_block(0, &mut out[..100]).unwrap_err().contains("too small"));
        assert_eq!(f.decompress().unwrap(), data);
    }

    #[test]
    fn broken_images_are_refused_with_a_reason() {
        let elf = [&b"\x7fELF"[..], &[7u8; 30]].concat();
        let frame = stored_frame(&elf);
        let good = image_with_payload(&frame);
        // An appended length the blocks cannot make, too long or too short.
        let long = extract(&image_with_payload(&with_len(frame.clone(), 9 << 20))).unwrap_err();
        assert!(long.contains("1 blocks, and its appended length says 9437184"), "{long}");
        let long = extract(&image_with_payload(&with_len(frame.clone(), 99))).unwrap_err();
        assert!(long.contains("decompresses to 34 bytes, and the frame says 99"), "{long}");
        let short = extract(&image_with_payload(&with_len(frame.clone(), 20))).unwrap_err();
        assert!(short.contains("corrupt LZ4 block 0"), "{short}");
        assert!(extract(&image_with_payload(&stored_frame(b"MZ not an elf"))).unwrap_err().contains("not an ELF"));
        let mut bad = good.clone();
        bad[VERSION_AT] = 0x07;
        assert!(extract(&bad).unwrap_err().contains("before 2.08"));
        let mut bad = good.clone();
        bad[HDRS_AT] = b'X';
        assert!(extract(&bad).unwrap_err().contains("not a bzImage"));
        let mut bad = good.clone();
        bad[PAYLOAD_LENGTH_AT..PAYLOAD_LENGTH_AT + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(extract(&bad).unwrap_err().contains("is truncated"));
        let mut bad = good.clone();
        bad[AT] = 0x1f; // gzip's first byte
        assert!(extract(&bad).unwrap_err().contains("not an LZ4 legacy frame"));
        // A block length past the payload, and a corrupt block.
        let mut bad = good.clone();
        bad[AT + 4] = 0xff;
        assert!(extract(&bad).unwrap_err().contains("truncated inside an LZ4 block"));
        let mut bad = good.clone();
        bad[AT + 9] = 0xff; // 15 + 255 + ... literals: more than the block holds
        assert!(extract(&bad).unwrap_err().contains("corrupt LZ4 block"));
        // No appended length.
        let cut = image_with_payload(&frame[..frame.len() - 4]);
        assert!(extract(&cut).unwrap_err().contains("appended length"), "{}", extract(&cut).unwrap_err());
        assert!(extract(&[0u8; 10]).is_err());
        assert!(payload_range(&[0u8; 3]).is_err());
    }
}
