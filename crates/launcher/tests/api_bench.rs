//! What the API socket adds to the VMM's CPU time: `kickvm --api-socket` +
//! vm.ping/vm.create/vm.boot/vmm.shutdown against `kickvm run` with the same
//! configuration (16 MiB, 1 vCPU, rng, serial on stdout), on a guest of a
//! few instructions that prints a line and powers off, so that what is
//! measured is the VMM's own work (set-up, the API, teardown), not a
//! guest's. The kernel's accounting of each finished kickvm process
//! (wait4's rusage, µs): kickvm's threads only, not the client's.
//!
//! `cargo test --release -p kickvm --test api_bench -- --ignored --nocapture`
//! (KICKVM_BENCH_RUNS, default 21); figures in docs/api.md.

mod api_common;
mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Waits for `child` and returns its user + system CPU time in µs.
fn cpu_us(child: Child) -> u64 {
    // SAFETY: a zeroed rusage is valid; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let mut status = 0;
    // SAFETY: as above; `status` and `ru` outlive the call.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(r, child.id() as i32, "wait4");
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

fn kickvm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kickvm"));
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    c
}

fn one_run(kernel: &str) -> u64 {
    let child = kickvm()
        .args(["run", "--kernel", kernel, "--memory", "16M", "--cpus", "1", "--rng", "--allow-slow-kvm"])
        .spawn()
        .unwrap();
    cpu_us(child)
}

fn one_api(dir: &std::path::Path, kernel: &str) -> u64 {
    let sock = dir.join("bench.sock");
    let mut child = kickvm().args(["--api-socket", sock.to_str().unwrap(), "--allow-slow-kvm"]).spawn().unwrap();
    let t0 = Instant::now();
    let s = loop {
        if let Ok(s) = UnixStream::connect(&sock) {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "no API socket");
        std::thread::sleep(Duration::from_micros(500));
    };
    let req = |m: &str, e: &str, b: &str| api_common::raw_request(&s, m, e, b, &[]).0;
    assert_eq!(req("GET", "vmm.ping", ""), 200);
    let body = serde_json::json!({
        "payload": { "kernel": kernel }, "cpus": { "boot_vcpus": 1, "max_vcpus": 1 },
        "memory": { "size": 16u64 << 20 }, "serial": { "mode": "Tty" }, "console": { "mode": "Off" },
    });
    assert_eq!(req("PUT", "vm.create", &body.to_string()), 204);
    assert_eq!(req("PUT", "vm.boot", ""), 204);
    // The guest's line, then it powers off; then the VMM is told to exit.
    let mut out = child.stdout.take().unwrap();
    let mut line = [0u8; 4];
    out.read_exact(&mut line).unwrap();
    assert_eq!(req("PUT", "vmm.shutdown", ""), 204);
    cpu_us(child)
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
#[ignore = "a benchmark: cargo test --release -p kickvm --test api_bench -- --ignored --nocapture"]
fn api_adds_under_5_ms_of_vmm_cpu() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let runs: usize = std::env::var("KICKVM_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(21);
    let dir = common::scratch("api-bench");
    let code = common::serial_then_out(b"bye\n", 0x3c0, (5 << 2) | (1 << 5));
    let k = common::write(&dir, "bzImage", &common::fake_bzimage(&code));
    let kernel = k.to_str().unwrap();
    one_run(kernel);
    one_api(&dir, kernel);
    let (mut run, mut api) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        run.push(one_run(kernel));
        api.push(one_api(&dir, kernel));
    }
    let (r, a) = (median(&mut run), median(&mut api));
    eprintln!(
        "api-bench: VMM CPU (user+sys) per process over {runs} runs each, median [min..max]: \
         kickvm run {:.2} ms [{:.2}..{:.2}], API {:.2} ms [{:.2}..{:.2}], API - run {:+.2} ms",
        r as f64 / 1e3, run[0] as f64 / 1e3, run[runs - 1] as f64 / 1e3,
        a as f64 / 1e3, api[0] as f64 / 1e3, api[runs - 1] as f64 / 1e3,
        (a as f64 - r as f64) / 1e3
    );
    assert!(a < r + 5_000, "the API adds {} µs", a.saturating_sub(r));
    let _ = std::fs::remove_dir_all(dir);
}

/// Sum of the vCPU threads' CPU times kickvm logged at debug level.
fn vcpu_us(stderr: &str) -> u64 {
    stderr
        .lines()
        .filter_map(|l| l.split_once(": ").and_then(|(_, r)| r.strip_suffix(" µs of CPU")))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}

/// Reads `child`'s stdout until a line containing `marker`.
fn until_line(out: &mut impl std::io::BufRead, marker: &str) {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "no `{marker}` from the guest");
        if line.contains(marker) {
            return;
        }
    }
}

/// One boot of the Debian guest to /init, whose script powers off: the
/// VMM's CPU time without its vCPU threads' (the guest's), in µs.
fn guest_run(kernel: &str, initrd: &str, cmdline: &str) -> u64 {
    let mut child = kickvm()
        .args(["run", "--kernel", kernel, "--initrd", initrd, "--cmdline", cmdline])
        .args(["--memory", "256M", "--cpus", "1", "--rng"])
        .env("RUST_LOG", "warn,kickvm::vcpu=debug")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    until_line(&mut out, kickvm_rig::image::INIT_START_MARKER);
    std::io::copy(&mut out, &mut std::io::sink()).unwrap();
    let total = cpu_us(child);
    let mut log = String::new();
    err.read_to_string(&mut log).unwrap();
    total - vcpu_us(&log)
}

/// Connects to the API at `sock` (kickvm was just started) and asks for
/// vmm.ping, vm.create with the Debian guest as `kickvm run` boots it in
/// these benchmarks (256 MiB, 1 vCPU, rng, serial on stdout), and vm.boot.
/// Returns the connection, open.
fn create_and_boot_debian(sock: &std::path::Path, kernel: &str, initrd: &str, cmdline: &str) -> UnixStream {
    let t0 = Instant::now();
    let s = loop {
        if let Ok(s) = UnixStream::connect(sock) {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no API socket");
        std::thread::sleep(Duration::from_micros(500));
    };
    let req = |m: &str, e: &str, b: &str| api_common::raw_request(&s, m, e, b, &[]).0;
    assert_eq!(req("GET", "vmm.ping", ""), 200);
    let body = serde_json::json!({
        "payload": { "kernel": kernel, "initramfs": initrd, "cmdline": cmdline },
        "cpus": { "boot_vcpus": 1, "max_vcpus": 1 }, "memory": { "size": 256u64 << 20 },
        "rng": { "src": "/dev/urandom" }, "serial": { "mode": "Tty" }, "console": { "mode": "Off" },
    });
    assert_eq!(req("PUT", "vm.create", &body.to_string()), 204);
    assert_eq!(req("PUT", "vm.boot", ""), 204);
    s
}

fn guest_api(dir: &std::path::Path, kernel: &str, initrd: &str, cmdline: &str) -> u64 {
    let sock = dir.join("bench.sock");
    let mut child = kickvm()
        .args(["--api-socket", sock.to_str().unwrap()])
        .env("RUST_LOG", "warn,kickvm::vcpu=debug")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _s = create_and_boot_debian(&sock, kernel, initrd, cmdline);
    let mut err = child.stderr.take().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    until_line(&mut out, kickvm_rig::image::INIT_START_MARKER);
    until_line(&mut out, kickvm_rig::image::EXIT_STATUS_PREFIX);
    // A new connection: the server closes one left idle for 10 s.
    let s2 = UnixStream::connect(&sock).unwrap();
    assert_eq!(api_common::raw_request(&s2, "PUT", "vmm.shutdown", "", &[]).0, 204);
    std::io::copy(&mut out, &mut std::io::sink()).unwrap();
    let total = cpu_us(child);
    let mut log = String::new();
    err.read_to_string(&mut log).unwrap();
    total - vcpu_us(&log)
}

/// The same comparison with the Debian guest booted to its `/init`, whose
/// script powers off (in the rig where the host's KVM cannot run Linux),
/// the vCPU threads' CPU time (the guest's) taken out.
/// `KICKVM_BENCH_API=1 cargo test --release -p kickvm --test api_bench -- guest --nocapture`
#[test]
fn api_adds_under_5_ms_booting_the_debian_guest() {
    if std::env::var_os("KICKVM_BENCH_API").is_none() {
        eprintln!("skipped: a benchmark; set KICKVM_BENCH_API=1 to run it");
        return;
    }
    if let Some(passed) = kickvm_rig::reexec_test_in_rig_if_needed("api_adds_under_5_ms_booting_the_debian_guest") {
        assert!(passed, "failed inside the rig");
        return;
    }
    let runs: usize = std::env::var("KICKVM_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let img = kickvm_rig::default_image().expect("default guest image");
    let (kernel, initrd) = (img.kernel.to_str().unwrap(), img.initrd.to_str().unwrap());
    let cmdline = format!("loglevel=4 {}", kickvm_rig::image::script_cmdline("true"));
    let dir = common::scratch("api-bench-guest");
    guest_run(kernel, initrd, &cmdline);
    guest_api(&dir, kernel, initrd, &cmdline);
    let (mut run, mut api) = (Vec::new(), Vec::new());
    for i in 0..runs {
        run.push(guest_run(kernel, initrd, &cmdline));
        api.push(guest_api(&dir, kernel, initrd, &cmdline));
        eprintln!("api-bench: #{}: run {:.2} ms, API {:.2} ms", i + 1, run[i] as f64 / 1e3, api[i] as f64 / 1e3);
    }
    let (r, a) = (median(&mut run), median(&mut api));
    eprintln!(
        "api-bench: Debian guest to /init and power-off, VMM CPU without vCPU threads over {runs} runs each, \
         median [min..max]: kickvm run {:.2} ms [{:.2}..{:.2}], API {:.2} ms [{:.2}..{:.2}], API - run {:+.2} ms",
        r as f64 / 1e3, run[0] as f64 / 1e3, run[runs - 1] as f64 / 1e3,
        a as f64 / 1e3, api[0] as f64 / 1e3, api[runs - 1] as f64 / 1e3,
        (a as f64 - r as f64) / 1e3
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Nanoseconds on the CPU of `pid`'s threads other than its vCPU threads
/// (`vcpuN`), from each one's `schedstat`.
fn non_vcpu_ns(pid: u32) -> u64 {
    let mut ns = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.starts_with("vcpu") {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += stat.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    }
    ns
}

/// Waits until `pid`'s `vcpu0` has run the guest for a while (the VM is
/// set up and every non-vCPU thread has gone idle), then returns
/// [`non_vcpu_ns`].
fn set_up_cost_ns(pid: u32) -> u64 {
    let t0 = Instant::now();
    loop {
        let ran = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten().any(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "vcpu0")
                && std::fs::read_to_string(t.path().join("schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
                    .is_some_and(|ns| ns > 50_000_000)
        });
        if ran {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "vcpu0 never ran the guest");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The guest's first device access needs its kernel far along; on a
    // KVM that cannot run Linux at speed it never comes, and the launcher's
    // other threads stay where set-up left them.
    std::thread::sleep(Duration::from_millis(200));
    non_vcpu_ns(pid)
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Native proxy for the API's cost to `/init` with the Debian guest, where
/// the host's KVM cannot run Linux at speed (kvm_pvm): everything the API
/// changes happens before the guest runs — serving the requests, checking
/// the configuration, setting the VM up on another thread — and from then
/// on both paths run the same VM code. So: the Debian kernel and
/// initramfs of the default image, 256 MiB, 1 vCPU, rng, serial; launch
/// (`kickvm run`, or `kickvm --api-socket` + ping + create + boot) until
/// `vcpu0` has run the guest for 50 ms; then the CPU time of every thread
/// but the vCPU's (`schedstat`, ns). On a KVM that runs Linux the same
/// test measures the same thing.
///
/// `KICKVM_BENCH_API=1 cargo test --release -p kickvm --test api_bench -- setting_up --nocapture`
/// (KICKVM_BENCH_RUNS, default 21).
#[test]
fn api_adds_under_5_ms_setting_up_the_debian_guest() {
    if std::env::var_os("KICKVM_BENCH_API").is_none() {
        eprintln!("skipped: a benchmark; set KICKVM_BENCH_API=1 to run it");
        return;
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let runs: usize = std::env::var("KICKVM_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(21);
    let img = kickvm_rig::default_image().expect("default guest image");
    let vmlinux = kickvm_rig::vmlinux::default_vmlinux().expect("the image's vmlinux");
    let initrd = img.initrd.to_str().unwrap();
    let cmdline = format!("loglevel=4 {}", kickvm_rig::image::script_cmdline("true"));
    let dir = common::scratch("api-bench-setup");
    let run = |kernel: &str| {
        let child = kickvm()
            .args(["run", "--kernel", kernel, "--initrd", initrd, "--cmdline", &cmdline])
            .args(["--memory", "256M", "--cpus", "1", "--rng", "--allow-slow-kvm"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let ns = set_up_cost_ns(child.id());
        kill(child);
        ns
    };
    let api = |kernel: &str| {
        let sock = dir.join("setup.sock");
        let child = kickvm()
            .args(["--api-socket", sock.to_str().unwrap(), "--allow-slow-kvm"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let s = create_and_boot_debian(&sock, kernel, initrd, &cmdline);
        // The connection stays open until the figure is read: its thread
        // (and what it spent) is still there.
        let ns = set_up_cost_ns(child.id());
        drop(s);
        kill(child);
        ns
    };
    for (name, kernel) in [("bzImage", img.kernel.to_str().unwrap()), ("vmlinux", vmlinux.to_str().unwrap())] {
        run(kernel);
        api(kernel);
        let (mut r, mut a) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            r.push(run(kernel) / 1000);
            a.push(api(kernel) / 1000);
        }
        let (rm, am) = (median(&mut r), median(&mut a));
        eprintln!(
            "api-bench: Debian guest ({name}) set up until it runs, CPU of the non-vCPU threads over {runs} runs each, \
             median [min..max]: kickvm run {:.2} ms [{:.2}..{:.2}], API {:.2} ms [{:.2}..{:.2}], API - run {:+.2} ms",
            rm as f64 / 1e3, r[0] as f64 / 1e3, r[runs - 1] as f64 / 1e3,
            am as f64 / 1e3, a[0] as f64 / 1e3, a[runs - 1] as f64 / 1e3,
            (am as f64 - rm as f64) / 1e3
        );
        assert!(am < rm + 5_000, "the API adds {} µs setting up the {name} guest", am.saturating_sub(rm));
    }
    let _ = std::fs::remove_dir_all(dir);
}
