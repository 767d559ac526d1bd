//! `kickvm backend` as the launcher runs it ([`kickvm_vhost::cli::run`]):
//! it listens, serves a frontend, and with `--once` exits 0; set-up
//! mistakes end it with status 1.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::*;
use kickvm_virtio::driver::Buf;
use kickvm_vhost::cli::{run, BackendArgs};
use kickvm_vhost::DeviceKind;

fn args(device: DeviceKind, options: &str, socket: std::path::PathBuf) -> BackendArgs {
    BackendArgs { device, options: options.into(), socket, once: true, seccomp: Default::default(), user: None }
}

#[test]
fn serves_io_then_exits_with_once() {
    init_log();
    let dir = Scratch::new("cli-io");
    let socket = dir.path("rng.sock");
    // A stale socket from an earlier back-end is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let stale = std::fs::metadata(&socket).unwrap().ino();
    let a = args(DeviceKind::Rng, "", socket.clone());
    let backend = std::thread::spawn(move || run(&a));
    let end = Instant::now() + T;
    while std::fs::metadata(&socket).ok().is_none_or(|m| m.ino() == stale) {
        assert!(Instant::now() < end, "the back-end listens");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut f = Front::connect(&socket, 1 << 20, u64::MAX);
    f.add_queue(0, 16);
    let buf = f.guest.alloc(32, 16);
    f.queues[0].post(&[Buf::inb(buf, 32)]).unwrap();
    f.queues[0].kick();
    assert_eq!(f.queues[0].wait_used(T).map(|(_, l)| l), Some(32));
    drop(f);
    assert_eq!(backend.join().unwrap(), 0);
}

#[test]
fn setup_mistakes_end_with_status_1() {
    init_log();
    let dir = Scratch::new("cli-bad");
    assert_eq!(run(&args(DeviceKind::Blk, "readonly=on", dir.path("a.sock"))), 1, "no path=");
    assert_eq!(run(&args(DeviceKind::Blk, &format!("path={}", dir.path("missing.img").display()), dir.path("b.sock"))), 1);
    let not_a_socket = dir.path("file");
    std::fs::write(&not_a_socket, b"keep me").unwrap();
    assert_eq!(run(&args(DeviceKind::Rng, "", not_a_socket.clone())), 1, "never replaces a file that is not a socket");
    assert_eq!(std::fs::read(&not_a_socket).unwrap(), b"keep me");
}
