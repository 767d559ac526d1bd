//! What a VM is made of, as the user asked for it: parsed here, and
//! checked against the host ([`validate`]) before any KVM object, TAP or
//! file exists, so every mistake is one clear line.
//!
//! The parsers refuse what they cannot take exactly: an option given twice,
//! a number out of range, a name the kernel would change. Nothing is
//! clamped, wrapped or dropped silently.

pub(crate) mod validate;

use std::path::PathBuf;

use kickvm_virtio::ThreadingMode;

pub use crate::hostfile::io_reason;
pub use kickvm_virtio::options::{
    parse_console, parse_disk, parse_mac, parse_net, ConsoleSpec, DiskSpec, NetSpec, OptionError, DEFAULT_MAC,
    MAX_QUEUES, MAX_SERIAL,
};
pub use kickvm_virtio::options::{parse_vsock, VsockSpec};
pub use kickvm_virtio::options::{parse_vhost_user, VhostUserKind, VhostUserSpec};

/// Default guest RAM.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// vCPUs a VM may have (APIC IDs fit in 8 bits; the MADT uses one byte).
pub const MAX_CPUS: u8 = 254;
/// The command line every kickvm guest gets before the user's `--cmdline`:
/// the serial console, reset through the keyboard controller (the only
/// reset path that needs no firmware), reboot on panic, and no slow
/// probing of a keyboard controller that is only there to reset the VM.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.dumbkbd";

/// Everything needed to build (and, on reboot, rebuild) one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The full kernel command line.
    pub cmdline: String,
    /// Let a bzImage decompress itself in the guest rather than have the
    /// launcher decompress it ([`crate::boot::unpack`]).
    pub decompress_in_guest: bool,
    pub memory: u64,
    pub cpus: u8,
    pub hugepages: bool,
    /// Guest RAM in a memfd that another process can map (a vhost-user
    /// back-end), instead of anonymous private memory; see [`crate::memory`].
    pub memory_shared: bool,
    pub nets: Vec<NetSpec>,
    pub disks: Vec<DiskSpec>,
    pub console: ConsoleSpec,
    pub rng: bool,
    /// A virtio-vsock device with hybrid vsock on a host Unix socket.
    pub vsock: Option<VsockSpec>,
    /// Devices served by external vhost-user back-ends (`--vhost-user`).
    pub vhost_users: Vec<VhostUserSpec>,
    pub threads: ThreadingMode,
    /// `/dev/kvm` unless a test points elsewhere.
    pub kvm_device: PathBuf,
    pub allow_slow_kvm: bool,
    /// Seccomp filters for every thread kind.
    pub seccomp: kickvm_virtio::seccomp::SeccompMode,
    /// TAP queue fds another program opened and handed over (the API's
    /// `vm.add-net`), by interface name.
    pub tap_fds: TapFds,
    /// Bus 0's free slots are described as ACPI hotplug slots. Only the
    /// API can plug and unplug devices (`vm.add-*`, `vm.remove-device`);
    /// `kickvm run` cannot, and leaves the 31 slot devices out of the
    /// DSDT: parsing them and registering them with Linux's `acpiphp`
    /// is ~25 ms of a boot in the nested rig (docs/benchmarks.md).
    pub pci_hotplug: bool,
}

/// TAP queue fds by interface name: a card whose `tap` is listed here is
/// built on duplicates of these fds (one per queue pair) instead of
/// opening the TAP by name, so every boot of the VM gets fresh ones and
/// the originals stay with the configuration.
#[derive(Debug, Clone, Default)]
pub struct TapFds(pub std::collections::BTreeMap<String, Vec<std::sync::Arc<std::os::fd::OwnedFd>>>);

/// A mistake in the user's options.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl From<OptionError> for ConfigError {
    fn from(e: OptionError) -> Self {
        ConfigError(e.0)
    }
}

pub(crate) fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Parses a size: `512M`, `2G`, `1536MiB`, `4096K`; a bare number is MiB.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 20),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| ConfigError(format!("`{s}` is not a size (use e.g. 512M or 2G)")))?;
    n.checked_mul(1 << shift).ok_or_else(|| ConfigError(format!("size `{s}` is too large")))
}

/// `--cpus N`.
pub fn parse_cpus(s: &str) -> Result<u8, ConfigError> {
    match s.trim().parse::<u8>() {
        Ok(n) if (1..=MAX_CPUS).contains(&n) => Ok(n),
        _ => err(format!("--cpus {s}: use a number from 1 to {MAX_CPUS}")),
    }
}

/// Joins the default command line and the user's additions.
pub fn full_cmdline(user: Option<&str>) -> String {
    match user.map(str::trim) {
        Some(u) if !u.is_empty() => format!("{DEFAULT_CMDLINE} {u}"),
        _ => DEFAULT_CMDLINE.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1536MiB"), Ok(1536 << 20));
        assert_eq!(parse_size("256"), Ok(256 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn net_options() {
        let n = parse_net("tap=tap0,mac=52:54:00:12:34:56,queues=2").unwrap();
        assert_eq!(n, NetSpec { tap: "tap0".into(), mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]), queues: 2, poll: kickvm_virtio::options::DEFAULT_POLL, vhost: false });
        assert!(parse_net("mac=52:54:00:12:34:56").unwrap_err().0.contains("tap=NAME"));
        assert!(parse_net("tap=t,mac=01:00:00:00:00:00").is_err());
        assert!(parse_net("tap=t,queues=0").is_err());
        assert!(parse_net("tap=t,speed=9").unwrap_err().0.contains("unknown option `speed`"));
        assert!(parse_net("tap=a,tap=b").unwrap_err().0.contains("`tap` is given twice"));
        assert!(parse_net("tap=t,queues=1,queues=2").unwrap_err().0.contains("given twice"));
        assert!(parse_net("tap=t,queues=65").is_err());
        for bad in ["tap/0", "tap:0", "tap%d", "ta p", ".", "..", "tap\t", "0123456789abcdef"] {
            assert!(parse_net(&format!("tap={bad}")).is_err(), "{bad:?}");
        }
        assert!(parse_net("tap=0123456789abcde").is_ok(), "15 bytes fit");
    }

    #[test]
    fn macs_are_exact() {
        assert_eq!(parse_mac("52:54:00:AB:cd:ef"), Ok([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        for bad in ["52:54:00:12:34", "52:54:00:12:34:56:78", "52:54:00:12:34:5", "52:54:00:12:34:+5",
                    "52:54:00:12:34:056", "52:54:00:12:34:zz", "01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff",
                    "00:00:00:00:00:00", ""] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_macs_count_up_and_carry() {
        let n = NetSpec { tap: "t".into(), mac: None, queues: 1, poll: Default::default(), vhost: false };
        assert_eq!(n.mac_or_default(0), DEFAULT_MAC);
        assert_eq!(n.mac_or_default(1), [0x52, 0x54, 0, 0x12, 0x34, 0x57]);
        assert_eq!(n.mac_or_default(0xaa), [0x52, 0x54, 0, 0x12, 0x35, 0x00]);
        let m = NetSpec { mac: Some([2, 0, 0, 0, 0, 1]), ..n };
        assert_eq!(m.mac_or_default(5), [2, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("4"), Ok(4));
        assert_eq!(parse_cpus("254"), Ok(254));
        for bad in ["0", "255", "300", "-1", "two", ""] {
            assert!(parse_cpus(bad).unwrap_err().0.contains("use a number from 1 to 254"), "{bad}");
        }
    }

    #[test]
    fn disk_options() {
        let d = parse_disk("path=/tmp/d.img,readonly=on,serial=abc,queues=4").unwrap();
        assert_eq!(d, DiskSpec { path: "/tmp/d.img".into(), readonly: true, serial: Some("abc".into()), queues: 4, poll: kickvm_virtio::options::DEFAULT_POLL });
        assert!(!parse_disk("path=x").unwrap().readonly);
        assert!(parse_disk("readonly=on").is_err());
        assert!(parse_disk("path=x,readonly=maybe").is_err());
        assert!(parse_disk("path=x,serial=123456789012345678901").is_err());
        assert!(parse_disk("path=x,serial=12345678901234567890").is_ok());
        assert!(parse_disk("path=a,path=b").unwrap_err().0.contains("`path` is given twice"));
        assert!(parse_disk("path=a,ro=on,readonly=off").is_err());
        assert!(parse_disk("path=a,queues=0").is_err());
    }

    #[test]
    fn vhost_user_options() {
        let v = parse_vhost_user("blk,socket=/tmp/b.sock,queues=2,queue_size=128").unwrap();
        assert_eq!(
            v,
            VhostUserSpec { kind: VhostUserKind::Blk, socket: "/tmp/b.sock".into(), queues: Some(2), queue_size: 128 }
        );
        let r = parse_vhost_user("rng,socket=s").unwrap();
        assert_eq!((r.kind, r.queues, r.queue_size), (VhostUserKind::Rng, None, 256));
        assert!(parse_vhost_user("socket=s").unwrap_err().0.contains("TYPE blk, net, console or rng"));
        assert!(parse_vhost_user("gpu,socket=s").is_err());
        assert!(parse_vhost_user("net").unwrap_err().0.contains("needs socket=PATH"));
        assert!(parse_vhost_user("console,socket=s,queues=2").unwrap_err().0.contains("drop queues="));
        for bad in ["0", "3", "2048", "x"] {
            assert!(parse_vhost_user(&format!("blk,socket=s,queue_size={bad}")).is_err(), "{bad}");
        }
        assert!(parse_vhost_user("blk,socket=a,socket=b").unwrap_err().0.contains("given twice"));
        assert!(parse_vhost_user("blk,socket=a,speed=1").unwrap_err().0.contains("unknown option `speed`"));
        assert!(parse_net("tap=t,vhost=on").unwrap().vhost);
        assert!(!parse_net("tap=t").unwrap().vhost);
    }

    #[test]
    fn console_options() {
        assert_eq!(parse_console("stdio"), Ok(ConsoleSpec::Stdio));
        assert_eq!(parse_console("socket=/tmp/s"), Ok(ConsoleSpec::Socket("/tmp/s".into())));
        assert_eq!(parse_console("file=/tmp/f"), Ok(ConsoleSpec::File("/tmp/f".into())));
        assert!(parse_console("file=").is_err());
        assert!(parse_console("tty").is_err());
    }

    #[test]
    fn cmdline_is_appended_to_defaults() {
        assert_eq!(full_cmdline(None), DEFAULT_CMDLINE);
        assert!(full_cmdline(Some("quiet")).ends_with(" quiet"));
        assert!(full_cmdline(Some("quiet")).starts_with("console=ttyS0 "));
    }
}
