//! Building the device that `vm.add-disk` / `vm.add-net` add to a running
//! VM, with the same code `vm.boot` and `kickvm run` build devices with
//! ([`crate::devices::build`]); [`crate::vm::LiveVm::hotplug`] then puts
//! it on the bus and tells the guest.

use kickvm_virtio::VirtioDevice;

use crate::config::{ConfigError, ConsoleSpec, VmConfig};
use crate::devices;

/// Which kind of device a request added (always the last of its list in
/// the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    Disk,
    Net,
}

/// `cfg` with the disks or the cards alone (all of them), nothing else.
fn of_kind(cfg: &VmConfig, what: Added) -> VmConfig {
    let mut only = cfg.clone();
    only.console = ConsoleSpec::None;
    only.rng = false;
    only.vsock = None;
    only.vhost_users.clear();
    match what {
        Added::Disk => only.nets.clear(),
        Added::Net => only.disks.clear(),
    }
    only
}

/// Checks the devices of the kind `cfg` just gained, as `kickvm run`
/// checks its options (an image given twice, a MAC used twice, a file
/// that cannot be opened): only that kind, since the running VM holds
/// what the others use (its vsock socket is listened on, its kernel may
/// be gone since boot).
pub fn check_added(cfg: &VmConfig, what: Added) -> Result<(), ConfigError> {
    if let (Added::Net, Some(n)) = (what, cfg.nets.last()) {
        if !cfg.tap_fds.0.contains_key(&n.tap) {
            return Err(ConfigError(format!(
                "tap {}: a card plugged into a running VM comes with its TAP fd (SCM_RIGHTS), as Kata passes it; TAPs are opened by name only at vm.boot",
                n.tap
            )));
        }
    }
    let only = of_kind(cfg, what);
    devices::KINDS.iter().filter(|k| k.count(&only) > 0).try_for_each(|k| k.check(&only))
}

/// Builds the last disk or card of `cfg`, the one just added (checked by
/// [`check_added`]: a card's TAP fds came with the request).
///
/// Each kind names its devices by position (the third disk is `blk2`, and
/// a card's default MAC follows its position too), so the new device is
/// built at its position in a configuration that holds nothing else:
/// the positions before it are filled with copies of the new spec, whose
/// devices are dropped unused. A copy opens the same image again or
/// duplicates the same TAP fds; it never touches the devices already
/// running (a TAP named rather than passed could not be opened twice,
/// which is why a card plugged in after boot must come with its fds).
pub fn build_added(cfg: &VmConfig, what: Added) -> Result<Box<dyn VirtioDevice>, String> {
    let mut one = of_kind(cfg, what);
    match what {
        Added::Disk => {
            let d = cfg.disks.last().ok_or("no disk to add")?;
            one.disks = vec![d.clone(); cfg.disks.len()];
        }
        Added::Net => {
            let n = cfg.nets.last().ok_or("no card to add")?;
            one.nets = vec![n.clone(); cfg.nets.len()];
        }
    }
    let mut built = devices::build(&one).map_err(|e| e.to_string())?;
    built.pop().ok_or_else(|| "the device was not built (a bug: please report it)".to_string())
}
