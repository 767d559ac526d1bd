//! virtio-rng throughput: 4 KiB requests, 64 outstanding, through the
//! device; peer: `read` of the same sizes from /dev/urandom on the host.

use std::io::Read;
use std::time::{Duration, Instant};

use kickvm_virtio::driver::{Buf, Harness, HarnessOpts};
use kickvm_virtio::rng::{Rng, RngConfig};
use kickvm_virtio::ThreadingMode;

use crate::stats::per;
use crate::syscalls::{threads_named, SyscallCounter};

const REQ: u32 = 4096;
const DEPTH: usize = 64;

fn through_device(mode: ThreadingMode, dur: Duration, count_syscalls: bool) -> (f64, String) {
    let dev = Rng::new("rng0", RngConfig::default()).expect("open /dev/urandom");
    let mut h = Harness::start(Box::new(dev), HarnessOpts { mode, ..Default::default() }).expect("activate");
    let bufs: Vec<_> = (0..DEPTH).map(|_| h.guest.alloc(u64::from(REQ), 4096)).collect();
    let counter = if count_syscalls {
        let tids: Vec<u32> = threads_named(&["rng0", "kickvm-io"]).into_iter().map(|t| t.0).collect();
        SyscallCounter::start(&tids)
    } else {
        None
    };
    let mut heads = std::collections::HashMap::new();
    let mut free: Vec<usize> = (0..DEPTH).collect();
    let (start, mut bytes, mut reqs) = (Instant::now(), 0u64, 0u64);
    while start.elapsed() < dur {
        let old = h.queues[0].avail_idx();
        while let Some(i) = free.pop() {
            let head = h.queues[0].post(&[Buf::inb(bufs[i], REQ)]).expect("room");
            heads.insert(head, i);
        }
        h.queues[0].kick_if_needed(old);
        loop {
            let mut got = false;
            while let Some((head, len)) = h.queues[0].pop_used() {
                bytes += u64::from(len);
                reqs += 1;
                free.extend(heads.remove(&head));
                got = true;
            }
            if got {
                break;
            }
            h.queues[0].enable_interrupts();
            if h.queues[0].used_idx() == h.queues[0].last_used() {
                h.queues[0].wait_call(Duration::from_millis(100));
            }
        }
    }
    let mbs = bytes as f64 / start.elapsed().as_secs_f64() / 1e6;
    (mbs, per(counter.and_then(|c| c.stop()), reqs))
}

fn host_read(dur: Duration) -> f64 {
    let mut f = std::fs::File::open("/dev/urandom").expect("open /dev/urandom");
    let mut buf = vec![0u8; REQ as usize];
    let (start, mut bytes) = (Instant::now(), 0u64);
    while start.elapsed() < dur {
        f.read_exact(&mut buf).expect("read /dev/urandom");
        bytes += u64::from(REQ);
    }
    bytes as f64 / start.elapsed().as_secs_f64() / 1e6
}

pub fn run(dur: Duration) -> String {
    let peer = host_read(dur);
    let mut out = String::from(
        "| rng, 4 KiB requests, 64 outstanding | MB/s | ratio to host read | device syscalls / request |\n|---|---|---|---|\n",
    );
    for mode in [ThreadingMode::PerQueue, ThreadingMode::PerDevice, ThreadingMode::Single] {
        let (mbs, _) = through_device(mode, dur, false);
        let (_, sc) = through_device(mode, dur / 2, true);
        out += &format!("| kickvm {mode} | {mbs:.0} | {:.2} | {sc} |\n", mbs / peer);
    }
    out += &format!("| host read of /dev/urandom (peer) | {peer:.0} | 1.00 | 1.00 |\n");
    out
}
