//! `--net`: virtio-net over a TAP interface.

use std::path::Path;

use super::vhost_net::VhostNetDevice;
use super::{DeviceError, DeviceKind};
use crate::config::validate::check_char_device;
use crate::config::{err, ConfigError, NetSpec, VmConfig};
use kickvm_virtio::net::{NetDevice, Tap};
use kickvm_virtio::VirtioDevice;

/// Where Linux lists network interfaces, and the TUN/TAP flag bits it
/// shows in `<interface>/tun_flags`.
const SYSFS_NET: &str = "/sys/class/net";
const IFF_TAP: u32 = 0x0002;
const IFF_MULTI_QUEUE: u32 = 0x0100;
const TUN_DEVICE: &str = "/dev/net/tun";

pub struct Nets;

impl DeviceKind for Nets {
    fn syscalls(&self) -> &'static [i64] {
        kickvm_virtio::net::SYSCALLS
    }
    fn count(&self, cfg: &VmConfig) -> usize {
        cfg.nets.len()
    }
    fn check(&self, cfg: &VmConfig) -> Result<(), ConfigError> {
        check_nets(&cfg.nets, Path::new(SYSFS_NET), &Creds::current(), &|tap| cfg.tap_fds.0.contains_key(tap))
    }
    /// Without `mac=`, cards get 52:54:00:12:34:56, :57, ... in order.
    fn build(&self, cfg: &VmConfig, out: &mut Vec<Box<dyn VirtioDevice>>) -> Result<(), DeviceError> {
        for (i, spec) in cfg.nets.iter().enumerate() {
            let nc = spec.net_config(&format!("net{i}"), i);
            if spec.vhost {
                let dev = VhostNetDevice::new(nc).map_err(|source| DeviceError::VhostNet { tap: spec.tap.clone(), source })?;
                out.push(Box::new(dev));
                continue;
            }
            let tap_err = |source| DeviceError::Tap { tap: spec.tap.clone(), source };
            let dev = match cfg.tap_fds.0.get(&spec.tap) {
                Some(fds) => NetDevice::with_taps(nc, passed_taps(fds).map_err(tap_err)?),
                None => NetDevice::new(nc).map_err(tap_err)?,
            };
            dev.state().set_poll(spec.poll);
            out.push(Box::new(dev));
        }
        Ok(())
    }
}

/// Fresh duplicates of TAP queue fds that were handed over, one per queue
/// pair (each boot of the VM consumes its own).
fn passed_taps(fds: &[std::sync::Arc<std::os::fd::OwnedFd>]) -> Result<Vec<Tap>, kickvm_virtio::net::TapError> {
    let not_tap = |e: std::io::Error| kickvm_virtio::net::TapError::NotTap(format!("cannot duplicate it: {e}"));
    fds.iter().map(|fd| Tap::from_fd(fd.try_clone().map_err(not_tap)?)).collect()
}

/// What decides whether this process may create or attach to a TAP.
struct Creds {
    /// `CAP_NET_ADMIN` in the effective set: create any TAP, use any.
    net_admin: bool,
    euid: u32,
    /// The effective group and the supplementary groups.
    groups: Vec<u32>,
}

impl Creds {
    fn current() -> Creds {
        const CAP_NET_ADMIN: u32 = 12;
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0);
        // SAFETY: geteuid and getegid cannot fail.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let mut groups = vec![egid];
        let mut buf = [0 as libc::gid_t; 256];
        // SAFETY: getgroups writes at most `buf.len()` ids into `buf`.
        let n = unsafe { libc::getgroups(buf.len() as libc::c_int, buf.as_mut_ptr()) };
        groups.extend(buf.iter().take(usize::try_from(n).unwrap_or(0)));
        Creds { net_admin: cap_eff & (1 << CAP_NET_ADMIN) != 0, euid, groups }
    }
}

/// Every card has its own TAP and MAC, and a TAP that exists already is
/// one the device can open with the queues asked for. `sysfs` is where the
/// interfaces are listed (`/sys/class/net`). A TAP whose fds were handed
/// over (`passed`) needs no opening: the fds are checked when taken, and
/// the interface may live in another network namespace.
fn check_nets(nets: &[NetSpec], sysfs: &Path, creds: &Creds, passed: &dyn Fn(&str) -> bool) -> Result<(), ConfigError> {
    if !nets.is_empty() {
        let hint = "; --net needs it (load the tun module: modprobe tun)";
        check_char_device("TUN/TAP device", Path::new(TUN_DEVICE), libc::R_OK | libc::W_OK, hint)?;
    }
    for (i, n) in nets.iter().enumerate() {
        if nets[..i].iter().any(|m| m.tap == n.tap) {
            return err(format!("--net tap={} is given twice: each card needs its own TAP", n.tap));
        }
        let mac = n.mac_or_default(i);
        if let Some(j) = (0..i).find(|&j| nets[j].mac_or_default(j) == mac) {
            let m = mac.map(|b| format!("{b:02x}")).join(":");
            return err(format!(
                "--net tap={}: MAC {m} is also the MAC of the card on tap={}; give each card its own mac=",
                n.tap, nets[j].tap
            ));
        }
        if !passed(&n.tap) {
            check_existing_tap(n, sysfs, creds)?;
        }
        super::vhost_net::check(n)?;
    }
    Ok(())
}

/// A TAP that does not exist yet needs CAP_NET_ADMIN to be created. One
/// that exists (persistent, made with `ip tuntap add`) must be a TAP, ours
/// to use, and multi-queue exactly when the card has more than one queue
/// pair: TUNSETIFF refuses each of those late, after the VM exists.
fn check_existing_tap(n: &NetSpec, sysfs: &Path, creds: &Creds) -> Result<(), ConfigError> {
    let dir = sysfs.join(&n.tap);
    if !dir.exists() {
        if !creds.net_admin {
            return err(format!(
                "--net tap={0}: creating a TAP needs CAP_NET_ADMIN; run kickvm as root, or create it first: ip tuntap add {0} mode tap user $USER",
                n.tap
            ));
        }
        return Ok(()); // kickvm creates it
    }
    let flags = std::fs::read_to_string(dir.join("tun_flags"))
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok());
    let Some(flags) = flags else {
        return err(format!(
            "--net tap={0}: {0} is an existing network interface that is not a TAP; choose a new name (kickvm creates the TAP) or a TAP's",
            n.tap
        ));
    };
    if flags & IFF_TAP == 0 {
        return err(format!("--net tap={0}: {0} is a TUN interface, not a TAP", n.tap));
    }
    // `owner`/`group` read -1 when the TAP is anyone's.
    let id = |f: &str| std::fs::read_to_string(dir.join(f)).ok().and_then(|s| s.trim().parse::<i64>().ok());
    let owner = id("owner").and_then(|o| u32::try_from(o).ok());
    let group = id("group").and_then(|g| u32::try_from(g).ok());
    let not_ours = owner.is_some_and(|o| o != creds.euid) || group.is_some_and(|g| !creds.groups.contains(&g));
    if not_ours && !creds.net_admin {
        return err(format!(
            "--net tap={0}: TAP {0} belongs to another user or group (owner {1}, group {2}); use your own TAP or run kickvm as root",
            n.tap,
            owner.map_or("any".into(), |o| o.to_string()),
            group.map_or("any".into(), |g| g.to_string())
        ));
    }
    let multi = flags & IFF_MULTI_QUEUE != 0;
    if multi && n.queues == 1 {
        return err(format!(
            "--net tap={0}: TAP {0} was created multi_queue; give queues=2 or more, or use another TAP",
            n.tap
        ));
    }
    if !multi && n.queues > 1 {
        return err(format!(
            "--net tap={0},queues={1}: TAP {0} was created without multi_queue; use queues=1, or recreate it with `ip tuntap add {0} mode tap multi_queue`",
            n.tap, n.queues
        ));
    }
    Ok(())
}


#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> vmm_sys_util::tempdir::TempDir {
        vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/kickvm-validate").unwrap()
    }

    fn net(tap: &str, queues: u16) -> NetSpec {
        NetSpec { tap: tap.into(), mac: None, queues, poll: Default::default(), vhost: false }
    }

    fn root() -> Creds {
        Creds { net_admin: true, euid: 0, groups: vec![0] }
    }

    fn user() -> Creds {
        Creds { net_admin: false, euid: 1000, groups: vec![1000, 27] }
    }

    #[test]
    fn taps_and_macs_are_each_cards_own() {
        let d = scratch();
        let sys = d.as_path();
        let e = check_nets(&[net("t0", 1), net("t0", 1)], sys, &root(), &|_| false).unwrap_err().0;
        assert!(e.contains("tap=t0 is given twice"), "{e}");
        let mut b = net("t1", 1);
        b.mac = Some(crate::config::DEFAULT_MAC);
        let e = check_nets(&[net("t0", 1), b], sys, &root(), &|_| false).unwrap_err().0;
        assert!(e.contains("52:54:00:12:34:56 is also the MAC of the card on tap=t0"), "{e}");
    }

    #[test]
    fn an_existing_interface_must_be_a_tap_of_the_right_kind() {
        let d = scratch();
        let sys = d.as_path();
        let iface = |name: &str, flags: Option<&str>| {
            std::fs::create_dir(sys.join(name)).unwrap();
            if let Some(f) = flags {
                std::fs::write(sys.join(name).join("tun_flags"), f).unwrap();
                std::fs::write(sys.join(name).join("owner"), "-1\n").unwrap();
                std::fs::write(sys.join(name).join("group"), "-1\n").unwrap();
            }
        };
        let check_existing_tap = |n: &NetSpec, sys: &Path| check_existing_tap(n, sys, &root());
        iface("eth0", None);
        iface("tun0", Some("0x1001\n"));
        iface("tapq", Some("0x1102\n"));
        iface("tap1", Some("0x1002\n"));
        let e = check_existing_tap(&net("eth0", 1), sys).unwrap_err().0;
        assert!(e.contains("not a TAP"), "{e}");
        let e = check_existing_tap(&net("tun0", 1), sys).unwrap_err().0;
        assert!(e.contains("is a TUN interface"), "{e}");
        let e = check_existing_tap(&net("tapq", 1), sys).unwrap_err().0;
        assert!(e.contains("created multi_queue"), "{e}");
        check_existing_tap(&net("tapq", 2), sys).unwrap();
        let e = check_existing_tap(&net("tap1", 4), sys).unwrap_err().0;
        assert!(e.contains("without multi_queue"), "{e}");
        check_existing_tap(&net("tap1", 1), sys).unwrap();
        check_existing_tap(&net("new0", 8), sys).unwrap();
    }

    #[test]
    fn a_tap_needs_privilege_or_ownership() {
        let d = scratch();
        let sys = d.as_path();
        let e = super::check_existing_tap(&net("new0", 1), sys, &user()).unwrap_err().0;
        assert!(e.contains("creating a TAP needs CAP_NET_ADMIN"), "{e}");
        let tap = |name: &str, owner: &str, group: &str| {
            std::fs::create_dir(sys.join(name)).unwrap();
            std::fs::write(sys.join(name).join("tun_flags"), "0x1002\n").unwrap();
            std::fs::write(sys.join(name).join("owner"), owner).unwrap();
            std::fs::write(sys.join(name).join("group"), group).unwrap();
        };
        tap("mine", "1000\n", "-1\n");
        tap("ourgroup", "-1\n", "27\n");
        tap("theirs", "1001\n", "-1\n");
        tap("theirgroup", "-1\n", "100\n");
        super::check_existing_tap(&net("mine", 1), sys, &user()).unwrap();
        super::check_existing_tap(&net("ourgroup", 1), sys, &user()).unwrap();
        let e = super::check_existing_tap(&net("theirs", 1), sys, &user()).unwrap_err().0;
        assert!(e.contains("belongs to another user or group (owner 1001, group any)"), "{e}");
        assert!(super::check_existing_tap(&net("theirgroup", 1), sys, &user()).is_err());
        super::check_existing_tap(&net("theirs", 1), sys, &root()).unwrap();
    }
}
