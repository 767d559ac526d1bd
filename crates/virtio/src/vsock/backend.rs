//! The host side of hybrid vsock (Cloud Hypervisor's scheme): the Unix
//! socket host programs connect to, the `SOCKET_<port>` sockets the guest
//! connects to, and the epoll set the receive queue waits on.
//!
//! Every host socket is non-blocking: the queue threads hold the
//! connection table's lock while they move bytes, and must never sleep
//! with it held.
//!
//! Making sockets is not a queue thread's business (nor a vCPU's, whose
//! filter holds every device's list): the guest's connections to
//! `SOCKET_P` are made by the device's connector thread (`<dev>-connect`),
//! whose seccomp list is `socket` and `connect` and little else.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;

use crate::seccomp::{self, SeccompMode};

use crate::memory::GuestIovecs;
use crate::sys::check;

/// The connector thread's system calls beyond every thread's
/// (`seccomp::RUNTIME`): make a Unix socket and connect it, or close it
/// when that fails.
pub const CONNECTOR_SYSCALLS: &[i64] = &[libc::SYS_socket, libc::SYS_connect, libc::SYS_close];

type Reply = io::Result<UnixStream>;

/// The listening socket host programs connect to (`socket=PATH`), and the
/// connector thread that makes the guest's connections to `PATH_<port>`.
/// It lives as long as the device, across resets; its file is removed
/// when the device goes, if it is still ours.
pub struct HostListener {
    listener: UnixListener,
    path: PathBuf,
    inode: (u64, u64),
    /// Requests to the connector thread and its replies, one at a time.
    connector: Mutex<Option<(Sender<PathBuf>, Receiver<Reply>)>>,
    thread: Option<JoinHandle<()>>,
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl HostListener {
    /// Listens on `path`. A socket file left there by a VMM that is gone
    /// is replaced; anything else (a regular file, a directory, a socket
    /// another program listens on) is refused, never deleted.
    /// `name` names the connector thread (`<name>-connect`), which runs
    /// under its seccomp list in `mode`.
    pub fn bind(path: &Path, name: &str, mode: SeccompMode) -> io::Result<HostListener> {
        use std::os::unix::fs::FileTypeExt;
        let refuse = |why: &str| {
            Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("vsock socket path {} {why}: remove it or choose another path", path.display()),
            ))
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => return refuse("exists and is not a socket"),
            Ok(_) if UnixStream::connect(path).is_ok() => return refuse("is a socket another program listens on"),
            Ok(_) => std::fs::remove_file(path).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot remove stale vsock socket {}: {e}", path.display()))
            })?,
            Err(_) => {}
        }
        let listener = UnixListener::bind(path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on vsock socket {}: {e}", path.display())))?;
        let inode = file_id(path).unwrap_or_default();
        let (req_tx, req_rx) = channel::<PathBuf>();
        let (rep_tx, rep_rx) = channel::<Reply>();
        let thread_name: String = format!("{name}-connect").chars().take(15).collect();
        let thread = std::thread::Builder::new().name(thread_name.clone()).spawn(move || {
            if let Err(e) = seccomp::apply(&thread_name, &[CONNECTOR_SYSCALLS], mode) {
                // Connecting unfiltered would be a silent downgrade.
                log::error!("{e}; the guest's vsock connections to the host will fail");
                return;
            }
            for path in req_rx {
                if rep_tx.send(connect(&path)).is_err() {
                    return;
                }
            }
        })?;
        Ok(HostListener {
            listener,
            path: path.to_path_buf(),
            inode,
            connector: Mutex::new(Some((req_tx, rep_rx))),
            thread: Some(thread),
        })
    }

    /// Connects to `SOCKET_<port>` for the guest, without blocking (on the
    /// connector thread, which answers at once).
    pub fn connect_port(&self, port: u32) -> io::Result<UnixStream> {
        let gone = || io::Error::other("the vsock connector thread is gone");
        let c = self.connector.lock().unwrap_or_else(|e| e.into_inner());
        let (tx, rx) = c.as_ref().ok_or_else(gone)?;
        tx.send(self.port_path(port)).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next waiting host connection, non-blocking; `Ok(None)` if none.
    pub fn accept(&self) -> io::Result<Option<UnixStream>> {
        // SAFETY: accept4 with null address arguments only returns a new fd.
        let fd = unsafe {
            libc::accept4(
                self.listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(None) } else { Err(e) };
        }
        // SAFETY: `fd` is a new socket this call owns.
        Ok(Some(unsafe { UnixStream::from_raw_fd(fd) }))
    }

    /// Where a guest connection to host port `port` goes: `SOCKET_<port>`.
    pub fn port_path(&self, port: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!("_{port}"));
        p.into()
    }
}

impl AsRawFd for HostListener {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        if file_id(&self.path).is_some_and(|id| id == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
        // Its request channel closed, the connector thread ends.
        self.connector.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects to the Unix socket at `path` without blocking. A listener
/// whose backlog is full refuses at once (`WouldBlock`) rather than make
/// the device wait.
fn connect(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path too long"));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes for the call.
    let r = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// Sends from guest buffers to a host socket. `MSG_NOSIGNAL`: a host peer
/// that is gone is an `EPIPE` for this connection, not a signal.
pub fn send_guest(fd: RawFd, iov: &GuestIovecs) -> io::Result<usize> {
    let v = iov.as_raw();
    // SAFETY: msghdr is plain old data; all-zero is valid (no address).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = v.as_ptr().cast_mut();
    msg.msg_iovlen = v.len() as _;
    // SAFETY: the iovecs describe mapped guest memory that `iov` keeps
    // mapped (see `GuestIovecs`); the kernel only reads them.
    check(unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) })
}

/// Sends host bytes to a host socket (see [`send_guest`]).
pub fn send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is valid for reads of its length during the call.
    check(unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) })
}

/// Reads from a host socket into host bytes.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length during the call.
    check(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) })
}

/// An epoll set: what the receive queue waits on besides its kick. Its fd
/// is readable when any fd in it is ready, so a queue thread can `poll`
/// it with its kick eventfd in every threading mode.
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain epoll_create1 call; the fd is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is new and ours.
        Ok(Epoll { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Adds, changes or (with `events == 0`) removes `fd`'s interest,
    /// tagged `token`. `registered` is what the set holds now.
    pub fn set(&self, fd: RawFd, token: u64, registered: u32, events: u32) -> io::Result<()> {
        let op = match (registered, events) {
            (a, b) if a == b => return Ok(()),
            (0, _) => libc::EPOLL_CTL_ADD,
            (_, 0) => libc::EPOLL_CTL_DEL,
            _ => libc::EPOLL_CTL_MOD,
        };
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is valid for the call; the kernel checks the fds.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The ready fds' tokens and events, without waiting.
    pub fn ready(&self, out: &mut Vec<(u64, u32)>) {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 64];
        out.clear();
        // SAFETY: `evs` has room for 64 events; timeout 0 never sleeps.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), evs.as_mut_ptr(), evs.len() as i32, 0) };
        for e in evs.iter().take(n.max(0) as usize) {
            out.push((e.u64, e.events));
        }
    }
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
