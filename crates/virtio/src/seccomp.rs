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

use seccompiler::sock_filter;

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
    let Some(bpf) = filter(lists, mode) else { return Ok(()) };
    seccompiler::apply_filter(&bpf).map_err(|source| SeccompError::Install { kind: kind.to_string(), source })
}

/// The filter [`apply`] installs for `lists` (and [`RUNTIME`]) in `mode`;
/// `None` for `off`.
pub fn filter(lists: &[&[i64]], mode: SeccompMode) -> Option<Vec<sock_filter>> {
    let deny = match mode {
        SeccompMode::Off => return None,
        SeccompMode::On => libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        SeccompMode::Log => libc::SECCOMP_RET_LOG,
    };
    let mut allowed: Vec<u32> = RUNTIME.iter().chain(lists.iter().flat_map(|l| l.iter())).filter_map(|&nr| u32::try_from(nr).ok()).collect();
    allowed.sort_unstable();
    allowed.dedup();
    Some(program(&allowed, deny))
}

/// `AUDIT_ARCH_*` of the system calls a filter allows; any other is a
/// call through another ABI (32-bit `int 0x80` on x86-64), whose numbers
/// mean other calls: it kills the process.
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 183 | 0x8000_0000 | 0x4000_0000;
#[cfg(not(target_arch = "aarch64"))]
const AUDIT_ARCH: u32 = 62 | 0x8000_0000 | 0x4000_0000;

/// Calls compared one by one at the leaves of [`program`]'s search.
const LEAF: usize = 4;

/// The classic-BPF filter allowing exactly the system calls `allowed`
/// (sorted, distinct) of [`AUDIT_ARCH`] and returning `deny` for any other
/// number: the architecture check, then a binary search over `allowed`
/// that ends in a few comparisons.
///
/// The kernel's cost of installing a filter — checking it, translating it
/// to eBPF, compiling that, and working out for each of the ~450 system
/// call numbers whether the filter allows it whatever the arguments (its
/// action cache, which then answers every allowed call without running
/// the filter) — grows with the filter's length and with the path one
/// number takes through it. A list of n calls compared in turn
/// (seccompiler emits five instructions per call) costs ~5 n instructions
/// and paths of up to 2 n; this is ~2 n instructions and paths of
/// ~2 log2 n, which makes installing a thread's filter several times
/// cheaper, on every thread kickvm starts. What the filter decides is
/// the same (`the_search_decides_as_a_list_compared_in_turn`).
fn program(allowed: &[u32], deny: u32) -> Vec<sock_filter> {
    use libc::{BPF_ABS, BPF_JA, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};
    fn op(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
        sock_filter { code: code as u16, jt, jf, k }
    }
    // Jumps go forward only; a conditional one reaches at most 255
    // instructions, `ja` any distance.
    fn search(nrs: &[u32], deny: u32, bpf: &mut Vec<sock_filter>) {
        if nrs.len() <= LEAF {
            // Each comparison jumps to the `ret allow` after `ret deny`.
            for (i, &nr) in nrs.iter().enumerate() {
                bpf.push(op(BPF_JMP | BPF_JEQ | BPF_K, nr, (nrs.len() - i) as u8, 0));
            }
            bpf.push(op(BPF_RET | BPF_K, deny, 0, 0));
            bpf.push(op(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW, 0, 0));
            return;
        }
        let (low, high) = nrs.split_at(nrs.len() / 2);
        let mut left = Vec::new();
        search(low, deny, &mut left);
        match u8::try_from(left.len()) {
            // nr >= high[0]: past the lower half's instructions.
            Ok(skip) => bpf.push(op(BPF_JMP | BPF_JGE | BPF_K, high[0], skip, 0)),
            Err(_) => {
                bpf.push(op(BPF_JMP | BPF_JGE | BPF_K, high[0], 0, 1));
                bpf.push(op(BPF_JMP | BPF_JA, left.len() as u32, 0, 0));
            }
        }
        bpf.extend(left);
        search(high, deny, bpf);
    }
    // `struct seccomp_data`: the call's number, then its architecture.
    const NR_AT: u32 = 0;
    const ARCH_AT: u32 = 4;
    let mut bpf = vec![
        op(BPF_LD | BPF_W | BPF_ABS, ARCH_AT, 0, 0),
        op(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH, 1, 0),
        op(BPF_RET | BPF_K, libc::SECCOMP_RET_KILL_PROCESS, 0, 0),
        op(BPF_LD | BPF_W | BPF_ABS, NR_AT, 0, 0),
    ];
    search(allowed, deny, &mut bpf);
    bpf
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

    /// Runs the classic-BPF filter `prog` (the instructions [`program`]
    /// and seccompiler emit) on a call of number `nr` through the ABI
    /// `arch`, as the kernel would: its verdict and how many instructions
    /// it ran.
    fn run(prog: &[sock_filter], nr: u32, arch: u32) -> (u32, usize) {
        use libc::{BPF_ABS, BPF_JA, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};
        let (mut pc, mut a, mut steps) = (0usize, 0u32, 0);
        loop {
            let i = &prog[pc];
            pc += 1;
            steps += 1;
            let jump = |taken: bool| usize::from(if taken { i.jt } else { i.jf });
            match u32::from(i.code) {
                c if c == BPF_LD | BPF_W | BPF_ABS => a = [nr, arch][(i.k / 4) as usize],
                c if c == BPF_JMP | BPF_JEQ | BPF_K => pc += jump(a == i.k),
                c if c == BPF_JMP | BPF_JGE | BPF_K => pc += jump(a >= i.k),
                c if c == BPF_JMP | BPF_JA => pc += i.k as usize,
                c if c == BPF_RET | BPF_K => return (i.k, steps),
                c => panic!("instruction {c:#x}"),
            }
        }
    }

    /// The binary search allows and refuses exactly what seccompiler's
    /// filter of the same list (each call compared in turn) does, for
    /// every call number, through the x32 and 32-bit ABIs too, with lists
    /// small and large enough to need long jumps; and it is the shorter
    /// and faster filter.
    #[test]
    fn the_search_decides_as_a_list_compared_in_turn() {
        use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
        let deny = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let mut seed = 0x2545_f491_u32;
        let mut random = |n: usize| -> Vec<i64> {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    i64::from(seed % 460)
                })
                .collect()
        };
        let lists: Vec<Vec<i64>> = vec![
            [QUEUE_THREAD, SPAWN_THREADS, crate::block::SYSCALLS].concat(),
            vec![],
            vec![0],
            (0..460).collect(),
            (0..460).step_by(3).collect(),
            random(7),
            random(60),
            random(300),
        ];
        for list in lists {
            let all: Vec<i64> = RUNTIME.iter().chain(&list).copied().collect();
            let mut allowed: Vec<u32> = all.iter().map(|&nr| nr as u32).collect();
            allowed.sort_unstable();
            allowed.dedup();
            let ours = program(&allowed, deny);
            let rules = all.iter().map(|&nr| (nr, vec![])).collect();
            let theirs: BpfProgram =
                SeccompFilter::new(rules, SeccompAction::Errno(libc::EPERM as u32), SeccompAction::Allow, TargetArch::x86_64)
                    .unwrap()
                    .try_into()
                    .unwrap();
            let (mut longest, mut theirs_longest) = (0, 0);
            for nr in (0..1100).chain([0x4000_0000, 0x4000_0001, 0x4000_0000 + 232, u32::MAX]) {
                for arch in [AUDIT_ARCH, 0x4000_0003] {
                    let (got, steps) = run(&ours, nr, arch);
                    let (want, their_steps) = run(&theirs, nr, arch);
                    assert_eq!(got, want, "call {nr:#x}, arch {arch:#x}, list of {}", allowed.len());
                    assert_eq!(got == libc::SECCOMP_RET_ALLOW, arch == AUDIT_ARCH && allowed.binary_search(&nr).is_ok());
                    longest = longest.max(steps);
                    theirs_longest = theirs_longest.max(their_steps);
                }
            }
            let n = allowed.len();
            let depth = n.div_ceil(LEAF).next_power_of_two().trailing_zeros() as usize;
            assert!(ours.len() <= 2 * n + 2 * n.div_ceil(LEAF) + 6, "{} instructions for {n} calls", ours.len());
            assert!(longest <= 4 + 2 * depth + LEAF + 1, "{longest} steps for {n} calls");
            if n >= 40 {
                assert!(ours.len() * 2 < theirs.len() && longest * 4 < theirs_longest, "{n} calls: {} / {} instructions", ours.len(), theirs.len());
            }
        }
    }

    #[test]
    fn modes_parse() {
        assert_eq!("on".parse(), Ok(SeccompMode::On));
        assert_eq!("false".parse(), Ok(SeccompMode::Off));
        assert!("maybe".parse::<SeccompMode>().is_err());
    }
}
