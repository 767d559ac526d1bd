//! Checking a [`VmConfig`] against the host before anything is created:
//! every file the user named is of the right kind and can be opened as it
//! will be, the kernel's header says it can start in this much memory with
//! this command line and initramfs, the devices fit on the PCI bus, and the
//! TAP interfaces and console endpoints can be what the devices will make
//! of them. A mistake found here is one line and nothing to clean up; one
//! found later may leave a half-built VM behind.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use super::{err, ConfigError, VmConfig, MAX_CPUS};
use crate::hostfile::{self, describe, io_reason};
use crate::{boot, devices, memory};

/// `sun_path` holds 108 bytes with the terminating NUL.
pub(crate) const MAX_SOCKET_PATH: usize = 107;
/// PCI bus 0 slots left after the host bridge.
const MAX_DEVICES: usize = crate::pci::root::SLOTS - 1;

pub(crate) fn cfg_err(e: impl std::fmt::Display) -> ConfigError {
    ConfigError(e.to_string())
}

impl VmConfig {
    /// Checks everything that can be checked without KVM and without
    /// creating anything. Opens files (read-only unless they will be
    /// written) and closes them again.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return err(format!("--cpus {}: use a number from 1 to {MAX_CPUS}", self.cpus));
        }
        memory::check_size(self.memory, self.hugepages).map_err(cfg_err)?;
        self.check_boot()?;
        let devices: usize = devices::KINDS.iter().map(|k| k.count(self)).sum();
        if devices > MAX_DEVICES {
            return err(format!(
                "{devices} virtio devices asked for, more than the {MAX_DEVICES} PCI slots kickvm has: use fewer --disk/--net"
            ));
        }
        devices::KINDS.iter().try_for_each(|k| k.check(self))
    }

    /// The kernel can start in this guest with this command line, and the
    /// initramfs fits next to it.
    fn check_boot(&self) -> Result<(), ConfigError> {
        let low_end = memory::low_end(self.memory);
        let (_, kernel) = boot::inspect_kernel(&self.kernel).map_err(cfg_err)?;
        boot::check_kernel_fits(&self.kernel, &kernel, low_end).map_err(cfg_err)?;
        boot::check_cmdline(&self.cmdline, &kernel).map_err(cfg_err)?;
        if let Some(initrd) = &self.initrd {
            let (_, size) = hostfile::open_nonempty("initrd", initrd).map_err(cfg_err)?;
            boot::check_initrd_fits(initrd, size, low_end, &kernel).map_err(cfg_err)?;
        }
        Ok(())
    }
}

/// The directory a new file at `p` goes in exists and takes new files.
pub(crate) fn check_new_file_dir(what: &str, p: &Path) -> Result<(), ConfigError> {
    let dir = hostfile::parent_dir(p);
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() && hostfile::dir_writable(dir) => Ok(()),
        Ok(m) if m.is_dir() => err(format!("{what} {}: cannot create it in {} (permission denied)", p.display(), dir.display())),
        Ok(_) => err(format!("{what} {}: {} is not a directory", p.display(), dir.display())),
        Err(_) => err(format!("{what} {}: directory {} does not exist", p.display(), dir.display())),
    }
}

/// A Unix socket the launcher will listen on can be made at `p`: the path
/// is at most `max_len` bytes (`why_max` says why, if not the kernel's
/// limit) and free, or holds a stale socket nobody listens on (which is
/// replaced), in a directory we can write. `what` names it (`console socket`).
pub(crate) fn check_listen_socket(what: &str, p: &Path, max_len: usize, why_max: &str) -> Result<(), ConfigError> {
    let len = p.as_os_str().len();
    if len > max_len {
        return err(format!(
            "{what} path {} is {len} bytes; a Unix socket path is at most {max_len}{why_max}: choose a shorter one",
            p.display()
        ));
    }
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_socket() && std::os::unix::net::UnixStream::connect(p).is_ok() => err(format!(
            "{what} path {} is a socket another program listens on: stop it or choose another path",
            p.display()
        )),
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(m) => err(format!(
            "{what} path {} exists and is not a socket ({}): remove it or choose another path",
            p.display(),
            describe(&m.file_type())
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => check_new_file_dir(what, p),
        Err(e) => err(format!("{what} path {}: {}", p.display(), io_reason(&e))),
    }
}

/// `path` is a character device the launcher may open with `mode`
/// (`R_OK`/`W_OK`); `hint` ends the message if not.
pub(crate) fn check_char_device(what: &str, path: &Path, mode: libc::c_int, hint: &str) -> Result<(), ConfigError> {
    let p = path.display();
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_char_device() && access(path, mode) => Ok(()),
        Ok(m) if m.file_type().is_char_device() => err(format!("{what} {p}: permission denied{hint}")),
        Ok(m) => err(format!("{what} {p} is {}, not a character device{hint}", describe(&m.file_type()))),
        Err(e) => err(format!("{what} {p}: {}{hint}", io_reason(&e))),
    }
}

pub(crate) fn access(path: &Path, mode: libc::c_int) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: `c` is a NUL-terminated path; access(2) only reads it.
    unsafe { libc::access(c.as_ptr(), mode) == 0 }
}
