//! The main thread's seccomp filter: an allow-list.
//!
//! The main thread builds the VM, and builds it again at every guest
//! reboot; under `--api-socket` it also serves the API, builds the VM
//! when asked, and builds the devices plugged into the running VM (disk
//! files opened, TAP fds duplicated, eventfds, KVM's `KVM_IRQ_LINE` for
//! the GED, all in [`BUILD`]). So it opens files and TAPs, maps memory and talks to KVM
//! long after start-up. And every thread it starts (vCPUs, queue threads,
//! stdin, the vhost-user watchers, the API's) inherits its filter before
//! adding its own, so its list must also hold their calls. What it
//! refuses is everything else: starting programs, tracing, mounting,
//! changing identities, loading kernel code, BPF, io_uring, keyrings,
//! the `fork` and `vfork` calls, and every system call added to Linux
//! after this list was written. (`clone` stays, for threads; its flags
//! are not checked, so glibc's `fork()`, which is a `clone`, would pass:
//! but no program can be started after it, `execve` being refused.)
//!
//! The list was taken from `strace -f` of the launcher across the test
//! suite (tiny guests on local KVM, the Debian guest in the rig with every
//! device kind, reboots, the API's lifecycle) and each entry is there for
//! a reason given beside it.

use kickvm_virtio::seccomp::{self, SeccompError, SeccompMode};

/// What building (and tearing down) a VM takes, and serving the API.
pub const BUILD: &[i64] = &[
    // Kernel, initramfs, disks, /dev/kvm, /dev/net/tun, /dev/vhost-net,
    // /sys and /proc (TAP owners, thread names), sockets' paths.
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_close,
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_readv,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getcwd,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_flock,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_fchmod,
    libc::SYS_chmod,
    libc::SYS_fchmodat,
    // KVM, TAP, vhost-net, terminals.
    libc::SYS_ioctl,
    // Guest RAM and the process's own memory.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_memfd_create,
    // Kick, call and stop eventfds; pipes.
    libc::SYS_eventfd2,
    libc::SYS_pipe2,
    // vhost-user frontends, console and vsock sockets, the API socket
    // (TAP fds arrive with SCM_RIGHTS).
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_socketpair,
    // Waiting: for threads, sockets, the guest's exit.
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_sched_yield,
    // Signals: stop signals, waking threads out of blocking calls.
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tkill,
    // Who am I (TAP ownership checks), limits, the host.
    libc::SYS_getpid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getgroups,
    libc::SYS_capget,
    libc::SYS_getrlimit,
    libc::SYS_prlimit64,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_gettimeofday,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrusage,
    libc::SYS_times,
];

/// Every list the main thread's list must hold: its own, and those of
/// every thread it starts.
pub fn main_lists() -> Vec<&'static [i64]> {
    let mut lists = vec![
        BUILD,
        seccomp::SPAWN_THREADS,
        seccomp::QUEUE_THREAD,
        crate::vcpu::SYSCALLS,
        crate::devices::vhost_user::MONITOR_SYSCALLS,
    ];
    lists.extend(crate::devices::KINDS.iter().map(|k| k.syscalls()));
    lists
}

/// Installs the main thread's filter on the calling thread.
pub fn main_thread(mode: SeccompMode) -> Result<(), SeccompError> {
    seccomp::apply("main", &main_lists(), mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    /// The main thread (here a thread installing the very same filter) is
    /// refused starting programs, forking, tracing, mounting, changing
    /// identities, BPF and io_uring; it still opens files (disks, kernels
    /// at reboot) and starts threads.
    #[test]
    fn the_main_thread_is_refused_what_kickvm_never_does() {
        let r = std::thread::spawn(|| {
            main_thread(SeccompMode::On).unwrap();
            // SAFETY: plain system calls with valid (or null) arguments;
            // the program does not exist, so execve replaces nothing even
            // if allowed; fork is the raw clone without CLONE_THREAD, and
            // a child (were it allowed) exits at once.
            unsafe {
                let prog = kickvm_virtio::seccomp::NO_SUCH_PROGRAM;
                let argv = [prog.as_ptr(), std::ptr::null()];
                let exec = (libc::execve(prog.as_ptr(), argv.as_ptr(), std::ptr::null()) as i64, errno());
                let fork = libc::syscall(libc::SYS_fork);
                let fork = if fork == 0 { libc::_exit(0) } else { (fork, errno()) };
                let ptrace = (libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0), errno());
                let mount =
                    (libc::mount(c"none".as_ptr(), c"/".as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null()) as i64, errno());
                let setuid = (libc::syscall(libc::SYS_setuid, 65534), errno());
                let bpf = (libc::syscall(libc::SYS_bpf, 0, 0, 0), errno());
                let uring = (libc::syscall(libc::SYS_io_uring_setup, 1, 0), errno());
                let open = libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if open >= 0 {
                    libc::close(open);
                }
                let thread = std::thread::spawn(|| 7).join().ok();
                ([("execve", exec), ("fork", fork), ("ptrace", ptrace), ("mount", mount), ("setuid", setuid), ("bpf", bpf), ("io_uring_setup", uring)], open, thread)
            }
        })
        .join()
        .unwrap();
        for (what, got) in r.0 {
            assert_eq!(got, (-1, libc::EPERM), "{what}");
        }
        assert!(r.1 >= 0, "the main thread still opens files (disks, kernels at reboot)");
        assert_eq!(r.2, Some(7), "the main thread still starts threads");
    }
}
