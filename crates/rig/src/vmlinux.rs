//! The uncompressed kernel (`vmlinux`, an ELF file with a PVH entry point)
//! of a guest image, for VMMs that boot it directly (kickvm, Cloud
//! Hypervisor, Firecracker) instead of letting the bzImage decompress
//! itself in the guest.
//!
//! Debian ships only the bzImage, so the vmlinux is taken out of it with
//! `kickvm-bzimage` (the setup header says where the compressed kernel
//! is; Debian compresses it with LZ4), the launcher's own decompressor.
//! The result is written once as `vmlinux` next to `vmlinuz` in the
//! image's cache directory.

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
        fs::write(&tmp, &elf).map_err(|e| Error::io("cannot write", &tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| Error::io("cannot write", &path, e))?;
        crate::progress(&format!("vmlinux ({} MiB) extracted: {}", elf.len() >> 20, path.display()));
        Ok(path)
    }
}
