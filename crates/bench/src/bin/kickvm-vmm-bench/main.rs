//! kickvm-vmm-bench: the launcher's benchmarks against QEMU (docs/benchmarks.md), on
//! the same machine in the same run. Run it with `scripts/bench-vmm.sh`,
//! which builds it and starts it inside the nested rig (it needs a KVM that
//! runs a stock kernel, and root for the TAP and perf).
//!
//! 1. **boot**: launch → the guest's `/init` marker (`KICKVM-INIT-START`)
//!    and launch → VMM exit after the guest's `poweroff -f`, for kickvm,
//!    QEMU `-M microvm` and QEMU `-M pc`: same kernel, initramfs, command
//!    line, 1 vCPU, 256 MiB, no devices.
//! 2. **ping**: the guest pings the host over a TAP (`ping -q -c N -i I
//!    10.0.2.2`, output kept in a guest file until the counted window is
//!    over: console output costs the VMM exits and writes); RTT from
//!    busybox's summary (and from an L1→guest ping timed by L1's clock),
//!    and the VMM's syscalls per
//!    ping counted with `perf stat --per-thread -p PID` over the ping window
//!    (every thread, vCPU threads included), minus `clock_gettime` /
//!    `gettimeofday` (real syscalls under TCG, free on real hosts), minus
//!    a control window of the same boot (the same console line in, end
//!    marker out and program starts, `sleep` for as long as the pings take
//!    in place of `ping`: what marking a window costs), minus the rate of
//!    an idle window over the two windows' difference in length, divided
//!    by the number of pings. kickvm `--threads per-queue|per-device|single` and
//!    QEMU `-M pc` with userspace virtio-net (`vhost=off`); with
//!    `--ping-vmm` also kickvm `--vhost-user net` (its `kickvm backend net`
//!    process counted the same way, beside it), kickvm `--net ...,vhost=on`
//!    and QEMU `vhost=on`.
//! 3. **memory**: in the idle window of each ping run, the VMM's RSS from
//!    `/proc/PID/smaps` minus the RSS of the guest-RAM mapping.
//! 4. **the VMM's own share** (in each boot run): launch → the first
//!    `KVM_RUN` (the first `kvm:kvm_entry` trace event, on the monotonic
//!    trace clock), the VMM process's CPU time up to the guest's `/init`
//!    less the time its vCPUs spent in the guest (`utime + stime -
//!    guest_time` of `/proc/PID/stat`), and its total RSS at `/init` (the
//!    guest booted, no devices). kickvm boots the bzImage and, as
//!    `kickvm-vmlinux`, the same kernel's ELF vmlinux through its PVH entry
//!    (`kickvm-rig image --print-vmlinux`).
//!
//! Runs are interleaved (one of each configuration, then again) so that the
//! rig's drift hits every configuration alike; tables show medians and the
//! range. Raw consoles and perf outputs go to `--out DIR`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use kickvm_rig::image::{script_cmdline, EXIT_STATUS_PREFIX, INIT_START_MARKER};

mod setup;

const MEMORY_MIB: u64 = 256;
const TAP: &str = "kvbench0";
const HOST_ADDR: &str = "10.0.2.2/24";
const GUEST_MAC: &str = "52:54:00:12:34:56";
/// Same as kickvm's built-in prefix (crates/launcher/src/config.rs), given
/// to QEMU explicitly so that all three boot the same command line.
const KICKVM_DEFAULT_CMDLINE: &str = kickvm::config::DEFAULT_CMDLINE;
const EXTRA_CMDLINE: &str = "loglevel=4";
/// Syscalls counted one by one (besides the total), when the running
/// kernel has their tracepoints.
const NAMED_SYSCALLS: &[&str] = &[
    "read", "write", "readv", "writev", "preadv", "pwritev", "ioctl", "ppoll", "poll", "select",
    "pselect6", "epoll_wait", "epoll_pwait", "futex", "recvmsg", "sendmsg", "recvfrom", "sendto",
    "io_uring_enter", "rt_sigtimedwait", "rt_sigprocmask", "nanosleep", "clock_nanosleep",
    "timerfd_settime", "madvise", "clock_gettime", "gettimeofday",
];
const CLOCK_SYSCALLS: &[&str] = &["clock_gettime", "gettimeofday"];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Vmm {
    Kickvm(&'static str),
    /// kickvm (per-queue) booting the uncompressed vmlinux through PVH.
    KickvmVmlinux,
    /// kickvm (per-queue) letting the bzImage decompress itself in the
    /// guest (`--decompress-in-guest`), as it did before it decompressed
    /// LZ4 kernels on the host.
    KickvmGuestDecompress,
    /// kickvm (per-queue), its NIC's queue threads never polling (`poll=off`).
    KickvmPollOff,
    /// `kickvm --api-socket`, the same VM as `Kickvm("per-queue")` built
    /// and booted through the API (`vm.create`, `vm.boot`).
    KickvmApi,
    /// kickvm (per-queue) whose NIC is served outside the launcher.
    KickvmNet(NetServer),
    QemuMicrovm,
    QemuPc,
    /// QEMU `-M pc` with the kernel's vhost-net (`vhost=on`).
    QemuPcVhost,
    /// Firecracker (`--no-api --config-file`), booting the vmlinux.
    Firecracker,
    /// Cloud Hypervisor (its command line), booting the vmlinux.
    CloudHypervisor,
}

/// Who serves kickvm's NIC in [`Vmm::KickvmNet`].
#[derive(Clone, Copy, Debug, PartialEq)]
enum NetServer {
    /// `kickvm backend net` in a process of its own, `--vhost-user net`.
    VhostUser,
    /// The kernel's vhost-net, `--net tap=...,vhost=on`.
    VhostNet,
}

/// Where `kickvm backend net` listens in [`NetServer::VhostUser`] runs.
const BACKEND_SOCKET: &str = "/tmp/kickvm-bench-net.sock";

impl Vmm {
    fn label(self) -> String {
        match self {
            Vmm::Kickvm(t) => format!("kickvm --threads {t}"),
            Vmm::KickvmVmlinux => "kickvm, vmlinux (PVH)".into(),
            Vmm::KickvmGuestDecompress => "kickvm --decompress-in-guest".into(),
            Vmm::KickvmPollOff => "kickvm --threads per-queue, poll=off".into(),
            Vmm::KickvmApi => "kickvm --api-socket (vm.create + vm.boot)".into(),
            Vmm::Firecracker => "Firecracker, vmlinux".into(),
            Vmm::CloudHypervisor => "Cloud Hypervisor, vmlinux".into(),
            Vmm::KickvmNet(NetServer::VhostUser) => "kickvm --vhost-user net (kickvm backend net)".into(),
            Vmm::KickvmNet(NetServer::VhostNet) => "kickvm --net vhost=on".into(),
            Vmm::QemuMicrovm => "QEMU -M microvm".into(),
            Vmm::QemuPc => "QEMU -M pc".into(),
            Vmm::QemuPcVhost => "QEMU -M pc vhost=on".into(),
        }
    }
    /// Whether the process ends when its guest powers off. Firecracker
    /// stays (it ends on a reboot, `reboot=k`), and so does `kickvm
    /// --api-socket` (the VM is shut down, the API serves on).
    fn exits_on_poweroff(self) -> bool {
        !matches!(self, Vmm::Firecracker | Vmm::KickvmApi)
    }

    fn short(self) -> String {
        match self {
            Vmm::Kickvm(t) => format!("kickvm-{t}"),
            Vmm::KickvmVmlinux => "kickvm-vmlinux".into(),
            Vmm::KickvmGuestDecompress => "kickvm-guest-decompress".into(),
            Vmm::KickvmPollOff => "kickvm-poll-off".into(),
            Vmm::KickvmApi => "kickvm-api".into(),
            Vmm::Firecracker => "firecracker".into(),
            Vmm::CloudHypervisor => "cloud-hypervisor".into(),
            Vmm::KickvmNet(NetServer::VhostUser) => "kickvm-vhost-user".into(),
            Vmm::KickvmNet(NetServer::VhostNet) => "kickvm-vhost-net".into(),
            Vmm::QemuMicrovm => "qemu-microvm".into(),
            Vmm::QemuPc => "qemu-pc".into(),
            Vmm::QemuPcVhost => "qemu-pc-vhost".into(),
        }
    }
}

struct Opts {
    boot_runs: usize,
    ping_runs: usize,
    pings: u32,
    interval: String,
    idle_secs: f64,
    out: PathBuf,
    kickvm: PathBuf,
    qemu: String,
    /// The peers' binaries (`--firecracker`, env `FIRECRACKER`; `--cloud-hypervisor`,
    /// env `CLOUD_HYPERVISOR`; scripts/bench-vmm.sh sets both from scripts/peers.sh).
    firecracker: Option<PathBuf>,
    cloud_hypervisor: Option<PathBuf>,
    boot: bool,
    ping: bool,
    /// `--only setup`: [`setup`], on this host, no rig.
    setup: bool,
    /// The number of this process's first run (`--run-offset`): a boot
    /// run in a fresh L1 is run N of the host's, not run 0.
    run_offset: usize,
    /// kickvm gets `--allow-slow-kvm` (the setup benchmark on kvm_pvm,
    /// whose guest never gets far).
    allow_slow_kvm: bool,
    /// `--tabulate FILE`: only the boot tables, from the `bench: boot`
    /// lines of an earlier run's stderr (one cut short, say).
    tabulate: Option<PathBuf>,
    /// The VMMs of the boot benchmark (all three unless `--boot-vmm`).
    boot_vmms: Vec<Vmm>,
    /// The configurations of the ping benchmark (`--ping-vmm`).
    ping_vmms: Vec<Vmm>,
}

/// The ping benchmark's configurations by the names `--ping-vmm` takes.
const PING_VMMS: &[(&str, Vmm)] = &[
    ("per-queue", Vmm::Kickvm("per-queue")),
    ("per-queue-poll-off", Vmm::KickvmPollOff),
    ("per-device", Vmm::Kickvm("per-device")),
    ("single", Vmm::Kickvm("single")),
    ("vhost-user", Vmm::KickvmNet(NetServer::VhostUser)),
    ("vhost-net", Vmm::KickvmNet(NetServer::VhostNet)),
    ("pc", Vmm::QemuPc),
    ("pc-vhost", Vmm::QemuPcVhost),
    ("firecracker", Vmm::Firecracker),
    ("cloud-hypervisor", Vmm::CloudHypervisor),
];

/// The boot benchmark's VMMs by the names `--boot-vmm` takes.
const BOOT_VMMS: &[(&str, Vmm)] = &[
    ("kickvm", Vmm::Kickvm("per-queue")),
    ("kickvm-vmlinux", Vmm::KickvmVmlinux),
    ("kickvm-guest-decompress", Vmm::KickvmGuestDecompress),
    ("kickvm-api", Vmm::KickvmApi),
    ("microvm", Vmm::QemuMicrovm),
    ("pc", Vmm::QemuPc),
    ("firecracker", Vmm::Firecracker),
    ("cloud-hypervisor", Vmm::CloudHypervisor),
];

const USAGE: &str = "usage: kickvm-vmm-bench [--boot-runs N] [--ping-runs N] [--pings N] [--interval SECS]
                        [--idle SECS] [--out DIR] [--kickvm PATH] [--qemu PATH] [--only boot|ping|setup]
                        [--firecracker PATH] [--cloud-hypervisor PATH] [--tabulate STDERR-FILE] [--run-offset N]
                        [--boot-vmm kickvm,kickvm-vmlinux,kickvm-guest-decompress,kickvm-api,microvm,pc,firecracker,
                                    cloud-hypervisor]
                        [--ping-vmm per-queue,per-queue-poll-off,per-device,single,vhost-user,vhost-net,pc,pc-vhost,
                                    firecracker,cloud-hypervisor]
Needs root and a KVM that runs Linux (here: inside the rig; use scripts/bench-vmm.sh).
--only setup runs on this host itself, whatever its KVM: each VMM up to its guest's first instruction
(--boot-vmm chooses them, --boot-runs how often).
Firecracker and Cloud Hypervisor: built by scripts/peers.sh (bench-vmm.sh passes their paths
as FIRECRACKER and CLOUD_HYPERVISOR); a peer not found is skipped with the reason.";

/// A bad command line: what was wrong, in one line, and status 2.
fn usage(what: &str) -> ! {
    kickvm_rig::note!("kickvm-vmm-bench: {what} (see kickvm-vmm-bench --help)");
    std::process::exit(2)
}

impl Opts {
    /// The control window's `sleep`: as long as the pings should take.
    fn control_secs(&self) -> String {
        let interval: f64 = self.interval.parse().unwrap_or(0.0);
        format!("{:.3}", f64::from(self.pings) * interval)
    }
}

fn parse_opts() -> Opts {
    let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf));
    let mut o = Opts {
        boot_runs: 5,
        ping_runs: 3,
        pings: 200,
        interval: "0.02".into(),
        idle_secs: 3.0,
        out: PathBuf::from("target/vmm-bench"),
        kickvm: exe_dir.map(|d| d.join("kickvm")).unwrap_or_else(|| "kickvm".into()),
        qemu: kickvm_rig::qemu::qemu_binary(),
        firecracker: std::env::var_os("FIRECRACKER").filter(|v| !v.is_empty()).map(PathBuf::from),
        cloud_hypervisor: std::env::var_os("CLOUD_HYPERVISOR").filter(|v| !v.is_empty()).map(PathBuf::from),
        boot: true,
        ping: true,
        setup: false,
        run_offset: 0,
        allow_slow_kvm: false,
        tabulate: None,
        boot_vmms: vec![Vmm::Kickvm("per-queue"), Vmm::KickvmVmlinux, Vmm::QemuMicrovm, Vmm::QemuPc],
        ping_vmms: vec![Vmm::Kickvm("per-queue"), Vmm::Kickvm("per-device"), Vmm::Kickvm("single"), Vmm::QemuPc],
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage(&format!("{a} needs a value")));
        fn num<T: std::str::FromStr>(opt: &str, v: String) -> T {
            v.parse().unwrap_or_else(|_| usage(&format!("{opt} {v}: not a number")))
        }
        match a.as_str() {
            "-h" | "--help" => {
                kickvm_rig::say!("{USAGE}");
                std::process::exit(0)
            }
            "--boot-runs" => o.boot_runs = num(&a, val()),
            "--ping-runs" => o.ping_runs = num(&a, val()),
            "--pings" => o.pings = num(&a, val()),
            "--interval" => {
                o.interval = val();
                let _: f64 = num(&a, o.interval.clone());
            }
            "--idle" => o.idle_secs = num(&a, val()),
            "--run-offset" => o.run_offset = num(&a, val()),
            "--out" => o.out = PathBuf::from(val()),
            "--kickvm" => o.kickvm = PathBuf::from(val()),
            "--qemu" => o.qemu = val(),
            "--firecracker" => o.firecracker = Some(PathBuf::from(val())),
            "--cloud-hypervisor" => o.cloud_hypervisor = Some(PathBuf::from(val())),
            "--boot-vmm" => o.boot_vmms = vmm_list(&val(), BOOT_VMMS, "--boot-vmm"),
            "--ping-vmm" => o.ping_vmms = vmm_list(&val(), PING_VMMS, "--ping-vmm"),
            "--tabulate" => o.tabulate = Some(PathBuf::from(val())),
            "--only" => match val().as_str() {
                "boot" => o.ping = false,
                "ping" => o.boot = false,
                "setup" => (o.boot, o.ping, o.setup) = (false, false, true),
                other => usage(&format!("--only {other}: use boot, ping or setup")),
            },
            other => usage(&format!("unknown option `{other}`")),
        }
    }
    // A peer that is not there is skipped, with the reason, not a failure
    // (tabulating an earlier run needs none).
    let peers = [
        (Vmm::Firecracker, o.firecracker.clone(), "FIRECRACKER"),
        (Vmm::CloudHypervisor, o.cloud_hypervisor.clone(), "CLOUD_HYPERVISOR"),
    ];
    for (vmm, path, var) in peers.into_iter().filter(|_| o.tabulate.is_none()) {
        let why = match &path {
            None => format!("no binary (set {var}, or build it with scripts/peers.sh)"),
            Some(p) if !p.is_file() => format!("{} does not exist (scripts/peers.sh builds it)", p.display()),
            Some(_) => continue,
        };
        if o.boot_vmms.contains(&vmm) || o.ping_vmms.contains(&vmm) {
            kickvm_rig::note!("bench: skipping {}: {why}", vmm.label());
            o.boot_vmms.retain(|v| *v != vmm);
            o.ping_vmms.retain(|v| *v != vmm);
        }
    }
    // QEMU likewise, once, instead of a failed launch per run.
    let qemus = [Vmm::QemuMicrovm, Vmm::QemuPc, Vmm::QemuPcVhost];
    let wants_qemu = o.boot_vmms.iter().chain(&o.ping_vmms).any(|v| qemus.contains(v));
    if o.tabulate.is_none() && wants_qemu && !on_path(&o.qemu) {
        kickvm_rig::note!("bench: skipping QEMU: {} not found (scripts/install-deps.sh installs it)", o.qemu);
        o.boot_vmms.retain(|v| !qemus.contains(v));
        o.ping_vmms.retain(|v| !qemus.contains(v));
    }
    let boots = (o.boot || o.setup) && !o.boot_vmms.is_empty();
    let pings = o.ping && !o.ping_vmms.is_empty();
    if o.tabulate.is_none() && !boots && !pings {
        die("no VMM left to measure (the lines above say why each was skipped)");
    }
    o
}

/// Whether `program` names an executable file, as a path or on `PATH`.
fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    let runnable = |p: &Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        return runnable(Path::new(program));
    }
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|d| runnable(&d.join(program))))
}

/// A comma-separated list of names from `table`, for option `opt`.
fn vmm_list(list: &str, table: &[(&str, Vmm)], opt: &str) -> Vec<Vmm> {
    list.split(',')
        .map(|v| {
            table.iter().find(|(n, _)| *n == v).map(|(_, m)| *m).unwrap_or_else(|| {
                let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
                die(&format!("{opt}: unknown VMM `{v}`; use some of {}", names.join(",")))
            })
        })
        .collect()
}

/// The name of `vmm` in `table`.
fn vmm_name(vmm: Vmm, table: &[(&'static str, Vmm)]) -> &'static str {
    table.iter().find(|(_, m)| *m == vmm).map_or("?", |(n, _)| *n)
}

// ---------------------------------------------------------------- VMM runs

/// A running VMM whose console (stdout) lines arrive on a channel with the
/// time they were read.
struct Running {
    child: Child,
    /// Where typed lines go: the VMM's stdin pipe, or the master side of
    /// the terminal that is its stdin ([`console_input`]).
    stdin: Option<File>,
    lines: Receiver<(Instant, String)>,
    t0: Instant,
    /// `t0` on the monotonic clock (that of the trace events).
    launched: f64,
    console: String,
    log: File,
}

impl Running {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for a console line containing `needle`; returns when it came.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<Instant, String> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((t, line)) => {
                    self.console.push_str(&line);
                    self.console.push('\n');
                    let _ = writeln!(self.log, "{line}");
                    if line.contains(needle) {
                        return Ok(t);
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Err(format!("no `{needle}` on the console after {timeout:?}")),
                Err(RecvTimeoutError::Disconnected) => return Err(format!("console closed before `{needle}`")),
            }
        }
    }

    /// Waits for a console line that is exactly `text`.
    fn wait_line(&mut self, text: &str, timeout: Duration) -> Result<Instant, String> {
        loop {
            let t = self.wait_for(text, timeout)?;
            if self.console.lines().last().map(str::trim) == Some(text) {
                return Ok(t);
            }
        }
    }

    fn type_line(&mut self, s: &str) {
        if let Some(i) = self.stdin.as_mut() {
            let _ = i.write_all(format!("{s}\n").as_bytes());
            let _ = i.flush();
        }
    }

    /// Waits for the process to exit (killing it after `timeout`); returns
    /// the time it exited.
    fn wait_exit(&mut self, timeout: Duration) -> Result<Instant, String> {
        let end = Instant::now() + timeout;
        loop {
            // Drain the console so that the VMM never blocks on a full pipe.
            while let Ok((_, line)) = self.lines.try_recv() {
                self.console.push_str(&line);
                self.console.push('\n');
                let _ = writeln!(self.log, "{line}");
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(Instant::now());
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!("did not exit within {timeout:?}; killed"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The command line every VMM boots: kickvm's built-in prefix (given to
/// the others explicitly), the bench's extra and the guest's script.
fn guest_cmdline(script: &str) -> String {
    format!("{KICKVM_DEFAULT_CMDLINE} {EXTRA_CMDLINE} {}", script_cmdline(script))
}

/// Where `kickvm --api-socket` listens in [`Vmm::KickvmApi`] runs.
const API_SOCKET: &str = "/tmp/kickvm-bench-api.sock";

/// The `vm.create` body of [`Vmm::KickvmApi`] runs: the VM `kickvm run`
/// gets in `Kickvm("per-queue")` runs, serial console on stdout.
fn api_vm_config(script: &str) -> String {
    let img = image();
    serde_json::json!({
        "payload": {"kernel": img.kernel, "initramfs": img.initrd, "cmdline": format!("{EXTRA_CMDLINE} {}", script_cmdline(script))},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": MEMORY_MIB << 20},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    })
    .to_string()
}

/// Firecracker's `--config-file`: the same guest, its NIC on the bench TAP
/// when `tap`. Written into the output directory, beside the run's log.
fn firecracker_config(o: &Opts, script: &str, tap: bool) -> PathBuf {
    let img = image();
    let mut cfg = serde_json::json!({
        "boot-source": {"kernel_image_path": vmlinux(), "initrd_path": img.initrd, "boot_args": guest_cmdline(script)},
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": MEMORY_MIB, "smt": false},
    });
    if tap {
        cfg["network-interfaces"] = serde_json::json!([{"iface_id": "eth0", "guest_mac": GUEST_MAC, "host_dev_name": TAP}]);
    }
    let path = o.out.join("firecracker.json");
    fs::write(&path, cfg.to_string()).unwrap_or_else(|e| die(&format!("cannot write {}: {e}", path.display())));
    path
}

/// The default guest image, found (or built) once per process: finding it
/// takes seconds, which must not fall inside a timed launch.
fn image() -> kickvm_rig::GuestImage {
    static IMAGE: std::sync::OnceLock<kickvm_rig::GuestImage> = std::sync::OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let mut img = kickvm_rig::default_image().unwrap_or_else(|e| die(&e.to_string()));
            img.kernel = local(&img.kernel);
            img.initrd = local(&img.initrd);
            img
        })
        .clone()
}

/// A boot file where the VMMs read it. On a host as users have it, the
/// kernel and initramfs are on a local filesystem. In the rig, L1 sees the
/// host's files over 9p, which reports no holes (the image's vmlinux has
/// them: `kickvm-rig image` writes its zero blocks so), so in L1 each is
/// first copied into L1's own /tmp, a tmpfs, its zero blocks as holes (as
/// `cp --sparse=always`): once per bench process, before any timed launch,
/// and every VMM boots the same copies.
fn local(path: &Path) -> PathBuf {
    if std::env::var_os("KICKVM_IN_RIG").is_none() {
        return path.to_path_buf();
    }
    let dir = Path::new("/tmp/kickvm-bench-boot");
    let to = dir.join(path.file_name().unwrap_or_else(|| die(&format!("{} names no file", path.display()))));
    let copied = fs::create_dir_all(dir).and_then(|()| fs::read(path)).and_then(|b| kickvm_rig::vmlinux::write_sparse(&to, &b));
    copied.unwrap_or_else(|e| die(&format!("cannot copy {} to {}: {e}", path.display(), to.display())));
    to
}

/// A peer's binary (checked in `parse_opts`: a missing peer is skipped).
fn peer(path: &Option<PathBuf>) -> &Path {
    path.as_deref().unwrap_or_else(|| die("a peer's binary went missing"))
}

fn vmm_command(o: &Opts, vmm: Vmm, script: &str, tap: bool) -> Command {
    let img = image();
    let extra = format!("{EXTRA_CMDLINE} {}", script_cmdline(script));
    let mut c;
    match vmm {
        Vmm::Kickvm(_) | Vmm::KickvmVmlinux | Vmm::KickvmGuestDecompress | Vmm::KickvmPollOff => {
            let (kernel, threads) = match vmm {
                Vmm::Kickvm(threads) => (img.kernel.clone(), threads),
                Vmm::KickvmPollOff | Vmm::KickvmGuestDecompress => (img.kernel.clone(), "per-queue"),
                _ => (vmlinux(), "per-queue"),
            };
            c = Command::new(&o.kickvm);
            c.arg("run").arg("--kernel").arg(&kernel).arg("--initrd").arg(&img.initrd);
            if o.allow_slow_kvm {
                c.arg("--allow-slow-kvm");
            }
            if vmm == Vmm::KickvmGuestDecompress {
                c.arg("--decompress-in-guest");
            }
            c.args(["--memory", &format!("{MEMORY_MIB}M"), "--cpus", "1", "--threads", threads]);
            c.args(["--cmdline", &extra]);
            if tap {
                let poll = if vmm == Vmm::KickvmPollOff { ",poll=off" } else { "" };
                c.args(["--net", &format!("tap={TAP},mac={GUEST_MAC}{poll}")]);
            }
        }
        Vmm::KickvmApi => {
            // The VM comes over the socket (boot_once drives it).
            let _ = fs::remove_file(API_SOCKET);
            c = Command::new(&o.kickvm);
            c.args(["--api-socket", API_SOCKET]);
        }
        Vmm::Firecracker => {
            c = Command::new(peer(&o.firecracker));
            c.arg("--no-api").arg("--config-file").arg(firecracker_config(o, script, tap));
            c.args(["--level", "Warning"]);
            if tap {
                // The guest kernel (Debian's cloud kernel) has virtio-mmio as
                // a module the image does not load and no command-line
                // devices: Firecracker's NIC goes on its PCI transport.
                c.arg("--enable-pci");
            }
        }
        Vmm::CloudHypervisor => {
            c = Command::new(peer(&o.cloud_hypervisor));
            c.arg("--kernel").arg(vmlinux()).arg("--initramfs").arg(&img.initrd);
            c.args(["--cmdline", &guest_cmdline(script), "--cpus", "boot=1"]);
            c.args(["--memory", &format!("size={MEMORY_MIB}M"), "--serial", "tty", "--console", "off"]);
            if tap {
                c.args(["--net", &format!("tap={TAP},mac={GUEST_MAC}")]);
            }
        }
        Vmm::KickvmNet(server) => {
            c = Command::new(&o.kickvm);
            c.arg("run").arg("--kernel").arg(&img.kernel).arg("--initrd").arg(&img.initrd);
            c.args(["--memory", &format!("{MEMORY_MIB}M"), "--cpus", "1"]);
            c.args(["--cmdline", &extra]);
            match server {
                NetServer::VhostUser => c.args(["--vhost-user", &format!("net,socket={BACKEND_SOCKET}")]),
                NetServer::VhostNet => c.args(["--net", &format!("tap={TAP},mac={GUEST_MAC},vhost=on")]),
            };
        }
        Vmm::QemuMicrovm | Vmm::QemuPc | Vmm::QemuPcVhost => {
            c = Command::new(&o.qemu);
            let machine = if vmm != Vmm::QemuMicrovm {
                "pc"
            } else {
                "microvm,x-option-roms=off,rtc=off,isa-serial=on,pcie=on"
            };
            // kvm_pvm (the setup benchmark on our hosts) refuses the
            // ARCH_CAPABILITIES MSR QEMU sets for `-cpu host`, and QEMU
            // aborts on that: off there; it plays no part in a VMM's set-up.
            let cpu = if o.allow_slow_kvm { "host,-arch-capabilities" } else { "host" };
            c.args(["-M", machine, "-accel", "kvm", "-cpu", cpu, "-smp", "1"]);
            c.args(["-m", &MEMORY_MIB.to_string(), "-nodefaults", "-no-user-config", "-display", "none"]);
            c.args(["-no-reboot", "-serial", "stdio", "-name", "bench,debug-threads=on"]);
            c.arg("-kernel").arg(&img.kernel).arg("-initrd").arg(&img.initrd);
            c.args(["-append", &guest_cmdline(script)]);
            if tap {
                let vhost = if vmm == Vmm::QemuPcVhost { "on" } else { "off" };
                c.args(["-netdev", &format!("tap,id=n0,ifname={TAP},script=no,downscript=no,vhost={vhost}")]);
                c.args(["-device", &format!("virtio-net-pci,netdev=n0,mac={GUEST_MAC}")]);
            }
        }
    }
    c
}

fn spawn(o: &Opts, vmm: Vmm, script: &str, tap: bool, log_name: &str) -> Running {
    let mut cmd = vmm_command(o, vmm, script, tap);
    let (child_stdin, master) = match console_input(vmm) {
        Ok(Some((slave, master))) => (Stdio::from(slave), Some(master)),
        Ok(None) => (Stdio::piped(), None),
        Err(e) => die(&format!("{}: {e}", vmm.label())),
    };
    let log_path = o.out.join(log_name);
    let mut log = File::create(&log_path).unwrap_or_else(|e| die(&format!("cannot create {}: {e}", log_path.display())));
    let _ = writeln!(log, "$ {cmd:?}");
    let err_log = log.try_clone().unwrap();
    let (t0, launched) = (Instant::now(), monotonic());
    let mut child = cmd
        .stdin(child_stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err_log))
        .spawn()
        .unwrap_or_else(|e| die(&format!("cannot start {}: {e}", vmm.label())));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    if tx.send((Instant::now(), line)).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let stdin = master.or_else(|| child.stdin.take().map(|i| File::from(OwnedFd::from(i))));
    Running { child, stdin, lines: rx, t0, launched, console: String::new(), log }
}

/// Cloud Hypervisor reads its serial console's input only from a terminal
/// (`--serial tty` with a pipe as stdin is output only): for it, a
/// pseudo-terminal in raw mode whose (slave, master) this returns; the
/// bench types into the master. `None` for the VMMs that read a pipe.
fn console_input(vmm: Vmm) -> std::io::Result<Option<(OwnedFd, File)>> {
    if vmm != Vmm::CloudHypervisor {
        return Ok(None);
    }
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the given ints; the name,
    // termios and window size pointers may be null.
    if unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded: both are open descriptors that nothing else owns.
    let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // Raw: no echo back into the master (nobody reads it), no line editing.
    // SAFETY: an all-zero termios is a valid value to be filled by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `slave` is an open terminal and `t` a termios to read into / from.
    if unsafe { libc::tcgetattr(std::os::fd::AsRawFd::as_raw_fd(&slave), &mut t) } == 0 {
        // SAFETY: as above.
        unsafe {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(std::os::fd::AsRawFd::as_raw_fd(&slave), libc::TCSANOW, &t);
        }
    }
    Ok(Some((slave, master)))
}

fn die(msg: &str) -> ! {
    kickvm_rig::note!("kickvm-vmm-bench: {msg}");
    std::process::exit(1)
}

// ---------------------------------------------------------------- boot

struct BootRun {
    to_init: f64,
    /// `None` for a VMM that does not exit on the guest's `poweroff -f`
    /// (Firecracker: it exits on a reboot, `reboot=k`).
    to_exit: Option<f64>,
    own: Own,
}

/// The VMM's own share of a boot (item 4 of the module doc); `None` where
/// this host could not tell.
#[derive(Clone, Copy, Default, Debug)]
struct Own {
    /// Launch → first `KVM_RUN`, seconds.
    first_run: Option<f64>,
    /// CPU seconds up to `/init`, vCPU guest time excluded.
    cpu: Option<f64>,
    /// Total RSS at `/init`, MiB.
    rss: Option<f64>,
    /// At `/init`, CPU seconds of the VMM's threads other than its vCPUs
    /// (main, API, device threads), from each thread's
    /// `/proc/PID/task/TID/schedstat` (nanoseconds, not clock ticks).
    threads: Option<f64>,
    /// At `/init`, the vCPU threads' user time outside the guest (`utime -
    /// guest_time`, clock ticks): the VMM's exit handling in user space.
    vcpu_user: Option<f64>,
    /// At `/init`, the vCPU threads' system time (clock ticks): KVM's
    /// in-kernel exit handling (in the rig, L1's nested-SVM work), plus
    /// the few syscalls of the vCPU loop.
    vcpu_sys: Option<f64>,
}

fn boot_once(o: &Opts, vmm: Vmm, run: usize) -> Result<BootRun, String> {
    warm_up(o, vmm);
    let entry = FirstKvmEntry::arm();
    let script = "exit 0";
    let mut r = spawn(o, vmm, script, false, &format!("boot-{}-{run}.log", vmm.short()));
    // The API connection stays open until the figures are read: its
    // thread's CPU time counts with the threads alive at `/init`.
    let _api = if vmm == Vmm::KickvmApi { Some(api_create_boot(&api_vm_config(script))?) } else { None };
    let init = r.wait_for(INIT_START_MARKER, Duration::from_secs(120))?;
    let cpu = own_cpu(r.pid());
    let (threads, vcpu_user, vcpu_sys) = thread_cpu(r.pid());
    let rss = memory(r.pid(), vmm).ok().map(|m| m.total_kib as f64 / 1024.0);
    r.wait_for(EXIT_STATUS_PREFIX, Duration::from_secs(60))?;
    let exit = match vmm.exits_on_poweroff() {
        false => None, // killed on drop
        true => match r.wait_exit(Duration::from_secs(30)) {
            Ok(t) => Some(t),
            Err(e) => {
                kickvm_rig::note!("bench: boot {} run {run}: no exit time: {e}", vmm.label());
                None
            }
        },
    };
    let first_run = entry.and_then(|e| e.wait()).map(|t| t - r.launched);
    let own = Own { first_run, cpu, rss, threads, vcpu_user, vcpu_sys };
    Ok(BootRun { to_init: (init - r.t0).as_secs_f64(), to_exit: exit.map(|e| (e - r.t0).as_secs_f64()), own })
}

/// Drives `kickvm --api-socket` as an orchestrator does: waits for the
/// socket, then `PUT vm.create` with `config` and `PUT vm.boot` on one
/// keep-alive connection, which it returns.
fn api_create_boot(config: &str) -> Result<std::os::unix::net::UnixStream, String> {
    let end = Instant::now() + Duration::from_secs(10);
    let mut conn = loop {
        match std::os::unix::net::UnixStream::connect(API_SOCKET) {
            Ok(c) => break c,
            Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_micros(500)),
            Err(e) => return Err(format!("cannot connect to {API_SOCKET}: {e}")),
        }
    };
    let mut responses = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
    for (what, body) in [("vm.create", config), ("vm.boot", "")] {
        let req = format!(
            "PUT /api/v1/{what} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(req.as_bytes()).map_err(|e| format!("{what}: {e}"))?;
        let status = http_response(&mut responses).map_err(|e| format!("{what}: {e}"))?;
        if !(200..300).contains(&status.0) {
            return Err(format!("{what}: HTTP {} {}", status.0, status.1));
        }
    }
    Ok(conn)
}

/// Reads one HTTP/1.1 response (status line, headers, a `Content-Length`
/// body) from a connection's reader (kept across responses: it may hold
/// the start of the next); returns the status code and the body.
fn http_response(r: &mut impl BufRead) -> Result<(u16, String), String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    let code = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or(format!("bad status line {line:?}"))?;
    let mut len = 0;
    loop {
        line.clear();
        r.read_line(&mut line).map_err(|e| e.to_string())?;
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; len];
    std::io::Read::read_exact(r, &mut body).map_err(|e| e.to_string())?;
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

impl Own {
    /// As the `bench: boot` line carries it (`first_run 0.123 cpu 0.456 rss 78.9`).
    fn fields(&self) -> String {
        let f = |v: Option<f64>, d: usize| v.map_or("n/a".into(), |v| format!("{v:.d$}"));
        format!(
            "first_run {} cpu {} rss {} threads {} vcpu_user {} vcpu_sys {}",
            f(self.first_run, 4),
            f(self.cpu, 2),
            f(self.rss, 1),
            f(self.threads, 4),
            f(self.vcpu_user, 2),
            f(self.vcpu_sys, 2)
        )
    }

    /// Reads [`Own::fields`] back from a `bench: boot` line.
    fn parse(line: &str) -> Own {
        let num = |key: &str| -> Option<f64> { line.split(key).nth(1)?.split_whitespace().next()?.parse().ok() };
        Own {
            first_run: num(" first_run "),
            cpu: num(" cpu "),
            rss: num(" rss "),
            threads: num(" threads "),
            vcpu_user: num(" vcpu_user "),
            vcpu_sys: num(" vcpu_sys "),
        }
    }
}

/// The table of the VMMs' own share of a boot: medians of each column over
/// the runs that could measure it, and the ratios the issues set goals for.
fn own_table(vmms: &[Vmm], owns: &[Vec<Own>]) -> String {
    let mut md = String::new();
    let col = |i: usize, f: fn(&Own) -> Option<f64>| -> Vec<f64> { owns[i].iter().filter_map(f).collect() };
    let cell = |v: &[f64], d: usize| if v.is_empty() { "n/a".to_string() } else { format!("{:.d$} ({})", median(v), list(v, d)) };
    // Everything but the guest and KVM's in-kernel work: the process less
    // its vCPUs' system time (threads that already exited, such as
    // kickvm's kernel loaders, included).
    let owned = |o: &Own| Some(o.cpu? - o.vcpu_sys?);
    let _ = writeln!(md, "### The VMM's own share of a boot\n");
    let _ = writeln!(
        md,
        "Launch → first `KVM_RUN` (the first `kvm:kvm_entry` trace event, monotonic trace clock). At the guest's `/init`: \
         the VMM process's CPU time without its vCPUs' guest time (`utime + stime - guest_time` of `/proc/PID/stat`, clock ticks, \
         exited threads included); per thread (`/proc/PID/task/*`, threads alive at `/init`): the non-vCPU threads' CPU time \
         (`schedstat`, ns: main, API, device threads), the vCPU threads' user time outside the guest (`utime - guest_time`, ticks: \
         the VMM's exit handling in user space) and their system time (`stime`, ticks: KVM's in-kernel exit handling, in the rig \
         L1's nested-SVM work, not the VMM's code); \"VMM-owned\" = the process less its vCPUs' system time (exited threads, \
         such as kickvm's kernel loaders, included). Total RSS at `/init` \
         (256 MiB guest, no devices). Medians (runs).\n"
    );
    let _ = writeln!(
        md,
        "| VMM | launch → first KVM_RUN, ms | VMM CPU to `/init` (process), s | non-vCPU threads, ms | vCPU user, s | vCPU system (in-kernel KVM), s | VMM-owned, s | RSS at `/init`, MiB |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for (i, v) in vmms.iter().enumerate() {
        let ms = |f: fn(&Own) -> Option<f64>| -> Vec<f64> { col(i, f).iter().map(|s| s * 1e3).collect() };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            v.label(),
            cell(&ms(|o| o.first_run), 1),
            cell(&col(i, |o| o.cpu), 2),
            cell(&ms(|o| o.threads), 1),
            cell(&col(i, |o| o.vcpu_user), 2),
            cell(&col(i, |o| o.vcpu_sys), 2),
            cell(&col(i, owned), 2),
            cell(&col(i, |o| o.rss), 0)
        );
    }
    let med = |want: Vmm, f: fn(&Own) -> Option<f64>| {
        vmms.iter().position(|v| *v == want).map(|i| col(i, f)).filter(|v| !v.is_empty()).map(|v| median(&v))
    };
    let _ = writeln!(md);
    let kickvms = [Vmm::Kickvm("per-queue"), Vmm::KickvmVmlinux, Vmm::KickvmGuestDecompress];
    for (peer, goal) in [(Vmm::QemuPc, "≤ 0.3"), (Vmm::Firecracker, "≤ 1.0")] {
        for (what, f) in [("VMM CPU to `/init` (process)", (|o: &Own| o.cpu) as fn(&Own) -> Option<f64>), ("VMM-owned CPU to `/init`", owned)] {
            for k in kickvms {
                if let (Some(c), Some(p)) = (med(k, f), med(peer, f)) {
                    let _ = writeln!(md, "- {what}, {} / {}: **{:.2}** (goal {goal})", k.label(), peer.label(), c / p);
                }
            }
        }
    }
    let peers_rss: Vec<f64> = [Vmm::Firecracker, Vmm::CloudHypervisor].iter().filter_map(|p| med(*p, |o| o.rss)).collect();
    if !peers_rss.is_empty() {
        let lowest = peers_rss.iter().cloned().fold(f64::INFINITY, f64::min);
        for k in kickvms {
            if let Some(r) = med(k, |o| o.rss) {
                let _ = writeln!(md, "- RSS at `/init`, {}: {r:.0} MiB against the lowest peer's {lowest:.0} MiB (goal ≤)", k.label());
            }
        }
    }
    // Issue 11: what the API adds, on the threads that do its work.
    if let (Some(a), Some(k)) = (med(Vmm::KickvmApi, |o| o.threads), med(Vmm::Kickvm("per-queue"), |o| o.threads)) {
        let _ = writeln!(md, "- API create + boot, non-vCPU threads' CPU: {:.1} ms against {:.1} ms for `kickvm run`: **{:+.1} ms** (goal < 5 ms)", a * 1e3, k * 1e3, (a - k) * 1e3);
    }
    if let (Some(a), Some(k)) = (med(Vmm::KickvmApi, |o| o.cpu), med(Vmm::Kickvm("per-queue"), |o| o.cpu)) {
        let _ = writeln!(md, "- API create + boot, whole process CPU to `/init`: {a:.2} s against {k:.2} s ({:+.0} ms; clock ticks; in the rig this varies by seconds from run to run with the host's load)", (a - k) * 1e3);
    }
    let _ = writeln!(md);
    md
}

/// The vmlinux of the default image (extracted on the host before any L1
/// starts: the rig's cache is read-only).
fn vmlinux() -> PathBuf {
    static VMLINUX: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    VMLINUX.get_or_init(|| local(&kickvm_rig::default_vmlinux().unwrap_or_else(|e| die(&e.to_string())))).clone()
}

/// CLOCK_MONOTONIC in seconds: the clock of the trace events (`mono`).
fn monotonic() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// CPU seconds process `pid` has used outside its guests: utime + stime
/// less guest_time (fields 14, 15 and 43 of `/proc/PID/stat`; a vCPU's
/// guest time is counted in its utime too).
fn own_cpu(pid: i32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<u64> = stat.rsplit_once(") ")?.1.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
    let (utime, stime, guest) = (*f.get(11)?, *f.get(12)?, *f.get(40)?);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime).saturating_sub(guest) as f64 / hz)
}

/// At this moment, per kind of thread of process `pid`: (CPU seconds of
/// the threads that are not vCPUs, from `schedstat`; the vCPU threads'
/// `utime - guest_time`; their `stime`). Threads that already exited are
/// not counted (the process total, [`own_cpu`], has them). Prints each
/// non-vCPU thread's share (`bench: threads ...`).
fn thread_cpu(pid: i32) -> (Option<f64>, Option<f64>, Option<f64>) {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else { return (None, None, None) };
    let (mut threads, mut user, mut sys, mut live_ticks) = (0u64, 0u64, 0u64, 0u64);
    let mut each = Vec::new();
    for t in dir.flatten() {
        let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let f: Vec<u64> = stat.rsplit_once(") ").map_or(vec![], |s| s.1.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect());
        let (Some(u), Some(s), Some(g)) = (f.get(11), f.get(12), f.get(40)) else { continue };
        live_ticks += u + s;
        if is_vcpu_thread(comm.trim()) {
            user += u.saturating_sub(*g);
            sys += s;
        } else if let Ok(ss) = fs::read_to_string(t.path().join("schedstat")) {
            let ns: u64 = ss.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
            threads += ns;
            each.push(format!("{}={:.1}ms", comm.trim(), ns as f64 * 1e-6));
        }
    }
    // What threads that already exited used: the process's total less the
    // live threads' (both in clock ticks).
    let exited = fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|st| {
        let f: Vec<u64> = st.rsplit_once(") ")?.1.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
        Some((f.get(11)? + f.get(12)?).saturating_sub(live_ticks) as f64 / hz)
    });
    kickvm_rig::note!(
        "bench: threads at /init (pid {pid}, not vCPUs): {}; threads already exited: {} s",
        each.join(" "),
        exited.map_or("?".into(), |e| format!("{e:.2}"))
    );
    (Some(threads as f64 * 1e-9), Some(user as f64 / hz), Some(sys as f64 / hz))
}

/// The first `kvm:kvm_entry` event from now on (only one VM runs at a
/// time here): its monotonic timestamp, read from `trace_pipe` by a thread
/// that switches the event off again at once.
struct FirstKvmEntry(std::thread::JoinHandle<Option<f64>>);

impl FirstKvmEntry {
    fn arm() -> Option<FirstKvmEntry> {
        let t = Path::new("/sys/kernel/tracing");
        if !t.join("events").exists() {
            let _ = Command::new("mount").args(["-t", "tracefs", "t", "/sys/kernel/tracing"]).status();
        }
        let enable = t.join("events/kvm/kvm_entry/enable");
        fs::write(t.join("trace_clock"), "mono").ok()?;
        // A full buffer drops new events, not the oldest: on a loaded host
        // the reader may come late, and the first event is the one wanted.
        fs::write(t.join("options/overwrite"), "0").ok()?;
        fs::write(t.join("trace"), "").ok()?;
        let pipe = File::open(t.join("trace_pipe")).ok()?;
        fs::write(&enable, "1").ok()?;
        Some(FirstKvmEntry(std::thread::spawn(move || {
            let mut line = String::new();
            let r = BufReader::new(pipe).read_line(&mut line);
            let _ = fs::write(&enable, "0");
            r.ok()?;
            // `  qemu-123  [000] d..2.  1234.567890: kvm_entry: vcpu 0, ...`
            let (head, _) = line.split_once(": kvm_entry")?;
            head.split_whitespace().last()?.parse().ok()
        })))
    }

    /// The event's time, if one came (the VMM ran its guest).
    fn wait(self) -> Option<f64> {
        self.0.join().ok().flatten()
    }
}

/// The boot table: per VMM, launch → `/init` and launch → exit, with the
/// ratios against their goals. `how` says how the runs were made.
fn boot_table(vmms: &[Vmm], res: &[(Vec<f64>, Vec<f64>)], how: &str) -> String {
    let mut md = String::new();
    let runs = res.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let _ = writeln!(md, "### Launch to the guest's `/init` marker, and to exit after `poweroff -f`\n");
    let _ = writeln!(md, "{runs} runs each, {how}; seconds. Firecracker does not exit on `poweroff -f` (only on a reboot): no exit time.\n");
    let _ = writeln!(md, "| VMM | to `/init`: median | range | runs | to exit: median | range |");
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    let num = |v: &[f64]| if v.is_empty() { "n/a".to_string() } else { format!("{:.2}", median(v)) };
    for (i, v) in vmms.iter().enumerate() {
        let (a, b) = &res[i];
        let _ = writeln!(md, "| {} | **{}** | {} | {} | {} | {} |", v.label(), num(a), range(a, 2), list(a, 2), num(b), range(b, 2));
    }
    let of = |want: Vmm| vmms.iter().position(|v| *v == want).filter(|i| !res[*i].0.is_empty()).map(|i| (median(&res[i].0), median(&res[i].1)));
    let ratios = [
        (Vmm::Kickvm("per-queue"), Vmm::QemuPc, "≤ 0.6"),
        (Vmm::KickvmGuestDecompress, Vmm::QemuPc, ""),
        (Vmm::Kickvm("per-queue"), Vmm::KickvmGuestDecompress, ""),
        (Vmm::Kickvm("per-queue"), Vmm::QemuMicrovm, "≤ 1.0"),
        (Vmm::KickvmVmlinux, Vmm::CloudHypervisor, "≤ 0.9"),
        (Vmm::KickvmVmlinux, Vmm::Firecracker, "≤ 1.0"),
        (Vmm::KickvmVmlinux, Vmm::Kickvm("per-queue"), ""),
        (Vmm::KickvmVmlinux, Vmm::QemuPc, ""),
        (Vmm::KickvmApi, Vmm::Kickvm("per-queue"), ""),
    ];
    let rows: Vec<String> = ratios
        .iter()
        .filter_map(|(a, b, goal)| {
            let ((ai, ae), (bi, be)) = (of(*a)?, of(*b)?);
            let exit = if ae.is_nan() || be.is_nan() { "–".to_string() } else { format!("{:.2}", ae / be) };
            Some(format!("| {} / {} | **{:.2}** | {goal} | {exit} |", a.label(), b.label(), ai / bi))
        })
        .collect();
    if !rows.is_empty() {
        let _ = writeln!(md, "\n| ratio (medians) | to `/init` | goal | to exit |\n|---|---|---|---|");
        for r in rows {
            let _ = writeln!(md, "{r}");
        }
    }
    let _ = writeln!(md);
    md
}

/// Before a timed boot: one untimed `--version` of the VMM and a read of
/// the kernel and initramfs, so that the timed launch finds its binary,
/// libraries and files in the page cache, as a VMM launched again on a
/// real host does (the rig reads the host's files over 9p).
fn warm_up(o: &Opts, vmm: Vmm) {
    let bin: &Path = match vmm {
        Vmm::Kickvm(_) | Vmm::KickvmVmlinux | Vmm::KickvmGuestDecompress | Vmm::KickvmNet(_) | Vmm::KickvmPollOff | Vmm::KickvmApi => &o.kickvm,
        Vmm::Firecracker => peer(&o.firecracker),
        Vmm::CloudHypervisor => peer(&o.cloud_hypervisor),
        Vmm::QemuMicrovm | Vmm::QemuPc | Vmm::QemuPcVhost => Path::new(&o.qemu),
    };
    let _ = Command::new(bin).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    let img = image();
    let elf = matches!(vmm, Vmm::KickvmVmlinux | Vmm::Firecracker | Vmm::CloudHypervisor);
    let _ = fs::read(if elf { vmlinux() } else { img.kernel });
    let _ = fs::read(&img.initrd);
}

// ---------------------------------------------------------------- rig

/// On a host whose KVM cannot run Linux: every boot run in a freshly booted
/// L1 of its own, so that no VMM inherits what an earlier guest left in L1
/// (reused pages whose TCG translations must be thrown away cost the next
/// guest up to ~1.5 s), then the ping runs in one more L1.
fn orchestrate(o: &Opts) {
    let me = std::env::current_exe().unwrap_or_else(|e| die(&format!("cannot find my own binary: {e}")));
    let rig = me.with_file_name("kickvm-rig");
    let out = fs::canonicalize(&o.out).unwrap_or_else(|_| o.out.clone());
    let l1 = InL1 { o, me, rig, out };
    let started = Instant::now();
    let mut doc = Doc { md: String::new(), header: None };
    if o.boot {
        orchestrate_boot(o, &l1, &mut doc);
    }
    if o.ping {
        orchestrate_ping(o, &l1, &mut doc);
    }
    let tail = format!(
        "\nWhole benchmark: {:.0} s, L1 boots included. Raw consoles and perf outputs: `{}`.",
        started.elapsed().as_secs_f64(),
        l1.out.display()
    );
    kickvm_rig::say!("{tail}");
    doc.md.push_str(&tail);
    md_flush(o, &doc.md);
}

/// Runs this binary again inside a freshly booted L1, through `kickvm-rig run`.
struct InL1<'a> {
    o: &'a Opts,
    /// This binary.
    me: PathBuf,
    /// `kickvm-rig`, next to it.
    rig: PathBuf,
    /// The output directory, canonical (shared read-write into L1).
    out: PathBuf,
}

impl InL1<'_> {
    /// Runs this binary with `args` (and `--out out_dir`) in a fresh L1,
    /// passes its progress and failure lines through to stderr, and
    /// returns its (stdout, stderr).
    fn run(&self, args: &[String], out_dir: &Path) -> (String, String) {
        let o = self.o;
        let mut c = Command::new(&self.rig);
        // L1 uses the guest image resolved here, on the host (the cache's
        // pointer file names the last image any checkout built).
        if let Err(e) = kickvm_rig::default_image() {
            die(&e.to_string());
        }
        c.envs(kickvm_rig::image::resolved_env());
        c.args(["run", "--timeout", "1500", "--share"]).arg(&self.out).arg("--").arg(&self.me);
        c.args(args).arg("--out").arg(out_dir).arg("--kickvm").arg(&o.kickvm).arg("--qemu").arg(&o.qemu);
        for (opt, path) in [("--firecracker", &o.firecracker), ("--cloud-hypervisor", &o.cloud_hypervisor)] {
            if let Some(p) = path {
                c.arg(opt).arg(p);
            }
        }
        let r = c.stderr(Stdio::piped()).stdout(Stdio::piped()).output();
        let r = r.unwrap_or_else(|e| die(&format!("cannot run {}: {e}", self.rig.display())));
        let (so, se) = (String::from_utf8_lossy(&r.stdout).into_owned(), String::from_utf8_lossy(&r.stderr).into_owned());
        let shown = |l: &str| ["bench:", "kickvm-rig:", "kickvm-vmm-bench:"].iter().any(|p| l.starts_with(p)) || l.contains("FAILED");
        for l in se.lines().filter(|l| shown(l)) {
            kickvm_rig::note!("{l}");
        }
        (so, se)
    }
}

/// The results document of an orchestrated benchmark.
struct Doc {
    md: String,
    /// The "Host of the VMMs" line, once an L1 has printed it.
    header: Option<String>,
}

impl Doc {
    /// Adds the "Host of the VMMs" line from an L1's stdout `so`, from the
    /// first L1 that printed one.
    fn take_header(&mut self, so: &str) {
        if self.header.is_none() {
            self.header = so.lines().find(|l| l.starts_with("Host of the VMMs")).map(str::to_string);
            if let Some(h) = &self.header {
                let _ = writeln!(self.md, "{h}\n");
            }
        }
    }
}

/// The boot benchmark, one L1 per run: the runs, then the table (printed
/// and added to the document).
fn orchestrate_boot(o: &Opts, l1: &InL1, doc: &mut Doc) {
    let vmms = o.boot_vmms.clone();
    if vmms.iter().any(|v| matches!(v, Vmm::KickvmVmlinux | Vmm::Firecracker | Vmm::CloudHypervisor)) {
        vmlinux(); // extracted here, on the host
    }
    let mut res: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); vmms.len()];
    let mut owns: Vec<Vec<Own>> = vec![Vec::new(); vmms.len()];
    for run in 0..o.boot_runs {
        for (i, v) in vmms.iter().enumerate() {
            let dir = l1.out.join(format!("boot-{}-{run}", v.short()));
            let _ = fs::create_dir_all(&dir);
            let args = ["--only", "boot", "--boot-runs", "1", "--boot-vmm", vmm_name(*v, BOOT_VMMS), "--run-offset", &run.to_string()]
                .map(String::from);
            let (so, se) = l1.run(&args, &dir);
            doc.take_header(&so);
            if !take_boot_result(&se, &mut res[i], &mut owns[i]) {
                kickvm_rig::note!("bench: boot {} run {run}: no result (see {})", v.label(), dir.display());
            }
        }
    }
    let mut table = boot_table(
        &vmms,
        &res,
        "interleaved, each boot in a freshly booted L1 after one untimed `--version` of its VMM",
    );
    table.push_str(&own_table(&vmms, &owns));
    kickvm_rig::say_raw!("{}{table}", doc.header.as_deref().map(|h| format!("{h}\n\n")).unwrap_or_default());
    doc.md.push_str(&table);
    md_flush(o, &doc.md);
}

/// Adds what the `bench: boot ...` line in `se` says to `res` and `owns`;
/// false when it has no such line.
fn take_boot_result(se: &str, res: &mut (Vec<f64>, Vec<f64>), owns: &mut Vec<Own>) -> bool {
    let Some((init, exit)) = boot_result(se) else { return false };
    res.0.push(init);
    res.1.extend(exit);
    if let Some(l) = se.lines().find(|l| l.starts_with("bench: boot") && l.contains(" first_run ")) {
        owns.push(Own::parse(l));
    }
    true
}

/// `--tabulate FILE`: the boot tables from the `bench: boot <label> run N:
/// ...` lines of a saved stderr, for the VMMs of `--boot-vmm`.
fn tabulate(o: &Opts, file: &Path) {
    let text = fs::read_to_string(file).unwrap_or_else(|e| die(&format!("cannot read {}: {e}", file.display())));
    let vmms = o.boot_vmms.clone();
    let mut res: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); vmms.len()];
    let mut owns: Vec<Vec<Own>> = vec![Vec::new(); vmms.len()];
    for line in text.lines().filter(|l| l.contains(" first_run ")) {
        let label = line.strip_prefix("bench: boot ").and_then(|l| l.split_once(" run ")).map(|(l, _)| l);
        if let Some(i) = vmms.iter().position(|v| Some(v.label().as_str()) == label) {
            take_boot_result(line, &mut res[i], &mut owns[i]);
        }
    }
    let how = format!("tabulated from the `bench: boot` lines of {}", file.display());
    kickvm_rig::say_raw!("{}{}", boot_table(&vmms, &res, &how), own_table(&vmms, &owns));
}

/// The seconds to `/init` and (if it exited) to exit from an L1's `bench: boot ...` line.
fn boot_result(se: &str) -> Option<(f64, Option<f64>)> {
    se.lines().find(|l| l.starts_with("bench: boot") && l.contains("/init")).and_then(|l| {
        let num = |key: &str| -> Option<f64> { l.split(key).nth(1)?.split_whitespace().next()?.parse().ok() };
        Some((num("/init ")?, num("exit ")))
    })
}

/// The ping benchmark, all runs in one more L1: its tables go to stdout
/// and the document as the L1 printed them.
fn orchestrate_ping(o: &Opts, l1: &InL1, doc: &mut Doc) {
    let args = vec![
        "--only".to_string(),
        "ping".into(),
        "--ping-runs".into(),
        o.ping_runs.to_string(),
        "--pings".into(),
        o.pings.to_string(),
        "--interval".into(),
        o.interval.clone(),
        "--idle".into(),
        o.idle_secs.to_string(),
        "--ping-vmm".into(),
        o.ping_vmms.iter().map(|v| vmm_name(*v, PING_VMMS)).collect::<Vec<_>>().join(","),
    ];
    let (so, _) = l1.run(&args, &l1.out);
    doc.take_header(&so);
    let body: String = so
        .lines()
        .filter(|l| !l.starts_with("Host of the VMMs") && !l.starts_with("Whole benchmark"))
        .map(|l| format!("{l}\n"))
        .collect();
    kickvm_rig::say_raw!("{body}");
    doc.md.push_str(&body);
}

// ---------------------------------------------------------------- perf

/// Counts per thread and per event.
type Counts = BTreeMap<String, BTreeMap<String, f64>>;

/// A `perf stat --per-thread -p PID` started with its events disabled and
/// switched on and off through its control FIFO, so the window is exact.
struct Perf {
    child: Child,
    ctl: File,
    ack: BufReader<File>,
    out: PathBuf,
    enabled_at: Instant,
}

impl Perf {
    fn start(pid: i32, events: &[String], dir: &Path, name: &str) -> Result<Perf, String> {
        // FIFOs on a local file system (the output directory may be 9p, which has none).
        let fifo_dir = std::env::temp_dir().join(format!("kickvm-vmm-bench-{}", std::process::id()));
        fs::create_dir_all(&fifo_dir).map_err(|e| format!("{}: {e}", fifo_dir.display()))?;
        let ctl_path = fifo_dir.join(format!("{name}.ctl"));
        let ack_path = fifo_dir.join(format!("{name}.ack"));
        let out = dir.join(format!("{name}.perf"));
        for p in [&ctl_path, &ack_path] {
            let _ = fs::remove_file(p);
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: `c` is a NUL-terminated path.
            if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                return Err(format!("mkfifo {}: {}", p.display(), std::io::Error::last_os_error()));
            }
        }
        let child = Command::new("perf")
            .args(["stat", "--per-thread", "-x", ";", "-D", "-1"])
            .arg("--control")
            .arg(format!("fifo:{},{}", ctl_path.display(), ack_path.display()))
            .arg("-o")
            .arg(&out)
            .args(["-e", &events.join(",")])
            .args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start perf: {e}"))?;
        let ctl = OpenOptions::new().write(true).open(&ctl_path).map_err(|e| format!("perf ctl: {e}"))?;
        let ack = BufReader::new(File::open(&ack_path).map_err(|e| format!("perf ack: {e}"))?);
        let mut p = Perf { child, ctl, ack, out, enabled_at: Instant::now() };
        p.command("enable")?;
        p.enabled_at = Instant::now();
        Ok(p)
    }

    fn command(&mut self, c: &str) -> Result<(), String> {
        self.ctl.write_all(format!("{c}\n").as_bytes()).map_err(|e| format!("perf {c}: {e}"))?;
        let mut line = String::new();
        self.ack.read_line(&mut line).map_err(|e| format!("perf {c} ack: {e}"))?;
        // perf writes "ack\n" with its terminating NUL byte.
        if line.trim_matches(|c: char| c == '\0' || c.is_whitespace()) != "ack" {
            return Err(format!("perf {c}: got {line:?}"));
        }
        Ok(())
    }

    /// Stops counting; returns the counts and the window length in seconds.
    fn stop(mut self) -> Result<(Counts, f64), String> {
        self.command("disable")?;
        let secs = self.enabled_at.elapsed().as_secs_f64();
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let text = fs::read_to_string(&self.out).map_err(|e| format!("perf output: {e}"))?;
        Ok((parse_perf(&text), secs))
    }
}

/// Parses `perf stat --per-thread -x ';'` lines: `comm-tid;count;unit;event;...`.
/// Threads with the same name are added up.
fn parse_perf(text: &str) -> Counts {
    let mut m = Counts::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(';').collect();
        if f.len() < 4 {
            continue;
        }
        let thread = f[0].trim().rsplit_once('-').map(|(n, _)| n).unwrap_or(f[0]).to_string();
        let count: f64 = f[1].trim().parse().unwrap_or(0.0);
        let event = f[3].trim();
        let event = event.strip_prefix("syscalls:sys_enter_").or(event.strip_prefix("raw_syscalls:sys_enter").map(|_| "ALL")).unwrap_or(event);
        *m.entry(thread).or_default().entry(event.to_string()).or_default() += count;
    }
    m
}

fn perf_events() -> Vec<String> {
    let tracing = Path::new("/sys/kernel/tracing");
    if !tracing.join("events").exists() {
        let _ = Command::new("mount").args(["-t", "tracefs", "t", "/sys/kernel/tracing"]).status();
    }
    let mut ev = vec!["raw_syscalls:sys_enter".to_string()];
    for s in NAMED_SYSCALLS {
        if tracing.join(format!("events/syscalls/sys_enter_{s}")).exists() {
            ev.push(format!("syscalls:sys_enter_{s}"));
        }
    }
    ev
}

// ---------------------------------------------------------------- memory

struct Mem {
    total_kib: u64,
    guest_kib: u64,
    other_anon_kib: u64,
    other_file_kib: u64,
    threads: Vec<String>,
}

fn memory(pid: i32, vmm: Vmm) -> Result<Mem, String> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).map_err(|e| format!("smaps: {e}"))?;
    let (mut total, mut guest, mut anon, mut file) = (0, 0, 0, 0);
    let (mut is_guest, mut is_file) = (false, false);
    for line in smaps.lines() {
        let mut w = line.split_whitespace();
        let first = w.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let (a, b) = first.split_once('-').unwrap();
            let size = u64::from_str_radix(b, 16).unwrap_or(0) - u64::from_str_radix(a, 16).unwrap_or(0);
            let path: Vec<&str> = w.skip(4).collect();
            let path = path.join(" ");
            // Guest RAM: one anonymous mapping of (about) the guest size
            // (QEMU's RAM block; kickvm's private RAM), or kickvm's shared
            // RAM, the memfd "kickvm-guest-ram" (crates/launcher/src/memory.rs).
            let big_anon = path.is_empty() && size >= (MEMORY_MIB << 20) * 3 / 4;
            is_guest = match vmm {
                Vmm::Kickvm(_) | Vmm::KickvmVmlinux | Vmm::KickvmGuestDecompress | Vmm::KickvmNet(_) | Vmm::KickvmPollOff | Vmm::KickvmApi => {
                    big_anon || path.contains("kickvm-guest-ram")
                }
                _ => big_anon,
            };
            is_file = path.starts_with('/') && !path.contains("kickvm-guest-ram");
            continue;
        }
        if first == "Rss:" {
            let kib: u64 = w.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            total += kib;
            if is_guest {
                guest += kib;
            } else if is_file {
                file += kib;
            } else {
                anon += kib;
            }
        }
    }
    let mut threads = Vec::new();
    if let Ok(d) = fs::read_dir(format!("/proc/{pid}/task")) {
        for e in d.flatten() {
            if let Ok(c) = fs::read_to_string(e.path().join("comm")) {
                threads.push(c.trim().to_string());
            }
        }
    }
    threads.sort();
    Ok(Mem { total_kib: total, guest_kib: guest, other_anon_kib: anon, other_file_kib: file, threads })
}

// ---------------------------------------------------------------- ping

struct PingRun {
    /// Guest seconds per L1 second during the ping.
    guest_clock: f64,
    /// L1→guest ping: (avg, min) RTT in ms, timed by L1.
    host_rtt: Option<(f64, f64)>,
    rtt_avg: f64,
    received: u32,
    /// Device-path syscalls per ping, all threads.
    per_ping: f64,
    /// Of which the vCPU threads.
    per_ping_vcpu: f64,
    /// Raw totals in the ping window (before any subtraction), per ping.
    raw_per_ping: f64,
    clock_per_ping: f64,
    idle_rate: f64,
    /// Per syscall name, per ping, control- and idle-subtracted (all threads).
    by_syscall: BTreeMap<String, f64>,
    /// Per thread name, per ping, control- and idle-subtracted, clocks excluded.
    by_thread: BTreeMap<String, f64>,
    mem: Mem,
    /// The vhost-user back-end process's device-path syscalls per ping,
    /// counted as the VMM's are (kickvm `--vhost-user` runs only).
    backend_per_ping: Option<f64>,
}

/// kickvm's and Cloud Hypervisor's `vcpuN`, Firecracker's `fc_vcpu N`, QEMU's `CPU N/KVM`.
fn is_vcpu_thread(name: &str) -> bool {
    name.starts_with("vcpu") || name.starts_with("fc_vcpu") || (name.starts_with("CPU ") && name.ends_with("/KVM"))
}

fn setup_tap() -> Result<(), String> {
    let ip = |args: &[&str]| Command::new("ip").args(args).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false);
    let _ = ip(&["link", "del", TAP]);
    if ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]) && ip(&["addr", "add", HOST_ADDR, "dev", TAP]) && ip(&["link", "set", TAP, "up"]) {
        Ok(())
    } else {
        Err(format!("cannot create TAP {TAP} (needs root and iproute2)"))
    }
}

/// busybox from the guest image's unpacked packages (the host may have no
/// `ping`).
fn busybox() -> Option<PathBuf> {
    let cache = std::env::var_os("KICKVM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kickvm")))?;
    let mut found: Vec<PathBuf> = fs::read_dir(cache.join("unpacked"))
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("busybox-static_"))
        .map(|e| e.path().join("bin/busybox"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

/// Parses busybox ping's summary: (received, [min, avg, max]).
fn parse_ping(text: &str) -> Option<(u32, Vec<f64>)> {
    let received = text
        .lines()
        .find(|l| l.contains("packets received"))?
        .split(", ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let rtt: Vec<f64> = text
        .lines()
        .find(|l| l.contains("round-trip"))?
        .split(" = ")
        .nth(1)?
        .trim_end_matches(" ms")
        .split('/')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    Some((received, rtt))
}

fn host_ping(o: &Opts) -> Option<(f64, f64)> {
    let bb = busybox()?;
    let out = Command::new(bb)
        .args(["ping", "-q", "-c", &o.pings.to_string(), "-i", &o.interval, "10.0.2.15"])
        .output()
        .ok()?;
    let (received, rtt) = parse_ping(&String::from_utf8_lossy(&out.stdout))?;
    (received > 0 && rtt.len() >= 3).then(|| (rtt[1], rtt[0]))
}

/// The guest's side of a ping run.
///
/// The serial console costs the VMM a few exits and a write per
/// character, so nothing is printed inside the counted window but the
/// one-character end marker `D`: terminal echo is off, ping's output and
/// the guest's clock readings go to files, printed after the window.
///
/// After `BENCH-READY` it waits for a line on its console three times:
/// the first starts the control window (the
/// same console exchange, file writes and program start as the ping
/// window, with `sleep` for as long as the pings take in place of `ping`),
/// the second the ping window, the third the report.
fn ping_script(o: &Opts) -> String {
    format!(
        "stty -echo 2>/dev/null; echo BENCH-READY; \
         read x; cat /proc/uptime > /tmp/c0; sleep {control} > /tmp/sleep 2>&1; cat /proc/uptime > /tmp/c1; echo D; \
         read x; cat /proc/uptime > /tmp/t0; ping -q -c {} -i {} 10.0.2.2 > /tmp/ping 2>&1; cat /proc/uptime > /tmp/t1; echo D; \
         read x; echo \"BENCH-T0 $(cat /tmp/t0)\"; cat /tmp/ping; echo \"BENCH-T1 $(cat /tmp/t1)\"; \
         echo BENCH-REPORTED; read x",
        o.pings,
        o.interval,
        control = o.control_secs()
    )
}

/// perf counts over one window, and its length in seconds.
struct Window {
    counts: Counts,
    secs: f64,
}

/// One process's three windows of a ping run.
struct Windows {
    /// Guest blocked in `read` on its console: the process's own rate.
    idle: Window,
    /// The ping window's console exchange and program starts, no pings.
    control: Window,
    /// The pings.
    busy: Window,
}

impl Windows {
    /// What the pings cost per ping, as counted by `total` over the
    /// threads `f` accepts: the ping window less the control window (what
    /// marking a window costs: the console line in, the end marker out,
    /// the guest's program starts), less the idle rate over the windows'
    /// difference in length.
    fn per_ping(&self, pings: f64, f: ThreadFilter, total: &dyn Fn(&Counts, ThreadFilter) -> f64) -> f64 {
        let rate = total(&self.idle.counts, f) / self.idle.secs;
        (total(&self.busy.counts, f) - total(&self.control.counts, f) - rate * (self.busy.secs - self.control.secs)) / pings
    }

    /// The idle rate, per second, over the threads `f` accepts.
    fn idle_rate(&self, f: ThreadFilter) -> f64 {
        device_total(&self.idle.counts, f) / self.idle.secs
    }
}

/// What one ping run measured, before any arithmetic.
struct PingMeasured {
    mem: Mem,
    /// The VMM process's counts.
    vmm: Windows,
    /// What the guest printed after the window: clock readings and ping's
    /// summary.
    summary: String,
    guest_clock: f64,
    host_rtt: Option<(f64, f64)>,
    /// The back-end process's counts over the same windows.
    backend: Option<Windows>,
}

/// `kickvm backend net` on the bench TAP, for [`NetServer::VhostUser`]
/// runs; killed when dropped.
struct NetBackend(Child);

impl NetBackend {
    fn start(o: &Opts, log: &Path) -> Result<NetBackend, String> {
        let _ = fs::remove_file(BACKEND_SOCKET);
        let log = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new(&o.kickvm)
            .args(["backend", "net", "--socket", BACKEND_SOCKET, &format!("tap={TAP},mac={GUEST_MAC}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("cannot start kickvm backend net: {e}"))?;
        let b = NetBackend(child);
        let end = Instant::now() + Duration::from_secs(20);
        while !Path::new(BACKEND_SOCKET).exists() {
            if Instant::now() > end {
                return Err(format!("kickvm backend net does not listen on {BACKEND_SOCKET}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(b)
    }
}

impl Drop for NetBackend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots `vmm` with [`ping_script`] and drives it: memory, an idle window,
/// the control window and the ping window (all three counted by perf),
/// the guest's report, then a ping from L1.
fn measure_ping(o: &Opts, vmm: Vmm, run: usize, events: &[String]) -> Result<PingMeasured, String> {
    let script = ping_script(o);
    let name = format!("ping-{}-{run}", vmm.short());
    let backend = match vmm {
        Vmm::KickvmNet(NetServer::VhostUser) => Some(NetBackend::start(o, &o.out.join(format!("{name}-backend.log")))?),
        _ => None,
    };
    let mut r = spawn(o, vmm, &script, true, &format!("{name}.log"));
    r.wait_for("BENCH-READY", Duration::from_secs(120))?;
    // Let the guest settle (the script's `read` is waiting on the console).
    std::thread::sleep(Duration::from_millis(1000));
    let mem = memory(r.pid(), vmm)?;
    // The back-end process, if any, is counted over the same windows.
    let backend_perf = |window: &str| -> Result<Option<Perf>, String> {
        backend.as_ref().map(|b| Perf::start(b.0.id() as i32, events, &o.out, &format!("{name}-backend-{window}"))).transpose()
    };
    let window = |p: Perf| p.stop().map(|(counts, secs)| Window { counts, secs });
    let stop = |p: Option<Perf>| p.map(window).transpose();
    let bperf = backend_perf("idle")?;
    let perf = Perf::start(r.pid(), events, &o.out, &format!("{name}-idle"))?;
    std::thread::sleep(Duration::from_secs_f64(o.idle_secs));
    let idle = window(perf)?;
    let b_idle = stop(bperf)?;
    // A window marked as the ping window is, around `sleep`; then the pings.
    let mut marked = |what: &str| -> Result<(Window, Option<Window>, Instant, Instant), String> {
        let bperf = backend_perf(what)?;
        let perf = Perf::start(r.pid(), events, &o.out, &format!("{name}-{what}"))?;
        let go = Instant::now();
        r.type_line("g");
        let done = r.wait_line("D", Duration::from_secs(30 + (o.pings as u64) * 2))?;
        Ok((window(perf)?, stop(bperf)?, go, done))
    };
    let (control, b_control, _, _) = marked("control")?;
    let (busy, b_busy, go, done) = marked("ping")?;
    let backend_counts = match (b_idle, b_control, b_busy) {
        (Some(idle), Some(control), Some(busy)) => Some(Windows { idle, control, busy }),
        _ => None,
    };
    let start = r.console.len();
    r.type_line("s");
    r.wait_for("BENCH-REPORTED", Duration::from_secs(30))?;
    let summary = r.console[start..].to_string();
    // The guest's clock against L1's over the ping: /proc/uptime at both ends.
    let uptime = |marker: &str| -> Option<f64> {
        summary.lines().find(|l| l.contains(marker))?.split_whitespace().nth(1)?.parse().ok()
    };
    let guest_clock = match (uptime("BENCH-T0"), uptime("BENCH-T1")) {
        (Some(a), Some(b)) => (b - a) / (done - go).as_secs_f64(),
        _ => f64::NAN,
    };
    // Host→guest, timed by L1's clock (the guest's may not be right).
    let host_rtt = host_ping(o);
    r.type_line("bye");
    if vmm.exits_on_poweroff() {
        r.wait_exit(Duration::from_secs(60))?;
    }
    drop(backend);
    Ok(PingMeasured { mem, vmm: Windows { idle, control, busy }, summary, guest_clock, host_rtt, backend: backend_counts })
}

/// A filter on thread names.
type ThreadFilter<'a> = &'a dyn Fn(&str) -> bool;

/// Counts of event `ev` over the threads `f` accepts.
fn event_total(c: &Counts, f: ThreadFilter, ev: &str) -> f64 {
    c.iter().filter(|(t, _)| f(t)).map(|(_, e)| e.get(ev).copied().unwrap_or(0.0)).sum()
}

/// `clock_gettime` + `gettimeofday` over the threads `f` accepts.
fn clock_total(c: &Counts, f: ThreadFilter) -> f64 {
    CLOCK_SYSCALLS.iter().map(|s| event_total(c, f, s)).sum()
}

/// Device-path syscalls (all but the clock ones) over the threads `f` accepts.
fn device_total(c: &Counts, f: ThreadFilter) -> f64 {
    event_total(c, f, "ALL") - clock_total(c, f)
}

/// Per syscall name (plus `ALL`, and `(other)` for what no named one
/// covers): per ping, control- and idle-subtracted, all threads.
fn per_syscall(m: &PingMeasured, events: &[String], pings: f64) -> BTreeMap<String, f64> {
    let all = |_: &str| true;
    let mut by_syscall = BTreeMap::new();
    let mut names: Vec<String> = events
        .iter()
        .filter_map(|e| e.strip_prefix("syscalls:sys_enter_"))
        .map(String::from)
        .collect();
    names.push("ALL".into());
    for n in &names {
        let v = m.vmm.per_ping(pings, &all, &|c, f| event_total(c, f, n));
        by_syscall.insert(n.clone(), v);
    }
    let named: f64 = names.iter().filter(|n| *n != "ALL").map(|n| by_syscall[n]).sum();
    by_syscall.insert("(other)".into(), by_syscall["ALL"] - named);
    by_syscall
}

/// Per thread name: device-path syscalls per ping, control- and
/// idle-subtracted.
fn per_thread(m: &PingMeasured, pings: f64) -> BTreeMap<String, f64> {
    let mut by_thread = BTreeMap::new();
    let w = &m.vmm;
    for t in w.busy.counts.keys().chain(w.control.counts.keys()).chain(w.idle.counts.keys()) {
        let only = |x: &str| x == t;
        let v = w.per_ping(pings, &only, &device_total);
        by_thread.insert(t.clone(), v);
    }
    by_thread
}

/// One ping run of `vmm`: measured, then reduced to RTT and per-ping syscalls.
fn ping_once(o: &Opts, vmm: Vmm, run: usize, events: &[String]) -> Result<PingRun, String> {
    let m = measure_ping(o, vmm, run, events)?;
    let (received, rtt) = parse_ping(&m.summary).ok_or_else(|| format!("no ping summary in:\n{}", m.summary))?;
    if received == 0 || rtt.len() < 3 {
        return Err(format!("no replies:\n{}", m.summary));
    }
    let pings = o.pings as f64;

    let all = |_: &str| true;
    let vcpu = |t: &str| is_vcpu_thread(t);
    let idle_rate = m.vmm.idle_rate(&all);
    let per_ping = m.vmm.per_ping(pings, &all, &device_total);
    let backend_per_ping = m.backend.as_ref().map(|b| b.per_ping(pings, &all, &device_total));
    let per_ping_vcpu = m.vmm.per_ping(pings, &vcpu, &device_total);
    Ok(PingRun {
        guest_clock: m.guest_clock,
        host_rtt: m.host_rtt,
        rtt_avg: rtt[1],
        received,
        per_ping,
        per_ping_vcpu,
        raw_per_ping: event_total(&m.vmm.busy.counts, &all, "ALL") / pings,
        clock_per_ping: clock_total(&m.vmm.busy.counts, &all) / pings,
        idle_rate,
        by_syscall: per_syscall(&m, events, pings),
        by_thread: per_thread(&m, pings),
        mem: m.mem,
        backend_per_ping,
    })
}

// ---------------------------------------------------------------- report

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn range(v: &[f64], digits: usize) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.digits$}–{max:.digits$}")
}

fn list(v: &[f64], digits: usize) -> String {
    v.iter().map(|x| format!("{x:.digits$}")).collect::<Vec<_>>().join(", ")
}

fn main() {
    let mut o = parse_opts();
    o.allow_slow_kvm = o.setup && !kickvm_rig::host_kvm_is_usable();
    if let Some(f) = &o.tabulate {
        return tabulate(&o, f);
    }
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        die("needs root (TAP, perf); run it through scripts/bench-vmm.sh");
    }
    fs::create_dir_all(&o.out).unwrap_or_else(|e| die(&format!("cannot create {}: {e}", o.out.display())));
    if o.setup {
        let mut md = host_header(&o);
        return setup::setup_bench(&o, &mut md);
    }
    if !kickvm_rig::host_kvm_is_usable() && std::env::var_os("KICKVM_IN_RIG").is_none() {
        return orchestrate(&o);
    }
    let mut md = String::new();
    let started = Instant::now();
    md.push_str(&host_header(&o));
    if o.boot {
        boot_bench(&o, &mut md);
    }
    if o.ping {
        ping_bench(&o, &mut md);
    }
    let _ = writeln!(md, "\nWhole benchmark: {:.0} s inside L1. Raw consoles and perf outputs: `{}`.", started.elapsed().as_secs_f64(), o.out.display());
    kickvm_rig::say!("\nWhole benchmark: {:.0} s inside L1. Raw consoles and perf outputs: `{}`.", started.elapsed().as_secs_f64(), o.out.display());
    md_flush(&o, &md);
}

/// The "Host of the VMMs" paragraph: kernel, CPUs, QEMU version, guest.
fn host_header(o: &Opts) -> String {
    let mut md = String::new();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let qemu_version = Command::new(&o.qemu)
        .arg("--version")
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    // Transparent huge pages decide much of a boot's time (first touch of
    // guest RAM): the settings in force, `[the bracketed word]` of each file.
    let thp = |f: &str| {
        let s = fs::read_to_string(format!("/sys/kernel/mm/transparent_hugepage/{f}")).unwrap_or_default();
        s.split_whitespace()
            .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
            .unwrap_or("?")
            .to_string()
    };
    let _ = writeln!(
        md,
        "Host of the VMMs: Linux {} ({} CPUs{}); transparent huge pages: enabled `{}`, shmem_enabled `{}`; {}; \
         guest: default image (`kickvm-rig image --print-paths`), \
         1 vCPU, {MEMORY_MIB} MiB, command line `{KICKVM_DEFAULT_CMDLINE} {EXTRA_CMDLINE} kickvm.cmd=...`.\n",
        kernel.trim(),
        cpus,
        if std::env::var_os("KICKVM_IN_RIG").is_some() { ", L1 of the nested rig" } else { "" },
        thp("enabled"),
        thp("shmem_enabled"),
        qemu_version
    );
    md
}

/// The boot benchmark here: interleaved runs, then the table, added to
/// `md`; prints the document so far.
fn boot_bench(o: &Opts, md: &mut String) {
    let vmms = o.boot_vmms.clone();
    let mut res: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); vmms.len()];
    let mut owns: Vec<Vec<Own>> = vec![Vec::new(); vmms.len()];
    for run in (0..o.boot_runs).map(|r| r + o.run_offset) {
        for (i, v) in vmms.iter().enumerate() {
            match boot_once(o, *v, run) {
                Ok(b) => {
                    kickvm_rig::note!(
                        "bench: boot {} run {run}: /init {:.2} s, exit {} s, {}",
                        v.label(),
                        b.to_init,
                        b.to_exit.map_or("n/a".into(), |e| format!("{e:.2}")),
                        b.own.fields()
                    );
                    res[i].0.push(b.to_init);
                    res[i].1.extend(b.to_exit);
                    owns[i].push(b.own);
                }
                Err(e) => kickvm_rig::note!("bench: boot {} run {run}: FAILED: {e}", v.label()),
            }
        }
    }
    md.push_str(&boot_table(&vmms, &res, "interleaved"));
    md.push_str(&own_table(&vmms, &owns));
    kickvm_rig::say_raw!("{md}");
    md_flush(o, md);
}

/// The ping benchmark here: the TAP, interleaved runs, then the RTT and
/// syscall table, the breakdowns and the memory table, printed and added
/// to `md`.
fn ping_bench(o: &Opts, md: &mut String) {
    let events = perf_events();
    if let Err(e) = setup_tap() {
        die(&e);
    }
    let vmms = o.ping_vmms.clone();
    let res = ping_runs(o, &vmms, &events);
    let _ = Command::new("ip").args(["link", "del", TAP]).status();
    let mut s = ping_table(o, &vmms, &res);
    s.push_str(&served_outside_table(&vmms, &res));
    s.push_str(&syscall_breakdown(&vmms, &res));
    s.push_str(&thread_breakdown(&vmms, &res));
    s.push_str(&memory_table(&vmms, &res));
    kickvm_rig::say_raw!("{s}");
    md.push_str(&s);
    md_flush(o, md);
}

/// `o.ping_runs` rounds of one ping run per VMM; per VMM, the runs that
/// worked.
fn ping_runs(o: &Opts, vmms: &[Vmm], events: &[String]) -> Vec<Vec<PingRun>> {
    let mut res: Vec<Vec<PingRun>> = (0..vmms.len()).map(|_| Vec::new()).collect();
    for run in 0..o.ping_runs {
        for (i, v) in vmms.iter().enumerate() {
            match ping_once(o, *v, run, events) {
                Ok(p) => {
                    kickvm_rig::note!(
                        "bench: ping {} run {run}: rtt avg {:.3} ms (L1→guest {:?}, guest clock ×{:.2}), {:.2} syscalls/ping ({:.2} vCPU), raw {:.2}, clock {:.2}, idle {:.1}/s",
                        v.label(),
                        p.rtt_avg,
                        p.host_rtt,
                        p.guest_clock,
                        p.per_ping,
                        p.per_ping_vcpu,
                        p.raw_per_ping,
                        p.clock_per_ping,
                        p.idle_rate
                    );
                    res[i].push(p);
                }
                Err(e) => kickvm_rig::note!("bench: ping {} run {run}: FAILED: {e}", v.label()),
            }
        }
    }
    res
}

/// The ping table: how it was measured, then per VMM the RTTs, syscalls
/// per ping, idle rate and lost pings.
fn ping_table(o: &Opts, vmms: &[Vmm], res: &[Vec<PingRun>]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### Guest→host ping over a TAP: RTT and device-path syscalls per ping\n\n\
         Guest: `ping -q -c {} -i {} 10.0.2.2` (busybox); host end: TAP `{TAP}` {HOST_ADDR} in L1. \
         {} runs each, interleaved. Syscalls: `perf stat --per-thread -p PID -e raw_syscalls:sys_enter,syscalls:sys_enter_...` \
         over exactly the ping (switched on/off through perf's control FIFO; the guest prints nothing in that \
         window but a one-letter end marker, since every console character costs the VMM exits and a `write`), \
         every thread of the VMM (vCPU threads included), minus `clock_gettime`/`gettimeofday`, minus a control window of the \
         same boot marked the same way (console line in, end marker out, the guest's `cat` and one program start) with \
         `sleep {}` in place of `ping`, minus the rate of a {:.0} s idle window (guest blocked in `read` on its console) over \
         the two windows' difference in length, divided by {} pings. \
         RTT twice: busybox's in the guest (timed by the guest's clock), and busybox `ping -c N -i I 10.0.2.15` run in L1 \
         right after (host→guest, timed by L1's clock, not syscall-counted); \"guest clock / L1 clock\" compares the guest's \
         `/proc/uptime` with L1's clock over the ping.\n",
        o.pings,
        o.interval,
        o.ping_runs,
        o.control_secs(),
        o.idle_secs,
        o.pings
    );
    let _ = writeln!(s, "| VMM | guest→host RTT avg, ms (guest clock): median | range | L1→guest RTT avg, ms (L1 clock): median | range | guest clock / L1 clock | syscalls/ping: median | range | of which vCPU threads | raw syscalls/ping (no subtraction) | clock_gettime+gettimeofday/ping | idle syscalls/s | lost |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, v) in vmms.iter().enumerate() {
        let r = &res[i];
        let col = |f: &dyn Fn(&PingRun) -> f64| r.iter().map(f).collect::<Vec<f64>>();
        let lost: u32 = r.iter().map(|p| o.pings - p.received).sum();
        let _ = writeln!(
            s,
            "| {} | {:.2} | {} | **{:.2}** | {} | {:.2} | **{:.1}** | {} | {:.1} | {:.1} | {:.1} | {:.0} | {} |",
            v.label(),
            median(&col(&|p| p.rtt_avg)),
            range(&col(&|p| p.rtt_avg), 2),
            median(&col(&|p| p.host_rtt.map_or(f64::NAN, |h| h.0))),
            range(&col(&|p| p.host_rtt.map_or(f64::NAN, |h| h.0)), 2),
            median(&col(&|p| p.guest_clock)),
            median(&col(&|p| p.per_ping)),
            range(&col(&|p| p.per_ping), 1),
            median(&col(&|p| p.per_ping_vcpu)),
            median(&col(&|p| p.raw_per_ping)),
            median(&col(&|p| p.clock_per_ping)),
            median(&col(&|p| p.idle_rate)),
            lost
        );
    }
    s
}

/// When some configurations serve the NIC outside the VMM process
/// (vhost-user, vhost-net): the VMM's syscalls per ping beside the
/// back-end process's, and the RTTs, one row per configuration.
fn served_outside_table(vmms: &[Vmm], res: &[Vec<PingRun>]) -> String {
    let outside = |v: &Vmm| matches!(v, Vmm::KickvmNet(_) | Vmm::QemuPcVhost);
    if !vmms.iter().any(outside) {
        return String::new();
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nNIC served in the VMM process or outside it (vhost-user back-end process, the kernel's vhost-net): \
         device-path syscalls per ping of the VMM process and of the back-end process (counted the same way; \
         vhost-net's kernel thread makes no syscalls), medians over runs:\n"
    );
    let _ = writeln!(s, "| configuration | VMM process syscalls/ping | back-end process syscalls/ping | guest→host RTT avg, ms | L1→guest RTT avg, ms |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for (v, r) in vmms.iter().zip(res) {
        let col = |f: &dyn Fn(&PingRun) -> f64| median(&r.iter().map(f).collect::<Vec<f64>>());
        let backend = match v {
            Vmm::KickvmNet(NetServer::VhostUser) => format!("{:.2}", col(&|p| p.backend_per_ping.unwrap_or(f64::NAN))),
            _ => "–".into(),
        };
        let _ = writeln!(
            s,
            "| {} | **{:.2}** | {backend} | {:.2} | {:.2} |",
            v.label(),
            col(&|p| p.per_ping),
            col(&|p| p.rtt_avg),
            col(&|p| p.host_rtt.map_or(f64::NAN, |h| h.0))
        );
    }
    s
}

/// Where the syscalls go: per ping, by syscall, one column per VMM.
fn syscall_breakdown(vmms: &[Vmm], res: &[Vec<PingRun>]) -> String {
    let mut s = String::new();
    let mut names: Vec<String> = Vec::new();
    for r in res.iter().flatten() {
        for (n, v) in &r.by_syscall {
            if n != "ALL" && !names.contains(n) && (v.abs() >= 0.05) {
                names.push(n.clone());
            }
        }
    }
    names.sort_by_key(|n| n == "(other)");
    let _ = writeln!(
        s,
        "\nWhere the syscalls go — per ping, by syscall (median over runs, control- and idle-subtracted, all threads; \
         `clock_gettime` included here):\n"
    );
    let _ = write!(s, "| syscall |");
    for v in vmms {
        let _ = write!(s, " {} |", v.label());
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "|---|{}", "---|".repeat(vmms.len()));
    for n in &names {
        let _ = write!(s, "| {n} |");
        for r in res {
            let v: Vec<f64> = r.iter().map(|p| p.by_syscall.get(n).copied().unwrap_or(0.0)).collect();
            let _ = write!(s, " {:.2} |", median(&v));
        }
        let _ = writeln!(s);
    }
    s
}

/// Per VMM, one line: device-path syscalls per ping by thread name.
fn thread_breakdown(vmms: &[Vmm], res: &[Vec<PingRun>]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\nBy thread (per ping, median, control- and idle-subtracted, clocks excluded; threads with the same name added up):\n");
    for (i, v) in vmms.iter().enumerate() {
        let mut threads: Vec<String> = Vec::new();
        for p in &res[i] {
            for t in p.by_thread.keys() {
                if !threads.contains(t) {
                    threads.push(t.clone());
                }
            }
        }
        let parts: Vec<String> = threads
            .iter()
            .map(|t| {
                let vals: Vec<f64> = res[i].iter().map(|p| p.by_thread.get(t).copied().unwrap_or(0.0)).collect();
                format!("`{t}` {:.2}", median(&vals))
            })
            .collect();
        let _ = writeln!(s, "- {}: {}", v.label(), parts.join(", "));
    }
    s
}

/// The memory table: per VMM, RSS minus guest RAM, from the ping runs'
/// idle windows.
fn memory_table(vmms: &[Vmm], res: &[Vec<PingRun>]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n### VMM memory overhead (RSS minus guest RAM), guest idle after boot\n\n\
         From `/proc/PID/smaps` one second after the guest's script started (virtio-net attached, guest idle): \
         the Rss of every mapping, minus the Rss of the guest-RAM mapping (the anonymous RAM block \
         of ≥ ¾ of {MEMORY_MIB} MiB; kickvm with shared RAM: the memfd `kickvm-guest-ram`). \
         \"anon\" = the rest not backed by a file (heap, stacks, other anonymous maps), \"file\" = binaries and libraries. \
         MiB, median over runs.\n"
    );
    let _ = writeln!(s, "| VMM | total RSS | guest RAM touched | **overhead** | of which anon | of which file | threads |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for (i, v) in vmms.iter().enumerate() {
        let r = &res[i];
        let mib = |f: &dyn Fn(&Mem) -> u64| median(&r.iter().map(|p| f(&p.mem) as f64 / 1024.0).collect::<Vec<_>>());
        let threads = r.first().map(|p| summarize_threads(&p.mem.threads)).unwrap_or_default();
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.1} | **{:.2}** | {:.2} | {:.2} | {} |",
            v.label(),
            mib(&|m| m.total_kib),
            mib(&|m| m.guest_kib),
            mib(&|m| m.total_kib - m.guest_kib),
            mib(&|m| m.other_anon_kib),
            mib(&|m| m.other_file_kib),
            threads
        );
    }
    s
}

fn summarize_threads(names: &[String]) -> String {
    let mut m: BTreeMap<&str, usize> = BTreeMap::new();
    for n in names {
        *m.entry(n.as_str()).or_default() += 1;
    }
    let parts: Vec<String> = m.iter().map(|(n, c)| if *c > 1 { format!("{n}×{c}") } else { n.to_string() }).collect();
    format!("{}: {}", names.len(), parts.join(", "))
}

fn md_flush(o: &Opts, md: &str) {
    let _ = fs::write(o.out.join("results.md"), md);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_line_reads_back_as_written() {
        let own = Own { first_run: Some(1.25), cpu: Some(3.5), rss: Some(98.0), threads: Some(0.4528), vcpu_user: Some(1.4), vcpu_sys: None };
        let line = format!("bench: boot Firecracker, vmlinux run 1: /init 4.90 s, exit n/a s, {}", own.fields());
        let back = Own::parse(&line);
        assert_eq!((back.first_run, back.cpu, back.rss), (Some(1.25), Some(3.5), Some(98.0)));
        assert_eq!((back.threads, back.vcpu_user, back.vcpu_sys), (Some(0.4528), Some(1.4), None));
        // No exit time (Firecracker stays after poweroff): the run still counts.
        assert_eq!(boot_result(&line), Some((4.90, None)));
        let (mut res, mut owns) = ((vec![], vec![]), vec![]);
        assert!(take_boot_result(&line, &mut res, &mut owns));
        assert_eq!((res.0, res.1.len(), owns.len()), (vec![4.90], 0, 1));
        assert!(!take_boot_result("bench: boot kickvm run 0: FAILED: no `/init`", &mut (vec![], vec![]), &mut vec![]));
    }

    #[test]
    fn an_api_response_is_read_to_the_end_of_its_body_and_no_further() {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.write_all(b"HTTP/1.1 400\r\nContent-Type: application/json\r\ncontent-length: 7\r\n\r\n[\"bad\"]HTTP/1.1 204\r\n\r\n").unwrap();
        let mut r = BufReader::new(&mut a);
        assert_eq!(http_response(&mut r).unwrap(), (400, "[\"bad\"]".to_string()));
        assert_eq!(http_response(&mut r).unwrap(), (204, String::new()));
        drop(b);
        assert!(http_response(&mut r).is_err(), "a closed connection is no response");
    }

    #[test]
    fn the_cost_of_marking_a_window_is_not_charged_to_the_pings() {
        // A process that makes 2 syscalls a second on its own, 30 to mark
        // any window (console in and out), and 5 per ping on `net0-q0`.
        let counts = |thread: &str, all: f64| -> Counts {
            BTreeMap::from([(thread.to_string(), BTreeMap::from([("ALL".to_string(), all)]))])
        };
        let w = |secs: f64, all: f64| Window { counts: counts("net0-q0", all), secs };
        let (pings, busy_secs, control_secs) = (200.0, 4.5, 4.0);
        let m = Windows {
            idle: w(3.0, 2.0 * 3.0),
            control: w(control_secs, 30.0 + 2.0 * control_secs),
            busy: w(busy_secs, 30.0 + 2.0 * busy_secs + 5.0 * pings),
        };
        let all = |_: &str| true;
        assert!((m.per_ping(pings, &all, &device_total) - 5.0).abs() < 1e-9);
        assert!((m.idle_rate(&all) - 2.0).abs() < 1e-9);
        let other = |t: &str| t == "vcpu0";
        assert_eq!(m.per_ping(pings, &other, &device_total), 0.0);
    }

    #[test]
    fn vcpu_threads_of_every_vmm_are_told_apart() {
        for t in ["vcpu0", "fc_vcpu 0", "CPU 0/KVM"] {
            assert!(is_vcpu_thread(t), "{t}");
        }
        for t in ["kickvm", "firecracker", "_net0_qp0", "qemu-system-x86", "kickvm-api"] {
            assert!(!is_vcpu_thread(t), "{t}");
        }
    }
}
