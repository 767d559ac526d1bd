//! Seccomp filters, one per kind of thread, installed by each thread on
//! itself once its set-up is done: a thread serving the guest can make
//! only the system calls its job needs. The lists live next to the code
//! that spawns each kind of thread (queue threads: [`QUEUE_THREAD`] here and
//! each device's `SYSCALLS` in its `mod.rs`; vCPUs, stdin and main in the
//! launcher); this module holds what they share.
//!
//! A refused call fails with `EPERM` (`--seccomp on`), so a thread that
//! needed it reports an error rather than killing the VM; `log` allows it
//! and has the kernel log it (audit), to find what a list lacks; `off`
//! installs nothing.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// What `--seccomp` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Calls outside the list fail with `EPERM`.
    #[default]
    On,
    /// Calls outside the list are allowed and logged by the kernel.
    Log,
    /// No filter.
    Off,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" | "true" => Ok(Self::On),
            "log" => Ok(Self::Log),
            "off" | "false" => Ok(Self::Off),
            _ => Err(format!("unknown seccomp mode `{s}`: use on, log or off")),
        }
    }
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::On => "on",
            Self::Log => "log",
            Self::Off => "off",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {kind} seccomp filter: {source}")]
    Build { kind: String, source: seccompiler::BackendError },
    #[error("cannot install the {kind} seccomp filter: {source} (run with --seccomp off where the kernel has no seccomp)")]
    Install { kind: String, source: seccompiler::Error },
}

/// What every kickvm thread does whatever its job: allocate and free
/// memory, wait on locks, take signals (the wake signal), log, read the
/// clock (a real system call in some VMs), sleep, exit.
pub const RUNTIME: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_write,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // A panic's abort path.
    libc::SYS_tgkill,
    libc::SYS_rt_sigaction,
];

/// A queue thread's own calls, beyond [`RUNTIME`] and its workers' lists:
/// read its kick eventfd, write its call eventfd, poll (shared-thread
/// modes), close what a worker drops.
pub const QUEUE_THREAD: &[i64] = &[libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll, libc::SYS_close];

/// What a thread needs to start other threads (queue threads, the
/// vhost-user protocol thread): create it, name it, and let it install
/// its own filter. A new thread inherits its creator's filter before it
/// adds its own, so a creator's list must also hold every call of the
/// threads it starts; each of those then narrows it to its own.
pub const SPAWN_THREADS: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_seccomp,
];

/// Installs on the calling thread a filter allowing [`RUNTIME`] and the
/// calls in `lists`. `kind` names the thread kind in errors.
pub fn apply(kind: &str, lists: &[&[i64]], mode: SeccompMode) -> Result<(), SeccompError> {
    let action = match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::On => SeccompAction::Errno(libc::EPERM as u32),
        SeccompMode::Log => SeccompAction::Log,
    };
    let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = BTreeMap::new();
    for &nr in RUNTIME.iter().chain(lists.iter().flat_map(|l| l.iter())) {
        rules.insert(nr, Vec::new());
    }
    let build = |source| SeccompError::Build { kind: kind.to_string(), source };
    let filter = SeccompFilter::new(rules, action, SeccompAction::Allow, target_arch()).map_err(build)?;
    let bpf: BpfProgram = filter.try_into().map_err(build)?;
    seccompiler::apply_filter(&bpf).map_err(|source| SeccompError::Install { kind: kind.to_string(), source })
}

fn target_arch() -> TargetArch {
    #[cfg(target_arch = "aarch64")]
    return TargetArch::aarch64;
    #[cfg(not(target_arch = "aarch64"))]
    TargetArch::x86_64
}

/// True if thread `tid` of this process runs under a seccomp filter (read
/// from `/proc`, so by a thread allowed to open files).
pub fn thread_filtered(tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Seccomp:").map(|v| v.trim() == "2")))
        .unwrap_or(false)
}

/// A program that does not exist, for the sandbox tests' `execve`: it
/// fails with ENOENT where the call is allowed and EPERM where a filter
/// refuses it. (With a real program, a filter that broke would replace
/// the test process with it, and a program that exits 0 would pass the
/// test.)
#[cfg(any(test, feature = "test-driver"))]
pub const NO_SUCH_PROGRAM: &std::ffi::CStr = c"/nonexistent/kickvm-seccomp-probe";

/// What the calling thread gets, as (return value, errno), for three
/// calls no kickvm thread needs once set up — make a socket, open a file,
/// start a program — and the thread's name: the sandbox tests run it on
/// the very thread whose filter they check.
#[cfg(any(test, feature = "test-driver"))]
pub fn attempt_forbidden() -> ([(i64, i32); 3], String) {
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    // SAFETY: plain system calls with valid (or null) arguments; the
    // program does not exist, so execve replaces nothing even if allowed.
    let r = unsafe {
        let s = (libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) as i64, errno());
        let o = (libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) as i64, errno());
        let argv = [NO_SUCH_PROGRAM.as_ptr(), std::ptr::null()];
        let e = (libc::execve(NO_SUCH_PROGRAM.as_ptr(), argv.as_ptr(), std::ptr::null()) as i64, errno());
        [s, o, e]
    };
    (r, std::thread::current().name().unwrap_or("").to_string())
}

/// [`attempt_forbidden`]'s answer on a filtered thread (`--seccomp on`).
#[cfg(any(test, feature = "test-driver"))]
pub const ALL_REFUSED: [(i64, i32); 3] = [(-1, libc::EPERM); 3];

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a new thread under `lists` (mode on); returns its result
    /// and whether /proc showed the thread filtered while it ran.
    fn under<T: Send + 'static>(lists: &'static [&'static [i64]], f: impl FnOnce() -> T + Send + 'static) -> (T, bool) {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            apply("test", lists, SeccompMode::On).unwrap();
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            go_rx.recv().unwrap();
            f()
        });
        let filtered = thread_filtered(tid_rx.recv().unwrap());
        go_tx.send(()).unwrap();
        (t.join().unwrap(), filtered)
    }

    #[test]
    fn a_queue_thread_cannot_open_files_make_sockets_or_start_programs() {
        let ((refused, _), filtered) = under(&[QUEUE_THREAD, crate::block::SYSCALLS], attempt_forbidden);
        assert_eq!(refused, ALL_REFUSED);
        assert!(filtered);
    }

    #[test]
    fn what_a_list_allows_still_works() {
        let fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let (r, filtered) = under(&[QUEUE_THREAD], move || {
            fd.write(3).unwrap();
            crate::sys::eventfd_read(std::os::fd::AsRawFd::as_raw_fd(&fd)).unwrap()
        });
        assert_eq!((r, filtered), (3, true));
    }

    #[test]
    fn modes_parse() {
        assert_eq!("on".parse(), Ok(SeccompMode::On));
        assert_eq!("false".parse(), Ok(SeccompMode::Off));
        assert!("maybe".parse::<SeccompMode>().is_err());
    }
}
