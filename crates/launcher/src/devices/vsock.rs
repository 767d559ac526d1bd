//! `--vsock cid=N,socket=PATH`: virtio-vsock with Cloud Hypervisor's
//! hybrid vsock on a host Unix socket.

use super::{DeviceError, DeviceKind};
use crate::config::validate::{check_listen_socket, MAX_SOCKET_PATH};
use crate::config::{ConfigError, VmConfig};
use kickvm_virtio::vsock::Vsock;
use kickvm_virtio::VirtioDevice;

/// Guest connections to host port P go to `PATH_P`: the socket path must
/// leave room for `_` and a port of up to ten digits.
const MAX_VSOCK_PATH: usize = MAX_SOCKET_PATH - 11;

pub struct Vsocks;

impl DeviceKind for Vsocks {
    fn syscalls(&self) -> &'static [i64] {
        kickvm_virtio::vsock::SYSCALLS
    }
    fn count(&self, cfg: &VmConfig) -> usize {
        usize::from(cfg.vsock.is_some())
    }
    fn check(&self, cfg: &VmConfig) -> Result<(), ConfigError> {
        match &cfg.vsock {
            Some(v) => check_listen_socket("vsock socket", &v.socket, MAX_VSOCK_PATH, " here, so that PATH_<port> fits"),
            None => Ok(()),
        }
    }
    fn build(&self, cfg: &VmConfig, out: &mut Vec<Box<dyn VirtioDevice>>) -> Result<(), DeviceError> {
        if let Some(v) = &cfg.vsock {
            let d = Vsock::new(v.vsock_config("vsock0", cfg.seccomp)).map_err(|source| DeviceError::Open { what: "virtio-vsock", source })?;
            out.push(Box::new(d));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_socket_paths() {
        let d = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/kickvm-vsock").unwrap();
        let dir = d.as_path();
        let check = |p: &std::path::Path| check_listen_socket("vsock socket", p, MAX_VSOCK_PATH, " here, so that PATH_<port> fits");
        check(&dir.join("v.sock")).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        let e = check(&file).unwrap_err().0;
        assert!(e.contains("exists and is not a socket (a regular file): remove it"), "{e}");
        let e = check(std::path::Path::new("/nonexistent/dir/v.sock")).unwrap_err().0;
        assert!(e.contains("directory /nonexistent/dir does not exist"), "{e}");
        let long = dir.join("x".repeat(MAX_VSOCK_PATH));
        let e = check(&long).unwrap_err().0;
        assert!(e.contains("at most 96 here, so that PATH_<port> fits"), "{e}");
    }
}
