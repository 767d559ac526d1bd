//! rng and console back-ends through a vhost-user frontend: the bytes
//! arrive.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kickvm_virtio::driver::Buf;

const MEM: usize = 2 << 20;

#[test]
fn rng_bytes_arrive() {
    init_log();
    let dir = Scratch::new("rng");
    let dev = kickvm_vhost::DeviceSpec::parse(kickvm_vhost::DeviceKind::Rng, "").unwrap().build().unwrap();
    let be = start_backend(&dir, dev, 1);
    let mut f = Front::connect(&be.socket, MEM, u64::MAX);
    f.add_queue(0, 64);
    let buf = f.guest.alloc(4096, 16);
    f.queues[0].post(&[Buf::inb(buf, 4096)]).unwrap();
    f.queues[0].kick();
    let (_, len) = f.queues[0].wait_used(T).expect("entropy arrives");
    assert_eq!(len, 4096);
    assert!(f.guest.read(buf, 4096).iter().any(|&b| b != 0), "random bytes, not zeros");
}

#[test]
fn console_output_arrives_in_its_file() {
    init_log();
    let dir = Scratch::new("console");
    let out = dir.path("console.out");
    let opts = format!("file={}", out.display());
    let dev = kickvm_vhost::DeviceSpec::parse(kickvm_vhost::DeviceKind::Console, &opts).unwrap().build().unwrap();
    let be = start_backend(&dir, dev, 1);
    let mut f = Front::connect(&be.socket, MEM, u64::MAX);
    // virtio-console: receiveq 0, transmitq 1.
    f.add_queue(0, 64);
    f.add_queue(1, 64);
    let text = b"hello from the guest over vhost-user\n";
    let a = f.guest.alloc_bytes(text);
    f.queues[1].post(&[Buf::out(a, text.len() as u32)]).unwrap();
    f.queues[1].kick();
    f.queues[1].wait_used(T).expect("output consumed");
    let end = Instant::now() + T;
    loop {
        let got = std::fs::read(&out).unwrap_or_default();
        if got == text {
            break;
        }
        assert!(Instant::now() < end, "console file holds {:?}", String::from_utf8_lossy(&got));
        std::thread::sleep(Duration::from_millis(10));
    }
}
