//! The device a back-end serves, from the same options `kickvm run` takes
//! for it (`--disk`, `--net`, `--console`, `--rng`), parsed by the same
//! parsers (`kickvm_virtio::options`).

use std::path::PathBuf;

use kickvm_virtio::options::{self, ConsoleSpec, DiskSpec, NetSpec};
pub use kickvm_virtio::options::OptionError;
use kickvm_virtio::VirtioDevice;

/// Which device a back-end serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    Blk,
    Net,
    Console,
    Rng,
}

/// A device and its options, parsed by the same parsers as `kickvm run`'s
/// (`kickvm_virtio::options`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `path=FILE[,readonly=on][,serial=ID][,queues=N]`, as `--disk`
    Blk(DiskSpec),
    /// `tap=NAME[,mac=MAC][,queues=N]`, as `--net`
    Net(NetSpec),
    /// `stdio`, `pty`, `socket=PATH` or `file=PATH`, as `--console`
    Console(ConsoleSpec),
    /// no options, or `source=FILE`
    Rng { source: Option<PathBuf> },
}

impl DeviceSpec {
    /// Parses `opts` for a device of `kind`.
    pub fn parse(kind: DeviceKind, opts: &str) -> Result<DeviceSpec, OptionError> {
        match kind {
            DeviceKind::Blk => Ok(DeviceSpec::Blk(options::parse_disk(opts)?)),
            DeviceKind::Net => match options::parse_net(opts)? {
                n if n.vhost => Err(OptionError("vhost=on is for `kickvm run --net`: a back-end serves the queues itself".into())),
                n => Ok(DeviceSpec::Net(n)),
            },
            DeviceKind::Console => match options::parse_console(opts)? {
                ConsoleSpec::None => Err(OptionError("a console back-end needs stdio, pty, socket=PATH or file=PATH".into())),
                c => Ok(DeviceSpec::Console(c)),
            },
            DeviceKind::Rng => match opts.split_once('=') {
                None if opts.is_empty() => Ok(DeviceSpec::Rng { source: None }),
                Some(("source", p)) if !p.is_empty() => Ok(DeviceSpec::Rng { source: Some(p.into()) }),
                _ => Err(OptionError(format!("rng `{opts}`: use source=FILE, or nothing"))),
            },
        }
    }

    /// Opens the device's backend (file, TAP, console endpoint, entropy
    /// source) and builds the device. It lives as long as the back-end
    /// process: each frontend connection gets it reset.
    pub fn build(&self) -> Result<Box<dyn VirtioDevice>, OptionError> {
        use kickvm_virtio::{block, console, net, rng};
        Ok(match self {
            DeviceSpec::Blk(d) => {
                let dev = block::Block::new("blk0", d.block_config()).map_err(|e| OptionError(e.to_string()))?;
                dev.state().set_poll(d.poll);
                Box::new(dev)
            }
            DeviceSpec::Net(n) => {
                let dev = net::NetDevice::new(n.net_config("net0", 0))
                    .map_err(|e| OptionError(format!("tap={}: {e}", n.tap)))?;
                dev.state().set_poll(n.poll);
                Box::new(dev)
            }
            DeviceSpec::Console(c) => {
                let Some(b) = c.backend() else { return Err(OptionError("no console".into())) };
                let c = console::Console::new("console0", b).map_err(|e| OptionError(format!("virtio-console: {e}")))?;
                if let Some(p) = c.pty_path() {
                    kickvm_virtio::note!("kickvm backend: virtio-console is on {}", p.display());
                }
                Box::new(c)
            }
            DeviceSpec::Rng { source } => {
                let cfg = rng::RngConfig { source: source.clone(), rate_limit: None };
                Box::new(rng::Rng::new("rng0", cfg).map_err(|e| OptionError(format!("virtio-rng: {e}")))?)
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
        assert_eq!(b, DeviceSpec::Blk(DiskSpec { path: "/x".into(), readonly: true, serial: None, queues: 4, poll: kickvm_virtio::options::DEFAULT_POLL }));
        let n = DeviceSpec::parse(DeviceKind::Net, "tap=t0,mac=52:54:00:00:00:01,queues=2").unwrap();
        assert_eq!(n, DeviceSpec::Net(NetSpec { tap: "t0".into(), mac: Some([0x52, 0x54, 0, 0, 0, 1]), queues: 2, poll: kickvm_virtio::options::DEFAULT_POLL, vhost: false }));
        assert_eq!(DeviceSpec::parse(DeviceKind::Console, "file=/o").unwrap(), DeviceSpec::Console(ConsoleSpec::File("/o".into())));
        assert_eq!(DeviceSpec::parse(DeviceKind::Rng, "").unwrap(), DeviceSpec::Rng { source: None });
    }

    #[test]
    fn mistakes_are_one_line() {
        for (k, o) in [
            (DeviceKind::Blk, "readonly=on"),
            (DeviceKind::Blk, "path=a,path=b"),
            (DeviceKind::Blk, "path=a,queues=0"),
            (DeviceKind::Net, "tap=t0,mac=01:00:00:00:00:00"),
            (DeviceKind::Net, "tap=t0,vhost=on"),
            (DeviceKind::Console, "tty"),
            (DeviceKind::Rng, "fast=yes"),
        ] {
            let e = DeviceSpec::parse(k, o).unwrap_err();
            assert!(!e.0.contains('\n'), "{e}");
        }
    }
}
