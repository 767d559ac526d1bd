//! The `cli` target: `kickvm run`'s command line, as the host user types
//! it, through everything that runs before KVM is opened: the clap parser
//! with kickvm's value parsers, `RunArgs::to_config` and
//! `VmConfig::validate` (memory, kernel header, initrd, disks, TAPs,
//! console paths); and each option parser on its own (`parse_size`,
//! `parse_cpus`, `parse_mac`, `parse_net`, `parse_disk`, `parse_console`,
//! `full_cmdline`).
//!
//! Argv words are structure-aware (known options, sizes with units,
//! `key=value` lists, MAC addresses in several spellings, paths) or raw
//! bytes. Paths never leave a sandbox directory: `validate` opens files
//! (disks read-write), so every path in the parsed config is mapped to
//! `<sandbox>/<its file name>` — a bzImage, an initrd and a disk, a
//! directory, an empty file, links, /dev/null, a fifo — or to a name that
//! does not exist there.
//!
//! Besides "no panic" and "no hang" (opening a fifo would block), the
//! checks of issue 8's class 5 (host input taken silently): a
//! configuration that passes every check has whole pages of memory and
//! disks that are files or block devices, and every error kickvm prints
//! is one line.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use arbitrary::Arbitrary;
use clap::Parser;
use kickvm::cli::{Cli, Command};
use kickvm::config;

use crate::checks;
use crate::enc::{Enc, Encode, Text};

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct CliInput {
    /// Whether the default guest image "exists" (asked when --kernel is missing).
    pub image_ok: bool,
    pub sub: Sub,
    pub args: Vec<Arg>,
    /// Each option parser on its own.
    pub direct: Vec<Direct>,
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Sub {
    Run,
    None,
    Raw(Text<16>),
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Direct {
    Size(Text<64>),
    Mac(Text<64>),
    Net(Text<128>),
    Disk(Text<128>),
    Console(Text<128>),
    Cmdline(Option<Text<256>>),
    Cpus(Text<16>),
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    Raw(Text<128>),
    Flag(Flag),
    Value(Value),
    /// `--flag value` (two words).
    FlagValue(Flag, Value),
    /// `--flag=value` (one word).
    FlagEq(Flag, Value),
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Flag {
    Kernel,
    Initrd,
    Cmdline,
    Memory,
    Cpus,
    Hugepages,
    Net,
    Disk,
    Console,
    Rng,
    Threads,
    NoReboot,
    AllowSlowKvm,
    KvmDevice,
    Help,
    Version,
    /// `--`
    Dashes,
    Unknown(Text<24>),
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Path(PathV),
    Size(SizeV),
    /// `k=v,k=v,...` (for --net, --disk, --console).
    Kvs(Vec<Kv>),
    Console(ConsoleV),
    Num(u64),
    Threads(u8),
    Text(Text<128>),
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum PathV {
    Kernel,
    Initrd,
    Disk,
    Dir,
    Empty,
    Missing,
    LinkToDir,
    Dangling,
    Null,
    /// A fifo (opening one blocks).
    Fifo,
    Raw(Text<64>),
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct SizeV {
    pub n: u64,
    /// Use `n % 100000` (typical sizes) rather than all of `n`.
    pub small: bool,
    pub unit: Unit,
    /// Bit 0: a space before, bit 1: after, bit 2: between number and unit.
    pub pad: u8,
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    None,
    K,
    M,
    G,
    T,
    LowerK,
    LowerM,
    LowerG,
    KiB,
    MiB,
    GiB,
    TiB,
    KB,
    B,
    IB,
    Raw(Text<8>),
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: Key,
    pub value: Option<KvVal>,
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Tap,
    Mac,
    Queues,
    Path,
    Readonly,
    Ro,
    Serial,
    Socket,
    File,
    Raw(Text<16>),
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum KvVal {
    Name(Text<24>),
    Mac(MacV),
    Num(u32),
    /// on off true false yes no 1 0 maybe "" (by `v % 10`).
    Bool(u8),
    Path(PathV),
    Text(Text<32>),
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct MacV {
    pub bytes: [u8; 6],
    /// 0: 52:54:00:12:34:56, 1: upper case, 2: unpadded, 3: dashes,
    /// 4: five bytes, 5: seven bytes, 6: 0x prefixes, 7: empty groups.
    pub style: u8,
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum ConsoleV {
    Stdio,
    Pty,
    None,
    Socket(PathV),
    File(PathV),
    Raw(Text<32>),
}

// ---- encoders --------------------------------------------------------

impl Encode for Sub {
    fn encode(&self, e: &mut Enc) {
        match self {
            Sub::Run => e.tag(0, 3),
            Sub::None => e.tag(1, 3),
            Sub::Raw(t) => e.tag(2, 3).put(t),
        };
    }
}
impl Encode for Direct {
    fn encode(&self, e: &mut Enc) {
        match self {
            Direct::Size(t) => e.tag(0, 7).put(t),
            Direct::Mac(t) => e.tag(1, 7).put(t),
            Direct::Net(t) => e.tag(2, 7).put(t),
            Direct::Disk(t) => e.tag(3, 7).put(t),
            Direct::Console(t) => e.tag(4, 7).put(t),
            Direct::Cmdline(t) => e.tag(5, 7).option(t),
            Direct::Cpus(t) => e.tag(6, 7).put(t),
        };
    }
}
impl Encode for Arg {
    fn encode(&self, e: &mut Enc) {
        match self {
            Arg::Raw(t) => e.tag(0, 5).put(t),
            Arg::Flag(f) => e.tag(1, 5).put(f),
            Arg::Value(v) => e.tag(2, 5).put(v),
            Arg::FlagValue(f, v) => e.tag(3, 5).put(f).put(v),
            Arg::FlagEq(f, v) => e.tag(4, 5).put(f).put(v),
        };
    }
}
impl Encode for Flag {
    fn encode(&self, e: &mut Enc) {
        const N: u32 = 18;
        let i = match self {
            Flag::Kernel => 0,
            Flag::Initrd => 1,
            Flag::Cmdline => 2,
            Flag::Memory => 3,
            Flag::Cpus => 4,
            Flag::Hugepages => 5,
            Flag::Net => 6,
            Flag::Disk => 7,
            Flag::Console => 8,
            Flag::Rng => 9,
            Flag::Threads => 10,
            Flag::NoReboot => 11,
            Flag::AllowSlowKvm => 12,
            Flag::KvmDevice => 13,
            Flag::Help => 14,
            Flag::Version => 15,
            Flag::Dashes => 16,
            Flag::Unknown(t) => {
                e.tag(17, N).put(t);
                return;
            }
        };
        e.tag(i, N);
    }
}
impl Encode for Value {
    fn encode(&self, e: &mut Enc) {
        const N: u32 = 7;
        match self {
            Value::Path(p) => e.tag(0, N).put(p),
            Value::Size(s) => e.tag(1, N).put(s),
            Value::Kvs(k) => e.tag(2, N).vec(k),
            Value::Console(c) => e.tag(3, N).put(c),
            Value::Num(n) => e.tag(4, N).u64(*n),
            Value::Threads(t) => e.tag(5, N).u8(*t),
            Value::Text(t) => e.tag(6, N).put(t),
        };
    }
}
impl Encode for PathV {
    fn encode(&self, e: &mut Enc) {
        const N: u32 = 11;
        let i = match self {
            PathV::Kernel => 0,
            PathV::Initrd => 1,
            PathV::Disk => 2,
            PathV::Dir => 3,
            PathV::Empty => 4,
            PathV::Missing => 5,
            PathV::LinkToDir => 6,
            PathV::Dangling => 7,
            PathV::Null => 8,
            PathV::Fifo => 9,
            PathV::Raw(t) => {
                e.tag(10, N).put(t);
                return;
            }
        };
        e.tag(i, N);
    }
}
impl Encode for SizeV {
    fn encode(&self, e: &mut Enc) {
        e.u64(self.n).bool(self.small).put(&self.unit).u8(self.pad);
    }
}
impl Encode for Unit {
    fn encode(&self, e: &mut Enc) {
        const N: u32 = 16;
        let i = match self {
            Unit::None => 0,
            Unit::K => 1,
            Unit::M => 2,
            Unit::G => 3,
            Unit::T => 4,
            Unit::LowerK => 5,
            Unit::LowerM => 6,
            Unit::LowerG => 7,
            Unit::KiB => 8,
            Unit::MiB => 9,
            Unit::GiB => 10,
            Unit::TiB => 11,
            Unit::KB => 12,
            Unit::B => 13,
            Unit::IB => 14,
            Unit::Raw(t) => {
                e.tag(15, N).put(t);
                return;
            }
        };
        e.tag(i, N);
    }
}
impl Encode for Kv {
    fn encode(&self, e: &mut Enc) {
        e.put(&self.key).option(&self.value);
    }
}
impl Encode for Key {
    fn encode(&self, e: &mut Enc) {
        const N: u32 = 10;
        let i = match self {
            Key::Tap => 0,
            Key::Mac => 1,
            Key::Queues => 2,
            Key::Path => 3,
            Key::Readonly => 4,
            Key::Ro => 5,
            Key::Serial => 6,
            Key::Socket => 7,
            Key::File => 8,
            Key::Raw(t) => {
                e.tag(9, N).put(t);
                return;
            }
        };
        e.tag(i, N);
    }
}
impl Encode for KvVal {
    fn encode(&self, e: &mut Enc) {
        const N: u32 = 6;
        match self {
            KvVal::Name(t) => e.tag(0, N).put(t),
            KvVal::Mac(m) => e.tag(1, N).put(m),
            KvVal::Num(n) => e.tag(2, N).u32(*n),
            KvVal::Bool(b) => e.tag(3, N).u8(*b),
            KvVal::Path(p) => e.tag(4, N).put(p),
            KvVal::Text(t) => e.tag(5, N).put(t),
        };
    }
}
impl Encode for MacV {
    fn encode(&self, e: &mut Enc) {
        for b in self.bytes {
            e.u8(b);
        }
        e.u8(self.style);
    }
}
impl Encode for ConsoleV {
    fn encode(&self, e: &mut Enc) {
        const N: u32 = 6;
        match self {
            ConsoleV::Stdio => e.tag(0, N),
            ConsoleV::Pty => e.tag(1, N),
            ConsoleV::None => e.tag(2, N),
            ConsoleV::Socket(p) => e.tag(3, N).put(p),
            ConsoleV::File(p) => e.tag(4, N).put(p),
            ConsoleV::Raw(t) => e.tag(5, N).put(t),
        };
    }
}
impl Encode for CliInput {
    fn encode(&self, e: &mut Enc) {
        e.bool(self.image_ok).put(&self.sub).vec(&self.args).vec(&self.direct);
    }
}

// ---- the sandbox -------------------------------------------------------

/// Names in the sandbox directory.
const ENTRIES: [&str; 9] = ["kernel", "initrd", "disk", "dir", "empty", "link-to-dir", "dangling", "null", "fifo"];

/// The sandbox directory (created once per process, removed at exit).
pub fn sandbox() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("kickvm-fuzz-cli-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("dir")).expect("sandbox dir");
        let (head, len) = crate::bz::sample_kernel();
        let k = std::fs::File::create(d.join("kernel")).expect("sandbox kernel");
        std::io::Write::write_all(&mut &k, &head).expect("sandbox kernel");
        k.set_len(len).expect("sandbox kernel size");
        std::fs::write(d.join("initrd"), b"070701").expect("sandbox initrd");
        let disk = std::fs::File::create(d.join("disk")).expect("sandbox disk");
        disk.set_len(1 << 20).expect("sandbox disk size");
        std::fs::write(d.join("empty"), b"").expect("sandbox empty");
        let _ = std::os::unix::fs::symlink(d.join("dir"), d.join("link-to-dir"));
        let _ = std::os::unix::fs::symlink(d.join("nowhere"), d.join("dangling"));
        let _ = std::os::unix::fs::symlink("/dev/null", d.join("null"));
        let fifo = std::ffi::CString::new(d.join("fifo").as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: mkfifo with a valid C string.
        unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) };
        extern "C" fn cleanup() {
            if let Some(d) = DIR.get() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        // SAFETY: registering a plain extern "C" fn.
        unsafe { libc::atexit(cleanup) };
        d
    })
}

/// Where a path the parser produced points inside the sandbox.
pub(crate) fn confine(p: &Path) -> PathBuf {
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if ENTRIES.contains(&name.as_str()) {
        return sandbox().join(name);
    }
    let clean: String =
        name.chars().take(48).map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect();
    sandbox().join(format!("missing-{clean}"))
}

fn path_word(p: &PathV) -> OsString {
    let name = match p {
        PathV::Kernel => "kernel",
        PathV::Initrd => "initrd",
        PathV::Disk => "disk",
        PathV::Dir => "dir",
        PathV::Empty => "empty",
        PathV::Missing => "missing",
        PathV::LinkToDir => "link-to-dir",
        PathV::Dangling => "dangling",
        PathV::Null => "null",
        PathV::Fifo => "fifo",
        PathV::Raw(t) => return t.os(),
    };
    sandbox().join(name).into_os_string()
}

// ---- argv ------------------------------------------------------------

fn flag_word(f: &Flag) -> OsString {
    let s = match f {
        Flag::Kernel => "--kernel",
        Flag::Initrd => "--initrd",
        Flag::Cmdline => "--cmdline",
        Flag::Memory => "--memory",
        Flag::Cpus => "--cpus",
        Flag::Hugepages => "--hugepages",
        Flag::Net => "--net",
        Flag::Disk => "--disk",
        Flag::Console => "--console",
        Flag::Rng => "--rng",
        Flag::Threads => "--threads",
        Flag::NoReboot => "--no-reboot",
        Flag::AllowSlowKvm => "--allow-slow-kvm",
        Flag::KvmDevice => "--kvm-device",
        Flag::Help => "--help",
        Flag::Version => "--version",
        Flag::Dashes => "--",
        Flag::Unknown(t) => {
            let mut w = OsString::from("--");
            w.push(t.os());
            return w;
        }
    };
    s.into()
}

fn size_word(s: &SizeV) -> String {
    let n = if s.small { s.n % 100_000 } else { s.n };
    let unit = match &s.unit {
        Unit::None => "".to_string(),
        Unit::K => "K".into(),
        Unit::M => "M".into(),
        Unit::G => "G".into(),
        Unit::T => "T".into(),
        Unit::LowerK => "k".into(),
        Unit::LowerM => "m".into(),
        Unit::LowerG => "g".into(),
        Unit::KiB => "KiB".into(),
        Unit::MiB => "MiB".into(),
        Unit::GiB => "GiB".into(),
        Unit::TiB => "TiB".into(),
        Unit::KB => "KB".into(),
        Unit::B => "B".into(),
        Unit::IB => "iB".into(),
        Unit::Raw(t) => t.lossy(),
    };
    let sp = |bit: u8| if s.pad & bit != 0 { " " } else { "" };
    format!("{}{n}{}{unit}{}", sp(1), sp(4), sp(2))
}

fn mac_word(m: &MacV) -> String {
    let b = m.bytes;
    let hex = |x: u8| format!("{x:02x}");
    let parts: Vec<String> = match m.style % 8 {
        1 => b.iter().map(|x| format!("{x:02X}")).collect(),
        2 => b.iter().map(|x| format!("{x:x}")).collect(),
        3 => return b.iter().map(|&x| hex(x)).collect::<Vec<_>>().join("-"),
        4 => b[..5].iter().map(|&x| hex(x)).collect(),
        5 => b.iter().map(|&x| hex(x)).chain(["00".to_string()]).collect(),
        6 => b.iter().map(|x| format!("0x{x:x}")).collect(),
        7 => b.iter().map(|&x| if x & 1 == 0 { String::new() } else { hex(x) }).collect(),
        _ => b.iter().map(|&x| hex(x)).collect(),
    };
    parts.join(":")
}

fn kv_word(kvs: &[Kv]) -> OsString {
    let mut w = OsString::new();
    for (i, kv) in kvs.iter().enumerate() {
        if i > 0 {
            w.push(",");
        }
        let key: OsString = match &kv.key {
            Key::Tap => "tap".into(),
            Key::Mac => "mac".into(),
            Key::Queues => "queues".into(),
            Key::Path => "path".into(),
            Key::Readonly => "readonly".into(),
            Key::Ro => "ro".into(),
            Key::Serial => "serial".into(),
            Key::Socket => "socket".into(),
            Key::File => "file".into(),
            Key::Raw(t) => t.os(),
        };
        w.push(key);
        if let Some(v) = &kv.value {
            w.push("=");
            w.push(match v {
                KvVal::Name(t) => t.os(),
                KvVal::Mac(m) => mac_word(m).into(),
                KvVal::Num(n) => n.to_string().into(),
                KvVal::Bool(b) => {
                    ["on", "off", "true", "false", "yes", "no", "1", "0", "maybe", ""][usize::from(b % 10)].into()
                }
                KvVal::Path(p) => path_word(p),
                KvVal::Text(t) => t.os(),
            });
        }
    }
    w
}

fn value_word(v: &Value) -> OsString {
    match v {
        Value::Path(p) => path_word(p),
        Value::Size(s) => size_word(s).into(),
        Value::Kvs(k) => kv_word(k),
        Value::Console(c) => match c {
            ConsoleV::Stdio => "stdio".into(),
            ConsoleV::Pty => "pty".into(),
            ConsoleV::None => "none".into(),
            ConsoleV::Socket(p) => {
                let mut w = OsString::from("socket=");
                w.push(path_word(p));
                w
            }
            ConsoleV::File(p) => {
                let mut w = OsString::from("file=");
                w.push(path_word(p));
                w
            }
            ConsoleV::Raw(t) => t.os(),
        },
        Value::Num(n) => n.to_string().into(),
        Value::Threads(t) => ["per-queue", "per-device", "single", "", "PER-QUEUE", "many"][usize::from(t % 6)].into(),
        Value::Text(t) => t.os(),
    }
}

/// The argv this input stands for.
pub fn argv(input: &CliInput) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["kickvm".into()];
    match &input.sub {
        Sub::Run => v.push("run".into()),
        Sub::None => {}
        Sub::Raw(t) => v.push(t.os()),
    }
    for a in input.args.iter().take(64) {
        match a {
            Arg::Raw(t) => v.push(t.os()),
            Arg::Flag(f) => v.push(flag_word(f)),
            Arg::Value(x) => v.push(value_word(x)),
            Arg::FlagValue(f, x) => {
                v.push(flag_word(f));
                v.push(value_word(x));
            }
            Arg::FlagEq(f, x) => {
                let mut w = flag_word(f);
                w.push("=");
                w.push(value_word(x));
                v.push(w);
            }
        }
    }
    v
}

// ---- the run ---------------------------------------------------------

/// An error the user sees is one line (unless it quotes input that
/// already had a line break: `input_breaks`).
fn one_line(msg: &str, input_breaks: bool) {
    assert!(input_breaks || !msg.contains('\n'), "error message is not one line: {msg:?}");
}

fn breaks(b: &[u8]) -> bool {
    b.iter().any(|&c| c == b'\n' || c == b'\r')
}

fn direct(d: &Direct) {
    let nl = match d {
        Direct::Size(t) | Direct::Mac(t) => breaks(&t.0),
        Direct::Cpus(t) => breaks(&t.0),
        Direct::Net(t) | Direct::Disk(t) | Direct::Console(t) => breaks(&t.0),
        Direct::Cmdline(t) => t.as_ref().is_some_and(|t| breaks(&t.0)),
    };
    let one_line = |m: &str| one_line(m, nl);
    match d {
        Direct::Size(t) => {
            if let Err(e) = config::parse_size(&t.lossy()) {
                one_line(&e.to_string());
            }
        }
        Direct::Mac(t) => match config::parse_mac(&t.lossy()) {
            Ok(m) => assert_eq!(m[0] & 1, 0, "parse_mac accepted a multicast address {m:02x?}"),
            Err(e) => one_line(&e.to_string()),
        },
        Direct::Net(t) => match config::parse_net(&t.lossy()) {
            Ok(n) => {
                assert!(!n.tap.is_empty() && n.tap.len() < libc::IFNAMSIZ, "parse_net: tap {:?}", n.tap);
                assert!((1..=config::MAX_QUEUES).contains(&n.queues), "parse_net: {} queues", n.queues);
            }
            Err(e) => one_line(&e.to_string()),
        },
        Direct::Disk(t) => match config::parse_disk(&t.lossy()) {
            Ok(d) => {
                assert!(!d.path.as_os_str().is_empty(), "parse_disk: empty path");
                assert!((1..=config::MAX_QUEUES).contains(&d.queues), "parse_disk: {} queues", d.queues);
                assert!(d.serial.as_ref().is_none_or(|s| s.len() <= 20), "parse_disk: serial {:?}", d.serial);
            }
            Err(e) => one_line(&e.to_string()),
        },
        Direct::Console(t) => {
            if let Err(e) = config::parse_console(&t.lossy()) {
                one_line(&e.to_string());
            }
        }
        Direct::Cmdline(t) => {
            let user = t.as_ref().map(|t| t.lossy());
            let c = config::full_cmdline(user.as_deref());
            assert!(c.starts_with(config::DEFAULT_CMDLINE), "full_cmdline dropped the defaults: {c:?}");
        }
        Direct::Cpus(t) => match config::parse_cpus(&t.lossy()) {
            Ok(n) => assert!((1..=config::MAX_CPUS).contains(&n), "parse_cpus accepted {n}"),
            Err(e) => one_line(&e.to_string()),
        },
    }
}

/// Runs one input; panics on any violation.
pub fn run(input: &CliInput) {
    checks::log_begin();
    for d in input.direct.iter().take(64) {
        direct(d);
    }
    let argv = argv(input);
    let nl = argv.iter().any(|a| breaks(a.as_encoded_bytes()));
    let one_line = |m: &str| one_line(m, nl);
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            // What the user would see (rendered, not printed).
            let _ = e.render().to_string();
            checks::log_end();
            return;
        }
    };
    // Other subcommands (`backend`) are parsed only: running them serves a socket.
    #[allow(irrefutable_let_patterns)]
    let Some(Command::Run(args)) = cli.command else {
        checks::log_end();
        return;
    };
    let image_ok = input.image_ok;
    let default_image = move || {
        if image_ok {
            Ok((sandbox().join("kernel"), sandbox().join("initrd")))
        } else {
            Err("the default guest image is not built (fuzz)".to_string())
        }
    };
    let mut cfg = match args.to_config(&default_image) {
        Ok(c) => c,
        Err(e) => {
            one_line(&e.to_string());
            checks::log_end();
            return;
        }
    };
    cfg.kernel = confine(&cfg.kernel);
    cfg.initrd = cfg.initrd.as_deref().map(confine);
    for d in &mut cfg.disks {
        d.path = confine(&d.path);
    }
    for v in &mut cfg.vhost_users {
        v.socket = confine(&v.socket);
    }
    match &mut cfg.console {
        config::ConsoleSpec::Socket(p) | config::ConsoleSpec::File(p) => *p = confine(p),
        _ => {}
    }
    if let Err(e) = cfg.validate() {
        one_line(&e.to_string());
        checks::log_end();
        return;
    }
    // Everything kickvm checks before KVM passed.
    assert_eq!(cfg.memory % 4096, 0, "--memory of {} bytes passed every check, but KVM only takes whole pages", cfg.memory);
    for d in &cfg.disks {
        let ft = std::fs::metadata(&d.path).map(|m| m.file_type());
        use std::os::unix::fs::FileTypeExt;
        assert!(
            ft.as_ref().is_ok_and(|t| t.is_file() || t.is_block_device()),
            "--disk path={} passed every check but is not a file or block device ({ft:?})",
            d.path.display()
        );
    }
    checks::log_end();
}
