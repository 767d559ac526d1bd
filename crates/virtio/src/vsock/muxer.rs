//! The connection table: every stream between a guest vsock socket and a
//! host Unix socket, with its flow-control state, shared by the receive
//! and transmit queue threads under one lock (held only for non-blocking
//! work).
//!
//! A connection's life:
//! - host-initiated: a host program connects to `SOCKET` and writes
//!   `CONNECT <port>\n` ([`State::Handshake`]); the device sends the guest
//!   a REQUEST ([`State::Connecting`]); the guest's RESPONSE makes it
//!   [`State::Established`] and the host reads `OK <hostport>\n`; a RST
//!   closes the host socket.
//! - guest-initiated: the guest's REQUEST to host port P connects to
//!   `SOCKET_P`; the device answers RESPONSE, or RST if nobody listens.
//! - either side shuts down (guest SHUTDOWN, host EOF); RST ends it.
//!
//! Flow control is the spec's credit scheme in both directions: the guest
//! may have at most [`BUF_ALLOC`] bytes in flight towards a host socket
//! (what the socket does not take at once waits in that connection's
//! buffer, which therefore never holds more), and the device sends the
//! guest no more than the guest's own `buf_alloc` allows.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::backend::{self, Epoll, HostListener};
use super::packet::{Header, Op, TxPacket, HDR_LEN, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::chain::Chain;
use crate::queue::QueueCtx;

/// Connections open at once, host- and guest-initiated together. Each
/// holds a host socket and up to [`BUF_ALLOC`] bytes: this caps what a
/// guest that opens connections without end (or a host program that does)
/// can make the launcher hold. A connection beyond it is refused (RST).
pub const MAX_CONNECTIONS: usize = 128;

/// The receive buffer the device advertises per connection: the most
/// guest data it holds for a host socket that is slow to read. With
/// [`MAX_CONNECTIONS`], host memory for buffered data stays under 16 MiB
/// whatever the guest does.
pub const BUF_ALLOC: u32 = 128 * 1024;

/// Tell the guest about freed buffer space once this much has been
/// forwarded since it last heard: often enough that a sender waiting for
/// credit goes on, rarely enough that updates are not one per packet.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// RSTs waiting for a receive buffer (for packets naming no connection,
/// or connections already closed). A guest that sends bad packets without
/// end and never reads its receive queue gets the excess dropped.
const MAX_QUEUED_RSTS: usize = 256;

/// The longest `CONNECT <port>\n` line a host program may send.
const MAX_CONNECT_LINE: usize = 32;

/// epoll tokens below this are not connections.
const TOKEN_WAKE: u64 = 0;
const TOKEN_LISTENER: u64 = 1;
const FIRST_CONN_TOKEN: u64 = 2;

/// Host ports the device picks for host-initiated connections start here
/// (Cloud Hypervisor-style: above any port a guest service listens on).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A host program connected; its `CONNECT <port>` line is being read.
    Handshake,
    /// The guest was sent a REQUEST; waiting for its RESPONSE or RST.
    Connecting,
    Established,
}

// Control packets a connection owes the guest, one bit each.
const SEND_REQUEST: u8 = 1;
const SEND_RESPONSE: u8 = 2;
const SEND_CREDIT_UPDATE: u8 = 4;
const SEND_CREDIT_REQUEST: u8 = 8;
const SEND_SHUTDOWN: u8 = 16;

struct Conn {
    stream: UnixStream,
    /// The host side's port (what the guest's packets name as `dst_port`).
    local_port: u32,
    /// The guest socket's port.
    peer_port: u32,
    state: State,
    /// The handshake line read so far.
    line: Vec<u8>,
    /// Guest bytes handed to the host socket (the spec's `fwd_cnt`).
    fwd_cnt: u32,
    /// `fwd_cnt` as the guest last heard it.
    fwd_cnt_sent: u32,
    /// Guest bytes the host socket has not taken yet; at most `BUF_ALLOC`.
    pending: VecDeque<u8>,
    /// Bytes sent to the guest, and the guest's receive buffer and
    /// consumed count as it last told us.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// A CREDIT_REQUEST was sent and not yet answered.
    asked_credit: bool,
    /// Control packets owed to the guest (`SEND_*`), and the SHUTDOWN flags.
    owed: u8,
    shutdown_flags: u32,
    /// In the table's list of connections that owe packets.
    queued: bool,
    /// The host will send no more (EOF read).
    host_eof: bool,
    /// The guest will send no more / receive no more.
    guest_no_send: bool,
    guest_no_rcv: bool,
    /// The epoll events registered for the host socket.
    registered: u32,
}

impl Conn {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Conn {
        Conn {
            stream,
            local_port,
            peer_port,
            state,
            line: Vec::new(),
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            pending: VecDeque::new(),
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            asked_credit: false,
            owed: 0,
            shutdown_flags: 0,
            queued: false,
            host_eof: false,
            guest_no_send: false,
            guest_no_rcv: false,
            registered: 0,
        }
    }

    /// Bytes the guest has room for.
    fn credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_input(&self) -> bool {
        self.state == State::Established && !self.host_eof && !self.guest_no_rcv && self.credit() > 0
    }

    /// What epoll should report for the host socket.
    fn interest(&self) -> u32 {
        let mut ev = 0;
        if self.state == State::Handshake || self.wants_input() {
            ev |= libc::EPOLLIN as u32;
        }
        if !self.pending.is_empty() {
            ev |= libc::EPOLLOUT as u32;
        }
        ev
    }
}

/// Why a connection must end with a RST to the guest.
struct Reset(String);

/// The table, with the host sockets and the epoll set they are in.
pub struct Muxer {
    guest_cid: u64,
    listener: Arc<HostListener>,
    epoll: Epoll,
    /// Written by the transmit thread when the receive thread has new work
    /// (packets owed, credit, host sockets to watch differently).
    wake: EventFd,
    listener_registered: u32,
    conns: HashMap<u64, Conn>,
    /// (local port, guest port) → token.
    ports: HashMap<(u32, u32), u64>,
    next_token: u64,
    next_local_port: u32,
    /// Connections that owe the guest control packets, in order; each open
    /// connection at most once (so at most `MAX_CONNECTIONS` entries).
    owing: VecDeque<u64>,
    /// RSTs to send: (local port, guest port).
    rsts: VecDeque<(u32, u32)>,
    /// Scratch list of ready fds.
    ready: Vec<(u64, u32)>,
}

/// A connection's key from a packet the guest sent.
fn key(h: &Header) -> (u32, u32) {
    (h.dst_port, h.src_port)
}

impl Muxer {
    pub fn new(guest_cid: u64, listener: Arc<HostListener>) -> io::Result<Muxer> {
        let epoll = Epoll::new()?;
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        epoll.set(wake.as_raw_fd(), TOKEN_WAKE, 0, libc::EPOLLIN as u32)?;
        Ok(Muxer {
            guest_cid,
            listener,
            epoll,
            wake,
            listener_registered: 0,
            conns: HashMap::new(),
            ports: HashMap::new(),
            next_token: FIRST_CONN_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            owing: VecDeque::new(),
            rsts: VecDeque::new(),
            ready: Vec::new(),
        })
    }

    /// The fd the receive queue waits on besides its kick.
    pub fn poll_fd(&self) -> std::os::fd::RawFd {
        self.epoll.as_raw_fd()
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Tells the receive thread to look again.
    pub fn wake_rx(&self) {
        let _ = self.wake.write(1);
    }

    fn header(&mut self, token: u64, op: Op) -> Option<Header> {
        let c = self.conns.get_mut(&token)?;
        let mut h = Header::to_guest(self.guest_cid, c.local_port, c.peer_port, op);
        h.buf_alloc = BUF_ALLOC;
        h.fwd_cnt = c.fwd_cnt;
        c.fwd_cnt_sent = c.fwd_cnt;
        Some(h)
    }

    fn owe(&mut self, token: u64, what: u8) {
        if let Some(c) = self.conns.get_mut(&token) {
            c.owed |= what;
            if !c.queued {
                c.queued = true;
                self.owing.push_back(token);
            }
        }
    }

    /// Ends a connection: its host socket closes, and the guest is sent a
    /// RST (if the queue of RSTs has room).
    fn reset(&mut self, q: &QueueCtx, token: u64, why: Option<&str>) {
        let Some(c) = self.remove(token) else { return };
        if let Some(why) = why {
            q.count_error(&format!("vsock connection {}:{} reset: {why}", c.local_port, c.peer_port));
        }
        self.queue_rst(q, (c.local_port, c.peer_port));
    }

    fn queue_rst(&mut self, q: &QueueCtx, ports: (u32, u32)) {
        if self.rsts.len() < MAX_QUEUED_RSTS {
            self.rsts.push_back(ports);
        } else {
            q.count_error("vsock: too many RSTs waiting for receive buffers; one is dropped");
        }
    }

    fn remove(&mut self, token: u64) -> Option<Conn> {
        let c = self.conns.remove(&token)?;
        if self.ports.get(&(c.local_port, c.peer_port)) == Some(&token) {
            self.ports.remove(&(c.local_port, c.peer_port));
        }
        if c.queued {
            // Else a guest that opens and resets connections without ever
            // giving receive buffers would grow the list without end.
            self.owing.retain(|&t| t != token);
        }
        Some(c)
    }

    fn insert(&mut self, c: Conn) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        // A host program still sending its CONNECT line has no ports yet:
        // no guest packet may name it.
        if c.state != State::Handshake {
            self.ports.insert((c.local_port, c.peer_port), token);
        }
        self.conns.insert(token, c);
        token
    }

    // ---- transmit queue: packets from the guest -------------------------

    /// Acts on one packet the guest sent.
    pub fn guest_packet(&mut self, q: &mut QueueCtx, p: TxPacket) {
        let token = self.ports.get(&key(&p.hdr)).copied();
        if let Some(t) = token {
            if let Some(c) = self.conns.get_mut(&t) {
                c.peer_buf_alloc = p.hdr.buf_alloc;
                c.peer_fwd_cnt = p.hdr.fwd_cnt;
                if c.credit() > 0 {
                    c.asked_credit = false;
                }
            }
        }
        match (p.op, token) {
            (Op::Request, None) => self.guest_connect(q, &p.hdr),
            (Op::Rst, None) => {}
            (_, None) => {
                // Nothing of ours: tell the guest so, as the spec asks.
                self.queue_rst(q, key(&p.hdr));
            }
            (op, Some(t)) => {
                if let Err(Reset(why)) = self.connection_packet(q, t, op, &p) {
                    self.reset(q, t, Some(&why));
                }
            }
        }
    }

    /// A packet that failed its checks ends the connection it names, if
    /// any (its data can no longer be trusted to be in order).
    pub fn bad_packet(&mut self, q: &QueueCtx, h: &Header) {
        if let Some(&t) = self.ports.get(&key(h)) {
            self.reset(q, t, None);
        }
    }

    /// The guest connects to host port `dst_port`: `SOCKET_<port>`.
    fn guest_connect(&mut self, q: &QueueCtx, h: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            q.count_error(&format!("vsock: {MAX_CONNECTIONS} connections are open; a guest connection is refused"));
            self.queue_rst(q, key(h));
            return;
        }
        match self.listener.connect_port(h.dst_port) {
            Ok(stream) => {
                let mut c = Conn::new(stream, h.dst_port, h.src_port, State::Established);
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
                let t = self.insert(c);
                self.owe(t, SEND_RESPONSE);
            }
            // Nobody listens there: the guest's connect fails, as it would
            // on a host without the service. Not an error of the device.
            Err(_) => self.queue_rst(q, key(h)),
        }
    }

    fn connection_packet(&mut self, q: &mut QueueCtx, t: u64, op: Op, p: &TxPacket) -> Result<(), Reset> {
        let Some(c) = self.conns.get_mut(&t) else { return Ok(()) };
        match op {
            Op::Request => return Err(Reset("REQUEST for a connection that exists".into())),
            Op::Response => {
                if c.state != State::Connecting {
                    return Err(Reset("RESPONSE to no REQUEST".into()));
                }
                c.state = State::Established;
                let line = format!("OK {}\n", c.local_port);
                match backend::send(c.stream.as_raw_fd(), line.as_bytes()) {
                    Ok(n) if n == line.len() => {}
                    // The host program is gone: nothing to tell it.
                    _ => return Err(Reset("the host program left before the guest answered".into())),
                }
            }
            Op::Rst => {
                self.remove(t);
            }
            Op::Shutdown => {
                if p.hdr.flags & SHUTDOWN_SEND != 0 {
                    c.guest_no_send = true;
                }
                if p.hdr.flags & SHUTDOWN_RCV != 0 {
                    c.guest_no_rcv = true;
                }
                self.after_shutdown(q, t);
            }
            Op::Rw => {
                if c.state != State::Established || c.guest_no_send {
                    return Err(Reset("data on a connection that is not open for it".into()));
                }
                let n = p.payload.len();
                q.add_bytes(n);
                Self::forward(c, &p.payload)?;
                if c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
                    self.owe(t, SEND_CREDIT_UPDATE);
                }
            }
            Op::CreditUpdate => {}
            Op::CreditRequest => self.owe(t, SEND_CREDIT_UPDATE),
        }
        Ok(())
    }

    /// Writes guest data to the host socket straight from guest memory;
    /// what the socket does not take waits in the connection's buffer,
    /// which the credit the guest was given keeps under `BUF_ALLOC`.
    fn forward(c: &mut Conn, payload: &crate::memory::GuestIovecs) -> Result<(), Reset> {
        let mut sent = 0u64;
        if c.pending.is_empty() && !payload.is_empty() {
            match backend::send_guest(c.stream.as_raw_fd(), payload) {
                Ok(n) => sent = n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Reset(format!("the host socket refused data: {e}"))),
            }
        }
        c.fwd_cnt = c.fwd_cnt.wrapping_add(sent as u32);
        let rest = payload.len() - sent;
        if rest == 0 {
            return Ok(());
        }
        if c.pending.len() as u64 + rest > u64::from(BUF_ALLOC) {
            return Err(Reset(format!("the guest sent more than the {BUF_ALLOC} bytes of credit it was given")));
        }
        let mut tmp = vec![0u8; rest as usize];
        let got = payload.read_at(sent as usize, &mut tmp);
        c.pending.extend(&tmp[..got]);
        Ok(())
    }

    /// Both sides are done with a connection, or the guest closed it: end
    /// it once the guest's data reached the host.
    fn after_shutdown(&mut self, q: &QueueCtx, t: u64) {
        let Some(c) = self.conns.get_mut(&t) else { return };
        if !c.pending.is_empty() {
            return; // again once the buffer is flushed
        }
        if c.guest_no_send {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        let both_guest = c.guest_no_send && c.guest_no_rcv;
        let both_ways = c.guest_no_send && c.host_eof;
        if both_guest || both_ways {
            self.reset(q, t, None);
        }
    }

    // ---- receive queue: host sockets to the guest -----------------------

    /// Takes what the host sockets have (new connections, handshake lines,
    /// room for buffered data) and notes which connections have input.
    fn poll_host(&mut self, q: &QueueCtx, readable: &mut Vec<(u64, u32)>) {
        let _ = self.wake.read();
        let mut ready = std::mem::take(&mut self.ready);
        self.epoll.ready(&mut ready);
        readable.clear();
        for &(token, events) in &ready {
            match token {
                TOKEN_WAKE => {}
                TOKEN_LISTENER => self.accept_host(q),
                t => {
                    if events & libc::EPOLLOUT as u32 != 0 {
                        self.flush(q, t);
                    }
                    let Some(c) = self.conns.get(&t) else { continue };
                    match c.state {
                        State::Handshake => self.read_connect_line(q, t),
                        _ if events & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 => {
                            readable.push((t, events))
                        }
                        _ => {}
                    }
                }
            }
        }
        self.ready = ready;
    }

    fn accept_host(&mut self, q: &QueueCtx) {
        while self.conns.len() < MAX_CONNECTIONS {
            match self.listener.accept() {
                Ok(Some(s)) => {
                    self.insert(Conn::new(s, 0, 0, State::Handshake));
                }
                Ok(None) => return,
                Err(e) => {
                    q.count_error(&format!("vsock: accepting a host connection failed: {e}"));
                    return;
                }
            }
        }
    }

    /// Reads `CONNECT <port>\n` (and not a byte past it: what follows is
    /// for the guest). A host program that sends anything else is
    /// disconnected.
    fn read_connect_line(&mut self, q: &QueueCtx, t: u64) {
        let Some(c) = self.conns.get_mut(&t) else { return };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE - c.line.len();
        // SAFETY: `buf` is valid for `room` bytes during the call.
        let n = unsafe {
            libc::recv(c.stream.as_raw_fd(), buf.as_mut_ptr().cast(), room, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        };
        if n < 0 {
            if io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock {
                self.remove(t);
            }
            return;
        }
        let n = n as usize;
        let take = buf[..n].iter().position(|&b| b == b'\n').map_or(n, |i| i + 1);
        let got = backend::recv(c.stream.as_raw_fd(), &mut buf[..take]).unwrap_or(0);
        c.line.extend_from_slice(&buf[..got]);
        if n == 0 || got == 0 {
            self.remove(t); // the host program left
            return;
        }
        if c.line.last() != Some(&b'\n') {
            if c.line.len() >= MAX_CONNECT_LINE {
                self.refuse_host(q, t, "a line longer than `CONNECT <port>`");
            }
            return;
        }
        let text = String::from_utf8_lossy(&c.line).trim_end().to_string();
        let port = text.strip_prefix("CONNECT ").and_then(|p| p.trim().parse::<u32>().ok());
        let Some(port) = port else {
            self.refuse_host(q, t, &format!("`{text}` (expected `CONNECT <port>`)"));
            return;
        };
        let local = self.free_local_port(port);
        let Some(mut c) = self.remove(t) else { return };
        c.local_port = local;
        c.peer_port = port;
        c.state = State::Connecting;
        c.line = Vec::new();
        let t = self.insert(c);
        self.owe(t, SEND_REQUEST);
    }

    fn refuse_host(&mut self, q: &QueueCtx, t: u64, what: &str) {
        q.count_error(&format!("vsock: a host program sent {what}; it is disconnected"));
        self.remove(t);
    }

    /// A host port no open connection to guest port `peer` uses.
    fn free_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.ports.contains_key(&(p, peer)) {
                return p;
            }
        }
    }

    /// Writes a connection's buffered guest data to its host socket.
    fn flush(&mut self, q: &QueueCtx, t: u64) {
        let Some(c) = self.conns.get_mut(&t) else { return };
        while !c.pending.is_empty() {
            let (a, _) = c.pending.as_slices();
            match backend::send(c.stream.as_raw_fd(), a) {
                Ok(n) => {
                    c.pending.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.reset(q, t, Some(&format!("the host socket refused data: {e}")));
                    return;
                }
            }
        }
        let c = &self.conns[&t];
        let (empty, done) = (c.pending.is_empty(), c.guest_no_send);
        if c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD || (empty && c.fwd_cnt != c.fwd_cnt_sent) {
            self.owe(t, SEND_CREDIT_UPDATE);
        }
        if empty && done {
            self.after_shutdown(q, t);
        }
    }

    /// True when something can go to the guest now.
    fn has_output(&self, readable: &[(u64, u32)]) -> bool {
        !self.rsts.is_empty() || !self.owing.is_empty() || !readable.is_empty()
    }

    /// The next control packet owed to the guest, if any.
    fn next_control(&mut self) -> Option<Header> {
        if let Some((local, peer)) = self.rsts.pop_front() {
            return Some(Header::to_guest(self.guest_cid, local, peer, Op::Rst));
        }
        while let Some(t) = self.owing.pop_front() {
            let Some(c) = self.conns.get_mut(&t) else { continue };
            let order = [
                (SEND_REQUEST, Op::Request),
                (SEND_RESPONSE, Op::Response),
                (SEND_CREDIT_UPDATE, Op::CreditUpdate),
                (SEND_CREDIT_REQUEST, Op::CreditRequest),
                (SEND_SHUTDOWN, Op::Shutdown),
            ];
            let Some(&(bit, op)) = order.iter().find(|(b, _)| c.owed & b != 0) else {
                c.queued = false;
                continue;
            };
            c.owed &= !bit;
            let flags = if op == Op::Shutdown { c.shutdown_flags } else { 0 };
            if c.owed != 0 {
                self.owing.push_front(t);
            } else {
                c.queued = false;
            }
            let mut h = self.header(t, op)?;
            h.flags = flags;
            return Some(h);
        }
        None
    }

    /// Fills the guest's receive buffers: RSTs and control packets first,
    /// then data read from the host sockets straight into guest memory,
    /// one packet per connection per round. Returns what to wait for.
    pub fn fill_rx(&mut self, q: &mut QueueCtx, readable: &mut Vec<(u64, u32)>) -> crate::threads::Wait {
        use crate::threads::Wait;
        self.poll_host(q, readable);
        let wait = loop {
            if !self.has_output(readable) {
                break Wait::Backend;
            }
            let Some(chain) = q.pop() else { break Wait::Kick };
            if chain.writable.len() < HDR_LEN as u64 || !chain.readable.is_empty() {
                q.fail_chain(chain.head, "vsock receive buffer is not a device-writable buffer of at least 44 bytes");
                continue;
            }
            if let Some(h) = self.next_control() {
                chain.writable.write_at(0, &h.to_bytes());
                q.add_used(chain.head, HDR_LEN as u32);
                continue;
            }
            // Data: the first connection with input gets this buffer.
            if readable.is_empty() {
                q.unpop(); // the control packets owed were for closed connections
                continue;
            }
            let (t, events) = readable.remove(0);
            match self.read_host(q, t, events, &chain) {
                Some(n) => {
                    q.add_bytes(n as u64);
                    q.add_used(chain.head, (HDR_LEN + n) as u32);
                    readable.push((t, events)); // round robin
                }
                None => q.unpop(),
            }
        };
        self.update_interest(q);
        wait
    }

    /// Reads a packet's worth of host data into `chain` after its header.
    /// `None`: nothing to send for this connection now (no data, no
    /// credit, EOF).
    fn read_host(&mut self, q: &QueueCtx, t: u64, events: u32, chain: &Chain) -> Option<usize> {
        let c = self.conns.get_mut(&t)?;
        if !c.wants_input() {
            if c.state == State::Established && c.credit() == 0 && !c.asked_credit {
                c.asked_credit = true;
                self.owe(t, SEND_CREDIT_REQUEST);
            }
            return None;
        }
        let mut data = chain.writable.skip(HDR_LEN as u64);
        data.truncate(u64::from(c.credit().min(MAX_PAYLOAD)));
        if data.is_empty() {
            return None;
        }
        match crate::sys::readv(c.stream.as_raw_fd(), &data) {
            Ok(0) => {
                // EOF: the host program shut down its side, or left (HUP).
                c.host_eof = true;
                c.shutdown_flags = SHUTDOWN_SEND;
                if events & libc::EPOLLHUP as u32 != 0 {
                    c.shutdown_flags |= SHUTDOWN_RCV;
                }
                self.owe(t, SEND_SHUTDOWN);
                self.after_shutdown(q, t);
                None
            }
            Ok(n) => {
                c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                let mut h = self.header(t, Op::Rw)?;
                h.len = n as u32;
                chain.writable.write_at(0, &h.to_bytes());
                Some(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => None,
            Err(e) => {
                self.reset(q, t, Some(&format!("reading the host socket failed: {e}")));
                None
            }
        }
    }

    /// Registers with epoll what each host socket should report: input
    /// only while the guest has credit for it, room only while data waits.
    /// (A socket registered for nothing would still report a hang-up and
    /// spin the thread: such sockets are removed from the set.)
    fn update_interest(&mut self, q: &QueueCtx) {
        let want = if self.conns.len() < MAX_CONNECTIONS { libc::EPOLLIN as u32 } else { 0 };
        if self.epoll.set(self.listener.as_raw_fd(), TOKEN_LISTENER, self.listener_registered, want).is_ok() {
            self.listener_registered = want;
        }
        let mut failed = Vec::new();
        for (&t, c) in self.conns.iter_mut() {
            let want = c.interest();
            match self.epoll.set(c.stream.as_raw_fd(), t, c.registered, want) {
                Ok(()) => c.registered = want,
                Err(e) => failed.push((t, e)),
            }
        }
        for (t, e) in failed {
            self.reset(q, t, Some(&format!("cannot watch the host socket: {e}")));
        }
    }
}
