//! What installing a thread's seccomp filter costs the kernel: kickvm's
//! filter (a binary search over the allowed calls,
//! `kickvm_virtio::seccomp::filter`) against seccompiler's for the same
//! calls (each compared in turn), for the lists of kickvm's own kinds of
//! thread. Every thread kickvm starts installs one, the launcher's main,
//! vCPU and stdin threads before the guest's first instruction.
//!
//! Each install runs on a new thread, the two filters taking turns; the
//! figure is that thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`) across
//! the `seccomp(2)` call, which is the kernel checking the filter,
//! translating and JIT-compiling it, and building its per-call action
//! cache.

use kickvm_virtio::seccomp::{self, SeccompMode};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Installs per filter and list.
const INSTALLS: usize = 41;

fn thread_cpu_us() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 * 1e-3
}

/// The CPU time of installing `bpf` on a new thread, µs.
fn install(bpf: &BpfProgram) -> f64 {
    let bpf = bpf.clone();
    std::thread::spawn(move || {
        let t = thread_cpu_us();
        if let Err(e) = seccompiler::apply_filter(&bpf) {
            kickvm_rig::note!("kickvm-bench: cannot install a seccomp filter: {e}");
            std::process::exit(1);
        }
        thread_cpu_us() - t
    })
    .join()
    .unwrap_or(f64::NAN)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run() -> String {
    let vcpu: Vec<&[i64]> = {
        let mut l: Vec<&[i64]> = vec![kickvm::vcpu::SYSCALLS, seccomp::SPAWN_THREADS, seccomp::QUEUE_THREAD];
        l.extend(kickvm::devices::KINDS.iter().map(|k| k.syscalls()));
        l
    };
    let kinds: [(&str, Vec<&[i64]>); 4] = [
        ("main", kickvm::sandbox::main_lists()),
        ("vCPU", vcpu),
        ("virtio-blk queue", vec![seccomp::QUEUE_THREAD, kickvm_virtio::block::SYSCALLS]),
        ("stdin", vec![&[libc::SYS_read]]),
    ];
    let mut md = format!(
        "Installing one thread's seccomp filter: that thread's CPU time across `seccomp(2)`, µs, median of {INSTALLS} \
         installs each, the two filters taking turns.\n\n\
         | thread | calls allowed | kickvm: instructions | seccompiler: instructions | kickvm, µs | seccompiler, µs | kickvm / seccompiler |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for (name, lists) in kinds {
        let Some(ours) = seccomp::filter(&lists, SeccompMode::On) else { continue };
        let mut calls: Vec<i64> = seccomp::RUNTIME.iter().chain(lists.iter().flat_map(|l| l.iter())).copied().collect();
        calls.sort_unstable();
        calls.dedup();
        let rules = calls.iter().map(|&nr| (nr, vec![])).collect();
        let theirs: BpfProgram = match SeccompFilter::new(rules, SeccompAction::Errno(libc::EPERM as u32), SeccompAction::Allow, TargetArch::x86_64)
            .and_then(|f| f.try_into())
        {
            Ok(p) => p,
            Err(e) => {
                kickvm_rig::note!("kickvm-bench: seccompiler cannot build the {name} filter: {e}");
                std::process::exit(1);
            }
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..INSTALLS {
            a.push(install(&ours));
            b.push(install(&theirs));
        }
        let (a, b) = (median(a), median(b));
        md += &format!(
            "| {name} | {} | {} | {} | **{a:.0}** | {b:.0} | **{:.2}** |\n",
            calls.len(),
            ours.len(),
            theirs.len(),
            a / b
        );
    }
    md
}
