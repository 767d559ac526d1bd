//! `kickvm --api-socket PATH`: the part of Cloud Hypervisor's REST API
//! that orchestrators (Kata Containers' `clh` driver, `ch-remote`) use,
//! on a Unix socket, so they can drive kickvm as they drive Cloud
//! Hypervisor. See docs/api.md for the endpoints and their limits.
//!
//! - [`http`]: HTTP/1.1 with keep-alive, requests with the descriptors
//!   passed alongside them (a TAP for `vm.add-net`).
//! - [`schema`]: Cloud Hypervisor's JSON shapes, translated into the same
//!   [`crate::config::VmConfig`] `kickvm run` builds from its options.
//! - [`vmm`]: the one VM, its states and what each endpoint does to it;
//!   the VM itself runs in [`crate::vm`] as under `kickvm run`.
//! - [`hotplug`]: the device a `vm.add-*` adds to a running VM.
//!
//! One thread per connection, at most [`MAX_CONNECTIONS`] at a time: a
//! request is a few hundred bytes of JSON and most work is synchronous
//! (a boot waits for the VM's set-up), so threads keep each client's wait
//! from delaying the others without an async runtime's start-up cost.

pub mod hotplug;
pub mod http;
pub mod schema;
pub mod vmm;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use schema::HostOptions;
pub use vmm::Vmm;

/// Connections served at once; one more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 128;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("--api-socket {path}: {reason}")]
    Socket { path: String, reason: String },
    #[error("cannot start the API server: {0}")]
    Io(#[from] std::io::Error),
}

/// Removes the socket file when the server ends, however it ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds `path` (replacing a stale socket left by a process that is gone,
/// never another kind of file).
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let err = |reason: String| ApiError::Socket { path: path.display().to_string(), reason };
    if path.as_os_str().len() > crate::config::validate::MAX_SOCKET_PATH {
        return Err(err(format!(
            "a Unix socket path is at most {} bytes: choose a shorter one",
            crate::config::validate::MAX_SOCKET_PATH
        )));
    }
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            return Err(err("exists and is not a socket: remove it or choose another path".into()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err("another process serves this socket: stop it or choose another path".into()));
        }
        let _ = std::fs::remove_file(path);
    }
    crate::config::validate::check_new_file_dir("--api-socket", path).map_err(|e| ApiError::Socket {
        path: path.display().to_string(),
        reason: e.0.split_once(": ").map_or(e.0.clone(), |(_, r)| r.to_string()),
    })?;
    UnixListener::bind(path).map_err(|e| err(crate::config::io_reason(&e)))
}

/// Serves the API on `listener` until `vmm.shutdown` or a stop signal;
/// then stops the VM (if one runs) and removes the socket file.
pub fn serve(listener: UnixListener, path: &Path, host: HostOptions) -> Result<(), ApiError> {
    let _file = SocketFile(path.to_path_buf());
    let vmm = Arc::new(Vmm::new(host));
    let wake = Arc::new(EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?);
    let open = Arc::new(AtomicUsize::new(0));
    listener.set_nonblocking(true)?;
    log::info!("API server on {}", path.display());
    while !vmm.exit.load(Ordering::SeqCst) && crate::platform::pending_signal().is_none() {
        if !wait_readable(listener.as_raw_fd(), wake.as_raw_fd()) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("API socket: accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        let _ = stream.set_nonblocking(false);
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            let busy = http::Response::error(503, format!("more than {MAX_CONNECTIONS} connections open: retry later"));
            http::serve_one_response(&stream, &busy);
            continue;
        }
        let (vmm, wake, open2) = (vmm.clone(), wake.clone(), open.clone());
        let spawned = std::thread::Builder::new().name("kickvm-api".into()).spawn(move || {
            http::serve(stream, |req| {
                let resp = vmm.handle(req);
                (resp, vmm.exit.load(Ordering::SeqCst))
            });
            open2.fetch_sub(1, Ordering::SeqCst);
            if vmm.exit.load(Ordering::SeqCst) {
                let _ = wake.write(1);
            }
        });
        if let Err(e) = spawned {
            open.fetch_sub(1, Ordering::SeqCst);
            log::warn!("API socket: cannot start a connection thread: {e}");
        }
    }
    vmm.stop_for_exit();
    log::info!("API server stopped");
    Ok(())
}

/// Waits up to 200 ms for a connection or a wake-up (then the caller
/// checks for signals and `vmm.shutdown`).
fn wait_readable(listener: i32, wake: i32) -> bool {
    let mut fds = [
        libc::pollfd { fd: listener, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: wake, events: libc::POLLIN, revents: 0 },
    ];
    // SAFETY: `fds` is an array of two valid pollfd structs that outlives the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 200) };
    n > 0 && fds[0].revents & libc::POLLIN != 0
}
