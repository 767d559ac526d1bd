//! Counting the system calls of the device's queue threads only, with
//! `perf stat -e raw_syscalls:sys_enter -t <tids>` (low overhead, unlike
//! `strace -f`, which slows the threads enough to change their batching).

use std::process::{Child, Command, Stdio};

/// Threads of this process whose name starts with one of `prefixes`. A new
/// thread names itself once it runs, so this waits (up to a second) for at
/// least one to show up.
pub fn threads_named(prefixes: &[&str]) -> Vec<(u32, String)> {
    for _ in 0..100 {
        let t = list_threads(prefixes);
        if !t.is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(20));
            return list_threads(prefixes);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Vec::new()
}

fn list_threads(prefixes: &[&str]) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return out };
    for t in dir.flatten() {
        let Ok(tid) = t.file_name().to_string_lossy().parse::<u32>() else { continue };
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_string();
        if prefixes.iter().any(|p| name.starts_with(p)) {
            out.push((tid, name));
        }
    }
    out
}

/// A running `perf stat` on some threads.
pub struct SyscallCounter {
    child: Child,
}

impl SyscallCounter {
    /// Starts counting the syscalls of `tids`; `None` if perf is missing
    /// or not permitted (the bench then reports "n/a").
    pub fn start(tids: &[u32]) -> Option<SyscallCounter> {
        if std::env::var_os("KICKVM_BENCH_DEBUG").is_some() {
            kickvm_rig::note!("perf: counting threads {tids:?}");
        }
        if tids.is_empty() {
            return None;
        }
        ensure_tracefs();
        let list: Vec<String> = tids.iter().map(|t| t.to_string()).collect();
        let child = Command::new("perf")
            .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-t", &list.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        // perf needs a moment to attach before the workload starts.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Some(SyscallCounter { child })
    }

    /// Stops counting; returns the total.
    pub fn stop(self) -> Option<u64> {
        // SAFETY: sending SIGINT to our own child process.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let out = self.child.wait_with_output().ok()?;
        let text = String::from_utf8_lossy(&out.stderr);
        if std::env::var_os("KICKVM_BENCH_DEBUG").is_some() {
            kickvm_rig::note!("perf: {text}");
        }
        text.lines()
            .filter(|l| l.contains("raw_syscalls:sys_enter"))
            .filter_map(|l| l.split(',').next()?.trim().parse::<u64>().ok())
            .reduce(|a, b| a + b)
    }
}

/// perf's syscall tracepoints live in tracefs; mount it if it is not (as
/// root this works; otherwise perf fails and the bench reports "n/a").
fn ensure_tracefs() {
    if !std::path::Path::new("/sys/kernel/tracing/events/raw_syscalls").exists() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
            .stderr(Stdio::null())
            .status();
    }
}
