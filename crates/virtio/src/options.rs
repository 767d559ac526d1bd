//! The options of each device as the user writes them (`kickvm run
//! --disk path=FILE,readonly=on`, `kickvm backend blk path=FILE`), parsed
//! into specs, and the device configurations they give. One parser for
//! the launcher and the vhost-user back-ends, so both take and refuse the
//! same things.
//!
//! The parsers refuse what they cannot take exactly: an option given twice,
//! a number out of range, a name the kernel would change. Nothing is
//! clamped, wrapped or dropped silently.

use std::path::PathBuf;

use crate::block::BlockConfig;
use crate::console::Backend;
use crate::net::NetConfig;

/// A mistake in a device's options: one line for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OptionError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, OptionError> {
    Err(OptionError(msg.into()))
}

/// Queue pairs / queues a device may ask for.
pub const MAX_QUEUES: u16 = 64;
/// virtio-blk's serial number field holds 20 bytes.
pub const MAX_SERIAL: usize = 20;
/// The MAC of the first network card without `mac=`; the next cards count
/// up from it.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

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

impl DiskSpec {
    /// The block device this disk asks for.
    pub fn block_config(&self) -> BlockConfig {
        BlockConfig {
            path: self.path.clone(),
            readonly: self.readonly,
            serial: self.serial.clone(),
            num_queues: self.queues,
            direct: false,
        }
    }
}

impl NetSpec {
    /// The net device named `name` this card asks for, as card `index`
    /// (which picks its default MAC).
    pub fn net_config(&self, name: &str, index: usize) -> NetConfig {
        NetConfig {
            name: name.to_string(),
            tap: self.tap.clone(),
            mac: self.mac_or_default(index),
            queue_pairs: self.queues,
            mtu: None,
        }
    }
}

impl ConsoleSpec {
    /// The console backend, if there is a console.
    pub fn backend(&self) -> Option<Backend> {
        match self {
            ConsoleSpec::None => None,
            ConsoleSpec::Stdio => Some(Backend::Stdio),
            ConsoleSpec::Pty => Some(Backend::Pty),
            ConsoleSpec::Socket(p) => Some(Backend::Socket(p.clone())),
            ConsoleSpec::File(p) => Some(Backend::File(p.clone())),
        }
    }
}

/// Splits `a=1,b=2` into pairs; a bare word becomes `(word, "")`. A key
/// given twice is refused (`option` names the option in the message):
/// which one should win would be a guess.
fn pairs<'a>(option: &str, s: &'a str) -> Result<Vec<(&'a str, &'a str)>, OptionError> {
    let v: Vec<(&str, &str)> =
        s.split(',').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, ""))).collect();
    for (i, (k, _)) in v.iter().enumerate() {
        if v[..i].iter().any(|(earlier, _)| earlier == k) {
            return err(format!("{option} {s}: `{k}` is given twice"));
        }
    }
    Ok(v)
}

fn parse_bool(key: &str, v: &str) -> Result<bool, OptionError> {
    match v {
        "on" | "true" | "yes" | "1" | "" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => err(format!("{key}={v}: use on or off")),
    }
}

fn parse_queues(v: &str) -> Result<u16, OptionError> {
    match v.parse::<u16>() {
        Ok(n) if (1..=MAX_QUEUES).contains(&n) => Ok(n),
        _ => err(format!("queues={v}: use a number from 1 to {MAX_QUEUES}")),
    }
}

/// Parses a MAC address `52:54:00:12:34:56`: six bytes of two hex digits,
/// unicast, not all zero (what Linux accepts as a device address).
pub fn parse_mac(s: &str) -> Result<[u8; 6], OptionError> {
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
fn check_ifname(name: &str) -> Result<(), OptionError> {
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
pub fn parse_net(s: &str) -> Result<NetSpec, OptionError> {
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
pub fn parse_disk(s: &str) -> Result<DiskSpec, OptionError> {
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
pub fn parse_console(s: &str) -> Result<ConsoleSpec, OptionError> {
    Ok(match s.split_once('=') {
        None if s == "stdio" => ConsoleSpec::Stdio,
        None if s == "pty" => ConsoleSpec::Pty,
        None if s == "none" => ConsoleSpec::None,
        Some(("socket", p)) if !p.is_empty() => ConsoleSpec::Socket(p.into()),
        Some(("file", p)) if !p.is_empty() => ConsoleSpec::File(p.into()),
        _ => return err(format!("--console {s}: use stdio, pty, socket=PATH, file=PATH or none")),
    })
}

/// `--vsock cid=N,socket=PATH`: a virtio-vsock device whose host side is
/// Cloud Hypervisor's hybrid vsock on the Unix socket PATH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockSpec {
    pub cid: u64,
    pub socket: PathBuf,
}

impl VsockSpec {
    /// The vsock device this spec asks for, named `name`, its connector
    /// thread under `seccomp`.
    pub fn vsock_config(&self, name: &str, seccomp: crate::seccomp::SeccompMode) -> crate::vsock::VsockConfig {
        crate::vsock::VsockConfig { name: name.to_string(), cid: self.cid, socket: self.socket.clone(), seccomp }
    }
}

/// `--vsock cid=N,socket=PATH`
pub fn parse_vsock(s: &str) -> Result<VsockSpec, OptionError> {
    use crate::vsock::{MAX_GUEST_CID, MIN_GUEST_CID};
    let (mut cid, mut socket) = (None, None);
    for (k, v) in pairs("--vsock", s)? {
        match k {
            "cid" => match v.parse::<u64>() {
                Ok(n) if (MIN_GUEST_CID..=MAX_GUEST_CID).contains(&n) => cid = Some(n),
                _ => {
                    return err(format!(
                        "--vsock cid={v}: use a number from {MIN_GUEST_CID} to {MAX_GUEST_CID} (0-2 are the hypervisor, loopback and host)"
                    ))
                }
            },
            "socket" if !v.is_empty() => socket = Some(PathBuf::from(v)),
            "socket" => return err("--vsock socket=: give the path of the Unix socket host programs connect to"),
            _ => return err(format!("--vsock: unknown option `{k}` (use cid=N,socket=PATH)")),
        }
    }
    match (cid, socket) {
        (Some(cid), Some(socket)) => Ok(VsockSpec { cid, socket }),
        (None, _) => err("--vsock needs cid=N (the guest's context ID, 3 or more)"),
        (_, None) => err("--vsock needs socket=PATH (the Unix socket host programs connect to)"),
    }
}

#[cfg(test)]
mod vsock_tests {
    use super::*;

    #[test]
    fn vsock_options() {
        assert_eq!(parse_vsock("cid=3,socket=/tmp/v.sock"), Ok(VsockSpec { cid: 3, socket: "/tmp/v.sock".into() }));
        assert!(parse_vsock("cid=2,socket=/tmp/v").unwrap_err().0.contains("from 3 to 4294967294"));
        assert!(parse_vsock("cid=4294967295,socket=/tmp/v").is_err());
        assert!(parse_vsock("cid=x,socket=/tmp/v").is_err());
        assert!(parse_vsock("socket=/tmp/v").unwrap_err().0.contains("needs cid=N"));
        assert!(parse_vsock("cid=3").unwrap_err().0.contains("needs socket=PATH"));
        assert!(parse_vsock("cid=3,socket=").is_err());
        assert!(parse_vsock("cid=3,cid=4,socket=/tmp/v").unwrap_err().0.contains("given twice"));
        assert!(parse_vsock("cid=3,socket=/tmp/v,port=9").unwrap_err().0.contains("unknown option `port`"));
    }
}
