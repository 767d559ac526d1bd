//! The few system calls the device servers make, as thin safe wrappers.

use std::io;
use std::os::fd::RawFd;
use std::sync::Once;

use crate::memory::GuestIovecs;

/// A system call's return value as a result (`errno` on failure).
pub(crate) fn check(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// `readv(2)` into guest buffers.
pub fn readv(fd: RawFd, iov: &GuestIovecs) -> io::Result<usize> {
    let v = iov.as_raw();
    // SAFETY: every iovec describes mapped guest memory that `iov` keeps
    // mapped (see `GuestIovecs`); the kernel checks the fd and copies.
    check(unsafe { libc::readv(fd, v.as_ptr(), v.len() as libc::c_int) })
}

/// `writev(2)` from guest buffers.
pub fn writev(fd: RawFd, iov: &GuestIovecs) -> io::Result<usize> {
    let v = iov.as_raw();
    // SAFETY: as for `readv`; the kernel only reads the buffers.
    check(unsafe { libc::writev(fd, v.as_ptr(), v.len() as libc::c_int) })
}

/// `preadv(2)` at a file offset into guest buffers.
pub fn preadv(fd: RawFd, iov: &GuestIovecs, offset: u64) -> io::Result<usize> {
    let v = iov.as_raw();
    let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: as for `readv`.
    check(unsafe { libc::preadv(fd, v.as_ptr(), v.len() as libc::c_int, offset) })
}

/// `pwritev(2)` at a file offset from guest buffers.
pub fn pwritev(fd: RawFd, iov: &GuestIovecs, offset: u64) -> io::Result<usize> {
    let v = iov.as_raw();
    let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: as for `writev`.
    check(unsafe { libc::pwritev(fd, v.as_ptr(), v.len() as libc::c_int, offset) })
}

/// A `readv` that never blocks even on a blocking fd: `preadv2` with
/// `RWF_NOWAIT` at the current position. Fails with `WouldBlock` when no
/// data is ready, or `Unsupported` where the kernel or file lacks it.
pub fn readv_nowait(fd: RawFd, iov: &GuestIovecs) -> io::Result<usize> {
    let v = iov.as_raw();
    // SAFETY: as for `readv`; offset -1 means "current position".
    let r = check(unsafe { libc::preadv2(fd, v.as_ptr(), v.len() as libc::c_int, -1, libc::RWF_NOWAIT) });
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            Err(io::Error::new(io::ErrorKind::Unsupported, e))
        }
        r => r,
    }
}

/// Sleeps for `d`, or less if the thread is sent the wake signal (unlike
/// `std::thread::sleep`, which goes back to sleep after a signal): a queue
/// thread that pauses can still be stopped at once.
pub fn pause(d: std::time::Duration) {
    let ts = libc::timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a valid timespec; the remaining time is not wanted.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}

/// A `readv` that never sleeps: `RWF_NOWAIT`, or where the kernel or the
/// file lacks it (`*nowait` is then cleared for next time) a zero-timeout
/// poll before a plain read. `WouldBlock` when nothing is ready.
pub fn read_nowait(fd: RawFd, iov: &GuestIovecs, nowait: &mut bool) -> io::Result<usize> {
    if *nowait {
        match readv_nowait(fd, iov) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => *nowait = false,
            r => return r,
        }
    }
    if would_block(fd) {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    readv(fd, iov)
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

/// Sends `thread` the wake signal until it has finished (a signal sent
/// just before it enters a blocking call would be lost, so one is not
/// enough), then joins it. The caller has told the thread to stop.
pub fn wake_until_finished<T>(thread: std::thread::JoinHandle<T>) -> std::thread::Result<T> {
    use std::os::unix::thread::JoinHandleExt;
    install_wake_handler();
    let pthread = thread.as_pthread_t();
    let mut wait = std::time::Duration::from_micros(50);
    while !thread.is_finished() {
        // SAFETY: the thread has not been joined, so its pthread_t is
        // valid; the wake signal's handler is installed and does nothing.
        unsafe { libc::pthread_kill(pthread, wake_signal()) };
        std::thread::sleep(wait);
        wait = (wait * 2).min(std::time::Duration::from_millis(20));
    }
    thread.join()
}

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
