//! The seed corpus, as structures: `fuzz/seeds/<target>/<name>` is each
//! one encoded (see `lib.rs`'s `write_seeds`). Every seed runs clean.

use crate::bz::{BzInput, Code32, Header, Magic, Patch, Payload, Pref, Size, Syssize};
use crate::cli::{Arg, CliInput, ConsoleV, Direct, Flag, Key, Kv, KvVal, MacV, PathV, SizeV, Sub, Unit, Value};
use crate::enc::{text, Bytes};
use crate::guest::MemLayout;
use crate::vpci::{Addr, BlkOpts, ConsoleKind, DescOp, DeviceSet, Leaf, Len, Mode, NetOpts, Next, Op, PciInput, Rings, Width};

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
    Op::Start { dev, accept: ALL, size, msix: true, rings: Rings::InRam }
}

fn kick(dev: u8, queue: u16) -> Op {
    Op::Kick { dev, queue, width: Width::B2 }
}

fn settle() -> Op {
    Op::Settle { micros: 250 }
}

fn devices(blk: bool, console: bool, rng: bool) -> DeviceSet {
    DeviceSet {
        blk: blk.then_some(BlkOpts { readonly: false, queues: 0, sectors: 16 }),
        net: None,
        console: console.then_some(ConsoleKind::Null),
        rng,
    }
}

fn net_devices(pairs: u8) -> DeviceSet {
    DeviceSet { blk: None, net: Some(NetOpts { pairs: pairs - 1, mtu: None }), console: None, rng: false }
}

const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
const VIRTIO_NET_F_MQ: u64 = 1 << 22;

/// A virtio-net tx chain: the 12-byte header, then a frame.
fn net_tx(head: u16, base: u32) -> Op {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x88, 0xb5]);
    frame.extend_from_slice(b"kickvm-fuzz");
    Op::Offer { dev: 0, queue: 1, head, descs: vec![leaf(base, 12, 0, &[0; 12]), leaf(base + 0x100, frame.len() as u16, 0, &frame)] }
}

/// VIRTIO_NET_CTRL_MQ / VQ_PAIRS_SET `pairs` on the control queue `ctrl`.
fn net_ctrl_pairs(ctrl: u16, pairs: u16, base: u32) -> Op {
    Op::Offer {
        dev: 0,
        queue: ctrl,
        head: 0,
        descs: vec![leaf(base, 2, 0, &[4, 0]), leaf(base + 0x10, 2, 0, &pairs.to_le_bytes()), leaf(base + 0x20, 1, 2, &[0xff])],
    }
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
            Op::Repeat { times: 3, ops: vec![start(2, 8)] },
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
        ("net-mq-tx-ctrl-reset-cycles", pci(Mode::PerQueue, net_devices(4), vec![
            Op::Start { dev: 0, accept: VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_MQ, size: 16, msix: true, rings: Rings::InRam },
            net_ctrl_pairs(8, 4, 0x4_0000), kick(0, 8),
            net_tx(0, 0x1_0000), kick(0, 1),
            Op::Offer { dev: 0, queue: 0, head: 0, descs: vec![leaf(0x2_0000, 1526, 2, &[])] }, kick(0, 0),
            Op::Repeat { times: 3, ops: vec![
                Op::Status { dev: 0, value: 0 },
                Op::Start { dev: 0, accept: VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_MQ, size: 16, msix: true, rings: Rings::InRam },
                net_ctrl_pairs(8, 2, 0x4_0000), kick(0, 8),
            ] },
        ])),
        ("net-single-pair-per-device", pci(Mode::PerDevice, net_devices(1), vec![
            start(0, 8), net_tx(0, 0x1_0000), kick(0, 1), Op::Status { dev: 0, value: 0 }, start(0, 8),
        ])),
        ("console-socket-no-client", pci(Mode::PerQueue, DeviceSet { blk: None, net: None, console: Some(ConsoleKind::Socket), rng: true }, vec![
            start(0, 8),
            Op::Offer { dev: 0, queue: 0, head: 0, descs: vec![leaf(0x2_1000, 64, 2, &[])] }, kick(0, 0),
            Op::Offer { dev: 0, queue: 1, head: 0, descs: vec![leaf(0x2_0000, 6, 0, b"hello\n")] }, kick(0, 1),
            Op::Status { dev: 0, value: 0 }, start(0, 8), start(1, 8),
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

// ---- chain -----------------------------------------------------------

mod chain_seeds {
    use crate::chain::{Body, CDesc, ChainInput, DLen, Head, ITable, Link, MaxD, Place, Poke, Probe};
    use crate::enc::Bytes;
    use crate::guest::MemLayout;

    const NEXT: u8 = 1;
    const WRITE: u8 = 2;
    const INDIRECT: u8 = 4;

    fn d(addr: Place, len: u16, flags: u8) -> CDesc {
        CDesc { addr, len: DLen::Small(len), flags, next: Link::Follow }
    }

    /// Header, data, status: what a block request looks like.
    fn request(writable_data: bool) -> Vec<CDesc> {
        let data = if writable_data { WRITE } else { 0 };
        vec![
            d(Place::Ram(0x2000), 16, NEXT),
            d(Place::Ram(0x3000), 512, NEXT | data),
            d(Place::Ram(0x4000), 1, WRITE),
        ]
    }

    fn probes() -> Vec<Probe> {
        vec![
            Probe::Read { writable: false, offset: 0, len: 16 },
            Probe::Read { writable: true, offset: 500, len: 64 },
            Probe::Write { writable: true, offset: 510, data: Bytes::new([1u8, 2, 3, 4]) },
            Probe::LastByte { writable: true },
            Probe::Skip { writable: true, at: 512 },
            Probe::Read { writable: true, offset: 0, len: 4 },
            Probe::Truncate { writable: false, len: 8 },
            Probe::Write { writable: false, offset: 4, data: Bytes::new([9u8; 8]) },
            Probe::LastByte { writable: false },
        ]
    }

    fn input(layout: MemLayout, size_log2: u8, max: MaxD, indirect: bool, table: Place, descs: Vec<CDesc>) -> ChainInput {
        ChainInput {
            layout,
            size_log2,
            max,
            indirect,
            table,
            head: Head::In(0),
            descs,
            tables: Vec::new(),
            pokes: Vec::new(),
            probes: probes(),
        }
    }

    /// One indirect descriptor to table 0 (placed at `at`, holding `body`).
    fn indirect(layout: MemLayout, max: MaxD, negotiated: bool, table: Place, at: Place, body: Body) -> ChainInput {
        let mut i = input(layout, 0, max, negotiated, table, vec![CDesc {
            addr: Place::Table(0, 0),
            len: DLen::Table(0, 0),
            flags: INDIRECT,
            next: Link::Follow,
        }]);
        i.tables = vec![ITable { at, body }];
        i
    }

    fn loop_65535() -> Body {
        Body::Loop { n: 65535, addr: Place::Ram(0x10), len: 1, write: false }
    }

    pub fn all() -> Vec<(&'static str, ChainInput)> {
        let mut looped = request(true);
        looped[2] = CDesc { flags: WRITE | NEXT, next: Link::Raw(0), ..looped[2] };
        let mut high = input(MemLayout::High, 8, MaxD::QueueSize, false, Place::Region(1, 0), request(false));
        high.descs[1].addr = Place::Region(1, 0x1000);
        high.head = Head::Raw(0);
        let mut top = input(MemLayout::Top, 2, MaxD::Max256, false, Place::Ram(0x1000), request(true));
        top.descs[1] = CDesc { addr: Place::End(1, -512), ..top.descs[1] };
        let mut past_end = input(MemLayout::Holey, 2, MaxD::Max256, false, Place::Ram(0x1000), request(true));
        past_end.descs[1] = CDesc { addr: Place::End(0, -256), ..past_end.descs[1] };
        let mut poked = input(MemLayout::Flat1M, 4, MaxD::Max256, true, Place::Ram(0x1000), request(false));
        poked.pokes = vec![Poke { at: Place::Ram(0x1000 + 16 + 14), data: Bytes::new([0x40u8, 0]) }];
        vec![
            ("read-request", input(MemLayout::Flat1M, 3, MaxD::Max256, false, Place::Ram(0x1000), request(true))),
            ("write-request-high-region", high),
            ("top-region", top),
            ("buffer-past-ram-end", past_end),
            ("next-poked-out-of-table", poked),
            ("loop-in-descriptor-table", input(MemLayout::Flat1M, 8, MaxD::Max256, false, Place::Ram(0x1000), looped)),
            ("indirect", indirect(MemLayout::Flat1M, MaxD::Max256, true, Place::Ram(0x1000), Place::Ram(0x2_0000), Body::List(request(true)))),
            ("indirect-not-negotiated", indirect(MemLayout::Flat1M, MaxD::Max256, false, Place::Ram(0x1000), Place::Ram(0x2_0000), Body::List(request(true)))),
            ("indirect-loop-65535", indirect(MemLayout::Holey, MaxD::Raw(65535), true, Place::Region(1, 0), Place::Ram(0), loop_65535())),
            ("indirect-loop-65535-max-256", indirect(MemLayout::Holey, MaxD::Max256, true, Place::Region(1, 0), Place::Ram(0), loop_65535())),
            ("indirect-fill-256-loops", indirect(MemLayout::Flat1M, MaxD::Max256, true, Place::Ram(0x1000), Place::Ram(0x2_0000), Body::Fill { n: 256, desc: d(Place::Ram(0x9_0000), 4096, NEXT | WRITE) })),
        ]
    }
}

pub fn chain() -> Vec<(&'static str, crate::chain::ChainInput)> {
    chain_seeds::all()
}

// ---- devices ---------------------------------------------------------

mod device_seeds {
    use crate::chain::{DLen, Link, Place};
    use crate::devices::{DescOp, DevInput, DevKind, Leaf, Step};
    use crate::enc::Bytes;
    use crate::guest::MemLayout;

    const ALL: u64 = u64::MAX;
    const WRITE: u8 = 2;
    const F_MQ: u64 = 1 << 22;

    fn leaf(addr: u32, len: u16, flags: u8, data: &[u8]) -> DescOp {
        DescOp::Leaf(Leaf { addr: Place::Ram(addr), len: DLen::Small(len), flags, next: Link::Follow, data: Bytes::new(data) })
    }

    fn activate(features: u64) -> Step {
        Step::Activate { features, queues: 0xff, size_log2: 4, rings: Place::Ram(0x8_0000) }
    }

    fn blk_header(kind: u32, sector: u64) -> Vec<u8> {
        let mut h = kind.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        h
    }

    /// Header, data (writable for reads and GET_ID), status, at `base`.
    fn blk(queue: u8, head: u16, kind: u32, sector: u64, data: &[u8], data_len: u16, base: u32) -> Step {
        let flags = if kind == 1 || kind == 11 || kind == 13 { 0 } else { WRITE };
        let mut descs = vec![leaf(base, 16, 0, &blk_header(kind, sector))];
        if data_len > 0 {
            descs.push(leaf(base + 0x100, data_len, flags, data));
        }
        descs.push(leaf(base + 0x80, 1, WRITE, &[0xff]));
        Step::Offer { queue, head, descs, publish: true }
    }

    fn one(queue: u8, head: u16, addr: u32, len: u16, flags: u8, data: &[u8]) -> Step {
        Step::Offer { queue, head, descs: vec![leaf(addr, len, flags, data)], publish: true }
    }

    fn dev(layout: MemLayout, device: DevKind, steps: Vec<Step>) -> DevInput {
        DevInput { layout, device, steps }
    }

    fn blk_dev(readonly: bool, queues: u8) -> DevKind {
        DevKind::Blk { readonly, queues, sectors: 16 }
    }

    /// A vsock header from the guest (cid 3, port 5000) to host port
    /// `dst`: `op`, `len` payload bytes, a 64 KiB buffer.
    fn vsock_hdr(op: u16, dst: u32, len: u32) -> Vec<u8> {
        let mut h = Vec::with_capacity(44);
        h.extend_from_slice(&3u64.to_le_bytes());
        h.extend_from_slice(&2u64.to_le_bytes());
        h.extend_from_slice(&5000u32.to_le_bytes());
        h.extend_from_slice(&dst.to_le_bytes());
        h.extend_from_slice(&len.to_le_bytes());
        h.extend_from_slice(&1u16.to_le_bytes());
        h.extend_from_slice(&op.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&65536u32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h
    }

    fn net_packet() -> Vec<u8> {
        let mut p = vec![0u8; 12];
        p.extend_from_slice(&[0xff; 6]);
        p.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x88, 0xb5]);
        p.extend_from_slice(&[0x61; 46]);
        p
    }

    pub fn all() -> Vec<(&'static str, DevInput)> {
        // Discard sectors 2..4, then write-zeroes 0..16 (unmap).
        let mut segs = Vec::new();
        segs.extend_from_slice(&2u64.to_le_bytes());
        segs.extend_from_slice(&2u32.to_le_bytes());
        segs.extend_from_slice(&0u32.to_le_bytes());
        let mut zero = Vec::new();
        zero.extend_from_slice(&0u64.to_le_bytes());
        zero.extend_from_slice(&16u32.to_le_bytes());
        zero.extend_from_slice(&1u32.to_le_bytes());
        let pkt = net_packet();
        let rx_bufs = |queue: u8| Step::Offer {
            queue,
            head: 0,
            descs: vec![leaf(0x3_0000 + 0x1000 * u32::from(queue), 2048, WRITE, &[])],
            publish: true,
        };
        let ctrl = |queue: u8, head: u16, cmd: &[u8]| Step::Offer {
            queue,
            head,
            descs: vec![leaf(0x2_0000 + 0x100 * u32::from(head), cmd.len() as u16, 0, cmd), leaf(0x2_0080 + 0x100 * u32::from(head), 1, WRITE, &[0xff])],
            publish: true,
        };
        vec![
            ("blk-write-read-flush-id-discard-zeroes", dev(MemLayout::Flat1M, blk_dev(false, 0), vec![
                activate(ALL),
                blk(0, 0, 1, 1, &[0xa5; 64], 512, 0x1_0000),
                blk(0, 3, 0, 1, &[], 512, 0x1_1000),
                blk(0, 6, 4, 0, &[], 0, 0x1_2000),
                blk(0, 8, 8, 0, &[], 20, 0x1_3000),
                Step::Serve,
                blk(0, 11, 11, 0, &segs, 16, 0x1_4000),
                blk(0, 14, 13, 0, &zero, 16, 0x1_5000),
                Step::Serve,
            ])),
            ("blk-readonly-two-queues-reset-between", dev(MemLayout::Holey, blk_dev(true, 1), vec![
                activate(ALL),
                blk(0, 0, 0, 0, &[], 512, 0x1_0000),
                blk(1, 0, 1, 0, &[1; 8], 512, 0x1_1000),
                Step::Serve,
                Step::Reset,
                activate(ALL),
                blk(1, 0, 8, 0, &[], 20, 0x1_2000),
                Step::Serve,
                activate(ALL),
                activate(0),
                blk(0, 0, 0, 15, &[], 512, 0x1_3000),
                Step::Serve,
            ])),
            ("blk-indirect", dev(MemLayout::Flat1M, blk_dev(false, 0), vec![
                activate(ALL),
                Step::Offer { queue: 0, head: 0, publish: true, descs: vec![DescOp::Indirect {
                    entries: vec![
                        Leaf { addr: Place::Ram(0x1_0000), len: DLen::Small(16), flags: 0, next: Link::Follow, data: Bytes::new(blk_header(0, 0)) },
                        Leaf { addr: Place::Ram(0x1_0100), len: DLen::Small(512), flags: WRITE, next: Link::Follow, data: Bytes::default() },
                        Leaf { addr: Place::Ram(0x1_0080), len: DLen::Small(1), flags: WRITE, next: Link::Follow, data: Bytes::default() },
                    ],
                    flags: 0,
                    len_delta: 0,
                }] },
                Step::Serve,
            ])),
            ("blk-indirect-loop-65535", dev(MemLayout::High, blk_dev(false, 0), vec![
                Step::Activate { features: ALL, queues: 1, size_log2: 3, rings: Place::Region(1, 0) },
                Step::Offer { queue: 0, head: 0, publish: true, descs: vec![DescOp::Loop {
                    n: 65535, at: Place::Ram(0), addr: Place::Ram(0x10), len: 1, write: false,
                }] },
                Step::Serve,
            ])),
            ("net-tx-packet-rx-from-host", dev(MemLayout::Flat1M, DevKind::Net, vec![
                activate(ALL),
                one(1, 0, 0x1_0000, pkt.len() as u16, 0, &pkt),
                rx_bufs(0),
                Step::HostPacket { len: 100, fill: 0x42 },
                Step::Serve,
                Step::Serve,
            ])),
            ("net-ctrl-vq-pairs-set-reset-cycles", dev(MemLayout::Flat1M, DevKind::Net, vec![
                activate(ALL),
                ctrl(4, 0, &[4, 0, 2, 0]),
                ctrl(4, 2, &[0, 0, 1]),
                Step::Serve,
                activate(ALL),
                ctrl(4, 0, &[4, 0, 1, 0]),
                Step::Serve,
                Step::Reset,
                activate(ALL & !F_MQ),
                ctrl(2, 0, &[4, 0, 2, 0]),
                one(3, 0, 0x1_0000, pkt.len() as u16, 0, &pkt),
                Step::Serve,
                activate(ALL),
                ctrl(4, 0, &[4, 0, 2, 0]),
                rx_bufs(2),
                Step::HostPacket { len: 60, fill: 1 },
                Step::Serve,
            ])),
            ("console-tx-rx", dev(MemLayout::Flat1M, DevKind::Console, vec![
                activate(ALL),
                one(1, 0, 0x2_0000, 6, 0, b"hello\n"),
                one(0, 0, 0x2_1000, 64, WRITE, &[]),
                Step::Serve,
                Step::Reset,
                activate(ALL),
                one(1, 0, 0x2_0000, 6, 0, b"again\n"),
                Step::Serve,
            ])),
            ("rng-reset-cycles-bad-rings", dev(MemLayout::Top, DevKind::Rng, vec![
                activate(ALL),
                one(0, 0, 0x1_0000, 64, WRITE, &[]),
                Step::Serve,
                Step::Reset,
                activate(ALL),
                activate(0),
                Step::Activate { features: ALL, queues: 1, size_log2: 8, rings: Place::End(1, -0x100) },
                activate(ALL),
                one(0, 0, 0x1_0000, 4096, WRITE, &[]),
                Step::Serve,
            ])),
            ("vsock-connect-both-ways-rst-reset", dev(MemLayout::Flat1M, DevKind::Vsock, vec![
                activate(ALL),
                // Receive buffers, then the guest connects to port 1024 (a
                // listener) and sends data; a host program connects too.
                one(0, 0, 0x3_0000, 1024, WRITE, &[]),
                one(0, 1, 0x3_1000, 1024, WRITE, &[]),
                one(0, 2, 0x3_2000, 1024, WRITE, &[]),
                one(0, 3, 0x3_3000, 1024, WRITE, &[]),
                one(1, 0, 0x2_0000, 44, 0, &vsock_hdr(1, 1024, 0)),
                Step::HostPacket { len: 100, fill: 80 },
                Step::Serve,
                Step::Serve,
                Step::Offer { queue: 1, head: 1, publish: true, descs: vec![
                    leaf(0x2_0100, 44, 0, &vsock_hdr(5, 1024, 5)),
                    leaf(0x2_0200, 5, 0, b"hello"),
                ] },
                one(1, 3, 0x2_0300, 44, 0, &vsock_hdr(3, 1024, 0)),
                Step::Serve,
                Step::Serve,
                Step::Reset,
                activate(ALL),
                one(2, 0, 0x3_4000, 4, WRITE, &[]),
                Step::Serve,
            ])),
            ("rng-avail-idx-lies", dev(MemLayout::Flat1M, DevKind::Rng, vec![
                activate(ALL),
                one(0, 0, 0x1_0000, 16, WRITE, &[]),
                Step::AvailIdx { queue: 0, idx: 1000 },
                Step::Serve,
                Step::Poke { at: Place::Ram(0x8_1000), data: Bytes::new([0u8; 4]) },
                Step::Serve,
            ])),
        ]
    }
}

pub fn device_requests() -> Vec<(&'static str, crate::devices::DevInput)> {
    device_seeds::all()
}

// ---- api ---------------------------------------------------------------

/// One request as a client writes it.
fn http(method: &str, endpoint: &str, body: &str) -> String {
    let mut r = format!("{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n");
    if !body.is_empty() {
        r.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r
}

/// Client byte streams for the `api` target: the first byte picks the
/// read size (n % 64 + 1), the rest is what a client writes.
pub fn api() -> Vec<(&'static str, Vec<u8>)> {
    let create = r#"{"payload":{"kernel":"kernel","initramfs":"initrd","cmdline":"quiet"},"cpus":{"boot_vcpus":2,"max_vcpus":4},"memory":{"size":268435456,"shared":true},"disks":[{"path":"disk","readonly":true,"num_queues":2,"serial":"d0"}],"net":[{"tap":"t0","mac":"52:54:00:00:00:07","num_queues":2}],"rng":{"src":"/dev/urandom"},"serial":{"mode":"Tty"},"console":{"mode":"File","file":"dir/console.log"},"platform":{"num_pci_segments":1}}"#;
    let lifecycle = [
        http("GET", "vmm.ping", ""),
        http("PUT", "vm.create", create),
        http("GET", "vm.info", ""),
        http("PUT", "vm.add-disk", r#"{"path":"disk"}"#),
        http("PUT", "vm.add-net", r#"{"tap":"t1","num_queues":4}"#),
        http("PUT", "vm.resize", r#"{"desired_vcpus":3,"desired_ram":536870912}"#),
        http("PUT", "vm.boot", ""),
        http("GET", "vm.counters", ""),
        http("PUT", "vm.reboot", ""),
        http("PUT", "vm.power-button", ""),
        http("PUT", "vm.shutdown", ""),
        http("PUT", "vm.delete", ""),
        http("PUT", "vmm.shutdown", ""),
    ]
    .concat();
    let bad = [
        http("PUT", "vm.create", r#"{"payload":{"kernel":"#),
        http("GET", "vm.create", ""),
        http("PUT", "vm.nothing", "{}"),
        http("PUT", "vm.create", r#"{"payload":{"firmware":"kernel"},"fs":[{"tag":"x"}]}"#),
        http("PUT", "vm.create", r#"{"payload":{"kernel":"empty"},"memory":{"size":1},"cpus":{"boot_vcpus":0}}"#),
        "PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_string(),
    ]
    .concat();
    let with = |size: u8, s: &str| [&[size][..], s.as_bytes()].concat();
    vec![
        ("lifecycle-whole", with(63, &lifecycle)),
        ("lifecycle-bytewise", with(0, &lifecycle)),
        ("bad-requests", with(17, &bad)),
        ("chunked-keepalive-close", with(5, "GET /api/v1/vmm.ping HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")),
        ("http10-close", with(63, "GET /api/v1/vmm.ping HTTP/1.0\r\n\r\nGET /api/v1/vm.info HTTP/1.1\r\n\r\n")),
    ]
}
