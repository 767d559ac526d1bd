//! The virtio devices the user asked for, built from `kickvm-virtio`'s
//! device servers and plugged into PCI in a fixed order (disks, network
//! cards, console, rng), so a guest sees the same slots on every boot.

use std::sync::{Arc, Mutex};

use kickvm_virtio::{GuestMemory, Runtime, VirtioDevice};

use crate::config::{ConsoleSpec, VmConfig};
use crate::pci::{PciHost, VirtioPciDevice};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{0}")]
    Backend(String),
    #[error("{name}: {err}")]
    Pci { name: String, err: crate::pci::PciError },
}

/// Builds every configured device (opening its backend: TAP, disk file,
/// console endpoint, entropy source).
pub fn build(cfg: &VmConfig) -> Result<Vec<Box<dyn VirtioDevice>>, DeviceError> {
    let mut devs: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        let bc = kickvm_virtio::block::BlockConfig {
            path: d.path.clone(),
            readonly: d.readonly,
            serial: d.serial.clone(),
            num_queues: d.queues,
            direct: false,
        };
        let blk = kickvm_virtio::block::Block::new(&format!("blk{i}"), bc)
            .map_err(|e| DeviceError::Backend(e.to_string()))?;
        devs.push(Box::new(blk));
    }
    for (i, n) in cfg.nets.iter().enumerate() {
        devs.push(net(&format!("net{i}"), i, n)?);
    }
    let console = match &cfg.console {
        ConsoleSpec::None => None,
        ConsoleSpec::Stdio => Some(kickvm_virtio::console::Backend::Stdio),
        ConsoleSpec::Pty => Some(kickvm_virtio::console::Backend::Pty),
        ConsoleSpec::Socket(p) => Some(kickvm_virtio::console::Backend::Socket(p.clone())),
        ConsoleSpec::File(p) => Some(kickvm_virtio::console::Backend::File(p.clone())),
    };
    if let Some(backend) = console {
        let c = kickvm_virtio::console::Console::new("console0", backend)
            .map_err(|e| DeviceError::Backend(format!("virtio-console: {e}")))?;
        if let Some(p) = c.pty_path() {
            announce_pty(p);
        }
        devs.push(Box::new(c));
    }
    if cfg.rng {
        let r = kickvm_virtio::rng::Rng::new("rng0", kickvm_virtio::rng::RngConfig::default())
            .map_err(|e| DeviceError::Backend(format!("virtio-rng: {e}")))?;
        devs.push(Box::new(r));
    }
    Ok(devs)
}

/// Tells the user where the console's pty is — at the first boot, and at a
/// reboot only if the path changed (a guest rebooting in a loop gets the
/// same pty number back, and must not repeat the line forever).
fn announce_pty(path: &std::path::Path) {
    static LAST: Mutex<Option<std::path::PathBuf>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if last.as_deref() != Some(path) {
        eprintln!("kickvm: virtio-console (hvc0) is on {}", path.display());
        *last = Some(path.to_path_buf());
    }
}

/// A virtio-net card on TAP `spec.tap`. Without `mac=`, cards get
/// 52:54:00:12:34:56, :57, ... in order.
fn net(name: &str, index: usize, spec: &crate::config::NetSpec) -> Result<Box<dyn VirtioDevice>, DeviceError> {
    let cfg = kickvm_virtio::net::NetConfig {
        name: name.to_string(),
        tap: spec.tap.clone(),
        mac: spec.mac_or_default(index),
        queue_pairs: spec.queues,
        mtu: None,
    };
    let dev = kickvm_virtio::net::NetDevice::new(cfg)
        .map_err(|e| DeviceError::Backend(format!("--net tap={}: {e}", spec.tap)))?;
    Ok(Box::new(dev))
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
