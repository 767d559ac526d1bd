//! The launcher says what a vCPU was doing when the guest triple-faults,
//! and for every vCPU when asked with SIGUSR1: tiny guests on the local
//! KVM (docs/reliability.md, "the L2 triple fault").

mod common;

use common::*;

/// Where the guest maps itself in the kernel-image window: `_text` of
/// the fake System.map below plus a KASLR-like offset of 8 MiB.
const HIGH_BASE: u64 = 0xffff_ffff_8180_0000;

/// A System.map for the tiny guest: `_text` at the usual link address,
/// and `kv_entry` where the guest's code starts (physical 1 MiB).
const SYSTEM_MAP: &str = "ffffffff81000000 T _text\nffffffff81100000 T kv_entry\nffffffff81200000 D kv_data\n";

/// Long-mode code that maps physical 0–2 MiB at [`HIGH_BASE`] (the way a
/// relocated kernel is mapped), jumps there, puts a marker in `rax`, loads
/// an empty IDT and executes `ud2`: #UD cannot be delivered, nor the #DF
/// after it — a triple fault.
fn triple_fault_high() -> Vec<u8> {
    let mut c = Vec::new();
    c.extend_from_slice(&[0x0f, 0x20, 0xd8]); // mov rax, cr3
    c.extend_from_slice(&[0x48, 0xc7, 0xc3, 0x03, 0x00, 0x30, 0x00]); // mov rbx, 0x300003 (PDPT, P|RW)
    c.extend_from_slice(&[0x48, 0x89, 0x98, 0xf8, 0x0f, 0x00, 0x00]); // mov [rax + 511*8], rbx
    c.extend_from_slice(&[0x48, 0xc7, 0xc3, 0x03, 0x10, 0x30, 0x00]); // mov rbx, 0x301003 (PD, P|RW)
    c.extend_from_slice(&[0x48, 0x89, 0x1c, 0x25, 0xf0, 0x0f, 0x30, 0x00]); // mov [0x300000 + 510*8], rbx
    c.extend_from_slice(&[0x48, 0xc7, 0xc3, 0x83, 0x00, 0x00, 0x00]); // mov rbx, 0x83 (2 MiB page at 0, P|RW|PS)
    c.extend_from_slice(&[0x48, 0x89, 0x1c, 0x25, 0x60, 0x10, 0x30, 0x00]); // mov [0x301000 + 12*8], rbx
    c.extend_from_slice(&[0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8]); // mov rax, cr3; mov cr3, rax
    c.extend_from_slice(&[0x48, 0x8d, 0x05]); // lea rax, [rip + disp32] -> `high`
    let disp_at = c.len();
    c.extend_from_slice(&[0; 4]);
    let lea_end = c.len();
    c.extend_from_slice(&[0x48, 0xbb]); // mov rbx, HIGH_BASE
    c.extend_from_slice(&HIGH_BASE.to_le_bytes());
    c.extend_from_slice(&[0x48, 0x01, 0xd8]); // add rax, rbx
    c.extend_from_slice(&[0xff, 0xe0]); // jmp rax
    let high = c.len();
    c[disp_at..disp_at + 4].copy_from_slice(&((high - lea_end) as u32).to_le_bytes());
    c.extend_from_slice(&[0x48, 0xb8]); // mov rax, marker
    c.extend_from_slice(&0x6b69_636b_766du64.to_le_bytes());
    c.extend_from_slice(&[0x6a, 0x00, 0x6a, 0x00]); // push 0; push 0
    c.extend_from_slice(&[0x0f, 0x01, 0x1c, 0x24]); // lidt [rsp]: base 0, limit 0
    c.extend_from_slice(&[0x0f, 0x0b]); // ud2
    c
}

#[test]
fn a_triple_fault_is_logged_with_registers_exits_and_the_guest_symbol() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = scratch("triple");
    let k = write(&dir, "vmlinuz-kvtest", &fake_bzimage(&triple_fault_high()));
    let run = || {
        let out = kickvm()
            .args(["run", "--kernel", k.to_str().unwrap(), "--memory", "16M", "--cpus", "2", "--no-reboot", "--allow-slow-kvm"])
            .env_remove("KICKVM_SYSTEM_MAP")
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(4), "a triple fault with --no-reboot; stderr: {stderr}");
        stderr
    };
    // Without a System.map: the link-time address, from Linux's default
    // `_text`, and the offset.
    let stderr = run();
    if stderr.contains("the vCPU is in its power-on state") {
        // KVM on AMD resets a vCPU on a shutdown: nothing of the fault is
        // left to read (the rig test below covers that case).
        assert!(stderr.contains("vcpu0: triple fault, resetting (#1)") && stderr.contains("vcpu1: state on request"), "{stderr}");
        eprintln!("the faulting vCPU's registers were not checked: this host's KVM resets it on a shutdown (AMD)");
        let _ = std::fs::remove_dir_all(dir);
        return;
    }
    assert!(
        stderr.contains("guest code at rip: link-time address 0xffffffff811002")
            && stderr.contains("(KASLR offset 0x800000, if _text is at 0xffffffff81000000); no symbols: no System.map"),
        "{stderr}"
    );
    write(&dir, "System.map-kvtest", SYSTEM_MAP.as_bytes());
    let stderr = run();
    // At the default log level, one block for the faulting vCPU: its
    // registers as the guest left them (the marker, the empty IDT), and
    // where it was in the guest kernel, KASLR offset found.
    for want in [
        "vcpu0: triple fault, resetting (#1)",
        "rax 0x6b69636b766d",
        "idt base 0x0 limit 0x0",
        "efer 0x",
        "cs 0x0010",
        "guest code at rip: kv_entry+0x2",
        "(KASLR offset 0x800000)",
        "exits: io in 0 out 0, mmio read 0 write 0",
        "mp state",
    ] {
        assert!(stderr.contains(want), "no {want:?} in:\n{stderr}");
    }
    // The other vCPU, still waiting for its INIT/SIPI, says so.
    assert!(stderr.contains("vcpu1: state on request"), "{stderr}");
    assert!(stderr.contains("uninitialized (waiting for INIT/SIPI)"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sigusr1_logs_every_vcpu_and_the_vm_runs_on() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = scratch("sigusr1");
    let k = write(&dir, "bzImage", &fake_bzimage(&serial_then_spin(b"spinning\n")));
    let mut child = kickvm()
        .args(["run", "--kernel", k.to_str().unwrap(), "--memory", "16M", "--cpus", "2", "--allow-slow-kvm"])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "spinning\n");
    let pid = child.id() as i32;
    // A request that lands in the instant between a vCPU's check and its
    // return into the guest waits for that vCPU's next exit (one waiting
    // for INIT/SIPI has none until the launcher stops it): each vCPU
    // answers at least once and never more often than asked.
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let asked = 3;
    for _ in 0..asked {
        // SAFETY: signals our own child.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(child.try_wait().unwrap().is_none(), "SIGUSR1 stopped the launcher");
    }
    // SAFETY: signals our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let stderr = log.join().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "stderr: {stderr}");
    // Every vCPU answered: the spinning one in its loop (its serial output
    // counted), the other waiting for INIT/SIPI; none more than asked.
    for v in ["vcpu0", "vcpu1"] {
        let n = stderr.matches(&format!("{v}: state on request")).count();
        assert!((1..=asked).contains(&n), "{v}: {n} blocks for {asked} requests:\n{stderr}");
    }
    assert!(stderr.contains("uninitialized (waiting for INIT/SIPI)"), "{stderr}");
    let vcpu0 = stderr.split("vcpu0: state on request").nth(1).and_then(|b| b.split("[WARN").next()).unwrap_or_default();
    assert!(vcpu0.contains("exits: io in 0 out ") && !vcpu0.contains("exits: io in 0 out 0,"), "{stderr}");
    assert!(vcpu0.contains("guest code at rip: not in the kernel image"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The same triple fault under KVM on AMD (the rig's L1): KVM has reset
/// the vCPU before the launcher can read it, and the block says so; the
/// RIP at the fault is in L1's `kvm:kvm_exit` trace, which the rig turns
/// on for shutdown exits around every command.
#[test]
fn a_triple_fault_under_amd_kvm_is_said_to_have_reset_the_vcpu_and_l1_traces_its_rip() {
    if let Some(passed) = kickvm_rig::reexec_test_in_rig_if_needed(
        "a_triple_fault_under_amd_kvm_is_said_to_have_reset_the_vcpu_and_l1_traces_its_rip",
    ) {
        assert!(passed, "failed inside the rig");
        return;
    }
    let amd = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default().lines().any(|l| l.starts_with("flags") && l.contains(" svm"));
    let trace = std::path::Path::new("/sys/kernel/tracing/trace");
    if !amd || !trace.exists() {
        eprintln!("skipped: needs KVM on AMD with tracefs (the rig's L1)");
        return;
    }
    let dir = scratch("triple-amd");
    let code = triple_fault_high();
    let k = write(&dir, "vmlinuz-kvtest", &fake_bzimage(&code));
    let out = kickvm()
        .args(["run", "--kernel", k.to_str().unwrap(), "--memory", "16M", "--no-reboot"])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "a triple fault with --no-reboot; stderr: {stderr}");
    assert!(stderr.contains("vcpu0: triple fault, resetting (#1)") && stderr.contains("the vCPU is in its power-on state"), "{stderr}");
    // The `ud2` is the code's last instruction: physical 1 MiB + 0x200
    // (the 64-bit entry) + its offset, mapped at HIGH_BASE.
    let rip = HIGH_BASE + 0x10_0200 + code.len() as u64 - 2;
    let traced = std::fs::read_to_string(trace).unwrap_or_default();
    assert!(traced.contains(&format!("reason shutdown rip {rip:#x}")), "no shutdown at {rip:#x} in L1's trace:\n{traced}");
    let _ = std::fs::remove_dir_all(dir);
}
