//! The seed corpus, as structures: `fuzz/seeds/<target>/<name>` is each
//! one encoded (see `lib.rs`'s `write_seeds`). Every seed runs clean.

use crate::bz::{BzInput, Code32, Header, Magic, Patch, Payload, Pref, Size, Syssize};
use crate::cli::{Arg, CliInput, ConsoleV, Direct, Flag, Key, Kv, KvVal, MacV, PathV, SizeV, Sub, Unit, Value};
use crate::enc::{text, Bytes};
use crate::guest::MemLayout;
use crate::vpci::{Addr, BlkOpts, DescOp, DeviceSet, Leaf, Len, Mode, Next, Op, PciInput, Width};

// ---- bzimage ---------------------------------------------------------

/// A header like a Debian 6.1 x86_64 kernel's.
fn debian_header() -> Header {
    Header {
        setup_sects: 27,
        syssize: Syssize::Auto,
        magic: Magic::HdrS,
        version: 0x020f,
        loadflags: 0x01,
        code32_start: Code32::Default,
        initrd_addr_max: 0x7fff_ffff,
        kernel_alignment: 0x20_0000,
        relocatable: 1,
        xloadflags: 0x7f,
        cmdline_size: 2047,
        pref_address: Pref::Default,
        init_size: 0x80_0000,
        boot_flag: true,
    }
}

fn bz(mem_mib: u8, header: Header, payload: Payload, initrd: Option<Size>, cmdline: &str) -> BzInput {
    BzInput {
        mem_mib,
        header,
        patches: Vec::new(),
        payload,
        initrd,
        probes: vec![Size::Pages { pages: 1, extra: 0 }, Size::Raw(u64::MAX)],
        lens: vec![Size::Pages { pages: 0, extra: 0x1f0 }],
        cmdline: text(cmdline),
    }
}

pub fn bzimage() -> Vec<(&'static str, BzInput)> {
    let cmdline = "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.dumbkbd rdinit=/bin/sh";
    let mib = |n: u16| Size::Pages { pages: n * 256, extra: 0 };
    let mut patched = bz(28, debian_header(), Payload::Len(1 << 20), None, "quiet");
    patched.patches = vec![Patch { offset: 0x1f1, data: Bytes::new([0u8]) }, Patch { offset: 0x210, data: Bytes::new([0xff, 0x81]) }];
    vec![
        ("debian-like", bz(28, debian_header(), Payload::Len(5 << 20), Some(mib(2)), cmdline)),
        ("no-initrd-small-guest", bz(8, Header { init_size: 0x10_0000, pref_address: Pref::Low(0x20_0000), ..debian_header() }, Payload::Len(1 << 20), None, "")),
        ("protocol-2.06-no-64bit", bz(28, Header { version: 0x0206, xloadflags: 0, ..debian_header() }, Payload::Len(1 << 20), None, cmdline)),
        ("not-hdrs", bz(28, Header { magic: Magic::Raw(0x1234_5678), ..debian_header() }, Payload::Len(1 << 20), None, cmdline)),
        ("kernel-too-large", bz(0, debian_header(), Payload::Len(6 << 20), None, cmdline)),
        ("initrd-too-large", bz(28, debian_header(), Payload::Len(1 << 20), Some(mib(30)), cmdline)),
        ("initrd-odd-size", bz(28, debian_header(), Payload::Len(1 << 20), Some(Size::Pages { pages: 3, extra: 77 }), cmdline)),
        ("cmdline-too-long", bz(28, Header { cmdline_size: 255, ..debian_header() }, Payload::Len(1 << 20), None, &"x".repeat(300))),
        ("truncated", bz(28, debian_header(), Payload::Truncated(600), None, cmdline)),
        ("setup-sects-zero", bz(28, Header { setup_sects: 0, ..debian_header() }, Payload::Len(1 << 20), None, cmdline)),
        ("code32-below-1m", bz(28, Header { code32_start: Code32::Raw(0x9000), ..debian_header() }, Payload::Len(1 << 20), None, cmdline)),
        ("patched-header", patched),
        ("syssize-too-large", bz(28, Header { syssize: Syssize::Raw(0x10_0000), ..debian_header() }, Payload::Len(1 << 20), None, cmdline)),
        ("not-relocatable-pref-8m", bz(28, Header { relocatable: 0, pref_address: Pref::Low(0x80_0000), ..debian_header() }, Payload::Len(1 << 20), Some(Size::Pages { pages: 16, extra: 0 }), cmdline)),
        ("pref-near-top", bz(28, Header { pref_address: Pref::NearTop(0x1000), ..debian_header() }, Payload::Len(1 << 20), None, cmdline)),
    ]
}

// ---- cli -------------------------------------------------------------

fn fv(f: Flag, v: Value) -> Arg {
    Arg::FlagValue(f, v)
}
fn size(n: u64, unit: Unit) -> Value {
    Value::Size(SizeV { n, small: false, unit, pad: 0 })
}
fn kv(key: Key, value: KvVal) -> Kv {
    Kv { key, value: Some(value) }
}
fn run(args: Vec<Arg>) -> CliInput {
    CliInput { image_ok: true, sub: Sub::Run, args, direct: Vec::new() }
}

pub fn cli() -> Vec<(&'static str, CliInput)> {
    let kernel = fv(Flag::Kernel, Value::Path(PathV::Kernel));
    let mac = MacV { bytes: [0x52, 0x54, 0, 0x12, 0x34, 0x56], style: 0 };
    let direct = vec![
        Direct::Size(text("512M")),
        Direct::Size(text("1536MiB")),
        Direct::Size(text("99999999999T")),
        Direct::Mac(text("52:54:00:12:34:56")),
        Direct::Mac(text("01:00:5e:00:00:01")),
        Direct::Net(text("tap=tap0,mac=52:54:00:12:34:56,queues=2")),
        Direct::Disk(text("path=/tmp/d.img,readonly=on,serial=abc,queues=4")),
        Direct::Console(text("socket=/tmp/console.sock")),
        Direct::Cmdline(Some(text("rdinit=/bin/sh quiet"))),
        Direct::Cpus(text("2")),
        Direct::Cpus(text("255")),
    ];
    vec![
        ("kernel-initrd-cpus-memory", run(vec![
            kernel.clone(),
            fv(Flag::Initrd, Value::Path(PathV::Initrd)),
            fv(Flag::Cpus, Value::Num(2)),
            fv(Flag::Memory, size(1, Unit::G)),
            fv(Flag::Cmdline, Value::Text(text("rdinit=/bin/sh quiet"))),
        ])),
        ("disks-net-rng", run(vec![
            kernel.clone(),
            fv(Flag::Disk, Value::Kvs(vec![kv(Key::Path, KvVal::Path(PathV::Disk)), kv(Key::Serial, KvVal::Name(text("root")))])),
            fv(Flag::Disk, Value::Kvs(vec![kv(Key::Path, KvVal::Path(PathV::Disk)), kv(Key::Readonly, KvVal::Bool(0))])),
            fv(Flag::Net, Value::Kvs(vec![kv(Key::Tap, KvVal::Name(text("tap0"))), kv(Key::Mac, KvVal::Mac(mac)), kv(Key::Queues, KvVal::Num(2))])),
            Arg::Flag(Flag::Rng),
        ])),
        ("console-stdio-threads", run(vec![
            kernel.clone(),
            fv(Flag::Console, Value::Console(ConsoleV::Stdio)),
            Arg::FlagEq(Flag::Cmdline, Value::Text(text("console=hvc0"))),
            fv(Flag::Threads, Value::Threads(2)),
            Arg::Flag(Flag::NoReboot),
            Arg::Flag(Flag::Hugepages),
        ])),
        ("default-image", run(vec![fv(Flag::Memory, size(4096, Unit::K))])),
        ("help", run(vec![Arg::Flag(Flag::Help)])),
        ("bad-values", run(vec![
            kernel.clone(),
            fv(Flag::Memory, Value::Text(text("lots"))),
            fv(Flag::Console, Value::Console(ConsoleV::Raw(text("tty")))),
        ])),
        ("disk-without-path", run(vec![kernel.clone(), fv(Flag::Disk, Value::Kvs(vec![kv(Key::Readonly, KvVal::Bool(0))]))])),
        ("cpus-zero-no-image", CliInput { image_ok: false, sub: Sub::Run, args: vec![fv(Flag::Cpus, Value::Num(0))], direct: Vec::new() }),
        ("cmdline-dashes", run(vec![kernel, Arg::FlagEq(Flag::Cmdline, Value::Text(text("-- quiet"))), fv(Flag::Console, Value::Console(ConsoleV::File(PathV::Missing)))])),
        ("direct-parsers", CliInput { image_ok: true, sub: Sub::None, args: Vec::new(), direct }),
        ("kernel-is-a-fifo-or-dir", run(vec![
            fv(Flag::Kernel, Value::Path(PathV::Fifo)),
            fv(Flag::Disk, Value::Kvs(vec![kv(Key::Path, KvVal::Path(PathV::Dir))])),
        ])),
        ("console-socket-file-exists", run(vec![
            fv(Flag::Console, Value::Console(ConsoleV::Socket(PathV::Disk))),
            fv(Flag::Memory, size(4097, Unit::K)),
        ])),
    ]
}

// ---- virtio_pci ------------------------------------------------------

const ALL: u64 = u64::MAX;
const BLK_IN: u32 = 0;
const BLK_OUT: u32 = 1;
const BLK_FLUSH: u32 = 4;
const BLK_GET_ID: u32 = 8;

fn leaf(addr: u32, len: u16, flags: u16, data: &[u8]) -> DescOp {
    DescOp::Leaf(Leaf { addr: Addr::Ram(addr), len: Len::Small(len), flags, next: Next::Auto, data: Bytes::new(data) })
}

fn blk_header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

/// A virtio-blk request: header, data (writable for reads), status.
fn blk_request(dev: u8, head: u16, kind: u32, sector: u64, data_len: u16, base: u32) -> Op {
    let data_flags = if kind == BLK_OUT { 0 } else { 2 };
    let mut descs = vec![leaf(base, 16, 0, &blk_header(kind, sector))];
    if data_len > 0 {
        descs.push(leaf(base + 0x100, data_len, data_flags, &[0xa5; 16]));
    }
    descs.push(leaf(base + 0x80, 1, 2, &[0xff]));
    Op::Offer { dev, queue: 0, head, descs }
}

fn start(dev: u8, size: u16) -> Op {
    Op::Start { dev, accept: ALL, size, msix: true }
}

fn kick(dev: u8, queue: u16) -> Op {
    Op::Kick { dev, queue, width: Width::B2 }
}

fn settle() -> Op {
    Op::Settle { micros: 250 }
}

fn devices(blk: bool, console: bool, rng: bool) -> DeviceSet {
    DeviceSet { blk: blk.then_some(BlkOpts { readonly: false, queues: 0, sectors: 16 }), console, rng }
}

fn pci(mode: Mode, devices: DeviceSet, ops: Vec<Op>) -> PciInput {
    PciInput { mode, layout: MemLayout::Flat1M, devices, faults: 0, ops }
}

pub fn virtio_pci() -> Vec<(&'static str, PciInput)> {
    let rng_read = Op::Offer { dev: 0, queue: 0, head: 0, descs: vec![leaf(0x1_0000, 64, 2, &[])] };
    vec![
        ("rng-start-read-reset", pci(Mode::PerQueue, devices(false, false, true), vec![
            start(0, 8), rng_read.clone(), kick(0, 0), settle(), Op::Status { dev: 0, value: 0 },
        ])),
        ("blk-read-write-flush-id", pci(Mode::PerQueue, devices(true, false, false), vec![
            start(0, 16),
            blk_request(0, 0, BLK_OUT, 1, 512, 0x1_0000),
            blk_request(0, 3, BLK_IN, 1, 512, 0x1_1000),
            blk_request(0, 6, BLK_FLUSH, 0, 0, 0x1_2000),
            blk_request(0, 8, BLK_GET_ID, 0, 20, 0x1_3000),
            kick(0, 0), settle(),
        ])),
        ("blk-indirect", pci(Mode::PerDevice, devices(true, false, false), vec![
            start(0, 8),
            Op::Offer { dev: 0, queue: 0, head: 0, descs: vec![DescOp::Indirect {
                entries: vec![
                    Leaf { addr: Addr::Ram(0x1_0000), len: Len::Small(16), flags: 0, next: Next::Auto, data: Bytes::new(blk_header(BLK_IN, 0)) },
                    Leaf { addr: Addr::Ram(0x1_0100), len: Len::Small(512), flags: 2, next: Next::Auto, data: Bytes::default() },
                    Leaf { addr: Addr::Ram(0x1_0080), len: Len::Small(1), flags: 2, next: Next::Auto, data: Bytes::default() },
                ],
                flags: 0, next: Next::Auto, len_delta: 0,
            }] },
            kick(0, 0), settle(),
        ])),
        ("console-tx-rx", pci(Mode::PerQueue, devices(false, true, false), vec![
            start(0, 8),
            Op::Offer { dev: 0, queue: 1, head: 0, descs: vec![leaf(0x2_0000, 6, 0, b"hello\n")] },
            Op::Offer { dev: 0, queue: 0, head: 0, descs: vec![leaf(0x2_1000, 64, 2, &[])] },
            kick(0, 1), kick(0, 0), settle(),
        ])),
        ("all-devices-reset-cycles", pci(Mode::PerDevice, devices(true, true, true), vec![
            start(0, 8), start(1, 8), start(2, 8),
            Op::Status { dev: 1, value: 0 }, start(1, 4),
            Op::Repeat { times: 3, op: Box::new(start(2, 8)) },
            Op::Status { dev: 0, value: 0 },
        ])),
        ("single-thread-mode", pci(Mode::Single, devices(true, true, true), vec![
            start(0, 8), start(1, 8), start(2, 8),
            blk_request(0, 0, BLK_IN, 0, 512, 0x1_0000), kick(0, 0),
            Op::Offer { dev: 2, queue: 0, head: 0, descs: vec![leaf(0x3_0000, 32, 2, &[])] }, kick(2, 0),
            settle(), Op::Status { dev: 1, value: 0 },
        ])),
        ("enumerate-size-move-bar", pci(Mode::PerQueue, devices(true, false, true), vec![
            Op::CfgSelect { enable: true, bus: 0, slot: 1, func: 0, reg: 0 },
            Op::PioRead { port: 8, width: Width::B4 },
            Op::PioRead { port: 10, width: Width::B2 },
            Op::Cfg { dev: 0, write: false, via_ecam: false, reg: 0x34, width: Width::B1, value: 0 },
            Op::Cfg { dev: 0, write: true, via_ecam: true, reg: 0x10, width: Width::B4, value: 0xffff_ffff },
            Op::Cfg { dev: 0, write: true, via_ecam: true, reg: 0x14, width: Width::B4, value: 0xffff_ffff },
            Op::Cfg { dev: 0, write: false, via_ecam: true, reg: 0x10, width: Width::B4, value: 0 },
            Op::MoveBar { dev: 0, to: Addr::Mmio(0x10_0000), decode_off: true },
            Op::Command { dev: 0, value: 0x6 },
            Op::MoveBar { dev: 1, to: Addr::Near4G(0x1000), decode_off: false },
            Op::Command { dev: 1, value: 0x6 },
            Op::MoveBar { dev: 1, to: Addr::Bar(0, 0x4000), decode_off: true },
            Op::Bar { dev: 0, write: false, offset: 0x12, width: Width::B2, value: 0 },
            start(0, 8),
        ])),
        ("msix-mask-pba", pci(Mode::PerQueue, devices(false, false, true), vec![
            start(0, 8),
            Op::MsixEntry { dev: 0, vector: 1, addr: 0xfee0_0000, data: 0x41, ctrl: 1 },
            rng_read, kick(0, 0), settle(),
            Op::Bar { dev: 0, write: false, offset: 0x6000, width: Width::B8, value: 0 },
            Op::MsixControl { dev: 0, value: 0xc000 },
            Op::MsixEntry { dev: 0, vector: 1, addr: 0xfee0_0000, data: 0x41, ctrl: 0 },
            Op::MsixControl { dev: 0, value: 0 },
        ])),
        ("pci-cfg-window", pci(Mode::PerQueue, devices(false, false, true), vec![
            Op::PciCfg { dev: 0, write: false, bar: 0, offset: 0x12, len: 2, value: 0, width: Width::B2, at: 0 },
            Op::PciCfg { dev: 0, write: true, bar: 0, offset: 0x14, len: 1, value: 1, width: Width::B1, at: 0 },
            Op::PciCfg { dev: 0, write: false, bar: 0, offset: 0x1, len: 4, value: 0, width: Width::B4, at: 0 },
        ])),
        ("bad-rings-then-reset", pci(Mode::PerQueue, devices(false, false, true), vec![
            Op::Command { dev: 0, value: 0x6 },
            Op::Negotiate { dev: 0, accept: ALL, extra: 1 << 32, status: 1 | 2 | 8 },
            Op::SetupQueue { dev: 0, queue: 0, size: 8, desc: Addr::Raw(0x7fff_0000), driver: Addr::RamEnd(-2), device: Addr::Top(0), vector: 1, enable: true },
            Op::Status { dev: 0, value: 1 | 2 | 8 | 4 },
            Op::Bar { dev: 0, write: false, offset: 0x1000, width: Width::B1, value: 0 },
            Op::Status { dev: 0, value: 0 },
        ])),
        ("notify-odd-widths", pci(Mode::PerQueue, devices(true, false, false), vec![
            start(0, 8),
            blk_request(0, 0, BLK_IN, 0, 512, 0x1_0000),
            Op::Kick { dev: 0, queue: 0, width: Width(2) },
            Op::Kick { dev: 0, queue: 0, width: Width::B8 },
            Op::Common { dev: 0, write: true, reg: 8, value: 0 },
            Op::Common { dev: 0, write: false, reg: 13, value: 0 },
            settle(),
        ])),
    ]
}
