//! `--rng`: virtio-rng fed from the host's `/dev/urandom`.

use std::path::Path;

use super::{DeviceError, DeviceKind};
use crate::config::validate::check_char_device;
use crate::config::{ConfigError, VmConfig};
use kickvm_virtio::rng::{Rng, RngConfig};
use kickvm_virtio::VirtioDevice;

const ENTROPY_SOURCE: &str = "/dev/urandom";

pub struct Rngs;

impl DeviceKind for Rngs {
    fn syscalls(&self) -> &'static [i64] {
        kickvm_virtio::rng::SYSCALLS
    }
    fn count(&self, cfg: &VmConfig) -> usize {
        usize::from(cfg.rng)
    }
    fn check(&self, cfg: &VmConfig) -> Result<(), ConfigError> {
        if cfg.rng {
            check_char_device("--rng: entropy source", Path::new(ENTROPY_SOURCE), libc::R_OK, "")?;
        }
        Ok(())
    }
    fn build(&self, cfg: &VmConfig, out: &mut Vec<Box<dyn VirtioDevice>>) -> Result<(), DeviceError> {
        if cfg.rng {
            let r = Rng::new("rng0", RngConfig::default()).map_err(|source| DeviceError::Open { what: "virtio-rng", source })?;
            out.push(Box::new(r));
        }
        Ok(())
    }
}
