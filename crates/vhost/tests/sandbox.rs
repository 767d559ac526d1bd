//! The back-end's sandbox where it acts: a queue thread started by a real
//! frontend connection is refused what it never needs, and the process
//! set-up of `kickvm backend` (`sandbox::at_start`) closes inherited fds
//! and forbids new privileges and core dumps. (The main and protocol
//! threads are shown refused by the crate's own tests, through hooks that
//! run on those very threads.)

mod common;

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use common::*;
use kickvm_virtio::seccomp;
use kickvm_virtio::{ActivateError, DeviceState, QueueCtx, QueueWorker, Stopped, VirtioDevice, Wait};

type Outcome = ([(i64, i32); 3], String);

/// A device whose one queue's worker, on the queue thread the back-end
/// starts for it, tries to make a socket, open a file and start a
/// program, and reports what it got. Its list is the rng's (`readv`).
struct Probe {
    report: Arc<Mutex<Option<Sender<Outcome>>>>,
    state: Arc<DeviceState>,
}

struct ProbeWorker(Arc<Mutex<Option<Sender<Outcome>>>>);

impl QueueWorker for ProbeWorker {
    fn serve(&mut self, _q: &mut QueueCtx) -> Result<Wait, Stopped> {
        if let Some(tx) = self.0.lock().unwrap().take() {
            let _ = tx.send(seccomp::attempt_forbidden());
        }
        Ok(Wait::Kick)
    }
}

impl VirtioDevice for Probe {
    fn name(&self) -> &str {
        "probe0"
    }
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_RNG
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![64]
    }
    fn features(&self) -> u64 {
        1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1
    }
    fn activate(&mut self, _features: u64) -> Result<Vec<Box<dyn QueueWorker>>, ActivateError> {
        Ok(vec![Box::new(ProbeWorker(self.report.clone()))])
    }
    fn syscalls(&self) -> &'static [i64] {
        kickvm_virtio::rng::SYSCALLS
    }
    fn state(&self) -> Arc<DeviceState> {
        self.state.clone()
    }
}

#[test]
fn a_queue_thread_of_the_backend_is_refused_sockets_files_and_programs() {
    init_log();
    let dir = Scratch::new("sandbox-queue");
    let (tx, rx) = channel();
    let probe = Probe { report: Arc::new(Mutex::new(Some(tx))), state: DeviceState::new(1) };
    let be = start_backend(&dir, Box::new(probe), 1);
    let mut f = Front::connect(&be.socket, 1 << 20, u64::MAX);
    f.add_queue(0, 64);
    f.queues[0].kick();
    let (r, name) = rx.recv_timeout(T).expect("the queue thread ran the worker");
    assert_eq!(name, "probe0-q0");
    assert_eq!(r, seccomp::ALL_REFUSED);
}

/// Runs this test binary again, as `kickvm backend` starts: the child
/// inherits an fd, calls `sandbox::at_start`, and reports.
#[test]
fn at_start_closes_inherited_fds_and_forbids_privileges_and_dumps() {
    if let Ok(fd) = std::env::var("KICKVM_SANDBOX_CHILD_FD") {
        let fd: i32 = fd.parse().unwrap();
        kickvm_vhost::sandbox::at_start().unwrap();
        // SAFETY: fcntl and prctl with integer arguments.
        let (open, nnp, dumpable) = unsafe {
            (libc::fcntl(fd, libc::F_GETFD), libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0), libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0))
        };
        println!("child: fd {fd} open={} no_new_privs={nnp} dumpable={dumpable}", open != -1);
        std::process::exit(if open == -1 && nnp == 1 && dumpable == 0 { 0 } else { 1 });
    }
    let dir = Scratch::new("sandbox-fds");
    let file = std::fs::File::create(dir.path("inherited")).unwrap();
    // An fd without close-on-exec, as a careless parent would pass it.
    // SAFETY: dup of an fd we own; the copy is closed below.
    let fd = unsafe { libc::dup(std::os::fd::AsRawFd::as_raw_fd(&file)) };
    assert!(fd > 2);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "at_start_closes_inherited_fds_and_forbids_privileges_and_dumps", "--nocapture", "--test-threads=1"])
        .env("KICKVM_SANDBOX_CHILD_FD", fd.to_string())
        .output()
        .unwrap();
    // SAFETY: our copy.
    unsafe { libc::close(fd) };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("child: fd {fd} open=false no_new_privs=1 dumpable=0")), "{text}");
}
