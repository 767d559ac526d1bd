//! What a VM is made of, as the user asked for it: parsed and checked
//! before any KVM object exists, so every mistake is one clear line.

use std::path::PathBuf;

use kickvm_virtio::ThreadingMode;

/// Default guest RAM.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// vCPUs a VM may have (APIC IDs fit in 8 bits; the MADT uses one byte).
pub const MAX_CPUS: u8 = 254;
/// Queue pairs / queues a device may ask for.
pub const MAX_QUEUES: u16 = 64;

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
    pub nets: Vec<NetSpec>,
    pub disks: Vec<DiskSpec>,
    pub console: ConsoleSpec,
    pub rng: bool,
    pub threads: ThreadingMode,
    /// `/dev/kvm` unless a test points elsewhere.
    pub kvm_device: PathBuf,
    pub allow_slow_kvm: bool,
}

/// A mistake in the user's options.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
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

/// Splits `a=1,b=2` into pairs; a bare word becomes `(word, "")`.
fn pairs(s: &str) -> Vec<(&str, &str)> {
    s.split(',').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, ""))).collect()
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

/// Parses a MAC address `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], ConfigError> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return err(format!("mac={s}: use six hex bytes like 52:54:00:12:34:56"));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| ConfigError(format!("mac={s}: `{p}` is not a hex byte")))?;
    }
    if mac[0] & 1 != 0 {
        return err(format!("mac={s} is a multicast address; the first byte must be even"));
    }
    Ok(mac)
}

/// `--net tap=NAME[,mac=MAC][,queues=N]`
pub fn parse_net(s: &str) -> Result<NetSpec, ConfigError> {
    let mut spec = NetSpec { tap: String::new(), mac: None, queues: 1 };
    for (k, v) in pairs(s) {
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
    if spec.tap.len() >= libc::IFNAMSIZ {
        return err(format!("--net tap={}: interface names are at most {} bytes", spec.tap, libc::IFNAMSIZ - 1));
    }
    Ok(spec)
}

/// `--disk path=FILE[,readonly=on][,serial=ID][,queues=N]`
pub fn parse_disk(s: &str) -> Result<DiskSpec, ConfigError> {
    let mut spec = DiskSpec { path: PathBuf::new(), readonly: false, serial: None, queues: 1 };
    for (k, v) in pairs(s) {
        match k {
            "path" => spec.path = PathBuf::from(v),
            "readonly" | "ro" => spec.readonly = parse_bool(k, v)?,
            "serial" => {
                // virtio-blk's serial field holds 20 bytes.
                if v.len() > 20 {
                    return err(format!("--disk serial={v}: at most 20 bytes"));
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

impl VmConfig {
    /// Checks what can be checked without KVM: files exist and can be
    /// opened as needed, counts are in range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return err(format!("--cpus {}: use 1 to {MAX_CPUS}", self.cpus));
        }
        check_readable("kernel", &self.kernel)?;
        if let Some(i) = &self.initrd {
            check_readable("initrd", i)?;
        }
        for d in &self.disks {
            let f = std::fs::OpenOptions::new().read(true).write(!d.readonly).open(&d.path);
            if let Err(e) = f {
                return err(format!("disk {}: {}", d.path.display(), io_reason(&e)));
            }
        }
        Ok(())
    }
}

fn check_readable(what: &str, p: &std::path::Path) -> Result<(), ConfigError> {
    match std::fs::File::open(p) {
        Ok(f) if f.metadata().map(|m| m.is_file()).unwrap_or(false) => Ok(()),
        Ok(_) => err(format!("{what} {} is not a regular file", p.display())),
        Err(e) => err(format!("{what} {}: {}", p.display(), io_reason(&e))),
    }
}

/// An I/O error as a short phrase ("no such file", "permission denied").
pub fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
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
    }

    #[test]
    fn disk_options() {
        let d = parse_disk("path=/tmp/d.img,readonly=on,serial=abc,queues=4").unwrap();
        assert_eq!(d, DiskSpec { path: "/tmp/d.img".into(), readonly: true, serial: Some("abc".into()), queues: 4 });
        assert!(!parse_disk("path=x").unwrap().readonly);
        assert!(parse_disk("readonly=on").is_err());
        assert!(parse_disk("path=x,readonly=maybe").is_err());
        assert!(parse_disk("path=x,serial=123456789012345678901").is_err());
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
