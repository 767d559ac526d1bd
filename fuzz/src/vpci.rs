//! The `virtio_pci` target: a guest driving kickvm's PCI root and
//! virtio-pci transport with arbitrary sequences of accesses, with real
//! kickvm devices (virtio-blk on a small file, virtio-console on
//! /dev/null, virtio-rng on /dev/urandom) and their queue threads behind.
//!
//! What a run does: builds the I/O and MMIO buses, a [`kickvm::pci::PciHost`]
//! with the fake KVM of [`crate::fake_kvm`], small anonymous guest memory
//! and the chosen devices (virtio-blk on a memfd, virtio-net on a TAP in the
//! process's own network namespace when it may make one, virtio-console on
//! /dev/null or on a unix socket nobody connects to, virtio-rng); finds each
//! device's capabilities through ECAM as a driver would; runs the input's
//! [`Op`]s; then tears everything down and checks that every queue thread
//! stopped, every fd was closed and every irqfd/ioeventfd was detached.
//!
//! Checked on the way: a reset has completed when the status write returns
//! (no queue thread runs, device_status reads 0); a device brought up the
//! way Linux does it, with rings in RAM, is live after DRIVER_OK (not
//! NEEDS_RESET) however often it was reset and started before.
//!
//! Accesses go where a vCPU exit would deliver them: port I/O to the
//! 0xCF8/0xCFC ports on the I/O bus, memory to the MMIO bus (ECAM, BAR0 —
//! common cfg, ISR, device cfg, notify, MSI-X table and PBA — wherever the
//! guest placed it). Any width from 1 to 8 bytes, any offset.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbitrary::Arbitrary;
use kickvm::bus::Bus;
use kickvm::layout;
use kickvm::pci::common_cfg as cc;
use kickvm::pci::{PciHost, VirtioPciDevice};
use kickvm_virtio::{GuestMemory, Runtime, ThreadingMode, VirtioDevice};

use crate::checks::{self, Census};
use crate::enc::{Bytes, Enc, Encode};
use crate::fake_kvm::{FakeIoeventfds, FakeRouting, Faults};
use crate::guest::{self, Desc, MemLayout, SplitRing};

// ---- input ----------------------------------------------------------

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub struct PciInput {
    pub mode: Mode,
    pub layout: MemLayout,
    pub devices: DeviceSet,
    /// [`Faults`] bits: which fake KVM calls fail.
    pub faults: u8,
    pub ops: Vec<Op>,
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    PerQueue,
    PerDevice,
    Single,
}

/// Devices on the bus, in this order (slots 1, 2, ...). None at all means
/// one rng. Net is left out where the process cannot make TAPs.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct DeviceSet {
    pub blk: Option<BlkOpts>,
    pub net: Option<NetOpts>,
    pub console: Option<ConsoleKind>,
    pub rng: bool,
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct NetOpts {
    /// 1 + pairs % 4 queue pairs.
    pub pairs: u8,
    pub mtu: Option<u16>,
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleKind {
    /// Output to /dev/null, no input.
    Null,
    /// A unix socket no client connects to (the receive side waits in accept).
    Socket,
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct BlkOpts {
    pub readonly: bool,
    /// 1 + queues % 4 queues.
    pub queues: u8,
    /// Disk size in sectors.
    pub sectors: u8,
}

/// Access width: 1 + w % 8 bytes (KVM delivers 1, 2, 4 or 8; the buses
/// take any).
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Width(pub u8);

impl Width {
    pub fn len(self) -> usize {
        1 + usize::from(self.0 % 8)
    }
    pub const B1: Width = Width(0);
    pub const B2: Width = Width(1);
    pub const B4: Width = Width(3);
    pub const B8: Width = Width(7);
}

/// A guest-physical address.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addr {
    /// In low RAM: `v % 1 MiB`.
    Ram(u32),
    /// Anything.
    Raw(u64),
    /// `u64::MAX - v`.
    Top(u16),
    /// `4 GiB + v`.
    Near4G(i16),
    /// Around the end of low RAM: `1 MiB + v`.
    RamEnd(i16),
    /// In the PCI MMIO window.
    Mmio(u32),
    /// In ECAM.
    Ecam(u32),
    /// Device `dev`'s BAR0 + `off`.
    Bar(u8, u16),
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Len {
    Small(u16),
    Raw(u32),
}

impl Len {
    fn get(self) -> u32 {
        match self {
            Len::Small(v) => u32::from(v),
            Len::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The next table entry, with NEXT set unless last.
    Auto,
    /// As given (flags as given too).
    Raw(u16),
}

/// A descriptor of a chain: a buffer, its flags, what the guest put in it.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub addr: Addr,
    pub len: Len,
    pub flags: u16,
    pub next: Next,
    pub data: Bytes<64>,
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum DescOp {
    Leaf(Leaf),
    /// An indirect descriptor; the table is written in a scratch page.
    Indirect { entries: Vec<Leaf>, flags: u16, next: Next, len_delta: i8 },
}

/// One guest action.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum Op {
    /// Port I/O at 0xCF4 + port % 16 (around the config ports).
    PioWrite { port: u8, width: Width, value: u64 },
    PioRead { port: u8, width: Width },
    /// Dword to 0xCF8: enable, bus, slot (dev % 5: 0 host bridge, 1..
    /// devices), function, register.
    CfgSelect { enable: bool, bus: u8, slot: u8, func: u8, reg: u8 },
    /// Raw ECAM access.
    Ecam { write: bool, bus: u8, slot: u8, func: u8, reg: u16, width: Width, value: u64 },
    /// Raw MMIO access anywhere.
    Mmio { write: bool, addr: Addr, width: Width, value: u64 },
    /// Config space of device `dev`, through 0xCF8/0xCFC or ECAM.
    Cfg { dev: u8, write: bool, via_ecam: bool, reg: u16, width: Width, value: u32 },
    /// BAR0 of device `dev` (where it decodes, else where it is programmed).
    Bar { dev: u8, write: bool, offset: u16, width: Width, value: u64 },
    /// A common-configuration register (register `reg % 20`), at its width.
    Common { dev: u8, write: bool, reg: u8, value: u32 },
    /// Writes the command register.
    Command { dev: u8, value: u16 },
    /// Reprograms BAR0 (both halves), with decoding off around it or not.
    MoveBar { dev: u8, to: Addr, decode_off: bool },
    /// MSI-X Message Control.
    MsixControl { dev: u8, value: u16 },
    /// One MSI-X table entry.
    MsixEntry { dev: u8, vector: u16, addr: u64, data: u32, ctrl: u32 },
    /// An access through the VIRTIO_PCI_CAP_PCI_CFG window.
    PciCfg { dev: u8, write: bool, bar: u8, offset: u32, len: u32, value: u32, width: Width, at: u8 },
    /// ACKNOWLEDGE, DRIVER, features (`device & accept | extra`), then
    /// `status` written.
    Negotiate { dev: u8, accept: u64, extra: u64, status: u8 },
    /// device_status.
    Status { dev: u8, value: u8 },
    /// Programs a queue's registers.
    SetupQueue { dev: u8, queue: u16, size: u16, desc: Addr, driver: Addr, device: Addr, vector: u16, enable: bool },
    /// What Linux does up to DRIVER_OK: decode on, MSI-X on with every
    /// vector programmed (or not), reset, negotiate `device & accept |
    /// VERSION_1`, every queue at `size` in guest RAM, DRIVER_OK.
    Start { dev: u8, accept: u64, size: u16, msix: bool, rings: Rings },
    /// Writes guest memory.
    GuestWrite { addr: Addr, data: Bytes<256> },
    /// Puts a chain at table entry `head` of queue `queue` and makes it
    /// available.
    Offer { dev: u8, queue: u16, head: u16, descs: Vec<DescOp> },
    /// A notify write for queue `queue` (`width` bytes of its index);
    /// then up to 2 ms for the device to use what is available.
    Kick { dev: u8, queue: u16, width: Width },
    /// Lets the queue threads run for `micros * 4` µs.
    Settle { micros: u8 },
    /// `ops`, `times` times.
    Repeat { times: u8, ops: Vec<Op> },
}

/// Where [`Op::Start`] puts queue n's rings.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rings {
    /// In RAM, each queue in its own 8 KiB.
    InRam,
    /// At `addr + n * 0x2000`.
    At(Addr),
}

// ---- encoders (for the committed seeds) --------------------------------

impl Encode for Mode {
    fn encode(&self, e: &mut Enc) {
        e.tag(*self as u32, 3);
    }
}
impl Encode for BlkOpts {
    fn encode(&self, e: &mut Enc) {
        e.bool(self.readonly).u8(self.queues).u8(self.sectors);
    }
}
impl Encode for NetOpts {
    fn encode(&self, e: &mut Enc) {
        e.u8(self.pairs).option(&self.mtu);
    }
}
impl Encode for ConsoleKind {
    fn encode(&self, e: &mut Enc) {
        e.tag(*self as u32, 2);
    }
}
impl Encode for DeviceSet {
    fn encode(&self, e: &mut Enc) {
        e.option(&self.blk).option(&self.net).option(&self.console).bool(self.rng);
    }
}
impl Encode for Rings {
    fn encode(&self, e: &mut Enc) {
        match self {
            Rings::InRam => e.tag(0, 2),
            Rings::At(a) => e.tag(1, 2).put(a),
        };
    }
}
impl Encode for Width {
    fn encode(&self, e: &mut Enc) {
        e.u8(self.0);
    }
}
impl Encode for Addr {
    fn encode(&self, e: &mut Enc) {
        const N: u32 = 8;
        match *self {
            Addr::Ram(v) => e.tag(0, N).u32(v),
            Addr::Raw(v) => e.tag(1, N).u64(v),
            Addr::Top(v) => e.tag(2, N).u16(v),
            Addr::Near4G(v) => e.tag(3, N).u16(v as u16),
            Addr::RamEnd(v) => e.tag(4, N).u16(v as u16),
            Addr::Mmio(v) => e.tag(5, N).u32(v),
            Addr::Ecam(v) => e.tag(6, N).u32(v),
            Addr::Bar(d, o) => e.tag(7, N).u8(d).u16(o),
        };
    }
}
impl Encode for Len {
    fn encode(&self, e: &mut Enc) {
        match *self {
            Len::Small(v) => e.tag(0, 2).u16(v),
            Len::Raw(v) => e.tag(1, 2).u32(v),
        };
    }
}
impl Encode for Next {
    fn encode(&self, e: &mut Enc) {
        match *self {
            Next::Auto => e.tag(0, 2),
            Next::Raw(v) => e.tag(1, 2).u16(v),
        };
    }
}
impl Encode for Leaf {
    fn encode(&self, e: &mut Enc) {
        e.put(&self.addr).put(&self.len).u16(self.flags).put(&self.next).put(&self.data);
    }
}
impl Encode for DescOp {
    fn encode(&self, e: &mut Enc) {
        match self {
            DescOp::Leaf(l) => e.tag(0, 2).put(l),
            DescOp::Indirect { entries, flags, next, len_delta } => {
                e.tag(1, 2).vec(entries).u16(*flags).put(next).u8(*len_delta as u8)
            }
        };
    }
}
impl Encode for Op {
    fn encode(&self, e: &mut Enc) {
        const N: u32 = 22;
        match self {
            Op::PioWrite { port, width, value } => e.tag(0, N).u8(*port).put(width).u64(*value),
            Op::PioRead { port, width } => e.tag(1, N).u8(*port).put(width),
            Op::CfgSelect { enable, bus, slot, func, reg } => {
                e.tag(2, N).bool(*enable).u8(*bus).u8(*slot).u8(*func).u8(*reg)
            }
            Op::Ecam { write, bus, slot, func, reg, width, value } => {
                e.tag(3, N).bool(*write).u8(*bus).u8(*slot).u8(*func).u16(*reg).put(width).u64(*value)
            }
            Op::Mmio { write, addr, width, value } => e.tag(4, N).bool(*write).put(addr).put(width).u64(*value),
            Op::Cfg { dev, write, via_ecam, reg, width, value } => {
                e.tag(5, N).u8(*dev).bool(*write).bool(*via_ecam).u16(*reg).put(width).u32(*value)
            }
            Op::Bar { dev, write, offset, width, value } => {
                e.tag(6, N).u8(*dev).bool(*write).u16(*offset).put(width).u64(*value)
            }
            Op::Common { dev, write, reg, value } => e.tag(7, N).u8(*dev).bool(*write).u8(*reg).u32(*value),
            Op::Command { dev, value } => e.tag(8, N).u8(*dev).u16(*value),
            Op::MoveBar { dev, to, decode_off } => e.tag(9, N).u8(*dev).put(to).bool(*decode_off),
            Op::MsixControl { dev, value } => e.tag(10, N).u8(*dev).u16(*value),
            Op::MsixEntry { dev, vector, addr, data, ctrl } => {
                e.tag(11, N).u8(*dev).u16(*vector).u64(*addr).u32(*data).u32(*ctrl)
            }
            Op::PciCfg { dev, write, bar, offset, len, value, width, at } => e
                .tag(12, N)
                .u8(*dev)
                .bool(*write)
                .u8(*bar)
                .u32(*offset)
                .u32(*len)
                .u32(*value)
                .put(width)
                .u8(*at),
            Op::Negotiate { dev, accept, extra, status } => {
                e.tag(13, N).u8(*dev).u64(*accept).u64(*extra).u8(*status)
            }
            Op::Status { dev, value } => e.tag(14, N).u8(*dev).u8(*value),
            Op::SetupQueue { dev, queue, size, desc, driver, device, vector, enable } => e
                .tag(15, N)
                .u8(*dev)
                .u16(*queue)
                .u16(*size)
                .put(desc)
                .put(driver)
                .put(device)
                .u16(*vector)
                .bool(*enable),
            Op::Start { dev, accept, size, msix, rings } => {
                e.tag(16, N).u8(*dev).u64(*accept).u16(*size).bool(*msix).put(rings)
            }
            Op::GuestWrite { addr, data } => e.tag(17, N).put(addr).put(data),
            Op::Offer { dev, queue, head, descs } => e.tag(18, N).u8(*dev).u16(*queue).u16(*head).vec(descs),
            Op::Kick { dev, queue, width } => e.tag(19, N).u8(*dev).u16(*queue).put(width),
            Op::Settle { micros } => e.tag(20, N).u8(*micros),
            Op::Repeat { times, ops } => e.tag(21, N).u8(*times).vec(ops),
        };
    }
}
impl Encode for PciInput {
    fn encode(&self, e: &mut Enc) {
        e.put(&self.mode).put(&self.layout).put(&self.devices).u8(self.faults).vec(&self.ops);
    }
}

// ---- the run ---------------------------------------------------------

/// Work one run may do, in units of a cheap access: keeps every input
/// well under libFuzzer's 1 s timeout, so a timeout is kickvm's.
const BUDGET: u32 = 20_000;
/// Queues a driver here sets up per device at most.
const MAX_QUEUES: u16 = 9;
/// A driver's reset (device_status = 0) returns within this, whatever the
/// guest did before (the bound the virtio tests use; docs/security.md
/// measures under 1 ms for blk and console, this target ~4 ms for a
/// 4-pair net device and up to ~30 ms under load).
const RESET_BOUND: Duration = Duration::from_millis(500);
/// Wall-clock cap on the ops of one run (besides [`BUDGET`]), so that a
/// timeout is kickvm's, not the input's length.
const TIME_CAP: Duration = Duration::from_millis(300);
/// Where [`Op::Start`] puts the rings: queue n at RINGS + n * 0x2000.
const RINGS: u64 = 0x8_0000;
/// Scratch pages for indirect tables.
const INDIRECT_TABLES: u64 = 0x7_0000;

const VERSION_1: u64 = 1 << 32;

/// Where a device's registers are, as its capabilities say.
#[derive(Debug, Clone, Copy)]
struct Caps {
    common: u64,
    isr: u64,
    notify: u64,
    notify_mult: u64,
    msix_cap: u16,
    pci_cfg_cap: u16,
    msix_table: u64,
}

impl Default for Caps {
    /// The layout of kickvm's transport, if a capability is missing.
    fn default() -> Self {
        Caps {
            common: 0,
            isr: 0x1000,
            notify: 0x3000,
            notify_mult: 4,
            msix_cap: 0x40,
            pci_cfg_cap: 0x40,
            msix_table: 0x4000,
        }
    }
}

struct Dev {
    pci: Arc<Mutex<VirtioPciDevice>>,
    slot: u8,
    caps: Caps,
    rings: Vec<Option<SplitRing>>,
}

struct Vm {
    started: std::time::Instant,
    faults: Faults,
    pio: Bus,
    mmio: Bus,
    mem: GuestMemory,
    devs: Vec<Dev>,
    budget: u32,
    /// Indirect tables written so far (each in its own 4 KiB slot).
    indirect_next: u64,
}

/// The disk behind virtio-blk: a memfd, reopened by path for each run.
fn disk_path() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        // SAFETY: memfd_create with a valid C string; the fd is kept open
        // for the life of the process on purpose.
        let fd = unsafe { libc::memfd_create(c"kickvm-fuzz-disk".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        format!("/proc/self/fd/{fd}")
    })
}

/// The console socket's path (one per process).
fn console_socket() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("kickvm-fuzz-pci-{}.sock", std::process::id())).display().to_string()
    })
}

/// A persistent TAP for `pairs` queue pairs (`kvpci1`: single queue,
/// `kvpcim`: multi-queue), made once in a network namespace of the
/// process's own, so that nothing outside sees them and they go when the
/// process does. None where that is not allowed (not root, no
/// /dev/net/tun): the runs then leave net out.
fn net_tap(pairs: u16) -> Option<&'static str> {
    use std::os::unix::fs::MetadataExt;
    let netns = || std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino()).ok();
    static TAPS: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let ns = *TAPS.get_or_init(|| {
        // The namespace is the calling thread's (libFuzzer runs inputs on
        // the main thread), and the queue threads it spawns inherit it.
        // SAFETY: unshare takes flags only.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        let make = |name: &str, queues: usize| {
            kickvm_virtio::net::Tap::open(name, queues).is_ok_and(|t| t[0].set_persist(true).is_ok()) && link_up(name)
        };
        (make("kvpci1", 1) && make("kvpcim", 4)).then(netns).flatten()
    });
    // Only from the thread that made them (a test harness runs each test
    // on a new thread, outside that namespace: no TAPs made there).
    (ns.is_some() && ns == netns()).then_some(if pairs > 1 { "kvpcim" } else { "kvpci1" })
}

/// Sets IFF_UP on interface `name` (a TAP that is down refuses writes).
fn link_up(name: &str) -> bool {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _rest: [u8; 22],
    }
    // SAFETY: a plain socket; closed below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return false;
    }
    let mut req = IfReq { name: [0; 16], flags: 0, _rest: [0; 22] };
    req.name[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    // SAFETY: SIOCGIFFLAGS / SIOCSIFFLAGS read and write one ifreq; `s` is ours.
    unsafe {
        let ok = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) == 0 && {
            req.flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(s, libc::SIOCSIFFLAGS, &req) == 0
        };
        libc::close(s);
        ok
    }
}

fn build_devices(set: &DeviceSet) -> Vec<Box<dyn VirtioDevice>> {
    let mut out: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if let Some(b) = &set.blk {
        let path = disk_path();
        let f = std::fs::OpenOptions::new().write(true).open(path).expect("fuzz disk");
        // Same disk contents for every run: zeroes.
        f.set_len(0).expect("truncate fuzz disk");
        f.set_len(u64::from(b.sectors) * 512).expect("size fuzz disk");
        let cfg = kickvm_virtio::block::BlockConfig {
            path: path.into(),
            readonly: b.readonly,
            serial: Some("fuzz".into()),
            num_queues: 1 + u16::from(b.queues % 4),
            direct: false,
        };
        out.push(Box::new(kickvm_virtio::block::Block::new("blk0", cfg).expect("virtio-blk on the fuzz disk")));
    }
    if let Some(n) = &set.net {
        let pairs = 1 + u16::from(n.pairs % 4);
        if let Some(tap) = net_tap(pairs) {
            let cfg = kickvm_virtio::net::NetConfig {
                name: "net0".into(),
                tap: tap.into(),
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                queue_pairs: pairs,
                mtu: n.mtu,
            };
            out.push(Box::new(kickvm_virtio::net::NetDevice::new(cfg).expect("virtio-net on the fuzz TAP")));
        }
    }
    if let Some(kind) = set.console {
        let backend = match kind {
            ConsoleKind::Null => kickvm_virtio::console::Backend::File("/dev/null".into()),
            ConsoleKind::Socket => kickvm_virtio::console::Backend::Socket(console_socket().into()),
        };
        let c = kickvm_virtio::console::Console::new("console0", backend).expect("virtio-console");
        out.push(Box::new(c));
    }
    if set.rng || out.is_empty() {
        let r = kickvm_virtio::rng::Rng::new("rng0", Default::default()).expect("virtio-rng on /dev/urandom");
        out.push(Box::new(r));
    }
    out
}

/// What a run got done (for tests of the seeds).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Devices with running queue threads at the end of the ops.
    pub active: usize,
    /// Used-ring entries the devices returned, over the rings the driver set up.
    pub used: u32,
}

/// Runs one input; panics on any violation.
pub fn run(input: &PciInput) {
    run_inner(input, false);
}

/// [`run`], saying what got done once the queue threads are idle.
pub fn run_outcome(input: &PciInput) -> Outcome {
    run_inner(input, true)
}

fn run_inner(input: &PciInput, wait_idle: bool) -> Outcome {
    let mut outcome = Outcome::default();
    checks::log_begin();
    // Process-lifetime fds and set-up first, so they are in the census.
    disk_path();
    net_tap(1);
    let before = Census::take();
    let faults = Faults(input.faults);
    {
        let routing = Arc::new(FakeRouting::new(faults));
        let ioev = Arc::new(FakeIoeventfds::new(faults));
        let mode = match input.mode {
            Mode::PerQueue => ThreadingMode::PerQueue,
            Mode::PerDevice => ThreadingMode::PerDevice,
            Mode::Single => ThreadingMode::Single,
        };
        let runtime = Runtime::new(mode);
        let (pio, mmio) = (Bus::new(), Bus::new());
        let mem = guest::memory(input.layout);
        let mut host = PciHost::new(&pio, &mmio, ioev.clone(), routing.clone()).expect("PCI host");
        let mut devs = Vec::new();
        for d in build_devices(&input.devices) {
            match host.add_virtio(d, &mem, &runtime) {
                Ok(pci) => devs.push(Dev { pci, slot: devs.len() as u8 + 1, caps: Caps::default(), rings: Vec::new() }),
                // Only with injected faults (no GSI for the vectors).
                Err(e) => assert!(faults.0 & Faults::ALLOCATE_GSI != 0, "cannot add a device: {e}"),
            }
        }
        let mut vm = Vm { started: std::time::Instant::now(), faults, pio, mmio, mem, devs, budget: BUDGET, indirect_next: 0 };
        for i in 0..vm.devs.len() {
            vm.devs[i].caps = vm.find_caps(vm.devs[i].slot);
        }
        for op in &input.ops {
            if !vm.op(op) {
                break;
            }
        }
        if wait_idle {
            // Until the used rings stop moving for 50 ms (5 s at most).
            let used = |vm: &Vm| -> u32 {
                vm.devs.iter().flat_map(|d| d.rings.iter().flatten()).map(|r| u32::from(r.used_idx(&vm.mem).unwrap_or(0))).sum()
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let mut last = used(&vm);
            loop {
                std::thread::sleep(Duration::from_millis(50));
                let now = used(&vm);
                if now == last || std::time::Instant::now() > deadline {
                    break;
                }
                last = now;
            }
            outcome.active = vm.devs.iter().filter(|d| d.pci.lock().unwrap().is_active()).count();
            outcome.used = used(&vm);
        }
        // Teardown: what the launcher does at poweroff.
        let t = std::time::Instant::now();
        let timing = std::env::var_os("KICKVM_FUZZ_TIMING").is_some();
        if timing {
            eprintln!("[timing] ops took {:.3} ms", vm.started.elapsed().as_secs_f64() * 1e3);
        }
        drop(host);
        if timing {
            eprintln!("[timing] PciHost drop took {:.3} ms", t.elapsed().as_secs_f64() * 1e3);
        }
        for d in &vm.devs {
            assert!(!d.pci.lock().unwrap().is_active(), "queue threads still running after PciHost drop");
        }
        drop(vm);
        drop(runtime);
        assert_eq!(ioev.attached(), 0, "ioeventfds left registered after teardown");
        assert_eq!(routing.attached(), 0, "irqfds left attached after teardown");
    }
    let t = std::time::Instant::now();
    before.expect_back("a virtio-pci run");
    if std::env::var_os("KICKVM_FUZZ_TIMING").is_some() {
        eprintln!("[timing] census took {:.3} ms", t.elapsed().as_secs_f64() * 1e3);
    }
    checks::log_end();
    outcome
}

fn resolve(vm: &Vm, a: Addr) -> u64 {
    match a {
        Addr::Ram(v) => u64::from(v) % guest::LOW_RAM,
        Addr::Raw(v) => v,
        Addr::Top(v) => u64::MAX - u64::from(v),
        Addr::Near4G(v) => (1u64 << 32).wrapping_add_signed(v.into()),
        Addr::RamEnd(v) => guest::LOW_RAM.wrapping_add_signed(v.into()),
        Addr::Mmio(v) => layout::PCI_MMIO_START + u64::from(v) % layout::PCI_MMIO_SIZE,
        Addr::Ecam(v) => layout::PCI_ECAM_START + u64::from(v) % layout::PCI_ECAM_SIZE,
        Addr::Bar(d, off) => match vm.dev(d) {
            Some(i) => vm.bar(i).wrapping_add(u64::from(off)),
            None => u64::from(off),
        },
    }
}

impl Vm {
    fn dev(&self, d: u8) -> Option<usize> {
        (!self.devs.is_empty()).then(|| usize::from(d) % self.devs.len())
    }

    /// Where device `i`'s BAR0 answers (or would, once decoding is on).
    fn bar(&self, i: usize) -> u64 {
        let d = self.devs[i].pci.lock().unwrap();
        d.placed_at().unwrap_or_else(|| d.bar_address())
    }

    fn charge(&mut self, cost: u32) -> bool {
        self.budget = self.budget.saturating_sub(cost);
        self.budget > 0 && self.started.elapsed() < TIME_CAP
    }

    // -- raw accesses, as exits deliver them --

    fn mmio_rw(&self, write: bool, addr: u64, len: usize, value: u64) {
        let mut b = [0u8; 8];
        b.copy_from_slice(&value.to_le_bytes());
        if write {
            self.mmio.write(addr, &b[..len]);
        } else {
            self.mmio.read(addr, &mut b[..len]);
        }
    }

    fn ecam_addr(bus: u8, slot: u8, func: u8, reg: u16) -> u64 {
        layout::PCI_ECAM_START
            + (u64::from(bus) << 20)
            + (u64::from(slot % 32) << 15)
            + (u64::from(func % 8) << 12)
            + u64::from(reg % 0x1000)
    }

    fn cfg_read(&self, slot: u8, reg: u16, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.mmio.read(Self::ecam_addr(0, slot, 0, reg), &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn cfg_write(&self, slot: u8, reg: u16, len: usize, v: u64) {
        self.mmio.write(Self::ecam_addr(0, slot, 0, reg), &v.to_le_bytes()[..len]);
    }

    fn bar_read(&self, i: usize, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.mmio.read(self.bar(i).wrapping_add(off), &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn bar_write(&self, i: usize, off: u64, len: usize, v: u64) {
        self.mmio.write(self.bar(i).wrapping_add(off), &v.to_le_bytes()[..len]);
    }

    fn common_write(&self, i: usize, reg: usize, len: usize, v: u64) {
        self.bar_write(i, self.devs[i].caps.common + reg as u64, len, v);
    }

    fn common_read(&self, i: usize, reg: usize, len: usize) -> u64 {
        self.bar_read(i, self.devs[i].caps.common + reg as u64, len)
    }

    /// Walks the capability list as Linux's virtio_pci_modern does.
    fn find_caps(&self, slot: u8) -> Caps {
        let mut caps = Caps::default();
        let mut at = self.cfg_read(slot, 0x34, 1) as u16;
        for _ in 0..48 {
            if at < 0x40 || at > 0xfc {
                break;
            }
            let id = self.cfg_read(slot, at, 1);
            if id == 0x11 {
                caps.msix_cap = at;
                caps.msix_table = self.cfg_read(slot, at + 4, 4) & !7;
            } else if id == 0x09 {
                let ty = self.cfg_read(slot, at + 3, 1) as u8;
                let off = self.cfg_read(slot, at + 8, 4);
                match ty {
                    kickvm::pci::virtio_pci::CFG_TYPE_COMMON => caps.common = off,
                    kickvm::pci::virtio_pci::CFG_TYPE_ISR => caps.isr = off,
                    kickvm::pci::virtio_pci::CFG_TYPE_NOTIFY => {
                        caps.notify = off;
                        caps.notify_mult = self.cfg_read(slot, at + 16, 4);
                    }
                    kickvm::pci::virtio_pci::CFG_TYPE_PCI => caps.pci_cfg_cap = at,
                    _ => {}
                }
            }
            at = self.cfg_read(slot, at + 1, 1) as u16;
        }
        caps
    }

    fn set_status(&self, i: usize, s: u8) {
        let t = std::time::Instant::now();
        self.common_write(i, cc::DEVICE_STATUS, 1, s.into());
        if s == 0 {
            let took = t.elapsed();
            if std::env::var_os("KICKVM_FUZZ_TIMING").is_some() {
                eprintln!("[timing] reset of device {i} took {:.3} ms", took.as_secs_f64() * 1e3);
            }
            assert!(took < RESET_BOUND, "device {i}: a reset took {took:?} (bound {RESET_BOUND:?})");
            self.check_reset(i);
        }
    }

    /// A reset has completed by the time the write returns (virtio 1.x
    /// 4.1.4.3.2: the driver then reads 0 back): no queue thread runs and
    /// device_status reads 0.
    fn check_reset(&self, i: usize) {
        let (placed, active) = {
            let d = self.devs[i].pci.lock().unwrap();
            (d.placed_at().is_some(), d.is_active())
        };
        if !placed || self.devs[i].caps.common != 0 {
            return; // the write went nowhere, or somewhere this run cannot tell
        }
        assert!(!active, "device {i}: queue threads still run after the driver reset it");
        let status = self.status(i);
        assert_eq!(status, 0, "device {i}: device_status reads {status:#x} right after a reset");
    }

    fn status(&self, i: usize) -> u8 {
        self.common_read(i, cc::DEVICE_STATUS, 1) as u8
    }

    fn device_features(&self, i: usize) -> u64 {
        let mut f = 0;
        for sel in 0..2u64 {
            self.common_write(i, cc::DEVICE_FEATURE_SELECT, 4, sel);
            f |= self.common_read(i, cc::DEVICE_FEATURE, 4) << (32 * sel);
        }
        f
    }

    fn write_features(&self, i: usize, f: u64) {
        for sel in 0..2u64 {
            self.common_write(i, cc::DRIVER_FEATURE_SELECT, 4, sel);
            self.common_write(i, cc::DRIVER_FEATURE, 4, (f >> (32 * sel)) & 0xffff_ffff);
        }
    }

    fn write_addr64(&self, i: usize, reg: usize, a: u64) {
        self.common_write(i, reg, 4, a & 0xffff_ffff);
        self.common_write(i, reg + 4, 4, a >> 32);
    }

    fn ring_mut(&mut self, i: usize, q: u16) -> &mut Option<SplitRing> {
        let rings = &mut self.devs[i].rings;
        let q = usize::from(q);
        if rings.len() <= q {
            rings.resize(q + 1, None);
        }
        &mut rings[q]
    }

    /// Linux's bring-up of a modern virtio-pci device, to DRIVER_OK.
    fn start(&mut self, i: usize, accept: u64, size: u16, msix: bool, rings: Rings) {
        let base = match rings {
            Rings::InRam => RINGS,
            Rings::At(a) => resolve(self, a),
        };
        let (slot, caps) = (self.devs[i].slot, self.devs[i].caps);
        self.cfg_write(slot, 0x04, 2, 0x6);
        let ctrl = self.cfg_read(slot, caps.msix_cap + 2, 2);
        let vectors = if msix { (ctrl & 0x7ff) + 1 } else { 0 };
        if msix {
            self.cfg_write(slot, caps.msix_cap + 2, 2, ctrl | 0xc000);
            for v in 0..vectors.min(16) {
                let e = caps.msix_table + 16 * v;
                self.bar_write(i, e, 4, 0xfee0_0000);
                self.bar_write(i, e + 4, 4, 0);
                self.bar_write(i, e + 8, 4, 0x40 + v);
                self.bar_write(i, e + 12, 4, 0);
            }
            self.cfg_write(slot, caps.msix_cap + 2, 2, (ctrl | 0x8000) & !0x4000);
        }
        self.set_status(i, 0);
        self.set_status(i, 1);
        self.set_status(i, 1 | 2);
        let features = self.device_features(i) & (accept | VERSION_1);
        self.write_features(i, features);
        self.set_status(i, 1 | 2 | 8);
        if self.status(i) & 8 == 0 {
            return;
        }
        let nq = (self.common_read(i, cc::NUM_QUEUES, 2) as u16).min(MAX_QUEUES);
        for q in 0..nq {
            self.common_write(i, cc::QUEUE_SELECT, 2, q.into());
            let max = self.common_read(i, cc::QUEUE_SIZE, 2) as u16;
            if max == 0 {
                continue;
            }
            let want = if size == 0 { max } else { size };
            let qsize = want.min(max).min(256).checked_next_power_of_two().unwrap_or(1).min(max);
            self.common_write(i, cc::QUEUE_SIZE, 2, qsize.into());
            let ring = SplitRing::canonical(base, q, qsize);
            self.write_addr64(i, cc::QUEUE_DESC, ring.desc);
            self.write_addr64(i, cc::QUEUE_DRIVER, ring.avail);
            self.write_addr64(i, cc::QUEUE_DEVICE, ring.used);
            let vector = if msix { u64::from(q) + 1 } else { 0xffff };
            self.common_write(i, cc::QUEUE_MSIX_VECTOR, 2, vector);
            self.common_write(i, cc::QUEUE_ENABLE, 2, 1);
            // Fresh rings: avail and used start at index 0.
            guest::write_bytes(&self.mem, ring.avail, &[0; 4]);
            guest::write_bytes(&self.mem, ring.used, &[0; 4]);
            *self.ring_mut(i, q) = Some(ring);
        }
        self.common_write(i, cc::MSIX_CONFIG, 2, if msix { 0 } else { 0xffff });
        self.set_status(i, 1 | 2 | 8 | 4);
        if rings == Rings::InRam {
            self.check_live(i);
        }
    }

    /// After a by-the-book bring-up with rings in RAM: the device is live.
    /// Whatever came before (resets, failed starts, garbage), a device must
    /// survive any number of reset / re-activate cycles (issue 8, class 3).
    fn check_live(&self, i: usize) {
        let (placed, active) = {
            let d = self.devs[i].pci.lock().unwrap();
            (d.placed_at(), d.is_active())
        };
        // Only where the driver's writes reached this device's registers
        // and no KVM call was made to fail.
        if self.faults.0 != 0 || placed != Some(self.bar(i)) || self.devs[i].caps.common != 0 {
            return;
        }
        let status = self.status(i);
        assert!(
            active && status & 0x4f == 0x0f,
            "device {i} is not live after a by-the-book start (status {status:#x}, threads running: {active})"
        );
    }

    fn leaf_desc(&self, l: &Leaf) -> Desc {
        let addr = resolve(self, l.addr);
        guest::write_bytes(&self.mem, addr, &l.data.0);
        Desc { addr, len: l.len.get(), flags: l.flags, next: 0 }
    }

    /// Applies `next` to `d`, the `k`th of `n` entries starting at table index `base`.
    fn chain_next(d: &mut Desc, next: Next, base: u16, k: usize, n: usize) {
        match next {
            Next::Auto => {
                d.flags &= !guest::VIRTQ_DESC_F_NEXT;
                if k + 1 < n {
                    d.flags |= guest::VIRTQ_DESC_F_NEXT;
                    d.next = base.wrapping_add(k as u16 + 1);
                }
            }
            Next::Raw(v) => d.next = v,
        }
    }

    fn offer(&mut self, i: usize, q: u16, head: u16, descs: &[DescOp]) {
        let mut ring = self.ring_mut(i, q).unwrap_or_else(|| SplitRing::canonical(RINGS, q, 256));
        let n = descs.len();
        for (k, op) in descs.iter().enumerate() {
            let mut d = match op {
                DescOp::Leaf(l) => {
                    let mut d = self.leaf_desc(l);
                    Self::chain_next(&mut d, l.next, head % ring.size.max(1), k, n);
                    d
                }
                DescOp::Indirect { entries, flags, next, len_delta } => {
                    let table = INDIRECT_TABLES + (self.indirect_next % 16) * 0x1000;
                    self.indirect_next += 1;
                    for (j, l) in entries.iter().enumerate().take(256) {
                        let mut e = self.leaf_desc(l);
                        Self::chain_next(&mut e, l.next, 0, j, entries.len());
                        guest::write_desc_at(&self.mem, table + 16 * j as u64, &e);
                    }
                    let len = (16 * entries.len().min(256) as u32).wrapping_add_signed((*len_delta).into());
                    let mut d = Desc { addr: table, len, flags: *flags | guest::VIRTQ_DESC_F_INDIRECT, next: 0 };
                    Self::chain_next(&mut d, *next, head % ring.size.max(1), k, n);
                    d
                }
            };
            if let Next::Auto = match op {
                DescOp::Leaf(l) => l.next,
                DescOp::Indirect { next, .. } => *next,
            } {
                d.next %= ring.size.max(1);
            }
            ring.write_desc(&self.mem, head.wrapping_add(k as u16), &d);
        }
        ring.push_avail(&self.mem, head % ring.size.max(1));
        *self.ring_mut(i, q) = Some(ring);
    }

    /// After a kick: gives the queue thread up to 2 ms to return what the
    /// driver made available, so that what the device does with an input
    /// happens before the run ends (and coverage does not depend on luck).
    fn wait_used(&self, i: usize, q: u16) {
        let Some(Some(ring)) = self.devs[i].rings.get(usize::from(q)) else { return };
        let deadline = std::time::Instant::now() + Duration::from_millis(2);
        while ring.used_idx(&self.mem).is_some_and(|u| u != ring.avail_idx) && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
    }

    /// Runs one op; false when the run's budget is spent.
    fn op(&mut self, op: &Op) -> bool {
        let cost = match op {
            Op::Start { .. } => 100,
            Op::Negotiate { .. } | Op::Status { .. } => 40,
            Op::Settle { micros } => 10 + u32::from(*micros),
            Op::Offer { descs, .. } => 4 + descs.len() as u32,
            Op::Kick { .. } => 20,
            Op::Repeat { .. } => 1,
            _ => 2,
        };
        if !self.charge(cost) {
            return false;
        }
        match op {
            Op::PioWrite { port, width, value } => {
                self.pio.write(0xcf4 + u64::from(port % 16), &value.to_le_bytes()[..width.len()]);
            }
            Op::PioRead { port, width } => {
                let mut b = [0u8; 8];
                self.pio.read(0xcf4 + u64::from(port % 16), &mut b[..width.len()]);
            }
            Op::CfgSelect { enable, bus, slot, func, reg } => {
                let v = (u32::from(*enable) << 31)
                    | (u32::from(*bus) << 16)
                    | (u32::from(slot % 5) << 11)
                    | (u32::from(func % 8) << 8)
                    | u32::from(*reg);
                self.pio.write(0xcf8, &v.to_le_bytes());
            }
            Op::Ecam { write, bus, slot, func, reg, width, value } => {
                self.mmio_rw(*write, Self::ecam_addr(*bus, *slot, *func, *reg), width.len(), *value);
            }
            Op::Mmio { write, addr, width, value } => {
                let a = resolve(self, *addr);
                self.mmio_rw(*write, a, width.len(), *value);
            }
            Op::Cfg { dev, write, via_ecam, reg, width, value } => {
                let Some(i) = self.dev(*dev) else { return true };
                let slot = self.devs[i].slot;
                let len = width.len();
                if *via_ecam {
                    self.mmio_rw(*write, Self::ecam_addr(0, slot, 0, *reg), len, (*value).into());
                } else {
                    let sel = 0x8000_0000u32 | (u32::from(slot) << 11) | (u32::from(*reg) & 0xfc);
                    self.pio.write(0xcf8, &sel.to_le_bytes());
                    let port = 0xcfc + u64::from(reg & 3);
                    let mut b = [0u8; 8];
                    b[..4].copy_from_slice(&value.to_le_bytes());
                    if *write {
                        self.pio.write(port, &b[..len]);
                    } else {
                        self.pio.read(port, &mut b[..len]);
                    }
                }
            }
            Op::Bar { dev, write, offset, width, value } => {
                let Some(i) = self.dev(*dev) else { return true };
                let off = u64::from(*offset) % (kickvm::pci::virtio_pci::BAR_SIZE + 16);
                self.mmio_rw(*write, self.bar(i).wrapping_add(off), width.len(), *value);
            }
            Op::Common { dev, write, reg, value } => {
                let Some(i) = self.dev(*dev) else { return true };
                const REGS: [(usize, usize); 20] = [
                    (cc::DEVICE_FEATURE_SELECT, 4),
                    (cc::DEVICE_FEATURE, 4),
                    (cc::DRIVER_FEATURE_SELECT, 4),
                    (cc::DRIVER_FEATURE, 4),
                    (cc::MSIX_CONFIG, 2),
                    (cc::NUM_QUEUES, 2),
                    (cc::DEVICE_STATUS, 1),
                    (cc::CONFIG_GENERATION, 1),
                    (cc::QUEUE_SELECT, 2),
                    (cc::QUEUE_SIZE, 2),
                    (cc::QUEUE_MSIX_VECTOR, 2),
                    (cc::QUEUE_ENABLE, 2),
                    (cc::QUEUE_NOTIFY_OFF, 2),
                    (cc::QUEUE_DESC, 4),
                    (cc::QUEUE_DESC + 4, 4),
                    (cc::QUEUE_DRIVER, 4),
                    (cc::QUEUE_DRIVER + 4, 4),
                    (cc::QUEUE_DEVICE, 4),
                    (cc::QUEUE_DEVICE + 4, 4),
                    (cc::LEN, 4),
                ];
                let (r, len) = REGS[usize::from(*reg) % REGS.len()];
                if *write {
                    self.common_write(i, r, len, (*value).into());
                } else {
                    self.common_read(i, r, len);
                }
            }
            Op::Command { dev, value } => {
                let Some(i) = self.dev(*dev) else { return true };
                self.cfg_write(self.devs[i].slot, 0x04, 2, (*value).into());
            }
            Op::MoveBar { dev, to, decode_off } => {
                let Some(i) = self.dev(*dev) else { return true };
                let (slot, a) = (self.devs[i].slot, resolve(self, *to));
                let cmd = self.cfg_read(slot, 0x04, 2);
                if *decode_off {
                    self.cfg_write(slot, 0x04, 2, cmd & !0x2);
                }
                self.cfg_write(slot, 0x10, 4, a & 0xffff_ffff);
                self.cfg_write(slot, 0x14, 4, a >> 32);
                if *decode_off {
                    self.cfg_write(slot, 0x04, 2, cmd);
                }
            }
            Op::MsixControl { dev, value } => {
                let Some(i) = self.dev(*dev) else { return true };
                let (slot, cap) = (self.devs[i].slot, self.devs[i].caps.msix_cap);
                self.cfg_write(slot, cap + 2, 2, (*value).into());
            }
            Op::MsixEntry { dev, vector, addr, data, ctrl } => {
                let Some(i) = self.dev(*dev) else { return true };
                let e = self.devs[i].caps.msix_table + 16 * u64::from(*vector % 520);
                self.bar_write(i, e, 8, *addr);
                self.bar_write(i, e + 8, 4, (*data).into());
                self.bar_write(i, e + 12, 4, (*ctrl).into());
            }
            Op::PciCfg { dev, write, bar, offset, len, value, width, at } => {
                let Some(i) = self.dev(*dev) else { return true };
                let (slot, cap) = (self.devs[i].slot, self.devs[i].caps.pci_cfg_cap);
                self.cfg_write(slot, cap + 4, 1, (*bar).into());
                self.cfg_write(slot, cap + 8, 4, (*offset).into());
                self.cfg_write(slot, cap + 12, 4, (*len).into());
                let reg = cap + 16 + u16::from(at % 4);
                let mut b = [0u8; 8];
                b[..4].copy_from_slice(&value.to_le_bytes());
                let n = width.len();
                if *write {
                    self.mmio.write(Self::ecam_addr(0, slot, 0, reg), &b[..n]);
                } else {
                    self.mmio.read(Self::ecam_addr(0, slot, 0, reg), &mut b[..n]);
                }
            }
            Op::Negotiate { dev, accept, extra, status } => {
                let Some(i) = self.dev(*dev) else { return true };
                self.set_status(i, 1);
                self.set_status(i, 1 | 2);
                let f = (self.device_features(i) & accept) | extra;
                self.write_features(i, f);
                self.set_status(i, *status);
            }
            Op::Status { dev, value } => {
                let Some(i) = self.dev(*dev) else { return true };
                self.set_status(i, *value);
            }
            Op::SetupQueue { dev, queue, size, desc, driver, device, vector, enable } => {
                let Some(i) = self.dev(*dev) else { return true };
                let (d, a, u) = (resolve(self, *desc), resolve(self, *driver), resolve(self, *device));
                self.common_write(i, cc::QUEUE_SELECT, 2, (*queue).into());
                self.common_write(i, cc::QUEUE_SIZE, 2, (*size).into());
                self.write_addr64(i, cc::QUEUE_DESC, d);
                self.write_addr64(i, cc::QUEUE_DRIVER, a);
                self.write_addr64(i, cc::QUEUE_DEVICE, u);
                self.common_write(i, cc::QUEUE_MSIX_VECTOR, 2, (*vector).into());
                if *enable {
                    self.common_write(i, cc::QUEUE_ENABLE, 2, 1);
                }
                let size = self.common_read(i, cc::QUEUE_SIZE, 2) as u16;
                *self.ring_mut(i, *queue) =
                    Some(SplitRing { size, desc: d, avail: a, used: u, avail_idx: 0 });
            }
            Op::Start { dev, accept, size, msix, rings } => {
                let Some(i) = self.dev(*dev) else { return true };
                self.start(i, *accept, *size, *msix, *rings);
            }
            Op::GuestWrite { addr, data } => {
                let a = resolve(self, *addr);
                guest::write_bytes(&self.mem, a, &data.0);
            }
            Op::Offer { dev, queue, head, descs } => {
                let Some(i) = self.dev(*dev) else { return true };
                self.offer(i, *queue % MAX_QUEUES, *head, descs);
            }
            Op::Kick { dev, queue, width } => {
                let Some(i) = self.dev(*dev) else { return true };
                let caps = self.devs[i].caps;
                let off = caps.notify.wrapping_add(caps.notify_mult.wrapping_mul(u64::from(*queue)));
                self.bar_write(i, off, width.len(), (*queue).into());
                self.wait_used(i, *queue);
            }
            Op::Settle { micros } => std::thread::sleep(Duration::from_micros(4 * u64::from(*micros))),
            Op::Repeat { times, ops } => {
                for _ in 0..*times {
                    for op in ops {
                        if !self.op(op) {
                            return false;
                        }
                    }
                }
            }
        }
        true
    }
}
