//! The uncompressed kernel (`vmlinux`, an ELF file with a PVH entry point)
//! of a guest image, for VMMs that boot it directly (kickvm, Cloud
//! Hypervisor, Firecracker) instead of letting the bzImage decompress
//! itself in the guest.
//!
//! Debian ships only the bzImage, so the vmlinux is taken out of it: the
//! setup header's `payload_offset` and `payload_length` (boot protocol
//! 2.08+) say where the compressed kernel is, and Debian compresses it
//! with LZ4 in the legacy frame format Linux's `lz4 -l` writes (a magic
//! number, then blocks of at most 8 MiB each preceded by its compressed
//! length), followed by the kernel build's 4-byte little-endian length of
//! the uncompressed data. The blocks are decompressed with `lz4_flex`; the
//! frame is read here (~40 lines: `lz4_flex` reads only the current frame
//! format). The result is written once as `vmlinux` next to `vmlinuz` in
//! the image's cache directory.

use std::fs;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::image::{self, GuestImage, Variant};

/// The legacy LZ4 frame's magic number.
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// A legacy frame's blocks decompress to at most 8 MiB each.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// A larger vmlinux is not a kernel; bounds what a corrupt file makes us
/// allocate.
const MAX_VMLINUX: usize = 1 << 30;
const SETUP_SECTS: usize = 0x1f1;
const HDRS_AT: usize = 0x202;
const VERSION_AT: usize = 0x206;
const PAYLOAD_OFFSET_AT: usize = 0x248;
const PAYLOAD_LENGTH_AT: usize = 0x24c;

/// The vmlinux of the default test guest, extracted on first use.
pub fn default_vmlinux() -> Result<PathBuf> {
    image::image(Variant::Guest)?.vmlinux()
}

impl GuestImage {
    /// The image's vmlinux: `vmlinux` in its directory, taken out of the
    /// bzImage if not there yet. Inside the rig (read-only cache) it must
    /// have been extracted on the host.
    pub fn vmlinux(&self) -> Result<PathBuf> {
        let path = self.dir.join("vmlinux");
        if path.is_file() {
            return Ok(path);
        }
        if std::env::var_os("KICKVM_IN_RIG").is_some() {
            return Err(Error::with_hint(
                format!("no vmlinux in the image {}", self.dir.display()),
                "extract it on the host first: kickvm-rig image --print-vmlinux",
            ));
        }
        let bz = fs::read(&self.kernel).map_err(|e| Error::io("cannot read kernel", &self.kernel, e))?;
        let elf = extract(&bz).map_err(|what| Error::new(format!("kernel {}: {what}", self.kernel.display())))?;
        // Written aside and renamed: a reader never sees half a file, and
        // two processes extracting at once both leave a whole one.
        let tmp = self.dir.join(format!(".vmlinux-{}", std::process::id()));
        fs::write(&tmp, &elf).map_err(|e| Error::io("cannot write", &tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| Error::io("cannot write", &path, e))?;
        crate::progress(&format!("vmlinux ({} MiB) extracted: {}", elf.len() >> 20, path.display()));
        Ok(path)
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The compressed kernel inside bzImage `bz`, as its setup header places it.
pub fn payload(bz: &[u8]) -> std::result::Result<&[u8], String> {
    if bz.get(HDRS_AT..HDRS_AT + 4) != Some(b"HdrS") {
        return Err("is not a bzImage (no HdrS setup header)".into());
    }
    let version = u16::from_le_bytes([bz[VERSION_AT], bz[VERSION_AT + 1]]);
    if version < 0x0208 {
        return Err(format!("has boot protocol {version:#06x}: before 2.08 the header does not say where the payload is"));
    }
    let sects = match bz[SETUP_SECTS] {
        0 => 4,
        n => usize::from(n),
    };
    let (Some(offset), Some(len)) = (u32_at(bz, PAYLOAD_OFFSET_AT), u32_at(bz, PAYLOAD_LENGTH_AT)) else {
        return Err("is truncated inside its setup header".into());
    };
    // `payload_offset` counts from the protected-mode part (after the
    // setup sectors); all three are at most 2^32, no overflow in usize.
    let start = (sects + 1) * 512 + offset as usize;
    bz.get(start..start + len as usize)
        .ok_or_else(|| format!("is truncated: its payload ends at byte {} of {}", start + len as usize, bz.len()))
}

/// Decompresses the vmlinux out of bzImage `bz`.
pub fn extract(bz: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let p = payload(bz)?;
    if u32_at(p, 0) != Some(LZ4_LEGACY_MAGIC) {
        let head: String = p.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(format!(
            "has a payload starting {head}, not an LZ4 legacy frame (02214c18): only LZ4-compressed kernels are extracted"
        ));
    }
    let elf = lz4_legacy(&p[4..])?;
    if !elf.starts_with(b"\x7fELF") {
        return Err("decompresses to something that is not an ELF file".into());
    }
    Ok(elf)
}

/// The data of a legacy LZ4 frame's blocks (`rest` follows the magic),
/// checked against the 4-byte length a kernel build appends.
fn lz4_legacy(mut rest: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        if rest.len() == 4 || rest.is_empty() {
            // The appended length, if there is one, must match.
            if let Some(len) = u32_at(rest, 0) {
                if len as usize != out.len() {
                    return Err(format!("decompresses to {} bytes, and its header says {len}", out.len()));
                }
            }
            return Ok(out);
        }
        let size = u32_at(rest, 0).ok_or("is truncated inside an LZ4 block header")?;
        rest = &rest[4..];
        if size == LZ4_LEGACY_MAGIC {
            continue; // a concatenated frame
        }
        let block = rest.get(..size as usize).ok_or("is truncated inside an LZ4 block")?;
        rest = &rest[size as usize..];
        let at = out.len();
        if at + LZ4_LEGACY_BLOCK > MAX_VMLINUX {
            return Err(format!("decompresses to more than {} MiB: not a kernel", MAX_VMLINUX >> 20));
        }
        out.resize(at + LZ4_LEGACY_BLOCK, 0);
        let n = lz4_flex::block::decompress_into(block, &mut out[at..]).map_err(|e| format!("has a corrupt LZ4 block: {e}"))?;
        out.truncate(at + n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An LZ4 block of literals only: token, length bytes, the bytes.
    fn literals(data: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        if data.len() < 15 {
            b.push((data.len() as u8) << 4);
        } else {
            b.push(0xf0);
            let mut n = data.len() - 15;
            while n >= 255 {
                b.push(255);
                n -= 255;
            }
            b.push(n as u8);
        }
        b.extend_from_slice(data);
        b
    }

    /// A bzImage whose payload is `data` in a legacy LZ4 frame of one
    /// block per item of `blocks`, plus the appended length.
    fn bzimage(blocks: &[&[u8]], appended: Option<u32>) -> Vec<u8> {
        let mut p = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        let mut total = 0;
        for d in blocks {
            let b = literals(d);
            p.extend_from_slice(&(b.len() as u32).to_le_bytes());
            p.extend_from_slice(&b);
            total += d.len() as u32;
        }
        if let Some(n) = appended {
            p.extend_from_slice(&n.to_le_bytes());
        } else {
            p.extend_from_slice(&total.to_le_bytes());
        }
        let mut bz = vec![0u8; 2 * 512 + 0x40];
        bz[SETUP_SECTS] = 1;
        bz[HDRS_AT..HDRS_AT + 4].copy_from_slice(b"HdrS");
        bz[VERSION_AT..VERSION_AT + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        bz[PAYLOAD_OFFSET_AT..PAYLOAD_OFFSET_AT + 4].copy_from_slice(&0x40u32.to_le_bytes());
        bz[PAYLOAD_LENGTH_AT..PAYLOAD_LENGTH_AT + 4].copy_from_slice(&(p.len() as u32).to_le_bytes());
        bz.extend_from_slice(&p);
        bz.extend_from_slice(&[0xee; 100]); // what follows the payload
        bz
    }

    #[test]
    fn the_payload_is_found_through_the_header_and_decompressed() {
        let elf = [&b"\x7fELF"[..], &[7u8; 300]].concat();
        let bz = bzimage(&[&elf[..100], &elf[100..]], None);
        assert_eq!(extract(&bz).unwrap(), elf);
    }

    #[test]
    fn broken_images_are_refused_with_a_reason() {
        let elf = [&b"\x7fELF"[..], &[7u8; 30]].concat();
        let good = bzimage(&[&elf], None);
        assert!(extract(&bzimage(&[&elf], Some(99))).unwrap_err().contains("header says 99"));
        assert!(extract(&bzimage(&[b"MZ not an elf"], None)).unwrap_err().contains("not an ELF"));
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
        bad[1024 + 0x40] = 0x1f; // gzip's first byte
        assert!(extract(&bad).unwrap_err().contains("not an LZ4 legacy frame"));
        // A block length past the payload, and a corrupt block.
        let mut bad = good.clone();
        bad[1024 + 0x44] = 0xff;
        assert!(extract(&bad).unwrap_err().contains("truncated inside an LZ4 block"));
        let mut bad = good;
        bad[1024 + 0x49] = 0xff; // 15 + 255 + ... literals: more than the block holds
        assert!(extract(&bad).unwrap_err().contains("corrupt LZ4 block"));
        assert!(extract(&[0u8; 10]).is_err());
    }
}
