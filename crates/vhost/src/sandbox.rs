//! The process-wide part of a back-end's sandbox; the per-thread part is
//! the seccomp filters (see the crate doc).
//!
//! A back-end keeps, after set-up, exactly: its listening socket, its
//! device's backend (disk file, TAP, console endpoint, entropy source) and
//! the fds each frontend passes (guest memory, kicks, calls). Everything
//! else it could reach is taken away, in the order set-up allows:
//! - at start ([`at_start`]): fds inherited from whoever started us are
//!   closed (a launcher's KVM fd or another guest's disk must not leak into
//!   a process a guest can talk to); `no_new_privs` (no set-uid program can
//!   give back what is dropped, and seccomp needs it); not dumpable (no
//!   core file holds guest memory, and other processes of the same user
//!   cannot `ptrace` it or read its memory through `/proc`);
//! - after the device is built and the socket bound ([`drop_user`], with
//!   `--user UID[:GID]`): a back-end started as root (to open a TAP, or a
//!   disk only root may write) becomes that user, with no supplementary
//!   groups, so even a thread that escaped its filter is not root;
//! - then each thread's filter: none may open a file, make a socket or
//!   start a program, so the file system is out of reach without a mount
//!   namespace (docs/security.md says why no namespace is entered).

use std::io;

/// Closes every fd above stderr, sets `no_new_privs` and makes the
/// process not dumpable. Call first, before anything is opened.
pub fn at_start() -> io::Result<()> {
    // SAFETY: closes fds this process has not opened yet (it calls this
    // before opening any) — nothing in it refers to them.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r != 0 {
        return Err(io::Error::other(format!("close_range: {}", io::Error::last_os_error())));
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::other(format!("PR_SET_NO_NEW_PRIVS: {}", io::Error::last_os_error())));
    }
    // SAFETY: as above.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::other(format!("PR_SET_DUMPABLE: {}", io::Error::last_os_error())));
    }
    Ok(())
}

/// A user (and group) to run as, `--user UID[:GID]` (numbers: looking
/// names up would read files a back-end has no business with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl std::str::FromStr for RunAs {
    type Err = String;
    fn from_str(s: &str) -> Result<RunAs, String> {
        let bad = || format!("--user `{s}`: use UID or UID:GID, numbers (e.g. --user 65534:65534)");
        let (u, g) = s.split_once(':').unwrap_or((s, s));
        Ok(RunAs { uid: u.parse().map_err(|_| bad())?, gid: g.parse().map_err(|_| bad())? })
    }
}

/// Becomes `who`, with no supplementary groups, for good (real, effective
/// and saved ids). Needs root (CAP_SETUID and CAP_SETGID).
pub fn drop_user(who: RunAs) -> io::Result<()> {
    let step = |what: &str, r: libc::c_int| {
        if r == 0 {
            Ok(())
        } else {
            let e = io::Error::last_os_error();
            let hint = if e.raw_os_error() == Some(libc::EPERM) { " (--user needs the back-end started as root)" } else { "" };
            Err(io::Error::other(format!("--user {}:{}: {what}: {e}{hint}", who.uid, who.gid)))
        }
    };
    // SAFETY: plain system calls on integers (and an empty group list).
    unsafe {
        step("setgroups", libc::setgroups(0, std::ptr::null()))?;
        step("setresgid", libc::setresgid(who.gid, who.gid, who.gid))?;
        step("setresuid", libc::setresuid(who.uid, who.uid, who.uid))?;
    }
    Ok(())
}

/// A multi-queue net back-end that will run as `who`: the guest changes
/// the number of queue pairs at run time, and the kernel attaches or
/// detaches a TAP queue (TUNSETQUEUE) only for the TAP's owner or group,
/// or with CAP_NET_ADMIN, which `--user` drops. Refused at start, with
/// the fix, rather than failing when the guest asks for its queues.
pub fn check_tap_owner(tap: &str, queues: u16, who: RunAs) -> Result<(), String> {
    if queues <= 1 {
        return Ok(());
    }
    let read = |f: &str| std::fs::read_to_string(format!("/sys/class/net/{tap}/{f}")).ok().and_then(|s| s.trim().parse::<i64>().ok());
    let owned = read("owner") == Some(i64::from(who.uid)) || read("group") == Some(i64::from(who.gid));
    if owned {
        return Ok(());
    }
    Err(format!(
        "--user {}:{} with tap={tap},queues={queues}: the guest's queue changes need the TAP to belong to that user; \
         create it so: ip tuntap add {tap} mode tap multi_queue user {}",
        who.uid, who.gid, who.uid
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_parses_as_numbers_only() {
        assert_eq!("65534".parse(), Ok(RunAs { uid: 65534, gid: 65534 }));
        assert_eq!("1000:100".parse(), Ok(RunAs { uid: 1000, gid: 100 }));
        for bad in ["nobody", "1:x", ":1", "-1"] {
            let e = bad.parse::<RunAs>().unwrap_err();
            assert!(e.contains("UID:GID") && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn a_multi_queue_tap_must_belong_to_the_user() {
        let who = RunAs { uid: 65534, gid: 65534 };
        assert!(check_tap_owner("kvnone0", 1, who).is_ok(), "one queue pair never attaches queues");
        let e = check_tap_owner("kvnone0", 2, who).unwrap_err();
        assert!(e.contains("ip tuntap add kvnone0 mode tap multi_queue user 65534") && !e.contains('\n'), "{e}");
    }
}
