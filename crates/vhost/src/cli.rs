//! `kickvm backend`: the command line, and the accept loop around
//! [`crate::serve`].

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use kickvm_virtio::seccomp::SeccompMode;
use kickvm_virtio::{Runtime, ThreadingMode};

use crate::options::{DeviceKind, DeviceSpec};

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
another: when one disconnects the next may connect (QEMU's reconnect=).";

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
    /// Seccomp filters on the queue threads: on (refused calls fail with
    /// EPERM), log (allowed, logged by the kernel) or off.
    #[arg(long, value_name = "MODE", default_value = "on")]
    pub seccomp: SeccompMode,
}

/// Runs the back-end; returns the process exit status. Set-up mistakes are
/// one line on stderr.
pub fn run(args: &BackendArgs) -> u8 {
    let fail = |msg: String| {
        eprintln!("kickvm backend: {msg}");
        1
    };
    let spec = match DeviceSpec::parse(args.device, &args.options) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    let mut device = match spec.build() {
        Ok(d) => Some(d),
        Err(e) => return fail(e.to_string()),
    };
    let listener = match listen(&args.socket) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {}: {e}", args.socket.display())),
    };
    log::info!("serving {:?} on {}", args.device, args.socket.display());
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("cannot accept a frontend: {e}");
                continue;
            }
        };
        let dev = match device.take() {
            Some(d) => d,
            None => match spec.build() {
                Ok(d) => d,
                Err(e) => return fail(e.to_string()),
            },
        };
        // Fresh per connection, like everything but the device.
        let runtime = Runtime::with_seccomp(ThreadingMode::PerQueue, args.seccomp);
        device = crate::serve_with(stream, dev, runtime);
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
