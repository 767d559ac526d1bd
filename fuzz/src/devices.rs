//! The `devices` target: each device's request handling — virtio-blk (a
//! small memfd disk, read-only or not, 1–2 queues), virtio-net (a real TAP,
//! `kvfuzz0`, two queue pairs: rx/tx/ctrl), virtio-console (output to a
//! memfd file), virtio-rng and virtio-vsock (hybrid vsock on a Unix socket
//! in a scratch directory, with a listener on `SOCKET_1024` and host
//! programs that `CONNECT` and send) — driven by a guest that writes arbitrary
//! descriptors, bytes and rings, publishes heads, and resets and
//! re-activates the device between requests.
//!
//! The device is served with [`kickvm_virtio::inline::Inline`]: each
//! queue's worker runs once per `Serve` step on this thread, without
//! blocking — the same worker code the queue threads run, deterministic
//! and fast. A reset is dropping the `Inline`, `device.reset()`, and a new
//! activation.
//!
//! Checks, besides no panic / overflow / timeout / RSS (libFuzzer) and no
//! log flood ([`checks::log_end`]):
//! - after every `Serve`, each queue whose worker consumes what it is
//!   given (every queue but net, console and vsock receive and vsock's
//!   event queue, which hold buffers) has returned every chain the guest
//!   made available, or the
//!   device has marked itself NEEDS_RESET — and then told the driver (its
//!   configuration eventfd was written);
//! - at the end of every run, whatever the guest did (any number of reset
//!   cycles before): reset, re-activate with fresh rings, and a valid
//!   request is served correctly (blk GET_ID and a read, rng bytes, a
//!   console line that reaches the file, a net packet, a control command
//!   acknowledged OK, `VQ_PAIRS_SET 2` included, a vsock REQUEST to a port
//!   nobody listens on answered with RST).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, OnceLock};

use arbitrary::Arbitrary;
use kickvm_virtio::inline::Inline;
use kickvm_virtio::{GuestMemory, QueueSetup, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes as _, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::chain::{desc_bytes, put, DLen, Link, Place};
use crate::checks;
use crate::enc::{Bytes, Enc, Encode};
use crate::guest::{self, MemLayout, SplitRing, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

// ---- input ----------------------------------------------------------

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevKind {
    /// virtio-blk: read-only or not, `1 + queues % 2` queues, a disk of
    /// `sectors` sectors.
    Blk { readonly: bool, queues: u8, sectors: u8 },
    /// virtio-net on the TAP `kvfuzz0` (2 queue pairs); skipped without
    /// root or /dev/net/tun.
    Net,
    Console,
    Rng,
    /// virtio-vsock, guest cid 3.
    Vsock,
}

/// A descriptor: flags as given (bit 0 NEXT, 1 WRITE, 2 INDIRECT), `data`
/// written at its address.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub addr: Place,
    pub len: DLen,
    pub flags: u8,
    /// `Follow`: the next entry, with NEXT set unless last (NEXT cleared on
    /// the last); otherwise as given.
    pub next: Link,
    pub data: Bytes<128>,
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum DescOp {
    Leaf(Leaf),
    /// An indirect descriptor whose table (in a scratch page) holds
    /// `entries`; its length is 16 × entries + `len_delta`.
    Indirect { entries: Vec<Leaf>, flags: u8, len_delta: i8 },
    /// An indirect descriptor to a table of `chain::entries(n)` entries at
    /// `at` that loop
    /// (i → i + 1, the last → 0), each `len` bytes at `addr`.
    Loop { n: u16, at: Place, addr: Place, len: u16, write: bool },
}

/// One guest action.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Resets the device if active, then DRIVER_OK: features
    /// `features & device.features()`, the queues whose bit is set in
    /// `queues`, each of size `1 << (size_log2 % 9)` (at most the device's
    /// maximum), queue n's rings at `rings + n × 8 KiB` (desc, avail at
    /// +4 KiB, used at +6 KiB), avail and used indexes zeroed.
    Activate { features: u64, queues: u8, size_log2: u8, rings: Place },
    /// Resets the device (it stays inactive).
    Reset,
    /// Writes a chain at entry `head` of queue `queue`, and makes it
    /// available if `publish`.
    Offer { queue: u8, head: u16, descs: Vec<DescOp>, publish: bool },
    /// Makes `head` available (again, or as a raw value).
    Publish { queue: u8, head: u16 },
    /// Sets the avail index (a guest that lies about it).
    AvailIdx { queue: u8, idx: u16 },
    /// Raw bytes anywhere.
    Poke { at: Place, data: Bytes<64> },
    /// A frame of `14 + len % 1500` bytes sent to the guest through the
    /// TAP (net); vsock: a host program connects, writes `CONNECT <fill>`
    /// and `len % 1500` bytes.
    HostPacket { len: u16, fill: u8 },
    /// Runs every queue's worker once.
    Serve,
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct DevInput {
    pub layout: MemLayout,
    pub device: DevKind,
    pub steps: Vec<Step>,
}

// ---- encoders --------------------------------------------------------

impl Encode for DevKind {
    fn encode(&self, e: &mut Enc) {
        match *self {
            DevKind::Blk { readonly, queues, sectors } => e.tag(0, 5).bool(readonly).u8(queues).u8(sectors),
            DevKind::Net => e.tag(1, 5),
            DevKind::Console => e.tag(2, 5),
            DevKind::Rng => e.tag(3, 5),
            DevKind::Vsock => e.tag(4, 5),
        };
    }
}
impl Encode for Leaf {
    fn encode(&self, e: &mut Enc) {
        e.put(&self.addr).put(&self.len).u8(self.flags).put(&self.next).put(&self.data);
    }
}
impl Encode for DescOp {
    fn encode(&self, e: &mut Enc) {
        match self {
            DescOp::Leaf(l) => e.tag(0, 3).put(l),
            DescOp::Indirect { entries, flags, len_delta } => e.tag(1, 3).vec(entries).u8(*flags).u8(*len_delta as u8),
            DescOp::Loop { n, at, addr, len, write } => {
                e.tag(2, 3).u16(*n).put(at).put(addr).u16(*len).bool(*write)
            }
        };
    }
}
impl Encode for Step {
    fn encode(&self, e: &mut Enc) {
        const N: u32 = 8;
        match self {
            Step::Activate { features, queues, size_log2, rings } => {
                e.tag(0, N).u64(*features).u8(*queues).u8(*size_log2).put(rings)
            }
            Step::Reset => e.tag(1, N),
            Step::Offer { queue, head, descs, publish } => e.tag(2, N).u8(*queue).u16(*head).vec(descs).bool(*publish),
            Step::Publish { queue, head } => e.tag(3, N).u8(*queue).u16(*head),
            Step::AvailIdx { queue, idx } => e.tag(4, N).u8(*queue).u16(*idx),
            Step::Poke { at, data } => e.tag(5, N).put(at).put(data),
            Step::HostPacket { len, fill } => e.tag(6, N).u16(*len).u8(*fill),
            Step::Serve => e.tag(7, N),
        };
    }
}
impl Encode for DevInput {
    fn encode(&self, e: &mut Enc) {
        e.put(&self.layout).put(&self.device).vec(&self.steps);
    }
}

// ---- backends --------------------------------------------------------

/// A memfd, by path (`/proc/self/fd/N`), kept open for the process.
fn memfd(name: &std::ffi::CStr) -> String {
    // SAFETY: memfd_create with a valid C string; the fd is kept open for
    // the life of the process on purpose.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    format!("/proc/self/fd/{fd}")
}

/// The vsock device's socket (in a scratch directory of this process),
/// and a listener on `SOCKET_1024` for the guest's connections, kept for
/// the process (connections it holds are dropped at the end of each run).
fn vsock_socket() -> &'static (std::path::PathBuf, std::os::unix::net::UnixListener) {
    static S: OnceLock<(std::path::PathBuf, std::os::unix::net::UnixListener)> = OnceLock::new();
    S.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kickvm-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("vsock scratch directory");
        let socket = dir.join("v.sock");
        let l = std::os::unix::net::UnixListener::bind(format!("{}_1024", socket.display())).expect("SOCKET_1024");
        l.set_nonblocking(true).expect("non-blocking listener");
        (socket, l)
    })
}

/// A host program on the vsock socket: `CONNECT <port>` and `len` bytes.
fn vsock_host(port: u8, len: usize) -> Option<std::os::unix::net::UnixStream> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(&vsock_socket().0).ok()?;
    s.set_nonblocking(true).ok()?;
    let mut msg = format!("CONNECT {port}\n").into_bytes();
    msg.resize(msg.len() + len, port);
    let _ = s.write(&msg);
    Some(s)
}

fn disk_path() -> &'static str {
    static P: OnceLock<String> = OnceLock::new();
    P.get_or_init(|| memfd(c"kickvm-fuzz-devices-disk"))
}

fn console_path() -> &'static str {
    static P: OnceLock<String> = OnceLock::new();
    P.get_or_init(|| memfd(c"kickvm-fuzz-devices-console"))
}

/// The TAP's name and the AF_PACKET socket that sends frames to the guest.
pub const TAP: &str = "kvfuzz0";
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const NET_PAIRS: u16 = 2;

struct NetHost {
    dev: kickvm_virtio::net::NetDevice,
    sock: Option<OwnedFd>,
    ifindex: i32,
}

/// `struct ifreq` for SIOCGIFFLAGS / SIOCSIFFLAGS.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _rest: [u8; 22],
}

/// Brings the TAP up (packets flow only then), without IPv6 or ARP
/// answers, so that nothing but the target's frames reach the guest.
fn tap_up(name: &str) -> Option<(OwnedFd, i32)> {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{name}/arp_ignore"), "8");
    // SAFETY: plain socket creation; the fd is owned right after.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return None;
    }
    // SAFETY: `s` is a new fd we own.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    let mut req = IfReq { name: [0; 16], flags: 0, _rest: [0; 22] };
    req.name[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    // SAFETY: SIOCGIFFLAGS / SIOCSIFFLAGS read and write one ifreq.
    unsafe {
        if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return None;
        }
        req.flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return None;
        }
    }
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
    // SAFETY: plain socket creation; protocol 0: it sends, receives nothing.
    let p = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if p < 0 || ifindex == 0 {
        return None;
    }
    // SAFETY: `p` is a new fd we own.
    Some((unsafe { OwnedFd::from_raw_fd(p) }, ifindex))
}

/// The net device, created once per process (a TAP cannot be opened twice
/// at once) and reused by every run; None without root or /dev/net/tun.
fn net() -> std::sync::MutexGuard<'static, Option<NetHost>> {
    static NET: OnceLock<Mutex<Option<NetHost>>> = OnceLock::new();
    NET.get_or_init(|| {
        let open = |tap: &str| {
            kickvm_virtio::net::NetDevice::new(kickvm_virtio::net::NetConfig {
                tap: tap.into(),
                mac: GUEST_MAC,
                queue_pairs: NET_PAIRS,
                ..Default::default()
            })
        };
        // Another process (a test run beside a fuzz run) may hold it.
        let dev = open(TAP).or_else(|_| open(""));
        Mutex::new(dev.ok().map(|dev| {
            let (sock, ifindex) = match tap_up(dev.tap_name()) {
                Some((s, i)) => (Some(s), i),
                None => (None, 0),
            };
            NetHost { dev, sock, ifindex }
        }))
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

fn send_frame(sock: std::os::fd::RawFd, ifindex: i32, frame: &[u8]) {
    // SAFETY: sockaddr_ll is plain old data; zeroed is a valid value.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_ifindex = ifindex;
    sa.sll_halen = 6;
    sa.sll_addr[..6].copy_from_slice(&GUEST_MAC);
    // SAFETY: the frame and the address are valid for the call.
    unsafe {
        libc::sendto(
            sock,
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_DONTWAIT,
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
    }
}

fn frame(len: usize, fill: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + len);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&0x88b5u16.to_be_bytes()); // local experimental
    f.resize(14 + len, fill);
    f
}

// ---- the run ---------------------------------------------------------

/// Where [`Step::Activate`]'s rings go by default, and the scratch slots of
/// indirect tables (both in low RAM).
const RINGS: u64 = 0x8_0000;
const TABLES: u64 = crate::chain::TABLE_SLOTS;
/// The end-of-run check's rings and buffers (zeroed first).
const CHECK_RINGS: u64 = 0xc_0000;
const CHECK_BUFS: u64 = 0xe_0000;
/// Work per run at most.
const MAX_STEPS: usize = 512;
const MAX_SERVES: u32 = 16;
/// Bytes the device may move in one run before `Serve` stops serving: a
/// full ring of large requests moves up to 256 MiB (console output is
/// 1 MiB a chain), which is the guest's to ask for, but a few of those
/// would make a run slow without being a hang.
const MAX_RUN_BYTES: u64 = 64 << 20;
const MAX_LOOPS: u32 = 4;
const MAX_PACKETS: u32 = 16;
const MAX_DESCS: usize = 64;
const MAX_ENTRIES: usize = 256;

const VERSION_1: u64 = 1 << 32;
const VSOCK_CID: u64 = 3;
const F_MQ: u64 = 1 << 22;
const F_CTRL_VQ: u64 = 1 << 17;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Blk,
    Net,
    Console,
    Rng,
    Vsock,
}

struct QState {
    ring: SplitRing,
    /// Served by the current activation.
    active: bool,
    /// The queue's `chains` counter at activation.
    chains0: u64,
}

struct Drv<'a> {
    dev: &'a mut dyn VirtioDevice,
    kind: Kind,
    mem: GuestMemory,
    ranges: Vec<(GuestAddress, usize)>,
    inline: Option<Inline>,
    config_call: Option<EventFd>,
    /// NEEDS_RESET was seen (and checked to be signalled) this activation.
    told: bool,
    features: u64,
    queues: Vec<QState>,
    indirect_next: u64,
    serves: u32,
    loops: u32,
    packets: u32,
    /// Activations so far (for messages).
    cycles: u32,
    /// Net: the socket that sends frames to the guest, and the TAP's index.
    host: Option<(std::os::fd::RawFd, i32)>,
    /// Vsock: the host programs' streams, open until the run ends.
    vsock_hosts: Vec<std::os::unix::net::UnixStream>,
    /// Each queue's `chains` counter when the run began.
    start: Vec<u64>,
    /// The device's `bytes` counter when the run began.
    bytes0: u64,
    /// NEEDS_RESET was seen after some `Serve`.
    needs_reset_seen: bool,
}

/// What a run did before its end-of-run check (for the seeds' tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The device could be built (net: a TAP could be opened).
    pub ran: bool,
    /// Chains returned per queue.
    pub chains: Vec<u64>,
    pub needs_reset_seen: bool,
}

impl<'a> Drv<'a> {
    fn new(dev: &'a mut dyn VirtioDevice, kind: Kind, layout: MemLayout) -> Self {
        let nq = dev.queue_max_sizes().len();
        let queues = (0..nq as u16)
            .map(|q| QState { ring: SplitRing::canonical(RINGS, q, 16), active: false, chains0: 0 })
            .collect();
        Drv {
            dev,
            kind,
            mem: guest::memory(layout),
            ranges: layout.ranges(),
            inline: None,
            config_call: None,
            told: false,
            features: 0,
            queues,
            indirect_next: 0,
            serves: 0,
            loops: 0,
            packets: 0,
            cycles: 0,
            host: None,
            vsock_hosts: Vec::new(),
            start: Vec::new(),
            bytes0: 0,
            needs_reset_seen: false,
        }
        .started()
    }

    fn started(mut self) -> Self {
        self.start = (0..self.queues.len()).map(|q| self.chains(q)).collect();
        self.bytes0 = self.dev.state().total().bytes;
        self
    }

    fn chains(&self, q: usize) -> u64 {
        self.dev.state().queue(q).chains
    }

    fn needs_reset(&self) -> bool {
        self.dev.state().needs_reset.load(Ordering::SeqCst)
    }

    fn reset(&mut self) {
        if self.inline.take().is_some() {
            self.dev.reset();
        }
        self.config_call = None;
        for q in &mut self.queues {
            q.active = false;
        }
    }

    /// DRIVER_OK with `features` and the queues in `mask`; false if the
    /// activation was refused (a transport marks the device NEEDS_RESET).
    fn activate(&mut self, features: u64, mask: u32, size: u16, base: u64) -> Result<(), String> {
        self.reset();
        self.told = false;
        self.cycles += 1;
        let features = features & self.dev.features();
        self.features = features;
        let max = self.dev.queue_max_sizes();
        let mut setups = Vec::new();
        for (i, &m) in max.iter().enumerate() {
            let mut ring = SplitRing::canonical(0, i as u16, size.min(m).max(1));
            ring.desc = base.wrapping_add(ring.desc);
            ring.avail = base.wrapping_add(ring.avail);
            ring.used = base.wrapping_add(ring.used);
            self.queues[i].ring = ring;
            if mask & (1 << i) == 0 {
                continue;
            }
            // Fresh rings, as a driver sets them up.
            put(&self.mem, ring.avail, &[0; 4]);
            put(&self.mem, ring.used, &[0; 4]);
            let Some(s) = setup(i as u16, m, &ring) else {
                return Err(format!("queue {i}: rejected by virtio-queue"));
            };
            setups.push(s);
        }
        let call = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let mine = call.try_clone().map_err(|e| e.to_string())?;
        let inline =
            Inline::activate(&mut *self.dev, features, &self.mem, setups, Some(call)).map_err(|e| e.to_string())?;
        self.inline = Some(inline);
        self.config_call = Some(mine);
        for i in 0..max.len() {
            self.queues[i].active = mask & (1 << i) != 0;
            self.queues[i].chains0 = self.chains(i);
        }
        Ok(())
    }

    /// Queues whose worker returns every chain it pops (all but receive
    /// queues, which hold buffers until input comes).
    fn consumes(&self, q: usize) -> bool {
        match self.kind {
            Kind::Blk | Kind::Rng => true,
            Kind::Console | Kind::Vsock => q == 1,
            Kind::Net => {
                let mq = self.features & F_MQ != 0;
                let pairs = if mq { usize::from(NET_PAIRS) } else { 1 };
                let ctrl = if mq { 2 * usize::from(NET_PAIRS) } else { 2 };
                !(q % 2 == 0 && q != ctrl && q / 2 < pairs)
            }
        }
    }

    fn avail_idx(&self, q: usize) -> Option<u16> {
        self.mem.read_obj::<u16>(GuestAddress(self.queues[q].ring.avail.wrapping_add(2))).ok()
    }

    fn serve(&mut self) {
        if self.inline.is_none() {
            return;
        }
        let before: Vec<Option<u16>> = (0..self.queues.len()).map(|q| self.avail_idx(q)).collect();
        if let Some(inline) = self.inline.as_mut() {
            inline.serve();
        }
        if self.needs_reset() {
            self.needs_reset_seen = true;
            if !self.told {
                self.told = true;
                let told = self.config_call.as_ref().is_some_and(|c| c.read().is_ok());
                assert!(told, "{}: NEEDS_RESET set without a configuration interrupt", self.dev.name());
            }
            return;
        }
        for q in 0..self.queues.len() {
            if !self.queues[q].active || !self.consumes(q) {
                continue;
            }
            let after = self.avail_idx(q);
            // A device write into a buffer over the avail index changes
            // what the guest asked for: nothing to compare.
            if after != before[q] {
                continue;
            }
            let Some(avail) = after else { continue };
            let done = self.chains(q).wrapping_sub(self.queues[q].chains0) as u16;
            assert_eq!(
                done,
                avail,
                "{} queue {q}: {done} chains returned of {avail} made available, and no NEEDS_RESET \
                 (activation #{})",
                self.dev.name(),
                self.cycles
            );
        }
    }

    fn resolve(&self, p: Place) -> u64 {
        p.resolve(&self.ranges, &[])
    }

    /// A leaf as the `k`th of `n` entries of a table of `size` whose entry
    /// `k` is at index `index`.
    fn leaf(&self, l: &Leaf, index: u16, k: usize, n: usize, size: u16) -> [u8; 16] {
        let addr = self.resolve(l.addr);
        put(&self.mem, addr, &l.data.0);
        let mut flags = u16::from(l.flags);
        let next = match l.next {
            Link::Follow => {
                flags &= !VIRTQ_DESC_F_NEXT;
                if k + 1 < n {
                    flags |= VIRTQ_DESC_F_NEXT;
                }
                ((u32::from(index) + 1) % u32::from(size.max(1))) as u16
            }
            other => other.get(index.into(), size.into()),
        };
        desc_bytes(addr, l.len.get(&[]), flags, next)
    }

    fn offer(&mut self, q: usize, head: u16, descs: &[DescOp], publish: bool) {
        let mut ring = self.queues[q].ring;
        let size = ring.size.max(1);
        let descs = &descs[..descs.len().min(MAX_DESCS)];
        let n = descs.len();
        for (k, op) in descs.iter().enumerate() {
            let index = ((u32::from(head) + k as u32) % u32::from(size)) as u16;
            let d = match op {
                DescOp::Leaf(l) => self.leaf(l, index, k, n, size),
                DescOp::Indirect { entries, flags, len_delta } => {
                    let table = TABLES + (self.indirect_next % 16) * 0x1000;
                    self.indirect_next += 1;
                    let entries = &entries[..entries.len().min(MAX_ENTRIES)];
                    let mut buf = Vec::with_capacity(16 * entries.len());
                    for (j, e) in entries.iter().enumerate() {
                        buf.extend_from_slice(&self.leaf(e, j as u16, j, entries.len(), entries.len() as u16));
                    }
                    put(&self.mem, table, &buf);
                    let len = (16 * entries.len() as u32).wrapping_add_signed((*len_delta).into());
                    indirect_desc(table, len, (*flags).into(), index, k, n, size)
                }
                DescOp::Loop { n: entries, at, addr, len, write } => {
                    let table = self.resolve(*at);
                    if self.loops < MAX_LOOPS {
                        self.loops += 1;
                        let a = self.resolve(*addr);
                        let flags = VIRTQ_DESC_F_NEXT | if *write { VIRTQ_DESC_F_WRITE } else { 0 };
                        let m = crate::chain::entries(*entries);
                        let mut buf = Vec::with_capacity(16 * m as usize);
                        for i in 0..m {
                            buf.extend_from_slice(&desc_bytes(a, (*len).into(), flags, ((i + 1) % m) as u16));
                        }
                        put(&self.mem, table, &buf);
                    }
                    indirect_desc(table, 16 * crate::chain::entries(*entries), 0, index, k, n, size)
                }
            };
            put(&self.mem, ring.desc.wrapping_add(16 * u64::from(index)), &d);
        }
        if publish {
            ring.push_avail(&self.mem, head % size);
        }
        self.queues[q].ring = ring;
    }

    fn step(&mut self, s: &Step) {
        let nq = self.queues.len();
        match s {
            Step::Activate { features, queues, size_log2, rings } => {
                let base = self.resolve(*rings);
                let _ = self.activate(*features, (*queues).into(), 1 << (size_log2 % 9), base);
            }
            Step::Reset => self.reset(),
            Step::Offer { queue, head, descs, publish } => self.offer(usize::from(*queue) % nq, *head, descs, *publish),
            Step::Publish { queue, head } => {
                let q = usize::from(*queue) % nq;
                let mut ring = self.queues[q].ring;
                ring.push_avail(&self.mem, *head);
                self.queues[q].ring = ring;
            }
            Step::AvailIdx { queue, idx } => {
                let q = usize::from(*queue) % nq;
                self.queues[q].ring.avail_idx = *idx;
                let at = self.queues[q].ring.avail.wrapping_add(2);
                let _ = self.mem.write_obj(*idx, GuestAddress(at));
            }
            Step::Poke { at, data } => put(&self.mem, self.resolve(*at), &data.0),
            Step::HostPacket { len, fill } => {
                if self.kind == Kind::Net && self.packets < MAX_PACKETS {
                    self.packets += 1;
                    if let Some((sock, ifindex)) = self.host {
                        send_frame(sock, ifindex, &frame(usize::from(*len) % 1500, *fill));
                    }
                }
                if self.kind == Kind::Vsock && self.packets < MAX_PACKETS {
                    self.packets += 1;
                    self.vsock_hosts.extend(vsock_host(*fill, usize::from(*len) % 1500));
                }
            }
            Step::Serve => {
                if self.serves < MAX_SERVES && self.dev.state().total().bytes - self.bytes0 < MAX_RUN_BYTES {
                    self.serves += 1;
                    if self.kind == Kind::Console {
                        // Output is appended: the file need not keep it.
                        let _ = std::fs::OpenOptions::new().write(true).open(console_path()).and_then(|f| f.set_len(0));
                    }
                    self.serve();
                }
            }
        }
    }
}

fn indirect_desc(table: u64, len: u32, flags: u16, index: u16, k: usize, n: usize, size: u16) -> [u8; 16] {
    let mut flags = (flags & !VIRTQ_DESC_F_NEXT) | VIRTQ_DESC_F_INDIRECT;
    if k + 1 < n {
        flags |= VIRTQ_DESC_F_NEXT;
    }
    desc_bytes(table, len, flags, ((u32::from(index) + 1) % u32::from(size)) as u16)
}

/// A queue as the transport builds it (the same `try_set_*` calls: a value
/// virtio-queue refuses fails the activation).
fn setup(index: u16, max: u16, ring: &SplitRing) -> Option<QueueSetup> {
    let mut q = Queue::new(max).ok()?;
    q.try_set_size(ring.size).ok()?;
    q.try_set_desc_table_address(GuestAddress(ring.desc)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(ring.avail)).ok()?;
    q.try_set_used_ring_address(GuestAddress(ring.used)).ok()?;
    q.set_ready(true);
    Some(QueueSetup {
        index,
        queue: q,
        kick: EventFd::new(libc::EFD_NONBLOCK).ok()?,
        call: EventFd::new(libc::EFD_NONBLOCK).ok()?,
    })
}

pub fn run(input: &DevInput) {
    run_outcome(input);
}

/// [`run`], saying what the run did.
pub fn run_outcome(input: &DevInput) -> Outcome {
    checks::log_begin();
    let outcome = match input.device {
        DevKind::Net => {
            let mut g = net();
            if let Some(NetHost { dev, sock, ifindex }) = g.as_mut() {
                let host = sock.as_ref().map(|s| (s.as_raw_fd(), *ifindex));
                let mut d = Drv::new(dev, Kind::Net, input.layout);
                d.host = host;
                drive(&mut d, &input.steps, None)
            } else {
                Outcome::default()
            }
        }
        DevKind::Blk { readonly, queues, sectors } => {
            let path = disk_path();
            let f = std::fs::OpenOptions::new().write(true).open(path).expect("fuzz disk");
            f.set_len(0).expect("truncate fuzz disk");
            f.set_len(u64::from(sectors) * 512).expect("size fuzz disk");
            let cfg = kickvm_virtio::block::BlockConfig {
                path: path.into(),
                readonly,
                serial: Some("fuzz".into()),
                num_queues: 1 + u16::from(queues % 2),
                direct: false,
            };
            let mut dev = kickvm_virtio::block::Block::new("blk0", cfg).expect("virtio-blk on the fuzz disk");
            let mut d = Drv::new(&mut dev, Kind::Blk, input.layout);
            drive(&mut d, &input.steps, Some(sectors))
        }
        DevKind::Console => {
            let path = console_path();
            std::fs::File::create(path).expect("console file");
            let mut dev =
                kickvm_virtio::console::Console::new("console0", kickvm_virtio::console::Backend::File(path.into()))
                    .expect("console on a file");
            let mut d = Drv::new(&mut dev, Kind::Console, input.layout);
            drive(&mut d, &input.steps, None)
        }
        DevKind::Rng => {
            let mut dev = kickvm_virtio::rng::Rng::new("rng0", Default::default()).expect("virtio-rng");
            let mut d = Drv::new(&mut dev, Kind::Rng, input.layout);
            drive(&mut d, &input.steps, None)
        }
        DevKind::Vsock => {
            let (socket, listener) = vsock_socket();
            let cfg = kickvm_virtio::vsock::VsockConfig {
                name: "vsock0".into(),
                cid: VSOCK_CID,
                socket: socket.clone(),
                seccomp: kickvm_virtio::seccomp::SeccompMode::Off,
            };
            let mut dev = kickvm_virtio::vsock::Vsock::new(cfg).expect("virtio-vsock");
            let mut d = Drv::new(&mut dev, Kind::Vsock, input.layout);
            let o = drive(&mut d, &input.steps, None);
            // The guest's connections this run made: gone with the run.
            while listener.accept().is_ok() {}
            o
        }
    };
    checks::log_end();
    outcome
}

fn drive(d: &mut Drv<'_>, steps: &[Step], sectors: Option<u8>) -> Outcome {
    for s in steps.iter().take(MAX_STEPS) {
        d.step(s);
    }
    let outcome = Outcome {
        ran: true,
        chains: (0..d.queues.len()).map(|q| d.chains(q) - d.start[q]).collect(),
        needs_reset_seen: d.needs_reset_seen,
    };
    after_reset_serves(d, sectors);
    d.reset();
    outcome
}

// ---- the end-of-run check ----------------------------------------------

/// Writes a chain of `bufs` (address, length, device-writable) at entry
/// `head` of `ring` and makes it available.
fn put_chain(mem: &GuestMemory, ring: &mut SplitRing, head: u16, bufs: &[(u64, u32, bool)]) {
    for (k, &(addr, len, w)) in bufs.iter().enumerate() {
        let mut flags = if w { VIRTQ_DESC_F_WRITE } else { 0 };
        if k + 1 < bufs.len() {
            flags |= VIRTQ_DESC_F_NEXT;
        }
        let i = head + k as u16;
        put(mem, ring.desc + 16 * u64::from(i), &desc_bytes(addr, len, flags, i + 1));
    }
    ring.push_avail(mem, head);
}

fn used_idx(mem: &GuestMemory, ring: &SplitRing) -> u16 {
    mem.read_obj(GuestAddress(ring.used + 2)).unwrap_or(0)
}

/// The `k`th used element: (head, length).
fn used_elem(mem: &GuestMemory, ring: &SplitRing, k: u16) -> (u32, u32) {
    let at = ring.used + 4 + 8 * u64::from(k % ring.size);
    (mem.read_obj(GuestAddress(at)).unwrap_or(u32::MAX), mem.read_obj(GuestAddress(at + 4)).unwrap_or(0))
}

/// Whatever the guest did before: reset, re-activate with fresh rings and
/// a valid request is served (issue 8: a device survives any number of
/// reset cycles).
fn after_reset_serves(d: &mut Drv<'_>, sectors: Option<u8>) {
    let name = d.dev.name().to_string();
    let cycles = d.cycles;
    put(&d.mem, CHECK_RINGS, &vec![0u8; 0x4_0000]);
    let features = match d.kind {
        Kind::Net => VERSION_1 | F_CTRL_VQ | F_MQ,
        _ => u64::MAX,
    };
    let nq = d.queues.len();
    if let Err(e) = d.activate(features, (1 << nq) - 1, 16, CHECK_RINGS) {
        panic!("{name}: cannot be activated again after {cycles} activations: {e}");
    }
    let ring = |d: &Drv<'_>, q: usize| d.queues[q].ring;
    let status = |mem: &GuestMemory, at: u64| mem.read_obj::<u8>(GuestAddress(at)).unwrap_or(0xff);
    match d.kind {
        Kind::Blk => {
            let mem = &d.mem;
            let mut r = ring(d, 0);
            let hdr = CHECK_BUFS;
            let mut h = [0u8; 16];
            h[0] = 8; // GET_ID
            put(mem, hdr, &h);
            put(mem, CHECK_BUFS + 0x80, &[0xff]);
            put_chain(mem, &mut r, 0, &[(hdr, 16, false), (CHECK_BUFS + 0x100, 20, true), (CHECK_BUFS + 0x80, 1, true)]);
            let read = sectors.is_some_and(|s| s > 0);
            if read {
                let hdr = CHECK_BUFS + 0x200;
                put(mem, hdr, &[0u8; 16]); // IN, sector 0
                put(mem, CHECK_BUFS + 0x280, &[0xff]);
                put_chain(mem, &mut r, 4, &[(hdr, 16, false), (CHECK_BUFS + 0x1000, 512, true), (CHECK_BUFS + 0x280, 1, true)]);
            }
            d.queues[0].ring = r;
            d.serve();
            let mem = &d.mem;
            let want = 1 + u16::from(read);
            assert_eq!(used_idx(mem, &r), want, "{name}: a valid request is not served after {cycles} activations");
            assert_eq!(used_elem(mem, &r, 0), (0, 21), "{name}: GET_ID");
            assert_eq!(status(mem, CHECK_BUFS + 0x80), 0, "{name}: GET_ID status");
            let mut id = [0u8; 4];
            mem.read_slice(&mut id, GuestAddress(CHECK_BUFS + 0x100)).unwrap();
            assert_eq!(&id, b"fuzz");
            if read {
                assert_eq!(used_elem(mem, &r, 1), (4, 513), "{name}: read of sector 0");
                assert_eq!(status(mem, CHECK_BUFS + 0x280), 0, "{name}: read status");
            }
        }
        Kind::Rng => {
            let mem = &d.mem;
            let mut r = ring(d, 0);
            put_chain(mem, &mut r, 0, &[(CHECK_BUFS, 64, true)]);
            d.queues[0].ring = r;
            d.serve();
            assert_eq!(used_elem(&d.mem, &r, 0), (0, 64), "{name}: rng request after {cycles} activations");
            assert_eq!(used_idx(&d.mem, &r), 1);
        }
        Kind::Console => {
            let before = std::fs::metadata(console_path()).map(|m| m.len()).unwrap_or(0);
            let mem = &d.mem;
            let mut r = ring(d, 1);
            put(mem, CHECK_BUFS, b"ok\n");
            put_chain(mem, &mut r, 0, &[(CHECK_BUFS, 3, false)]);
            d.queues[1].ring = r;
            d.serve();
            assert_eq!(used_idx(&d.mem, &r), 1, "{name}: output after {cycles} activations");
            let after = std::fs::metadata(console_path()).map(|m| m.len()).unwrap_or(0);
            assert_eq!(after, before + 3, "{name}: the output did not reach the file");
        }
        Kind::Net => {
            // A packet out, two control commands (receive mode, 2 pairs).
            let mem = &d.mem;
            let mut tx = ring(d, 1);
            let mut pkt = vec![0u8; 12];
            pkt.extend_from_slice(&frame(46, 0x5a));
            put(mem, CHECK_BUFS, &pkt);
            put_chain(mem, &mut tx, 0, &[(CHECK_BUFS, pkt.len() as u32, false)]);
            d.queues[1].ring = tx;
            let ctrl_q = 2 * usize::from(NET_PAIRS);
            let mut ctrl = ring(d, ctrl_q);
            put(mem, CHECK_BUFS + 0x100, &[0, 0, 1]); // RX, PROMISC, on
            put(mem, CHECK_BUFS + 0x140, &[0xff]);
            put_chain(mem, &mut ctrl, 0, &[(CHECK_BUFS + 0x100, 3, false), (CHECK_BUFS + 0x140, 1, true)]);
            put(mem, CHECK_BUFS + 0x180, &[4, 0, 2, 0]); // MQ, VQ_PAIRS_SET, 2
            put(mem, CHECK_BUFS + 0x1c0, &[0xff]);
            put_chain(mem, &mut ctrl, 2, &[(CHECK_BUFS + 0x180, 4, false), (CHECK_BUFS + 0x1c0, 1, true)]);
            d.queues[ctrl_q].ring = ctrl;
            d.serve();
            let mem = &d.mem;
            assert_eq!(used_idx(mem, &tx), 1, "{name}: transmit after {cycles} activations");
            assert_eq!(used_idx(mem, &ctrl), 2, "{name}: control queue after {cycles} activations");
            assert_eq!(status(mem, CHECK_BUFS + 0x140), 0, "{name}: RX_PROMISC not acknowledged");
            assert_eq!(status(mem, CHECK_BUFS + 0x1c0), 0, "{name}: VQ_PAIRS_SET 2 not acknowledged");
            drain_rx(d);
        }
        Kind::Vsock => {
            // A REQUEST to port 1, where nobody listens: RST on the receive queue.
            let mem = &d.mem;
            let mut rx = ring(d, 0);
            put_chain(mem, &mut rx, 0, &[(CHECK_BUFS, 44, true), (CHECK_BUFS + 0x100, 64, true)]);
            d.queues[0].ring = rx;
            let mut tx = ring(d, 1);
            let mut hdr = [0u8; 44];
            hdr[0..8].copy_from_slice(&VSOCK_CID.to_le_bytes());
            hdr[8..16].copy_from_slice(&2u64.to_le_bytes());
            hdr[16..20].copy_from_slice(&7777u32.to_le_bytes()); // src port
            hdr[20..24].copy_from_slice(&1u32.to_le_bytes()); // dst port
            hdr[28..30].copy_from_slice(&1u16.to_le_bytes()); // stream
            hdr[30..32].copy_from_slice(&1u16.to_le_bytes()); // REQUEST
            put(mem, CHECK_BUFS + 0x200, &hdr);
            put_chain(mem, &mut tx, 0, &[(CHECK_BUFS + 0x200, 44, false)]);
            d.queues[1].ring = tx;
            d.serve(); // tx takes the REQUEST
            d.serve(); // rx sends the RST
            let mem = &d.mem;
            assert_eq!(used_idx(mem, &tx), 1, "{name}: transmit after {cycles} activations");
            assert_eq!(used_idx(mem, &rx), 1, "{name}: no reply after {cycles} activations");
            assert_eq!(used_elem(mem, &rx, 0), (0, 44), "{name}: a bare header");
            let mut got = [0u8; 44];
            mem.read_slice(&mut got, GuestAddress(CHECK_BUFS)).unwrap();
            assert_eq!(&got[16..24], &[1, 0, 0, 0, 0x61, 0x1e, 0, 0], "{name}: from port 1 to 7777");
            assert_eq!(&got[30..32], &[3, 0], "{name}: RST");
        }
    }
    assert!(!d.needs_reset(), "{name}: NEEDS_RESET after a valid request");
}

/// Gives both receive queues buffers until the TAP has nothing left for
/// the guest (what this run sent it), so the next run starts empty.
fn drain_rx(d: &mut Drv<'_>) {
    const BUF: u64 = 2048;
    for (q, base) in [(0usize, CHECK_BUFS + 0x1_0000), (2, CHECK_BUFS + 0x1_8000)] {
        let mut r = d.queues[q].ring;
        for h in 0..r.size {
            put_chain(&d.mem, &mut r, h, &[(base + BUF * u64::from(h % 4), BUF as u32, true)]);
        }
        d.queues[q].ring = r;
    }
    let mut seen = [0u16; 2];
    for _ in 0..256 {
        d.serve();
        let mut more = false;
        for (k, q) in [0usize, 2].into_iter().enumerate() {
            let mut r = d.queues[q].ring;
            let u = used_idx(&d.mem, &r);
            while seen[k] != u {
                more = true;
                let (head, _) = used_elem(&d.mem, &r, seen[k]);
                r.push_avail(&d.mem, head as u16);
                seen[k] = seen[k].wrapping_add(1);
            }
            d.queues[q].ring = r;
        }
        if !more {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    /// The seeds do what their names say: requests served (net: packets
    /// both ways and control commands, when a TAP can be opened here),
    /// a lying avail index puts the device in NEEDS_RESET.
    #[test]
    fn seeds_get_served() {
        let want: [(&str, &[u64], bool); 10] = [
            ("blk-write-read-flush-id-discard-zeroes", &[6], false),
            ("blk-readonly-two-queues-reset-between", &[2, 2], false),
            ("blk-indirect", &[1], false),
            ("blk-indirect-loop-65535", &[1], false),
            ("net-tx-packet-rx-from-host", &[1, 1, 0, 0, 0], false),
            ("net-ctrl-vq-pairs-set-reset-cycles", &[0, 0, 1, 1, 4], false),
            ("console-tx-rx", &[0, 2], false),
            ("rng-reset-cycles-bad-rings", &[2], false),
            ("rng-avail-idx-lies", &[0], true),
            ("vsock-connect-both-ways-rst-reset", &[2, 3, 1], false),
        ];
        let seeds = crate::seeds::device_requests();
        assert_eq!(seeds.len(), want.len());
        for (name, chains, reset) in want {
            let v = &seeds.iter().find(|(n, _)| *n == name).expect(name).1;
            let o = super::run_outcome(v);
            if !o.ran {
                eprintln!("{name}: skipped (no TAP here)");
                continue;
            }
            assert_eq!((o.chains.as_slice(), o.needs_reset_seen), (chains, reset), "{name}: {o:?}");
        }
    }
}
