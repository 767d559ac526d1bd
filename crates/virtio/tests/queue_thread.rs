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
    // A new thread names itself once it runs; until then it carries this
    // thread's name (slow on a loaded machine): wait until none does.
    let wait = || {
        let me = std::fs::read_to_string("/proc/thread-self/comm").unwrap().trim().to_string();
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while thread_names().iter().filter(|n| **n == me).count() > 1 && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
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

/// A harness on an rng device named `name` whose queue threads poll as
/// `poll` says.
fn rng_polling(name: &str, poll: kickvm_virtio::poll::Poll) -> Harness {
    let dev = Rng::new(name, RngConfig::default()).unwrap();
    kickvm_virtio::VirtioDevice::state(&dev).set_poll(poll);
    Harness::start(Box::new(dev), HarnessOpts::default()).unwrap()
}

/// Posts one request without kicking; true if the device serves it
/// within `within` anyway.
fn served_without_kick(h: &mut Harness, within: Duration) -> bool {
    let a = h.guest.alloc(64, 16);
    h.queues[0].post(&[Buf::inb(a, 64)]).unwrap();
    h.queues[0].enable_interrupts();
    if h.queues[0].wait_used(within).is_some() {
        return true;
    }
    // Not served: kick, so the next round starts from a queue at rest.
    h.queues[0].kick();
    h.queues[0].wait_used(T).expect("served after the kick");
    false
}

/// With polling, a request the guest posts right after a completion is
/// taken from the ring without a kick (no guest exit, no thread
/// wake-up); without it, the thread sleeps until kicked.
#[test]
fn a_request_posted_within_the_poll_window_is_taken_without_a_kick() {
    use kickvm_virtio::poll::Poll;
    for (name, poll, want) in [("rngpoll0", Poll::Fixed(Duration::from_millis(1)), true), ("rngpoll1", Poll::Off, false)] {
        let mut h = rng_polling(name, poll);
        let mut taken = 0;
        for _ in 0..20 {
            // A kicked request, completed: the thread is now polling.
            let a = h.guest.alloc(64, 16);
            h.queues[0].post(&[Buf::inb(a, 64)]).unwrap();
            h.queues[0].enable_interrupts();
            h.queues[0].kick();
            h.queues[0].wait_used(T).expect("request completes");
            if served_without_kick(&mut h, Duration::from_millis(50)) {
                taken += 1;
            }
        }
        let s = h.device.state().queue(0);
        eprintln!("{poll}: {taken} of 20 taken without a kick; polled {}", s.polled);
        if want {
            // A loaded machine may deschedule the test for longer than the
            // window now and then; most rounds must still be caught.
            assert!(taken >= 10, "{poll}: only {taken} of 20 requests were polled");
            assert!(s.polled >= taken, "{s:?}");
        } else {
            // Only a request that beats the thread's last look at the ring
            // before it sleeps is taken without a kick.
            assert_eq!(s.polled, 0, "{poll}: polled");
            assert!(taken <= 5, "{poll}: {taken} of 20 requests served without a kick");
        }
    }
}

/// The CPU time thread `name` of this process has used (schedstat, ns).
fn thread_cpu(name: &str) -> Duration {
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim() == name {
            let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap();
            let ns: u64 = stat.split_whitespace().next().unwrap().parse().unwrap();
            return Duration::from_nanos(ns);
        }
    }
    panic!("no thread {name}");
}

/// An idle queue costs no CPU however it polls: one window after its last
/// request, then it sleeps on the kick.
#[test]
fn an_idle_polling_queue_sleeps() {
    use kickvm_virtio::poll::Poll;
    for (name, poll) in [("rngidle0", Poll::Fixed(Duration::from_millis(1))), ("rngidle1", Poll::Adaptive(Duration::from_millis(1)))] {
        let mut h = rng_polling(name, poll);
        // Requests close together (grows an adaptive window), then idle.
        for _ in 0..50 {
            let a = h.guest.alloc(64, 16);
            h.queues[0].post(&[Buf::inb(a, 64)]).unwrap();
            h.queues[0].kick();
            h.queues[0].wait_used(T).expect("request completes");
        }
        std::thread::sleep(Duration::from_millis(20));
        let before = thread_cpu(&format!("{name}-q0"));
        // The clock this reads does see the polling (a window after each
        // request at least).
        assert!(before > Duration::from_micros(500), "{poll}: {before:?} of CPU for 50 requests");
        std::thread::sleep(Duration::from_millis(300));
        let used = thread_cpu(&format!("{name}-q0")) - before;
        eprintln!("{poll}: {used:?} of CPU in 300 ms idle");
        assert!(used < Duration::from_millis(5), "{poll}: an idle queue thread used {used:?} in 300 ms");
    }
}
