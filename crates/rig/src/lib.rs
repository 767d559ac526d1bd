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
    note!("rig: {msg}");
}

/// `println!` that does not panic when stdout is gone: a reader that went
/// away (`kickvm-rig image --print-paths | head -c1`) is not our error, and
/// a tool's exit status must stay its own. For every kickvm tool's output.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` that does not panic when stdout is gone (see [`say!`]).
#[macro_export]
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that does not panic when stderr is gone (a closed pipe, a
/// full disk): a message nobody can read is no reason to crash, and a
/// panic would replace the status the caller waits for with 101.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
