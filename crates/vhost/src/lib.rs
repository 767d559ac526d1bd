//! kickvm's device servers as vhost-user back-ends: `kickvm backend
//! <blk|net|console|rng> --socket PATH [OPTS]` serves one device of
//! `kickvm-virtio` to any vhost-user frontend (QEMU, Cloud Hypervisor, and
//! later the launcher), in a process of its own.
//!
//! The queues are served exactly as inside the launcher: one thread per
//! virtqueue, named `<device>-q<N>`, blocking in `read` on the kick eventfd
//! the frontend passed, doing the I/O in guest memory, and writing the call
//! eventfd the frontend passed only when the guest wants an interrupt and
//! the thread is about to sleep. A kick goes: frontend (a KVM ioeventfd in
//! QEMU) → that queue's thread → the device. No thread of this process
//! other than the one serving the queue is on that path. (QEMU's eventfds
//! are non-blocking, a flag shared with us: there the thread sleeps in
//! `poll` on the kick, one system call more per sleep.)
//!
//! Why the `vhost` crate's request handler and not the `vhost-user-backend`
//! daemon: the daemon runs its own worker threads, each an epoll loop
//! (`epoll_wait` + a `read` of the kick per wake-up) calling the device
//! back per event. kickvm's queue threads block in the kick `read` (or in
//! the TAP's `readv` for net receive) and decide interrupts themselves;
//! putting them under the daemon would mean either a second loop around
//! them or rewriting every device as epoll callbacks. `vhost`'s
//! [`BackendReqHandler`](vhost::vhost_user::BackendReqHandler) parses and
//! answers the protocol (it is the part of the daemon worth sharing) and
//! leaves threads to us: [`connection::Connection`] implements its
//! `VhostUserBackendReqHandlerMut` on top of `kickvm_virtio::activate` /
//! `ActiveDevice::stop`.
//!
//! Threads of a back-end, each a future seccomp filter of its own:
//! - the main thread: binds the socket, builds the device (opens the file,
//!   TAP, console endpoint), accepts frontends ([`cli::run`]);
//! - the protocol thread — here the main thread again, inside [`serve`]
//!   (install its filter before the first `handle_request`): reads
//!   requests, maps guest memory (`mmap`/`munmap`), starts and stops
//!   queue threads;
//! - the queue threads `<device>-q<N>`, spawned by `kickvm-virtio`'s
//!   runtime (`threads.rs`, `Thread::spawn`), which already installs each
//!   one's filter (the queue thread's calls plus its device's; `--seccomp`).
//!   The main and protocol threads are not filtered yet.

pub mod cli;
pub mod connection;
pub mod memory;
pub mod options;

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use kickvm_virtio::{Runtime, ThreadingMode, VirtioDevice};
use vhost::vhost_user::{BackendReqHandler, Error, VhostUserVirtioFeatures};

pub use connection::Connection;
pub use options::{DeviceKind, DeviceSpec};

/// Serves one frontend on `stream` until it disconnects or sends what
/// cannot be answered. Returns the device, reset, for the next frontend
/// (`None` only if a bug left it unreachable).
///
/// Each connection starts from nothing: no features, no memory, no rings;
/// the device keeps only its backend (file, TAP, console endpoint).
pub fn serve(stream: UnixStream, device: Box<dyn VirtioDevice>) -> Option<Box<dyn VirtioDevice>> {
    serve_with(stream, device, Runtime::new(ThreadingMode::PerQueue))
}

/// [`serve`], with the queue threads started by `runtime` (its threading
/// and seccomp modes).
pub fn serve_with(stream: UnixStream, device: Box<dyn VirtioDevice>, runtime: Arc<Runtime>) -> Option<Box<dyn VirtioDevice>> {
    let name = device.name().to_string();
    let conn = Arc::new(Mutex::new(Connection::new(device, runtime)));
    let mut handler = BackendReqHandler::from_stream(stream, conn.clone());
    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loop {
        match handler.handle_request() {
            Ok(()) => {}
            // Refused by the connection, already logged; the frontend got
            // its answer (a failed ack) and may go on.
            Err(Error::ReqHandlerError(_)) => {}
            // SET_VRING_ENABLE before PROTOCOL_FEATURES, read whole and
            // refused by the crate: QEMU's net does that on purpose.
            Err(Error::InactiveFeature(f)) if f == VhostUserVirtioFeatures::PROTOCOL_FEATURES => {
                log::debug!("{name}: SET_VRING_ENABLE before PROTOCOL_FEATURES; rings enabled once features are set");
                if let Ok(mut c) = conn.lock() {
                    c.enable_came_early();
                }
            }
            // Another request needing a feature not negotiated, read whole.
            Err(e @ (Error::InactiveFeature(_) | Error::InactiveOperation(_))) => {
                log::warn!("{name}: vhost-user request refused: {e} (not negotiated)");
            }
            Err(Error::Disconnected) => {
                log::info!("{name}: the vhost-user frontend disconnected");
                break;
            }
            Err(e) => {
                // The crate could not parse or answer the request: the
                // stream may be out of step. Drop this frontend; the next
                // one gets a fresh connection.
                log::warn!("{name}: vhost-user request refused ({e}); closing the connection");
                break;
            }
        }
        if conn.lock().is_ok_and(|c| c.must_close()) {
            log::warn!("{name}: a vhost-user request could not be answered; closing the connection");
            break;
        }
    }));
    if let Err(p) = served {
        log::error!("{name}: the vhost-user connection failed ({}); closing it", kickvm_virtio::threads::panic_message(p.as_ref()));
    }
    drop(handler);
    let conn = Arc::try_unwrap(conn).ok()?;
    Some(conn.into_inner().unwrap_or_else(|e| e.into_inner()).finish())
}
