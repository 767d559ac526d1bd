//! A vhost-user frontend for tests: the `vhost` crate's `Frontend` over a
//! real unix socket, guest memory in a real memfd shared with the back-end,
//! and kickvm's test driver playing the guest on the rings.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use kickvm_virtio::driver::{DriverQueue, Guest};
use kickvm_virtio::{GuestMemory, VirtioDevice};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{FileOffset, GuestAddress};

pub const T: Duration = Duration::from_secs(5);

/// Where the frontend's "process" has guest RAM: user address = guest
/// address + this, so every ring address the back-end gets must be
/// translated.
pub const USER_BASE: u64 = 0x7f00_0000_0000;

pub fn init_log() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .is_test(true)
        .try_init();
}

/// A scratch directory under /dev/shm (or the temp dir), removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let base = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("kickvm-vhost-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A back-end serving `device` on a socket, for `connections` frontends in
/// turn (on a thread, as `kickvm backend` does in its main loop).
pub struct BackendThread {
    pub socket: PathBuf,
    pub handle: JoinHandle<Option<Box<dyn VirtioDevice>>>,
}

pub fn start_backend(dir: &Scratch, device: Box<dyn VirtioDevice>, connections: usize) -> BackendThread {
    let socket = dir.path("vhost.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let handle = std::thread::spawn(move || {
        let mut dev = Some(device);
        for _ in 0..connections {
            let (s, _) = listener.accept().ok()?;
            dev = kickvm_vhost::serve(s, dev?);
        }
        dev
    });
    BackendThread { socket, handle }
}

/// Guest RAM in a memfd, mapped here too.
pub fn memfd(size: usize) -> File {
    // SAFETY: a NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(c"kickvm-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size as u64).unwrap();
    f
}

pub fn guest_in(file: &File, size: usize) -> Guest {
    let mem = GuestMemory::from_ranges_with_files(&[(
        GuestAddress(0),
        size,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    Guest::with_memory(mem, size)
}

/// The frontend: a connection, guest memory, and the driver's queues.
pub struct Front {
    pub fe: Frontend,
    pub guest: Guest,
    pub memfd: File,
    pub size: usize,
    pub queues: Vec<DriverQueue>,
    pub features: u64,
    /// Receive buffers posted (net tests).
    pub rx_bufs: Vec<GuestAddress>,
}

impl Front {
    /// Connects and negotiates: owner, features (`want` ∩ offered, plus
    /// PROTOCOL_FEATURES), protocol features (all the back-end offers),
    /// every request asking for an ack, and the memory table.
    pub fn connect(socket: &std::path::Path, mem_size: usize, want: u64) -> Front {
        Front::connect_stream(Front::stream(socket), mem_size, want)
    }

    /// A connection to the back-end at `socket`.
    pub fn stream(socket: &std::path::Path) -> UnixStream {
        // (A back-end that just bound its socket may not listen yet.)
        let end = std::time::Instant::now() + T;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() > end => panic!("cannot connect to {}: {e}", socket.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        stream
    }

    /// [`Front::connect`] on a connected `stream`.
    pub fn connect_stream(stream: UnixStream, mem_size: usize, want: u64) -> Front {
        let mut fe = Frontend::from_stream(stream, 64);
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        assert!(offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0);
        assert!(offered & (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1) != 0);
        let features = offered & (want | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
        fe.set_features(features).unwrap();
        let pf = fe.get_protocol_features().unwrap();
        let expect = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        assert_eq!(pf, expect, "protocol features offered");
        fe.set_protocol_features(pf).unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let memfd = memfd(mem_size);
        let guest = guest_in(&memfd, mem_size);
        let front = Front { fe, guest, memfd, size: mem_size, queues: Vec::new(), features, rx_bufs: Vec::new() };
        front.fe.set_mem_table(&[front.region(0, mem_size)]).unwrap();
        front
    }

    /// A region of the memfd as the frontend describes it.
    pub fn region(&self, guest: u64, size: usize) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: guest,
            memory_size: size as u64,
            userspace_addr: USER_BASE + guest,
            mmap_offset: guest,
            mmap_handle: self.memfd.as_raw_fd(),
        }
    }

    /// Lays out queue `index` with `size` entries and starts it: num,
    /// addresses (user addresses), base, call, kick, enable.
    pub fn add_queue(&mut self, index: u16, size: u16) {
        let qi = self.layout_queue(index, size);
        self.start_queue(qi, 0);
    }

    /// Lays out queue `index` in guest memory without telling the
    /// back-end; returns its driver queue's position.
    pub fn layout_queue(&mut self, index: u16, size: u16) -> usize {
        let q = DriverQueue::new(&mut self.guest, index, size);
        self.queues.push(q);
        self.queues.len() - 1
    }

    /// Gives the back-end queue `qi` (num, addresses, base, call, kick)
    /// without enabling it.
    pub fn kick_queue(&mut self, qi: usize, base: u16) {
        let q = &self.queues[qi];
        let i = usize::from(q.index);
        self.fe.set_vring_num(i, q.size).unwrap();
        let cfg = VringConfigData {
            queue_max_size: q.size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: USER_BASE + q.desc.0,
            used_ring_addr: USER_BASE + q.used.0,
            avail_ring_addr: USER_BASE + q.avail.0,
            log_addr: None,
        };
        self.fe.set_vring_addr(i, &cfg).unwrap();
        self.fe.set_vring_base(i, base).unwrap();
        let s = q.setup();
        // As QEMU's: the back-end must cope with a non-blocking kick.
        kickvm_virtio::sys::set_nonblocking(s.kick.as_raw_fd(), true).unwrap();
        self.fe.set_vring_call(i, &s.call).unwrap();
        self.fe.set_vring_kick(i, &s.kick).unwrap();
    }

    /// (Re)starts driver queue `qi` at ring index `base` and enables it.
    pub fn start_queue(&mut self, qi: usize, base: u16) {
        self.kick_queue(qi, base);
        let i = usize::from(self.queues[qi].index);
        self.fe.set_vring_enable(i, true).unwrap();
    }

    /// QEMU's stop: disable, then GET_VRING_BASE.
    pub fn stop_queue(&mut self, qi: usize) -> u32 {
        let i = usize::from(self.queues[qi].index);
        self.fe.set_vring_enable(i, false).unwrap();
        self.fe.get_vring_base(i).unwrap()
    }
}

/// A network namespace for the test; the test thread (and the back-end
/// thread it starts) live in it until the guard drops.
pub struct NetNs {
    name: String,
    home: std::fs::File,
}

impl NetNs {
    pub fn new(tag: &str) -> Option<NetNs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (network namespaces and TAP)");
            return None;
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipped: no /dev/net/tun");
            return None;
        }
        let name = format!("kvvhost-{}-{tag}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let home = std::fs::File::open("/proc/thread-self/ns/net").expect("own netns");
        let ns = NetNs { name, home };
        let target = std::fs::File::open(format!("/var/run/netns/{}", ns.name)).expect("netns file");
        // SAFETY: setns on this thread with a valid namespace fd.
        let r = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        run("ip", &["netns", "exec", &ns.name, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        Some(ns)
    }

    pub fn ip(&self, args: &str) {
        let mut a = vec!["-n", &self.name];
        a.extend(args.split_whitespace());
        run("ip", &a);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // SAFETY: back to the namespace the thread started in.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

pub fn run(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}


/// A child process (QEMU) killed when the test ends, however it ends.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a QEMU run printed and how it ended.
pub struct QemuRun {
    pub console: String,
    pub stderr: String,
    pub status: std::process::ExitStatus,
    pub secs: f64,
}

impl QemuRun {
    /// The console's last lines, for messages.
    pub fn tail(&self) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Runs QEMU (`cmd`, stdout being the guest's serial console) until it
/// exits or `timeout`; `on_line` sees each console line as it comes.
pub fn run_qemu(mut cmd: std::process::Command, timeout: Duration, mut on_line: impl FnMut(&str)) -> QemuRun {
    use std::io::{BufRead, Read};
    use std::process::Stdio;
    let start = std::time::Instant::now();
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut child = KillOnDrop(child);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut console = String::new();
    while let Some(left) = timeout.checked_sub(start.elapsed()) {
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(l) => {
                on_line(&l);
                console.push_str(&l);
                console.push('\n');
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // The guest powered off (QEMU exits) or time is up.
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    QemuRun { console, stderr, status, secs: start.elapsed().as_secs_f64() }
}

/// A back-end thread serving `connections` frontends in turn on `socket`,
/// handing the test a clone of each connection (to cut it, as a back-end
/// that dies would).
pub fn backend_with_cut(
    socket: &std::path::Path,
    device: Box<dyn VirtioDevice>,
    connections: usize,
) -> (JoinHandle<Option<Box<dyn VirtioDevice>>>, std::sync::mpsc::Receiver<UnixStream>) {
    let listener = UnixListener::bind(socket).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<UnixStream>();
    let handle = std::thread::spawn(move || {
        let mut dev = Some(device);
        for _ in 0..connections {
            let (s, _) = listener.accept().ok()?;
            tx.send(s.try_clone().ok()?).ok()?;
            dev = kickvm_vhost::serve(s, dev?);
        }
        dev
    });
    (handle, rx)
}
