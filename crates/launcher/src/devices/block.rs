//! `--disk`: virtio-blk over a file or a host block device.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::{DeviceError, DeviceKind};
use crate::config::{err, ConfigError, DiskSpec, VmConfig};
use crate::hostfile::{self, io_reason, Accept};
use kickvm_virtio::block::Block;
use kickvm_virtio::VirtioDevice;

/// virtio-blk's sector.
const SECTOR: u64 = 512;
/// `BLKROGET`: is this block device read-only?
const BLKROGET: libc::c_ulong = 0x125e;

pub struct Disks;

impl DeviceKind for Disks {
    fn syscalls(&self) -> &'static [i64] {
        kickvm_virtio::block::SYSCALLS
    }
    fn count(&self, cfg: &VmConfig) -> usize {
        cfg.disks.len()
    }
    fn check(&self, cfg: &VmConfig) -> Result<(), ConfigError> {
        check_disks(&cfg.disks)
    }
    fn build(&self, cfg: &VmConfig, out: &mut Vec<Box<dyn VirtioDevice>>) -> Result<(), DeviceError> {
        for (i, d) in cfg.disks.iter().enumerate() {
            let dev = Block::new(&format!("blk{i}"), d.block_config())?;
            dev.state().set_poll(d.poll);
            out.push(Box::new(dev));
        }
        Ok(())
    }
}

/// Every disk is a regular file or block device that opens as it will be
/// used, holds whole sectors, and no image is written through two devices.
fn check_disks(disks: &[DiskSpec]) -> Result<(), ConfigError> {
    let mut seen: Vec<((u64, u64), &DiskSpec)> = Vec::new();
    for d in disks {
        let (file, len) = hostfile::open("disk", &d.path, Accept::RegularOrBlock, !d.readonly).map_err(|e| {
            let hint = match &e {
                hostfile::FileError::Open { reason, .. } if !d.readonly && is_write_refusal(reason) => {
                    " (add readonly=on to use it read-only)"
                }
                _ => "",
            };
            ConfigError(format!("{e}{hint}"))
        })?;
        check_disk_size(&d.path, len)?;
        let meta = file.metadata().map_err(|e| ConfigError(format!("disk {}: {}", d.path.display(), io_reason(&e))))?;
        let block = meta.file_type().is_block_device();
        if block && !d.readonly && block_device_read_only(&file) {
            return err(format!("disk {} is a read-only block device: add readonly=on", d.path.display()));
        }
        // The same image under two names: a block device by its device
        // number, a file by its inode.
        let id = if block { (0, meta.rdev()) } else { (meta.dev(), meta.ino()) };
        if let Some((_, other)) = seen.iter().find(|(i, o)| *i == id && !(o.readonly && d.readonly)) {
            return err(format!(
                "disk {} is given twice (also as {}): an image written through two devices gets corrupted; give it once, or readonly=on to both",
                d.path.display(),
                other.path.display()
            ));
        }
        seen.push((id, d));
    }
    Ok(())
}

/// A virtio-blk disk is a number of 512-byte sectors: bytes past the last
/// whole one would be out of the guest's reach without anyone knowing.
fn check_disk_size(path: &Path, len: u64) -> Result<(), ConfigError> {
    let p = path.display();
    if len == 0 {
        return err(format!("disk {p} is empty; a disk holds at least one {SECTOR}-byte sector (e.g. truncate -s 64M {p})"));
    }
    let rest = len % SECTOR;
    if rest != 0 {
        let whole = len.div_ceil(SECTOR) * SECTOR;
        return err(format!(
            "disk {p} is {len} bytes, not a whole number of {SECTOR}-byte sectors (the guest could not reach the last {rest} bytes); pad it: truncate -s {whole} {p}"
        ));
    }
    Ok(())
}

fn is_write_refusal(reason: &str) -> bool {
    reason == "permission denied" || reason == "read-only file system"
}

fn block_device_read_only(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    let mut ro: libc::c_int = 0;
    // SAFETY: BLKROGET writes one int through the pointer, which is valid
    // for the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKROGET as _, &mut ro) };
    r == 0 && ro != 0
}


#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> vmm_sys_util::tempdir::TempDir {
        vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/kickvm-validate").unwrap()
    }

    fn disk(path: &Path, readonly: bool) -> DiskSpec {
        DiskSpec { path: path.to_path_buf(), readonly, serial: None, queues: 1, poll: Default::default() }
    }

    #[test]
    fn disks_must_be_files_or_block_devices_given_once() {
        let d = scratch();
        let dir = d.as_path();
        let e = check_disks(&[disk(dir, false)]).unwrap_err().0;
        assert!(e.contains("is a directory"), "{e}");
        let e = check_disks(&[disk(Path::new("/dev/zero"), true)]).unwrap_err().0;
        assert!(e.contains("is a character device"), "{e}");
        let img = dir.join("a.img");
        std::fs::write(&img, [0u8; 4096]).unwrap();
        check_disks(&[disk(&img, false)]).unwrap();
        let link = dir.join("b.img");
        std::os::unix::fs::symlink(&img, &link).unwrap();
        let e = check_disks(&[disk(&img, false), disk(&link, true)]).unwrap_err().0;
        assert!(e.contains("is given twice"), "{e}");
        check_disks(&[disk(&img, true), disk(&link, true)]).unwrap();
        std::fs::write(&img, [0u8; 4097]).unwrap();
        let e = check_disks(&[disk(&img, false)]).unwrap_err().0;
        assert!(e.contains("is 4097 bytes, not a whole number of 512-byte sectors"), "{e}");
        assert!(e.contains("truncate -s 4608"), "{e}");
        std::fs::write(&img, b"").unwrap();
        let e = check_disks(&[disk(&img, true)]).unwrap_err().0;
        assert!(e.contains("is empty"), "{e}");
    }
}
