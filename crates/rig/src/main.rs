//! `kickvm-rig`: build guest images, boot them under QEMU, and run host
//! commands inside the nested-KVM rig. `kickvm-rig help` teaches the rest.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use kickvm_rig::image::{self, GuestImage, Variant};
use kickvm_rig::qemu::{self, Accel, BootOptions};
use kickvm_rig::rig::{self, RigOptions};
use kickvm_rig::{note, say, Error, Result};

const HELP: &str = "\
kickvm-rig: real Linux guests for kickvm's tests

USAGE
  kickvm-rig image [--with-tools | --minimal | --rig] [--print-paths | --print-vmlinux]
      Build the guest image (Debian cloud kernel + busybox initramfs with the
      virtio modules and kickvm's /init) from Debian packages, or find it in the
      cache. --with-tools adds iperf3, fio and ethtool; --minimal leaves out
      socat and all modules but net and block (a ~1 MiB initramfs, for 64 MiB
      guests); --rig builds the rig's L1 image. --print-paths prints `KERNEL INITRD` on stdout. --print-vmlinux
      prints the path of the uncompressed kernel (an ELF vmlinux with a PVH
      entry point, for `kickvm run --kernel`), taken out of the bzImage's LZ4
      payload into the image's directory on first use.

  kickvm-rig run [--timeout SECS] [--memory MiB] [--cpus N] [--share DIR]... -- CMD ARGS...
      Run a host command inside L1, a Linux under QEMU TCG (-cpu max, nested
      SVM) where /dev/kvm works. L1 sees the host's / read-only, cwd and PATH,
      HOME, RUST_BACKTRACE, KICKVM_* are passed, KICKVM_IN_RIG=1 is set; /tmp
      and /run are L1's own tmpfs; --share DIR makes DIR read-write at the same
      path. Prints the command's output; exits with its status (124 on timeout).
      Defaults: --timeout 1200 --memory 3072 --cpus 2.

  kickvm-rig boot-qemu [--tools] [--kvm | --tcg] [--kernel K --initrd I]
                       [--cmd SCRIPT | --script FILE] [--disk FILE]... [--tap IFNAME]
                       [--memory MiB] [--cpus N] [--append ARGS] [--timeout SECS]
      Boot the guest image under QEMU (KVM if usable here, else TCG). With
      --cmd or --script the guest runs it and powers off; the exit status is
      the script's. Without, you get a shell on the console (exit to power off).

  kickvm-rig host-kvm
      Exit 0 if this host's /dev/kvm can run a stock kernel, 1 if tests need the rig.

GUEST MARKERS (console)
  KICKVM-INIT-START, KICKVM-SCRIPT-START, KICKVM-EXIT-STATUS=<n>

CACHE
  $KICKVM_CACHE, else ~/.cache/kickvm (downloads, unpacked packages, images).
  Host packages: scripts/install-deps.sh. More: docs/testing.md.
";

fn usage(msg: &str) -> Error {
    Error::with_hint(msg.to_owned(), "see `kickvm-rig help`")
}

/// Pulls the value of an option like `--timeout 30`.
fn value<I: Iterator<Item = String>>(args: &mut I, opt: &str) -> Result<String> {
    args.next()
        .ok_or_else(|| usage(&format!("{opt} needs a value")))
}

fn number<I: Iterator<Item = String>>(args: &mut I, opt: &str) -> Result<u64> {
    let v = value(args, opt)?;
    v.parse()
        .map_err(|_| usage(&format!("{opt} wants a whole number, not '{v}'")))
}

fn cmd_image(args: Vec<String>) -> Result<i32> {
    let (mut variant, mut print, mut vmlinux) = (Variant::Guest, false, false);
    for a in args {
        match a.as_str() {
            "--with-tools" => variant = Variant::Tools,
            "--minimal" => variant = Variant::Minimal,
            "--rig" => variant = Variant::Rig,
            "--print-paths" => print = true,
            "--print-vmlinux" => vmlinux = true,
            "-h" | "--help" => return Ok(help()),
            other => return Err(usage(&format!("unknown option '{other}' for `image`"))),
        }
    }
    if print && vmlinux {
        return Err(usage("--print-paths and --print-vmlinux print different things: use one"));
    }
    let img = image::image(variant)?;
    if vmlinux {
        say!("{}", img.vmlinux()?.display());
    } else if print {
        say!("{} {}", img.kernel.display(), img.initrd.display());
    } else {
        note!(
            "rig: {} image: kernel {} initrd {}",
            variant.name(),
            img.kernel.display(),
            img.initrd.display()
        );
    }
    Ok(0)
}

fn cmd_run(args: Vec<String>) -> Result<i32> {
    let mut opts = RigOptions::default();
    let mut it = args.into_iter();
    let mut cmd = Vec::new();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--timeout" => opts.timeout = Duration::from_secs(number(&mut it, "--timeout")?),
            "--memory" => opts.memory_mib = number(&mut it, "--memory")? as u32,
            "--cpus" => opts.cpus = number(&mut it, "--cpus")? as u32,
            "--share" => opts.shares.push(PathBuf::from(value(&mut it, "--share")?)),
            "--" => {
                cmd.extend(it.by_ref());
            }
            "-h" | "--help" => return Ok(help()),
            other if other.starts_with("--") => {
                return Err(usage(&format!("unknown option '{other}' for `run`")))
            }
            _ => {
                cmd.push(a);
                cmd.extend(it.by_ref());
            }
        }
    }
    opts.stream = true;
    match rig::run_in_rig(&cmd, &opts) {
        Ok(out) => {
            if out.status != 0 {
                note!("rig: command failed with exit status {}", out.status);
            }
            Ok(out.status)
        }
        Err(e) if e.what.starts_with("rig timed out") => {
            note!("kickvm-rig: {e}");
            Ok(rig::TIMEOUT_EXIT)
        }
        Err(e) => Err(e),
    }
}

/// `boot-qemu`'s options: [`BootOptions`] (with a placeholder image) and
/// what picks the image and the script disk.
struct BootArgs {
    opts: BootOptions,
    variant: Variant,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    script_file: Option<PathBuf>,
    /// `--help` was asked for: nothing else is done.
    help: bool,
}

/// Parses `boot-qemu`'s options.
fn parse_boot_args(args: Vec<String>) -> Result<BootArgs> {
    let mut variant = Variant::Guest;
    let (mut kernel, mut initrd): (Option<PathBuf>, Option<PathBuf>) = (None, None);
    let mut accel = None;
    let mut script_file = None;
    let mut help = false;
    let placeholder = GuestImage {
        kernel: PathBuf::new(),
        initrd: PathBuf::new(),
        kernel_version: String::new(),
        dir: PathBuf::new(),
    };
    let mut opts = BootOptions::new(placeholder);
    opts.echo = true;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tools" => variant = Variant::Tools,
            "--kvm" => accel = Some(Accel::Kvm),
            "--tcg" => accel = Some(Accel::Tcg),
            "--kernel" => kernel = Some(value(&mut it, "--kernel")?.into()),
            "--initrd" => initrd = Some(value(&mut it, "--initrd")?.into()),
            "--cmd" => opts.script = Some(value(&mut it, "--cmd")?),
            "--script" => script_file = Some(PathBuf::from(value(&mut it, "--script")?)),
            "--disk" => opts.disks.push(value(&mut it, "--disk")?.into()),
            "--tap" => opts.tap = Some(value(&mut it, "--tap")?),
            "--memory" => opts.memory_mib = number(&mut it, "--memory")? as u32,
            "--cpus" => opts.cpus = number(&mut it, "--cpus")? as u32,
            "--append" => opts.append = value(&mut it, "--append")?,
            "--timeout" => opts.timeout = Duration::from_secs(number(&mut it, "--timeout")?),
            "-h" | "--help" => help = true,
            other => return Err(usage(&format!("unknown option '{other}' for `boot-qemu`"))),
        }
    }
    if let Some(a) = accel {
        opts.accel = a;
    }
    Ok(BootArgs {
        opts,
        variant,
        kernel,
        initrd,
        script_file,
        help,
    })
}

/// The image to boot: `--kernel` and `--initrd` as given, or else the
/// cached image of `variant` (built if missing).
fn boot_image(
    variant: Variant,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
) -> Result<GuestImage> {
    match (kernel, initrd) {
        (Some(kernel), Some(initrd)) => Ok(GuestImage {
            kernel,
            initrd,
            kernel_version: String::new(),
            dir: PathBuf::new(),
        }),
        (None, None) => image::image(variant),
        _ => Err(usage("--kernel and --initrd go together")),
    }
}

/// Writes the `--script` file onto a temporary script disk; the disk is
/// removed when the returned guard drops.
fn script_disk(file: &Path) -> Result<RemoveOnDrop> {
    let text =
        std::fs::read_to_string(file).map_err(|e| Error::io("cannot read script", file, e))?;
    let disk = std::env::temp_dir().join(format!("kickvm-script-{}.img", std::process::id()));
    image::write_script_disk(&text, &disk)?;
    Ok(RemoveOnDrop(disk))
}

/// `boot-qemu`: boots the image, runs the script (or gives a console shell)
/// and returns the script's exit status.
fn cmd_boot(args: Vec<String>) -> Result<i32> {
    let BootArgs {
        mut opts,
        variant,
        kernel,
        initrd,
        script_file,
        help: asked,
    } = parse_boot_args(args)?;
    if asked {
        return Ok(help());
    }
    opts.image = boot_image(variant, kernel, initrd)?;
    qemu::check_image(&opts.image)?;
    let _disk_guard;
    if let Some(f) = script_file {
        let guard = script_disk(&f)?;
        opts.disks.insert(0, guard.0.clone());
        _disk_guard = guard;
    }
    if opts.script.is_none() && opts.disks.is_empty() {
        return interactive(&opts);
    }
    let out = qemu::boot(&opts)?;
    match out.exit_status {
        Some(s) => {
            note!(
                "rig: guest finished in {:.1} s (script exit {s})",
                out.elapsed.as_secs_f64()
            );
            Ok(s)
        }
        None => Err(Error::with_hint(
            "the guest powered off without printing KICKVM-EXIT-STATUS",
            "was a script given (--cmd, --script, or a disk starting with #kickvm-script)?",
        )),
    }
}

/// A console shell: QEMU's serial on our terminal (Ctrl-A X quits QEMU).
fn interactive(opts: &BootOptions) -> Result<i32> {
    let qemu_bin = qemu::qemu_binary();
    let mut cmd = std::process::Command::new(&qemu_bin);
    cmd.args(qemu::qemu_args(opts, "mon:stdio"));
    let status = cmd.status().map_err(|e| {
        Error::with_hint(
            format!("cannot run {qemu_bin}: {e}"),
            "run scripts/install-deps.sh",
        )
    })?;
    Ok(status.code().unwrap_or(1))
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Prints the help (every command's) on stdout; status 0.
fn help() -> i32 {
    say!("{}", HELP.trim_end());
    0
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let sub = args.next().unwrap_or_else(|| "help".into());
    let rest: Vec<String> = args.collect();
    let result = match sub.as_str() {
        "image" => cmd_image(rest),
        "run" => cmd_run(rest),
        "boot-qemu" => cmd_boot(rest),
        "host-kvm" => {
            let usable = rig::host_kvm_is_usable();
            say!("{}", if usable { "usable: tests run directly" } else { "not usable: tests use the rig" });
            Ok(if usable { 0 } else { 1 })
        }
        "help" | "--help" | "-h" => Ok(help()),
        other => Err(usage(&format!("unknown command '{other}'"))),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            note!("kickvm-rig: {e}");
            ExitCode::from(2)
        }
    }
}
