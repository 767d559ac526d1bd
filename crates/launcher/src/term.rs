//! Raw mode for the terminal the guest's console is on, so keys reach the
//! guest one by one and unechoed (the guest echoes). Signal keys stay
//! active: Ctrl-C ends the VM through the launcher's SIGINT handling.

use std::os::fd::RawFd;

/// Restores the saved terminal settings when dropped.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

/// True if `fd` is a terminal.
pub fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the fd.
    unsafe { libc::isatty(fd) == 1 }
}

impl RawTerminal {
    /// Puts `fd` in raw mode (keeping ISIG); `None` if it is not a tty.
    pub fn enter(fd: RawFd) -> Option<RawTerminal> {
        if !is_tty(fd) {
            return None;
        }
        // SAFETY: a zeroed termios is a valid out-parameter.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_lflag |= libc::ISIG;
        // Keep "\n" → "\r\n" on output, so the launcher's own messages
        // still start at column 0.
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}
