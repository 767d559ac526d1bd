//! The virtio devices the user asked for, built from `kickvm-virtio`'s
//! device servers and plugged into PCI in a fixed order (disks, network
//! cards, console, rng), so a guest sees the same slots on every boot.
//!
//! One module per kind of device (`block.rs`, `net.rs`, `console.rs`,
//! `rng.rs`) says how its options are checked and how it is built; the
//! registry [`KINDS`] is the only list of them (docs/adding-a-device.md).

use std::sync::{Arc, Mutex};

use kickvm_virtio::{GuestMemory, Runtime, VirtioDevice};

use crate::config::{ConfigError, VmConfig};
use crate::pci::{PciHost, VirtioPciDevice};

mod block;
mod console;
mod net;
mod rng;
mod vsock;
pub mod vhost_net;
pub mod vhost_user;

/// Why a device could not be built; its backend's own error is the source.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Block(#[from] kickvm_virtio::block::BlockError),
    #[error("--net tap={tap}: {source}")]
    Tap { tap: String, source: kickvm_virtio::net::TapError },
    #[error("{what}: {source}")]
    Open { what: &'static str, source: std::io::Error },
    #[error("{name}: {err}")]
    Pci { name: String, err: crate::pci::PciError },
    #[error("--net tap={tap},vhost=on: {source}")]
    VhostNet { tap: String, source: vhost_net::VhostNetError },
    #[error("{spec}: {source}")]
    VhostUser { spec: String, source: vhost_user::VhostUserError },
}

/// One kind of device `kickvm run` can give a guest: how many the options
/// ask for, how they are checked before anything is created, and how they
/// are built. The launcher knows devices only through [`KINDS`].
pub trait DeviceKind: Sync {
    /// How many devices of this kind `cfg` asks for (each takes a PCI slot).
    fn count(&self, cfg: &VmConfig) -> usize;
    /// Checks this kind's options against the host: one clear line per
    /// mistake, nothing created.
    fn check(&self, cfg: &VmConfig) -> Result<(), ConfigError>;
    /// System calls this kind's queue threads make beyond a queue thread's
    /// own: the device's `SYSCALLS` (a vCPU, which starts queue threads,
    /// must be allowed them too).
    fn syscalls(&self) -> &'static [i64];
    /// Builds this kind's devices (opening their backends), in order.
    fn build(&self, cfg: &VmConfig, out: &mut Vec<Box<dyn VirtioDevice>>) -> Result<(), DeviceError>;
}

/// Every kind of device, in the PCI slot order the guest sees on every
/// boot: disks, network cards, console, rng, vsock, then the devices of vhost-user
/// back-ends. A new kind goes here.
pub static KINDS: &[&dyn DeviceKind] =
    &[&block::Disks, &net::Nets, &console::Consoles, &rng::Rngs, &vsock::Vsocks, &vhost_user::VhostUsers];

/// Builds every configured device (opening its backend: TAP, disk file,
/// console endpoint, entropy source).
pub fn build(cfg: &VmConfig) -> Result<Vec<Box<dyn VirtioDevice>>, DeviceError> {
    let mut devs = Vec::new();
    for kind in KINDS {
        kind.build(cfg, &mut devs)?;
    }
    Ok(devs)
}

/// Puts `devs` on the PCI bus; their queue threads start when the guest's
/// drivers set DRIVER_OK.
pub fn plug(
    pci: &mut PciHost,
    devs: Vec<Box<dyn VirtioDevice>>,
    mem: &GuestMemory,
    runtime: &Arc<Runtime>,
) -> Result<Vec<Arc<Mutex<VirtioPciDevice>>>, DeviceError> {
    let mut out = Vec::new();
    for d in devs {
        let name = d.name().to_string();
        out.push(pci.add_virtio(d, mem, runtime).map_err(|err| DeviceError::Pci { name, err })?);
    }
    Ok(out)
}
