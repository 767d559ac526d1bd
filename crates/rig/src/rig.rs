//! The nested rig: run a host command inside an "L1" Linux under QEMU TCG
//! with `-cpu max` (nested SVM), where `kvm-amd` gives a working
//! `/dev/kvm`. L1 sees the host's root read-only over 9p and chroots into
//! it, so host binaries (cargo test binaries, QEMU, the launcher) run
//! unchanged. A scratch directory is shared read-write at the same path;
//! the command's stdout, stderr and exit status come back through it.
//!
//! Why: this family of hosts has a `/dev/kvm` (kvm_pvm) that emulates
//! guest kernel code at ~1.5 MIPS; see `docs/testing.md`.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::image::{self, Variant};
use crate::qemu;

/// Exit status the CLI uses when the rig had to kill L1 (as `timeout(1)`).
pub const TIMEOUT_EXIT: i32 = 124;

/// Environment variables passed into L1 (plus every `KICKVM_*`).
const PASSED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "TERM",
    "RUST_BACKTRACE",
    "RUST_LOG",
];

/// How to run L1.
#[derive(Debug, Clone)]
pub struct RigOptions {
    /// Kill L1 after this long (boot included).
    pub timeout: Duration,
    /// L1 memory in MiB.
    pub memory_mib: u32,
    /// L1 vCPUs (TCG runs one host thread per vCPU).
    pub cpus: u32,
    /// More host directories to share read-write, at the same paths.
    pub shares: Vec<PathBuf>,
    /// Copy the command's output to our stdout/stderr while it runs.
    pub stream: bool,
    /// Print stage timings (`rig: L1 booted in 6.8 s`) to stderr.
    pub report: bool,
    /// For a command that keeps L1 busy all along (the soak): L1 counts
    /// as hung, and is tried again, once every vCPU has been halted this
    /// long. L1 has been seen to stop so mid-command, idle, its console
    /// silent. `None`: a command may idle as long as it likes.
    pub idle_limit: Option<Duration>,
}

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            timeout: Duration::from_secs(1200),
            memory_mib: 3072,
            cpus: 2,
            shares: Vec::new(),
            stream: false,
            report: true,
            idle_limit: None,
        }
    }
}

/// How long each stage took.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Finding (or building) the L1 image.
    pub image: Duration,
    /// From starting QEMU to the command starting in L1.
    pub boot: Duration,
    /// The command itself.
    pub command: Duration,
}

/// A finished command.
#[derive(Debug, Clone)]
pub struct RigOutput {
    /// The command's exit status (128+N when killed by signal N).
    pub status: i32,
    /// What it wrote to stdout.
    pub stdout: Vec<u8>,
    /// What it wrote to stderr.
    pub stderr: Vec<u8>,
    /// Stage timings.
    pub timings: Timings,
}

impl RigOutput {
    /// True when the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// True when this host's `/dev/kvm` can run a stock Linux kernel: it
/// exists, is not `kvm_pvm`, and the CPU has `vmx` or `svm`. Inside the
/// rig's L1 this is true.
pub fn host_kvm_is_usable() -> bool {
    if !Path::new("/dev/kvm").exists() || Path::new("/sys/module/kvm_pvm").exists() {
        return false;
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Quotes `s` for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script L1 runs in the chroot: cd to the host's cwd, set the
/// environment, run the command, report the L2 triple faults L1 saw
/// meanwhile, exit with the command's status.
fn command_script(cmd: &[String], cwd: &Path, scratch: &Path) -> String {
    let cwd = sh_quote(&cwd.to_string_lossy());
    let mut env: Vec<String> = std::env::vars()
        .filter(|(k, _)| PASSED_ENV.contains(&k.as_str()) || k.starts_with("KICKVM_"))
        .filter(|(k, _)| k != "KICKVM_RIG_SCRATCH")
        .map(|(k, v)| sh_quote(&format!("{k}={v}")))
        .collect();
    env.push("KICKVM_IN_RIG=1".into());
    for (k, dir) in crate::image::resolved_env() {
        if std::env::var_os(&k).is_none() {
            env.push(sh_quote(&format!("{k}={}", dir.display())));
        }
    }
    env.push(sh_quote(&format!(
        "KICKVM_RIG_SCRATCH={}",
        scratch.display()
    )));
    let argv: Vec<String> = cmd.iter().map(|a| sh_quote(a)).collect();
    format!(
        "cd {cwd} 2>/dev/null || {{ echo \"rig: cwd {cwd} is not visible in L1 (/tmp and /run are L1's own); running in /\" >&2; cd /; }}\n{TRACE_SHUTDOWNS}env -i {} {}\nstatus=$?\n{REPORT_SHUTDOWNS}exit $status\n",
        env.join(" "),
        argv.join(" ")
    )
}

/// Before the command: L1's KVM records every shutdown exit of an L2
/// vCPU (SVM exit code 0x7f, a triple fault) with the guest's RIP at the
/// fault — which no VMM can read afterwards, KVM on AMD having reset the
/// vCPU (docs/reliability.md). Only those exits pass the filter.
const TRACE_SHUTDOWNS: &str = "t=/sys/kernel/tracing; [ -d $t/events ] || mount -t tracefs tracefs $t 2>/dev/null; \
{ echo 'exit_reason == 127' > $t/events/kvm/kvm_exit/filter && echo 1 > $t/events/kvm/kvm_exit/enable; } 2>/dev/null\n";

/// After it: one stderr line per L2 triple fault L1 saw, if any.
const REPORT_SHUTDOWNS: &str =
    "grep -h 'reason shutdown' $t/trace 2>/dev/null | sed 's/^ */rig: L1 saw an L2 triple fault: /' >&2\n";

/// A fresh directory for one rig run: `console.log` and `scratch/`.
fn run_dir() -> Result<PathBuf> {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kickvm-rig-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("scratch")).map_err(|e| Error::io("cannot create", &dir, e))?;
    Ok(dir)
}

/// Appends what was added to `path` since `*pos` to `out` (and to `echo`).
fn follow(path: &Path, pos: &mut u64, out: &mut Vec<u8>, echo: Option<&mut dyn Write>) {
    let Ok(mut f) = fs::File::open(path) else {
        return;
    };
    if f.seek(SeekFrom::Start(*pos)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_ok() && !buf.is_empty() {
        *pos += buf.len() as u64;
        if let Some(w) = echo {
            let _ = w.write_all(&buf);
            let _ = w.flush();
        }
        out.extend_from_slice(&buf);
    }
}

/// One L1 at a time per process: two would share 2 cores and both crawl.
static ONE_L1: Mutex<()> = Mutex::new(());

/// Prints a stage line (`rig: ...`) on stderr when `opts.report` asks for it.
fn report(opts: &RigOptions, msg: String) {
    if opts.report {
        crate::note!("rig: {msg}");
    }
}

/// The files of one rig run, all under its run directory.
struct RunFiles {
    /// The run directory itself (removed after a successful run).
    dir: PathBuf,
    /// Shared read-write with L1: `cmd.sh` in, `started`, `stdout`,
    /// `stderr`, `status` out.
    scratch: PathBuf,
    /// L1's serial console.
    console: PathBuf,
    /// QEMU's own stderr.
    qemu_log: PathBuf,
}

impl RunFiles {
    /// A fresh run directory (see [`run_dir`]) and the paths in it.
    fn create() -> Result<RunFiles> {
        let dir = run_dir()?;
        Ok(RunFiles {
            scratch: dir.join("scratch"),
            console: dir.join("console.log"),
            qemu_log: dir.join("qemu.log"),
            dir,
        })
    }

    /// L1's console log followed by QEMU's stderr, for error messages.
    fn console_text(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
            + &fs::read_to_string(&self.qemu_log).unwrap_or_default()
    }
}

/// The host directories to share read-write into L1, canonicalized:
/// `extra` (the caller's `--share`s) plus what L1 would otherwise not see.
fn shares_for(cmd: &[String], cwd: &Path, extra: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut wanted = extra.to_vec();
    // L1 mounts its own tmpfs on /tmp and /run: a cache there would vanish.
    if let Ok(cache) = crate::debs::Cache::from_env() {
        if cache.root().starts_with("/tmp") || cache.root().starts_with("/run") {
            wanted.push(cache.root().to_path_buf());
        }
    }
    // The command's directory and program too: a clone checked out under
    // /tmp (as CI may do) would otherwise be invisible in L1. Share the
    // whole top directory (`/tmp/X`), which holds the checkout and its
    // target directory alike. So for every host path among the arguments
    // (`--kernel /tmp/X/vmlinux`); one that does not exist yet may be made
    // in L1 and is left alone.
    let program = cmd.first().map(PathBuf::from).filter(|p| p.is_absolute());
    let args = cmd.iter().skip(1).map(PathBuf::from).filter(|p| p.is_absolute() && p.exists());
    for p in std::iter::once(cwd.to_path_buf()).chain(program).chain(args) {
        let top: PathBuf = p.components().take(3).collect();
        let hidden = top.starts_with("/tmp") || top.starts_with("/run");
        if hidden && top.components().count() == 3 && !wanted.iter().any(|w| top.starts_with(w)) {
            // A program right in /tmp cannot be shared: that would hide
            // L1's own /tmp.
            if !top.is_dir() && top.exists() {
                return Err(Error::new(format!(
                    "{} is a file right in {}, which L1 replaces with its own tmpfs: move it into a directory there (the rig shares /tmp/DIR) or elsewhere",
                    top.display(),
                    top.parent().map_or("/".into(), |d| d.display().to_string())
                )));
            }
            wanted.push(top);
        }
    }
    let mut shares = Vec::new();
    for s in &wanted {
        let abs = fs::canonicalize(s).map_err(|e| Error::io("cannot share", s, e))?;
        if !abs.is_dir() {
            return Err(Error::new(format!("cannot share {}: not a directory (--share takes directories)", s.display())));
        }
        shares.push(abs);
    }
    Ok(shares)
}

/// The host variable that sets L1's `shmem_enabled` (transparent huge
/// pages in shared memory). Unset, L1 keeps the transparent-huge-page
/// settings Debian ships (`enabled` = `always`, `shmem_enabled` = `never`),
/// as a user's host has them; a benchmark that sets it reports both.
pub const SHMEM_THP_ENV: &str = "KICKVM_RIG_SHMEM_THP";
/// The values `shmem_enabled` takes.
const SHMEM_THP_VALUES: &[&str] = &["always", "within_size", "advise", "never", "deny", "force"];

/// L1's `shmem_enabled` as asked by [`SHMEM_THP_ENV`] (`None`: Debian's).
fn shmem_thp_opt_in(value: Option<&str>) -> Result<Option<String>> {
    match value {
        None | Some("") => Ok(None),
        Some(v) if SHMEM_THP_VALUES.contains(&v) => Ok(Some(v.to_string())),
        Some(v) => Err(Error::with_hint(
            format!("{SHMEM_THP_ENV}={v} is not a shmem_enabled setting"),
            format!("use one of {}, or unset it for Debian's default", SHMEM_THP_VALUES.join(", ")),
        )),
    }
}

/// L1's kernel command line: where the scratch share goes, which other
/// shares to mount, and `shmem_thp` (read by `rig-init.sh`).
fn l1_append(scratch: &Path, shares: &[PathBuf], shmem_thp: Option<&str>) -> String {
    let mut append = format!(
        "console=ttyS0 loglevel=4 panic=-1 mitigations=off kickvm.scratch={}",
        scratch.display()
    );
    if !shares.is_empty() {
        let list: Vec<String> = shares.iter().map(|s| s.display().to_string()).collect();
        append.push_str(&format!(" kickvm.shares={}", list.join(",")));
    }
    if let Some(v) = shmem_thp {
        append.push_str(&format!(" kickvm.shmem_thp={v}"));
    }
    append
}

/// The QEMU command that boots L1: TCG with `-cpu max` (nested SVM), the
/// host's root read-only over 9p, the scratch and the shares read-write.
fn l1_command(
    qemu_bin: &str,
    l1: &image::GuestImage,
    opts: &RigOptions,
    files: &RunFiles,
    shares: &[PathBuf],
    shmem_thp: Option<&str>,
) -> Command {
    let mut q = Command::new(qemu_bin);
    q.args([
        "-M",
        "pc",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
    ])
    .arg(opts.cpus.to_string())
    .arg("-m")
    .arg(opts.memory_mib.to_string())
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .arg("-serial")
    .arg(format!("file:{}", files.console.display()))
    // For the record of L1's vCPUs when the rig has to kill it.
    .arg("-monitor")
    .arg(format!("unix:{},server=on,wait=off", monitor_socket(&files.console).display()))
    .arg("-kernel")
    .arg(&l1.kernel)
    .arg("-initrd")
    .arg(&l1.initrd)
    .arg("-append")
    .arg(l1_append(&files.scratch, shares, shmem_thp))
    .args([
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    ])
    .arg("-virtfs")
    .arg(format!(
        "local,path={},mount_tag=scratch,security_model=none,multidevs=remap",
        files.scratch.display()
    ));
    for (i, s) in shares.iter().enumerate() {
        q.arg("-virtfs").arg(format!(
            "local,path={},mount_tag=share{i},security_model=none,multidevs=remap",
            s.display()
        ));
    }
    q
}

/// What the command has written to its output files in the scratch share
/// so far.
struct CommandOutput {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    out_pos: u64,
    err_pos: u64,
}

impl CommandOutput {
    /// Picks up what the command wrote to its output files since last time
    /// (and echoes it when streaming).
    fn drain(&mut self, scratch: &Path, stream: bool) {
        let (mut so, mut se) = (std::io::stdout(), std::io::stderr());
        follow(&scratch.join("stdout"), &mut self.out_pos, &mut self.stdout, if stream { Some(&mut so) } else { None });
        follow(&scratch.join("stderr"), &mut self.err_pos, &mut self.stderr, if stream { Some(&mut se) } else { None });
    }
}

/// How L1 ended.
struct L1End {
    /// False when the rig killed it at the deadline.
    exited: bool,
    /// When the command started in L1, if it did.
    started: Option<Instant>,
    /// L1's kernel reported a soft lockup and the rig killed it.
    lockup: bool,
    /// Every L1 vCPU spun in L1's kernel with interrupts off for
    /// [`WEDGE_AFTER`] and the rig killed it.
    wedged: bool,
    /// Every L1 vCPU was halted for [`RigOptions::idle_limit`] and the rig
    /// killed it.
    idle: bool,
    /// L1 had not started the command [`L1_BOOT_LIMIT`] after QEMU
    /// started, and the rig killed it.
    boot_hung: bool,
}

/// How long L1 may take to boot before the rig gives up on it and tries a
/// fresh one. L1 boots in 8–12 s here, and in under a minute with other
/// L1s and builds sharing the CPUs. One CI run (2026-12-06 20:00 UTC) had
/// an L1 whose kernel ran for 20 minutes, busy and with nothing on its
/// console, until the command's whole timeout ended it and failed the test.
const L1_BOOT_LIMIT: Duration = Duration::from_secs(300);

/// True if L1, booted `since_boot` ago, has not started the command and is
/// past [`L1_BOOT_LIMIT`].
fn l1_boot_overdue(started: Option<Instant>, since_boot: Duration) -> bool {
    started.is_none() && since_boot >= L1_BOOT_LIMIT
}

/// True once L1's console shows its kernel stuck in one task for a minute
/// (the watchdog's second report). Seen, rarely, with KVM in L1 running a
/// guest under QEMU's emulated SVM: the L1 kernel never recovers, and the
/// run would only end at the timeout.
fn l1_kernel_locked_up(console: &str) -> bool {
    console.matches("watchdog: BUG: soft lockup").count() >= 2
}

/// QEMU's monitor socket, next to L1's console log.
fn monitor_socket(console: &Path) -> PathBuf {
    console.with_file_name("monitor.sock")
}

/// Where [`record_l1_cpus`] writes, next to L1's console log.
fn l1_cpus_file(console: &Path) -> PathBuf {
    console.with_file_name("l1-cpus.txt")
}

/// Before the rig kills an L1 that stopped making progress: L1's vCPU
/// registers from QEMU's monitor (`info registers -a`), twice a second
/// apart, so the record shows whether L1 still runs and where (in its
/// kernel, in an L2 guest, halted). Best effort; a monitor that does not
/// answer is said in the file.
fn record_l1_cpus(console: &Path) {
    let mut text = String::new();
    for i in 0..2 {
        if i > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        match l1_registers(console, Duration::from_secs(2)) {
            Ok(t) => text.push_str(&t),
            Err(e) => text.push_str(&format!("QEMU's monitor did not answer: {e}\n")),
        }
    }
    let _ = fs::write(l1_cpus_file(console), text);
}

/// QEMU's `info registers -a` for L1's vCPUs, read until the monitor has
/// been quiet for `quiet`.
fn l1_registers(console: &Path, quiet: Duration) -> std::io::Result<String> {
    use std::os::unix::net::UnixStream;
    let mut m = UnixStream::connect(monitor_socket(console))?;
    m.set_read_timeout(Some(quiet))?;
    m.write_all(b"info registers -a\n")?;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    // The monitor keeps the connection open: read until it goes quiet.
    while let Ok(n) = m.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// True if every vCPU in an `info registers -a` dump runs kernel code
/// (CPL 0) with interrupts off (RFLAGS.IF clear) and is not halted. A
/// healthy L1 is never seen so twice in a row for long: an idle vCPU
/// halts, a busy one takes its timer interrupt. L1 has been seen wedged
/// exactly so, both vCPUs looping in its kernel with interrupts off, the
/// command (and the soft-lockup watchdog, which needs interrupts) never
/// moving again.
fn l1_cpus_spin_with_interrupts_off(dump: &str) -> bool {
    let cpus: Vec<bool> = dump
        .lines()
        .filter(|l| l.starts_with("RIP="))
        .map(|l| {
            let field = |name: &str| l.split_whitespace().find_map(|w| w.strip_prefix(name));
            let rflags = field("RFL=").and_then(|v| u64::from_str_radix(v, 16).ok());
            let interrupts_off = rflags.is_some_and(|f| f & 0x200 == 0);
            interrupts_off && field("CPL=") == Some("0") && field("HLT=") == Some("0")
        })
        .collect();
    !cpus.is_empty() && cpus.iter().all(|&spinning| spinning)
}

/// True if every vCPU in an `info registers -a` dump is halted: L1 idle.
fn l1_cpus_all_halted(dump: &str) -> bool {
    let cpus: Vec<bool> = dump
        .lines()
        .filter(|l| l.starts_with("RIP="))
        .map(|l| l.split_whitespace().any(|w| w == "HLT=1"))
        .collect();
    !cpus.is_empty() && cpus.iter().all(|&halted| halted)
}

/// How long every L1 vCPU must be seen spinning with interrupts off before
/// the rig calls L1 wedged (sampled every [`WEDGE_SAMPLE`]).
const WEDGE_AFTER: Duration = Duration::from_secs(60);
const WEDGE_SAMPLE: Duration = Duration::from_secs(5);

/// Waits for L1 to power off, killing it at `t_boot + opts.timeout`;
/// meanwhile notes the boot time when the command starts and collects the
/// command's output as it grows.
fn wait_for_l1(
    child: &mut std::process::Child,
    console: &Path,
    t_boot: Instant,
    opts: &RigOptions,
    scratch: &Path,
    output: &mut CommandOutput,
    timings: &mut Timings,
) -> Result<L1End> {
    let deadline = t_boot + opts.timeout;
    let mut started: Option<Instant> = None;
    let mut lockup = false;
    let (mut wedged, mut idle, mut boot_hung) = (false, false, false);
    let mut next_look = Instant::now();
    let mut next_sample = Instant::now() + WEDGE_SAMPLE;
    let mut spinning_since: Option<Instant> = None;
    let mut halted_since: Option<Instant> = None;
    let exited = loop {
        if Instant::now() >= next_look {
            next_look = Instant::now() + Duration::from_secs(2);
            if l1_kernel_locked_up(&fs::read_to_string(console).unwrap_or_default()) {
                record_l1_cpus(console);
                let _ = child.kill();
                let _ = child.wait();
                lockup = true;
                break false;
            }
            if l1_boot_overdue(started, t_boot.elapsed()) && Instant::now() < deadline {
                record_l1_cpus(console);
                let _ = child.kill();
                let _ = child.wait();
                boot_hung = true;
                break false;
            }
        }
        if started.is_some() && Instant::now() >= next_sample {
            next_sample = Instant::now() + WEDGE_SAMPLE;
            let dump = l1_registers(console, Duration::from_millis(300)).unwrap_or_default();
            let spinning = l1_cpus_spin_with_interrupts_off(&dump);
            spinning_since = if spinning { spinning_since.or(Some(Instant::now())) } else { None };
            let halted = opts.idle_limit.is_some() && l1_cpus_all_halted(&dump);
            halted_since = if halted { halted_since.or(Some(Instant::now())) } else { None };
            let idle_too_long = halted_since.zip(opts.idle_limit).is_some_and(|(t, limit)| t.elapsed() >= limit);
            if spinning_since.is_some_and(|t| t.elapsed() >= WEDGE_AFTER) || idle_too_long {
                record_l1_cpus(console);
                let _ = child.kill();
                let _ = child.wait();
                (wedged, idle) = (!idle_too_long, idle_too_long);
                break false;
            }
        }
        if started.is_none() && scratch.join("started").exists() {
            let now = Instant::now();
            timings.boot = now - t_boot;
            report(opts, format!("L1 booted in {:.1} s", timings.boot.as_secs_f64()));
            started = Some(now);
        }
        output.drain(scratch, opts.stream);
        match child.try_wait() {
            Ok(Some(_)) => break true,
            Ok(None) if Instant::now() >= deadline => {
                record_l1_cpus(console);
                let _ = child.kill();
                let _ = child.wait();
                break false;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(Error::new(format!("cannot wait for QEMU: {e}"))),
        }
    };
    Ok(L1End { exited, started, lockup, wedged, idle, boot_hung })
}

/// The command's exit status as L1 left it in the scratch share, or the
/// one-line error for an L1 that was killed or stopped before that.
fn command_status(end: &L1End, files: &RunFiles, opts: &RigOptions) -> Result<i32> {
    let console_text = files.console_text();
    if !end.exited {
        let stage = if end.started.is_some() {
            "while the command ran"
        } else {
            "before L1 finished booting"
        };
        return Err(Error::with_hint(
            format!(
                "rig timed out after {} s {stage}; L1 was killed; last console lines: {}",
                opts.timeout.as_secs(),
                qemu::tail(&console_text, 3)
            ),
            format!(
                "L1 console log: {}; L1's vCPU registers before the kill: {}; raise --timeout if the command is just slow",
                files.console.display(),
                l1_cpus_file(&files.console).display()
            ),
        ));
    }
    let status = fs::read_to_string(files.scratch.join("status"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    status.ok_or_else(|| {
        Error::with_hint(
            format!(
                "L1 stopped before the command finished; last console lines: {}",
                qemu::tail(&console_text, 5)
            ),
            format!("L1 console log: {}", files.console.display()),
        )
    })
}

/// Runs `cmd` (program and arguments, as on the host) inside L1 and
/// returns its output and exit status. The command's cwd is the host's
/// cwd; the environment is `PATH`, `HOME`, `RUST_BACKTRACE`, ... and every
/// `KICKVM_*` variable, plus `KICKVM_IN_RIG=1` and `KICKVM_RIG_SCRATCH`
/// (a read-write directory shared with the host).
///
/// Errors (one line each, with L1's console log path): L1 did not finish
/// within `opts.timeout`, or it stopped before the command finished.
pub fn run_in_rig(cmd: &[String], opts: &RigOptions) -> Result<RigOutput> {
    if cmd.is_empty() {
        return Err(Error::with_hint(
            "no command to run in the rig",
            "usage: kickvm-rig run -- CMD ARGS...",
        ));
    }
    let _one = ONE_L1.lock().unwrap_or_else(|p| p.into_inner());
    let t0 = Instant::now();
    let l1 = image::image(Variant::Rig)?;
    qemu::check_image(&l1)?;
    let mut timings = Timings {
        image: t0.elapsed(),
        ..Timings::default()
    };
    report(
        opts,
        format!("L1 image ready in {:.1} s", timings.image.as_secs_f64()),
    );

    // Up to two retries, each in a fresh L1, when L1 itself fails — its
    // kernel locks up, wedges with interrupts off, oopses or fails its own
    // boot, or L1 stops dead with no word from its kernel while the command
    // runs (seen under QEMU's emulated SVM, twice in a row in one CI run's
    // soak): that is the emulation stack failing, not the command.
    let mut last = String::new();
    for attempt in 1..=L1_ATTEMPTS {
        match attempt_in_l1(cmd, opts, &l1, &mut timings)? {
            Attempt::Done(out) => return Ok(out),
            Attempt::L1Failed(why) => {
                let next = if attempt < L1_ATTEMPTS { "; trying a fresh L1" } else { "" };
                report(opts, format!("{why} (attempt {attempt} of {L1_ATTEMPTS}){next}"));
                last = why;
            }
        }
    }
    Err(Error::new(format!("L1 failed {L1_ATTEMPTS} times running the command; the last time: {last}")))
}

/// How many L1s a command gets when L1 itself fails (never when the
/// command does).
const L1_ATTEMPTS: u32 = 3;

/// How one L1 run ended.
enum Attempt {
    Done(RigOutput),
    /// L1 itself failed (said why); the command may be tried again.
    L1Failed(String),
}

/// Boots one L1 and runs `cmd` in it.
fn attempt_in_l1(cmd: &[String], opts: &RigOptions, l1: &image::GuestImage, timings: &mut Timings) -> Result<Attempt> {
    let files = RunFiles::create()?;
    let cwd = std::env::current_dir()
        .map_err(|e| Error::new(format!("cannot read the current directory: {e}")))?;
    let script = command_script(cmd, &cwd, &files.scratch);
    fs::write(files.scratch.join("cmd.sh"), script)
        .map_err(|e| Error::io("cannot write", &files.scratch, e))?;
    let shares = shares_for(cmd, &cwd, &opts.shares)?;
    let qemu_bin = qemu::qemu_binary();
    let shmem_thp = shmem_thp_opt_in(std::env::var(SHMEM_THP_ENV).ok().as_deref())?;
    let mut q = l1_command(&qemu_bin, l1, opts, &files, &shares, shmem_thp.as_deref());
    let log = fs::File::create(&files.qemu_log)
        .map_err(|e| Error::io("cannot create", &files.qemu_log, e))?;
    q.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);

    let t_boot = Instant::now();
    let mut child = qemu::spawn(&mut q, &qemu_bin)?;
    let mut output = CommandOutput {
        stdout: Vec::new(),
        stderr: Vec::new(),
        out_pos: 0,
        err_pos: 0,
    };
    let end = wait_for_l1(&mut child, &files.console, t_boot, opts, &files.scratch, &mut output, timings)?;
    if end.lockup {
        return Ok(Attempt::L1Failed("L1's kernel locked up (soft lockup in its console); L1 was killed".into()));
    }
    if end.wedged {
        return Ok(Attempt::L1Failed(format!(
            "L1 wedged: every vCPU spun in its kernel with interrupts off for {} s; L1 was killed (its registers: {})",
            WEDGE_AFTER.as_secs(),
            l1_cpus_file(&files.console).display()
        )));
    }
    if end.idle {
        return Ok(Attempt::L1Failed(format!(
            "L1 hung idle: every vCPU halted for {} s while the command should have kept it busy; L1 was killed (its registers: {})",
            opts.idle_limit.unwrap_or_default().as_secs(),
            l1_cpus_file(&files.console).display()
        )));
    }
    if end.boot_hung {
        return Ok(Attempt::L1Failed(format!(
            "L1 did not finish booting in {} s (last console lines: {}); L1 was killed (its registers: {})",
            L1_BOOT_LIMIT.as_secs(),
            qemu::tail(&files.console_text(), 2),
            l1_cpus_file(&files.console).display()
        )));
    }
    if let Some(why) = qemu_refused(&end, &files) {
        return Err(Error::new(format!("QEMU did not start L1: {why}")));
    }
    if l1_failed_to_boot(&end) {
        return Ok(Attempt::L1Failed(format!(
            "L1 stopped before the command started (its own boot failed: {}); L1 console log: {}",
            qemu::tail(&files.console_text(), 2),
            files.console.display()
        )));
    }
    // Last bytes written just before L1 powered off.
    output.drain(&files.scratch, opts.stream);
    if let Some(s) = end.started {
        timings.command = s.elapsed();
    }
    if l1_stopped_dead(&end, &files) {
        return Ok(Attempt::L1Failed(format!(
            "L1 stopped while the command ran, its kernel silent (no panic, no power-off); L1 console log: {}",
            files.console.display()
        )));
    }
    if let Some(oops) = l1_kernel_failed_mid_command(&end, &files) {
        return Ok(Attempt::L1Failed(format!(
            "L1's kernel failed while the command ran ({oops}); L1 console log: {}",
            files.console.display()
        )));
    }
    let status = command_status(&end, &files, opts)?;
    report(
        opts,
        format!(
            "command finished in {:.1} s (exit {status})",
            timings.command.as_secs_f64()
        ),
    );
    let _ = fs::remove_dir_all(&files.dir);
    Ok(Attempt::Done(RigOutput {
        status,
        stdout: output.stdout,
        stderr: output.stderr,
        timings: timings.clone(),
    }))
}

/// QEMU's own error, if it exited before L1's kernel printed anything and
/// said why: an option it would refuse again (a share it cannot open, a
/// missing firmware), not a failure of L1 worth a fresh try.
fn qemu_refused(end: &L1End, files: &RunFiles) -> Option<String> {
    if !end.exited || end.started.is_some() || !fs::read_to_string(&files.console).unwrap_or_default().trim().is_empty() {
        return None;
    }
    let log = fs::read_to_string(&files.qemu_log).unwrap_or_default();
    let said = qemu::tail(&log, 2);
    (!said.is_empty()).then_some(said)
}

/// True if L1 ended on its own before the command started: its kernel
/// panicked or stopped while booting (seen under load: "IO-APIC + timer
/// doesn't work"). Nothing of the command ran, so it is L1's failure. A
/// boot that does not end by the deadline is not retried (that would
/// double the wait).
fn l1_failed_to_boot(end: &L1End) -> bool {
    end.exited && end.started.is_none()
}

/// True if L1 ended while the command ran without the command's status and
/// with nothing from L1's kernel after the command started: no panic, no
/// oops, no power-off — the machine under it stopped (QEMU's emulated
/// SVM has done this). A command that powers L1 off is the command's
/// result; a kernel that oopses is [`l1_kernel_failed_mid_command`].
fn l1_stopped_dead(end: &L1End, files: &RunFiles) -> bool {
    if !end.exited || end.started.is_none() || files.scratch.join("status").exists() {
        return false;
    }
    let console = files.console_text();
    let after = console.rsplit("KICKVM-RIG-CMD-START").next().unwrap_or("");
    !["Kernel panic", "Oops", "BUG:", "reboot: Power down", "reboot: Restarting"].iter().any(|m| after.contains(m))
}

/// The first line of L1's kernel oops or panic, if L1's kernel failed
/// while the command ran and the command left no status. A process in L1
/// cannot legitimately crash L1's kernel; the one seen (CI, 2026-12-06:
/// "BUG: TASK stack guard page was hit" on kickvm's `vcpu1`, page faults
/// recursing on a `%gs:` load right after a nested VM exit, i.e. L1's GS
/// base not restored) was QEMU's emulated SVM failing. A command that
/// does crash L1's kernel every time still fails, on the last attempt.
fn l1_kernel_failed_mid_command(end: &L1End, files: &RunFiles) -> Option<String> {
    if !end.exited || end.started.is_none() || files.scratch.join("status").exists() {
        return None;
    }
    let console = files.console_text();
    let after = console.rsplit("KICKVM-RIG-CMD-START").next().unwrap_or("");
    after
        .lines()
        .find(|l| ["Kernel panic", "Oops", "BUG:"].iter().any(|m| l.contains(m)))
        .map(|l| l.trim().to_string())
}

/// For a Rust test that needs a usable `/dev/kvm`: on a host where it is
/// not usable (and we are not already in the rig), re-runs this test
/// binary with `--exact <test_name> --nocapture --test-threads=1` inside
/// the rig and returns `Some(passed)`; the caller asserts on it and
/// returns. Returns `None` when the test should simply go on here.
///
/// The default guest image is built on the host first, since the cache is
/// read-only inside L1.
///
/// ```no_run
/// # fn boots_a_guest() {
/// if let Some(passed) = kickvm_rig::reexec_test_in_rig_if_needed("boots_a_guest") {
///     assert!(passed, "boots_a_guest failed inside the rig");
///     return;
/// }
/// // ... the test proper, with a working /dev/kvm ...
/// # }
/// ```
pub fn reexec_test_in_rig_if_needed(test_name: &str) -> Option<bool> {
    reexec_test_in_rig_with(test_name, RigOptions::default())
}

/// [`reexec_test_in_rig_if_needed`] with `opts` for the rig (its output
/// is always streamed), e.g. an [`RigOptions::idle_limit`] for a test
/// that keeps L1 busy.
pub fn reexec_test_in_rig_with(test_name: &str, opts: RigOptions) -> Option<bool> {
    if std::env::var_os("KICKVM_IN_RIG").is_some() || host_kvm_is_usable() {
        return None;
    }
    let result = (|| {
        image::default_image()?;
        let exe = std::env::current_exe()
            .map_err(|e| Error::new(format!("cannot find the test binary: {e}")))?;
        let cmd: Vec<String> = vec![
            exe.to_string_lossy().into_owned(),
            "--exact".into(),
            test_name.into(),
            "--nocapture".into(),
            "--test-threads=1".into(),
        ];
        run_in_rig(
            &cmd,
            &RigOptions { stream: true, ..opts },
        )
    })();
    match result {
        Ok(out) => Some(out.success()),
        Err(e) => {
            crate::note!("rig: {e}");
            Some(false)
        }
    }
}

/// The `System.map` of `img`'s kernel, from its unpacked Debian package
/// in the cache (`unpacked/linux-image-<release>_<version>/boot/`), for
/// `kickvm run`'s vCPU dumps (`KICKVM_SYSTEM_MAP`); None if not there.
pub fn system_map(img: &image::GuestImage) -> Option<PathBuf> {
    system_map_in(&crate::debs::Cache::from_env().ok()?.root().join("unpacked"), &img.kernel_version)
}

/// The `System.map` of kernel `release` among the packages unpacked in
/// `unpacked`.
fn system_map_in(unpacked: &Path, release: &str) -> Option<PathBuf> {
    let prefix = format!("linux-image-{release}_");
    fs::read_dir(unpacked)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path().join(format!("boot/System.map-{release}")))
        .find(|p| p.is_file())
}

/// What every thread of process `pid` is doing, one block per thread:
/// its name, state and wait channel (`/proc/PID/task/TID/{comm,stat,wchan}`)
/// and, as root, its kernel stack. For a VM that stopped making progress:
/// a vCPU thread inside `KVM_RUN` shows `kvm_vcpu_block`/`kvm_arch_vcpu_ioctl_run`
/// frames, one stuck in the launcher a futex or a join.
pub fn threads_report(pid: i32) -> String {
    let mut tids: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    tids.sort_unstable();
    if tids.is_empty() {
        return format!("process {pid}: gone\n");
    }
    let mut out = String::new();
    for tid in tids {
        let task = format!("/proc/{pid}/task/{tid}");
        let read = |f: &str| fs::read_to_string(format!("{task}/{f}")).unwrap_or_default();
        let comm = read("comm");
        // stat: "tid (comm) S ..."; the comm may hold spaces, so take the
        // state after its closing parenthesis.
        let stat = read("stat");
        let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.split_whitespace().next()).unwrap_or("?").to_string();
        out.push_str(&format!("{tid} {} state {state} wchan {}\n", comm.trim(), read("wchan").trim()));
        for frame in read("stack").lines() {
            out.push_str(&format!("    {frame}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_that_stops_dead_mid_command_is_told_from_a_command_that_ends_it() {
        let files = RunFiles::create().unwrap();
        let end = |exited| L1End { exited, started: Some(Instant::now()), lockup: false, wedged: false, idle: false, boot_hung: false };
        let console = |text: &str| fs::write(&files.console, text).unwrap();
        console("KICKVM-RIG-CMD-START\n[ 7.8] kvm [153]: vcpu0, guest rIP: 0x1 Unhandled WRMSR(0xc0010007) = 0xffff\n");
        assert!(l1_stopped_dead(&end(true), &files), "silent stop mid-command");
        assert!(!l1_stopped_dead(&end(false), &files), "a timeout is the rig's own kill");
        console("KICKVM-RIG-CMD-START\n[ 9.0] BUG: TASK stack guard page was hit at 0\n[ 9.1] Kernel panic - not syncing: Fatal exception\n");
        assert!(!l1_stopped_dead(&end(true), &files), "a panic is not a silent stop");
        assert_eq!(
            l1_kernel_failed_mid_command(&end(true), &files).as_deref(),
            Some("[ 9.0] BUG: TASK stack guard page was hit at 0"),
            "L1's kernel failing mid-command is L1's failure"
        );
        assert_eq!(l1_kernel_failed_mid_command(&end(false), &files), None, "a timeout is the rig's own kill");
        console("KICKVM-RIG-CMD-START\n[ 9.1] reboot: Power down\n");
        assert!(!l1_stopped_dead(&end(true), &files), "the command powered L1 off");
        console("KICKVM-RIG-CMD-START\n");
        fs::write(files.scratch.join("status"), "0").unwrap();
        assert!(!l1_stopped_dead(&end(true), &files), "the command finished");
        console("KICKVM-RIG-CMD-START\n[ 9.1] Kernel panic - not syncing: sysrq\n");
        assert_eq!(l1_kernel_failed_mid_command(&end(true), &files), None, "the command finished first: its result");
        let _ = fs::remove_dir_all(&files.dir);
    }

    #[test]
    fn l1_is_wedged_only_when_every_vcpu_spins_in_its_kernel_with_interrupts_off() {
        // As QEMU 7.2's monitor printed them for the L1 wedged in CI (00:50 UTC 2026-12-06).
        let cpu = |rip: &str, rfl: &str, cpl: u8, hlt: u8| {
            format!("RAX=0 RBX=0\nRIP={rip} RFL={rfl} [---Z-P-] CPL={cpl} II=0 A20=1 SMM=0 HLT={hlt}\nES =0000\n")
        };
        let dump = |cpus: &[String]| cpus.iter().enumerate().map(|(i, c)| format!("CPU#{i}\n{c}")).collect::<String>();
        let wedged = dump(&[cpu("ffffffffb1c00ba0", "00000046", 0, 0), cpu("ffffffffb1a5267b", "00000046", 0, 0)]);
        assert!(l1_cpus_spin_with_interrupts_off(&wedged));
        let one_halted = dump(&[cpu("ffffffffb1c00ba0", "00000046", 0, 0), cpu("ffffffffb1a5267b", "00000246", 0, 1)]);
        assert!(!l1_cpus_spin_with_interrupts_off(&one_halted), "an idle vCPU halts with interrupts on");
        let interrupts_on = dump(&[cpu("ffffffffb1c00ba0", "00000246", 0, 0), cpu("ffffffffb1a5267b", "00000046", 0, 0)]);
        assert!(!l1_cpus_spin_with_interrupts_off(&interrupts_on), "a busy vCPU takes interrupts");
        let user = dump(&[cpu("7f00", "00000046", 3, 0), cpu("ffffffffb1a5267b", "00000046", 0, 0)]);
        assert!(!l1_cpus_spin_with_interrupts_off(&user), "user space");
        assert!(!l1_cpus_spin_with_interrupts_off("QEMU's monitor did not answer"), "no dump is no verdict");
        // Idle: every vCPU halted, as L1 stood when a CI soak hung (stopped 04:48 UTC 2026-12-06).
        let idle = dump(&[cpu("ffffffffb1c00ba0", "00000246", 0, 1), cpu("ffffffffb1a5267b", "00000246", 0, 1)]);
        assert!(l1_cpus_all_halted(&idle));
        assert!(!l1_cpus_all_halted(&one_halted), "one vCPU still works");
        assert!(!l1_cpus_all_halted(&wedged));
        assert!(!l1_cpus_all_halted("QEMU's monitor did not answer"), "no dump is no verdict");
    }

    /// An L1 still booting past the limit is given up on; one that started
    /// the command is never, however long the command runs.
    #[test]
    fn only_an_l1_that_never_started_the_command_is_overdue() {
        assert!(!l1_boot_overdue(None, Duration::from_secs(12)));
        assert!(!l1_boot_overdue(None, L1_BOOT_LIMIT - Duration::from_secs(1)));
        assert!(l1_boot_overdue(None, L1_BOOT_LIMIT));
        assert!(!l1_boot_overdue(Some(Instant::now()), L1_BOOT_LIMIT * 4));
    }

    #[test]
    fn qemu_refusing_its_options_is_an_error_not_an_l1_to_retry() {
        let files = RunFiles::create().unwrap();
        let end = |exited, started: Option<Instant>| L1End { exited, started, lockup: false, wedged: false, idle: false, boot_hung: false };
        // As QEMU 7.2 said when a file was given as a share (2026-12-06).
        let said = "qemu-system-x86_64: -virtfs local,path=/tmp/tl.sh,mount_tag=share0: cannot initialize fsdev 'share0': failed to open '/tmp/tl.sh': Not a directory\n";
        fs::write(&files.qemu_log, said).unwrap();
        fs::write(&files.console, "").unwrap();
        let why = qemu_refused(&end(true, None), &files).expect("QEMU said why");
        assert!(why.contains("Not a directory"), "{why}");
        assert_eq!(qemu_refused(&end(false, None), &files), None, "killed at the deadline");
        assert_eq!(qemu_refused(&end(true, Some(Instant::now())), &files), None, "the command ran");
        fs::write(&files.console, "[    0.000000] Linux version 6.1.0\n[ 2.1] Kernel panic - not syncing: IO-APIC + timer doesn't work!\n").unwrap();
        assert_eq!(qemu_refused(&end(true, None), &files), None, "L1's kernel ran: its own boot failed");
        fs::write(&files.console, "").unwrap();
        fs::write(&files.qemu_log, "").unwrap();
        assert_eq!(qemu_refused(&end(true, None), &files), None, "QEMU said nothing");
        let _ = fs::remove_dir_all(&files.dir);
    }

    #[test]
    fn a_share_must_be_a_directory_and_a_program_right_in_tmp_is_refused() {
        let dir = std::env::temp_dir().join(format!("kickvm-rig-share-test-{}", std::process::id()));
        fs::create_dir_all(dir.join("sub")).unwrap();
        let file = dir.join("sub/run.sh");
        fs::write(&file, "#!/bin/sh\n").unwrap();
        let root = Path::new("/");
        let e = shares_for(&["true".into()], root, std::slice::from_ref(&file)).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        assert_eq!(shares_for(&["true".into()], root, &[dir.join("sub")]).unwrap(), vec![fs::canonicalize(dir.join("sub")).unwrap()]);
        if dir.starts_with("/tmp") {
            // A program in a directory under /tmp: that directory is shared.
            let shared = shares_for(&[file.display().to_string()], root, &[]).unwrap();
            assert!(shared.contains(&fs::canonicalize(&dir).unwrap()), "{shared:?}");
            // A program right in /tmp: refused, saying what to do.
            let right_in_tmp = PathBuf::from(format!("/tmp/kickvm-rig-share-test-{}.sh", std::process::id()));
            fs::write(&right_in_tmp, "#!/bin/sh\n").unwrap();
            let e = shares_for(&[right_in_tmp.display().to_string()], root, &[]).unwrap_err().to_string();
            let _ = fs::remove_file(&right_in_tmp);
            assert!(e.contains("move it into a directory"), "{e}");
            // The same for a host path among the arguments.
            let shared = shares_for(&["/bin/cat".into(), file.display().to_string()], root, &[]).unwrap();
            assert!(shared.contains(&fs::canonicalize(&dir).unwrap()), "{shared:?}");
            fs::write(&right_in_tmp, "x").unwrap();
            let e = shares_for(&["/bin/cat".into(), right_in_tmp.display().to_string()], root, &[]).unwrap_err().to_string();
            let _ = fs::remove_file(&right_in_tmp);
            assert!(e.contains("move it into a directory"), "{e}");
            // A path the command will make in L1 is none of the rig's business.
            let later = format!("/tmp/kickvm-rig-share-test-{}-not-yet", std::process::id());
            let shared = shares_for(&["/bin/touch".into(), later.clone()], root, &[]).unwrap();
            assert!(!shared.iter().any(|s| later.starts_with(&*s.to_string_lossy())), "{shared:?}");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn l1_that_fails_its_own_boot_is_retried_but_not_one_that_times_out() {
        let end = |exited, started: Option<Instant>| L1End { exited, started, lockup: false, wedged: false, idle: false, boot_hung: false };
        assert!(l1_failed_to_boot(&end(true, None)), "L1 panicked while booting");
        assert!(!l1_failed_to_boot(&end(false, None)), "a boot past the deadline is not retried");
        assert!(!l1_failed_to_boot(&end(true, Some(Instant::now()))), "the command started: its result");
    }

    #[test]
    fn the_threads_report_names_every_thread_of_a_live_process() {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::Builder::new()
            .name("kv-report-test".into())
            .spawn(move || {
                tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(500))
            })
            .unwrap();
        rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let report = threads_report(std::process::id() as i32);
        t.join().unwrap();
        let line = report.lines().find(|l| l.contains(" kv-report-test ")).unwrap_or_else(|| panic!("{report}"));
        assert!(line.contains(" state S wchan "), "{line}");
        assert_eq!(threads_report(i32::MAX), format!("process {}: gone\n", i32::MAX));
    }

    #[test]
    fn the_system_map_is_the_one_of_the_images_kernel_release() {
        let root = std::env::temp_dir().join(format!("kickvm-rig-sysmap-{}", std::process::id()));
        let boot = root.join("unpacked/linux-image-6.1.0-9-cloud-amd64_6.1.1-1/boot");
        fs::create_dir_all(&boot).unwrap();
        fs::create_dir_all(root.join("unpacked/linux-image-6.1.0-9-amd64_6.1.1-1/boot")).unwrap();
        fs::write(root.join("unpacked/linux-image-6.1.0-9-amd64_6.1.1-1/boot/System.map-6.1.0-9-amd64"), "x").unwrap();
        let unpacked = root.join("unpacked");
        assert_eq!(system_map_in(&unpacked, "6.1.0-9-cloud-amd64"), None, "not unpacked");
        fs::write(boot.join("System.map-6.1.0-9-cloud-amd64"), "x").unwrap();
        assert_eq!(system_map_in(&unpacked, "6.1.0-9-cloud-amd64"), Some(boot.join("System.map-6.1.0-9-cloud-amd64")));
        assert_eq!(system_map_in(&unpacked, "6.1.0-9-amd64").map(|p| p.is_file()), Some(true));
        let _ = fs::remove_dir_all(root);
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn command_script_sets_env_and_cwd() {
        let s = command_script(
            &["sh".into(), "-c".into(), "echo $X".into()],
            Path::new("/w d"),
            Path::new("/s"),
        );
        assert!(s.starts_with("cd '/w d'"));
        assert!(s.contains("KICKVM_IN_RIG=1"));
        assert!(s.contains("'KICKVM_RIG_SCRATCH=/s'"));
        assert!(s.contains("'sh' '-c' 'echo $X'\nstatus=$?\n"));
        assert!(s.ends_with("exit $status\n"));
    }

    #[test]
    fn l1_keeps_debians_thp_settings_unless_asked() {
        assert_eq!(shmem_thp_opt_in(None).unwrap(), None);
        assert_eq!(shmem_thp_opt_in(Some("")).unwrap(), None);
        let plain = l1_append(Path::new("/s"), &[], None);
        assert!(!plain.contains("shmem_thp"), "{plain}");
        let v = shmem_thp_opt_in(Some("advise")).unwrap();
        assert_eq!(v.as_deref(), Some("advise"));
        let asked = l1_append(Path::new("/s"), &[], v.as_deref());
        assert!(asked.ends_with(" kickvm.shmem_thp=advise"), "{asked}");
        let e = shmem_thp_opt_in(Some("yes please")).unwrap_err().to_string();
        assert!(e.contains("KICKVM_RIG_SHMEM_THP=yes please") && e.contains("advise"), "{e}");
    }
}

#[cfg(test)]
mod lockup_tests {
    use super::l1_kernel_locked_up;

    #[test]
    fn a_lockup_is_the_watchdogs_second_report() {
        let one = "[   36.35] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [kickvm:146]\n";
        assert!(!l1_kernel_locked_up("KICKVM-RIG-L1-START\n"));
        assert!(!l1_kernel_locked_up(one), "one report may be a slow moment");
        assert!(l1_kernel_locked_up(&format!("{one}{one}")));
    }
}
