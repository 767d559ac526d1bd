//! End to end: `kickvm run` boots the project's default guest image (Debian
//! cloud kernel + busybox initramfs) and the guest's `/init` runs a script.
//!
//! These need a KVM that runs a stock kernel. On hosts without one (kvm_pvm)
//! each test re-runs itself inside the nested rig (`kickvm-rig`, see
//! docs/testing.md), which takes ~10 s of L1 boot per test.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use kickvm_rig::image::{script_cmdline, EXIT_STATUS_PREFIX, INIT_START_MARKER};

/// Returns early from the test on the host after running it in the rig.
macro_rules! in_rig {
    ($name:literal) => {
        if let Some(passed) = kickvm_rig::reexec_test_in_rig_if_needed($name) {
            assert!(passed, "{} failed inside the rig", $name);
            return;
        }
    };
}

struct Run {
    status: Option<i32>,
    console: String,
    stderr: String,
    /// From spawning kickvm to the guest's `/init` marker on the console.
    to_init: Option<Duration>,
}

impl Run {
    fn assert_script_passed(&self) {
        assert!(self.console.contains(INIT_START_MARKER), "no /init marker:\n{}\n{}", self.console, self.stderr);
        let exit = kickvm_rig::image::parse_exit_status(&self.console);
        assert_eq!(exit, Some(0), "script failed:\n{}\nstderr: {}", self.console, self.stderr);
        assert_eq!(self.status, Some(0), "kickvm status; stderr: {}", self.stderr);
    }

    fn count(&self, needle: &str) -> usize {
        self.console.matches(needle).count()
    }
}

/// Boots the default image with `args` and `script` (run by `/init`), and
/// waits for kickvm to exit (killing it after `timeout`).
fn boot(args: &[&str], script: &str, timeout: Duration) -> Run {
    boot_typing(args, script, timeout, None)
}

/// As [`boot`]; once the console shows `typed.0`, writes `typed.1` to
/// kickvm's stdin (which feeds the serial port).
fn boot_typing(args: &[&str], script: &str, timeout: Duration, typed: Option<(&str, &str)>) -> Run {
    let img = kickvm_rig::default_image().expect("default guest image");
    boot_kernel(&img.kernel, args, script, timeout, typed)
}

/// As [`boot_typing`], with `kernel` instead of the image's bzImage.
fn boot_kernel(kernel: &Path, args: &[&str], script: &str, timeout: Duration, typed: Option<(&str, &str)>) -> Run {
    let img = kickvm_rig::default_image().expect("default guest image");
    let cmdline = format!("loglevel=4 {}", script_cmdline(script));
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kickvm"))
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(&img.initrd)
        .args(["--cmdline", &cmdline])
        .args(args)
        .stdin(if typed.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start kickvm");
    let mut stdin = child.stdin.take();
    let pid = child.id() as i32;
    let killer = std::thread::spawn(move || {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(200));
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(pid, 0) } != 0 {
                return;
            }
        }
        // SAFETY: kills our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let mut stderr_pipe = child.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s);
        s
    });
    let mut console = String::new();
    let mut to_init = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        if to_init.is_none() && line.contains(INIT_START_MARKER) {
            to_init = Some(t0.elapsed());
        }
        if let (Some((marker, data)), Some(input)) = (typed, stdin.as_mut()) {
            if line.contains(marker) {
                use std::io::Write;
                let _ = input.write_all(data.as_bytes());
                let _ = input.flush();
                stdin = None;
            }
        }
        console.push_str(&line);
        console.push('\n');
    }
    let status = child.wait().ok().and_then(|s| s.code());
    let _ = killer.join();
    let stderr = err_thread.join().unwrap_or_default();
    if let Some(t) = to_init {
        eprintln!("e2e: launch to /init marker {:.2} s, to exit {:.2} s", t.as_secs_f64(), t0.elapsed().as_secs_f64());
    }
    if !stderr.is_empty() {
        eprintln!("e2e: kickvm stderr:\n{stderr}");
    }
    Run { status, console, stderr, to_init }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kickvm-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn disk(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

#[test]
fn boots_with_two_cpus_disks_and_rng() {
    in_rig!("boots_with_two_cpus_disks_and_rng");
    let dir = scratch("devices");
    let rw = disk(&dir, "rw.img", 16 << 20);
    let ro = disk(&dir, "ro.img", 16 << 20);
    let script = r#"
set -e
echo "cpus: $(cat /sys/devices/system/cpu/online)"
test "$(cat /sys/devices/system/cpu/online)" = 0-1
echo "loader: $(od -An -tx1 -j 528 -N 1 /sys/kernel/boot_params/data | tr -d ' ')"
echo kickvm-e2e-written-by-guest > /dev/vda
sync
if echo nope > /dev/vdb 2>/dev/null; then echo "read-only disk accepted a write"; exit 1; fi
test "$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c)" = 32
echo all-checks-passed
"#;
    let rw_arg = format!("path={}", rw.display());
    let ro_arg = format!("path={},readonly=on", ro.display());
    let r = boot(&["--cpus", "2", "--disk", &rw_arg, "--disk", &ro_arg, "--rng"], script, Duration::from_secs(120));
    r.assert_script_passed();
    assert!(r.console.contains("all-checks-passed"));
    // Debian's LZ4 bzImage was decompressed by kickvm and entered through
    // PVH: the zero page's loader type is what Linux's PVH entry writes
    // (0xb0 with Debian's 6.1, as for the vmlinux below), not the 0xff
    // kickvm writes for a bzImage it enters at its 64-bit entry.
    assert!(r.console.contains("loader: b0"), "{}", r.console);
    let data = std::fs::read(&rw).unwrap();
    assert!(data.starts_with(b"kickvm-e2e-written-by-guest\n"), "disk image does not hold the guest's write");
    assert!(std::fs::read(&ro).unwrap().iter().all(|&b| b == 0), "read-only disk was modified");
    assert!(r.to_init.is_some());
    let _ = std::fs::remove_dir_all(dir);
}

/// The image's uncompressed kernel through its PVH entry point: the
/// initramfs arrives as a PVH module, the command line, memory map and
/// ACPI tables through the start info (two CPUs come up, a disk works).
#[test]
fn vmlinux_boots_through_its_pvh_entry() {
    // Extracted on the host: the rig's view of the cache is read-only.
    let vmlinux = kickvm_rig::default_vmlinux().expect("the default image's vmlinux");
    in_rig!("vmlinux_boots_through_its_pvh_entry");
    let dir = scratch("pvh");
    let rw = disk(&dir, "rw.img", 1 << 20);
    let script = r#"
set -e
test "$(cat /sys/devices/system/cpu/online)" = 0-1
grep -q kickvm.cmd= /proc/cmdline
echo "loader: $(od -An -tx1 -j 528 -N 1 /sys/kernel/boot_params/data | tr -d ' ')"
echo pvh-wrote-this > /dev/vda
sync
echo pvh-checks-passed
"#;
    let arg = format!("path={}", rw.display());
    let r = boot_kernel(&vmlinux, &["--cpus", "2", "--disk", &arg], script, Duration::from_secs(120), None);
    r.assert_script_passed();
    assert!(r.console.contains("pvh-checks-passed"), "{}", r.console);
    assert!(r.console.contains("loader: b0"), "{}", r.console);
    assert!(std::fs::read(&rw).unwrap().starts_with(b"pvh-wrote-this\n"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn guest_reboot_restarts_once_then_powers_off() {
    in_rig!("guest_reboot_restarts_once_then_powers_off");
    let dir = scratch("reboot");
    let flag = disk(&dir, "flag.img", 1 << 20);
    // First boot: mark the disk and reboot. Second boot: see the mark, exit
    // 0, and `/init` powers off.
    let script = r#"
if [ "$(head -c 8 /dev/vda)" = "rebooted" ]; then echo second-boot; exit 0; fi
printf rebooted > /dev/vda
sync
echo first-boot-rebooting
reboot -f
"#;
    let arg = format!("path={}", flag.display());
    let r = boot(&["--disk", &arg], script, Duration::from_secs(180));
    r.assert_script_passed();
    assert_eq!(r.count(INIT_START_MARKER), 2, "{}", r.console);
    assert!(r.console.contains("first-boot-rebooting") && r.console.contains("second-boot"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn no_reboot_exits_when_the_guest_reboots() {
    in_rig!("no_reboot_exits_when_the_guest_reboots");
    // A kernel panic (sysrq `c`) reboots the guest after a second
    // (`panic=1`): with --no-reboot the launcher ends, not with the status
    // 0 of a power-off, which once hid such a crash from scripts.
    let r = boot(&["--no-reboot"], "echo c > /proc/sysrq-trigger", Duration::from_secs(120));
    assert!(r.console.contains("Kernel panic"), "{}", r.console);
    assert_eq!(r.status, Some(3), "a panic's reboot is not a power-off: {}", r.stderr);
    assert_eq!(r.count(INIT_START_MARKER), 1);
    assert!(r.stderr.contains("--no-reboot"), "{}", r.stderr);
    assert_eq!(r.count(EXIT_STATUS_PREFIX), 0, "the script should not have finished");
}

#[test]
fn poweroff_exits_zero_and_script_status_is_seen_decompressed_in_the_guest() {
    in_rig!("poweroff_exits_zero_and_script_status_is_seen_decompressed_in_the_guest");
    // The bzImage's own decompressor, the way kickvm booted it before it
    // decompressed LZ4 kernels itself: entered as a bzImage, with the zero
    // page's loader type kickvm writes (0xff, "undefined").
    let script = "echo \"loader: $(od -An -tx1 -j 528 -N 1 /sys/kernel/boot_params/data | tr -d ' ')\"; echo hello-from-guest; exit 3";
    let r = boot(&["--decompress-in-guest"], script, Duration::from_secs(120));
    // `/init` reports the script's status, then powers off: kickvm exits 0.
    assert_eq!(kickvm_rig::image::parse_exit_status(&r.console), Some(3), "{}", r.console);
    assert_eq!(r.status, Some(0), "{}", r.stderr);
    assert!(r.console.contains("hello-from-guest"));
    assert!(r.console.contains("loader: ff"), "{}", r.console);
}

#[test]
fn stdin_reaches_the_guest_through_the_serial_port() {
    in_rig!("stdin_reaches_the_guest_through_the_serial_port");
    let script = "echo ready-for-input; read line; echo \"guest read: $line\"";
    let r = boot_typing(&[], script, Duration::from_secs(120), Some(("ready-for-input", "typed-on-the-host\n")));
    r.assert_script_passed();
    assert!(r.console.contains("guest read: typed-on-the-host"), "{}", r.console);
}

/// Creates TAP `name` (multi-queue) with `addr` on the host side.
fn tap(name: &str, addr: &str) -> bool {
    let ok = |args: &[&str]| Command::new("ip").args(args).status().map(|s| s.success()).unwrap_or(false);
    ok(&["tuntap", "add", "dev", name, "mode", "tap", "multi_queue"])
        && ok(&["addr", "add", addr, "dev", name])
        && ok(&["link", "set", name, "up"])
}

#[test]
fn net_pings_the_host_with_one_queue_pair_per_vcpu() {
    in_rig!("net_pings_the_host_with_one_queue_pair_per_vcpu");
    assert!(tap("kvtap0", "10.0.2.2/24"), "cannot create TAP kvtap0 (needs root and iproute2)");
    let script = r#"
set -e
ping -c 3 -W 2 10.0.2.2
n=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)
echo "rx queues: $n"
test "$n" = 2
test "$(ls -d /sys/class/net/eth0/queues/tx-* | wc -l)" = 2
"#;
    let r = boot(
        &["--cpus", "2", "--net", "tap=kvtap0,mac=52:54:00:12:34:56,queues=2"],
        script,
        Duration::from_secs(120),
    );
    let _ = Command::new("ip").args(["link", "del", "kvtap0"]).status();
    r.assert_script_passed();
}

#[test]
fn virtio_console_output_reaches_its_file() {
    in_rig!("virtio_console_output_reaches_its_file");
    let dir = scratch("hvc");
    let out = dir.join("hvc0.log");
    let arg = format!("file={}", out.display());
    let script = "test -c /dev/hvc0 || { echo no-hvc0; exit 1; }; echo hvc0-says-hello > /dev/hvc0";
    let r = boot(&["--console", &arg], script, Duration::from_secs(120));
    r.assert_script_passed();
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(text.contains("hvc0-says-hello"), "console file holds: {text:?}");
}
