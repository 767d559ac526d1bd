//! The few system calls the device servers make, as thin safe wrappers.

use std::io;
use std::os::fd::RawFd;
use std::sync::Once;

fn check(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

fn iov_count(iov: &[libc::iovec]) -> libc::c_int {
    iov.len().min(libc::c_int::MAX as usize) as libc::c_int
}

/// `readv(2)` into iovecs that point into guest memory.
pub fn readv(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: every iovec describes writable mapped memory (guest RAM,
    // checked by `memory::push_iovecs`) and the kernel bounds-checks the fd.
    check(unsafe { libc::readv(fd, iov.as_ptr(), iov_count(iov)) })
}

/// `writev(2)` from iovecs that point into guest memory.
pub fn writev(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: every iovec describes readable mapped memory.
    check(unsafe { libc::writev(fd, iov.as_ptr(), iov_count(iov)) })
}

/// `preadv(2)` at a file offset.
pub fn preadv(fd: RawFd, iov: &[libc::iovec], offset: u64) -> io::Result<usize> {
    // SAFETY: as for `readv`.
    check(unsafe { libc::preadv(fd, iov.as_ptr(), iov_count(iov), offset as libc::off_t) })
}

/// `pwritev(2)` at a file offset.
pub fn pwritev(fd: RawFd, iov: &[libc::iovec], offset: u64) -> io::Result<usize> {
    // SAFETY: as for `writev`.
    check(unsafe { libc::pwritev(fd, iov.as_ptr(), iov_count(iov), offset as libc::off_t) })
}

/// A `readv` that never blocks even on a blocking fd: `preadv2` with
/// `RWF_NOWAIT` at the current position. Fails with `WouldBlock` when no
/// data is ready, or `Unsupported` where the kernel or file lacks it.
pub fn readv_nowait(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: as for `readv`; offset -1 means "current position".
    let r = check(unsafe {
        libc::preadv2(fd, iov.as_ptr(), iov_count(iov), -1, libc::RWF_NOWAIT)
    });
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            Err(io::Error::new(io::ErrorKind::Unsupported, e))
        }
        r => r,
    }
}

/// True if reading `fd` now would block (a zero-timeout poll).
pub fn would_block(fd: RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(&mut p, 1, 0) == 0 }
}

/// The signal used to knock a queue thread out of a blocking system call
/// when it must stop. Its handler does nothing; it is installed without
/// `SA_RESTART`, so the call returns `EINTR` and the thread sees its stop
/// flag. The fast path pays nothing for this.
pub fn wake_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_wake_signal(_: libc::c_int) {}

/// Installs the wake signal's handler (once per process).
pub fn install_wake_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid handler and empty mask is
        // a valid argument; the handler is async-signal-safe (it is empty).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_wake_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(wake_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// Sets or clears `O_NONBLOCK` on a file descriptor.
pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on { flags | libc::O_NONBLOCK } else { flags & !libc::O_NONBLOCK };
        if libc::fcntl(fd, libc::F_SETFL, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reads an eventfd's counter. Unlike `EventFd::read` (which retries on
/// `EINTR` inside `read_exact`), this returns `Interrupted`, so a thread
/// blocked here can be stopped by the wake signal.
pub fn eventfd_read(fd: RawFd) -> io::Result<u64> {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a local u64.
    let r = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    if r == 8 {
        Ok(v)
    } else if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short eventfd read"))
    }
}
