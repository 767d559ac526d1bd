//! Where console bytes come from and go to.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::queue::{QueueCtx, Stopped};
use crate::terminal::{make_raw, Mode, RawTerminal};

/// What the console is connected to.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The launcher's own stdin and stdout.
    Stdio,
    /// A new pseudo-terminal; connect with `screen /dev/pts/N` or similar.
    Pty,
    /// A unix socket the launcher listens on; one client at a time.
    Socket(PathBuf),
    /// Output appended to a file; no input.
    File(PathBuf),
}

/// An open backend, shared by the receive and transmit threads.
pub struct ConsoleBackend {
    kind: Kind,
    _terminal: Option<RawTerminal>,
}

enum Kind {
    Stdio,
    Pty { master: OwnedFd, _slave: OwnedFd, path: PathBuf },
    /// The client is shared with the transmit thread while it writes, so
    /// that the receive thread dropping a client that left cannot close
    /// the fd under that write (and let a new file take its number).
    Socket { listener: UnixListener, path: PathBuf, inode: (u64, u64), client: Mutex<Option<Arc<UnixStream>>> },
    File(std::fs::File),
}

impl ConsoleBackend {
    pub fn open(b: Backend) -> io::Result<ConsoleBackend> {
        let mut terminal = None;
        let kind = match b {
            Backend::Stdio => {
                terminal = RawTerminal::enter(0, Mode::Raw)?;
                Kind::Stdio
            }
            Backend::Pty => open_pty()?,
            Backend::Socket(path) => listen(path)?,
            Backend::File(path) => Kind::File(
                std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot open console file {}: {e}", path.display()))
                })?,
            ),
        };
        Ok(ConsoleBackend { kind, _terminal: terminal })
    }

    pub fn pty_path(&self) -> Option<&Path> {
        match &self.kind {
            Kind::Pty { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The fd to read input from. For a socket with no client, accepts one
    /// (waiting for it in a per-queue thread) or returns `None` (shared
    /// thread, or the thread must stop).
    pub(crate) fn input_fd(&self, q: &QueueCtx) -> Result<Option<RawFd>, Stopped> {
        match &self.kind {
            Kind::Stdio => Ok(Some(0)),
            Kind::Pty { master, .. } => Ok(Some(master.as_raw_fd())),
            Kind::File(_) => Ok(None),
            Kind::Socket { listener, client, .. } => {
                if let Some(s) = client.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    return Ok(Some(s.as_raw_fd()));
                }
                // The listener does not block: std's `accept` goes back to
                // sleep after a signal, so the stop signal could never end
                // it. The thread waits in `poll`, which the signal does end.
                loop {
                    q.check_stop()?;
                    match listener.accept() {
                        Ok((s, _)) => {
                            let fd = s.as_raw_fd();
                            *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(s));
                            return Ok(Some(fd));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if !q.blocking() {
                                return Ok(None);
                            }
                            let mut p = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                            // SAFETY: one valid pollfd; EINTR ends the wait.
                            unsafe { libc::poll(&mut p, 1, -1) };
                        }
                        Err(e) if q.retry_after(&e)? => {}
                        Err(e) => {
                            q.count_error(&format!("console socket accept failed: {e}"));
                            return Ok(None);
                        }
                    }
                }
            }
        }
    }

    /// Input on `fd` ended. Returns true if more input may come later (a
    /// socket client left; the next one will be accepted).
    pub(crate) fn input_closed(&self, fd: RawFd) -> bool {
        if let Kind::Socket { client, .. } = &self.kind {
            let mut c = client.lock().unwrap_or_else(|e| e.into_inner());
            if c.as_ref().is_some_and(|s| s.as_raw_fd() == fd) {
                *c = None;
            }
            return true;
        }
        false
    }

    /// What a shared thread polls for input.
    pub(crate) fn poll_fd(&self) -> Option<RawFd> {
        match &self.kind {
            Kind::Stdio => Some(0),
            Kind::Pty { master, .. } => Some(master.as_raw_fd()),
            Kind::File(_) => None,
            Kind::Socket { listener, client, .. } => Some(
                client
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map_or(listener.as_raw_fd(), |s| s.as_raw_fd()),
            ),
        }
    }

    /// Where output goes (`None`: dropped, e.g. no socket client). The
    /// fd stays open while the returned value lives.
    pub(crate) fn output(&self) -> Option<Output> {
        match &self.kind {
            Kind::Stdio => Some(Output::Fd(1)),
            Kind::Pty { master, .. } => Some(Output::Fd(master.as_raw_fd())),
            Kind::File(f) => Some(Output::Fd(f.as_raw_fd())),
            Kind::Socket { client, .. } => {
                client.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|s| Output::Client(s.clone()))
            }
        }
    }
}

/// An output fd, held open for as long as a write to it lasts.
pub(crate) enum Output {
    /// An fd the backend keeps open for its whole life.
    Fd(RawFd),
    /// The socket's current client.
    Client(Arc<UnixStream>),
}

impl Output {
    pub(crate) fn fd(&self) -> RawFd {
        match self {
            Output::Fd(fd) => *fd,
            Output::Client(s) => s.as_raw_fd(),
        }
    }
}

impl Drop for ConsoleBackend {
    fn drop(&mut self) {
        // Remove the socket file only if it is still ours.
        if let Kind::Socket { path, inode, .. } = &self.kind {
            if file_id(path).is_some_and(|id| id == *inode) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Listens on `path`. A socket file left there by a launcher that is gone
/// is replaced; anything else at `path` (a regular file, a directory, a
/// socket someone still listens on) is refused, never deleted.
fn listen(path: PathBuf) -> io::Result<Kind> {
    use std::os::unix::fs::FileTypeExt;
    let refuse = |why: &str| {
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("console socket path {} {why}: remove it or choose another path", path.display()),
        ))
    };
    match std::fs::symlink_metadata(&path) {
        Ok(m) if !m.file_type().is_socket() => return refuse("exists and is not a socket"),
        Ok(_) if UnixStream::connect(&path).is_ok() => return refuse("is a socket another program listens on"),
        Ok(_) => std::fs::remove_file(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot remove stale console socket {}: {e}", path.display())))?,
        Err(_) => {}
    }
    let listener = UnixListener::bind(&path)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on console socket {}: {e}", path.display())))?;
    let inode = file_id(&path).unwrap_or_default();
    Ok(Kind::Socket { listener, path, inode, client: Mutex::new(None) })
}

fn open_pty() -> io::Result<Kind> {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds; null name/termios/winsize are allowed.
    let r = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    if r < 0 {
        return Err(io::Error::new(io::Error::last_os_error().kind(), "cannot create a pseudo-terminal"));
    }
    // SAFETY: openpty succeeded, both fds are new and ours.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut buf = [0 as libc::c_char; 128];
    // SAFETY: ttyname_r writes a NUL-terminated name into `buf`.
    let r = unsafe { libc::ttyname_r(slave.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: `buf` is NUL-terminated by ttyname_r.
    let path = PathBuf::from(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned());
    // The guest's own tty does line editing and echo; the pty passes bytes.
    make_raw(slave.as_raw_fd(), Mode::Raw)?;
    // We keep the slave open so the master never reads EIO while no one
    // is connected.
    Ok(Kind::Pty { master, _slave: slave, path })
}

