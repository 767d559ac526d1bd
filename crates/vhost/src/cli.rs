//! `kickvm backend`: the command line, and the accept loop around
//! [`crate::serve`].

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use kickvm_virtio::seccomp::{self, SeccompMode};
use kickvm_virtio::{Runtime, ThreadingMode};

use crate::options::{DeviceKind, DeviceSpec};
use crate::sandbox::{self, RunAs};

pub const BACKEND_EXAMPLES: &str = "\
Examples:
  # A disk for QEMU's vhost-user-blk-pci (guest RAM must be shared):
  kickvm backend blk --socket /tmp/blk.sock path=disk.img,queues=2
  qemu-system-x86_64 ... -object memory-backend-memfd,id=m,size=1G,share=on \\
      -numa node,memdev=m -chardev socket,id=c,path=/tmp/blk.sock \\
      -device vhost-user-blk-pci,chardev=c,num-queues=2

  kickvm backend net --socket /tmp/net.sock tap=tap0,queues=2
  kickvm backend console --socket /tmp/con.sock file=/tmp/console.log
  kickvm backend rng --socket /tmp/rng.sock

Device options are those of kickvm run (--disk, --net, --console, --rng).
Each queue is served by its own thread. Frontends are served one after
another: when one disconnects the next may connect (QEMU's reconnect=).

Sandbox: every thread runs under its own seccomp filter (--seccomp log
to find a call a list lacks); inherited fds are closed at start; with
--user UID:GID a back-end started as root drops to that user once the
device is open, e.g. kickvm backend net --socket S --user 65534 tap=tap0";

/// `kickvm backend`.
#[derive(clap::Args, Debug)]
pub struct BackendArgs {
    /// The device to serve.
    #[arg(value_enum)]
    pub device: DeviceKind,
    /// Its options, as kickvm run takes them: blk path=FILE[,readonly=on][,serial=ID][,queues=N][,poll=MODE];
    /// net tap=NAME[,mac=MAC][,queues=N][,poll=MODE]; console stdio|pty|socket=PATH|file=PATH; rng [source=FILE].
    #[arg(value_name = "OPTS", default_value = "")]
    pub options: String,
    /// The unix socket to listen on for the vhost-user frontend.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Serve one frontend, then exit.
    #[arg(long)]
    pub once: bool,
    /// Seccomp filters on every thread (main, protocol, queue threads):
    /// on (refused calls fail with EPERM), log (allowed, logged by the
    /// kernel: to find what a list lacks) or off.
    #[arg(long, value_name = "MODE", default_value = "on")]
    pub seccomp: SeccompMode,
    /// Once the device is open and the socket bound, run as this user and
    /// group (numbers), without supplementary groups: for a back-end
    /// started as root to open a TAP or a root-only disk.
    #[arg(long, value_name = "UID[:GID]")]
    pub user: Option<RunAs>,
}

/// The main thread's system calls once it accepts frontends, beyond every
/// thread's (`seccomp::RUNTIME`): accept one, close one it could not
/// serve. It starts each connection's protocol thread, so its filter also
/// allows that thread's calls and those of the queue threads it starts
/// ([`crate::protocol_lists`]). No `open`: a device lost to a bug is not
/// rebuilt, the back-end exits.
pub const MAIN_THREAD: &[i64] = &[libc::SYS_accept4, libc::SYS_accept, libc::SYS_close];

/// `kickvm backend` as a process: [`sandbox::at_start`], then [`run`].
pub fn main(args: &BackendArgs) -> u8 {
    if let Err(e) = sandbox::at_start() {
        kickvm_virtio::note!("kickvm backend: cannot set up the sandbox: {e}");
        return 1;
    }
    run(args)
}

/// Runs the back-end; returns the process exit status. Set-up mistakes are
/// one line on stderr.
pub fn run(args: &BackendArgs) -> u8 {
    fn fail(msg: impl std::fmt::Display) -> u8 {
        kickvm_virtio::note!("kickvm backend: {msg}");
        1
    }
    let spec = match DeviceSpec::parse(args.device, &args.options) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if let (Some(who), DeviceSpec::Net(n)) = (args.user, &spec) {
        if let Err(e) = sandbox::check_tap_owner(&n.tap, n.queues, who) {
            return fail(e);
        }
    }
    let mut device = match spec.build() {
        Ok(d) => Some(d),
        Err(e) => return fail(e),
    };
    let listener = match listen(&args.socket) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {}: {e}", args.socket.display())),
    };
    if let Some(who) = args.user {
        if let Err(e) = sandbox::drop_user(who) {
            return fail(e.to_string());
        }
    }
    let mut lists = vec![MAIN_THREAD];
    lists.extend(device.as_deref().map(crate::protocol_lists).unwrap_or_default());
    if let Err(e) = seccomp::apply("main", &lists, args.seccomp) {
        return fail(e);
    }
    #[cfg(test)]
    crate::test_hooks::run(crate::test_hooks::Thread::Main);
    log::info!("serving {:?} on {}", args.device, args.socket.display());
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("cannot accept a frontend: {e}");
                continue;
            }
        };
        let Some(dev) = device.take() else {
            return fail("the device was lost serving the last frontend (a bug: please report it); exiting");
        };
        // Fresh per connection, like everything but the device.
        let runtime = Runtime::with_seccomp(ThreadingMode::PerQueue, args.seccomp);
        device = crate::serve_with(stream, dev, runtime, args.seccomp);
        if args.once {
            return 0;
        }
    }
}

/// Binds `path`, replacing a stale socket left by an earlier back-end
/// (never any other kind of file).
fn listen(path: &std::path::Path) -> std::io::Result<UnixListener> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "exists and is not a socket"));
        }
    }
    UnixListener::bind(path)
}
