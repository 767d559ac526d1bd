//! kickvm-rig: real Linux guests for kickvm's tests.
//!
//! - [`image`] builds guest images (Debian kernel + busybox initramfs with
//!   the virtio modules and a small `/init` that runs a test script and
//!   prints its exit status) from Debian packages, cached by version.
//! - [`qemu`] boots such an image under QEMU (KVM or TCG) and collects the
//!   console and the script's exit status.
//! - [`rig`] runs a host command inside an "L1" Linux under QEMU TCG with
//!   nested SVM, for hosts whose own `/dev/kvm` cannot run a stock kernel
//!   (see `docs/testing.md` and the "measured facts" in the design doc).
//!
//! Every error is an [`Error`]: one line saying what was wrong and what to do.

pub mod base64;
pub mod cpio;
pub mod debs;
pub mod elf;
mod error;
pub mod image;
pub mod modules;
pub mod qemu;
pub mod rig;
pub mod vmlinux;

pub use error::{Error, Result};
pub use image::{default_image, minimal_image, tools_image, GuestImage};
pub use vmlinux::default_vmlinux;
pub use rig::{
    host_kvm_is_usable, reexec_test_in_rig_if_needed, reexec_test_in_rig_with, run_in_rig, system_map, threads_report, RigOptions, RigOutput,
};

/// Prints a progress line for a long step, on stderr.
pub(crate) fn progress(msg: &str) {
    eprintln!("rig: {msg}");
}
