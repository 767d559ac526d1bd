//! The device a back-end serves, from the same options `kickvm run` takes
//! for it (`--disk`, `--net`, `--console`, `--rng`).

use std::path::PathBuf;

use kickvm_virtio::VirtioDevice;

/// Which device a back-end serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    Blk,
    Net,
    Console,
    Rng,
}

/// A device and its options, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `path=FILE[,readonly=on][,serial=ID][,queues=N]`
    Blk { path: PathBuf, readonly: bool, serial: Option<String>, queues: u16 },
    /// `tap=NAME[,mac=MAC][,queues=N]`
    Net { tap: String, mac: [u8; 6], queues: u16 },
    /// `stdio`, `pty`, `socket=PATH` or `file=PATH`
    Console(Where),
    /// no options, or `source=FILE`
    Rng { source: Option<PathBuf> },
}

/// Where a console back-end's `hvc0` is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Where {
    Stdio,
    Pty,
    Socket(PathBuf),
    File(PathBuf),
}

/// Queues a device may ask for (as `kickvm run`).
pub const MAX_QUEUES: u16 = 64;
const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// A mistake in the device options: one line for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OptionsError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, OptionsError> {
    Err(OptionsError(msg.into()))
}

/// `a=1,b=2` as pairs; a bare word is `(word, "")`; a key given twice is
/// refused.
fn pairs(s: &str) -> Result<Vec<(&str, &str)>, OptionsError> {
    let v: Vec<(&str, &str)> =
        s.split(',').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, ""))).collect();
    for (i, (k, _)) in v.iter().enumerate() {
        if v[..i].iter().any(|(e, _)| e == k) {
            return err(format!("`{k}` is given twice in `{s}`"));
        }
    }
    Ok(v)
}

fn parse_bool(k: &str, v: &str) -> Result<bool, OptionsError> {
    match v {
        "on" | "true" | "yes" | "1" | "" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => err(format!("{k}={v}: use on or off")),
    }
}

fn parse_queues(v: &str) -> Result<u16, OptionsError> {
    match v.parse::<u16>() {
        Ok(n) if (1..=MAX_QUEUES).contains(&n) => Ok(n),
        _ => err(format!("queues={v}: use a number from 1 to {MAX_QUEUES}")),
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6], OptionsError> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return err(format!("mac={s}: use six hex bytes like 52:54:00:12:34:56"));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        match u8::from_str_radix(p, 16) {
            Ok(b) if p.len() == 2 => *m = b,
            _ => return err(format!("mac={s}: `{p}` is not a byte of two hex digits")),
        }
    }
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return err(format!("mac={s}: not a unicast address"));
    }
    Ok(mac)
}

impl DeviceSpec {
    /// Parses `opts` for a device of `kind`.
    pub fn parse(kind: DeviceKind, opts: &str) -> Result<DeviceSpec, OptionsError> {
        let unknown = |k: &str, allowed: &str| err(format!("unknown option `{k}` (use {allowed})"));
        match kind {
            DeviceKind::Blk => {
                let (mut path, mut readonly, mut serial, mut queues) = (None, false, None, 1);
                for (k, v) in pairs(opts)? {
                    match k {
                        "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
                        "readonly" => readonly = parse_bool(k, v)?,
                        "serial" if v.len() <= 20 => serial = Some(v.to_string()),
                        "serial" => return err(format!("serial={v}: at most 20 bytes")),
                        "queues" => queues = parse_queues(v)?,
                        _ => return unknown(k, "path=FILE,readonly=on,serial=ID,queues=N"),
                    }
                }
                let Some(path) = path else { return err("blk needs path=FILE") };
                Ok(DeviceSpec::Blk { path, readonly, serial, queues })
            }
            DeviceKind::Net => {
                let (mut tap, mut mac, mut queues) = (None, DEFAULT_MAC, 1);
                for (k, v) in pairs(opts)? {
                    match k {
                        "tap" if !v.is_empty() && v.len() < libc::IFNAMSIZ => tap = Some(v.to_string()),
                        "tap" => return err(format!("tap={v}: not a usable interface name")),
                        "mac" => mac = parse_mac(v)?,
                        "queues" => queues = parse_queues(v)?,
                        _ => return unknown(k, "tap=NAME,mac=MAC,queues=N"),
                    }
                }
                let Some(tap) = tap else { return err("net needs tap=NAME") };
                Ok(DeviceSpec::Net { tap, mac, queues })
            }
            DeviceKind::Console => {
                let w = match opts.split_once('=') {
                    None if opts == "stdio" => Where::Stdio,
                    None if opts == "pty" => Where::Pty,
                    Some(("socket", p)) if !p.is_empty() => Where::Socket(p.into()),
                    Some(("file", p)) if !p.is_empty() => Where::File(p.into()),
                    _ => return err(format!("console `{opts}`: use stdio, pty, socket=PATH or file=PATH")),
                };
                Ok(DeviceSpec::Console(w))
            }
            DeviceKind::Rng => {
                let mut source = None;
                for (k, v) in pairs(opts)? {
                    match k {
                        "source" if !v.is_empty() => source = Some(PathBuf::from(v)),
                        _ => return unknown(k, "source=FILE, or nothing"),
                    }
                }
                Ok(DeviceSpec::Rng { source })
            }
        }
    }

    /// Opens the device's backend (file, TAP, console endpoint, entropy
    /// source) and builds the device. It lives as long as the back-end
    /// process: each frontend connection gets it reset.
    pub fn build(&self) -> Result<Box<dyn VirtioDevice>, OptionsError> {
        use kickvm_virtio::{block, console, net, rng};
        Ok(match self {
            DeviceSpec::Blk { path, readonly, serial, queues } => {
                let cfg = block::BlockConfig {
                    path: path.clone(),
                    readonly: *readonly,
                    serial: serial.clone(),
                    num_queues: *queues,
                    direct: false,
                };
                Box::new(block::Block::new("blk0", cfg).map_err(|e| OptionsError(e.to_string()))?)
            }
            DeviceSpec::Net { tap, mac, queues } => {
                let cfg =
                    net::NetConfig { name: "net0".into(), tap: tap.clone(), mac: *mac, queue_pairs: *queues, mtu: None };
                Box::new(net::NetDevice::new(cfg).map_err(|e| OptionsError(format!("tap={tap}: {e}")))?)
            }
            DeviceSpec::Console(w) => {
                let b = match w {
                    Where::Stdio => console::Backend::Stdio,
                    Where::Pty => console::Backend::Pty,
                    Where::Socket(p) => console::Backend::Socket(p.clone()),
                    Where::File(p) => console::Backend::File(p.clone()),
                };
                let c = console::Console::new("console0", b)
                    .map_err(|e| OptionsError(format!("virtio-console: {e}")))?;
                if let Some(p) = c.pty_path() {
                    eprintln!("kickvm backend: virtio-console is on {}", p.display());
                }
                Box::new(c)
            }
            DeviceSpec::Rng { source } => {
                let cfg = rng::RngConfig { source: source.clone(), rate_limit: None };
                Box::new(rng::Rng::new("rng0", cfg).map_err(|e| OptionsError(format!("virtio-rng: {e}")))?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_as_kickvm_run_takes_them() {
        let b = DeviceSpec::parse(DeviceKind::Blk, "path=/x,readonly=on,queues=4").unwrap();
        assert_eq!(b, DeviceSpec::Blk { path: "/x".into(), readonly: true, serial: None, queues: 4 });
        let n = DeviceSpec::parse(DeviceKind::Net, "tap=t0,mac=52:54:00:00:00:01,queues=2").unwrap();
        assert_eq!(n, DeviceSpec::Net { tap: "t0".into(), mac: [0x52, 0x54, 0, 0, 0, 1], queues: 2 });
        assert_eq!(DeviceSpec::parse(DeviceKind::Console, "file=/o").unwrap(), DeviceSpec::Console(Where::File("/o".into())));
        assert_eq!(DeviceSpec::parse(DeviceKind::Rng, "").unwrap(), DeviceSpec::Rng { source: None });
    }

    #[test]
    fn mistakes_are_one_line() {
        for (k, o) in [
            (DeviceKind::Blk, "readonly=on"),
            (DeviceKind::Blk, "path=a,path=b"),
            (DeviceKind::Blk, "path=a,queues=0"),
            (DeviceKind::Net, "tap=t0,mac=01:00:00:00:00:00"),
            (DeviceKind::Console, "tty"),
            (DeviceKind::Rng, "fast=yes"),
        ] {
            let e = DeviceSpec::parse(k, o).unwrap_err();
            assert!(!e.0.contains('\n'), "{e}");
        }
    }
}
