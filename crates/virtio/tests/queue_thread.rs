//! The queue thread's interrupt discipline and threading modes, seen from
//! the guest driver's side (with the rng device as the simplest real
//! device).

use std::time::Duration;

use kickvm_virtio::driver::{Buf, Harness, HarnessOpts};
use kickvm_virtio::queue::NOTIFY_BATCH;
use kickvm_virtio::rng::{Rng, RngConfig};
use kickvm_virtio::{Runtime, ThreadingMode};

const T: Duration = Duration::from_secs(5);
const EVENT_IDX: u64 = 1 << 29;

fn rng(opts: HarnessOpts) -> Harness {
    Harness::start(Box::new(Rng::new("rng0", RngConfig::default()).unwrap()), opts).unwrap()
}

/// Posts `n` 64-byte requests with one kick and waits for all of them.
fn burst(h: &mut Harness, n: usize) {
    for _ in 0..n {
        let a = h.guest.alloc(64, 16);
        h.queues[0].add(&[Buf::inb(a, 64)]).map(|head| h.queues[0].publish(head)).unwrap();
    }
    h.queues[0].kick();
    for _ in 0..n {
        h.queues[0].wait_used(T).expect("request completes");
    }
    std::thread::sleep(Duration::from_millis(50));
}

#[test]
fn a_burst_gets_one_interrupt_per_batch_not_per_descriptor() {
    let mut h = rng(HarnessOpts::default());
    h.queues[0].enable_interrupts();
    burst(&mut h, 200);
    let c = h.device.state().queue(0);
    assert_eq!(c.chains, 200);
    assert!(c.interrupts >= 1, "the guest asked and got an interrupt");
    assert!(
        c.interrupts <= 200 / u64::from(NOTIFY_BATCH) + 1,
        "{} interrupts for 200 chains",
        c.interrupts
    );
}

#[test]
fn no_interrupt_when_the_guest_did_not_ask_with_event_idx() {
    let mut h = rng(HarnessOpts::default());
    assert_ne!(h.features & EVENT_IDX, 0);
    // used_event behind the used index: the guest wants no interrupt for
    // the next 65535 entries.
    h.queues[0].set_used_event(u16::MAX);
    burst(&mut h, 10);
    let c = h.device.state().queue(0);
    assert_eq!(c.chains, 10);
    assert_eq!(c.interrupts, 0);
    assert!(c.suppressed >= 1);
    assert_eq!(h.queues[0].calls(), 0);
}

#[test]
fn no_interrupt_when_the_guest_set_no_interrupt_without_event_idx() {
    let mut h = rng(HarnessOpts { driver_features: !EVENT_IDX, ..Default::default() });
    assert_eq!(h.features & EVENT_IDX, 0);
    h.queues[0].set_no_interrupt(true);
    burst(&mut h, 10);
    assert_eq!(h.device.state().queue(0).interrupts, 0);
    h.queues[0].set_no_interrupt(false);
    burst(&mut h, 1);
    assert_eq!(h.device.state().queue(0).interrupts, 1);
}

#[test]
fn one_interrupt_per_request_when_the_guest_waits_for_each() {
    let mut h = rng(HarnessOpts::default());
    for i in 1..=20u64 {
        h.queues[0].enable_interrupts();
        burst(&mut h, 1);
        assert_eq!(h.queues[0].calls(), i);
    }
}

fn thread_names() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn threads_are_named_after_device_and_queue_in_each_mode() {
    // Tests in this binary run in parallel; names are checked for presence.
    let block = |name: &str, queues: u16, rt| {
        let path = std::env::temp_dir().join(format!("kickvm-qt-{}-{name}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let mut c = kickvm_virtio::block::BlockConfig::new(&path);
        c.num_queues = queues;
        let dev = kickvm_virtio::block::Block::new(name, c).unwrap();
        let h = Harness::start_with_runtime(Box::new(dev), HarnessOpts::default(), rt).unwrap();
        let _ = std::fs::remove_file(&path);
        h
    };
    let wait = || std::thread::sleep(Duration::from_millis(50));
    {
        let _h = block("qtpq", 3, Runtime::new(ThreadingMode::PerQueue));
        wait();
        let names = thread_names();
        for q in 0..3 {
            assert!(names.contains(&format!("qtpq-q{q}")), "{names:?}");
        }
    }
    {
        let _h = block("qtpd", 3, Runtime::new(ThreadingMode::PerDevice));
        wait();
        let names = thread_names();
        assert!(names.contains(&"qtpd".to_string()), "{names:?}");
        assert!(!names.iter().any(|n| n.starts_with("qtpd-q")), "{names:?}");
    }
    {
        let rt = Runtime::new(ThreadingMode::Single);
        let mut a = block("qtsa", 2, rt.clone());
        let mut b = block("qtsb", 2, rt.clone());
        wait();
        let names = thread_names();
        assert!(!names.iter().any(|n| n.starts_with("qtsa") || n.starts_with("qtsb")), "{names:?}");
        assert!(names.contains(&"kickvm-io".to_string()), "{names:?}");
        // One thread serves both devices; stopping one leaves the other served.
        a.reset();
        let hdr = {
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&kickvm_virtio::block::VIRTIO_BLK_T_GET_ID.to_le_bytes());
            b.guest.alloc_bytes(&hdr)
        };
        let id = b.guest.alloc(20, 16);
        let st = b.guest.alloc(1, 1);
        b.queues[1].post(&[Buf::out(hdr, 16), Buf::inb(id, 20), Buf::inb(st, 1)]).unwrap();
        b.queues[1].kick();
        assert_eq!(b.queues[1].wait_used(T).map(|u| u.1), Some(21));
    }
}
