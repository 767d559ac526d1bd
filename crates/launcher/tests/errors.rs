//! Every set-up mistake ends kickvm with one clear line on stderr and a
//! non-zero status, before a VM exists.
//!
//! The host-input tests (kernel, initrd, memory, disks, console, TAPs, ...)
//! also pass `--kvm-device /nonexistent/kvm`: a mistake that slipped past
//! the option checks would then fail with "no /nonexistent/kvm" instead,
//! so each test proves its mistake is caught before anything is opened or
//! created.

mod common;

use std::path::Path;

use common::*;

/// Asserts `kickvm run args` fails with status `code` and exactly one
/// stderr line containing every `needle`.
fn fails_with_status(code: i32, args: &[&str], needles: &[&str]) {
    let mut v = vec!["run"];
    v.extend_from_slice(args);
    let out = run(&v);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "want one line, got: {stderr}");
    assert!(stderr.starts_with("kickvm: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "`{n}` not in: {stderr}");
    }
    assert!(out.stdout.is_empty());
}

/// Asserts `kickvm run args` fails with one stderr line containing every
/// `needle`, status 1.
fn fails_with(args: &[&str], needles: &[&str]) {
    fails_with_status(1, args, needles);
}

/// [`fails_with`] for a mistake that must be found before KVM is opened.
fn refused_early(args: &[&str], needles: &[&str]) {
    let mut v = vec!["--kvm-device", "/nonexistent/kvm"];
    v.extend_from_slice(args);
    fails_with(&v, needles);
}

/// A command line clap refuses: one line too, status 2.
fn usage_error(args: &[&str], needles: &[&str]) {
    fails_with_status(2, args, needles);
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(s(p)).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
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
    refused_early(&["--kernel", "/nonexistent/bzImage"], &["kernel /nonexistent/bzImage: no such file"]);
    refused_early(&["--kernel", &k, "--initrd", "/nonexistent/initrd"], &["initrd /nonexistent/initrd: no such file"]);
    refused_early(&["--kernel", &k, "--disk", "path=/nonexistent/disk.img"], &["disk /nonexistent/disk.img: no such file"]);
}

#[test]
fn too_much_memory() {
    let dir = scratch("mem");
    let k = kernel(&dir);
    refused_early(&["--kernel", &k, "--memory", "900G"], &["more than this host has"]);
    refused_early(&["--kernel", &k, "--memory", "2T"], &["more than kickvm supports"]);
    refused_early(&["--kernel", &k, "--memory", "1M"], &["too small"]);
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
fn kvm_device_that_is_not_kvm() {
    let dir = scratch("notkvm");
    let k = kernel(&dir);
    let f = write(&dir, "kvm", b"");
    fails_with(&["--kernel", &k, "--kvm-device", s(&f)], &["is not a KVM device"]);
}

// ---- the kernel: any file may be passed ----------------------------------

/// The tiny test kernel with `bytes` written at `off` (header offsets as in
/// the boot protocol).
fn crafted(dir: &Path, name: &str, edits: &[(usize, &[u8])]) -> String {
    let mut img = fake_bzimage(&serial_then_out(b"", 0x3c0, 0x34));
    for (off, bytes) in edits {
        img[*off..off + bytes.len()].copy_from_slice(bytes);
    }
    s(&write(dir, name, &img)).to_string()
}

#[test]
fn kernel_that_is_not_a_file() {
    let dir = scratch("kfile");
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let d = format!("kernel {} is a directory, not a regular file", dir.display());
    refused_early(&["--kernel", s(&dir)], &[&d]);
    // A fifo would block an open for reading until someone writes to it.
    refused_early(&["--kernel", s(&fifo)], &["is a fifo, not a regular file"]);
    refused_early(&["--kernel", "/dev/zero"], &["is a character device, not a regular file"]);
    let e = write(&dir, "empty", b"");
    refused_early(&["--kernel", s(&e)], &["is empty"]);
    let t = write(&dir, "tiny", b"tiny");
    refused_early(&["--kernel", s(&t)], &["is not a bzImage (only 4 bytes"]);
    let elf = write(&dir, "vmlinux", &[0x7f; 4096]);
    refused_early(&["--kernel", s(&elf)], &["is not a bzImage (no \"HdrS\""]);
}

#[test]
fn kernel_headers_that_do_not_add_up() {
    let dir = scratch("khdr");
    let run = |name: &str, edits: &[(usize, &[u8])], needles: &[&str]| {
        let k = crafted(&dir, name, edits);
        refused_early(&["--kernel", &k, "--memory", "64M"], needles);
    };
    // pref_address near 2^64: would wrap around.
    run("pref", &[(0x258, &(u64::MAX - 0xfff).to_le_bytes())], &["pref_address 0xfffffffffffff000", "corrupt header"]);
    run("pref2", &[(0x258, &(1u64 << 63).to_le_bytes())], &["beyond the first GiB"]);
    // A huge init_size.
    run("init", &[(0x260, &u32::MAX.to_le_bytes())], &["beyond the first GiB"]);
    run("init0", &[(0x260, &0u32.to_le_bytes())], &["init_size is 0"]);
    // setup_sects 255: 128 KiB of setup code the file does not have.
    run("sects", &[(0x1f1, &[255])], &["is truncated", "setup code takes 131072 bytes"]);
    // syssize says the kernel is longer than the file.
    run("sys", &[(0x1f4, &0x10_0000u32.to_le_bytes())], &["is truncated", "the kernel proper is 16777216 bytes"]);
    // A relocatable kernel whose alignment is not a power of two.
    run("align", &[(0x234, &[1]), (0x230, &0x30_0000u32.to_le_bytes())], &["kernel_alignment 0x300000"]);
    run("low", &[(0x258, &0x1000u64.to_le_bytes())], &["below 1 MiB"]);
    run("old", &[(0x206, &0x0209u16.to_le_bytes())], &["no 64-bit entry point", "2.09 found"]);
    run("zimage", &[(0x211, &[0])], &["zImage"]);
    // Sound, but needs more memory than the guest gets.
    let k = crafted(&dir, "big", &[(0x260, &(100u32 << 20).to_le_bytes())]);
    refused_early(&["--kernel", &k, "--memory", "64M"], &["needs at least 101 MiB of guest memory", "more --memory"]);
}

#[test]
fn kernel_command_line_the_kernel_cannot_take() {
    let dir = scratch("cmdline");
    let k = kernel(&dir);
    // The test kernel's header says 2047 bytes.
    let long = "x".repeat(2000);
    refused_early(&["--kernel", &k, "--cmdline", &long], &["kernel command line is", "more than the kernel accepts (2047)"]);
    let small = crafted(&dir, "small", &[(0x238, &100u32.to_le_bytes())]);
    refused_early(&["--kernel", &small, "--cmdline", &"y".repeat(60)], &["accepts (100)"]);
    refused_early(&["--kernel", &k, "--cmdline", "quiet\tinit=/bin/sh"], &["contains '\\t'", "printable ASCII"]);
    refused_early(&["--kernel", &k, "--cmdline", "init=/bin/\u{e9}"], &["printable ASCII"]);
}

// ---- initramfs ------------------------------------------------------------

#[test]
fn initrd_that_is_not_a_usable_file() {
    let dir = scratch("rdfile");
    let k = kernel(&dir);
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    refused_early(&["--kernel", &k, "--initrd", s(&dir)], &["initrd", "is a directory, not a regular file"]);
    refused_early(&["--kernel", &k, "--initrd", s(&fifo)], &["is a fifo"]);
    let e = write(&dir, "empty", b"");
    refused_early(&["--kernel", &k, "--initrd", s(&e)], &["initrd", "is empty"]);
    let rd = dir.join("big");
    std::fs::File::create(&rd).unwrap().set_len(64 << 20).unwrap();
    refused_early(&["--kernel", &k, "--initrd", s(&rd), "--memory", "32M"], &["does not fit in guest memory"]);
    // The kernel's initrd_addr_max, not RAM, is the limit: more memory
    // would not help, and the message does not say it would.
    let low = crafted(&dir, "low", &[(0x22c, &((8u32 << 20) - 1).to_le_bytes())]);
    let rd = dir.join("rd");
    std::fs::File::create(&rd).unwrap().set_len(8 << 20).unwrap();
    refused_early(&["--kernel", &low, "--initrd", s(&rd), "--memory", "64M"], &["the highest address it may use", "smaller initrd"]);
}

// ---- memory and vCPUs -----------------------------------------------------

#[test]
fn memory_kvm_cannot_map() {
    let dir = scratch("mempage");
    let k = kernel(&dir);
    refused_early(&["--kernel", &k, "--memory", "4097K"], &["not a multiple of 4 KiB", "--memory 4100K"]);
    refused_early(&["--kernel", &k, "--memory", "5M", "--hugepages"], &["not a multiple of 2 MiB", "--memory 6M"]);
    usage_error(&["--kernel", &k, "--memory", "lots"], &["`lots` is not a size"]);
    usage_error(&["--kernel", &k, "--memory", "99999999999T"], &["too large"]);
}

#[test]
fn vcpu_counts_out_of_range() {
    let dir = scratch("cpus");
    let k = kernel(&dir);
    for n in ["0", "255", "300", "many"] {
        usage_error(&["--kernel", &k, "--cpus", n], &["--cpus", "use a number from 1 to 254"]);
    }
}

#[test]
fn options_clap_refuses_are_one_line_too() {
    usage_error(&["--disk", "readonly=on"], &["--disk needs path=FILE"]);
    usage_error(&["--disk", "path=a,path=b"], &["`path` is given twice"]);
    usage_error(&["--net", "tap=t0,queues=0"], &["queues=0"]);
    usage_error(&["--net", "tap=a/b"], &["not a usable interface name"]);
    usage_error(&["--net", "tap=t0,mac=52:54:00:12:34:5"], &["two hex digits"]);
    usage_error(&["--net", "tap=t0,mac=00:00:00:00:00:00"], &["all-zero"]);
    usage_error(&["--console", "tty"], &["use stdio, pty"]);
    usage_error(&["--bogus"], &["unexpected argument '--bogus'", "kickvm run --help"]);
}

// ---- disks ----------------------------------------------------------------

#[test]
fn disk_that_is_not_a_file_or_block_device() {
    let dir = scratch("diskkind");
    let k = kernel(&dir);
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let sock = dir.join("sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let disk = |p: &Path| format!("path={}", p.display());
    // Was an 8 EiB disk.
    let d = format!("disk {} is a directory, not a regular file or a block device", dir.display());
    refused_early(&["--kernel", &k, "--disk", &disk(&dir)], &[&d]);
    refused_early(&["--kernel", &k, "--disk", &disk(&fifo)], &["is a fifo"]);
    refused_early(&["--kernel", &k, "--disk", &disk(&sock)], &["is a socket"]);
    refused_early(&["--kernel", &k, "--disk", "path=/dev/null"], &["is a character device"]);
    refused_early(&["--kernel", &k, "--disk", "path=/tmp/nonexistent-kickvm.img"], &["no such file"]);
    // Bytes past the last whole sector would be silently out of reach.
    let odd = write(&dir, "odd.img", &[0; 1000]);
    refused_early(&["--kernel", &k, "--disk", &disk(&odd)], &["is 1000 bytes, not a whole number of 512-byte sectors"]);
    let empty = write(&dir, "empty.img", b"");
    refused_early(&["--kernel", &k, "--disk", &disk(&empty)], &["is empty"]);
}

#[test]
fn disk_written_through_two_devices() {
    let dir = scratch("disktwice");
    let k = kernel(&dir);
    let img = write(&dir, "a.img", &[0; 4096]);
    let link = dir.join("b.img");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let (a, b) = (format!("path={}", img.display()), format!("path={},readonly=on", link.display()));
    refused_early(&["--kernel", &k, "--disk", &a, "--disk", &b], &["is given twice", "gets corrupted"]);
}

#[test]
fn more_devices_than_pci_slots() {
    let dir = scratch("slots");
    let k = kernel(&dir);
    let mut args = vec!["--kernel".to_string(), k, "--rng".into()];
    for i in 0..31 {
        let p = write(&dir, &format!("{i}.img"), &[0; 512]);
        args.push("--disk".into());
        args.push(format!("path={},readonly=on", p.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    refused_early(&args, &["32 virtio devices", "31 PCI slots"]);
}

// ---- console --------------------------------------------------------------

#[test]
fn console_socket_path_that_is_not_a_socket() {
    let dir = scratch("consock");
    let k = kernel(&dir);
    let f = write(&dir, "precious.txt", b"keep me");
    let spec = format!("socket={}", f.display());
    let want = format!("console socket path {} exists and is not a socket (a regular file): remove it or choose another path", f.display());
    refused_early(&["--kernel", &k, "--console", &spec], &[&want]);
    assert_eq!(std::fs::read(&f).unwrap(), b"keep me", "the file is left alone");
    let spec = format!("socket={}", dir.display());
    refused_early(&["--kernel", &k, "--console", &spec], &["exists and is not a socket (a directory)"]);
    refused_early(&["--kernel", &k, "--console", "socket=/nonexistent/dir/c.sock"], &["directory /nonexistent/dir does not exist"]);
    let long = format!("socket={}/{}", dir.display(), "s".repeat(110));
    refused_early(&["--kernel", &k, "--console", &long], &["a Unix socket path is at most 107"]);
}

#[test]
fn console_file_that_cannot_be_appended_to() {
    let dir = scratch("confile");
    let k = kernel(&dir);
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    refused_early(&["--kernel", &k, "--console", &format!("file={}", dir.display())], &["is a directory"]);
    // Opening a fifo for writing blocks until a reader comes.
    refused_early(&["--kernel", &k, "--console", &format!("file={}", fifo.display())], &["is a fifo"]);
    refused_early(&["--kernel", &k, "--console", "file=/nonexistent/dir/c.log"], &["does not exist"]);
}

// ---- network cards --------------------------------------------------------

#[test]
fn tap_names_given_twice_or_taken() {
    if !Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: no /dev/net/tun");
        return;
    }
    let dir = scratch("taps");
    let k = kernel(&dir);
    refused_early(&["--kernel", &k, "--net", "tap=kvt0", "--net", "tap=kvt0"], &["tap=kvt0 is given twice"]);
    refused_early(
        &["--kernel", &k, "--net", "tap=kvt0", "--net", "tap=kvt1,mac=52:54:00:12:34:56"],
        &["MAC 52:54:00:12:34:56 is also the MAC of the card on tap=kvt0"],
    );
    // `lo` exists and is not a TAP.
    refused_early(&["--kernel", &k, "--net", "tap=lo"], &["lo is an existing network interface that is not a TAP"]);
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

/// A single-queue TAP named `name`, attached to an fd this process holds:
/// while it lives, nobody else can open the TAP (TUNSETIFF says EBUSY), a
/// failure only the open itself can find.
fn hold_tap(name: &str) -> Option<std::fs::File> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").ok()?;
    let mut req = IfReq { name: [0; 16], flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req`
    // lays out, for the duration of the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
    (r == 0).then_some(f)
}

#[test]
fn tap_that_cannot_be_opened() {
    if !Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: no /dev/net/tun");
        return;
    }
    let dir = scratch("badtap");
    let k = kernel(&dir);
    let busy = format!("kvbz{}", std::process::id() % 100_000);
    let Some(_held) = hold_tap(&busy) else {
        eprintln!("skipped: cannot create a TAP here");
        return;
    };
    fails_with(&["--allow-slow-kvm", "--kernel", &k, "--net", &format!("tap={busy}")], &[&format!("cannot open TAP `{busy}`")]);
}

#[test]
fn a_tap_created_by_kickvm_is_gone_after_a_failed_start() {
    if !Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: no /dev/net/tun");
        return;
    }
    let dir = scratch("leak");
    let k = kernel(&dir);
    let name = format!("kvlk{}", std::process::id() % 100_000);
    let busy = format!("kvlb{}", std::process::id() % 100_000);
    assert!(!interface_exists(&name));
    let Some(_held) = hold_tap(&busy) else {
        eprintln!("skipped: cannot create a TAP here");
        return;
    };
    // The first card creates its TAP; the second cannot open the busy one.
    let out = run(&[
        "run", "--allow-slow-kvm", "--kernel", &k,
        "--net", &format!("tap={name}"), "--net", &format!("tap={busy}"),
    ]);
    assert_ne!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!interface_exists(&name), "TAP {name} left behind");
}

// ---- vsock ----------------------------------------------------------------

#[test]
fn vsock_options_and_socket_paths() {
    let dir = scratch("vsock");
    let k = kernel(&dir);
    usage_error(&["--kernel", &k, "--vsock", "cid=2,socket=/tmp/v"], &["--vsock cid=2", "from 3 to"]);
    usage_error(&["--kernel", &k, "--vsock", "socket=/tmp/v"], &["--vsock needs cid=N"]);
    usage_error(&["--kernel", &k, "--vsock", "cid=3"], &["--vsock needs socket=PATH"]);
    usage_error(&["--kernel", &k, "--vsock", "cid=3,socket=/tmp/v,port=1"], &["unknown option `port`"]);
    let f = write(&dir, "precious.txt", b"keep me");
    let spec = format!("cid=3,socket={}", f.display());
    refused_early(&["--kernel", &k, "--vsock", &spec], &["vsock socket path", "exists and is not a socket (a regular file)"]);
    assert_eq!(std::fs::read(&f).unwrap(), b"keep me", "the file is left alone");
    refused_early(&["--kernel", &k, "--vsock", "cid=3,socket=/nonexistent/dir/v.sock"], &["directory /nonexistent/dir does not exist"]);
    let long = format!("cid=3,socket={}/{}", dir.display(), "s".repeat(100));
    refused_early(&["--kernel", &k, "--vsock", &long], &["at most 96 here, so that PATH_<port> fits"]);
    let busy = dir.join("busy.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&busy).unwrap();
    let spec = format!("cid=3,socket={}", busy.display());
    refused_early(&["--kernel", &k, "--vsock", &spec], &["is a socket another program listens on"]);
}
