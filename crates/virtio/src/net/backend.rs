//! A Linux TAP interface opened with a virtio-net header on every packet.
//!
//! Written by hand because no crate of the field sets up what a virtio-net
//! backend needs: `IFF_VNET_HDR` (each packet read or written carries a
//! `virtio_net_hdr`, so guest buffers go to the TAP untouched),
//! `TUNSETVNETHDRSZ` (the 12-byte virtio 1.x header), `TUNSETOFFLOAD` (the
//! kernel may hand us checksum-partial and GSO packets the guest agreed to
//! take) and `IFF_MULTI_QUEUE` (one fd per queue pair).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use super::features::*;

const TUN_PATH: &str = "/dev/net/tun";
/// Interface names are at most 15 bytes plus the terminating NUL.
const IFNAMSIZ: usize = 16;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the rest
/// of the 24-byte union is unused here).
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

/// Why a TAP could not be set up. Each message names the interface and
/// reads as one sentence for the user.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name `{0}` is longer than 15 bytes or contains a NUL")]
    BadName(String),
    #[error("cannot open {TUN_PATH} for TAP `{name}`: {source}{}", hint(.source))]
    OpenTun { name: String, source: io::Error },
    #[error("cannot open TAP `{name}`: {source}{}", hint(.source))]
    SetIff { name: String, source: io::Error },
    #[error("cannot {what} on TAP `{name}`: {source}")]
    Ioctl { what: &'static str, name: String, source: io::Error },
    #[error("the file descriptor passed for a network card is not a TAP with a virtio-net header ({0}): open it with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR")]
    NotTap(String),
}

fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => " (are you root, or does the TAP belong to another user?)",
        Some(libc::ENOENT) | Some(libc::ENODEV) => " (is the `tun` kernel module loaded?)",
        Some(libc::EBUSY) => " (is it already open in another process?)",
        Some(libc::EINVAL) => " (does an interface of that name exist with other flags, e.g. single- vs multi-queue?)",
        _ => "",
    }
}

/// One queue of a TAP interface: an fd on `/dev/net/tun` bound to it.
/// Blocking; the receive path reads it with `RWF_NOWAIT` when it must not
/// sleep.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Opens `queues` fds on the TAP `name` (created if it does not exist,
    /// gone when the last fd closes unless made persistent). An empty name
    /// lets the kernel pick one (`tap%d`). More than one queue uses
    /// `IFF_MULTI_QUEUE`: one fd per queue pair.
    pub fn open(name: &str, queues: usize) -> Result<Vec<Tap>, TapError> {
        let multi = queues > 1;
        let first = Tap::open_queue(name, multi)?;
        let name = first.name.clone();
        let mut taps = vec![first];
        for _ in 1..queues {
            taps.push(Tap::open_queue(&name, multi)?);
        }
        Ok(taps)
    }

    /// Opens one fd on the TAP `name` with a virtio-net header on packets.
    pub fn open_queue(name: &str, multi_queue: bool) -> Result<Tap, TapError> {
        if name.len() >= IFNAMSIZ || name.contains('\0') {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| TapError::OpenTun { name: name.to_string(), source })?;
        let mut req = IfReq { name: [0; IFNAMSIZ], flags: 0, _rest: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        req.flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes back one `struct ifreq`; `req`
        // has its layout and size and lives across the call.
        let r = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF as _, &mut req) };
        if r < 0 {
            return Err(TapError::SetIff { name: name.to_string(), source: io::Error::last_os_error() });
        }
        let len = req.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        Ok(Tap { fd: file.into(), name })
    }

    /// Takes a queue fd that another program opened on a TAP (an
    /// orchestrator passes it over a socket): TUNGETIFF says which
    /// interface it is bound to and with which flags. It must carry the
    /// virtio-net header, as [`Tap::open_queue`]'s fds do.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let mut req = IfReq { name: [0; IFNAMSIZ], flags: 0, _rest: [0; 22] };
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`, which has
        // its layout and size and lives across the call.
        let r = unsafe { ioctl_with_mut_ref(&fd, libc::TUNGETIFF as _, &mut req) };
        if r < 0 {
            return Err(TapError::NotTap(format!("TUNGETIFF: {}", io::Error::last_os_error())));
        }
        let want = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let flags = i32::from(req.flags) & 0xffff;
        if flags & want != want {
            return Err(TapError::NotTap(format!("flags {flags:#x}")));
        }
        let len = req.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        Ok(Tap { fd, name })
    }

    /// The interface name (as the kernel chose it, for an empty name).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn ioctl_val(&self, what: &'static str, req: libc::Ioctl, val: libc::c_ulong) -> Result<(), TapError> {
        // SAFETY: the TUN ioctls used here take their argument by value or
        // as a pointer to an int (see `ioctl_int`); none writes memory.
        let r = unsafe { ioctl_with_val(&self.fd, req as _, val) };
        if r < 0 {
            return Err(self.error(what));
        }
        Ok(())
    }

    fn ioctl_int(&self, what: &'static str, req: libc::Ioctl, val: libc::c_int) -> Result<(), TapError> {
        // SAFETY: the ioctl reads one int through the pointer, which is valid
        // for the duration of the call.
        let r = unsafe { ioctl_with_ref(&self.fd, req as _, &val) };
        if r < 0 {
            return Err(self.error(what));
        }
        Ok(())
    }

    fn error(&self, what: &'static str) -> TapError {
        TapError::Ioctl { what, name: self.name.clone(), source: io::Error::last_os_error() }
    }

    /// Size of the header in front of every packet: 12 for virtio 1.x
    /// (`virtio_net_hdr_v1` with `num_buffers`), 10 for legacy drivers.
    pub fn set_vnet_hdr_size(&self, size: usize) -> Result<(), TapError> {
        self.ioctl_int("set the virtio-net header size", libc::TUNSETVNETHDRSZ, size as libc::c_int)
    }

    /// Which offloaded packets (`TUN_F_*`) the kernel may hand to us, i.e.
    /// put into guest buffers. See [`offload_flags`].
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        self.ioctl_val("set offloads", libc::TUNSETOFFLOAD, libc::c_ulong::from(flags))
    }

    /// Attaches this fd's queue to (or detaches it from) a multi-queue TAP:
    /// the kernel only steers packets to attached queues.
    pub fn set_queue_enabled(&self, on: bool) -> Result<(), TapError> {
        let mut req = IfReq { name: [0; IFNAMSIZ], flags: 0, _rest: [0; 22] };
        req.flags = (if on { libc::IFF_ATTACH_QUEUE } else { libc::IFF_DETACH_QUEUE }) as libc::c_short;
        // SAFETY: TUNSETQUEUE reads one `struct ifreq`.
        let r = unsafe { ioctl_with_ref(&self.fd, libc::TUNSETQUEUE as _, &req) };
        if r < 0 {
            return Err(self.error(if on { "attach a queue" } else { "detach a queue" }));
        }
        Ok(())
    }

    /// Whether the interface can carry packets now, without sending one:
    /// `poll` on a TAP queue fd reports `POLLERR` once the interface is
    /// gone (`ip link del`; reads and writes then fail with `EBADFD`), and
    /// `POLLOUT` only while it is up (a write to a TAP set down fails with
    /// `EIO`). The send buffer of a TAP is unlimited, so `POLLOUT` is
    /// never missing for lack of room.
    pub fn state(&self) -> TapState {
        let mut p = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        if n < 0 || p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            TapState::Gone
        } else if p.revents & libc::POLLOUT != 0 {
            TapState::Up
        } else {
            TapState::Down
        }
    }

    /// Keeps the interface after its last fd is closed (or not).
    pub fn set_persist(&self, on: bool) -> Result<(), TapError> {
        self.ioctl_val("set persistence", libc::TUNSETPERSIST, libc::c_ulong::from(on))
    }
}

/// What [`Tap::state`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapState {
    /// Up: packets go through.
    Up,
    /// Set down (`ip link set … down`): writes fail with `EIO`.
    Down,
    /// Deleted (or this queue detached): reads and writes fail with `EBADFD`.
    Gone,
}

/// The queue fd back, e.g. to keep it for the next boot of a VM.
impl From<Tap> for OwnedFd {
    fn from(t: Tap) -> OwnedFd {
        t.fd
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The `TUN_F_*` offloads that match the negotiated guest receive
/// features: the kernel hands us a checksum-partial or GSO packet only if
/// the guest said it can take one.
pub fn offload_flags(features: u64) -> u32 {
    let has = |bit: u32| features & (1u64 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
            flags |= libc::TUN_F_TSO_ECN;
        }
        if has(VIRTIO_NET_F_GUEST_UFO) {
            flags |= libc::TUN_F_UFO;
        }
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_guest_features() {
        assert_eq!(offload_flags(0), 0);
        // TSO without checksum offload means nothing to the kernel.
        assert_eq!(offload_flags(1 << VIRTIO_NET_F_GUEST_TSO4), 0);
        let f = (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_GUEST_TSO6);
        assert_eq!(offload_flags(f), libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6);
    }

    #[test]
    fn long_names_are_refused_before_any_syscall() {
        assert!(matches!(Tap::open_queue("a-name-that-is-too-long", false), Err(TapError::BadName(_))));
    }
}
