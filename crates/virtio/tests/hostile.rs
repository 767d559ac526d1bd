//! A hostile guest, through the same paths a guest uses (the test driver
//! plays the guest; every threading mode): nothing it writes into a ring
//! may abort, hang or flood the device servers.
//!
//! - chains whose walk would size host work or memory by a guest count
//!   (a 65 535-entry looping indirect table, indirect tables the driver
//!   did not negotiate, chains longer than the queue);
//! - reset and teardown in bounded time whatever the guest does (a console
//!   socket nobody connects to, a ring the guest keeps full, a write-zeroes
//!   request over the whole disk, 64 times, on a file system without
//!   ZERO_RANGE);
//! - any number of reset / re-activate cycles, for every device and queue
//!   count;
//! - a worker that panics is contained to its device.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kickvm_virtio::block::*;
use kickvm_virtio::console::{Backend, Console};
use kickvm_virtio::driver::{Buf, DriverQueue, Harness, HarnessOpts, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT};
use kickvm_virtio::rng::{Rng, RngConfig};
use kickvm_virtio::{
    ActivateError, DeviceState, QueueCtx, QueueWorker, Runtime, Stopped, ThreadingMode, VirtioDevice, Wait,
};
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(5);
const MODES: [ThreadingMode; 3] = [ThreadingMode::PerQueue, ThreadingMode::PerDevice, ThreadingMode::Single];
/// What "bounded" means for a reset in these tests. Measured: a few
/// milliseconds at most; the figure is generous for a loaded CI machine.
const RESET_BOUND: Duration = Duration::from_millis(500);
const INDIRECT_DESC: u32 = 28;

fn bit(b: u32) -> u64 {
    1u64 << b
}

struct TempFile(PathBuf);

impl TempFile {
    fn new(dir: &std::path::Path, name: &str, len: u64) -> TempFile {
        let p = dir.join(format!("kickvm-hostile-{}-{name}", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(len).unwrap();
        TempFile(p)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn blk(file: &TempFile, queues: u16, mode: ThreadingMode, driver_features: u64) -> Harness {
    let mut c = BlockConfig::new(&file.0);
    c.num_queues = queues;
    let dev = Block::new("blk0", c).unwrap();
    Harness::start(Box::new(dev), HarnessOpts { mode, driver_features, ..Default::default() }).unwrap()
}

/// Posts a valid 512-byte read on queue `qi` and waits for its completion.
fn read_ok(h: &mut Harness, qi: usize) {
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    let hdr_a = h.guest.alloc_bytes(&hdr);
    let data = h.guest.alloc(512, 512);
    let status = h.guest.alloc_bytes(&[0xff]);
    h.queues[qi].post(&[Buf::out(hdr_a, 16), Buf::inb(data, 512), Buf::inb(status, 1)]).unwrap();
    h.queues[qi].kick();
    let (_, len) = h.queues[qi].wait_used(T).unwrap_or_else(|| panic!("queue {qi} serves a valid read"));
    assert_eq!((len, h.guest.read(status, 1)[0]), (513, VIRTIO_BLK_S_OK), "queue {qi}");
}

/// Publishes `head` on queue 0 and expects it back unused with one more
/// error counted, the device still serving.
fn expect_refused(h: &mut Harness, head: u16) {
    let before = h.device.state().queue(0).errors;
    h.queues[0].publish(head);
    h.queues[0].kick();
    assert_eq!(h.queues[0].wait_used(T), Some((head, 0)), "the bad chain is returned unused");
    assert_eq!(h.device.state().queue(0).errors, before + 1);
    assert!(!h.needs_reset());
    read_ok(h, 0);
}

/// Resident set size of this process, in KiB.
fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap()
}

// ---------------------------------------------------------------- chains

/// The review's abort: one indirect descriptor to a 65 535-entry table
/// whose entries loop (i → i+1, last → 0), one byte each. Before the fix
/// the walk counted with a `u16` that never exceeded the table size and
/// pushed iovecs until the allocator gave up at 2^32 of them.
#[test]
fn looping_indirect_table_of_65535_entries() {
    let dir = std::env::temp_dir();
    for mode in MODES {
        let file = TempFile::new(&dir, "ind65535", 1 << 20);
        let mut h = blk(&file, 1, mode, !0);
        let entries: u16 = 0xffff;
        let table = h.guest.alloc(u64::from(entries) * 16, 16);
        let byte = h.guest.alloc(1, 1);
        let mem = h.guest.mem().clone();
        for i in 0..entries {
            let next = if i == entries - 1 { 0 } else { i + 1 };
            DriverQueue::write_indirect_desc(&mem, table, i, byte.0, 1, VIRTQ_DESC_F_NEXT, next);
        }
        let rss = rss_kib();
        let d = h.queues[0].take_descriptor().unwrap();
        h.queues[0].write_desc(d, table.0, u32::from(entries) * 16, VIRTQ_DESC_F_INDIRECT, 0);
        expect_refused(&mut h, d);
        // The same table cut to the queue's size still loops: refused too.
        let d = h.queues[0].take_descriptor().unwrap();
        h.queues[0].write_desc(d, table.0, 256 * 16, VIRTQ_DESC_F_INDIRECT, 0);
        DriverQueue::write_indirect_desc(&mem, table, 255, byte.0, 1, VIRTQ_DESC_F_NEXT, 0);
        expect_refused(&mut h, d);
        assert!(rss_kib() < rss + 16 * 1024, "{mode}: host memory stays bounded");
    }
}

#[test]
fn indirect_descriptor_refused_unless_negotiated() {
    let dir = std::env::temp_dir();
    for mode in MODES {
        let file = TempFile::new(&dir, "ind-neg", 1 << 20);
        let mut h = blk(&file, 1, mode, !bit(INDIRECT_DESC));
        assert_eq!(h.features & bit(INDIRECT_DESC), 0);
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        let hdr_a = h.guest.alloc_bytes(&hdr);
        let data = h.guest.alloc(512, 512);
        let status = h.guest.alloc_bytes(&[0xff]);
        let head = h.queues[0]
            .add_indirect(&mut h.guest, &[Buf::out(hdr_a, 16), Buf::inb(data, 512), Buf::inb(status, 1)])
            .unwrap();
        expect_refused(&mut h, head);
        assert_eq!(h.guest.read(status, 1)[0], 0xff, "{mode}: nothing was done for the refused chain");
    }
}

/// A chain may have as many descriptors as the queue's maximum size, its
/// indirect table's included (what Linux builds for a 254-segment block
/// request); one more is refused.
#[test]
fn chain_of_the_queue_size_is_served_and_one_more_refused() {
    let dir = std::env::temp_dir();
    for mode in MODES {
        let file = TempFile::new(&dir, "maxchain", 1 << 20);
        let mut h = blk(&file, 1, mode, !0);
        for (segments, ok) in [(254u32, true), (255, false)] {
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
            let mut bufs = vec![Buf::out(h.guest.alloc_bytes(&hdr), 16)];
            for _ in 0..segments {
                bufs.push(Buf::inb(h.guest.alloc(512, 512), 512));
            }
            let status = h.guest.alloc_bytes(&[0xff]);
            bufs.push(Buf::inb(status, 1));
            let head = h.queues[0].add_indirect(&mut h.guest, &bufs).unwrap();
            if ok {
                h.queues[0].publish(head);
                h.queues[0].kick();
                assert_eq!(h.queues[0].wait_used(T), Some((head, segments * 512 + 1)), "{mode}");
                assert_eq!(h.guest.read(status, 1)[0], VIRTIO_BLK_S_OK);
            } else {
                expect_refused(&mut h, head);
            }
        }
    }
}

// ------------------------------------------------- reset in bounded time

/// Resets the harness's device and returns how long it took.
fn timed_reset(h: &mut Harness) -> Duration {
    let t = Instant::now();
    h.reset();
    let took = t.elapsed();
    eprintln!("reset of {} took {took:?}", h.device.name());
    took
}

/// A console on a unix socket nobody connects to: its receive thread waits
/// for a client. A reset must not wait for one.
#[test]
fn console_socket_without_a_client_resets_at_once() {
    for mode in MODES {
        let path = std::env::temp_dir().join(format!("kickvm-hostile-{}-{mode}.sock", std::process::id()));
        let dev = Console::new("con0", Backend::Socket(path.clone())).unwrap();
        let mut h = Harness::start(Box::new(dev), HarnessOpts { mode, ..Default::default() }).unwrap();
        let buf = h.guest.alloc(64, 16);
        h.queues[0].post(&[Buf::inb(buf, 64)]).unwrap();
        h.queues[0].kick();
        std::thread::sleep(Duration::from_millis(50));
        let took = timed_reset(&mut h);
        assert!(took < RESET_BOUND, "{mode}: reset took {took:?}");
        drop(h);
        assert!(!path.exists(), "the socket file is removed with the device");
    }
}

#[test]
fn console_socket_never_replaces_a_file_it_did_not_make() {
    let path = std::env::temp_dir().join(format!("kickvm-hostile-{}-regular", std::process::id()));
    std::fs::write(&path, b"precious").unwrap();
    let e = Console::new("con0", Backend::Socket(path.clone())).err().expect("refused");
    assert!(e.to_string().contains("exists and is not a socket"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();

    // A socket someone still listens on is not taken over either.
    let path = std::env::temp_dir().join(format!("kickvm-hostile-{}-live.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let e = Console::new("con0", Backend::Socket(path.clone())).err().expect("refused");
    assert!(e.to_string().contains("another program listens"), "{e}");
    drop(live);
    // Once its owner is gone, the stale socket file is reused.
    let dev = Console::new("con0", Backend::Socket(path.clone())).expect("stale socket replaced");
    drop(dev);
    assert!(!path.exists());
}

/// Another vCPU keeps the ring full: the guest republishes the same valid
/// request as fast as the device completes it. The queue thread must stop
/// between two requests, not when the guest stops.
#[test]
fn reset_while_the_guest_keeps_the_ring_full() {
    let dir = std::env::temp_dir();
    for mode in MODES {
        let file = TempFile::new(&dir, "busy", 1 << 20);
        let mut h = blk(&file, 1, mode, !bit(29)); // no EVENT_IDX: simpler ring
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        let hdr_a = h.guest.alloc_bytes(&hdr);
        let data = h.guest.alloc(512, 512);
        let status = h.guest.alloc_bytes(&[0xff]);
        let head = h.queues[0].post(&[Buf::out(hdr_a, 16), Buf::inb(data, 512), Buf::inb(status, 1)]).unwrap();
        let (size, avail, used) = (h.queues[0].size, h.queues[0].avail, h.queues[0].used);
        let mem = h.guest.mem().clone();
        for i in 0..size {
            mem.write_obj(head, GuestAddress(avail.0 + 4 + 2 * u64::from(i))).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let pusher = {
            let (stop, mem) = (stop.clone(), mem.clone());
            let kick = h.queues[0].setup().kick;
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let done: u16 = mem.read_obj(GuestAddress(used.0 + 2)).unwrap();
                    mem.write_obj(done.wrapping_add(size / 2), GuestAddress(avail.0 + 2)).unwrap();
                    let _ = kick.write(1);
                }
            })
        };
        // Let the device get busy.
        let start: u16 = mem.read_obj(GuestAddress(used.0 + 2)).unwrap();
        let t = Instant::now();
        while mem.read_obj::<u16>(GuestAddress(used.0 + 2)).unwrap().wrapping_sub(start) < 1000 {
            assert!(t.elapsed() < T, "{mode}: the device serves the busy ring");
        }
        let took = timed_reset(&mut h);
        stop.store(true, Ordering::Relaxed);
        pusher.join().unwrap();
        assert!(took < RESET_BOUND, "{mode}: reset took {took:?} while the guest kept the ring full");
    }
}

/// One write-zeroes request with 64 segments each covering the whole disk,
/// on tmpfs (no FALLOC_FL_ZERO_RANGE: zeroes are written). The request may
/// take long; a reset may not wait for it.
#[test]
fn reset_during_a_huge_write_zeroes_request() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipped: no /dev/shm (a tmpfs, which lacks ZERO_RANGE)");
        return;
    }
    for mode in MODES {
        let disk = 256u64 << 20;
        let file = TempFile::new(shm, "wz", disk);
        let mut h = blk(&file, 1, mode, !0);
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_WRITE_ZEROES.to_le_bytes());
        let mut segs = Vec::new();
        for _ in 0..MAX_SEGMENTS {
            segs.extend_from_slice(&0u64.to_le_bytes());
            segs.extend_from_slice(&((disk / SECTOR_SIZE) as u32).to_le_bytes());
            segs.extend_from_slice(&0u32.to_le_bytes()); // no UNMAP: zeroes must be written
        }
        let hdr_a = h.guest.alloc_bytes(&hdr);
        let segs_a = h.guest.alloc_bytes(&segs);
        let status = h.guest.alloc_bytes(&[0xff]);
        h.queues[0]
            .post(&[Buf::out(hdr_a, 16), Buf::out(segs_a, segs.len() as u32), Buf::inb(status, 1)])
            .unwrap();
        h.queues[0].kick();
        std::thread::sleep(Duration::from_millis(100));
        assert!(h.queues[0].pop_used().is_none(), "{mode}: still writing zeroes (else the test proves nothing)");
        let took = timed_reset(&mut h);
        assert!(took < RESET_BOUND, "{mode}: reset took {took:?} during a write-zeroes request");
    }
}

// ------------------------------------------------ reset / re-activate cycles

const CYCLES: usize = 20;

fn cycles(mut h: Harness, mut io: impl FnMut(&mut Harness), what: &str) {
    for cycle in 0..CYCLES {
        if cycle > 0 {
            h.restart().unwrap_or_else(|e| panic!("{what}: re-activation {cycle} failed: {e}"));
        }
        io(&mut h);
        assert!(!h.needs_reset(), "{what}: cycle {cycle}");
    }
    assert_eq!(h.device.state().total().errors, 0, "{what}");
}

#[test]
fn block_survives_reset_cycles() {
    let dir = std::env::temp_dir();
    for mode in MODES {
        for queues in [1u16, 2, 4] {
            let file = TempFile::new(&dir, &format!("cycles-{queues}"), 1 << 20);
            let h = blk(&file, queues, mode, !0);
            cycles(
                h,
                |h| {
                    for q in 0..usize::from(queues) {
                        read_ok(h, q);
                    }
                },
                &format!("blk {queues} queues, {mode}"),
            );
        }
    }
}

#[test]
fn rng_survives_reset_cycles() {
    for mode in MODES {
        let dev = Rng::new("rng0", RngConfig::default()).unwrap();
        let h = Harness::start(Box::new(dev), HarnessOpts { mode, ..Default::default() }).unwrap();
        cycles(
            h,
            |h| {
                let b = h.guest.alloc(64, 16);
                h.queues[0].post(&[Buf::inb(b, 64)]).unwrap();
                h.queues[0].kick();
                assert_eq!(h.queues[0].wait_used(T).map(|u| u.1), Some(64));
            },
            &format!("rng, {mode}"),
        );
    }
}

#[test]
fn console_survives_reset_cycles() {
    for mode in MODES {
        let out = TempFile::new(&std::env::temp_dir(), &format!("con-{mode}"), 0);
        let dev = Console::new("con0", Backend::File(out.0.clone())).unwrap();
        let h = Harness::start(Box::new(dev), HarnessOpts { mode, ..Default::default() }).unwrap();
        let mut n = 0u64;
        cycles(
            h,
            |h| {
                let b = h.guest.alloc_bytes(b"hello\n");
                h.queues[1].post(&[Buf::out(b, 6)]).unwrap();
                h.queues[1].kick();
                assert!(h.queues[1].wait_used(T).is_some());
                n += 6;
            },
            &format!("console, {mode}"),
        );
        assert_eq!(std::fs::metadata(&out.0).unwrap().len(), n, "{mode}: every cycle's output arrived");
    }
}

// ------------------------------------------------------------ worker panics

/// One queue; a 13-byte writable buffer makes its worker panic (a stand-in
/// for a device bug), anything else is filled with 0x5a.
struct Fragile {
    name: &'static str,
    counters: Arc<DeviceState>,
}

struct FragileWorker;

impl QueueWorker for FragileWorker {
    fn serve(&mut self, q: &mut QueueCtx) -> Result<Wait, Stopped> {
        while let Some(c) = q.pop() {
            assert!(c.writable.len() != 13, "a device bug");
            let n = c.writable.write_at(0, &vec![0x5a; c.writable.len() as usize]);
            q.add_used(c.head, n as u32);
        }
        Ok(Wait::Kick)
    }
}

impl VirtioDevice for Fragile {
    fn name(&self) -> &str {
        self.name
    }
    fn device_type(&self) -> u32 {
        4
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16]
    }
    fn features(&self) -> u64 {
        kickvm_virtio::device::COMMON_FEATURES
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, _features: u64) -> Result<Vec<Box<dyn QueueWorker>>, ActivateError> {
        Ok(vec![Box::new(FragileWorker)])
    }
    fn state(&self) -> Arc<DeviceState> {
        self.counters.clone()
    }
}

fn fragile(name: &'static str, rt: &Arc<Runtime>) -> Harness {
    let dev = Fragile { name, counters: DeviceState::new(1) };
    Harness::start_with_runtime(Box::new(dev), HarnessOpts { mode: rt.mode(), ..Default::default() }, rt.clone())
        .unwrap()
}

fn fill(h: &mut Harness, len: u32) -> Option<u32> {
    let b = h.guest.alloc(u64::from(len), 16);
    h.queues[0].post(&[Buf::inb(b, len)]).unwrap();
    h.queues[0].kick();
    h.queues[0].wait_used(Duration::from_millis(500)).map(|u| u.1)
}

#[test]
fn a_panicking_worker_is_contained_to_its_device() {
    for mode in MODES {
        let rt = Runtime::new(mode);
        let mut a = fragile("bad0", &rt);
        let mut b = fragile("good0", &rt);
        assert_eq!(fill(&mut a, 8), Some(8));
        assert_eq!(fill(&mut a, 13), None, "{mode}: the request that hit the bug is not completed");
        let t = Instant::now();
        while !a.needs_reset() && t.elapsed() < T {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(a.needs_reset(), "{mode}: the device is marked NEEDS_RESET");
        assert_eq!(a.config_call.read().unwrap_or(0), 1, "{mode}: the driver gets a configuration interrupt");
        assert_eq!(a.device.state().queue(0).errors, 1);
        // The other device, on the same thread in `single` mode, goes on.
        assert!(!b.needs_reset());
        for _ in 0..3 {
            assert_eq!(fill(&mut b, 32), Some(32), "{mode}: the other device still works");
        }
        // The broken device serves nothing until the driver resets it...
        assert_eq!(fill(&mut a, 8), None);
        // ...and then works again.
        let took = Instant::now();
        a.restart().unwrap();
        assert!(took.elapsed() < RESET_BOUND);
        assert!(!a.needs_reset());
        assert_eq!(fill(&mut a, 8), Some(8), "{mode}: the reset device works again");
        assert_eq!(fill(&mut b, 8), Some(8), "{mode}");
    }
}

/// The write-zeroes request above, completed when nothing interrupts it,
/// with every byte zero (the stoppable path still does its job).
#[test]
fn write_zeroes_without_zero_range_still_zeroes() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipped: no /dev/shm");
        return;
    }
    let file = TempFile::new(shm, "wz-ok", 4 << 20);
    std::fs::write(&file.0, vec![0xeeu8; 4 << 20]).unwrap();
    let mut h = blk(&file, 1, ThreadingMode::PerQueue, !0);
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_WRITE_ZEROES.to_le_bytes());
    let mut seg = Vec::new();
    seg.extend_from_slice(&8u64.to_le_bytes());
    seg.extend_from_slice(&((3u32 << 20) / 512).to_le_bytes());
    seg.extend_from_slice(&0u32.to_le_bytes());
    let hdr_a = h.guest.alloc_bytes(&hdr);
    let seg_a = h.guest.alloc_bytes(&seg);
    let status = h.guest.alloc_bytes(&[0xff]);
    h.queues[0].post(&[Buf::out(hdr_a, 16), Buf::out(seg_a, 16), Buf::inb(status, 1)]).unwrap();
    h.queues[0].kick();
    assert_eq!(h.queues[0].wait_used(T).map(|u| u.1), Some(1));
    assert_eq!(h.guest.read(status, 1)[0], VIRTIO_BLK_S_OK);
    let disk = std::fs::read(&file.0).unwrap();
    assert!(disk[..4096].iter().all(|&b| b == 0xee));
    assert!(disk[4096..4096 + (3 << 20)].iter().all(|&b| b == 0));
    assert!(disk[4096 + (3 << 20)..].iter().all(|&b| b == 0xee));
}

// ------------------------------------------------------------------ seccomp

/// A worker that tries what no queue thread needs — a socket, a file, a
/// program — and reports the errno of each in the buffer it fills.
struct Nosy {
    counters: Arc<DeviceState>,
}

struct NosyWorker;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

impl QueueWorker for NosyWorker {
    fn serve(&mut self, q: &mut QueueCtx) -> Result<Wait, Stopped> {
        while let Some(c) = q.pop() {
            // SAFETY: plain system calls with valid (or null) arguments.
            let tried = unsafe {
                let s = (libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0), errno());
                let o = (libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY), errno());
                // A path that does not exist: were the filter to let
                // execve through, it fails with ENOENT and the test fails
                // (a real program would replace the test process and could
                // exit 0, passing it).
                let nowhere = c"/nonexistent/kickvm-seccomp-probe";
                let argv = [nowhere.as_ptr(), std::ptr::null()];
                let e = (libc::execve(nowhere.as_ptr(), argv.as_ptr(), std::ptr::null()), errno());
                [s, o, e]
            };
            let mut out = Vec::new();
            for (r, e) in tried {
                out.extend_from_slice(&r.to_le_bytes());
                out.extend_from_slice(&e.to_le_bytes());
            }
            let n = c.writable.write_at(0, &out);
            q.add_used(c.head, n as u32);
        }
        Ok(Wait::Kick)
    }
}

impl VirtioDevice for Nosy {
    fn name(&self) -> &str {
        "nosy0"
    }
    fn device_type(&self) -> u32 {
        4
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16]
    }
    fn features(&self) -> u64 {
        kickvm_virtio::device::COMMON_FEATURES
    }
    fn activate(&mut self, _features: u64) -> Result<Vec<Box<dyn QueueWorker>>, ActivateError> {
        Ok(vec![Box::new(NosyWorker)])
    }
    fn state(&self) -> Arc<DeviceState> {
        self.counters.clone()
    }
}

/// Threads of this process named `name`, by tid.
fn tids_named(name: &str) -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Every queue thread runs under its filter (seccomp on by default): what
/// its job does not need — a socket, opening a file, starting a program —
/// fails with EPERM, in every threading mode.
#[test]
fn a_queue_thread_is_refused_what_it_does_not_need() {
    for (mode, thread) in [
        (ThreadingMode::PerQueue, "nosy0-q0"),
        (ThreadingMode::PerDevice, "nosy0"),
        (ThreadingMode::Single, "kickvm-io"),
    ] {
        let dev = Nosy { counters: DeviceState::new(1) };
        let mut h = Harness::start(Box::new(dev), HarnessOpts { mode, ..Default::default() }).unwrap();
        let b = h.guest.alloc(24, 16);
        h.queues[0].post(&[Buf::inb(b, 24)]).unwrap();
        h.queues[0].kick();
        assert_eq!(h.queues[0].wait_used(T).map(|u| u.1), Some(24), "{mode}");
        let got = h.guest.read(b, 24);
        let word = |i: usize| i32::from_le_bytes([got[4 * i], got[4 * i + 1], got[4 * i + 2], got[4 * i + 3]]);
        for (k, what) in ["socket", "open", "execve"].iter().enumerate() {
            assert_eq!((word(2 * k), word(2 * k + 1)), (-1, libc::EPERM), "{mode}: {what} refused");
        }
        let tids = tids_named(thread);
        assert!(!tids.is_empty(), "{mode}: thread {thread} exists");
        assert!(tids.iter().all(|&t| kickvm_virtio::seccomp::thread_filtered(t)), "{mode}: {thread} filtered");
    }
}
