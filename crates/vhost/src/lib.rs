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
//! Threads of a back-end, each under a seccomp filter of its own (its
//! list lives next to the code that starts it; `--seccomp on|log|off`):
//! - the main thread: binds the socket, builds the device (opens the file,
//!   TAP, console endpoint), then, filtered ([`cli::MAIN_THREAD`]), accepts
//!   frontends one after another ([`cli::run`]);
//! - the protocol thread `vhost-user`, one per connection, started by
//!   [`serve`] ([`PROTOCOL_THREAD`]): reads the frontend's requests, maps
//!   guest memory (`mmap`/`munmap`), starts and stops the queue threads;
//! - the queue threads `<device>-q<N>`, started by `kickvm-virtio`'s
//!   runtime (`threads.rs`), each installing its own filter (the queue
//!   thread's calls plus its device's).
//!
//! A thread inherits its creator's filter and adds its own, so a
//! creator's list holds the calls of the threads it starts too; each of
//! them narrows it to its own. No thread may open a file, make a socket
//! or start a program once set-up is over. The process-wide part of the
//! sandbox (no new privileges, inherited fds closed, no core dumps, an
//! optional `--user`) is [`sandbox`].

pub mod cli;
pub mod connection;
pub mod memory;
pub mod options;
pub mod sandbox;
#[cfg(test)]
mod test_hooks;

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use kickvm_virtio::ratelimit::Throttle;
use kickvm_virtio::seccomp::{self, SeccompMode};
use kickvm_virtio::{Runtime, ThreadingMode, VirtioDevice};
use vhost::vhost_user::{BackendReqHandler, Error, VhostUserVirtioFeatures};

pub use connection::Connection;
pub use options::{DeviceKind, DeviceSpec};

/// What a frontend makes us log, counted and rate-limited process-wide
/// (`kickvm_virtio::ratelimit`): a frontend can repeat a request, or
/// reconnect and repeat it, as fast as it likes. Requests refused:
pub static REFUSED: Throttle = Throttle::new();
/// Rings that cannot run (outside guest memory, bad sizes) or queue
/// threads that cannot start:
pub static QUEUES_NOT_RUN: Throttle = Throttle::new();
/// Connections ended (by the frontend, or by us after a request that
/// could not be parsed or answered):
pub static CONNECTIONS_ENDED: Throttle = Throttle::new();

/// `log::info!` through a throttle, as `warn_limited!` does for warnings.
macro_rules! info_limited {
    ($throttle:expr, $($arg:tt)+) => {
        if let Some(n) = $throttle.hit() {
            log::info!("{} (#{n})", format_args!($($arg)+));
        }
    };
}

/// The protocol thread's system calls, beyond every thread's
/// (`seccomp::RUNTIME`): requests and their fds arrive with `recvmsg` and
/// replies leave with `sendmsg`; an fd passed is checked (`fstat`, and the
/// `/proc/self/fd` link that says it is an eventfd: `readlink`, no
/// `open`), duplicated and closed; guest memory is mapped (`mmap`, in
/// `RUNTIME`); a missing call eventfd is made (`eventfd2`). It starts and
/// stops the queue threads (`seccomp::SPAWN_THREADS`, and `tgkill`, in
/// `RUNTIME`, to knock them out of a blocking read), so its filter also
/// allows their calls: the queue thread's and the device's.
pub const PROTOCOL_THREAD: &[i64] = &[
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_close,
    libc::SYS_eventfd2,
];

/// Every call the protocol thread for `device` may make, the threads it
/// starts included (see [`PROTOCOL_THREAD`]).
pub fn protocol_lists(device: &dyn VirtioDevice) -> Vec<&'static [i64]> {
    vec![PROTOCOL_THREAD, seccomp::SPAWN_THREADS, seccomp::QUEUE_THREAD, device.syscalls()]
}

/// Serves one frontend on `stream` until it disconnects or sends what
/// cannot be answered. Returns the device, reset, for the next frontend
/// (`None` only if a bug left it unreachable).
///
/// Each connection starts from nothing: no features, no memory, no rings;
/// the device keeps only its backend (file, TAP, console endpoint).
pub fn serve(stream: UnixStream, device: Box<dyn VirtioDevice>) -> Option<Box<dyn VirtioDevice>> {
    serve_with(stream, device, Runtime::new(ThreadingMode::PerQueue), SeccompMode::On)
}

/// [`serve`], with the queue threads started by `runtime` (its threading
/// and seccomp modes) and the protocol thread filtered in `seccomp` mode.
///
/// The requests are read on a thread of their own, `vhost-user`, which
/// installs its filter ([`protocol_lists`]) before it reads the first one;
/// the calling thread waits for it.
pub fn serve_with(
    stream: UnixStream,
    device: Box<dyn VirtioDevice>,
    runtime: Arc<Runtime>,
    seccomp: SeccompMode,
) -> Option<Box<dyn VirtioDevice>> {
    let lists = protocol_lists(&*device);
    // The device goes to the thread and comes back through `slot`, which
    // this thread keeps: if the thread cannot be started, the closure
    // holding it is dropped, but the device is still here.
    let slot = Arc::new(Mutex::new(Some(device)));
    let theirs = slot.clone();
    let spawned = std::thread::Builder::new().name("vhost-user".into()).spawn(move || {
        let Some(device) = theirs.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let name = device.name().to_string();
        let device = match seccomp::apply("vhost-user protocol", &lists, seccomp) {
            Ok(()) => {
                #[cfg(test)]
                test_hooks::run(test_hooks::Thread::Protocol);
                serve_here(stream, device, runtime)
            }
            // Serving unfiltered would be a silent downgrade.
            Err(e) => {
                log::error!("{name}: {e}; the frontend is not served");
                Some(device)
            }
        };
        *theirs.lock().unwrap_or_else(|e| e.into_inner()) = device;
    });
    match spawned {
        Ok(t) => {
            if t.join().is_err() {
                log::error!("the vhost-user protocol thread died");
            }
        }
        Err(e) => log::error!("cannot start the vhost-user protocol thread: {e}"),
    }
    let device = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    device
}

/// The request loop of [`serve_with`], on the calling thread.
fn serve_here(stream: UnixStream, device: Box<dyn VirtioDevice>, runtime: Arc<Runtime>) -> Option<Box<dyn VirtioDevice>> {
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
                kickvm_virtio::warn_limited!(REFUSED, "{name}: vhost-user request refused: {e} (not negotiated)");
            }
            Err(Error::Disconnected) => {
                info_limited!(CONNECTIONS_ENDED, "{name}: the vhost-user frontend disconnected");
                break;
            }
            Err(e) => {
                // The crate could not parse or answer the request: the
                // stream may be out of step. Drop this frontend; the next
                // one gets a fresh connection.
                kickvm_virtio::warn_limited!(CONNECTIONS_ENDED, "{name}: vhost-user request refused ({e}); closing the connection");
                break;
            }
        }
        if conn.lock().is_ok_and(|c| c.must_close()) {
            kickvm_virtio::warn_limited!(CONNECTIONS_ENDED, "{name}: a vhost-user request could not be answered; closing the connection");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_hooks::Thread;
    use kickvm_virtio::seccomp::{attempt_forbidden, ALL_REFUSED as REFUSED};

    fn rng() -> Box<dyn VirtioDevice> {
        DeviceSpec::parse(DeviceKind::Rng, "").unwrap().build().unwrap()
    }

    /// The protocol thread, filtered, is refused sockets, files and
    /// programs, and still serves: the device comes back when the
    /// frontend leaves.
    #[test]
    fn the_protocol_thread_is_refused_sockets_files_and_programs() {
        let (tx, rx) = std::sync::mpsc::channel();
        test_hooks::set(Thread::Protocol, move || tx.send(attempt_forbidden()).unwrap());
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let device = serve_with(ours, rng(), Runtime::new(ThreadingMode::PerQueue), SeccompMode::On);
        assert!(device.is_some(), "the device comes back");
        let (r, name) = rx.recv().unwrap();
        assert_eq!(name, "vhost-user");
        assert_eq!(r, REFUSED);
    }

    /// The main thread, once it accepts frontends, is refused the same,
    /// and still accepts and serves one (`--once`).
    #[test]
    fn the_main_thread_is_refused_sockets_files_and_programs() {
        let dir = std::env::temp_dir().join(format!("kickvm-vhost-main-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("rng.sock");
        let (tx, rx) = std::sync::mpsc::channel();
        test_hooks::set(Thread::Main, move || tx.send(attempt_forbidden()).unwrap());
        let args = cli::BackendArgs {
            device: DeviceKind::Rng,
            options: String::new(),
            socket: socket.clone(),
            once: true,
            seccomp: SeccompMode::On,
            user: None,
        };
        let main = std::thread::Builder::new().name("backend-main".into()).spawn(move || cli::run(&args)).unwrap();
        let (r, name) = rx.recv().unwrap();
        assert_eq!(name, "backend-main");
        assert_eq!(r, REFUSED);
        drop(UnixStream::connect(&socket).unwrap());
        assert_eq!(main.join().unwrap(), 0, "it served the frontend and exited");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
