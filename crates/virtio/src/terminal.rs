//! Raw mode for a terminal, restored when the guard drops: keys reach the
//! guest one by one and unechoed (the guest echoes), and the user's shell
//! is never left without echo afterwards.
//!
//! Used by the launcher for the serial console on its stdin, and by the
//! virtio console for its stdio and pty backends.

use std::io;
use std::os::fd::RawFd;

/// How raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every byte goes to the guest, Ctrl-C included.
    Raw,
    /// Raw, but Ctrl-C and friends still signal the launcher, and "\n"
    /// still starts a new line on output (the launcher's own messages).
    KeepSignals,
}

/// A terminal in raw mode until this drops.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

/// True if `fd` is a terminal.
pub fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the fd.
    unsafe { libc::isatty(fd) == 1 }
}

fn get(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: a zeroed termios is a valid out-parameter for tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios to fill.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(t)
}

fn set(fd: RawFd, t: &libc::termios) -> io::Result<()> {
    // SAFETY: `t` is a valid termios derived from one the kernel gave.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts `fd` in raw mode for good (a pty's other side, which nobody
/// restores).
pub fn make_raw(fd: RawFd, mode: Mode) -> io::Result<()> {
    let mut t = get(fd)?;
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut t) };
    if mode == Mode::KeepSignals {
        t.c_lflag |= libc::ISIG;
        t.c_oflag |= libc::OPOST | libc::ONLCR;
    }
    set(fd, &t)
}

impl RawTerminal {
    /// Raw mode on `fd` if it is a terminal; `Ok(None)` if it is not.
    pub fn enter(fd: RawFd, mode: Mode) -> io::Result<Option<RawTerminal>> {
        if !is_tty(fd) {
            return Ok(None);
        }
        let saved = get(fd)?;
        make_raw(fd, mode)?;
        Ok(Some(RawTerminal { fd, saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = set(self.fd, &self.saved);
    }
}
