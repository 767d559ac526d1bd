//! virtio-net through a real TAP in a private network namespace, with the
//! test driver playing the guest:
//!
//! - ping-pong: the driver sends an ICMP echo request to the TAP's address
//!   and waits for the kernel's reply in a receive buffer; round trips/s,
//!   p50/p99 RTT, and the device threads' syscalls per round trip (the
//!   lguest's 2009 figure: it went from ≈17 to ≈6; the goal here is ≤ 5).
//!   Peer: the same echo through the kernel alone — a raw `AF_PACKET`
//!   socket on one end of a veth pair, the kernel answering on the other.
//! - sustained load one way: TX flood (frames the kernel drops on
//!   arrival) and RX flood (a host thread `sendmmsg`s frames out of the
//!   TAP), packets/s and device syscalls per packet.
//!
//! Syscalls are those of the device's threads only (`bnet*`, or
//! `kickvm-io` in single mode), counted by `perf stat -t` in a second run
//! (perf's tracepoint slows every syscall, so timings come from a run
//! without it). The per-thread breakdown of the per-queue ping uses
//! `perf stat --per-thread` with one tracepoint per syscall. Needs root;
//! everything happens inside namespace `kvbench-<pid>`, deleted at the end.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kickvm_virtio::driver::{Buf, DriverQueue, Harness, HarnessOpts};
use kickvm_virtio::net::{NetConfig, NetDevice};
use kickvm_virtio::ThreadingMode;
use vm_memory::GuestAddress;

use crate::stats::{per, us, Latencies};
use crate::syscalls::{threads_named, SyscallCounter};

const DEV: &str = "bnet";
const TAP: &str = "kvbench0";
const TAP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const TAP_IP: [u8; 4] = [10, 0, 0, 1];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
/// Receive buffers: what Linux posts with mergeable buffers (a page each).
const RX_BUF: u32 = 4096;
const RX_BUFS: usize = 192;
const MODES: [ThreadingMode; 3] = [ThreadingMode::PerQueue, ThreadingMode::PerDevice, ThreadingMode::Single];

// ----------------------------------------------------------- environment

/// The benchmark's network namespace; the calling thread (and threads it
/// starts) live in it until it drops.
struct Ns {
    name: String,
    home: File,
}

impl Ns {
    fn new() -> Result<Ns, String> {
        let name = format!("kvbench-{}", std::process::id());
        sh("ip", &["netns", "add", &name])?;
        let home = File::open("/proc/thread-self/ns/net").map_err(|e| e.to_string())?;
        let ns = Ns { name, home };
        let target = File::open(format!("/var/run/netns/{}", ns.name)).map_err(|e| e.to_string())?;
        // SAFETY: setns on this thread with a valid namespace fd.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        let n = ns.name.clone();
        sh("ip", &["netns", "exec", &n, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        sh("ip", &["netns", "exec", &n, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        Ok(ns)
    }

    fn ip(&self, args: &str) -> Result<(), String> {
        let mut a = vec!["-n", &self.name];
        a.extend(args.split_whitespace());
        sh("ip", &a)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        // SAFETY: back to the namespace the thread started in.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn sh(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

// ---------------------------------------------------------------- frames

fn csum(data: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in data.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// An ICMP echo request (64 bytes of ICMP, like `ping`'s default).
fn echo_request(dst_mac: &[u8; 6], src_mac: &[u8; 6], src: &[u8; 4], dst: &[u8; 4], seq: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(98);
    f.extend_from_slice(dst_mac);
    f.extend_from_slice(src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 84, 0, 1, 0x40, 0, 64, 1, 0, 0];
    ip.extend_from_slice(src);
    ip.extend_from_slice(dst);
    let c = csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend(ip);
    let mut icmp = vec![8, 0, 0, 0, 0x4b, 0x56];
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend((0..56u8).map(|i| i ^ 0x5a));
    let c = csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    f.extend(icmp);
    f
}

fn is_reply(f: &[u8], seq: u16) -> bool {
    f.len() >= 42 && f[12..14] == [8, 0] && f[23] == 1 && f[34] == 0 && f[40..42] == seq.to_be_bytes()
}

/// A minimum-size frame of an ethertype nobody handles.
fn filler(dst: &[u8; 6], src: &[u8; 6]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(src);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.resize(60, 0xab);
    f
}

// ---------------------------------------------------------- guest side

/// The device, its TAP configured, with receive buffers posted.
struct Bench {
    h: Harness,
    rx_bufs: HashMap<u16, GuestAddress>,
}

impl Bench {
    fn start(ns: &Ns, mode: ThreadingMode) -> Result<Bench, String> {
        let config = NetConfig { name: DEV.into(), tap: TAP.into(), mac: GUEST_MAC, ..NetConfig::default() };
        let dev = NetDevice::new(config).map_err(|e| e.to_string())?;
        // Everything Linux would take: mergeable buffers, offloads, EVENT_IDX.
        let opts = HarnessOpts { mode, queue_size: 256, ..HarnessOpts::default() };
        let h = Harness::start(Box::new(dev), opts).map_err(|e| e.to_string())?;
        ns.ip(&format!("link set {TAP} address {}", mac_str(&TAP_MAC)))?;
        ns.ip(&format!("addr add 10.0.0.1/24 dev {TAP}"))?;
        ns.ip(&format!("link set {TAP} up"))?;
        ns.ip(&format!("neigh replace 10.0.0.2 lladdr {} dev {TAP}", mac_str(&GUEST_MAC)))?;
        let mut b = Bench { h, rx_bufs: HashMap::new() };
        for _ in 0..RX_BUFS {
            let a = b.h.guest.alloc(u64::from(RX_BUF), 4096);
            let head = b.h.queues[0].post(&[Buf::inb(a, RX_BUF)]).ok_or("rx ring full")?;
            b.rx_bufs.insert(head, a);
        }
        b.h.queues[0].enable_interrupts();
        b.h.queues[0].kick();
        Ok(b)
    }

    fn device_threads() -> Vec<(u32, String)> {
        threads_named(&[DEV, "kickvm-io"])
    }

    fn interrupts(&self) -> u64 {
        self.h.device.state().total().interrupts
    }

    /// Takes every used receive buffer, passes its frame to `f`, and posts
    /// it again. Returns how many packets were taken.
    fn drain_rx(&mut self, mut f: impl FnMut(&[u8])) -> u64 {
        let old = self.h.queues[0].avail_idx();
        let mut n = 0;
        while let Some((head, len)) = self.h.queues[0].pop_used() {
            let Some(a) = self.rx_bufs.remove(&head) else { continue };
            let len = (len as usize).min(RX_BUF as usize);
            if len > 12 {
                let frame = self.h.guest.read(GuestAddress(a.0 + 12), len - 12);
                f(&frame);
            }
            n += 1;
            if let Some(h) = self.h.queues[0].post(&[Buf::inb(a, RX_BUF)]) {
                self.rx_bufs.insert(h, a);
            }
        }
        if n > 0 {
            self.h.queues[0].kick_if_needed(old);
        }
        n
    }

    /// Sleeps until the queue's interrupt (or 100 ms), as a guest would:
    /// re-enable interrupts and look once more first.
    fn wait_interrupt(q: &mut DriverQueue) {
        q.enable_interrupts();
        if q.used_idx() == q.last_used() {
            q.wait_call(Duration::from_millis(100));
        }
    }
}

/// Asks for no transmit interrupts (Linux frees transmit buffers lazily).
fn quiet_tx(q: &mut DriverQueue) {
    while q.pop_used().is_some() {}
    q.set_used_event(q.last_used().wrapping_add(0x8000));
}

// -------------------------------------------------------------- ping-pong

struct PingRow {
    what: String,
    rate: f64,
    p50: Duration,
    p99: Duration,
    syscalls: String,
    interrupts: String,
}

fn ping_pong(ns: &Ns, mode: ThreadingMode, dur: Duration, count: bool) -> Result<(PingRow, Option<String>), String> {
    let mut b = Bench::start(ns, mode)?;
    let slots: Vec<GuestAddress> = (0..64).map(|_| b.h.guest.alloc(12 + 98, 64)).collect();
    let threads = Bench::device_threads();
    let tids: Vec<u32> = threads.iter().map(|t| t.0).collect();
    // Warm up (ARP-free thanks to the static neighbour, but caches).
    let mut seq: u16 = 0;
    let one = |b: &mut Bench, seq: u16| -> Result<Duration, String> {
        let slot = slots[usize::from(seq) % slots.len()];
        let mut pkt = vec![0u8; 12];
        pkt.extend(echo_request(&TAP_MAC, &GUEST_MAC, &GUEST_IP, &TAP_IP, seq));
        b.h.guest.write(slot, &pkt);
        let t0 = Instant::now();
        let tx = &mut b.h.queues[1];
        quiet_tx(tx);
        let old = tx.avail_idx();
        tx.post(&[Buf::out(slot, pkt.len() as u32)]).ok_or("tx ring full")?;
        tx.kick_if_needed(old);
        let mut got = false;
        while !got {
            b.drain_rx(|f| got |= is_reply(f, seq));
            if got {
                break;
            }
            if t0.elapsed() > Duration::from_secs(2) {
                return Err(format!("no echo reply for seq {seq} in {mode} mode"));
            }
            Bench::wait_interrupt(&mut b.h.queues[0]);
        }
        Ok(t0.elapsed())
    };
    for _ in 0..200 {
        seq = seq.wrapping_add(1);
        one(&mut b, seq)?;
    }
    let counter = if count { SyscallCounter::start(&tids) } else { None };
    let breakdown = if count && mode == ThreadingMode::PerQueue { PerThread::start(&tids) } else { None };
    let irq0 = b.interrupts();
    let mut lat = Latencies(Vec::new());
    let start = Instant::now();
    while start.elapsed() < dur {
        seq = seq.wrapping_add(1);
        lat.0.push(one(&mut b, seq)?);
    }
    let secs = start.elapsed().as_secs_f64();
    let n = lat.0.len() as u64;
    let syscalls = counter.and_then(SyscallCounter::stop);
    let breakdown = breakdown.and_then(|p| p.stop(&threads, n));
    let irqs = b.interrupts() - irq0;
    Ok((
        PingRow {
            what: format!("kickvm {mode}"),
            rate: n as f64 / secs,
            p50: lat.percentile(0.5),
            p99: lat.percentile(0.99),
            syscalls: per(syscalls, n),
            interrupts: format!("{:.2}", irqs as f64 / n.max(1) as f64),
        },
        breakdown,
    ))
}

/// The peer: the same echo exchange through the kernel only. A raw
/// `AF_PACKET` socket on one end of a veth pair sends the request; the
/// kernel answers on the other end. Two syscalls (send, recv) per round
/// trip, all of them the peer's.
fn kernel_ping(ns: &Ns, dur: Duration) -> Result<PingRow, String> {
    let peer_mac = [0x02, 0, 0, 0, 1, 2];
    let _ = ns.ip("link del kvb-a");
    ns.ip("link add kvb-a type veth peer name kvb-b")?;
    ns.ip(&format!("link set kvb-a address {}", mac_str(&TAP_MAC)))?;
    ns.ip(&format!("link set kvb-b address {}", mac_str(&peer_mac)))?;
    ns.ip("addr add 10.0.1.1/24 dev kvb-a")?;
    ns.ip("link set kvb-a up")?;
    ns.ip("link set kvb-b up")?;
    ns.ip(&format!("neigh replace 10.0.1.2 lladdr {} dev kvb-a", mac_str(&peer_mac)))?;
    let sock = packet_socket("kvb-b")?;
    let mut buf = vec![0u8; 2048];
    let mut lat = Latencies(Vec::new());
    let mut seq: u16 = 0;
    let start = Instant::now();
    let mut warm = 200;
    while start.elapsed() < dur || warm > 0 {
        seq = seq.wrapping_add(1);
        let f = echo_request(&TAP_MAC, &peer_mac, &[10, 0, 1, 2], &[10, 0, 1, 1], seq);
        let t0 = Instant::now();
        // SAFETY: f is valid for its length.
        unsafe { libc::send(sock.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(format!("kernel peer: no reply ({})", std::io::Error::last_os_error()));
            }
            if is_reply(&buf[..n as usize], seq) {
                break;
            }
        }
        if warm > 0 {
            warm -= 1;
            if warm == 0 {
                lat.0.clear();
            }
            continue;
        }
        lat.0.push(t0.elapsed());
    }
    let n = lat.0.len() as u64;
    let _ = ns.ip("link del kvb-a");
    Ok(PingRow {
        what: "kernel only: AF_PACKET on a veth (peer)".into(),
        rate: n as f64 / dur.as_secs_f64(),
        p50: lat.percentile(0.5),
        p99: lat.percentile(0.99),
        syscalls: "2.00 (sender's)".into(),
        interrupts: "–".into(),
    })
}

fn packet_socket(ifname: &str) -> Result<OwnedFd, String> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
    if fd < 0 {
        return Err(format!("AF_PACKET socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just created and is not owned elsewhere.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval { tv_sec: 2, tv_usec: 0 };
    // SAFETY: tv is a valid timeval for the call.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let name = std::ffi::CString::new(ifname).map_err(|e| e.to_string())?;
    // SAFETY: valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    // SAFETY: a zeroed sockaddr_ll is valid; the needed fields are set.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll of the given size.
    let r = unsafe {
        libc::bind(fd.as_raw_fd(), (&sll as *const libc::sockaddr_ll).cast(), std::mem::size_of_val(&sll) as u32)
    };
    if r != 0 || ifindex == 0 {
        return Err(format!("bind to {ifname}: {}", std::io::Error::last_os_error()));
    }
    Ok(fd)
}

// ---------------------------------------------------------- sustained load

struct FloodRow {
    what: String,
    pps: f64,
    syscalls: String,
    interrupts: String,
}

/// The driver keeps the transmit ring full of minimum-size frames to a MAC
/// nobody has (the kernel drops them on arrival).
fn tx_flood(ns: &Ns, mode: ThreadingMode, dur: Duration, count: bool) -> Result<FloodRow, String> {
    let mut b = Bench::start(ns, mode)?;
    let mut pkt = vec![0u8; 12];
    pkt.extend(filler(&[0x02, 0, 0, 0, 0, 0x99], &GUEST_MAC));
    let size = b.h.queues[1].size;
    let slots: Vec<GuestAddress> = (0..size).map(|_| b.h.guest.alloc_bytes(&pkt)).collect();
    let tids: Vec<u32> = Bench::device_threads().iter().map(|t| t.0).collect();
    let counter = if count { SyscallCounter::start(&tids) } else { None };
    let irq0 = b.interrupts();
    let start = Instant::now();
    let mut done = 0u64;
    let mut next = 0usize;
    while start.elapsed() < dur {
        let tx = &mut b.h.queues[1];
        let mut got = 0;
        while tx.pop_used().is_some() {
            got += 1;
        }
        done += got;
        let old = tx.avail_idx();
        while tx.free_descriptors() > 0 {
            tx.post(&[Buf::out(slots[next], pkt.len() as u32)]);
            next = (next + 1) % slots.len();
        }
        tx.kick_if_needed(old);
        if got == 0 {
            // Ring full and nothing back yet: sleep until half of it is.
            let half = tx.last_used().wrapping_add(size / 2);
            tx.set_used_event(half);
            if tx.used_idx() == tx.last_used() {
                tx.wait_call(Duration::from_millis(100));
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let syscalls = counter.and_then(SyscallCounter::stop);
    Ok(FloodRow {
        what: format!("TX flood, kickvm {mode}"),
        pps: done as f64 / secs,
        syscalls: per(syscalls, done),
        interrupts: format!("{:.3}", (b.interrupts() - irq0) as f64 / done.max(1) as f64),
    })
}

/// A host thread floods the TAP with minimum-size frames for the guest
/// (`sendmmsg`, 64 at a time); the driver takes them and re-posts buffers.
fn rx_flood(ns: &Ns, mode: ThreadingMode, dur: Duration, count: bool) -> Result<FloodRow, String> {
    let mut b = Bench::start(ns, mode)?;
    let tids: Vec<u32> = Bench::device_threads().iter().map(|t| t.0).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sock = packet_socket(TAP)?;
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::Builder::new()
            .name("bench-sender".into())
            .spawn(move || flood_sender(sock, &stop, &sent))
            .map_err(|e| e.to_string())?
    };
    std::thread::sleep(Duration::from_millis(100));
    let counter = if count { SyscallCounter::start(&tids) } else { None };
    let irq0 = b.interrupts();
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < dur {
        let n = b.drain_rx(|_| ());
        done += n;
        if n == 0 {
            Bench::wait_interrupt(&mut b.h.queues[0]);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let syscalls = counter.and_then(SyscallCounter::stop);
    stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    Ok(FloodRow {
        what: format!("RX flood, kickvm {mode}"),
        pps: done as f64 / secs,
        syscalls: per(syscalls, done),
        interrupts: format!("{:.3}", (b.interrupts() - irq0) as f64 / done.max(1) as f64),
    })
}

fn flood_sender(sock: OwnedFd, stop: &AtomicBool, sent: &AtomicU64) {
    const BATCH: usize = 64;
    let frame = filler(&GUEST_MAC, &TAP_MAC);
    let mut iov: Vec<libc::iovec> =
        (0..BATCH).map(|_| libc::iovec { iov_base: frame.as_ptr() as *mut _, iov_len: frame.len() }).collect();
    // SAFETY: zeroed mmsghdrs are valid; each points at one iovec above.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: msgs and the iovecs and frame they point to outlive the call.
        let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent.fetch_add(n as u64, Ordering::Relaxed);
        } else {
            std::thread::yield_now();
        }
    }
}

// ----------------------------------------------- per-thread syscall detail

/// `perf stat --per-thread` with one tracepoint per syscall the device
/// threads make, for a breakdown like lguest's strace walk-through.
struct PerThread {
    child: std::process::Child,
}

const DETAIL: [&str; 9] = ["read", "write", "readv", "writev", "preadv2", "poll", "ppoll", "futex", "epoll_wait"];

impl PerThread {
    fn start(tids: &[u32]) -> Option<PerThread> {
        let list: Vec<String> = tids.iter().map(|t| t.to_string()).collect();
        let mut events = vec!["raw_syscalls:sys_enter".to_string()];
        events.extend(DETAIL.iter().map(|s| format!("syscalls:sys_enter_{s}")));
        let child = Command::new("perf")
            .args(["stat", "--per-thread", "-x", ",", "-e", &events.join(","), "-t", &list.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        std::thread::sleep(Duration::from_millis(300));
        Some(PerThread { child })
    }

    /// "thread: syscall n/round trip, …" for each thread that made any.
    fn stop(self, threads: &[(u32, String)], rounds: u64) -> Option<String> {
        // SAFETY: SIGINT to our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let out = self.child.wait_with_output().ok()?;
        let text = String::from_utf8_lossy(&out.stderr);
        // Lines: "<comm>-<tid>,<count>,<unit>,<event>,…"
        let mut per_tid: HashMap<u32, Vec<(String, u64)>> = HashMap::new();
        for l in text.lines() {
            let f: Vec<&str> = l.split(',').collect();
            if f.len() < 4 {
                continue;
            }
            let Some(tid) = f[0].rsplit('-').next().and_then(|t| t.parse::<u32>().ok()) else { continue };
            let Ok(n) = f[1].trim().parse::<u64>() else { continue };
            let ev = f[3].trim_start_matches("syscalls:sys_enter_").replace("raw_syscalls:sys_enter", "all");
            per_tid.entry(tid).or_default().push((ev, n));
        }
        let mut parts = Vec::new();
        for (tid, name) in threads {
            let Some(evs) = per_tid.get(tid) else { continue };
            let total = evs.iter().find(|e| e.0 == "all").map_or(0, |e| e.1);
            if total == 0 {
                continue;
            }
            let detail: Vec<String> = evs
                .iter()
                .filter(|e| e.0 != "all" && e.1 > 0)
                .map(|e| format!("{} {:.2}", e.0, e.1 as f64 / rounds.max(1) as f64))
                .collect();
            parts.push(format!("{name}: {:.2} ({})", total as f64 / rounds.max(1) as f64, detail.join(", ")));
        }
        Some(parts.join("; "))
    }
}

// ------------------------------------------------------------------ report

pub fn run(dur: Duration) -> String {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
        return "net: skipped (needs root and /dev/net/tun)\n".into();
    }
    match run_in_namespace(dur) {
        Ok(s) => s,
        Err(e) => format!("net: failed: {e}\n"),
    }
}

fn run_in_namespace(dur: Duration) -> Result<String, String> {
    let ns = Ns::new()?;
    let peer = kernel_ping(&ns, dur)?;
    let mut pings = Vec::new();
    let mut detail = None;
    for mode in MODES {
        let (mut row, _) = ping_pong(&ns, mode, dur, false)?;
        let (counted, d) = ping_pong(&ns, mode, dur / 2, true)?;
        row.syscalls = counted.syscalls;
        row.interrupts = counted.interrupts;
        if d.is_some() {
            detail = d;
        }
        pings.push(row);
    }
    let mut floods = Vec::new();
    for mode in MODES {
        let mut row = tx_flood(&ns, mode, dur, false)?;
        let counted = tx_flood(&ns, mode, dur / 2, true)?;
        row.syscalls = counted.syscalls;
        row.interrupts = counted.interrupts;
        floods.push(row);
    }
    for mode in MODES {
        let mut row = rx_flood(&ns, mode, dur, false)?;
        let counted = rx_flood(&ns, mode, dur / 2, true)?;
        row.syscalls = counted.syscalls;
        row.interrupts = counted.interrupts;
        floods.push(row);
    }
    let mut out = String::from(
        "| net ping-pong (ICMP echo, 98-byte frames) | round trips/s | ratio to kernel | p50 µs | p99 µs | device syscalls / round trip | interrupts / round trip |\n|---|---|---|---|---|---|---|\n",
    );
    for r in pings.iter().chain(std::iter::once(&peer)) {
        out += &format!(
            "| {} | {:.0} | {:.2} | {} | {} | {} | {} |\n",
            r.what,
            r.rate,
            r.rate / peer.rate,
            us(r.p50),
            us(r.p99),
            r.syscalls,
            r.interrupts
        );
    }
    if let Some(d) = detail {
        out += &format!("\nper-queue ping, syscalls per round trip by thread: {d}\n");
    }
    out += "\n| net sustained load (60-byte frames) | packets/s | device syscalls / packet | interrupts / packet |\n|---|---|---|---|\n";
    for r in &floods {
        out += &format!("| {} | {:.0} | {} | {} |\n", r.what, r.pps, r.syscalls, r.interrupts);
    }
    Ok(out)
}
