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

/// Default guest RAM.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// vCPUs a VM may have (APIC IDs fit in 8 bits; the MADT uses one byte).
pub const MAX_CPUS: u8 = 254;
/// Queue pairs / queues a device may ask for.
pub const MAX_QUEUES: u16 = 64;
/// virtio-blk's serial number field holds 20 bytes.
pub const MAX_SERIAL: usize = 20;
/// The MAC of the first network card without `mac=`; the next cards count
/// up from it.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// The command line every kickvm guest gets before the user's `--cmdline`:
/// the serial console, reset through the keyboard controller (the only
/// reset path that needs no firmware), reboot on panic, and no slow
/// probing of a keyboard controller that is only there to reset the VM.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.dumbkbd";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
    pub queues: u16,
}

impl NetSpec {
    /// The card's MAC: `mac=`, or for card `index` (0-based) without one,
    /// [`DEFAULT_MAC`] + `index` (carrying into the higher bytes).
    pub fn mac_or_default(&self, index: usize) -> [u8; 6] {
        self.mac.unwrap_or_else(|| {
            let base = DEFAULT_MAC.iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b));
            let n = base.wrapping_add(index as u64).to_be_bytes();
            [n[2], n[3], n[4], n[5], n[6], n[7]]
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub readonly: bool,
    pub serial: Option<String>,
    pub queues: u16,
}

/// Where virtio-console (`hvc0`) is connected.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ConsoleSpec {
    Stdio,
    Pty,
    Socket(PathBuf),
    File(PathBuf),
    #[default]
    None,
}

/// Everything needed to build (and, on reboot, rebuild) one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The full kernel command line.
    pub cmdline: String,
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
    pub threads: ThreadingMode,
    /// `/dev/kvm` unless a test points elsewhere.
    pub kvm_device: PathBuf,
    pub allow_slow_kvm: bool,
    /// Seccomp filters for every thread kind.
    pub seccomp: kickvm_virtio::seccomp::SeccompMode,
}

/// A mistake in the user's options.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

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

/// Splits `a=1,b=2` into pairs; a bare word becomes `(word, "")`. A key
/// given twice is refused (`option` names the option in the message):
/// which one should win would be a guess.
fn pairs<'a>(option: &str, s: &'a str) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    let v: Vec<(&str, &str)> =
        s.split(',').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, ""))).collect();
    for (i, (k, _)) in v.iter().enumerate() {
        if v[..i].iter().any(|(earlier, _)| earlier == k) {
            return err(format!("{option} {s}: `{k}` is given twice"));
        }
    }
    Ok(v)
}

/// `--cpus N`.
pub fn parse_cpus(s: &str) -> Result<u8, ConfigError> {
    match s.trim().parse::<u8>() {
        Ok(n) if (1..=MAX_CPUS).contains(&n) => Ok(n),
        _ => err(format!("--cpus {s}: use a number from 1 to {MAX_CPUS}")),
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" | "yes" | "1" | "" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => err(format!("{key}={v}: use on or off")),
    }
}

fn parse_queues(v: &str) -> Result<u16, ConfigError> {
    match v.parse::<u16>() {
        Ok(n) if (1..=MAX_QUEUES).contains(&n) => Ok(n),
        _ => err(format!("queues={v}: use a number from 1 to {MAX_QUEUES}")),
    }
}

/// Parses a MAC address `52:54:00:12:34:56`: six bytes of two hex digits,
/// unicast, not all zero (what Linux accepts as a device address).
pub fn parse_mac(s: &str) -> Result<[u8; 6], ConfigError> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return err(format!("mac={s}: use six hex bytes like 52:54:00:12:34:56"));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        let two_hex = p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit());
        *m = match u8::from_str_radix(p, 16) {
            Ok(v) if two_hex => v,
            _ => return err(format!("mac={s}: `{p}` is not a byte of two hex digits")),
        };
    }
    if mac[0] & 1 != 0 {
        return err(format!("mac={s} is a multicast address; the first byte must be even"));
    }
    if mac == [0; 6] {
        return err(format!("mac={s} is the all-zero address, which no card may have"));
    }
    Ok(mac)
}

/// A network interface name the kernel takes as it is (`dev_valid_name`),
/// and without `%`, which TUNSETIFF would replace with a number.
fn check_ifname(name: &str) -> Result<(), ConfigError> {
    if name.len() >= libc::IFNAMSIZ {
        return err(format!("--net tap={name}: interface names are at most {} bytes", libc::IFNAMSIZ - 1));
    }
    let bad = name.chars().find(|c| matches!(c, '/' | ':' | '%') || c.is_whitespace() || c.is_control());
    if name == "." || name == ".." || bad.is_some() {
        return err(format!(
            "--net tap={name}: not a usable interface name (no `/`, `:`, `%`, spaces, and not . or ..)"
        ));
    }
    Ok(())
}

/// `--net tap=NAME[,mac=MAC][,queues=N]`
pub fn parse_net(s: &str) -> Result<NetSpec, ConfigError> {
    let mut spec = NetSpec { tap: String::new(), mac: None, queues: 1 };
    for (k, v) in pairs("--net", s)? {
        match k {
            "tap" => spec.tap = v.to_string(),
            "mac" => spec.mac = Some(parse_mac(v)?),
            "queues" => spec.queues = parse_queues(v)?,
            _ => return err(format!("--net: unknown option `{k}` (use tap=NAME,mac=MAC,queues=N)")),
        }
    }
    if spec.tap.is_empty() {
        return err("--net needs tap=NAME (the host TAP interface)");
    }
    check_ifname(&spec.tap)?;
    Ok(spec)
}

/// `--disk path=FILE[,readonly=on][,serial=ID][,queues=N]`
pub fn parse_disk(s: &str) -> Result<DiskSpec, ConfigError> {
    let mut spec = DiskSpec { path: PathBuf::new(), readonly: false, serial: None, queues: 1 };
    let pairs = pairs("--disk", s)?;
    if pairs.iter().any(|(k, _)| *k == "ro") && pairs.iter().any(|(k, _)| *k == "readonly") {
        return err(format!("--disk {s}: give readonly= once"));
    }
    for (k, v) in pairs {
        match k {
            "path" => spec.path = PathBuf::from(v),
            "readonly" | "ro" => spec.readonly = parse_bool(k, v)?,
            "serial" => {
                if v.len() > MAX_SERIAL {
                    return err(format!("--disk serial={v}: at most {MAX_SERIAL} bytes"));
                }
                spec.serial = Some(v.to_string());
            }
            "queues" => spec.queues = parse_queues(v)?,
            _ => return err(format!("--disk: unknown option `{k}` (use path=FILE,readonly=on,serial=ID,queues=N)")),
        }
    }
    if spec.path.as_os_str().is_empty() {
        return err("--disk needs path=FILE");
    }
    Ok(spec)
}

/// `--console stdio|pty|socket=PATH|file=PATH|none`
pub fn parse_console(s: &str) -> Result<ConsoleSpec, ConfigError> {
    Ok(match s.split_once('=') {
        None if s == "stdio" => ConsoleSpec::Stdio,
        None if s == "pty" => ConsoleSpec::Pty,
        None if s == "none" => ConsoleSpec::None,
        Some(("socket", p)) if !p.is_empty() => ConsoleSpec::Socket(p.into()),
        Some(("file", p)) if !p.is_empty() => ConsoleSpec::File(p.into()),
        _ => return err(format!("--console {s}: use stdio, pty, socket=PATH, file=PATH or none")),
    })
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
        assert_eq!(n, NetSpec { tap: "tap0".into(), mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]), queues: 2 });
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
        let n = NetSpec { tap: "t".into(), mac: None, queues: 1 };
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
        assert_eq!(d, DiskSpec { path: "/tmp/d.img".into(), readonly: true, serial: Some("abc".into()), queues: 4 });
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
