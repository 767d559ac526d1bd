//! virtio-net over a real TAP, driven by the test guest driver.
//!
//! Every test makes its own network namespace (`kvtest-<pid>-<n>`), moves
//! its thread into it, creates the TAP there and talks to it from the host
//! side with an `AF_PACKET` socket or the kernel's own ARP/ICMP: traffic
//! never leaves the namespace. They need root and `/dev/net/tun`; without
//! them they say why and pass.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kickvm_virtio::driver::{Buf, Harness, HarnessOpts};
use kickvm_virtio::net::features::*;
use kickvm_virtio::net::{NetConfig, NetDevice};
use kickvm_virtio::ThreadingMode;
use vm_memory::GuestAddress;

const TAP: &str = "kvtap0";
const TAP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const TAP_IP: [u8; 4] = [10, 0, 0, 1];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
const ETH_P_TEST: u16 = 0x88b5;
const WAIT: Duration = Duration::from_secs(3);

fn bit(b: u32) -> u64 {
    1u64 << b
}

// ---------------------------------------------------------------- namespace

/// A network namespace for one test; the creating thread lives in it until
/// the guard drops, which moves the thread back and deletes the namespace
/// (also when the test fails).
struct NetNs {
    name: String,
    /// Unique in this process: names the test's device (and so its threads).
    n: usize,
    home: File,
}

impl NetNs {
    /// `None` (after saying why) where the tests cannot run.
    fn new() -> Option<NetNs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (network namespaces and TAP)");
            return None;
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipped: no /dev/net/tun");
            return None;
        }
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("kvtest-{}-{n}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let home = File::open("/proc/thread-self/ns/net").expect("own netns");
        let ns = NetNs { name, n, home };
        let target = File::open(format!("/var/run/netns/{}", ns.name)).expect("netns file");
        // SAFETY: setns on this thread with a valid namespace fd.
        let r = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        // No IPv6 chatter (router solicitations, MLD) on the TAP.
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1", "net.ipv6.conf.all.disable_ipv6=1"]);
        Some(ns)
    }

    fn ip(&self, args: &str) {
        let mut a = vec!["-n", &self.name];
        a.extend(args.split_whitespace());
        run("ip", &a);
    }

    fn exec(&self, args: &[&str]) {
        let mut a = vec!["netns", "exec", &self.name];
        a.extend_from_slice(args);
        run("ip", &a);
    }

    /// Brings the TAP up as 10.0.0.1/24 with a static neighbour entry for
    /// each guest address (so the kernel answers without asking ARP).
    fn configure_tap(&self, guests: &[([u8; 4], [u8; 6])]) {
        self.ip(&format!("link set {TAP} address {}", mac_str(&TAP_MAC)));
        self.ip(&format!("addr add 10.0.0.1/24 dev {TAP}"));
        self.ip(&format!("link set {TAP} up"));
        for (ip, mac) in guests {
            self.ip(&format!("neigh replace {} lladdr {} dev {TAP}", ip_str(ip), mac_str(mac)));
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // SAFETY: back to the namespace the thread started in.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn ip_str(a: &[u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

// ------------------------------------------------------------- host socket

/// An `AF_PACKET` socket on the TAP: the host's end of the wire.
struct PacketSocket {
    fd: OwnedFd,
    vnet_hdr: bool,
}

impl PacketSocket {
    fn open(ifname: &str, vnet_hdr: bool) -> PacketSocket {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd was just created.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if vnet_hdr {
            setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &1i32);
        }
        let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv);
        let cname = CString::new(ifname).expect("name");
        // SAFETY: valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert!(ifindex > 0, "no interface {ifname}");
        // SAFETY: zeroed sockaddr_ll is valid; the fields we need are set.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: sll is a valid sockaddr_ll of the given size.
        let r = unsafe {
            libc::bind(fd.as_raw_fd(), (&sll as *const libc::sockaddr_ll).cast(), std::mem::size_of_val(&sll) as u32)
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        PacketSocket { fd, vnet_hdr }
    }

    /// Sends a frame out of the TAP (towards the guest). With a vnet header
    /// socket, `hdr` is its 10-byte `virtio_net_hdr`.
    fn send(&self, hdr: Option<&[u8; 10]>, frame: &[u8]) {
        let mut buf = Vec::new();
        if self.vnet_hdr {
            buf.extend_from_slice(hdr.unwrap_or(&[0; 10]));
        }
        buf.extend_from_slice(frame);
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        assert_eq!(n, buf.len() as isize, "send: {}", std::io::Error::last_os_error());
    }

    /// Receives the next frame the guest sent (not the kernel's own
    /// outgoing ones) that `want` accepts: (vnet header if any, frame).
    fn recv(&self, want: impl Fn(&[u8]) -> bool) -> Option<(Vec<u8>, Vec<u8>)> {
        let end = Instant::now() + WAIT;
        let mut buf = vec![0u8; 70000];
        while Instant::now() < end {
            // SAFETY: zeroed sockaddr_ll is a valid out-parameter.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut sl = std::mem::size_of_val(&sll) as u32;
            // SAFETY: buf and sll are valid for the given sizes.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut sl,
                )
            };
            if n <= 0 || sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let n = n as usize;
            let h = if self.vnet_hdr { 10 } else { 0 };
            if want(&buf[h..n]) {
                return Some((buf[..h].to_vec(), buf[h..n].to_vec()));
            }
        }
        None
    }
}

fn setsockopt<T>(fd: &OwnedFd, level: i32, name: i32, val: &T) {
    // SAFETY: val is valid for its size during the call.
    let r = unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, name, (val as *const T).cast(), std::mem::size_of::<T>() as u32)
    };
    assert_eq!(r, 0, "setsockopt {name}: {}", std::io::Error::last_os_error());
}

// ------------------------------------------------------------------ frames

fn csum(data: &[u8], init: u32) -> u32 {
    let mut s = init;
    for c in data.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn eth(dst: &[u8; 6], src: &[u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(dst);
    f.extend_from_slice(src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn ipv4(proto: u8, src: &[u8; 4], dst: &[u8; 4], payload_len: usize) -> Vec<u8> {
    let mut h = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
    h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    h.extend_from_slice(src);
    h.extend_from_slice(dst);
    let c = !fold(csum(&h, 0));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// An ICMP echo request from the guest to `dst` (the TAP's IP).
fn icmp_echo(src_mac: &[u8; 6], src: &[u8; 4], dst: &[u8; 4], id: u16, seq: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend((0..56u8).map(|i| i ^ 0x5a));
    let c = !fold(csum(&icmp, 0));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = eth(&TAP_MAC, src_mac, 0x0800);
    f.extend(ipv4(1, src, dst, icmp.len()));
    f.extend(icmp);
    f
}

fn is_echo_reply(f: &[u8], to: &[u8; 4], id: u16, seq: u16) -> bool {
    f.len() >= 42
        && f[12..14] == [0x08, 0x00]
        && f[23] == 1
        && &f[30..34] == to
        && f[34] == 0
        && f[38..40] == id.to_be_bytes()
        && f[40..42] == seq.to_be_bytes()
}

/// A TCP segment of `payload` bytes, checksum left partial (pseudo-header
/// sum in the field), as GSO senders hand it over.
fn tcp_frame(dst_mac: &[u8; 6], src_mac: &[u8; 6], src: &[u8; 4], dst: &[u8; 4], payload: usize) -> Vec<u8> {
    let mut f = eth(dst_mac, src_mac, 0x0800);
    f.extend(ipv4(6, src, dst, 20 + payload));
    let mut tcp = vec![0x30, 0x39, 0x13, 0x88, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((20 + payload) as u16).to_be_bytes());
    tcp[16..18].copy_from_slice(&fold(csum(&pseudo, 0)).to_be_bytes());
    f.extend(tcp);
    f.extend((0..payload).map(|i| (i % 251) as u8));
    f
}

/// `virtio_net_hdr` for a checksum-partial TCPv4 GSO packet of `tcp_frame`.
fn tso4_hdr(gso_size: u16) -> [u8; 10] {
    let mut h = [0u8; 10];
    h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    h[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    h[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
    h[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    h
}

// ------------------------------------------------------------ guest driver

/// The guest's side of a net device: receive buffers it posted per rx
/// queue, and helpers to send and receive packets.
struct Guest {
    h: Harness,
    rx: HashMap<u16, HashMap<u16, (GuestAddress, u32)>>,
    ctrl: u16,
}

/// One received packet: its header, frame and how many buffers it used.
struct Received {
    hdr: [u8; 12],
    frame: Vec<u8>,
    used: Vec<u32>,
}

impl Guest {
    fn start(ns: &NetNs, pairs: u16, mode: ThreadingMode, features: u64) -> Guest {
        let config = NetConfig {
            name: format!("kv{}", ns.n),
            tap: TAP.into(),
            mac: GUEST_MAC,
            queue_pairs: pairs,
            ..NetConfig::default()
        };
        let dev = NetDevice::new(config).expect("TAP");
        let ctrl = dev.ctrl_queue_index(dev_features(&dev) & features);
        let opts = HarnessOpts { mode, driver_features: features, ..HarnessOpts::default() };
        let h = Harness::start(Box::new(dev), opts).expect("activate");
        Guest { h, rx: HashMap::new(), ctrl }
    }

    fn mergeable(&self) -> bool {
        self.h.features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    /// Posts `count` receive buffers of `size` bytes on rx queue `q`.
    fn post_rx(&mut self, q: u16, count: usize, size: u32) {
        for _ in 0..count {
            let a = self.h.guest.alloc(u64::from(size), 64);
            let head = self.h.queues[usize::from(q)].post(&[Buf::inb(a, size)]).expect("rx ring full");
            self.rx.entry(q).or_default().insert(head, (a, size));
        }
        let dq = &mut self.h.queues[usize::from(q)];
        dq.enable_interrupts();
        dq.kick();
    }

    /// Sends `frame` with virtio-net header `hdr` on tx queue `q`.
    fn send(&mut self, q: u16, hdr: &[u8; 12], frame: &[u8]) {
        let mut data = hdr.to_vec();
        data.extend_from_slice(frame);
        let a = self.h.guest.alloc_bytes(&data);
        let dq = &mut self.h.queues[usize::from(q)];
        while dq.pop_used().is_some() {}
        dq.post(&[Buf::out(a, data.len() as u32)]).expect("tx ring full");
        dq.kick();
    }

    /// The next packet on rx queue `q`, its buffers re-posted.
    fn recv_one(&mut self, q: u16, timeout: Duration) -> Option<Received> {
        let mut used = Vec::new();
        let mut bytes = Vec::new();
        let (head, len) = self.h.queues[usize::from(q)].wait_used(timeout)?;
        self.take_buffer(q, head, len, &mut bytes);
        used.push(len);
        let mut hdr = [0u8; 12];
        hdr.copy_from_slice(&bytes[..12]);
        let nbufs = u16::from_le_bytes([hdr[10], hdr[11]]);
        if self.mergeable() {
            for _ in 1..nbufs {
                let (head, len) = self.h.queues[usize::from(q)].wait_used(WAIT).expect("rest of a merged packet");
                self.take_buffer(q, head, len, &mut bytes);
                used.push(len);
            }
        } else {
            assert_eq!(nbufs, 1, "num_buffers must be 1 without mergeable buffers");
        }
        Some(Received { hdr, frame: bytes[12..].to_vec(), used })
    }

    fn take_buffer(&mut self, q: u16, head: u16, len: u32, out: &mut Vec<u8>) {
        let (a, size) = self.rx.get_mut(&q).and_then(|m| m.remove(&head)).expect("used head we posted");
        assert!(len <= size, "device wrote {len} bytes into a {size}-byte buffer");
        out.extend(self.h.guest.read(a, len as usize));
        let dq = &mut self.h.queues[usize::from(q)];
        let head = dq.post(&[Buf::inb(a, size)]).expect("re-post");
        self.rx.entry(q).or_default().insert(head, (a, size));
        dq.enable_interrupts();
        dq.kick();
    }

    /// The next packet on rx queue `q` that `want` accepts (others, e.g.
    /// the kernel's ARP, are skipped).
    fn recv(&mut self, q: u16, want: impl Fn(&[u8]) -> bool) -> Option<Received> {
        let end = Instant::now() + WAIT;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            let r = self.recv_one(q, left)?;
            if want(&r.frame) {
                return Some(r);
            }
        }
        None
    }

    /// Sends a control command; returns the ack.
    fn ctrl(&mut self, class: u8, cmd: u8, data: &[u8]) -> u8 {
        let mut c = vec![class, cmd];
        c.extend_from_slice(data);
        let a = self.h.guest.alloc_bytes(&c);
        let ack = self.h.guest.alloc(1, 1);
        self.h.guest.write(ack, &[0xff]);
        let dq = &mut self.h.queues[usize::from(self.ctrl)];
        dq.post(&[Buf::out(a, c.len() as u32), Buf::inb(ack, 1)]).expect("ctrl ring");
        dq.kick();
        let (_, len) = dq.wait_used(WAIT).expect("ctrl reply");
        assert_eq!(len, 1);
        self.h.guest.read(ack, 1)[0]
    }

    /// A full ICMP echo exchange with the kernel on pair `pair`, from
    /// `src`; returns the rx queue the reply arrived on.
    fn ping(&mut self, pair: u16, src: &[u8; 4], seq: u16, rx_queues: &[u16]) -> u16 {
        let id = 0x4b00 + pair;
        self.send(2 * pair + 1, &[0; 12], &icmp_echo(&GUEST_MAC, src, &TAP_IP, id, seq));
        let end = Instant::now() + WAIT;
        while Instant::now() < end {
            for &q in rx_queues {
                if let Some(r) = self.recv_one(q, Duration::from_millis(20)) {
                    if is_echo_reply(&r.frame, src, id, seq) {
                        return q;
                    }
                }
            }
        }
        panic!("no echo reply for {} seq {seq} via pair {pair}", ip_str(src));
    }

    fn errors(&self, q: u16) -> u64 {
        self.h.device.state().queue(usize::from(q)).errors
    }
}

fn dev_features(d: &NetDevice) -> u64 {
    use kickvm_virtio::VirtioDevice;
    d.features()
}

/// What Linux takes by default except the receive offloads and mergeable
/// buffers, which tests turn on where they test them.
fn basic_features() -> u64 {
    !(bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6))
}

// ------------------------------------------------------------------- tests

/// Raw frames both ways and a real ping, in one threading mode.
fn frames_and_ping(mode: ThreadingMode) {
    let Some(ns) = NetNs::new() else { return };
    let mut g = Guest::start(&ns, 1, mode, basic_features());
    ns.configure_tap(&[(GUEST_IP, GUEST_MAC)]);
    let sock = PacketSocket::open(TAP, false);
    g.post_rx(0, 16, 1526);

    // Guest → TAP.
    let mut out = eth(&[0xff; 6], &GUEST_MAC, ETH_P_TEST);
    out.extend_from_slice(b"from the guest, straight out of its buffer");
    g.send(1, &[0; 12], &out);
    let (_, got) = sock.recv(|f| f[12..14] == ETH_P_TEST.to_be_bytes()).expect("guest frame on the TAP");
    assert_eq!(got, out);

    // TAP → guest.
    let mut inb = eth(&GUEST_MAC, &TAP_MAC, ETH_P_TEST);
    inb.extend_from_slice(b"from the host, read straight into a guest buffer");
    sock.send(None, &inb);
    let r = g.recv(0, |f| f[12..14] == ETH_P_TEST.to_be_bytes()).expect("host frame in a guest buffer");
    assert_eq!(r.frame, inb);
    assert_eq!(r.used, vec![12 + inb.len() as u32]);
    assert_eq!(r.hdr[..10], [0; 10], "no offload negotiated");

    // A real ping: the kernel answers the guest's echo request.
    for seq in 1..=3 {
        g.ping(0, &GUEST_IP, seq, &[0]);
    }
    assert_eq!(g.errors(0) + g.errors(1), 0);
}

#[test]
fn frames_and_ping_per_queue() {
    frames_and_ping(ThreadingMode::PerQueue);
}

#[test]
fn frames_and_ping_per_device() {
    frames_and_ping(ThreadingMode::PerDevice);
}

#[test]
fn frames_and_ping_single_thread() {
    frames_and_ping(ThreadingMode::Single);
}

#[test]
fn arp_request_gets_the_kernels_reply() {
    let Some(ns) = NetNs::new() else { return };
    let mut g = Guest::start(&ns, 1, ThreadingMode::PerQueue, basic_features());
    ns.configure_tap(&[]);
    g.post_rx(0, 8, 1526);
    let mut arp = eth(&[0xff; 6], &GUEST_MAC, 0x0806);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&GUEST_IP);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&TAP_IP);
    g.send(1, &[0; 12], &arp);
    let r = g.recv(0, |f| f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2]).expect("ARP reply");
    assert_eq!(r.frame[22..28], TAP_MAC, "sender hardware address is the TAP's");
    assert_eq!(r.frame[28..32], TAP_IP);
}

#[test]
fn guest_tso4_packet_reaches_the_kernel_whole() {
    let Some(ns) = NetNs::new() else { return };
    let mut g = Guest::start(&ns, 1, ThreadingMode::PerQueue, basic_features());
    assert!(g.h.features & bit(VIRTIO_NET_F_HOST_TSO4) != 0);
    ns.configure_tap(&[(GUEST_IP, GUEST_MAC)]);
    let sock = PacketSocket::open(TAP, true);
    let frame = tcp_frame(&TAP_MAC, &GUEST_MAC, &GUEST_IP, &[10, 0, 0, 9], 4000);
    let mut hdr = [0u8; 12];
    hdr[..10].copy_from_slice(&tso4_hdr(1000));
    g.send(1, &hdr, &frame);
    let (vh, got) = sock.recv(|f| f.len() > 1514 && f[23] == 6).expect("GSO frame on the TAP");
    assert_eq!(got.len(), frame.len());
    assert_eq!(got[54..], frame[54..], "payload intact");
    assert_eq!(vh[1], VIRTIO_NET_HDR_GSO_TCPV4 as u8, "the kernel kept it as one TSO packet");
    assert_eq!(u16::from_le_bytes([vh[4], vh[5]]), 1000, "gso_size");
    assert_eq!(g.errors(1), 0);
}

#[test]
fn kernel_gso_packet_lands_whole_in_mergeable_buffers() {
    let Some(ns) = NetNs::new() else { return };
    let mut g = Guest::start(&ns, 1, ThreadingMode::PerQueue, !0);
    assert!(g.mergeable());
    ns.configure_tap(&[(GUEST_IP, GUEST_MAC)]);
    let sock = PacketSocket::open(TAP, true);
    // 2 KiB buffers: a 64 KiB GSO packet needs 33 of them.
    g.post_rx(0, 200, 2048);

    // A plain frame bigger than one buffer… no: MTU-sized frames fit one.
    let small = tcp_frame(&GUEST_MAC, &TAP_MAC, &TAP_IP, &GUEST_IP, 100);
    sock.send(None, &small);
    let r = g.recv(0, |f| f.len() == small.len()).expect("small frame");
    assert_eq!(r.used.len(), 1);
    assert_eq!(r.frame[54..], small[54..]);

    // A GSO packet from the kernel, kept whole (TUN_F_TSO4) and spread
    // over several guest buffers.
    let big = tcp_frame(&GUEST_MAC, &TAP_MAC, &TAP_IP, &GUEST_IP, 6000);
    sock.send(Some(&tso4_hdr(1448)), &big);
    let r = g.recv(0, |f| f.len() > 1514).expect("GSO packet");
    assert_eq!(r.frame.len(), big.len());
    assert_eq!(r.frame[54..], big[54..], "payload intact");
    assert_eq!(r.hdr[1], VIRTIO_NET_HDR_GSO_TCPV4 as u8);
    assert_eq!(u16::from_le_bytes([r.hdr[4], r.hdr[5]]), 1448, "gso_size");
    assert_eq!(r.hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, VIRTIO_NET_HDR_F_NEEDS_CSUM as u8);
    let total = 12 + big.len();
    assert_eq!(r.used.len(), total.div_ceil(2048), "num_buffers");
    assert!(r.used[..r.used.len() - 1].iter().all(|&l| l == 2048), "{:?}", r.used);
    assert_eq!(r.used.iter().sum::<u32>() as usize, total);
    assert_eq!(g.errors(0), 0);
}

#[test]
fn mergeable_buffers_without_gso_split_one_frame() {
    let Some(ns) = NetNs::new() else { return };
    let mut g = Guest::start(&ns, 1, ThreadingMode::PerQueue, basic_features() | bit(VIRTIO_NET_F_MRG_RXBUF));
    assert!(g.mergeable());
    ns.configure_tap(&[(GUEST_IP, GUEST_MAC)]);
    let sock = PacketSocket::open(TAP, false);
    g.post_rx(0, 16, 512);
    let mut f = eth(&GUEST_MAC, &TAP_MAC, ETH_P_TEST);
    f.extend((0..1400).map(|i| i as u8));
    sock.send(None, &f);
    let r = g.recv(0, |x| x[12..14] == ETH_P_TEST.to_be_bytes()).expect("frame");
    assert_eq!(r.frame, f);
    assert_eq!(r.used, vec![512, 512, (12 + f.len() - 1024) as u32]);
    g.ping(0, &GUEST_IP, 1, &[0]);
}

#[test]
fn without_guest_offloads_the_kernel_segments_and_checksums() {
    let Some(ns) = NetNs::new() else { return };
    let mut g = Guest::start(&ns, 1, ThreadingMode::PerQueue, basic_features());
    ns.configure_tap(&[(GUEST_IP, GUEST_MAC)]);
    let sock = PacketSocket::open(TAP, true);
    g.post_rx(0, 32, 1526);
    let big = tcp_frame(&GUEST_MAC, &TAP_MAC, &TAP_IP, &GUEST_IP, 3000);
    sock.send(Some(&tso4_hdr(1000)), &big);
    let mut payload = Vec::new();
    for _ in 0..3 {
        let r = g.recv(0, |f| f.len() > 54 && f[23] == 6).expect("segment");
        assert!(r.frame.len() <= 1514);
        assert_eq!(r.hdr[..10], [0; 10], "plain, fully checksummed frames");
        payload.extend_from_slice(&r.frame[54..]);
    }
    assert_eq!(payload, big[54..]);
}

#[test]
fn two_queue_pairs_both_carry_traffic() {
    let Some(ns) = NetNs::new() else { return };
    let mut g = Guest::start(&ns, 2, ThreadingMode::PerQueue, basic_features());
    assert!(g.h.features & bit(VIRTIO_NET_F_MQ) != 0);
    assert_eq!(g.ctrl, 4);
    let second_ip = [10, 0, 0, 3];
    ns.configure_tap(&[(GUEST_IP, GUEST_MAC), (second_ip, GUEST_MAC)]);
    g.post_rx(0, 16, 1526);
    g.post_rx(2, 16, 1526);
    assert_eq!(g.ctrl(VIRTIO_NET_CTRL_MQ as u8, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8, &2u16.to_le_bytes()), 0);
    assert_eq!(g.ctrl(VIRTIO_NET_CTRL_MQ as u8, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8, &3u16.to_le_bytes()), 1);
    // The TAP steers a flow's replies to the queue its requests came from
    // once it has seen the flow (the very first reply goes by hash).
    g.ping(0, &GUEST_IP, 1, &[0, 2]);
    g.ping(1, &second_ip, 1, &[0, 2]);
    for seq in 2..=4 {
        assert_eq!(g.ping(0, &GUEST_IP, seq, &[0, 2]), 0, "pair 0's flow");
        assert_eq!(g.ping(1, &second_ip, seq, &[0, 2]), 2, "pair 1's flow");
    }
    // Back to one pair: everything arrives on rx0.
    assert_eq!(g.ctrl(VIRTIO_NET_CTRL_MQ as u8, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8, &1u16.to_le_bytes()), 0);
    assert_eq!(g.ping(1, &second_ip, 9, &[0, 2]), 0);
    for q in 0..4 {
        assert_eq!(g.errors(q), 0, "queue {q}");
    }
    assert_eq!(g.errors(4), 1, "the refused VQ_PAIRS_SET 3 is counted");
}

#[test]
fn control_queue_acks_what_it_knows() {
    let Some(ns) = NetNs::new() else { return };
    let mut g = Guest::start(&ns, 1, ThreadingMode::PerQueue, !0);
    assert_eq!(g.ctrl, 2);
    assert_eq!(g.ctrl(VIRTIO_NET_CTRL_RX as u8, 0, &[1]), VIRTIO_NET_OK as u8, "promiscuous on");
    assert_eq!(g.ctrl(VIRTIO_NET_CTRL_RX as u8, 1, &[0]), VIRTIO_NET_OK as u8, "all-multicast off");
    assert_eq!(g.ctrl(VIRTIO_NET_CTRL_RX as u8, 9, &[0]), VIRTIO_NET_ERR as u8);
    assert_eq!(g.ctrl(1, 1, &[0; 6]), VIRTIO_NET_ERR as u8, "MAC address set is not offered");
    assert_eq!(g.ctrl(VIRTIO_NET_CTRL_MQ as u8, 0, &1u16.to_le_bytes()), VIRTIO_NET_ERR as u8, "no MQ");
    let config = |g: &Guest| {
        let mut cfg = [0u8; 12];
        g.h.device.read_config(0, &mut cfg);
        cfg
    };
    let cfg = config(&g);
    assert_eq!(cfg[..6], GUEST_MAC);
    // Nobody has set the new TAP up yet: the guest's link is down.
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 0, "link status while the TAP is down");
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1, "max_virtqueue_pairs");
    // The host sets it up: the device notices within its probe interval.
    ns.configure_tap(&[(GUEST_IP, GUEST_MAC)]);
    let end = Instant::now() + Duration::from_secs(5);
    while u16::from_le_bytes([config(&g)[6], config(&g)[7]]) != VIRTIO_NET_S_LINK_UP as u16 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let cfg = config(&g);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), VIRTIO_NET_S_LINK_UP as u16, "link status once the TAP is up");
}

#[test]
fn reset_stops_a_receive_thread_blocked_in_readv() {
    let Some(ns) = NetNs::new() else { return };
    let mut g = Guest::start(&ns, 1, ThreadingMode::PerQueue, basic_features());
    ns.configure_tap(&[(GUEST_IP, GUEST_MAC)]);
    g.post_rx(0, 8, 1526);
    g.ping(0, &GUEST_IP, 1, &[0]);
    // Now rx0's thread sleeps in readv on the TAP, holding a guest buffer.
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    g.h.reset();
    let took = t.elapsed();
    assert!(took < Duration::from_millis(100), "reset took {took:?}");
    assert!(!thread_exists(&format!("kv{}-q0", ns.n)), "rx thread gone");

    // The driver sets the device up again; the same TAP carries on.
    g.h.restart().expect("re-activate");
    g.rx.clear();
    g.post_rx(0, 8, 1526);
    for seq in 2..=4 {
        g.ping(0, &GUEST_IP, seq, &[0]);
    }
}

fn thread_exists(name: &str) -> bool {
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .any(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name))
}

#[test]
fn malformed_transmit_chains_are_counted_and_traffic_goes_on() {
    let Some(ns) = NetNs::new() else { return };
    let mut g = Guest::start(&ns, 1, ThreadingMode::PerQueue, basic_features());
    ns.configure_tap(&[(GUEST_IP, GUEST_MAC)]);
    g.post_rx(0, 8, 1526);
    let frame = icmp_echo(&GUEST_MAC, &GUEST_IP, &TAP_IP, 1, 1);
    let a = g.h.guest.alloc_bytes(&[&[0u8; 12][..], &frame].concat());
    let w = g.h.guest.alloc(64, 8);
    let short = g.h.guest.alloc_bytes(&[0; 6]);
    let tx = &mut g.h.queues[1];
    // A device-writable descriptor in a transmit chain.
    let bad = tx.post(&[Buf::out(a, 12 + frame.len() as u32), Buf::inb(w, 64)]).unwrap();
    // Shorter than the virtio-net header.
    let short_head = tx.post(&[Buf::out(short, 6)]).unwrap();
    tx.kick();
    let mut back = vec![tx.wait_used(WAIT).expect("bad chain returned"), tx.wait_used(WAIT).expect("short chain")];
    back.sort();
    let mut want = vec![(bad, 0), (short_head, 0)];
    want.sort();
    assert_eq!(back, want);
    assert_eq!(g.errors(1), 2);
    // Both queues still work.
    g.ping(0, &GUEST_IP, 2, &[0]);
    assert_eq!(g.errors(0), 0);
}

#[test]
fn receive_chain_with_readable_descriptor_is_refused() {
    let Some(ns) = NetNs::new() else { return };
    let mut g = Guest::start(&ns, 1, ThreadingMode::PerQueue, basic_features());
    ns.configure_tap(&[(GUEST_IP, GUEST_MAC)]);
    let r = g.h.guest.alloc(16, 8);
    let w = g.h.guest.alloc(1526, 8);
    let rxq = &mut g.h.queues[0];
    let bad = rxq.post(&[Buf::out(r, 16), Buf::inb(w, 1526)]).unwrap();
    rxq.kick();
    assert_eq!(rxq.wait_used(WAIT), Some((bad, 0)));
    assert_eq!(g.errors(0), 1);
    g.post_rx(0, 4, 1526);
    g.ping(0, &GUEST_IP, 1, &[0]);
}

/// CPU time (clock ticks) a thread of this process has used, by name.
fn thread_cpu_ticks(name: &str) -> Option<u64> {
    for t in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        if std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name) {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            let after = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            return Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?);
        }
    }
    None
}

#[test]
fn receive_waits_for_enough_guest_buffers_without_spinning() {
    let Some(ns) = NetNs::new() else { return };
    // Mergeable buffers: a packet needs at least an MTU's worth held.
    let mut g = Guest::start(&ns, 1, ThreadingMode::PerQueue, basic_features() | bit(VIRTIO_NET_F_MRG_RXBUF));
    ns.configure_tap(&[(GUEST_IP, GUEST_MAC)]);
    let sock = PacketSocket::open(TAP, false);
    let mut f = eth(&GUEST_MAC, &TAP_MAC, ETH_P_TEST);
    f.extend((0..1000).map(|i| i as u8));
    // The guest has no buffers at all: the packet waits in the TAP.
    sock.send(None, &f);
    // Then too few for an MTU-sized packet (2 × 512 < 1526).
    g.post_rx(0, 2, 512);
    let rx = format!("kv{}-q0", ns.n);
    std::thread::sleep(Duration::from_millis(50));
    let before = thread_cpu_ticks(&rx).expect("rx thread");
    std::thread::sleep(Duration::from_millis(300));
    let after = thread_cpu_ticks(&rx).expect("rx thread");
    assert!(after - before <= 2, "rx thread spun while waiting for buffers ({} ticks)", after - before);
    assert!(g.h.queues[0].pop_used().is_none(), "nothing delivered yet");
    // Enough now: the waiting packet lands, across the held buffers.
    g.post_rx(0, 2, 512);
    let r = g.recv(0, |x| x[12..14] == ETH_P_TEST.to_be_bytes()).expect("packet after the kick");
    assert_eq!(r.frame, f);
    assert_eq!(r.used, vec![512, 512, (12 + f.len() - 1024) as u32]);
}

/// Reset and re-activate, again and again, with every queue-pair count and
/// in every threading mode: after every other activation the driver asks
/// for all its pairs (re-attaching TAP queues), and a ping over the last
/// pair in use must work. The device once died on the second activation
/// (detaching TAP queues the first had already detached).
#[test]
fn reset_and_reactivate_cycles_keep_every_pair_working() {
    for mode in [ThreadingMode::PerQueue, ThreadingMode::PerDevice, ThreadingMode::Single] {
        for pairs in [1u16, 2, 4] {
            let Some(ns) = NetNs::new() else { return };
            let mut g = Guest::start(&ns, pairs, mode, basic_features());
            ns.configure_tap(&[(GUEST_IP, GUEST_MAC)]);
            let rx: Vec<u16> = (0..pairs).map(|p| 2 * p).collect();
            for cycle in 0..8u16 {
                if cycle > 0 {
                    g.h.restart().unwrap_or_else(|e| panic!("{mode}, {pairs} pairs: re-activation {cycle}: {e}"));
                    g.rx.clear();
                }
                // Every other cycle the driver stays on one pair, so some
                // resets find TAP queues detached and some attached.
                let used = if cycle % 2 == 0 { pairs } else { 1 };
                if used > 1 {
                    let ack = g.ctrl(VIRTIO_NET_CTRL_MQ as u8, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8, &used.to_le_bytes());
                    assert_eq!(ack, VIRTIO_NET_OK as u8, "{mode}, {pairs} pairs, cycle {cycle}");
                }
                for &q in &rx {
                    g.post_rx(q, 8, 1526);
                }
                g.ping(used - 1, &GUEST_IP, cycle + 1, &rx);
                assert!(!g.h.needs_reset(), "{mode}, {pairs} pairs, cycle {cycle}");
            }
            let errors: u64 = (0..2 * pairs + 1).map(|q| g.errors(q)).sum();
            assert_eq!(errors, 0, "{mode}, {pairs} pairs");
        }
    }
}
