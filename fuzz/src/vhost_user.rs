//! The `vhost_user` target: a back-end's handling of what a vhost-user
//! frontend sends (`kickvm_vhost::serve_with`, the code `kickvm backend`
//! runs per connection), over a real unix socket pair, with real fds
//! passed (memfds for guest memory, eventfds, pipes, `/dev/null`), for
//! virtio-blk (a memfd disk), -console (to a memfd file) and -rng.
//!
//! Messages are either structured (the requests with their bodies laid
//! out right, fields chosen by the fuzzer, so runs reach running queues,
//! memory-table changes under them, enables and stops in any order) or
//! raw (any request code, flags, declared size, body bytes and fds). A
//! `Setup` step sends a frontend's whole by-the-book start of one queue.
//!
//! Checks, besides no panic / overflow / timeout / RSS (libFuzzer) and no
//! log flood ([`checks::log_end`]):
//! - when the frontend goes, the back-end gives the device back (`serve`
//!   returns it: the next frontend can be served) and has stopped every
//!   thread it started and closed every fd it was passed
//!   ([`checks::Census`]);
//! - whatever came before, the next frontend on that device is served: a
//!   by-the-book start of a queue and one request (rng entropy, a blk read
//!   with status OK, console output) comes back on the used ring within
//!   500 ms, as a reconnecting QEMU's would.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use kickvm_virtio::seccomp::SeccompMode;
use kickvm_virtio::{Runtime, ThreadingMode, VirtioDevice};

use crate::checks;
use crate::enc::{Bytes, Enc, Encode};

/// Where the frontend "has" guest memory: user address = this + offset.
pub const USER_BASE: u64 = 0x7f00_0000_0000;
const PAGE: u64 = 4096;
/// Bytes of replies a run may leave unread in the socket (the back-end
/// blocks when its send buffer is full): a cap on the messages per run.
const MAX_MSGS: usize = 48;

// ---- input ----------------------------------------------------------

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum VuDevice {
    Blk,
    Console,
    Rng,
}

/// An fd passed with a message.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fd {
    /// A memfd of `pages + 1` pages.
    Memfd(u8),
    Eventfd,
    Pipe,
    DevNull,
}

/// A memory region, in pages: guest address, size, the frontend's user
/// address (from [`USER_BASE`]), offset in its fd.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub guest: u16,
    pub pages: u8,
    pub user: u16,
    pub offset: u8,
    pub fd: Fd,
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Request `code` with a `u64` body (or none): features, owner, GET_*.
    Simple { code: u8, body: Option<u64>, reply: bool },
    /// SET_VRING_NUM / SET_VRING_BASE / GET_VRING_BASE / SET_VRING_ENABLE
    /// (`which % 4`) of queue `index` with `num`.
    VringState { which: u8, index: u8, num: u32, reply: bool },
    /// SET_VRING_ADDR with user addresses `USER_BASE + x`.
    VringAddr { index: u8, desc: u32, used: u32, avail: u32, reply: bool },
    /// SET_VRING_KICK / CALL / ERR (`which % 3`); no fd sets the
    /// "invalid fd" flag.
    VringFd { which: u8, index: u8, fd: Option<Fd>, reply: bool },
    MemTable { regions: Vec<Region>, reply: bool },
    AddRegion { region: Region, reply: bool },
    RemRegion { region: Region, reply: bool },
    /// GET_CONFIG or SET_CONFIG.
    Config { set: bool, offset: u32, data: Bytes<32>, reply: bool },
    /// Anything: code, flags, the size the header claims, body, fds.
    Raw { code: u32, flags: u32, size: u32, body: Bytes<64>, fds: Vec<Fd> },
    /// A frontend's whole start of queue `queue` (size 64) in 64 KiB of
    /// guest memory: owner, features, protocol features, memory table,
    /// num, addresses, base, call, kick, enable.
    Setup { queue: u8 },
    /// Writes every kick eventfd passed so far.
    Kick,
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct VuInput {
    pub device: VuDevice,
    pub msgs: Vec<Msg>,
}

// ---- the frontend side ----------------------------------------------

const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;
const VERSION: u32 = 1;
const NEED_REPLY: u32 = 1 << 3;

struct Sender {
    sock: UnixStream,
    /// Eventfds passed as kicks (what `Kick` writes), kept open here as a
    /// frontend keeps its ioeventfds.
    kicks: Vec<OwnedFd>,
}

fn fd_of(kind: Fd) -> OwnedFd {
    // SAFETY: each call makes a new fd (or fails, checked), owned below.
    let raw: RawFd = unsafe {
        match kind {
            Fd::Memfd(pages) => {
                let fd = libc::memfd_create(c"kickvm-fuzz-vu-guest".as_ptr(), libc::MFD_CLOEXEC);
                if fd >= 0 {
                    libc::ftruncate(fd, ((u64::from(pages) + 1) * PAGE) as i64);
                }
                fd
            }
            Fd::Eventfd => libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK),
            Fd::Pipe => {
                let mut p = [0; 2];
                if libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                    -1
                } else {
                    libc::close(p[1]);
                    p[0]
                }
            }
            Fd::DevNull => libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC),
        }
    };
    assert!(raw >= 0, "cannot make a {kind:?}: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

fn le(fields: &[u64], widths: &[usize]) -> Vec<u8> {
    fields.iter().zip(widths).flat_map(|(v, &w)| v.to_le_bytes()[..w].to_vec()).collect()
}

fn region_body(r: &Region) -> Vec<u8> {
    le(
        &[u64::from(r.guest) * PAGE, (u64::from(r.pages) + 1) * PAGE, USER_BASE + u64::from(r.user) * PAGE, u64::from(r.offset) * PAGE],
        &[8, 8, 8, 8],
    )
}

impl Sender {
    /// Sends one message; false once the back-end has hung up.
    fn send(&mut self, code: u32, flags: u32, size: u32, body: &[u8], fds: &[OwnedFd]) -> bool {
        let mut msg = le(&[code.into(), flags.into(), size.into()], &[4, 4, 4]);
        msg.extend_from_slice(body);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut iov = libc::iovec { iov_base: msg.as_mut_ptr().cast(), iov_len: msg.len() };
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE((raw.len() * 4) as u32) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        // SAFETY: a zeroed msghdr is valid; the pointers set below live
        // until sendmsg returns.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        if !raw.is_empty() {
            hdr.msg_control = cbuf.as_mut_ptr().cast();
            hdr.msg_controllen = space;
            // SAFETY: the control buffer has room for one header with
            // `raw.len()` fds (CMSG_SPACE above).
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&hdr);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN((raw.len() * 4) as u32) as usize;
                std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), raw.len());
            }
        }
        // SAFETY: hdr describes valid buffers; MSG_NOSIGNAL: a back-end
        // that hung up is an error here, not a SIGPIPE.
        unsafe { libc::sendmsg(self.sock.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) >= 0 }
    }

    /// A well-formed request with `body` and `fds`.
    fn request(&mut self, code: u32, reply: bool, body: &[u8], fds: &[OwnedFd]) -> bool {
        let flags = VERSION | if reply { NEED_REPLY } else { 0 };
        self.send(code, flags, body.len() as u32, body, fds)
    }

    fn step(&mut self, m: &Msg, offered: u64) -> bool {
        match m {
            Msg::Simple { code, body, reply } => {
                let b = body.map(|v| v.to_le_bytes().to_vec()).unwrap_or_default();
                self.request(u32::from(*code % 48), *reply, &b, &[])
            }
            Msg::VringState { which, index, num, reply } => {
                let code = [SET_VRING_NUM, SET_VRING_BASE, GET_VRING_BASE, SET_VRING_ENABLE][usize::from(which % 4)];
                self.request(code, *reply, &le(&[u64::from(*index), u64::from(*num)], &[4, 4]), &[])
            }
            Msg::VringAddr { index, desc, used, avail, reply } => {
                let a = |x: &u32| USER_BASE + u64::from(*x);
                let body = le(&[u64::from(*index), a(desc), a(used), a(avail), 0], &[8, 8, 8, 8, 8]);
                self.request(SET_VRING_ADDR, *reply, &body, &[])
            }
            Msg::VringFd { which, index, fd, reply } => {
                let code = [SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR][usize::from(which % 3)];
                let body = (u64::from(*index) | if fd.is_none() { 1 << 8 } else { 0 }).to_le_bytes();
                let fds: Vec<OwnedFd> = fd.iter().map(|k| fd_of(*k)).collect();
                let ok = self.request(code, *reply, &body, &fds);
                if code == SET_VRING_KICK && *fd == Some(Fd::Eventfd) {
                    self.kicks.extend(fds);
                }
                ok
            }
            Msg::MemTable { regions, reply } => {
                let regions = &regions[..regions.len().min(8)];
                let mut body = le(&[regions.len() as u64, 0], &[4, 4]);
                body.extend(regions.iter().flat_map(region_body));
                let fds: Vec<OwnedFd> = regions.iter().map(|r| fd_of(r.fd)).collect();
                self.request(SET_MEM_TABLE, *reply, &body, &fds)
            }
            Msg::AddRegion { region, reply } | Msg::RemRegion { region, reply } => {
                let code = if matches!(m, Msg::AddRegion { .. }) { ADD_MEM_REG } else { REM_MEM_REG };
                let mut body = 0u64.to_le_bytes().to_vec();
                body.extend(region_body(region));
                self.request(code, *reply, &body, &[fd_of(region.fd)])
            }
            Msg::Config { set, offset, data, reply } => {
                let mut body = le(&[u64::from(*offset), data.0.len() as u64, 0], &[4, 4, 4]);
                if *set {
                    body.extend_from_slice(&data.0);
                } else {
                    body.extend(std::iter::repeat_n(0, data.0.len()));
                }
                self.request(if *set { SET_CONFIG } else { GET_CONFIG }, *reply, &body, &[])
            }
            Msg::Raw { code, flags, size, body, fds } => {
                let fds: Vec<OwnedFd> = fds.iter().take(8).map(|k| fd_of(*k)).collect();
                self.send(*code, *flags, *size, &body.0, &fds)
            }
            Msg::Setup { queue } => self.setup(u64::from(*queue), offered),
            Msg::Kick => {
                for k in &self.kicks {
                    // SAFETY: an 8-byte write from a valid buffer.
                    unsafe { libc::write(k.as_raw_fd(), 1u64.to_ne_bytes().as_ptr().cast(), 8) };
                }
                true
            }
        }
    }

    /// A by-the-book start of queue `q` (rings at 0, 0x1000, 0x2000 of a
    /// 64 KiB memfd mapped at guest 0).
    fn setup(&mut self, q: u64, offered: u64) -> bool {
        self.setup_on(q, offered, fd_of(Fd::Memfd(15)))
    }

    /// [`Sender::setup`] with guest memory `mem` (64 KiB).
    fn setup_on(&mut self, q: u64, offered: u64, mem: OwnedFd) -> bool {
        let region = Region { guest: 0, pages: 15, user: 0, offset: 0, fd: Fd::Memfd(15) };
        let mut body = le(&[1, 0], &[4, 4]);
        body.extend(region_body(&region));
        let kick = fd_of(Fd::Eventfd);
        let ok = self.request(SET_OWNER, false, &[], &[])
            && self.request(SET_FEATURES, false, &offered.to_le_bytes(), &[])
            && self.request(SET_PROTOCOL_FEATURES, false, &0x0000_8209u64.to_le_bytes(), &[])
            && self.request(SET_MEM_TABLE, true, &body, &[mem])
            && self.request(SET_VRING_NUM, true, &le(&[q, 64], &[4, 4]), &[])
            && self.request(SET_VRING_ADDR, true, &le(&[q, USER_BASE, USER_BASE + 0x2000, USER_BASE + 0x1000, 0], &[8; 5]), &[])
            && self.request(SET_VRING_BASE, true, &le(&[q, 0], &[4, 4]), &[])
            && self.request(SET_VRING_CALL, true, &q.to_le_bytes(), &[fd_of(Fd::Eventfd)])
            && self.request(SET_VRING_KICK, true, &q.to_le_bytes(), &[kick.try_clone().expect("dup")])
            && self.request(SET_VRING_ENABLE, true, &le(&[q, 1], &[4, 4]), &[]);
        self.kicks.push(kick);
        ok
    }
}

// ---- the back-end side ----------------------------------------------

/// A memfd, by path (`/proc/self/fd/N`), kept open for the process.
fn memfd_path(name: &std::ffi::CStr, len: i64) -> String {
    // SAFETY: memfd_create with a valid C string; the fd stays open for
    // the life of the process, so its path stays valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a valid fd.
    unsafe { libc::ftruncate(fd, len) };
    format!("/proc/self/fd/{fd}")
}

fn device(kind: VuDevice) -> Box<dyn VirtioDevice> {
    static DISK: OnceLock<String> = OnceLock::new();
    static CONSOLE: OnceLock<String> = OnceLock::new();
    let spec = match kind {
        VuDevice::Blk => format!("path={},queues=2", DISK.get_or_init(|| memfd_path(c"kickvm-fuzz-vu-disk", 1 << 20))),
        VuDevice::Console => format!("file={}", CONSOLE.get_or_init(|| memfd_path(c"kickvm-fuzz-vu-console", 0))),
        VuDevice::Rng => String::new(),
    };
    let k = match kind {
        VuDevice::Blk => kickvm_vhost::DeviceKind::Blk,
        VuDevice::Console => kickvm_vhost::DeviceKind::Console,
        VuDevice::Rng => kickvm_vhost::DeviceKind::Rng,
    };
    kickvm_vhost::DeviceSpec::parse(k, &spec).and_then(|s| s.build()).expect("the fuzz device builds")
}

/// Serves `dev` on a new connection on a thread; returns our end and the
/// thread.
fn serve(dev: Box<dyn VirtioDevice>) -> (UnixStream, std::thread::JoinHandle<Option<Box<dyn VirtioDevice>>>) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    // Filters off: the fuzzer runs many connections in one process, and
    // what is fuzzed is the message handling, not the filters.
    let t = std::thread::spawn(move || {
        kickvm_vhost::serve_with(theirs, dev, Runtime::with_seccomp(ThreadingMode::PerQueue, SeccompMode::Off), SeccompMode::Off)
    });
    (ours, t)
}

/// Guest memory of the last check, mapped here too.
struct Mapped(*mut u8);

impl Mapped {
    const LEN: usize = 16 * PAGE as usize;
    fn put(&self, at: u64, bytes: &[u8]) {
        assert!(at as usize + bytes.len() <= Self::LEN);
        // SAFETY: inside the mapping (checked above); the back-end only
        // reads these bytes until the ring is published.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.0.add(at as usize), bytes.len()) };
    }
    fn u16_at(&self, at: u64) -> u16 {
        // SAFETY: an aligned u16 inside the mapping, which the back-end
        // writes concurrently: a volatile read.
        unsafe { std::ptr::read_volatile(self.0.add(at as usize).cast::<u16>()) }
    }
    fn byte_at(&self, at: u64) -> u8 {
        // SAFETY: as above.
        unsafe { std::ptr::read_volatile(self.0.add(at as usize)) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: our mapping of LEN bytes.
        unsafe { libc::munmap(self.0.cast(), Self::LEN) };
    }
}

/// Whatever the last frontend did, the next one is served: a by-the-book
/// start of a queue and one request on it (rng: 64 bytes of entropy; blk:
/// a read of sector 0, status OK; console: 8 bytes out) comes back on the
/// used ring. Returns the device, given back when that frontend goes.
fn next_frontend_is_served(dev: Box<dyn VirtioDevice>, kind: VuDevice, offered: u64) -> Box<dyn VirtioDevice> {
    let (sock, t) = serve(dev);
    let mut s = Sender { sock, kicks: Vec::new() };
    let mem = fd_of(Fd::Memfd(15));
    // SAFETY: a shared mapping of the whole 64 KiB memfd.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), Mapped::LEN, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, mem.as_raw_fd(), 0)
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
    let m = Mapped(p.cast());
    // Descriptors at guest 0 (addr u64, len u32, flags u16, next u16);
    // buffers from 0x4000; avail ring at 0x1000, used ring at 0x2000.
    let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        m.put(i * 16, &le(&[addr, len.into(), flags.into(), next.into()], &[8, 4, 2, 2]));
    };
    let (queue, status) = match kind {
        VuDevice::Rng => {
            desc(0, 0x4000, 64, 2, 0);
            (0, None)
        }
        VuDevice::Blk => {
            m.put(0x4000, &[0; 16]); // VIRTIO_BLK_T_IN of sector 0
            m.put(0x6000, &[0xff]);
            desc(0, 0x4000, 16, 1, 1);
            desc(1, 0x5000, 512, 3, 2);
            desc(2, 0x6000, 1, 2, 0);
            (0, Some(0x6000))
        }
        VuDevice::Console => {
            m.put(0x4000, b"kickvm!\n");
            desc(0, 0x4000, 8, 0, 0);
            (1, None)
        }
    };
    m.put(0x1000, &le(&[0, 1, 0], &[2, 2, 2]));
    assert!(s.setup_on(queue, offered, mem), "the next frontend can set a queue up");
    for k in &s.kicks {
        // SAFETY: an 8-byte write from a valid buffer.
        unsafe { libc::write(k.as_raw_fd(), 1u64.to_ne_bytes().as_ptr().cast(), 8) };
    }
    let end = std::time::Instant::now() + std::time::Duration::from_millis(500);
    while m.u16_at(0x2002) != 1 {
        assert!(std::time::Instant::now() < end, "the next frontend's request is served (device {kind:?})");
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    if let Some(at) = status {
        assert_eq!(m.byte_at(at), 0, "the next frontend's read succeeds");
    }
    let _ = s.sock.shutdown(std::net::Shutdown::Write);
    let dev = t.join().expect("no panic").expect("device back");
    drop((s, m));
    dev
}

pub fn run(input: &VuInput) {
    checks::log_begin();
    // (The device first: its disk or console memfd stays open for good.)
    let dev = device(input.device);
    let census = checks::Census::take();
    let offered = dev.features() | (1 << 30);
    let (sock, t) = serve(dev);
    let mut s = Sender { sock, kicks: Vec::new() };
    for m in input.msgs.iter().take(MAX_MSGS) {
        if !s.step(m, offered) {
            break;
        }
    }
    // The frontend goes: the back-end must give the device back.
    let _ = s.sock.shutdown(std::net::Shutdown::Write);
    let dev = t.join().expect("the serving thread does not panic").expect("the back-end gives the device back");
    drop(s);

    let dev = next_frontend_is_served(dev, input.device, offered);
    drop(dev);
    census.expect_back("a vhost-user connection");
    checks::log_end();
}

// ---- encoding (seeds) ----------------------------------------------

impl Encode for VuDevice {
    fn encode(&self, e: &mut Enc) {
        e.tag(*self as u32, 3);
    }
}

impl Encode for Fd {
    fn encode(&self, e: &mut Enc) {
        match self {
            Fd::Memfd(p) => e.tag(0, 4).u8(*p),
            Fd::Eventfd => e.tag(1, 4),
            Fd::Pipe => e.tag(2, 4),
            Fd::DevNull => e.tag(3, 4),
        };
    }
}

impl Encode for Region {
    fn encode(&self, e: &mut Enc) {
        e.u16(self.guest).u8(self.pages).u16(self.user).u8(self.offset).put(&self.fd);
    }
}

impl Encode for Msg {
    fn encode(&self, e: &mut Enc) {
        const N: u32 = 11;
        match self {
            Msg::Simple { code, body, reply } => e.tag(0, N).u8(*code).option(body).bool(*reply),
            Msg::VringState { which, index, num, reply } => e.tag(1, N).u8(*which).u8(*index).u32(*num).bool(*reply),
            Msg::VringAddr { index, desc, used, avail, reply } => {
                e.tag(2, N).u8(*index).u32(*desc).u32(*used).u32(*avail).bool(*reply)
            }
            Msg::VringFd { which, index, fd, reply } => e.tag(3, N).u8(*which).u8(*index).option(fd).bool(*reply),
            Msg::MemTable { regions, reply } => e.tag(4, N).vec(regions).bool(*reply),
            Msg::AddRegion { region, reply } => e.tag(5, N).put(region).bool(*reply),
            Msg::RemRegion { region, reply } => e.tag(6, N).put(region).bool(*reply),
            Msg::Config { set, offset, data, reply } => e.tag(7, N).bool(*set).u32(*offset).put(data).bool(*reply),
            Msg::Raw { code, flags, size, body, fds } => e.tag(8, N).u32(*code).u32(*flags).u32(*size).put(body).vec(fds),
            Msg::Setup { queue } => e.tag(9, N).u8(*queue),
            Msg::Kick => e.tag(10, N),
        };
    }
}

impl Encode for VuInput {
    fn encode(&self, e: &mut Enc) {
        e.put(&self.device).vec(&self.msgs);
    }
}

/// The seeds: a by-the-book start for each device, then what a frontend
/// does next (stop, memory change, reconnect-style disorder).
pub fn seeds() -> Vec<(&'static str, VuInput)> {
    let mem = |pages: u8| Region { guest: 0, pages, user: 0, offset: 0, fd: Fd::Memfd(pages) };
    vec![
        ("rng-start-kick-stop", VuInput {
            device: VuDevice::Rng,
            msgs: vec![
                Msg::Setup { queue: 0 },
                Msg::Kick,
                Msg::VringState { which: 3, index: 0, num: 0, reply: true },
                Msg::VringState { which: 2, index: 0, num: 0, reply: false },
            ],
        }),
        ("blk-two-queues-memory-change", VuInput {
            device: VuDevice::Blk,
            msgs: vec![
                Msg::Setup { queue: 0 },
                Msg::Setup { queue: 1 },
                Msg::MemTable { regions: vec![mem(1)], reply: true },
                Msg::AddRegion { region: Region { guest: 64, pages: 3, user: 64, offset: 0, fd: Fd::Memfd(3) }, reply: true },
                Msg::RemRegion { region: Region { guest: 64, pages: 3, user: 64, offset: 0, fd: Fd::Memfd(3) }, reply: true },
                Msg::Config { set: false, offset: 0, data: Bytes::new(vec![0; 8]), reply: false },
                Msg::Kick,
            ],
        }),
        ("console-bad-fds-and-raw", VuInput {
            device: VuDevice::Console,
            msgs: vec![
                Msg::Simple { code: 3, body: None, reply: false },
                Msg::VringFd { which: 0, index: 0, fd: Some(Fd::Pipe), reply: true },
                Msg::VringFd { which: 1, index: 1, fd: Some(Fd::DevNull), reply: true },
                Msg::MemTable { regions: vec![Region { guest: 0, pages: 8, user: 0, offset: 0, fd: Fd::Memfd(1) }], reply: true },
                Msg::Setup { queue: 1 },
                Msg::Raw { code: 9, flags: 1, size: 40, body: Bytes::new(vec![0xff; 40]), fds: vec![Fd::Eventfd] },
            ],
        }),
    ]
}
