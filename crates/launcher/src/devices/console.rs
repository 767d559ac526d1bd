//! `--console`: virtio-console (the guest's `hvc0`) on stdio, a pty, a
//! unix socket or a file.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Mutex;

use super::{DeviceError, DeviceKind};
use crate::config::validate::{access, check_char_device, check_listen_socket, check_new_file_dir, MAX_SOCKET_PATH};
use crate::config::{err, ConfigError, ConsoleSpec, VmConfig};
use crate::hostfile::{describe, io_reason};
use kickvm_virtio::console::Console;
use kickvm_virtio::VirtioDevice;

pub struct Consoles;

impl DeviceKind for Consoles {
    fn syscalls(&self) -> &'static [i64] {
        kickvm_virtio::console::SYSCALLS
    }
    fn count(&self, cfg: &VmConfig) -> usize {
        usize::from(cfg.console != ConsoleSpec::None)
    }
    fn check(&self, cfg: &VmConfig) -> Result<(), ConfigError> {
        check_console(&cfg.console)
    }
    fn build(&self, cfg: &VmConfig, out: &mut Vec<Box<dyn VirtioDevice>>) -> Result<(), DeviceError> {
        let Some(backend) = cfg.console.backend() else { return Ok(()) };
        let c = Console::new("console0", backend).map_err(|source| DeviceError::Open { what: "virtio-console", source })?;
        if let Some(p) = c.pty_path() {
            announce_pty(p);
        }
        out.push(Box::new(c));
        Ok(())
    }
}

/// Tells the user where the console's pty is — at the first boot, and at a
/// reboot only if the path changed (a guest rebooting in a loop gets the
/// same pty number back, and must not repeat the line forever).
fn announce_pty(path: &Path) {
    static LAST: Mutex<Option<std::path::PathBuf>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if last.as_deref() != Some(path) {
        kickvm_virtio::note!("kickvm: virtio-console (hvc0) is on {}", path.display());
        *last = Some(path.to_path_buf());
    }
}

/// The console endpoint can be made: a socket path that is free (or holds
/// a stale socket, which the console replaces) in a directory we can write,
/// a file we can append to, a pty master.
fn check_console(c: &ConsoleSpec) -> Result<(), ConfigError> {
    match c {
        ConsoleSpec::None | ConsoleSpec::Stdio => Ok(()),
        ConsoleSpec::Pty => {
            check_char_device("pseudo-terminal master", Path::new("/dev/ptmx"), libc::R_OK | libc::W_OK, "; --console pty needs it")
        }
        ConsoleSpec::Socket(p) => check_listen_socket("console socket", p, MAX_SOCKET_PATH, ""),
        ConsoleSpec::File(p) => match std::fs::metadata(p) {
            Ok(m) if m.is_file() || m.file_type().is_char_device() => {
                if access(p, libc::W_OK) {
                    Ok(())
                } else {
                    err(format!("console file {}: permission denied", p.display()))
                }
            }
            Ok(m) => err(format!(
                "console file {} is {}: give a regular file (output is appended to it) or a terminal",
                p.display(),
                describe(&m.file_type())
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => check_new_file_dir("console file", p),
            Err(e) => err(format!("console file {}: {}", p.display(), io_reason(&e))),
        },
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scratch() -> vmm_sys_util::tempdir::TempDir {
        vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/kickvm-validate").unwrap()
    }

    #[test]
    fn console_endpoints() {
        let d = scratch();
        let dir = d.as_path();
        let file = dir.join("file");
        std::fs::write(&file, b"precious").unwrap();
        let e = check_console(&ConsoleSpec::Socket(file.clone())).unwrap_err().0;
        assert_eq!(
            e,
            format!("console socket path {} exists and is not a socket (a regular file): remove it or choose another path", file.display())
        );
        let e = check_console(&ConsoleSpec::Socket(dir.to_path_buf())).unwrap_err().0;
        assert!(e.contains("exists and is not a socket (a directory)"), "{e}");
        let link = dir.join("link");
        std::os::unix::fs::symlink("/nonexistent", &link).unwrap();
        let e = check_console(&ConsoleSpec::Socket(link)).unwrap_err().0;
        assert!(e.contains("(a symbolic link)"), "{e}");
        let sock = dir.join("sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        check_console(&ConsoleSpec::Socket(sock)).unwrap();
        check_console(&ConsoleSpec::Socket(dir.join("new"))).unwrap();
        let e = check_console(&ConsoleSpec::Socket(PathBuf::from("/nonexistent/dir/sock"))).unwrap_err().0;
        assert!(e.contains("directory /nonexistent/dir does not exist"), "{e}");
        let e = check_console(&ConsoleSpec::Socket(dir.join("x".repeat(120)))).unwrap_err().0;
        assert!(e.contains("at most 107"), "{e}");

        check_console(&ConsoleSpec::File(file)).unwrap();
        check_console(&ConsoleSpec::File(PathBuf::from("/dev/null"))).unwrap();
        check_console(&ConsoleSpec::File(dir.join("new.log"))).unwrap();
        let e = check_console(&ConsoleSpec::File(dir.to_path_buf())).unwrap_err().0;
        assert!(e.contains("is a directory: give a regular file"), "{e}");
        let e = check_console(&ConsoleSpec::File(PathBuf::from("/nonexistent/c.log"))).unwrap_err().0;
        assert!(e.contains("does not exist"), "{e}");
    }
}
