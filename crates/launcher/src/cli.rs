//! The `kickvm` command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use kickvm_virtio::ThreadingMode;

use crate::config::{self, ConfigError, ConsoleSpec, DiskSpec, NetSpec, VhostUserSpec, VmConfig, VsockSpec};

const ABOUT: &str = "Boot a stock Linux kernel on KVM, with virtio devices whose queues are each served by their own thread";

const RUN_EXAMPLES: &str = "\
Examples:
  # The project's default guest (Debian cloud kernel + busybox initramfs),
  # built from Debian packages by kickvm-rig:
  kickvm run --kernel K --initrd I     # K I: `kickvm-rig image --print-paths`
  scripts/boot.sh                      # builds it and boots it, in the rig if needed

  # Your own kernel and initramfs, 2 vCPUs, 1 GiB, extra kernel arguments:
  kickvm run --kernel /boot/vmlinuz-6.1.0-18-amd64 --initrd initrd.img \\
             --cpus 2 --memory 1G --cmdline 'rdinit=/bin/sh quiet'

  # A writable disk, a read-only one, a network card on TAP `tap0`
  # with one queue pair per vCPU, and an entropy source:
  kickvm run --kernel bzImage --initrd initramfs --cpus 2 \\
             --disk path=root.img,serial=root --disk path=data.img,readonly=on \\
             --net tap=tap0,mac=52:54:00:12:34:56,queues=2 --rng

  # An uncompressed kernel, entered at its PVH entry point (no decompression;
  # `kickvm-rig image --print-vmlinux` gives the test guest's):
  kickvm run --kernel vmlinux --initrd initramfs
  # A bzImage compressed with LZ4 (Debian's) is decompressed by kickvm and
  # entered the same way; to have it decompress itself (and pick its own
  # random address, KASLR) in the guest instead:
  kickvm run --kernel bzImage --initrd initramfs --decompress-in-guest

  # A vsock device (guest CID 3); host programs reach guest port 1024
  # with `CONNECT 1024` on /tmp/vm.vsock (e.g. socat - UNIX-CONNECT:/tmp/vm.vsock):
  kickvm run --kernel bzImage --initrd initramfs --vsock cid=3,socket=/tmp/vm.vsock

  # The disk served by a vhost-user back-end (kickvm's own, or e.g.
  # qemu-storage-daemon's vhost-user-blk export), and the NIC served by the
  # host kernel's vhost-net (modprobe vhost_net):
  kickvm backend blk --socket /tmp/blk.sock path=root.img &
  kickvm run --kernel bzImage --initrd initramfs \
             --vhost-user blk,socket=/tmp/blk.sock --net tap=tap0,vhost=on

  # virtio-console (hvc0) on this terminal instead of the serial port:
  kickvm run --kernel bzImage --initrd initramfs --console stdio --cmdline console=hvc0

  # On a host whose /dev/kvm is kvm_pvm (too slow for Linux), inside the nested rig:
  kickvm-rig run -- kickvm run --kernel bzImage --initrd initramfs

The kernel command line always starts with:
  console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.dumbkbd
and --cmdline is appended. The serial port (ttyS0) prints to stdout and,
unless --console stdio, reads stdin. Guest `poweroff` ends kickvm with
status 0; guest `reboot` boots the VM again (or ends it with --no-reboot).
Exit status: 0 the guest powered off; 1 an error (the line above says
which); 2 bad options; with --no-reboot, 3 the guest rebooted (as a guest
kernel does after a panic, panic=1) and 4 a vCPU triple-faulted; 128+N
stopped by signal N.
Ctrl-C or SIGTERM stop the VM and restore the terminal. SIGUSR1 logs what
every vCPU is doing (registers, exits; a guest that seems stuck) and the VM
goes on; a guest triple fault is logged the same way. With the kernel's
System.map next to it (or KICKVM_SYSTEM_MAP=PATH) the guest function is named.";

const API_EXAMPLES: &str = "\
Driven over an API socket (Cloud Hypervisor's REST API, as Kata Containers'
clh driver and ch-remote use it; docs/api.md lists the endpoints):
  kickvm --api-socket /run/kickvm.sock &
  curl --unix-socket /run/kickvm.sock http://localhost/api/v1/vmm.ping
  curl --unix-socket /run/kickvm.sock -X PUT -H 'Content-Type: application/json' \\
       -d '{\"payload\":{\"kernel\":\"bzImage\",\"initramfs\":\"initrd\"}}' \\
       http://localhost/api/v1/vm.create
  curl --unix-socket /run/kickvm.sock -X PUT http://localhost/api/v1/vm.boot
  curl --unix-socket /run/kickvm.sock -X PUT http://localhost/api/v1/vmm.shutdown";

#[derive(Parser, Debug)]
#[command(name = "kickvm", version, about = ABOUT, long_about = None, after_long_help = API_EXAMPLES,
          args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `kickvm --api-socket PATH`: no subcommand, the VM comes over the socket.
#[derive(Args, Debug)]
pub struct ApiArgs {
    /// Serve Cloud Hypervisor's REST API on this Unix socket (PATH or
    /// path=PATH); the VM is created and booted through it.
    #[arg(long, value_name = "PATH", value_parser = parse_api_socket)]
    pub api_socket: Option<PathBuf>,
    /// More log lines on stderr: -v info, -vv debug (RUST_LOG overrides).
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Seccomp filters for every thread (on, log, off; true and false
    /// as Kata passes them).
    #[arg(long, value_name = "on|log|off", default_value = "on")]
    pub seccomp: kickvm_virtio::seccomp::SeccompMode,
    /// How virtqueues are mapped onto threads (see `kickvm run --help`).
    #[arg(long, value_name = "MODE", default_value = "per-queue")]
    pub threads: ThreadingMode,
    /// Let a bzImage decompress itself in the guest (see `kickvm run --help`).
    #[arg(long)]
    pub decompress_in_guest: bool,
    /// Run even on kvm_pvm (for tests with tiny guests).
    #[arg(long, hide = true)]
    pub allow_slow_kvm: bool,
    /// The KVM device (for tests).
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm", hide = true)]
    pub kvm_device: PathBuf,
}

/// `--api-socket PATH` or `--api-socket path=PATH` (Cloud Hypervisor's form).
fn parse_api_socket(s: &str) -> Result<PathBuf, String> {
    let p = match s.split_once('=') {
        Some(("path", p)) => p,
        Some(("fd", _)) => return Err("fd=N is not taken: give path=PATH".into()),
        Some(_) | None if s.contains(',') => return Err(format!("`{s}`: give PATH or path=PATH")),
        _ => s,
    };
    if p.is_empty() {
        return Err("empty path: give PATH or path=PATH".into());
    }
    Ok(PathBuf::from(p))
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a Linux guest and run it until it powers off.
    #[command(after_long_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Serve one device to a vhost-user frontend (QEMU, ...) on a unix socket.
    #[command(after_long_help = kickvm_vhost::cli::BACKEND_EXAMPLES)]
    Backend(kickvm_vhost::cli::BackendArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Kernel to boot: a bzImage (e.g. /boot/vmlinuz-*), or an
    /// uncompressed ELF vmlinux with a PVH entry point (CONFIG_PVH=y), which
    /// the guest need not decompress and which touches less guest memory;
    /// told apart by the file's first bytes. The file's holes are not read:
    /// `fallocate --dig-holes vmlinux` makes its zero blocks (a third of a
    /// vmlinux) holes once. Default: the project's test guest image
    /// (built from Debian packages on first use).
    #[arg(long, value_name = "BZIMAGE|VMLINUX")]
    pub kernel: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed) for the kernel.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Let a bzImage decompress itself in the guest. By default kickvm
    /// decompresses an LZ4-compressed bzImage (Debian's) itself, on several
    /// threads, straight into place, and enters it through PVH as a
    /// vmlinux: a faster boot that touches less guest memory, but the
    /// kernel image then runs at its link address (no KASLR of the image,
    /// as with any vmlinux). Other compressions are always left to the guest.
    #[arg(long)]
    pub decompress_in_guest: bool,
    /// Extra kernel command line, appended to kickvm's defaults.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Guest RAM, e.g. 512M, 2G (a bare number is MiB). RAM beyond 3 GiB
    /// is placed above 4 GiB.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = config::parse_size)]
    pub memory: u64,
    /// Number of vCPUs (1 to 254).
    #[arg(long, value_name = "N", default_value = "1", value_parser = config::parse_cpus)]
    pub cpus: u8,
    /// Back guest RAM with 2 MiB huge pages (reserve them in
    /// /proc/sys/vm/nr_hugepages first).
    #[arg(long)]
    pub hugepages: bool,
    /// Put guest RAM in shared memory (a memfd another process can map, as
    /// a vhost-user back-end does) instead of private memory. It gets
    /// transparent huge pages only where
    /// /sys/kernel/mm/transparent_hugepage/shmem_enabled allows them.
    #[arg(long)]
    pub memory_shared: bool,
    /// A virtio-net card on a host TAP interface: tap=NAME[,mac=MAC][,queues=N][,vhost=on][,poll=MODE]
    /// (N queue pairs; use one per vCPU for multi-queue; vhost=on: the host
    /// kernel's vhost-net serves the card's one queue pair, needs
    /// /dev/vhost-net). poll= as for --disk (transmit queues).
    #[arg(long, value_name = "OPTS", value_parser = config::parse_net)]
    pub net: Vec<NetSpec>,
    /// A virtio-blk disk (repeatable): path=FILE[,readonly=on][,serial=ID][,queues=N][,poll=MODE].
    /// poll=: how long a queue thread watches its ring for the next request
    /// before it sleeps (saves a wake-up per request at low queue depth,
    /// costs CPU while it watches): adaptive (the default: a window of
    /// 0-32 µs that follows the guest, as QEMU's poll-max-ns; none while
    /// the disk is idle), adaptive:<µs> (another maximum), <µs> (always
    /// that long) or off.
    #[arg(long, value_name = "OPTS", value_parser = config::parse_disk)]
    pub disk: Vec<DiskSpec>,
    /// Where virtio-console (hvc0) is connected: stdio, pty, socket=PATH,
    /// file=PATH or none.
    #[arg(long, value_name = "WHERE", default_value = "none", value_parser = config::parse_console)]
    pub console: ConsoleSpec,
    /// Add a virtio-rng device fed from /dev/urandom.
    #[arg(long)]
    pub rng: bool,
    /// A virtio-vsock device: cid=N,socket=PATH (N: the guest's context ID,
    /// 3 or more). Cloud Hypervisor's hybrid vsock: a host program connects
    /// to PATH, writes `CONNECT <port>\n`, reads `OK <hostport>\n`, then
    /// talks to the guest's listener on that port; a guest connection to
    /// host port P reaches the Unix socket PATH_P.
    #[arg(long, value_name = "OPTS", value_parser = config::parse_vsock)]
    pub vsock: Option<VsockSpec>,
    /// A device served by an external vhost-user back-end (repeatable):
    /// TYPE,socket=PATH[,queues=N][,queue_size=N], TYPE blk, net, console
    /// or rng (queues=: blk request queues, net queue pairs). Guest RAM
    /// becomes shared (a memfd) so the back-end can map it. A back-end that
    /// dies is waited for: the device's I/O resumes when it accepts again.
    #[arg(long, value_name = "OPTS", value_parser = config::parse_vhost_user)]
    pub vhost_user: Vec<VhostUserSpec>,
    /// How virtqueues are mapped onto threads: per-queue (one thread per
    /// queue), per-device, or single (one I/O thread for all).
    #[arg(long, value_name = "MODE", default_value = "per-queue")]
    pub threads: ThreadingMode,
    /// Seccomp filters: each kind of thread (vCPU, queue threads, stdin,
    /// main) may make only the system calls it needs; `log` allows the
    /// others and has the kernel log them, `off` installs none.
    #[arg(long, value_name = "on|log|off", default_value = "on")]
    pub seccomp: kickvm_virtio::seccomp::SeccompMode,
    /// When the guest reboots, exit instead of booting again: status 3 (4
    /// after a triple fault).
    #[arg(long)]
    pub no_reboot: bool,
    /// Run even on kvm_pvm, which emulates guest kernel code far too slowly
    /// for Linux (for tests with tiny guests).
    #[arg(long)]
    pub allow_slow_kvm: bool,
    /// The KVM device (for tests).
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm", hide = true)]
    pub kvm_device: PathBuf,
}

/// Kernel and initramfs to boot when `--kernel` is not given.
pub type DefaultImage = dyn Fn() -> Result<(PathBuf, PathBuf), String>;

impl RunArgs {
    /// The VM these options describe. `default_image` is asked only when
    /// `--kernel` is missing.
    pub fn to_config(&self, default_image: &DefaultImage) -> Result<VmConfig, ConfigError> {
        let (kernel, initrd) = match &self.kernel {
            Some(k) => (k.clone(), self.initrd.clone()),
            None => {
                let (k, i) = default_image().map_err(|e| ConfigError(format!("no --kernel given: {e}")))?;
                (k, Some(self.initrd.clone().unwrap_or(i)))
            }
        };
        Ok(VmConfig {
            kernel,
            initrd,
            cmdline: config::full_cmdline(self.cmdline.as_deref()),
            decompress_in_guest: self.decompress_in_guest,
            memory: self.memory,
            cpus: self.cpus,
            hugepages: self.hugepages,
            memory_shared: self.memory_shared,
            nets: self.net.clone(),
            disks: self.disk.clone(),
            console: self.console.clone(),
            rng: self.rng,
            vsock: self.vsock.clone(),
            vhost_users: self.vhost_user.clone(),
            threads: self.threads,
            kvm_device: self.kvm_device.clone(),
            allow_slow_kvm: self.allow_slow_kvm,
            seccomp: self.seccomp,
            tap_fds: Default::default(),
            pci_hotplug: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut v = vec!["kickvm", "run"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| match c.command {
            Some(Command::Run(r)) => r,
            _ => unreachable!("parsed as `run`"),
        })
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let r = parse(&["--kernel", "k"]).unwrap();
        assert_eq!((r.memory, r.cpus, r.console.clone(), r.rng, r.no_reboot), (512 << 20, 1, ConsoleSpec::None, false, false));
        assert_eq!(r.threads, ThreadingMode::PerQueue);
        let c = r.to_config(&|| Err("unused".into())).unwrap();
        assert_eq!(c.cmdline, config::DEFAULT_CMDLINE);
        assert!(!c.pci_hotplug, "`kickvm run` cannot hotplug: no slots in its DSDT");
    }

    #[test]
    fn everything() {
        let r = parse(&[
            "--kernel", "k", "--initrd", "i", "--cmdline", "-- quiet", "--memory", "1G", "--cpus", "2",
            "--net", "tap=t0,queues=2", "--disk", "path=a", "--disk", "path=b,readonly=on",
            "--console", "socket=/tmp/c", "--rng", "--threads", "single", "--no-reboot", "--decompress-in-guest",
        ])
        .unwrap();
        assert_eq!(r.memory, 1 << 30);
        assert_eq!(r.disk.len(), 2);
        assert!(r.disk[1].readonly);
        assert_eq!(r.net[0].queues, 2);
        assert_eq!(r.threads, ThreadingMode::Single);
        assert!(r.no_reboot && r.rng);
        let c = r.to_config(&|| Err("unused".into())).unwrap();
        assert!(c.cmdline.ends_with(" -- quiet"));
        assert!(c.decompress_in_guest);
        assert!(!parse(&["--kernel", "k"]).unwrap().to_config(&|| Err("unused".into())).unwrap().decompress_in_guest);
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(parse(&["--memory", "lots"]).is_err());
        assert!(parse(&["--threads", "many"]).is_err());
        assert!(parse(&["--disk", "readonly=on"]).is_err());
        assert!(parse(&["--console", "tty"]).is_err());
        assert!(parse(&["--cpus", "0"]).is_err());
        assert!(parse(&["--cpus", "255"]).is_err());
    }

    #[test]
    fn default_image_is_used_without_kernel() {
        let r = parse(&[]).unwrap();
        let c = r.to_config(&|| Ok(("vmlinuz".into(), "initrd.img".into()))).unwrap();
        assert_eq!(c.kernel, PathBuf::from("vmlinuz"));
        assert_eq!(c.initrd, Some(PathBuf::from("initrd.img")));
        let e = r.to_config(&|| Err("apt is not reachable".into())).unwrap_err();
        assert!(e.0.contains("apt is not reachable"));
    }

    #[test]
    fn api_socket_as_kata_passes_it() {
        let c = Cli::try_parse_from(["kickvm", "--api-socket", "/tmp/a.sock", "-vv", "--seccomp", "false"]).unwrap();
        assert!(c.command.is_none());
        assert_eq!(c.api.api_socket, Some(PathBuf::from("/tmp/a.sock")));
        assert_eq!((c.api.verbose, c.api.seccomp), (2, kickvm_virtio::seccomp::SeccompMode::Off));
        let c = Cli::try_parse_from(["kickvm", "--api-socket", "path=/tmp/b.sock"]).unwrap();
        assert_eq!(c.api.api_socket, Some(PathBuf::from("/tmp/b.sock")));
        assert!(Cli::try_parse_from(["kickvm", "--api-socket", "fd=3"]).is_err());
        assert!(Cli::try_parse_from(["kickvm", "--api-socket", ""]).is_err());
        assert!(Cli::try_parse_from(["kickvm", "--api-socket", "/a", "run", "--kernel", "k"]).is_err());
    }

    #[test]
    fn help_teaches_with_examples() {
        let mut cmd = Cli::command();
        let run = cmd.find_subcommand_mut("run").unwrap();
        let help = run.render_long_help().to_string();
        assert!(help.contains("Examples:"));
        assert!(help.contains("kickvm-rig run -- kickvm run"));
        assert!(help.contains("--net tap=tap0"));
    }
}
