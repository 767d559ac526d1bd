//! `--only setup`: each VMM's own work before its guest's first
//! instruction, at native speed, on this host itself (no rig).
//!
//! In the rig, a VMM's CPU time to `/init` is mostly L1's kernel zeroing
//! the pages the VMM and its guest touch first, under TCG (~10 ms per MiB,
//! docs/benchmarks.md): the same memory costs every VMM the same, and a
//! real host zeroes it ~1000 times faster. Up to the guest's first
//! instruction, though, a VMM runs no guest code, so it can run here even
//! where `/dev/kvm` cannot run a Linux kernel at useful speed (kvm_pvm):
//! launch, set up, load the kernel and initramfs, create the vCPUs, enter
//! the guest. That part is the VMM's alone, and here it is measured at the
//! host's own speed.
//!
//! Per run: the VMM is started as the boot benchmark starts it (same
//! kernel, initramfs, command line, 1 vCPU, 256 MiB, no devices); the
//! first `KVM_RUN` ioctl of its threads (`syscalls:sys_enter_ioctl`
//! filtered on the command; `set_event_pid` and `event-fork`) stops it (`SIGSTOP`, from the
//! thread reading `trace_pipe`); its RSS and threads are read; it is
//! killed and reaped with `wait4`, whose `rusage` gives its CPU time in
//! microseconds (exited threads included). Between the event and the stop
//! the vCPU may run a little guest code (under kvm_pvm, emulated in the
//! kernel): well under a millisecond, the same for every VMM.
//!
//! QEMU `-M pc`'s first instruction is its firmware's: it has read the
//! kernel and initramfs by then, but SeaBIOS copies them into guest RAM
//! later (fw_cfg), so that copy is not in its figure. kickvm decompresses
//! the bzImage before its first instruction (`--decompress-in-guest`
//! leaves that to the guest), and all others load the kernel whole.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::Duration;

use crate::{die, list, md_flush, median, range, spawn, warm_up, Opts, Vmm};

/// What one run measured, at the guest's first instruction.
struct Setup {
    /// Launch → first instruction, seconds.
    to_first: f64,
    /// The process's CPU time (user + system, all threads), seconds.
    cpu: f64,
    /// Its resident memory, MiB.
    rss: f64,
    /// Its threads.
    threads: usize,
}

/// The trace event that marks the guest's start: the first `KVM_RUN`
/// ioctl (the same on every host; kvm_pvm has no `kvm_entry` event).
const FIRST_RUN_EVENT: &str = "syscalls/sys_enter_ioctl";
const FIRST_RUN_FILTER: &str = "cmd == 0xae80";
const TRACING: &str = "/sys/kernel/tracing";

/// Stops the next VMM this process starts at its guest's first
/// instruction: armed before the start (this process's pid in
/// `set_event_pid`, with `event-fork`: its children and their threads
/// follow), a thread waiting on `trace_pipe` for [`FIRST_RUN_EVENT`] sends
/// the VMM ([`StopAtFirstCode::target`]) `SIGSTOP` and returns the event's
/// monotonic time.
struct StopAtFirstCode {
    at: std::sync::mpsc::Receiver<Option<f64>>,
    target: Arc<AtomicI32>,
    done: Arc<AtomicBool>,
}

impl StopAtFirstCode {
    fn arm() -> Result<StopAtFirstCode, String> {
        let t = Path::new(TRACING);
        if !t.join("events").exists() {
            let _ = std::process::Command::new("mount").args(["-t", "tracefs", "t", TRACING]).status();
        }
        let w = |f: &str, v: &str| fs::write(t.join(f), v).map_err(|e| format!("cannot write {v:?} to {TRACING}/{f}: {e}"));
        Self::disarm();
        w("trace_clock", "mono")?;
        w("options/overwrite", "0")?;
        // poll(2) on trace_pipe wakes at this fill level; 0: on any event.
        w("buffer_percent", "0")?;
        w("options/event-fork", "1")?;
        w("set_event_pid", &std::process::id().to_string())?;
        w("trace", "")?;
        let pipe = File::open(t.join("trace_pipe")).map_err(|e| format!("cannot open {TRACING}/trace_pipe: {e}"))?;
        let (tx, rx) = channel();
        let (done, target) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicI32::new(0)));
        let (stopped, vmm) = (done.clone(), target.clone());
        std::thread::spawn(move || {
            // Polled, so that a run that never reaches its guest does not
            // leave a reader behind to take the next run's event.
            let mut poll = libc::pollfd { fd: pipe.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: `poll` is one valid pollfd for the open pipe.
            while unsafe { libc::poll(&mut poll, 1, 50) } < 1 {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
            }
            let mut line = String::new();
            let read = BufReader::new(pipe).read_line(&mut line);
            // The VMM's first KVM_RUN comes milliseconds after its start
            // returned (and `target` was set).
            let pid = vmm.load(Ordering::Acquire);
            if pid > 0 {
                // SAFETY: kill has no memory preconditions; `pid` is our
                // child, not yet reaped (the run waits for this thread's
                // answer first), so the number cannot have been reused.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
            }
            // `  vcpu0-123  [000] .....  1234.567890: sys_ioctl(fd: ...`
            let at = read.ok().and_then(|_| {
                let (head, _) = line.split_once(": sys_ioctl")?;
                head.split_whitespace().last()?.parse().ok()
            });
            let _ = tx.send(at);
        });
        w(&format!("events/{FIRST_RUN_EVENT}/filter"), FIRST_RUN_FILTER)?;
        w(&format!("events/{FIRST_RUN_EVENT}/enable"), "1")?;
        Ok(StopAtFirstCode { at: rx, target, done })
    }

    /// The VMM just started, to stop.
    fn target(&self, pid: i32) {
        self.target.store(pid, Ordering::Release);
    }

    /// The event's time, once the process is stopped.
    fn wait(&self, timeout: Duration) -> Result<f64, String> {
        match self.at.recv_timeout(timeout) {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err("unreadable trace line".into()),
            Err(_) => Err(format!("no guest instruction within {timeout:?}")),
        }
    }

    /// Switches the events and the pid filter off again.
    fn disarm() {
        let t = Path::new(TRACING);
        let _ = fs::write(t.join(format!("events/{FIRST_RUN_EVENT}/enable")), "0");
        let _ = fs::write(t.join(format!("events/{FIRST_RUN_EVENT}/filter")), "0");
        let _ = fs::write(t.join("set_event_pid"), "");
        let _ = fs::write(t.join("options/event-fork"), "0");
        let _ = fs::write(t.join("buffer_percent"), "50");
    }
}

impl Drop for StopAtFirstCode {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        Self::disarm();
    }
}

fn setup_once(o: &Opts, vmm: Vmm, run: usize) -> Result<Setup, String> {
    warm_up(o, vmm);
    warm_host_memory();
    let stop = StopAtFirstCode::arm()?;
    let r = spawn(o, vmm, "exit 0", false, &format!("setup-{}-{run}.log", vmm.short()));
    let (pid, r_launched) = (r.pid(), r.launched);
    stop.target(pid);
    let at = stop.wait(Duration::from_secs(30));
    drop(stop);
    let rss = fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse::<f64>().ok()))
        .map(|kib| kib / 1024.0);
    let threads = fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0);
    // SAFETY: as in `StopAtFirstCode::follow`: our child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut status = 0;
    // SAFETY: `status` and `usage` are valid to write; `pid` is our child.
    if unsafe { libc::wait4(pid, &mut status, 0, &mut usage) } != pid {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()));
    }
    drop(r); // reaped already: its drop finds nothing to kill
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    let at = at?;
    Ok(Setup {
        to_first: at - r_launched,
        cpu: secs(usage.ru_utime) + secs(usage.ru_stime),
        rss: rss.ok_or("no VmRSS")?,
        threads,
    })
}

/// How much free memory [`warm_host_memory`] touches.
const WARM_MIB: usize = 512;

/// Touches [`WARM_MIB`] of memory in huge pages and gives it back. A host
/// that is itself a VM (ours are) backs its memory on first touch: a VMM
/// that gets never-touched pages pays the outer host's faults too (64 MiB
/// of huge pages: ~110–190 ms on first touch here, 9 ms afterwards), and
/// which VMM gets them would decide the figures. A real host has no such
/// cost. Done right before each launch: this host hands free 2 MiB blocks
/// back to its own host (free page reporting) about 2 s after they are
/// freed, which makes them cold again.
fn warm_host_memory() {
    let len = WARM_MIB << 20;
    // SAFETY: a fresh anonymous private mapping; nothing else refers to it.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    if p == libc::MAP_FAILED {
        return kickvm_rig::note!("bench: setup: could not map {WARM_MIB} MiB to warm the host's memory");
    }
    // SAFETY: `p..p+len` is the mapping just made, writable, ours alone;
    // it is unmapped once, here, after the last write.
    unsafe {
        libc::madvise(p, len, libc::MADV_HUGEPAGE);
        for off in (0..len).step_by(4096) {
            (p as *mut u8).add(off).write_volatile(1);
        }
        libc::munmap(p, len);
    }
}

/// The setup benchmark: `o.boot_runs` interleaved runs of each of
/// `o.boot_vmms`, then the table and the ratios, printed and saved.
pub(crate) fn setup_bench(o: &Opts, md: &mut String) {
    if !Path::new(TRACING).exists() {
        die(&format!("{TRACING} is missing: the setup benchmark needs the kernel's trace events"));
    }
    let vmms: Vec<Vmm> = o.boot_vmms.iter().copied().filter(|v| *v != Vmm::KickvmApi && *v != Vmm::QemuMicrovm).collect();
    let mut runs: Vec<Vec<Setup>> = vmms.iter().map(|_| Vec::new()).collect();
    for run in 0..o.boot_runs {
        for (i, v) in vmms.iter().enumerate() {
            match setup_once(o, *v, run) {
                Ok(s) => {
                    kickvm_rig::note!(
                        "bench: setup {} run {run}: first instruction {:.1} ms, cpu {:.1} ms, rss {:.1} MiB, {} threads",
                        v.label(),
                        s.to_first * 1e3,
                        s.cpu * 1e3,
                        s.rss,
                        s.threads
                    );
                    runs[i].push(s);
                }
                Err(e) => kickvm_rig::note!("bench: setup {} run {run}: FAILED: {e}", v.label()),
            }
        }
    }
    md.push_str(&setup_table(o, &vmms, &runs));
    kickvm_rig::say_raw!("{md}");
    md_flush(o, md);
}

fn setup_table(o: &Opts, vmms: &[Vmm], runs: &[Vec<Setup>]) -> String {
    let mut md = String::new();
    let n = runs.iter().map(Vec::len).max().unwrap_or(0);
    let _ = writeln!(md, "### The VMM's own work before its guest's first instruction, at native speed\n");
    let _ = writeln!(
        md,
        "On this host itself, no rig (crates/bench/src/bin/kickvm-vmm-bench/setup.rs says how): launch → the guest's first \
         instruction (the first `KVM_RUN` ioctl, a `syscalls:sys_enter_ioctl` event), the process's CPU time then (`wait4` rusage, user + system, \
         all threads), its RSS and threads. Before each launch {WARM_MIB} MiB of the host's memory is touched in huge pages and freed (this host is a VM \
         whose free memory goes back to its own host and is backed again on first touch; `warm_host_memory` says why). {n} runs each, interleaved; medians, then the runs. {} Each VMM as in the boot benchmark.\n",
        if o.allow_slow_kvm { "This host's KVM is kvm_pvm: kickvm ran with `--allow-slow-kvm`." } else { "" }
    );
    let _ = writeln!(md, "| VMM | launch → first instruction, ms | range | CPU, ms | runs | RSS, MiB | threads |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    let col = |i: usize, f: fn(&Setup) -> f64| -> Vec<f64> { runs[i].iter().map(f).collect() };
    for (i, v) in vmms.iter().enumerate() {
        let (first, cpu) = (col(i, |s| s.to_first * 1e3), col(i, |s| s.cpu * 1e3));
        let _ = writeln!(
            md,
            "| {} | **{:.1}** | {} | **{:.1}** | {} | {:.1} | {:.0} |",
            v.label(),
            median(&first),
            range(&first, 1),
            median(&cpu),
            list(&cpu, 1),
            median(&col(i, |s| s.rss)),
            median(&col(i, |s| s.threads as f64))
        );
    }
    let med = |want: Vmm, f: fn(&Setup) -> f64| vmms.iter().position(|v| *v == want).filter(|i| !runs[*i].is_empty()).map(|i| median(&col(i, f)));
    let _ = writeln!(md, "\n| ratio (medians) | CPU | goal | launch → first instruction |\n|---|---|---|---|");
    let kickvms = [Vmm::Kickvm("per-queue"), Vmm::KickvmVmlinux, Vmm::KickvmGuestDecompress];
    for (peer, goal) in [(Vmm::QemuPc, "≤ 0.3"), (Vmm::Firecracker, "≤ 1.0"), (Vmm::CloudHypervisor, "")] {
        for k in kickvms {
            if let (Some(c), Some(p), Some(a), Some(b)) = (med(k, |s| s.cpu), med(peer, |s| s.cpu), med(k, |s| s.to_first), med(peer, |s| s.to_first)) {
                let _ = writeln!(md, "| {} / {} | **{:.2}** | {goal} | {:.2} |", k.label(), peer.label(), c / p, a / b);
            }
        }
    }
    let _ = writeln!(md);
    md
}
