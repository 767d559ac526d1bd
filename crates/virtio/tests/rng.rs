//! virtio-rng against the real kernel random source.

use std::time::{Duration, Instant};

use kickvm_virtio::driver::{Buf, Harness, HarnessOpts};
use kickvm_virtio::rng::{Rng, RngConfig, MAX_BYTES_PER_REQUEST};
use kickvm_virtio::ThreadingMode;

const T: Duration = Duration::from_secs(5);

fn start(mode: ThreadingMode, cfg: RngConfig) -> Harness {
    let rng = Rng::new("rng0", cfg).expect("open /dev/urandom");
    Harness::start(Box::new(rng), HarnessOpts { mode, ..Default::default() }).expect("activate")
}

#[test]
fn fills_guest_buffers_with_random_bytes_in_every_mode() {
    for mode in [ThreadingMode::PerQueue, ThreadingMode::PerDevice, ThreadingMode::Single] {
        let mut h = start(mode, RngConfig::default());
        let buf = h.guest.alloc(4096, 16);
        let head = h.queues[0].post(&[Buf::inb(buf, 4096)]).unwrap();
        h.queues[0].enable_interrupts();
        h.queues[0].kick();
        let (used, len) = h.queues[0].wait_used(T).expect("rng request completes");
        assert_eq!((used, len), (head, 4096), "{mode}");
        let data = h.guest.read(buf, 4096);
        assert!(data.iter().filter(|&&b| b == 0).count() < 100, "{mode}: bytes look random");
        assert_eq!(h.queues[0].wait_calls(1, T), 1, "{mode}: one interrupt for one request");
        std::thread::sleep(Duration::from_millis(20));
        let c = h.device.state().queue(0);
        assert_eq!(c.chains, 1, "{mode}");
        assert_eq!(c.bytes, 4096, "{mode}");
        assert!(c.kicks >= 1, "{mode}");
        assert_eq!(c.interrupts, 1, "{mode}: one interrupt for one request");
    }
}

#[test]
fn caps_bytes_per_request() {
    let mut h = start(ThreadingMode::PerQueue, RngConfig::default());
    let big = 4 * MAX_BYTES_PER_REQUEST as u32;
    let buf = h.guest.alloc(u64::from(big), 16);
    h.queues[0].post(&[Buf::inb(buf, big)]).unwrap();
    h.queues[0].kick();
    let (_, len) = h.queues[0].wait_used(T).expect("completes");
    assert_eq!(u64::from(len), MAX_BYTES_PER_REQUEST);
}

#[test]
fn rate_limit_slows_the_guest_down() {
    let mut h = start(ThreadingMode::PerQueue, RngConfig { rate_limit: Some(64 * 1024), ..Default::default() });
    let start = Instant::now();
    let mut total = 0u64;
    // The bucket starts full (one second's worth); ask for three seconds'.
    while total < 3 * 64 * 1024 / 2 + 64 * 1024 {
        let buf = h.guest.alloc(16384, 16);
        h.queues[0].post(&[Buf::inb(buf, 16384)]).unwrap();
        h.queues[0].kick();
        let (_, len) = h.queues[0].wait_used(T).expect("completes");
        total += u64::from(len);
    }
    let secs = start.elapsed().as_secs_f64();
    assert!(secs > 1.0, "served {total} bytes in {secs:.2}s, faster than 64 KiB/s allows");
}

#[test]
fn a_request_without_writable_buffer_is_counted_and_returned() {
    let mut h = start(ThreadingMode::PerQueue, RngConfig::default());
    let buf = h.guest.alloc(64, 16);
    let bad = h.queues[0].post(&[Buf::out(buf, 64)]).unwrap();
    let good = h.guest.alloc(64, 16);
    let ok = h.queues[0].post(&[Buf::inb(good, 64)]).unwrap();
    h.queues[0].kick();
    assert_eq!(h.queues[0].wait_used(T), Some((bad, 0)));
    assert_eq!(h.queues[0].wait_used(T), Some((ok, 64)));
    assert_eq!(h.device.state().queue(0).errors, 1);
}

#[test]
fn reset_stops_the_thread_and_reactivation_serves_again() {
    let mut h = start(ThreadingMode::PerQueue, RngConfig::default());
    let t = Instant::now();
    h.reset();
    assert!(t.elapsed() < Duration::from_millis(500), "stop took {:?}", t.elapsed());
    let rng = Rng::new("rng0", RngConfig::default()).unwrap();
    let mut h = Harness::start(Box::new(rng), HarnessOpts::default()).unwrap();
    let buf = h.guest.alloc(32, 16);
    h.queues[0].post(&[Buf::inb(buf, 32)]).unwrap();
    h.queues[0].kick();
    assert!(h.queues[0].wait_used(T).is_some());
}
