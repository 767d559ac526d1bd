//! Every set-up mistake ends kickvm with one clear line on stderr and a
//! non-zero status, before a VM exists.

mod common;

use common::*;

/// Asserts `kickvm run args` fails with exactly one stderr line containing
/// every `needle`.
fn fails_with(args: &[&str], needles: &[&str]) {
    let mut v = vec!["run"];
    v.extend_from_slice(args);
    let out = run(&v);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "want one line, got: {stderr}");
    assert!(stderr.starts_with("kickvm: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "`{n}` not in: {stderr}");
    }
    assert!(out.stdout.is_empty());
}

fn kernel(dir: &std::path::Path) -> String {
    let code = serial_then_out(b"", 0x3c0, 0x34);
    write(dir, "bzImage", &fake_bzimage(&code)).to_string_lossy().into_owned()
}

#[test]
fn no_kvm_device() {
    let dir = scratch("nokvm");
    let k = kernel(&dir);
    fails_with(&["--kernel", &k, "--kvm-device", "/nonexistent/kvm"], &["no /nonexistent/kvm", "kickvm-rig run"]);
}

#[test]
fn kvm_device_without_permission() {
    // As root every file is readable; a directory cannot be opened as KVM.
    let dir = scratch("kvmdir");
    let k = kernel(&dir);
    let out = run(&["run", "--kernel", &k, "--kvm-device", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("cannot open {}", dir.display())), "{stderr}");
}

#[test]
fn kvm_pvm_is_refused_without_override() {
    if !std::path::Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("skipped: not a kvm_pvm host");
        return;
    }
    let dir = scratch("pvm");
    let k = kernel(&dir);
    fails_with(&["--kernel", &k], &["kvm_pvm", "kickvm-rig run -- kickvm run", "--allow-slow-kvm"]);
}

#[test]
fn kernel_that_is_not_a_bzimage() {
    if !std::path::Path::new("/dev/kvm").exists() {
        return;
    }
    let dir = scratch("notbz");
    let k = write(&dir, "vmlinux", b"\x7fELF this is not a bzImage, it is not anything");
    fails_with(&["--kernel", k.to_str().unwrap(), "--allow-slow-kvm", "--memory", "16M"], &["is not a bzImage"]);
}

#[test]
fn missing_kernel_initrd_and_disk() {
    let dir = scratch("missing");
    let k = kernel(&dir);
    fails_with(&["--kernel", "/nonexistent/bzImage"], &["kernel /nonexistent/bzImage: no such file"]);
    fails_with(&["--kernel", &k, "--initrd", "/nonexistent/initrd"], &["initrd /nonexistent/initrd: no such file"]);
    fails_with(&["--kernel", &k, "--disk", "path=/nonexistent/disk.img"], &["disk /nonexistent/disk.img: no such file"]);
}

#[test]
fn too_much_memory() {
    let dir = scratch("mem");
    let k = kernel(&dir);
    fails_with(&["--kernel", &k, "--memory", "900G"], &["more than this host has"]);
    fails_with(&["--kernel", &k, "--memory", "2T"], &["more than kickvm supports"]);
    fails_with(&["--kernel", &k, "--memory", "1M"], &["too small"]);
}

#[test]
fn initrd_that_does_not_fit() {
    if !std::path::Path::new("/dev/kvm").exists() {
        return;
    }
    let dir = scratch("bigrd");
    let k = kernel(&dir);
    let rd = dir.join("initrd");
    std::fs::File::create(&rd).unwrap().set_len(64 << 20).unwrap();
    fails_with(
        &["--kernel", &k, "--initrd", rd.to_str().unwrap(), "--memory", "32M", "--allow-slow-kvm"],
        &["does not fit in guest memory"],
    );
}

#[test]
fn help_has_examples() {
    let out = run(&["run", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Examples:"), "{help}");
    assert!(help.contains("--disk path=root.img"));
    assert!(help.contains("kickvm-rig run -- kickvm run"));
}

fn interface_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

#[test]
fn tap_that_cannot_be_opened() {
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: no /dev/net/tun");
        return;
    }
    let dir = scratch("badtap");
    let k = kernel(&dir);
    // `lo` exists and is not a TAP: TUNSETIFF refuses it.
    fails_with(&["--allow-slow-kvm", "--kernel", &k, "--net", "tap=lo"], &["cannot open TAP `lo`"]);
}

#[test]
fn a_tap_created_by_kickvm_is_gone_after_a_failed_start() {
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: no /dev/net/tun");
        return;
    }
    let dir = scratch("leak");
    let k = kernel(&dir);
    let name = format!("kvlk{}", std::process::id() % 100_000);
    assert!(!interface_exists(&name));
    // Two cards on the same new TAP name: the second open fails after the
    // first created the interface.
    let out = run(&[
        "run", "--allow-slow-kvm", "--kernel", &k,
        "--net", &format!("tap={name}"), "--net", &format!("tap={name}"),
    ]);
    assert_ne!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!interface_exists(&name), "TAP {name} left behind");
}
