//! virtio-vsock with hybrid vsock, driven by the test guest driver playing
//! Linux's vsock driver, against real Unix sockets on the host side: host
//! programs `CONNECT`ing to the device's socket, and listeners on
//! `SOCKET_<port>` for the guest's connections. Every threading mode.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kickvm_virtio::driver::{Buf, Harness, HarnessOpts};
use kickvm_virtio::vsock::packet::{Header, HDR_LEN, SHUTDOWN_RCV, SHUTDOWN_SEND};
use kickvm_virtio::vsock::{Vsock, VsockConfig, BUF_ALLOC, EVENT, MAX_CONNECTIONS, RX, TX};
use kickvm_virtio::{ThreadingMode, VirtioDevice};
use vm_memory::GuestAddress;

const MODES: [ThreadingMode; 3] = [ThreadingMode::PerQueue, ThreadingMode::PerDevice, ThreadingMode::Single];
const T: Duration = Duration::from_secs(5);
const CID: u64 = 3;
/// The receive buffer the test guest advertises (Linux's default).
const GUEST_BUF: u32 = 256 * 1024;
/// Receive buffers: a header and a 4 KiB page, as Linux posts them.
const RX_BUFFERS: usize = 64;
const RX_PAGE: u32 = 4096;

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;

/// A scratch directory for one test's sockets, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("kickvm-vsock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn socket(&self) -> PathBuf {
        self.0.join("v.sock")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A packet header from the guest (`src_port`) to the host (`dst_port`).
fn hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: 2,
        src_port,
        dst_port,
        len: 0,
        kind: 1,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF,
        fwd_cnt: 0,
    }
}

/// The test guest: the device, its rings, and Linux's vsock driver's habits.
struct Guest {
    h: Harness,
    /// Receive buffers by the head they were posted under.
    rx: HashMap<u16, (GuestAddress, GuestAddress)>,
    tx_buf: GuestAddress,
}

impl Guest {
    fn new(socket: &Path, mode: ThreadingMode) -> Guest {
        let dev = Vsock::new(VsockConfig { name: "vsock0".into(), cid: CID, socket: socket.to_path_buf(), seccomp: Default::default() }).unwrap();
        let h = Harness::start(Box::new(dev), HarnessOpts { mode, ..Default::default() }).unwrap();
        let mut g = Guest { h, rx: HashMap::new(), tx_buf: GuestAddress(0) };
        g.fill();
        g
    }

    /// Posts fresh receive and event buffers (at start and after a reset).
    fn fill(&mut self) {
        self.rx.clear();
        self.tx_buf = self.h.guest.alloc(HDR_LEN as u64 + 65536, 16);
        for _ in 0..RX_BUFFERS {
            let hd = self.h.guest.alloc(HDR_LEN as u64, 8);
            let page = self.h.guest.alloc(u64::from(RX_PAGE), 16);
            self.post_rx(hd, page);
        }
        for _ in 0..4 {
            let e = self.h.guest.alloc(4, 4);
            self.h.queues[EVENT].post(&[Buf::inb(e, 4)]).unwrap();
        }
        self.h.queues[EVENT].kick();
        for q in &self.h.queues {
            q.enable_interrupts();
        }
        self.h.queues[RX].kick();
    }

    fn post_rx(&mut self, hd: GuestAddress, page: GuestAddress) {
        let head = self.h.queues[RX].post(&[Buf::inb(hd, HDR_LEN as u32), Buf::inb(page, RX_PAGE)]).unwrap();
        self.rx.insert(head, (hd, page));
    }

    /// Sends one packet and waits until the device has taken it.
    fn send(&mut self, mut h: Header, data: &[u8]) {
        h.len = data.len() as u32;
        self.send_raw(&h.to_bytes(), data);
    }

    /// Sends arbitrary header bytes and payload (hostile tests).
    fn send_raw(&mut self, header: &[u8], data: &[u8]) {
        self.h.guest.write(self.tx_buf, header);
        let payload = GuestAddress(self.tx_buf.0 + HDR_LEN as u64);
        self.h.guest.write(payload, data);
        let q = &mut self.h.queues[TX];
        if data.is_empty() {
            q.post(&[Buf::out(self.tx_buf, header.len() as u32)]).unwrap();
        } else {
            q.post(&[Buf::out(self.tx_buf, header.len() as u32), Buf::out(payload, data.len() as u32)]).unwrap();
        }
        q.kick();
        q.enable_interrupts();
        assert!(q.wait_used(T).is_some(), "the device takes every transmit chain");
    }

    /// The next packet the device sends the guest, within `timeout`.
    fn recv(&mut self, timeout: Duration) -> Option<(Header, Vec<u8>)> {
        self.h.queues[RX].enable_interrupts();
        let (head, len) = self.h.queues[RX].wait_used(timeout)?;
        let (hd, page) = self.rx.remove(&head).expect("a posted receive buffer");
        assert!(len as usize >= HDR_LEN, "used length {len} covers the header");
        let raw: [u8; HDR_LEN] = self.h.guest.read(hd, HDR_LEN).try_into().unwrap();
        let h = Header::from_bytes(&raw);
        assert_eq!(h.len as usize + HDR_LEN, len as usize, "used length = header + payload");
        let data = self.h.guest.read(page, h.len as usize);
        assert_eq!((h.src_cid, h.dst_cid, h.kind), (2, CID, 1));
        self.post_rx(hd, page);
        self.h.queues[RX].kick();
        Some((h, data))
    }

    /// The next packet with `op`, skipping credit updates.
    fn expect(&mut self, op: u16) -> (Header, Vec<u8>) {
        loop {
            let (h, d) = self.recv(T).unwrap_or_else(|| panic!("no packet (waiting for op {op})"));
            if h.op == op {
                return (h, d);
            }
            assert!(h.op == OP_CREDIT_UPDATE || h.op == OP_CREDIT_REQUEST, "op {} while waiting for {op}", h.op);
        }
    }

    /// True if nothing but credit packets arrives within `d`.
    fn quiet(&mut self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.recv(left) {
                None => return true,
                Some((h, _)) if h.op == OP_CREDIT_UPDATE || h.op == OP_CREDIT_REQUEST => {}
                Some(_) => return false,
            }
        }
        true
    }

    fn errors(&self) -> u64 {
        self.h.device.state().total().errors
    }
}

/// A guest-side stream: the guest's ends of one connection and its
/// credit bookkeeping, as Linux keeps it.
struct Stream {
    port: u32,
    host_port: u32,
    tx_cnt: u32,
    host_buf: u32,
    host_fwd: u32,
    fwd_cnt: u32,
}

impl Stream {
    fn new(port: u32, host_port: u32, from: &Header) -> Stream {
        Stream { port, host_port, tx_cnt: 0, host_buf: from.buf_alloc, host_fwd: from.fwd_cnt, fwd_cnt: 0 }
    }
    fn hdr(&self, op: u16) -> Header {
        Header { fwd_cnt: self.fwd_cnt, ..hdr(op, self.port, self.host_port) }
    }
    fn credit(&self) -> u32 {
        self.host_buf.saturating_sub(self.tx_cnt.wrapping_sub(self.host_fwd))
    }
    fn heard(&mut self, h: &Header) {
        if (h.src_port, h.dst_port) == (self.host_port, self.port) {
            self.host_buf = h.buf_alloc;
            self.host_fwd = h.fwd_cnt;
        }
    }
}

/// A host program connects to the device's socket for guest `port`; the
/// guest accepts. Returns the host's stream and the guest's side.
fn host_connect(g: &mut Guest, socket: &Path, port: u32) -> (UnixStream, Stream) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let (req, _) = g.expect(OP_REQUEST);
    assert_eq!(req.dst_port, port);
    assert_eq!(req.buf_alloc, BUF_ALLOC, "the device advertises its buffer");
    let st = Stream::new(port, req.src_port, &req);
    g.send(st.hdr(OP_RESPONSE), &[]);
    let line = read_line(&mut s);
    assert_eq!(line, format!("OK {}\n", req.src_port), "the host learns its port");
    (s, st)
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        assert_eq!(s.read(&mut b).unwrap(), 1, "the line ends");
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// The guest reads `len` bytes of one stream, telling the host about the
/// space it frees as Linux does (an update whenever 64 KiB were consumed).
fn guest_read(g: &mut Guest, st: &mut Stream, len: usize) -> Vec<u8> {
    let mut got = Vec::with_capacity(len);
    let mut told = st.fwd_cnt;
    while got.len() < len {
        let (h, d) = g.recv(T).unwrap_or_else(|| panic!("data stalled after {} of {len} bytes", got.len()));
        st.heard(&h);
        if h.op == OP_CREDIT_REQUEST {
            g.send(st.hdr(OP_CREDIT_UPDATE), &[]);
            continue;
        }
        if h.op != OP_RW {
            assert_eq!(h.op, OP_CREDIT_UPDATE, "only data and credit on an open stream");
            continue;
        }
        assert!(h.len > 0 && h.len <= RX_PAGE);
        got.extend_from_slice(&d);
        st.fwd_cnt = st.fwd_cnt.wrapping_add(h.len);
        if st.fwd_cnt.wrapping_sub(told) >= 64 * 1024 {
            g.send(st.hdr(OP_CREDIT_UPDATE), &[]);
            told = st.fwd_cnt;
        }
    }
    got
}

/// The guest writes `data` on one stream within the host's credit; when
/// the credit runs out it waits up to `patience` for an update. Returns
/// how much it wrote: all of it, unless the credit stayed gone.
fn guest_write_within_credit(g: &mut Guest, st: &mut Stream, data: &[u8], patience: Duration) -> usize {
    let mut at = 0;
    while at < data.len() {
        let n = (data.len() - at).min(32 * 1024).min(st.credit() as usize);
        if n == 0 {
            match g.recv(patience) {
                Some((h, _)) => st.heard(&h),
                None => break,
            }
            continue;
        }
        let mut h = st.hdr(OP_RW);
        h.len = n as u32;
        g.send(h, &data[at..at + n]);
        st.tx_cnt = st.tx_cnt.wrapping_add(n as u32);
        at += n;
    }
    at
}

/// The guest writes all of `data`, waiting for credit as Linux does.
fn guest_write(g: &mut Guest, st: &mut Stream, data: &[u8]) {
    assert_eq!(guest_write_within_credit(g, st, data, T), data.len(), "credit came back as the host read");
}

#[test]
fn host_connects_and_a_mebibyte_goes_each_way_in_every_mode() {
    for mode in MODES {
        let dir = Dir::new(&format!("mib-{mode}"));
        let mut g = Guest::new(&dir.socket(), mode);
        let (mut s, mut st) = host_connect(&mut g, &dir.socket(), 1024);

        let down = pattern(1 << 20, 1);
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            w.write_all(&down).unwrap();
            fnv(&down)
        });
        let got = guest_read(&mut g, &mut st, 1 << 20);
        assert_eq!(fnv(&got), writer.join().unwrap(), "{mode}: host → guest intact");

        let up = pattern(1 << 20, 2);
        let mut r = s.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut v = vec![0u8; 1 << 20];
            r.read_exact(&mut v).unwrap();
            fnv(&v)
        });
        guest_write(&mut g, &mut st, &up);
        assert_eq!(reader.join().unwrap(), fnv(&up), "{mode}: guest → host intact");

        // The guest closes: SHUTDOWN both ways, answered by RST; the host sees EOF.
        let mut sh = st.hdr(OP_SHUTDOWN);
        sh.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        g.send(sh, &[]);
        let (rst, _) = g.expect(OP_RST);
        assert_eq!((rst.src_port, rst.dst_port), (st.host_port, st.port));
        assert_eq!(s.read(&mut [0u8; 8]).unwrap(), 0, "{mode}: the host sees EOF");
        let c = g.h.device.state();
        assert_eq!(c.queue(RX).bytes, 1 << 20, "{mode}");
        assert_eq!(c.queue(TX).bytes, 1 << 20, "{mode}");
        assert_eq!(g.errors(), 0, "{mode}");
    }
}

#[test]
fn guest_connects_to_socket_port_and_is_refused_where_nobody_listens() {
    for mode in MODES {
        let dir = Dir::new(&format!("out-{mode}"));
        let mut g = Guest::new(&dir.socket(), mode);
        let listener = UnixListener::bind(format!("{}_5000", dir.socket().display())).unwrap();
        g.send(hdr(OP_REQUEST, 40000, 5000), &[]);
        let (resp, _) = g.expect(OP_RESPONSE);
        assert_eq!((resp.src_port, resp.dst_port), (5000, 40000), "{mode}");
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut st = Stream::new(40000, 5000, &resp);
        guest_write(&mut g, &mut st, b"ping from the guest");
        let mut buf = [0u8; 19];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping from the guest");
        s.write_all(b"pong").unwrap();
        assert_eq!(guest_read(&mut g, &mut st, 4), b"pong", "{mode}");

        // No listener on port 5001: the guest's connect is refused.
        g.send(hdr(OP_REQUEST, 40001, 5001), &[]);
        let (rst, _) = g.expect(OP_RST);
        assert_eq!((rst.src_port, rst.dst_port), (5001, 40001), "{mode}");
        // The host closes: the guest hears SHUTDOWN (both ways: it left).
        drop(s);
        let (sh, _) = g.expect(OP_SHUTDOWN);
        assert_eq!(sh.flags, SHUTDOWN_RCV | SHUTDOWN_SEND, "{mode}");
        g.send(st.hdr(OP_RST), &[]);
        assert_eq!(g.errors(), 0, "{mode}");
    }
}

#[test]
fn host_to_guest_data_waits_for_the_guests_credit() {
    let dir = Dir::new("credit-in");
    let mut g = Guest::new(&dir.socket(), ThreadingMode::PerQueue);
    let mut s = UnixStream::connect(dir.socket()).unwrap();
    s.write_all(b"CONNECT 7\n").unwrap();
    let (req, _) = g.expect(OP_REQUEST);
    let mut st = Stream::new(7, req.src_port, &req);
    // A slow reader: 8 KiB of buffer, and no update until it says so.
    let small = |st: &Stream, op| Header { buf_alloc: 8192, ..st.hdr(op) };
    g.send(small(&st, OP_RESPONSE), &[]);
    read_line(&mut s);
    let data = pattern(64 * 1024, 3);
    s.write_all(&data).unwrap();
    let mut got = Vec::new();
    let mut asked = false;
    let end = Instant::now() + Duration::from_millis(500);
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        let Some((h, d)) = g.recv(left) else { break };
        match h.op {
            OP_RW => got.extend_from_slice(&d),
            OP_CREDIT_REQUEST => asked = true,
            op => panic!("unexpected op {op}"),
        }
    }
    assert_eq!(got.len(), 8192, "no more than the guest's buffer");
    assert!(asked, "the device asks for credit when it has none");
    // The guest read it all: 8 KiB more may come.
    st.fwd_cnt = 8192;
    g.send(small(&st, OP_CREDIT_UPDATE), &[]);
    while got.len() < 16384 {
        let (h, d) = g.recv(T).expect("data after the update");
        if h.op == OP_RW {
            got.extend_from_slice(&d);
        }
    }
    assert_eq!(got.len(), 16384);
    assert_eq!(got, data[..16384]);
    assert_eq!(g.errors(), 0);
}

#[test]
fn guest_to_host_data_is_held_for_a_slow_reader_and_bounded_by_credit() {
    let dir = Dir::new("credit-out");
    let mut g = Guest::new(&dir.socket(), ThreadingMode::PerQueue);
    let (mut s, mut st) = host_connect(&mut g, &dir.socket(), 9);
    // The host does not read: the guest sends until the credit runs out.
    let data = pattern(4 << 20, 4);
    let at = guest_write_within_credit(&mut g, &mut st, &data, Duration::from_millis(300));
    assert!(at < data.len(), "the guest ran out of credit before 4 MiB");
    assert!(g.quiet(Duration::from_millis(200)), "and nothing more comes while the host does not read");
    // The host reads: everything arrives, in order, and the credit comes back.
    let mut r = s.try_clone().unwrap();
    let sent = at;
    let reader = std::thread::spawn(move || {
        let mut v = vec![0u8; sent];
        r.read_exact(&mut v).unwrap();
        v
    });
    let got = reader.join().unwrap();
    assert_eq!(got, data[..sent]);
    let end = Instant::now() + T;
    while st.credit() < BUF_ALLOC && Instant::now() < end {
        if let Some((h, _)) = g.recv(Duration::from_millis(100)) {
            st.heard(&h);
        }
    }
    assert_eq!(st.credit(), BUF_ALLOC, "all of the buffer is free again");
    // A guest that sends past its credit loses the connection.
    for _ in 0..64 {
        let mut h = st.hdr(OP_RW);
        h.len = 32768;
        g.send(h, &data[..32768]);
    }
    let (rst, _) = g.expect(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (st.host_port, st.port));
    assert!(g.errors() >= 1, "counted");
    s.set_read_timeout(Some(T)).unwrap();
    let mut sink = Vec::new();
    s.read_to_end(&mut sink).unwrap();
}

#[test]
fn shutdown_each_way_and_a_host_peer_that_vanishes() {
    let dir = Dir::new("shutdown");
    let mut g = Guest::new(&dir.socket(), ThreadingMode::PerQueue);
    let (mut s, mut st) = host_connect(&mut g, &dir.socket(), 22);
    // The guest will send no more: the host reads EOF and can still write.
    guest_write(&mut g, &mut st, b"last words");
    let mut sh = st.hdr(OP_SHUTDOWN);
    sh.flags = SHUTDOWN_SEND;
    g.send(sh, &[]);
    let mut v = Vec::new();
    s.read_to_end(&mut v).unwrap();
    assert_eq!(v, b"last words");
    s.write_all(b"reply").unwrap();
    assert_eq!(guest_read(&mut g, &mut st, 5), b"reply");
    // Then the host shuts its side: SHUTDOWN to the guest, both sides done: RST.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    loop {
        let (h, _) = g.recv(T).expect("the end of the stream");
        match h.op {
            OP_RST => break,
            OP_SHUTDOWN => assert_eq!(h.flags & SHUTDOWN_SEND, SHUTDOWN_SEND),
            op => assert_eq!(op, OP_CREDIT_UPDATE),
        }
    }

    // A host program that vanishes mid-stream.
    let (s2, st2) = host_connect(&mut g, &dir.socket(), 23);
    drop(s2);
    let (sh, _) = g.expect(OP_SHUTDOWN);
    assert_eq!(sh.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    // Data the guest still sends ends the connection.
    let mut h = st2.hdr(OP_RW);
    h.len = 3;
    g.send(h, b"abc");
    g.expect(OP_RST);
    // A host program that leaves before the guest answered its REQUEST.
    let mut s3 = UnixStream::connect(dir.socket()).unwrap();
    s3.write_all(b"CONNECT 24\n").unwrap();
    let (req, _) = g.expect(OP_REQUEST);
    drop(s3);
    g.send(Stream::new(24, req.src_port, &req).hdr(OP_RESPONSE), &[]);
    g.expect(OP_RST);
    // The device goes on.
    let (mut s4, mut st4) = host_connect(&mut g, &dir.socket(), 25);
    s4.write_all(b"fine").unwrap();
    assert_eq!(guest_read(&mut g, &mut st4, 4), b"fine");
}

#[test]
fn hostile_packets_are_counted_and_the_device_goes_on() {
    for mode in MODES {
        let dir = Dir::new(&format!("hostile-{mode}"));
        let mut g = Guest::new(&dir.socket(), mode);
        let _l = UnixListener::bind(format!("{}_80", dir.socket().display())).unwrap();
        let (mut s, st) = host_connect(&mut g, &dir.socket(), 1024);
        let before = g.errors();
        // A packet shorter than its header.
        g.send_raw(&[0u8; 20], &[]);
        // Claimed length longer than what is carried.
        let mut h = st.hdr(OP_RW);
        h.len = 1000;
        g.send_raw(&h.to_bytes(), &[1, 2, 3]);
        // Length over the 64 KiB limit.
        let mut h = st.hdr(OP_RW);
        h.len = 1 << 20;
        g.send_raw(&h.to_bytes(), &[0u8; 8]);
        // Unknown op, wrong source cid, wrong destination cid, seqpacket.
        g.send(Header { op: 99, ..hdr(0, 1, 80) }, &[]);
        g.send(Header { src_cid: 7, ..hdr(OP_REQUEST, 1, 80) }, &[]);
        g.send(Header { dst_cid: 5, ..hdr(OP_REQUEST, 1, 80) }, &[]);
        g.send(Header { kind: 2, ..hdr(OP_REQUEST, 1, 80) }, &[]);
        // A device-writable transmit buffer.
        let a = g.h.guest.alloc(64, 16);
        g.h.queues[TX].post(&[Buf::inb(a, 64)]).unwrap();
        g.h.queues[TX].kick();
        assert!(g.h.queues[TX].wait_used(T).is_some());
        // Data with a payload on a control op.
        g.send(hdr(OP_CREDIT_UPDATE, 1, 80), b"junk");
        assert!(g.errors() >= before + 9, "{mode}: each one counted ({} → {})", before, g.errors());
        // The connection the bad-length packet named was reset; others not.
        let (rst, _) = g.expect(OP_RST);
        assert_eq!((rst.src_port, rst.dst_port), (st.host_port, st.port), "{mode}");
        assert_eq!(s.read(&mut [0u8; 4]).unwrap(), 0, "{mode}: its host socket closed");
        while g.recv(Duration::from_millis(100)).is_some() {}
        assert!(!g.h.needs_reset(), "{mode}");
        let (mut s2, mut st2) = host_connect(&mut g, &dir.socket(), 1025);
        s2.write_all(b"still here").unwrap();
        assert_eq!(guest_read(&mut g, &mut st2, 10), b"still here", "{mode}");
    }
}

#[test]
fn a_flood_of_requests_keeps_connections_and_fds_bounded() {
    for mode in MODES {
        let dir = Dir::new(&format!("flood-{mode}"));
        let mut g = Guest::new(&dir.socket(), mode);
        let listener = UnixListener::bind(format!("{}_80", dir.socket().display())).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut accepted = Vec::new();
        let (mut responses, mut rsts) = (0, 0);
        // The guest opens connections without end and reads its replies
        // only now and then; the host accepts everything that arrives.
        for i in 0..(MAX_CONNECTIONS as u32 + 200) {
            g.send(hdr(OP_REQUEST, 10000 + i, 80), &[]);
            while let Ok((c, _)) = listener.accept() {
                accepted.push(c);
            }
            if i % 32 == 0 {
                while let Some((h, _)) = g.recv(Duration::from_millis(1)) {
                    match h.op {
                        OP_RESPONSE => responses += 1,
                        OP_RST => rsts += 1,
                        _ => {}
                    }
                }
            }
        }
        while let Some((h, _)) = g.recv(Duration::from_millis(200)) {
            match h.op {
                OP_RESPONSE => responses += 1,
                OP_RST => rsts += 1,
                _ => {}
            }
        }
        while let Ok((c, _)) = listener.accept() {
            accepted.push(c);
        }
        assert_eq!(responses, MAX_CONNECTIONS, "{mode}: at most {MAX_CONNECTIONS} connections");
        assert_eq!(rsts, 200, "{mode}: the rest refused");
        assert_eq!(accepted.len(), MAX_CONNECTIONS, "{mode}");
        // A host program cannot get in while the table is full...
        let mut s = UnixStream::connect(dir.socket()).unwrap();
        s.write_all(b"CONNECT 1024\n").unwrap();
        assert!(g.quiet(Duration::from_millis(200)), "{mode}: no REQUEST while full");
        // ...and can once the guest closes one.
        g.send(hdr(OP_RST, 10000, 80), &[]);
        let (req, _) = g.expect(OP_REQUEST);
        assert_eq!(req.dst_port, 1024, "{mode}");
    }
}

#[test]
fn never_read_data_and_bad_host_programs_stay_bounded() {
    let dir = Dir::new("bounded");
    let mut g = Guest::new(&dir.socket(), ThreadingMode::PerQueue);
    // Host programs that send garbage or an endless line are disconnected.
    for junk in [&b"HELLO 5\n"[..], b"CONNECT x\n", &[b'C'; 100][..]] {
        let mut s = UnixStream::connect(dir.socket()).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(junk).unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        assert!(sink.is_empty(), "{junk:?}: no answer but EOF");
    }
    // A guest cannot reach a host program that has not sent its line yet
    // (it has no ports): its packets naming port 0 are refused with RST.
    let mut waiting = UnixStream::connect(dir.socket()).unwrap();
    waiting.write_all(b"CONN").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    g.send(hdr(OP_RW, 0, 0), &[]);
    g.send(hdr(OP_SHUTDOWN, 0, 0), &[]);
    assert_eq!(g.expect(OP_RST).0.src_port, 0);
    assert_eq!(g.expect(OP_RST).0.src_port, 0);
    waiting.write_all(b"ECT 77\n").unwrap();
    assert_eq!(g.expect(OP_REQUEST).0.dst_port, 77, "the host program goes on");
    // Host data the guest never reads stays in the host socket: the device
    // takes no more than the guest's credit.
    let (mut s, _st) = host_connect(&mut g, &dir.socket(), 1024);
    s.set_nonblocking(true).unwrap();
    let chunk = vec![7u8; 65536];
    let mut written = 0usize;
    let end = Instant::now() + Duration::from_millis(500);
    while Instant::now() < end {
        match s.write(&chunk) {
            Ok(n) => written += n,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    let mut delivered = 0;
    while let Some((h, d)) = g.recv(Duration::from_millis(200)) {
        if h.op == OP_RW {
            delivered += d.len();
        }
    }
    assert!(delivered <= GUEST_BUF as usize, "{delivered} bytes delivered past the guest's credit");
    assert!(written > delivered, "the host's writes stopped in its socket ({written} written)");
    assert!(g.errors() >= 3, "the bad host programs were counted");
}

#[test]
fn reset_cycles_close_host_connections_and_report_a_transport_reset() {
    for mode in MODES {
        let dir = Dir::new(&format!("reset-{mode}"));
        let mut g = Guest::new(&dir.socket(), mode);
        for cycle in 0..5 {
            let (mut s, mut st) = host_connect(&mut g, &dir.socket(), 1024);
            s.write_all(b"hi").unwrap();
            assert_eq!(guest_read(&mut g, &mut st, 2), b"hi", "{mode} cycle {cycle}");
            let t = Instant::now();
            g.h.restart().unwrap();
            assert!(t.elapsed() < Duration::from_secs(1), "{mode}: reset took {:?}", t.elapsed());
            assert_eq!(s.read(&mut [0u8; 4]).unwrap(), 0, "{mode}: the host connection closed");
            g.fill();
            // The event queue tells the guest its connections are gone.
            let (_, len) = g.h.queues[EVENT].wait_used(T).expect("a transport reset event");
            assert_eq!(len, 4, "{mode}");
            let ev = g.h.queues[EVENT].used_idx();
            assert_eq!(ev, 1, "{mode}: one event");
        }
        // A reset with nothing open reports nothing.
        g.h.restart().unwrap();
        g.fill();
        assert!(g.h.queues[EVENT].wait_used(Duration::from_millis(200)).is_none(), "{mode}");
        assert_eq!(g.errors(), 0, "{mode}");
    }
}

#[test]
fn the_socket_file_is_removed_with_the_device_and_never_replaces_a_file() {
    let dir = Dir::new("files");
    let p = dir.socket();
    std::fs::write(&p, b"precious").unwrap();
    let e = Vsock::new(VsockConfig { name: "v".into(), cid: CID, socket: p.clone(), seccomp: Default::default() }).err().unwrap();
    assert!(e.to_string().contains("exists and is not a socket"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), b"precious");
    std::fs::remove_file(&p).unwrap();
    let d = Vsock::new(VsockConfig { name: "v".into(), cid: CID, socket: p.clone(), seccomp: Default::default() }).unwrap();
    assert_eq!(d.config_space(), CID.to_le_bytes());
    drop(d);
    assert!(!p.exists(), "the socket file goes with the device");
}

#[test]
fn activation_works_under_the_devices_own_seccomp_list() {
    use kickvm_virtio::seccomp::{self, SeccompMode, QUEUE_THREAD};
    let dir = Dir::new("seccomp");
    let socket = dir.socket();
    let mut dev = Vsock::new(VsockConfig { name: "vseccomp".into(), cid: CID, socket: socket.clone(), seccomp: Default::default() }).unwrap();
    // The connector thread, which makes sockets for the guest, is filtered too.
    let find = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "vseccomp-connec"))
            .and_then(|t| t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
    };
    let end = Instant::now() + T;
    let filtered = loop {
        match find() {
            Some(tid) if seccomp::thread_filtered(tid) => break true,
            _ if Instant::now() > end => break false,
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    assert!(filtered, "the connector thread runs, under its seccomp list");
    // The launcher activates a device on the vCPU thread that wrote
    // DRIVER_OK, under a filter made of the queue thread's and the
    // devices' lists: activation must need nothing else.
    let features = dev.features();
    let workers = std::thread::spawn(move || {
        seccomp::apply("test", &[QUEUE_THREAD, kickvm_virtio::vsock::SYSCALLS], SeccompMode::On).unwrap();
        dev.activate(features).map(|w| w.len()).map_err(|e| e.to_string())
    })
    .join()
    .unwrap();
    assert_eq!(workers, Ok(3));
}
