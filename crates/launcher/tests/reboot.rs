//! A guest reboot builds the VM anew from the same options, and checks
//! them again first: a file that changed since the first boot is one clear
//! line, not a hang or a half-built VM. With a tiny guest that resets when
//! a byte arrives on its serial port, so the test decides when.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use common::*;

/// 64-bit code: prints `msg` on COM1, polls the line status register until
/// a byte has been received, then resets through the i8042.
fn print_then_reset_on_input(msg: &[u8]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    c.extend_from_slice(&[0x48, 0x8d, 0x35]); // lea rsi, [rip + disp32]
    let disp_at = c.len();
    c.extend_from_slice(&[0; 4]);
    let lea_end = c.len();
    c.push(0xb9); // mov ecx, imm32
    c.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    c.extend_from_slice(&[0xf3, 0x6e]); // rep outsb
    c.extend_from_slice(&[0x66, 0xba, 0xfd, 0x03]); // mov dx, 0x3fd (LSR)
    c.extend_from_slice(&[0xec, 0xa8, 0x01, 0x74, 0xfb]); // 1: in al, dx; test al, 1; jz 1b
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // 2: hlt; jmp 2b
    let disp = (c.len() - lea_end) as u32;
    c[disp_at..disp_at + 4].copy_from_slice(&disp.to_le_bytes());
    c.extend_from_slice(msg);
    c
}

#[test]
fn a_kernel_gone_before_the_reboot_is_one_line() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = scratch("reboot-gone");
    let k = write(&dir, "bzImage", &fake_bzimage(&print_then_reset_on_input(b"ready\n")));
    let mut child = kickvm()
        .args(["run", "--kernel", k.to_str().unwrap(), "--memory", "16M", "--allow-slow-kvm"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    // The first boot is running; its kernel file goes away, then the guest
    // is told to reboot.
    std::fs::remove_file(&k).unwrap();
    child.stdin.as_mut().unwrap().write_all(b"x").unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(stderr.trim_end(), format!("kickvm: cannot boot again: kernel {}: no such file", k.display()));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_guest_rebooting_in_a_loop_does_not_flood_the_log() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = scratch("reboot-loop");
    // One `b` on COM1 per boot, then a reset.
    let k = write(&dir, "bzImage", &fake_bzimage(&serial_then_out(b"b", 0x64, 0xfe)));
    let child = kickvm()
        .args(["run", "--kernel", k.to_str().unwrap(), "--memory", "16M", "--allow-slow-kvm"])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    // SAFETY: sends SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let boots = out.stdout.iter().filter(|&&b| b == b'b').count();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines = stderr.lines().count();
    eprintln!("{boots} boots, {lines} log lines");
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    if boots < 20 {
        eprintln!("skipped: only {boots} boots in 3 s, too few to tell");
        return;
    }
    // A logged boot costs six lines at debug level; only the first 10 boots
    // and then the 16th, 32nd, ... are logged.
    let logged_boots = 10 + (boots as f64).log2().ceil() as usize;
    assert!(lines <= 7 * logged_boots + 5, "{lines} lines for {boots} boots:\n{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A guest rebooting as fast as it can, with two vCPUs and devices (a
/// disk, rng, the virtio-console on a file): every rebuild of the VM
/// finishes; no boot stalls (the rig's 100-boot run once hung before its
/// 89th guest started). `KICKVM_REBOOT_SECS` sets how long (default 8 s).
#[test]
fn a_guest_rebooting_for_seconds_never_stalls() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let secs: u64 = std::env::var("KICKVM_REBOOT_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let dir = scratch("reboot-stall");
    let k = write(&dir, "bzImage", &fake_bzimage(&serial_then_out(b"b", 0x64, 0xfe)));
    let disk = write(&dir, "disk.img", &vec![0u8; 1 << 20]);
    let console = dir.join("console.out");
    let mut child = kickvm()
        .args(["run", "--kernel", k.to_str().unwrap(), "--memory", "16M", "--cpus", "2", "--allow-slow-kvm", "--rng"])
        .arg("--disk")
        .arg(format!("path={}", disk.display()))
        .arg("--console")
        .arg(format!("file={}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        loop {
            match std::io::Read::read(&mut out, &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(buf[..n].iter().filter(|&&b| b == b'b').count()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let start = std::time::Instant::now();
    let (mut boots, mut longest) = (0usize, std::time::Duration::ZERO);
    let mut last = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(secs) {
        match rx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(n) => {
                if n > 0 {
                    longest = longest.max(last.elapsed());
                    last = std::time::Instant::now();
                }
                boots += n;
            }
            Err(_) => break,
        }
    }
    let stalled = last.elapsed();
    // SAFETY: sends SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr);
    eprintln!("{boots} boots in {secs} s, longest gap {longest:?}");
    assert!(stalled < std::time::Duration::from_secs(10), "no boot for {stalled:?} after boot {boots}: {stderr}");
    assert!(boots >= 10, "only {boots} boots in {secs} s: {stderr}");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}
