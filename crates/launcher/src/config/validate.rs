//! Checking a [`VmConfig`] against the host before anything is created:
//! every file the user named is of the right kind and can be opened as it
//! will be, the kernel's header says it can start in this much memory with
//! this command line and initramfs, the devices fit on the PCI bus, and the
//! TAP interfaces and console endpoints can be what the devices will make
//! of them. A mistake found here is one line and nothing to clean up; one
//! found later may leave a half-built VM behind.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::{err, ConfigError, ConsoleSpec, DiskSpec, NetSpec, VmConfig, MAX_CPUS};
use crate::hostfile::{self, describe, io_reason, Accept};
use crate::{boot, memory};

/// `sun_path` holds 108 bytes with the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// PCI bus 0 slots left after the host bridge.
const MAX_DEVICES: usize = crate::pci::root::SLOTS - 1;
/// Where Linux lists network interfaces, and the TUN/TAP flag bits it
/// shows in `<interface>/tun_flags`.
const SYSFS_NET: &str = "/sys/class/net";
const IFF_TAP: u32 = 0x0002;
const IFF_MULTI_QUEUE: u32 = 0x0100;
const TUN_DEVICE: &str = "/dev/net/tun";
const ENTROPY_SOURCE: &str = "/dev/urandom";
/// virtio-blk's sector.
const SECTOR: u64 = 512;
/// `BLKROGET`: is this block device read-only?
const BLKROGET: libc::c_ulong = 0x125e;

fn cfg_err(e: impl std::fmt::Display) -> ConfigError {
    ConfigError(e.to_string())
}

impl VmConfig {
    /// Checks everything that can be checked without KVM and without
    /// creating anything. Opens files (read-only unless they will be
    /// written) and closes them again.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return err(format!("--cpus {}: use a number from 1 to {MAX_CPUS}", self.cpus));
        }
        memory::check_size(self.memory, self.hugepages).map_err(cfg_err)?;
        self.check_boot()?;
        let devices = self.disks.len()
            + self.nets.len()
            + usize::from(self.console != ConsoleSpec::None)
            + usize::from(self.rng);
        if devices > MAX_DEVICES {
            return err(format!(
                "{devices} virtio devices asked for, more than the {MAX_DEVICES} PCI slots kickvm has: use fewer --disk/--net"
            ));
        }
        check_disks(&self.disks)?;
        check_nets(&self.nets, Path::new(SYSFS_NET), &Creds::current())?;
        check_console(&self.console)?;
        if self.rng {
            check_char_device("--rng: entropy source", Path::new(ENTROPY_SOURCE), libc::R_OK, "")?;
        }
        Ok(())
    }

    /// The kernel can start in this guest with this command line, and the
    /// initramfs fits next to it.
    fn check_boot(&self) -> Result<(), ConfigError> {
        let low_end = memory::low_end(self.memory);
        let (_, kernel) = boot::inspect_kernel(&self.kernel).map_err(cfg_err)?;
        boot::check_kernel_fits(&self.kernel, &kernel, low_end).map_err(cfg_err)?;
        boot::check_cmdline(&self.cmdline, &kernel).map_err(cfg_err)?;
        if let Some(initrd) = &self.initrd {
            let (_, size) = hostfile::open_nonempty("initrd", initrd).map_err(cfg_err)?;
            boot::check_initrd_fits(initrd, size, low_end, &kernel).map_err(cfg_err)?;
        }
        Ok(())
    }
}

/// Every disk is a regular file or block device that opens as it will be
/// used, holds whole sectors, and no image is written through two devices.
fn check_disks(disks: &[DiskSpec]) -> Result<(), ConfigError> {
    let mut seen: Vec<((u64, u64), &DiskSpec)> = Vec::new();
    for d in disks {
        let (file, len) = hostfile::open("disk", &d.path, Accept::RegularOrBlock, !d.readonly).map_err(|e| {
            let hint = match &e {
                hostfile::FileError::Open { reason, .. } if !d.readonly && is_write_refusal(reason) => {
                    " (add readonly=on to use it read-only)"
                }
                _ => "",
            };
            ConfigError(format!("{e}{hint}"))
        })?;
        check_disk_size(&d.path, len)?;
        let meta = file.metadata().map_err(|e| ConfigError(format!("disk {}: {}", d.path.display(), io_reason(&e))))?;
        let block = meta.file_type().is_block_device();
        if block && !d.readonly && block_device_read_only(&file) {
            return err(format!("disk {} is a read-only block device: add readonly=on", d.path.display()));
        }
        // The same image under two names: a block device by its device
        // number, a file by its inode.
        let id = if block { (0, meta.rdev()) } else { (meta.dev(), meta.ino()) };
        if let Some((_, other)) = seen.iter().find(|(i, o)| *i == id && !(o.readonly && d.readonly)) {
            return err(format!(
                "disk {} is given twice (also as {}): an image written through two devices gets corrupted; give it once, or readonly=on to both",
                d.path.display(),
                other.path.display()
            ));
        }
        seen.push((id, d));
    }
    Ok(())
}

/// A virtio-blk disk is a number of 512-byte sectors: bytes past the last
/// whole one would be out of the guest's reach without anyone knowing.
fn check_disk_size(path: &Path, len: u64) -> Result<(), ConfigError> {
    let p = path.display();
    if len == 0 {
        return err(format!("disk {p} is empty; a disk holds at least one {SECTOR}-byte sector (e.g. truncate -s 64M {p})"));
    }
    let rest = len % SECTOR;
    if rest != 0 {
        let whole = len.div_ceil(SECTOR) * SECTOR;
        return err(format!(
            "disk {p} is {len} bytes, not a whole number of {SECTOR}-byte sectors (the guest could not reach the last {rest} bytes); pad it: truncate -s {whole} {p}"
        ));
    }
    Ok(())
}

fn is_write_refusal(reason: &str) -> bool {
    reason == "permission denied" || reason == "read-only file system"
}

fn block_device_read_only(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    let mut ro: libc::c_int = 0;
    // SAFETY: BLKROGET writes one int through the pointer, which is valid
    // for the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKROGET as _, &mut ro) };
    r == 0 && ro != 0
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
/// interfaces are listed (`/sys/class/net`).
fn check_nets(nets: &[NetSpec], sysfs: &Path, creds: &Creds) -> Result<(), ConfigError> {
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
        check_existing_tap(n, sysfs, creds)?;
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

/// The console endpoint can be made: a socket path that is free (or holds
/// a stale socket, which the console replaces) in a directory we can write,
/// a file we can append to, a pty master.
fn check_console(c: &ConsoleSpec) -> Result<(), ConfigError> {
    match c {
        ConsoleSpec::None | ConsoleSpec::Stdio => Ok(()),
        ConsoleSpec::Pty => {
            check_char_device("pseudo-terminal master", Path::new("/dev/ptmx"), libc::R_OK | libc::W_OK, "; --console pty needs it")
        }
        ConsoleSpec::Socket(p) => {
            let len = p.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return err(format!(
                    "console socket path {} is {len} bytes; a Unix socket path is at most {MAX_SOCKET_PATH}: choose a shorter one",
                    p.display()
                ));
            }
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_socket() => Ok(()),
                Ok(m) => err(format!(
                    "console socket path {} exists and is not a socket ({}): remove it or choose another path",
                    p.display(),
                    describe(&m.file_type())
                )),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => check_new_file_dir("console socket", p),
                Err(e) => err(format!("console socket path {}: {}", p.display(), io_reason(&e))),
            }
        }
        ConsoleSpec::File(p) => match std::fs::metadata(p) {
            Ok(m) if m.is_file() || m.file_type().is_char_device() => {
                if access(p, libc::W_OK) {
                    Ok(())
                } else {
                    err(format!("console file {}: permission denied", p.display()))
                }
            }
            Ok(m) => err(format!(
                "console file {} is {}: give a regular file (output is appended to it) or a terminal",
                p.display(),
                describe(&m.file_type())
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => check_new_file_dir("console file", p),
            Err(e) => err(format!("console file {}: {}", p.display(), io_reason(&e))),
        },
    }
}

/// The directory a new file at `p` goes in exists and takes new files.
fn check_new_file_dir(what: &str, p: &Path) -> Result<(), ConfigError> {
    let dir = hostfile::parent_dir(p);
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() && hostfile::dir_writable(dir) => Ok(()),
        Ok(m) if m.is_dir() => err(format!("{what} {}: cannot create it in {} (permission denied)", p.display(), dir.display())),
        Ok(_) => err(format!("{what} {}: {} is not a directory", p.display(), dir.display())),
        Err(_) => err(format!("{what} {}: directory {} does not exist", p.display(), dir.display())),
    }
}

/// `path` is a character device the launcher may open with `mode`
/// (`R_OK`/`W_OK`); `hint` ends the message if not.
fn check_char_device(what: &str, path: &Path, mode: libc::c_int, hint: &str) -> Result<(), ConfigError> {
    let p = path.display();
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_char_device() && access(path, mode) => Ok(()),
        Ok(m) if m.file_type().is_char_device() => err(format!("{what} {p}: permission denied{hint}")),
        Ok(m) => err(format!("{what} {p} is {}, not a character device{hint}", describe(&m.file_type()))),
        Err(e) => err(format!("{what} {p}: {}{hint}", io_reason(&e))),
    }
}

fn access(path: &Path, mode: libc::c_int) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: `c` is a NUL-terminated path; access(2) only reads it.
    unsafe { libc::access(c.as_ptr(), mode) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scratch() -> vmm_sys_util::tempdir::TempDir {
        vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/kickvm-validate").unwrap()
    }

    fn disk(path: &Path, readonly: bool) -> DiskSpec {
        DiskSpec { path: path.to_path_buf(), readonly, serial: None, queues: 1 }
    }

    fn net(tap: &str, queues: u16) -> NetSpec {
        NetSpec { tap: tap.into(), mac: None, queues }
    }

    fn root() -> Creds {
        Creds { net_admin: true, euid: 0, groups: vec![0] }
    }

    fn user() -> Creds {
        Creds { net_admin: false, euid: 1000, groups: vec![1000, 27] }
    }

    #[test]
    fn disks_must_be_files_or_block_devices_given_once() {
        let d = scratch();
        let dir = d.as_path();
        let e = check_disks(&[disk(dir, false)]).unwrap_err().0;
        assert!(e.contains("is a directory"), "{e}");
        let e = check_disks(&[disk(Path::new("/dev/zero"), true)]).unwrap_err().0;
        assert!(e.contains("is a character device"), "{e}");
        let img = dir.join("a.img");
        std::fs::write(&img, [0u8; 4096]).unwrap();
        check_disks(&[disk(&img, false)]).unwrap();
        let link = dir.join("b.img");
        std::os::unix::fs::symlink(&img, &link).unwrap();
        let e = check_disks(&[disk(&img, false), disk(&link, true)]).unwrap_err().0;
        assert!(e.contains("is given twice"), "{e}");
        check_disks(&[disk(&img, true), disk(&link, true)]).unwrap();
        std::fs::write(&img, [0u8; 4097]).unwrap();
        let e = check_disks(&[disk(&img, false)]).unwrap_err().0;
        assert!(e.contains("is 4097 bytes, not a whole number of 512-byte sectors"), "{e}");
        assert!(e.contains("truncate -s 4608"), "{e}");
        std::fs::write(&img, b"").unwrap();
        let e = check_disks(&[disk(&img, true)]).unwrap_err().0;
        assert!(e.contains("is empty"), "{e}");
    }

    #[test]
    fn taps_and_macs_are_each_cards_own() {
        let d = scratch();
        let sys = d.as_path();
        let e = check_nets(&[net("t0", 1), net("t0", 1)], sys, &root()).unwrap_err().0;
        assert!(e.contains("tap=t0 is given twice"), "{e}");
        let mut b = net("t1", 1);
        b.mac = Some(crate::config::DEFAULT_MAC);
        let e = check_nets(&[net("t0", 1), b], sys, &root()).unwrap_err().0;
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

    #[test]
    fn console_endpoints() {
        let d = scratch();
        let dir = d.as_path();
        let file = dir.join("file");
        std::fs::write(&file, b"precious").unwrap();
        let e = check_console(&ConsoleSpec::Socket(file.clone())).unwrap_err().0;
        assert_eq!(
            e,
            format!("console socket path {} exists and is not a socket (a regular file): remove it or choose another path", file.display())
        );
        let e = check_console(&ConsoleSpec::Socket(dir.to_path_buf())).unwrap_err().0;
        assert!(e.contains("exists and is not a socket (a directory)"), "{e}");
        let link = dir.join("link");
        std::os::unix::fs::symlink("/nonexistent", &link).unwrap();
        let e = check_console(&ConsoleSpec::Socket(link)).unwrap_err().0;
        assert!(e.contains("(a symbolic link)"), "{e}");
        let sock = dir.join("sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        check_console(&ConsoleSpec::Socket(sock)).unwrap();
        check_console(&ConsoleSpec::Socket(dir.join("new"))).unwrap();
        let e = check_console(&ConsoleSpec::Socket(PathBuf::from("/nonexistent/dir/sock"))).unwrap_err().0;
        assert!(e.contains("directory /nonexistent/dir does not exist"), "{e}");
        let e = check_console(&ConsoleSpec::Socket(dir.join("x".repeat(120)))).unwrap_err().0;
        assert!(e.contains("at most 107"), "{e}");

        check_console(&ConsoleSpec::File(file)).unwrap();
        check_console(&ConsoleSpec::File(PathBuf::from("/dev/null"))).unwrap();
        check_console(&ConsoleSpec::File(dir.join("new.log"))).unwrap();
        let e = check_console(&ConsoleSpec::File(dir.to_path_buf())).unwrap_err().0;
        assert!(e.contains("is a directory: give a regular file"), "{e}");
        let e = check_console(&ConsoleSpec::File(PathBuf::from("/nonexistent/c.log"))).unwrap_err().0;
        assert!(e.contains("does not exist"), "{e}");
    }
}
