//! The launcher's vCPU / bus / exit plumbing with a real KVM and a guest of
//! a dozen instructions, small enough for the local kvm_pvm (which emulates
//! guest kernel code slowly): boot through the normal bzImage path, print
//! on COM1, then power off or reset through the platform ports.

mod common;

use common::*;

#[test]
fn tiny_guest_prints_on_serial_and_powers_off() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = scratch("poweroff");
    let code = serial_then_out(b"hello from a tiny guest\n", 0x3c0, (5 << 2) | (1 << 5));
    let k = write(&dir, "bzImage", &fake_bzimage(&code));
    let t = std::time::Instant::now();
    let out = run(&["run", "--kernel", k.to_str().unwrap(), "--memory", "16M", "--cpus", "2", "--allow-slow-kvm"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "status {:?}, stderr: {stderr}", out.status);
    assert_eq!(stdout, "hello from a tiny guest\n");
    eprintln!("tiny guest ran in {:?}", t.elapsed());
    let _ = std::fs::remove_dir_all(dir);
}

/// The same through an ELF vmlinux's PVH entry: 32-bit protected mode,
/// `%ebx` at the start info (the guest prints only if its magic is there).
#[test]
fn tiny_vmlinux_boots_through_its_pvh_entry_and_powers_off() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = scratch("pvh");
    let code = pvh_serial_then_out(b"hello from a PVH entry\n", 0x3c0, (5 << 2) | (1 << 5));
    let k = write(&dir, "vmlinux", &fake_vmlinux(&code));
    let rd = write(&dir, "initrd", b"070701");
    let out = run(&["run", "--kernel", k.to_str().unwrap(), "--initrd", rd.to_str().unwrap(), "--memory", "32M", "--allow-slow-kvm"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "status {:?}, stderr: {stderr}", out.status);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from a PVH entry\n");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tiny_guest_reset_ends_the_launcher_with_no_reboot() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = scratch("reset");
    let code = serial_then_out(b"resetting\n", 0x64, 0xfe);
    let k = write(&dir, "bzImage", &fake_bzimage(&code));
    let out = run(&["run", "--kernel", k.to_str().unwrap(), "--memory", "16M", "--no-reboot", "--allow-slow-kvm"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Not 0, which a power-off gives: a panicking guest reboots this way.
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "resetting\n");
    assert!(stderr.contains("--no-reboot"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A supervisor whose log pipes died: the launcher's own lines cannot be
/// written, the guest's serial output neither, and the status is still
/// the one the guest's end gives (3 for a reset with `--no-reboot`), not a
/// panic's 101.
#[test]
fn closed_stdout_and_stderr_do_not_change_the_exit_status() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = scratch("reset-closed");
    let k = write(&dir, "bzImage", &fake_bzimage(&serial_then_out(b"resetting\n", 0x64, 0xfe)));
    let closed = || {
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        writer
    };
    let status = kickvm()
        .args(["run", "--kernel", k.to_str().unwrap(), "--memory", "16M", "--no-reboot", "--allow-slow-kvm"])
        .stdin(std::process::Stdio::null())
        .stdout(closed())
        .stderr(closed())
        .status()
        .expect("kickvm runs");
    assert_eq!(status.code(), Some(3));
    // A mistake on the command line: 2, and a missing kernel: 1.
    for (args, code) in [(&["run", "--bogus"][..], 2), (&["run", "--kernel", "/nonexistent/kernel"], 1), (&["bogus"], 2)] {
        let status = kickvm().args(args).stdout(closed()).stderr(closed()).status().expect("kickvm runs");
        assert_eq!(status.code(), Some(code), "kickvm {args:?} with stdout and stderr closed");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sigterm_stops_a_spinning_guest_cleanly() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = scratch("sigterm");
    let k = write(&dir, "bzImage", &fake_bzimage(&serial_then_spin(b"spinning\n")));
    let child = kickvm()
        .args(["run", "--kernel", k.to_str().unwrap(), "--memory", "16M", "--cpus", "2", "--allow-slow-kvm"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: sends SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(t.elapsed() < std::time::Duration::from_secs(5), "took {:?}", t.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "stderr: {stderr}");
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "spinning\n");
    let _ = std::fs::remove_dir_all(dir);
}

/// (name, seccomp mode, number of filters) of every thread of `pid`.
fn thread_filters(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default().trim().to_string();
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
        };
        out.push((comm, field("Seccomp:"), field("Seccomp_filters:")));
    }
    out
}

/// Every thread of a running launcher is under a seccomp filter by default
/// (main: its allow list; vCPUs and stdin: their own lists on top), and
/// none with `--seccomp off`.
#[test]
fn every_thread_runs_under_its_seccomp_filter() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = scratch("seccomp");
    let mut code = serial_then_out(b"spinning\n", 0x80, 0);
    let spin = code.len() - b"spinning\n".len() - 3;
    code[spin..spin + 3].copy_from_slice(&[0xfa, 0xeb, 0xfe]); // cli; 1: jmp 1b
    let k = write(&dir, "bzImage", &fake_bzimage(&code));
    for (mode, filtered) in [("on", true), ("off", false)] {
        let child = kickvm()
            .args(["run", "--kernel", k.to_str().unwrap(), "--memory", "16M", "--cpus", "2", "--allow-slow-kvm"])
            .args(["--seccomp", mode])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until both vCPUs run.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut threads = thread_filters(child.id());
        while threads.iter().filter(|t| t.0.starts_with("vcpu")).count() < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            threads = thread_filters(child.id());
        }
        // SAFETY: sends SIGTERM to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "stderr: {stderr}");
        let names: Vec<&str> = threads.iter().map(|t| t.0.as_str()).collect();
        for want in ["kickvm", "vcpu0", "vcpu1", "stdin"] {
            assert!(names.contains(&want), "{mode}: thread {want} in {names:?}");
        }
        for (name, seccomp, filters) in &threads {
            if filtered {
                assert_eq!(*seccomp, 2, "{name} is filtered");
                let own = if name == "kickvm" { 1 } else { 2 };
                assert!(*filters >= own, "{name}: {filters} filters, want main's and its own");
            } else {
                assert_eq!((*seccomp, *filters), (0, 0), "{name}: --seccomp off installs nothing");
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
