//! The uncompressed kernel (`vmlinux`, an ELF file with a PVH entry point)
//! of a guest image, for VMMs that boot it directly (kickvm, Cloud
//! Hypervisor, Firecracker) instead of letting the bzImage decompress
//! itself in the guest.
//!
//! Debian ships only the bzImage, so the vmlinux is taken out of it with
//! `kickvm-bzimage` (the setup header says where the compressed kernel
//! is; Debian compresses it with LZ4), the launcher's own decompressor.
//! The result is written once as `vmlinux` next to `vmlinuz` in the
//! image's cache directory, with holes where it is zeroes (a third of it:
//! the .bss and .brk are in the file), which kickvm's loader does not read.

use std::fs;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::image::{self, GuestImage, Variant};

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
        let elf = kickvm_bzimage::extract(&bz).map_err(|what| Error::new(format!("kernel {}: {what}", self.kernel.display())))?;
        // Written aside and renamed: a reader never sees half a file, and
        // two processes extracting at once both leave a whole one.
        let tmp = self.dir.join(format!(".vmlinux-{}", std::process::id()));
        write_sparse(&tmp, &elf).map_err(|e| Error::io("cannot write", &tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| Error::io("cannot write", &path, e))?;
        crate::progress(&format!("vmlinux ({} MiB) extracted: {}", elf.len() >> 20, path.display()));
        Ok(path)
    }
}

/// Writes `bytes` to a new file at `path`, leaving a hole for each 4 KiB
/// block of zeroes (on a filesystem without holes they are zeroes anyway),
/// as `cp --sparse=always` does.
pub fn write_sparse(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const BLOCK: usize = 4096;
    let file = fs::File::create(path)?;
    let zero = |b: &[u8]| b.iter().all(|&x| x == 0);
    let blocks: Vec<&[u8]> = bytes.chunks(BLOCK).collect();
    let mut i = 0;
    while i < blocks.len() {
        if zero(blocks[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < blocks.len() && !zero(blocks[i]) {
            i += 1;
        }
        let end = (i * BLOCK).min(bytes.len());
        file.write_all_at(&bytes[start * BLOCK..end], (start * BLOCK) as u64)?;
    }
    file.set_len(bytes.len() as u64)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_write_reads_back_the_same_bytes_with_its_zero_blocks_as_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile_dir();
        let path = dir.join("f");
        // data, 64 KiB of zeroes, data, a zero tail that is not a whole block.
        let mut bytes: Vec<u8> = (0..8192u32).map(|i| (i % 7) as u8 + 1).collect();
        bytes.extend(std::iter::repeat_n(0u8, 65536));
        bytes.extend((0..5000u32).map(|i| (i % 5) as u8 + 1));
        bytes.extend(std::iter::repeat_n(0u8, 100));
        write_sparse(&path, &bytes).unwrap();
        assert!(fs::read(&path).unwrap() == bytes);
        let blocks = fs::metadata(&path).unwrap().blocks() * 512;
        println!("{} bytes in {blocks} bytes of blocks", bytes.len());
        // ext4, xfs, btrfs and tmpfs make holes (a file only extended has
        // no blocks); where they are not made the bytes above are still right.
        let probe = fs::File::create(dir.join("probe")).unwrap();
        probe.set_len(1 << 20).unwrap();
        if probe.metadata().unwrap().blocks() > 0 {
            eprintln!("skipped the hole check: {} does not make holes", dir.display());
        } else {
            assert!(blocks < 64 * 1024, "the zero blocks took space: {blocks}");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("kickvm-rig-sparse-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
    }
}
