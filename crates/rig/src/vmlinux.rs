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
        let in_rig = std::env::var_os("KICKVM_IN_RIG").is_some();
        if path.is_file() {
            // One extracted before vmlinuxes were written with holes gets
            // them now, once.
            // Only a saving: if it fails, the dense file still serves.
            // A file with no block of zeroes would stay dense: it is not
            // written again at every lookup.
            if !in_rig && dense(&path) && makes_holes(&self.dir) {
                let bytes = fs::read(&path).map_err(|e| Error::io("cannot read", &path, e));
                let zero_block = |b: &[u8]| b.chunks(4096).any(|c| c.len() == 4096 && c.iter().all(|&x| x == 0));
                if let Err(e) = bytes.and_then(|b| if zero_block(&b) { self.replace(&path, &b) } else { Ok(()) }) {
                    crate::progress(&format!("vmlinux left without holes: {e}"));
                }
            }
            return Ok(path);
        }
        if in_rig {
            return Err(Error::with_hint(
                format!("no vmlinux in the image {}", self.dir.display()),
                "extract it on the host first: kickvm-rig image --print-vmlinux",
            ));
        }
        let bz = fs::read(&self.kernel).map_err(|e| Error::io("cannot read kernel", &self.kernel, e))?;
        let elf = kickvm_bzimage::extract(&bz).map_err(|what| Error::new(format!("kernel {}: {what}", self.kernel.display())))?;
        self.replace(&path, &elf)?;
        crate::progress(&format!("vmlinux ({} MiB) extracted: {}", elf.len() >> 20, path.display()));
        Ok(path)
    }

    /// Writes `elf` as `path`, with holes ([`write_sparse`]): aside, then
    /// renamed, so that a reader never sees half a file and two processes
    /// writing at once both leave a whole one.
    fn replace(&self, path: &std::path::Path, elf: &[u8]) -> Result<()> {
        let tmp = self.dir.join(format!(".vmlinux-{}", std::process::id()));
        let written = write_sparse(&tmp, elf).map_err(|e| Error::io("cannot write", &tmp, e));
        let renamed = written.and_then(|()| fs::rename(&tmp, path).map_err(|e| Error::io("cannot write", path, e)));
        if renamed.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        renamed
    }
}

/// True if the file at `path` has a block on disk for every byte of it
/// (no holes), as a vmlinux extracted before holes were made has.
fn dense(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).is_ok_and(|m| m.blocks() * 512 >= m.len())
}

/// True if the filesystem of `dir` makes holes: a file only extended
/// there takes no blocks.
fn makes_holes(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let probe = dir.join(format!(".holes-{}", std::process::id()));
    let made = fs::File::create(&probe).and_then(|f| f.set_len(1 << 20).and_then(|()| f.metadata()));
    let _ = fs::remove_file(&probe);
    made.is_ok_and(|m| m.blocks() == 0)
}

/// Writes `bytes` to a new file at `path`, leaving a hole for each 4 KiB
/// block of zeroes (on a filesystem without holes they are zeroes anyway),
/// as `cp --sparse=always` does.
pub fn write_sparse(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const BLOCK: usize = 4096;
    let file = fs::File::create(path)?;
    // Where the current run of data blocks starts, if in one.
    let mut run = None;
    for (i, block) in bytes.chunks(BLOCK).enumerate() {
        match (run, block.iter().all(|&b| b == 0)) {
            (None, false) => run = Some(i * BLOCK),
            (Some(start), true) => {
                file.write_all_at(&bytes[start..i * BLOCK], start as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        file.write_all_at(&bytes[start..], start as u64)?;
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
        let dir = tempfile_dir("sparse");
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
        if !makes_holes(&dir) {
            eprintln!("skipped the hole check: {} does not make holes", dir.display());
        } else {
            assert!(blocks < 64 * 1024, "the zero blocks took space: {blocks}");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    /// A vmlinux extracted before holes were made (every block on disk)
    /// gets its holes at the next lookup, its bytes unchanged.
    #[test]
    fn a_dense_vmlinux_in_the_cache_gets_its_holes_at_the_next_lookup() {
        if std::env::var_os("KICKVM_IN_RIG").is_some() {
            return eprintln!("skipped: in the rig the cache is read-only and vmlinuxes are left as they are");
        }
        let dir = tempfile_dir("dense");
        if !makes_holes(&dir) {
            return eprintln!("skipped: {} makes no holes", dir.display());
        }
        let mut bytes = vec![0x5au8; 8192];
        bytes.extend(std::iter::repeat_n(0u8, 1 << 20));
        bytes.extend([1, 2, 3]);
        let path = dir.join("vmlinux");
        fs::write(&path, &bytes).unwrap();
        assert!(dense(&path), "fs::write leaves no holes");
        let img = GuestImage { kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img"), kernel_version: String::new(), dir: dir.clone() };
        assert_eq!(img.vmlinux().unwrap(), path);
        assert!(!dense(&path), "still dense after the lookup");
        assert!(fs::read(&path).unwrap() == bytes);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "a temporary file was left behind");
        let _ = fs::remove_dir_all(&dir);
    }

    /// A new directory of this test's own (tests run in parallel).
    fn tempfile_dir(test: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("kickvm-rig-{test}-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
    }
}
