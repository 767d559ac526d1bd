//! virtio-blk: 4 KiB random reads at queue depth 1 and 32 from a file in
//! /dev/shm, through the device, with the test driver playing the guest.
//! Peer: the same reads done directly with `pread` by one host thread.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use kickvm_virtio::block::{Block, BlockConfig, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use kickvm_virtio::driver::{Buf, DriverQueue, Guest, Harness, HarnessOpts};
use kickvm_virtio::poll::Poll;
use kickvm_virtio::{ThreadingMode, VirtioDevice};
use vm_memory::GuestAddress;

use crate::stats::{per, us, Latencies};
use crate::syscalls::{threads_named, SyscallCounter};

pub const DISK_SIZE: u64 = 256 << 20;
pub const BLOCK: u64 = 4096;

pub struct Disk(pub std::path::PathBuf);

impl Disk {
    pub fn new() -> std::io::Result<Disk> {
        let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        let path = dir.join(format!("kickvm-bench-{}.img", std::process::id()));
        let f = std::fs::File::create(&path)?;
        let chunk = vec![0xa5u8; 1 << 20];
        for i in 0..DISK_SIZE / chunk.len() as u64 {
            f.write_all_at(&chunk, i * chunk.len() as u64)?;
        }
        Ok(Disk(path))
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// xorshift64: cheap random block numbers.
pub struct Rand(u64);
impl Rand {
    pub fn new() -> Rand {
        Rand(0x9e37_79b9_7f4a_7c15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

pub struct Row {
    pub what: String,
    pub iops: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub syscalls_per_req: String,
    pub interrupts_per_req: f64,
    /// CPU time of the device's threads per request (µs): what polling
    /// costs shows here.
    pub cpu_per_req: Option<f64>,
}

struct Slot {
    hdr: GuestAddress,
    data: GuestAddress,
    status: GuestAddress,
}

/// What [`drive`] did: requests completed, their latencies, the time.
pub struct Driven {
    pub done: u64,
    pub lat: Latencies,
    pub secs: f64,
}

/// Plays the guest on `q`: keeps `qd` 4 KiB random reads of the bench
/// disk outstanding for `dur`, kicking when the device asks for it and
/// sleeping on the call eventfd like an interrupt-driven driver.
pub fn drive(guest: &mut Guest, q: &mut DriverQueue, qd: usize, dur: Duration) -> Driven {
    let mut slots: Vec<Slot> = (0..qd)
        .map(|_| Slot { hdr: guest.alloc(16, 16), data: guest.alloc(BLOCK, 4096), status: guest.alloc(1, 1) })
        .collect();
    let mut free: Vec<usize> = (0..qd).collect();
    let mut inflight: HashMap<u16, (usize, Instant)> = HashMap::new();
    let mut rand = Rand::new();
    let mut lat = Latencies(Vec::with_capacity(1 << 20));
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < dur {
        let old = q.avail_idx();
        while let Some(s) = free.pop() {
            let slot = &mut slots[s];
            let sector = (rand.next() % (DISK_SIZE / BLOCK)) * (BLOCK / 512);
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
            hdr[8..16].copy_from_slice(&sector.to_le_bytes());
            guest.write(slot.hdr, &hdr);
            let head = q
                .post(&[Buf::out(slot.hdr, 16), Buf::inb(slot.data, BLOCK as u32), Buf::inb(slot.status, 1)])
                .expect("queue has room");
            inflight.insert(head, (s, Instant::now()));
        }
        q.kick_if_needed(old);
        // Like a guest's interrupt handler: take what is done, then
        // re-enable interrupts and look once more before sleeping.
        loop {
            let mut got = false;
            while let Some((head, _)) = q.pop_used() {
                if let Some((s, t0)) = inflight.remove(&head) {
                    lat.0.push(t0.elapsed());
                    // The disk holds 0xa5 everywhere: the data arrived.
                    if guest.read(slots[s].status, 1)[0] != VIRTIO_BLK_S_OK || guest.read(slots[s].data, 1)[0] != 0xa5 {
                        panic!("bench read failed");
                    }
                    guest.write(slots[s].data, &[0]);
                    free.push(s);
                    done += 1;
                    got = true;
                }
            }
            if got {
                break;
            }
            q.enable_interrupts();
            if q.used_idx() != q.last_used() {
                continue;
            }
            q.wait_call(Duration::from_millis(100));
        }
    }
    Driven { done, lat, secs: start.elapsed().as_secs_f64() }
}

/// Runs `qd` outstanding 4 KiB random reads for `dur` in threading `mode`,
/// the queue thread polling as `poll` says. Syscalls are counted (with
/// perf attached) only when `count_syscalls`: perf's tracepoint slows
/// every syscall, so timings come from a run without it.
pub fn through_device(
    disk: &Disk,
    mode: ThreadingMode,
    poll: Poll,
    qd: usize,
    dur: Duration,
    count_syscalls: bool,
) -> Row {
    let dev = Block::new("blk0", BlockConfig::new(&disk.0)).expect("open bench disk");
    dev.state().set_poll(poll);
    let mut h = Harness::start(Box::new(dev), HarnessOpts { mode, queue_size: 256, ..Default::default() })
        .expect("activate");
    let counter = if count_syscalls {
        let tids: Vec<u32> = threads_named(&["blk0", "kickvm-io"]).into_iter().map(|t| t.0).collect();
        SyscallCounter::start(&tids)
    } else {
        None
    };
    let before = h.device.state().queue(0);
    let cpu_before = threads_cpu(&["blk0", "kickvm-io"]);
    let mut d = drive(&mut h.guest, &mut h.queues[0], qd, dur);
    let cpu = threads_cpu(&["blk0", "kickvm-io"]).zip(cpu_before).map(|(a, b)| a.saturating_sub(b));
    let syscalls = counter.and_then(|c| c.stop());
    let after = h.device.state().queue(0);
    let polled = if poll == Poll::Off { String::new() } else { format!(", poll={poll}") };
    Row {
        what: format!("kickvm {mode}{polled}, QD{qd}"),
        iops: d.done as f64 / d.secs,
        p50: d.lat.percentile(0.5),
        p99: d.lat.percentile(0.99),
        syscalls_per_req: per(syscalls, d.done),
        interrupts_per_req: (after.interrupts - before.interrupts) as f64 / d.done.max(1) as f64,
        cpu_per_req: cpu.map(|c| c.as_secs_f64() * 1e6 / d.done.max(1) as f64),
    }
}

/// CPU time used so far by this process's threads whose names start with
/// one of `prefixes` (their `schedstat` run time); `None` if unreadable.
fn threads_cpu(prefixes: &[&str]) -> Option<Duration> {
    let mut total = 0u64;
    for (tid, _) in threads_named(prefixes) {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// The peer: the same random 4 KiB reads with `pread` on the host.
pub fn host_pread(disk: &Disk, dur: Duration) -> Row {
    let f = std::fs::File::open(&disk.0).expect("open bench disk");
    let mut buf = vec![0u8; BLOCK as usize];
    let mut rand = Rand::new();
    let mut lat = Latencies(Vec::with_capacity(1 << 20));
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < dur {
        let off = (rand.next() % (DISK_SIZE / BLOCK)) * BLOCK;
        let t0 = Instant::now();
        f.read_exact_at(&mut buf, off).expect("pread");
        lat.0.push(t0.elapsed());
        done += 1;
    }
    Row {
        what: "host pread (peer), QD1".into(),
        iops: done as f64 / start.elapsed().as_secs_f64(),
        p50: lat.percentile(0.5),
        p99: lat.percentile(0.99),
        syscalls_per_req: "1.00".into(),
        interrupts_per_req: 0.0,
        cpu_per_req: None,
    }
}

pub fn run(dur: Duration) -> String {
    let disk = Disk::new().expect("create bench disk in /dev/shm");
    let peer = host_pread(&disk, dur);
    let mut rows = vec![];
    // Polling applies to queue threads that sleep on their kick: the
    // per-queue mode's.
    let per_queue_polls = [Poll::Off, Poll::Adaptive(kickvm_virtio::poll::DEFAULT_MAX), Poll::Fixed(Duration::from_micros(50))];
    let runs = per_queue_polls
        .iter()
        .map(|&p| (ThreadingMode::PerQueue, p))
        .chain([ThreadingMode::PerDevice, ThreadingMode::Single].map(|m| (m, Poll::Off)));
    for (mode, poll) in runs {
        for qd in [1, 32] {
            let mut row = through_device(&disk, mode, poll, qd, dur, false);
            row.syscalls_per_req = through_device(&disk, mode, poll, qd, dur / 2, true).syscalls_per_req;
            rows.push(row);
        }
    }
    let mut out = String::from(
        "| blk 4 KiB random read | IOPS | ratio to host pread | p50 µs | p99 µs | device syscalls / request | interrupts / request | device CPU µs / request |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows.iter().chain(std::iter::once(&peer)) {
        out += &format!(
            "| {} | {:.0} | {:.2} | {} | {} | {} | {:.2} | {} |\n",
            r.what,
            r.iops,
            r.iops / peer.iops,
            us(r.p50),
            us(r.p99),
            r.syscalls_per_req,
            r.interrupts_per_req,
            r.cpu_per_req.map_or("n/a".into(), |c| format!("{c:.1}")),
        );
    }
    out
}
