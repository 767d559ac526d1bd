//! Boots a guest image under QEMU and reads what `/init` reports: the
//! reference VMM the project's own launcher is compared with, and the way
//! the rig's tests check that an image works.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::image::{self, GuestImage};

/// How the guest's CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// `/dev/kvm` (needs real hardware virtualization, or the rig's L1).
    Kvm,
    /// QEMU's software emulation; works anywhere, a few times slower.
    Tcg,
}

/// What to boot and how.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Kernel and initramfs.
    pub image: GuestImage,
    /// KVM or TCG.
    pub accel: Accel,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Test script passed on the kernel command line (`kickvm.cmd=`).
    pub script: Option<String>,
    /// Disk images attached as virtio-blk, in order (`/dev/vda`, ...);
    /// a script disk made by [`image::write_script_disk`] may be one.
    pub disks: Vec<PathBuf>,
    /// A TAP device to attach as virtio-net (`eth0` in the guest).
    pub tap: Option<String>,
    /// Run QEMU inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// Extra kernel command line arguments (e.g. `kickvm.ip=10.0.3.15/24`).
    pub append: String,
    /// Kill the guest after this long.
    pub timeout: Duration,
    /// Copy the console to stderr as it arrives.
    pub echo: bool,
}

impl BootOptions {
    /// Defaults: TCG (KVM when [`crate::host_kvm_is_usable`]), 256 MiB,
    /// 1 vCPU, no script, no disks, no network, 120 s timeout.
    pub fn new(image: GuestImage) -> Self {
        BootOptions {
            image,
            accel: if crate::host_kvm_is_usable() {
                Accel::Kvm
            } else {
                Accel::Tcg
            },
            memory_mib: 256,
            cpus: 1,
            script: None,
            disks: Vec::new(),
            tap: None,
            netns: None,
            append: String::new(),
            timeout: Duration::from_secs(120),
            echo: false,
        }
    }
}

/// What a finished boot left behind.
#[derive(Debug, Clone)]
pub struct BootOutput {
    /// Everything the guest wrote to its serial console.
    pub console: String,
    /// The `KICKVM-EXIT-STATUS=` the guest printed, if any.
    pub exit_status: Option<i32>,
    /// Wall time from QEMU's start to its exit.
    pub elapsed: Duration,
}

/// The QEMU binary: `$KICKVM_QEMU`, else `qemu-system-x86_64` on PATH.
pub fn qemu_binary() -> String {
    std::env::var("KICKVM_QEMU")
        .ok()
        .filter(|q| !q.is_empty())
        .unwrap_or_else(|| "qemu-system-x86_64".into())
}

/// Spawns QEMU, mapping "not found" to a one-line error with the fix.
pub(crate) fn spawn(cmd: &mut Command, program: &str) -> Result<Child> {
    cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::with_hint(
                format!("{program} not found"),
                "run scripts/install-deps.sh to install qemu-system-x86",
            )
        } else {
            Error::new(format!("cannot start {program}: {e}"))
        }
    })
}

/// Checks that the image files exist, with the command that builds them.
pub fn check_image(image: &GuestImage) -> Result<()> {
    for p in [&image.kernel, &image.initrd] {
        if !p.is_file() {
            return Err(Error::with_hint(
                format!("guest image file {} does not exist", p.display()),
                "build the image with `kickvm-rig image` or pass existing --kernel/--initrd paths",
            ));
        }
    }
    Ok(())
}

/// The QEMU command line (without the program) for `opts`. The console is
/// the first serial port; QEMU exits when the guest powers off.
pub fn qemu_args(opts: &BootOptions, serial: &str) -> Vec<String> {
    let accel = match opts.accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    let mut append = format!(
        "console=ttyS0 loglevel=4 panic=-1 mitigations=off {}",
        opts.append
    );
    if let Some(s) = &opts.script {
        append.push(' ');
        append.push_str(&image::script_cmdline(s));
    }
    let mut args: Vec<String> = [
        "-M",
        "pc",
        "-accel",
        accel,
        "-cpu",
        "max",
        "-smp",
        &opts.cpus.to_string(),
        "-m",
        &opts.memory_mib.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        serial,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "-kernel".into(),
        path_arg(&opts.image.kernel),
        "-initrd".into(),
        path_arg(&opts.image.initrd),
    ]);
    args.extend(["-append".into(), append.trim().to_owned()]);
    for (i, d) in opts.disks.iter().enumerate() {
        args.push("-drive".into());
        args.push(format!(
            "file={},if=none,id=d{i},format=raw,aio=threads",
            path_arg(d).replace(',', ",,")
        ));
        args.push("-device".into());
        args.push(format!("virtio-blk-pci,drive=d{i}"));
    }
    if let Some(tap) = &opts.tap {
        args.extend([
            "-netdev".into(),
            format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        ]);
        args.extend(["-device".into(), "virtio-net-pci,netdev=n0".into()]);
    }
    args.extend(["-device".into(), "virtio-rng-pci".into()]);
    args
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn command_for(opts: &BootOptions) -> (String, Command) {
    let qemu = qemu_binary();
    match &opts.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, &qemu]);
            (qemu, c)
        }
        None => (qemu.clone(), Command::new(qemu)),
    }
}

/// Boots the guest, waits for it to power off (or the timeout), and
/// returns its console and reported exit status. A guest that does not
/// finish in time is killed and reported as an error with the console's
/// last lines.
pub fn boot(opts: &BootOptions) -> Result<BootOutput> {
    check_image(&opts.image)?;
    let (qemu, mut cmd) = command_for(opts);
    cmd.args(qemu_args(opts, "stdio"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = spawn(&mut cmd, &qemu)?;
    let console = Arc::new(Mutex::new(Vec::<u8>::new()));
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut src| {
        let (console, echo) = (console.clone(), opts.echo);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = src.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if echo {
                    let _ = std::io::stderr().write_all(&buf[..n]);
                }
                console
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
        })
    })
    .collect();
    let status = wait_with_timeout(&mut child, opts.timeout)?;
    for r in readers {
        let _ = r.join();
    }
    let console =
        String::from_utf8_lossy(&console.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    let elapsed = started.elapsed();
    let Some(status) = status else {
        return Err(Error::new(format!(
            "guest did not power off within {} s and was killed; last console lines: {}",
            opts.timeout.as_secs(),
            tail(&console, 5)
        )));
    };
    let exit_status = image::parse_exit_status(&console);
    if !status.success() && exit_status.is_none() {
        return Err(Error::new(format!(
            "{qemu} failed ({status}): {}",
            tail(&console, 3)
        )));
    }
    Ok(BootOutput {
        exit_status,
        console,
        elapsed,
    })
}

/// Waits for `child` up to `timeout`; kills it and returns `None` if it
/// is still running then.
pub(crate) fn wait_with_timeout(
    child: &mut Child,
    timeout: Duration,
) -> Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Ok(Some(s)),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(None);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(Error::new(format!("cannot wait for QEMU: {e}"))),
        }
    }
}

/// The last `n` non-empty lines of `text`, joined with " | ".
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img() -> GuestImage {
        GuestImage {
            kernel: "/k".into(),
            initrd: "/i".into(),
            kernel_version: String::new(),
            dir: "/".into(),
        }
    }

    #[test]
    fn args_carry_script_disks_and_tap() {
        let mut o = BootOptions::new(img());
        o.accel = Accel::Tcg;
        o.script = Some("exit 3".into());
        o.disks = vec!["/tmp/a,b".into()];
        o.tap = Some("tap0".into());
        let a = qemu_args(&o, "stdio").join(" ");
        assert!(a.contains("-accel tcg"));
        assert!(a.contains("kickvm.cmd=ZXhpdCAz"));
        assert!(a.contains("file=/tmp/a,,b,if=none"));
        assert!(a.contains("ifname=tap0"));
    }

    #[test]
    fn missing_image_is_one_line_with_fix() {
        let e = check_image(&img()).unwrap_err().to_string();
        assert!(
            e.contains("/k does not exist") && e.contains("kickvm-rig image"),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }

    #[test]
    fn tail_takes_last_lines() {
        assert_eq!(tail("a\n\nb\nc\n", 2), "b | c");
    }
}
