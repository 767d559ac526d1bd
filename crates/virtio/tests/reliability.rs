//! Host faults and back-ends that go away, at native speed through the
//! test driver (issue 12; figures in docs/reliability.md):
//!
//! - a disk on a tiny tmpfs that fills up mid-write: the requests that
//!   do not fit fail with IOERR, everything acknowledged before reads back
//!   intact, writes work again once there is space, the queue keeps serving
//!   and logs a bounded number of lines;
//! - a disk file truncated under the device: reads past the new end fail
//!   with IOERR, the rest keeps working;
//! - a TAP deleted under a running device, or set down and up again: the
//!   guest sees its link go down (and up), the queue threads neither spin
//!   nor flood the log, and another device goes on;
//! - a console socket whose client leaves in the middle of the guest's
//!   output: the output completes, the next client gets what follows.
//!
//! The ones that mount a tmpfs or make a TAP need root; without it they
//! say why and pass.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kickvm_virtio::block::*;
use kickvm_virtio::console::{Backend, Console};
use kickvm_virtio::driver::{Buf, Harness, HarnessOpts};
use kickvm_virtio::rng::{Rng, RngConfig};

const T: Duration = Duration::from_secs(5);

// ------------------------------------------------------------- log capture

/// Every log line of this test process, so a test can count the lines its
/// own device (named uniquely) wrote.
struct Capture;

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let line = format!("{}", r.args());
            eprintln!("log: {line}");
            LINES.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    }
    fn flush(&self) {}
}

fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = log::set_logger(&Capture);
        log::set_max_level(log::LevelFilter::Warn);
    });
}

/// Log lines that mention `who` (a device name) and `what`.
fn lines_about(who: &str, what: &str) -> usize {
    LINES.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|l| l.contains(who) && l.contains(what)).count()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd).args(args).status().map(|s| s.success()).unwrap_or(false)
}

// ------------------------------------------------------------- block

/// One block request on queue 0, completed; returns (status, data read).
fn blk_io(h: &mut Harness, ty: u32, sector: u64, write: &[u8], read_len: u32) -> (u8, Vec<u8>) {
    let (status, data) = h.post_blk_request(0, ty, sector, write, read_len);
    h.queues[0].wait_used(T).expect("the request completes");
    (h.guest.read(status, 1)[0], if read_len > 0 { h.guest.read(data, read_len as usize) } else { Vec::new() })
}

fn block(name: &str, path: &Path) -> Harness {
    let dev = Block::new(name, BlockConfig::new(path)).expect("open disk");
    // Plenty of guest memory: every request allocates its buffers anew.
    Harness::start(Box::new(dev), HarnessOpts { guest_mem: 256 << 20, ..Default::default() }).expect("activate")
}

/// Block `n`'s contents: 4 KiB that say which block they are.
fn pattern(n: u64) -> Vec<u8> {
    (0..4096u64).map(|i| (n.wrapping_mul(31) ^ i.wrapping_mul(7)) as u8 | 1).collect()
}

/// A tmpfs of `size` mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(name: &str, size: &str) -> Option<Tmpfs> {
        if !is_root() {
            eprintln!("skipped: needs root to mount a tmpfs");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("kickvm-rel-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        if !run("mount", &["-t", "tmpfs", "-o", &format!("size={size}"), "kickvm-rel", dir.to_str().unwrap()]) {
            eprintln!("skipped: cannot mount a tmpfs on {}", dir.display());
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(Tmpfs(dir))
    }

    fn resize(&self, size: &str) {
        assert!(run("mount", &["-o", &format!("remount,size={size}"), self.0.to_str().unwrap()]));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", self.0.to_str().unwrap()]);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Failing spells a guest starts by alternating a good and a bad write.
const SPELLS: u64 = 300;

/// The disk file lives on a 1 MiB tmpfs but says it is 8 MiB (sparse):
/// the guest writes 4 KiB blocks until the host has no more room.
#[test]
fn a_disk_whose_host_file_system_fills_up_fails_requests_then_recovers() {
    capture_logs();
    let Some(fs) = Tmpfs::mount("full", "1M") else { return };
    let path = fs.0.join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(8 << 20).unwrap();
    let name = "blkfull";
    let mut h = block(name, &path);
    let mut rng = Harness::start(Box::new(Rng::new("rngfull", RngConfig::default()).unwrap()), HarnessOpts::default())
        .expect("rng");

    // Write until the host says no; then keep trying a while longer, as a
    // guest that retries would.
    let mut written = 0u64;
    while written < 2048 {
        let (st, _) = blk_io(&mut h, VIRTIO_BLK_T_OUT, written * 8, &pattern(written), 0);
        if st != VIRTIO_BLK_S_OK {
            assert_eq!(st, VIRTIO_BLK_S_IOERR, "a write the host cannot store fails with IOERR");
            break;
        }
        written += 1;
    }
    assert!(written > 0 && written < 2048, "the 1 MiB tmpfs took {written} 4 KiB blocks");
    for _ in 0..200 {
        let (st, _) = blk_io(&mut h, VIRTIO_BLK_T_OUT, written * 8, &pattern(written), 0);
        assert_eq!(st, VIRTIO_BLK_S_IOERR);
    }
    let lines_after_first_spell = lines_about(name, "disk I/O failed");
    // A guest that alternates a rewrite of a stored block (works) with a
    // new block (fails) starts a failing spell each time: those lines are
    // rate-limited too.
    for _ in 0..SPELLS {
        assert_eq!(blk_io(&mut h, VIRTIO_BLK_T_OUT, 0, &pattern(0), 0).0, VIRTIO_BLK_S_OK);
        assert_eq!(blk_io(&mut h, VIRTIO_BLK_T_OUT, written * 8, &pattern(written), 0).0, VIRTIO_BLK_S_IOERR);
    }
    let spell_lines = lines_about(name, "disk I/O failed");
    // Flush and reads still work; every acknowledged block is intact.
    assert_eq!(blk_io(&mut h, VIRTIO_BLK_T_FLUSH, 0, &[], 0).0, VIRTIO_BLK_S_OK);
    for n in 0..written {
        let (st, data) = blk_io(&mut h, VIRTIO_BLK_T_IN, n * 8, &[], 4096);
        assert_eq!((st, data == pattern(n)), (VIRTIO_BLK_S_OK, true), "acknowledged block {n} after the host filled up");
    }
    // Another device is not affected.
    let b = rng.guest.alloc(64, 16);
    rng.queues[0].post(&[Buf::inb(b, 64)]).unwrap();
    rng.queues[0].kick();
    assert_eq!(rng.queues[0].wait_used(T).map(|u| u.1), Some(64));

    // Space comes back: the same write now succeeds, and later ones too.
    fs.resize("16M");
    for n in written..written + 64 {
        let (st, _) = blk_io(&mut h, VIRTIO_BLK_T_OUT, n * 8, &pattern(n), 0);
        assert_eq!(st, VIRTIO_BLK_S_OK, "block {n} once the host has space again");
    }
    assert_eq!(blk_io(&mut h, VIRTIO_BLK_T_FLUSH, 0, &[], 0).0, VIRTIO_BLK_S_OK);
    let f = std::fs::File::open(&path).unwrap();
    for n in 0..written + 64 {
        let mut got = vec![0u8; 4096];
        f.read_exact_at(&mut got, n * 4096).unwrap();
        assert!(got == pattern(n), "block {n} in the host file");
    }
    assert!(!h.needs_reset(), "a full host disk is not a reason to stop the device");
    let errors = h.device.state().total().errors;
    let lines = lines_about(name, "disk I/O failed");
    eprintln!("host disk full: {written} blocks fit, {errors} failed requests counted, {lines} log lines ({spell_lines} after {} failing spells)", SPELLS + 1);
    assert_eq!(errors, 201 + SPELLS, "every failed request is counted");
    assert!(spell_lines <= 20, "{spell_lines} log lines for {} failing spells: rate-limited", SPELLS + 1);
    assert_eq!(lines, spell_lines, "no line once the host has space again");
    assert!(lines_after_first_spell == 1, "one line for a spell of 201 failures, not {lines_after_first_spell}");
}

/// The disk's file is cut to half its size while the device serves it:
/// reads past the new end fail with IOERR (the device never returns
/// invented zeroes as data it did not read), reads before it and writes
/// anywhere in the disk work, and growing the file back heals it.
#[test]
fn a_disk_file_truncated_under_the_device() {
    capture_logs();
    let dir = std::env::temp_dir().join(format!("kickvm-rel-{}-trunc", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.img");
    std::fs::write(&path, (0..64u64).flat_map(pattern).collect::<Vec<u8>>()).unwrap();
    let name = "blktrunc";
    let mut h = block(name, &path);
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(32 * 4096).unwrap();

    let (st, data) = blk_io(&mut h, VIRTIO_BLK_T_IN, 0, &[], 4096);
    assert_eq!((st, data == pattern(0)), (VIRTIO_BLK_S_OK, true), "before the cut");
    assert_eq!(blk_io(&mut h, VIRTIO_BLK_T_IN, 40 * 8, &[], 4096).0, VIRTIO_BLK_S_IOERR, "past the cut");
    assert_eq!(blk_io(&mut h, VIRTIO_BLK_T_OUT, 63 * 8, &pattern(63), 0).0, VIRTIO_BLK_S_OK, "write at the disk's end");
    let (st, data) = blk_io(&mut h, VIRTIO_BLK_T_IN, 63 * 8, &[], 4096);
    assert_eq!((st, data == pattern(63)), (VIRTIO_BLK_S_OK, true), "the written block reads back");
    assert_eq!(blk_io(&mut h, VIRTIO_BLK_T_FLUSH, 0, &[], 0).0, VIRTIO_BLK_S_OK);
    assert!(!h.needs_reset());
    assert_eq!(h.device.state().total().errors, 1);
    assert_eq!(lines_about(name, "disk I/O failed"), 1, "one line for the one failed read");
    drop(h);
    let _ = std::fs::remove_dir_all(dir);
}

// ------------------------------------------------------------- net

/// CPU time (user + system, in clock ticks) of this process's threads
/// named `name`.
fn thread_ticks(name: &str) -> u64 {
    let mut total = 0;
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let after = stat.rsplit_once(") ").map(|x| x.1).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        total += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    total
}

/// Root and /dev/net/tun, or a printed reason to skip.
fn can_make_taps() -> bool {
    let ok = is_root() && Path::new("/dev/net/tun").exists();
    if !ok {
        eprintln!("skipped: needs root and /dev/net/tun");
    }
    ok
}

/// A private network namespace for this thread (and the queue threads it
/// starts), so the TAPs a test makes are its alone; left (and deleted)
/// when dropped, also on a failed assertion.
struct OwnNetns {
    name: String,
    home: std::fs::File,
}

impl OwnNetns {
    fn enter(tag: &str) -> OwnNetns {
        use std::os::fd::AsRawFd;
        let name = format!("kvrel-{tag}-{}", std::process::id());
        assert!(run("ip", &["netns", "add", &name]), "ip netns add {name}");
        let home = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
        let target = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
        // SAFETY: setns on this thread with a valid namespace fd.
        assert_eq!(unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        OwnNetns { name, home }
    }
}

impl Drop for OwnNetns {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: back to the namespace the thread started in.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A net device on a new TAP `tap` that is up, as the guest's driver
/// starts it (threads as `mode` says, on `runtime` if given), with 16
/// receive buffers posted.
fn start_net(name: &str, tap: &str, runtime: Option<std::sync::Arc<kickvm_virtio::Runtime>>) -> Harness {
    use kickvm_virtio::net::{NetConfig, NetDevice};
    let dev = NetDevice::new(NetConfig { name: name.into(), tap: tap.into(), ..NetConfig::default() }).expect("TAP");
    assert!(run("ip", &["link", "set", tap, "up"]), "set the TAP up");
    let mut h = match runtime {
        Some(r) => Harness::start_with_runtime(Box::new(dev), HarnessOpts::default(), r),
        None => Harness::start(Box::new(dev), HarnessOpts::default()),
    }
    .expect("activate");
    for _ in 0..16 {
        let a = h.guest.alloc(2048, 64);
        h.queues[0].post(&[Buf::inb(a, 2048)]).unwrap();
    }
    h.queues[0].kick();
    h
}

/// Runs `test` in per-queue and in `single` threading mode, each time in
/// a network namespace of its own with a net device `<prefix><i>` on a
/// new TAP `<prefix>tap<i>` (started by [`start_net`]) and the runtime it
/// runs on. Skips (with the reason) without root or /dev/net/tun.
fn in_each_mode(
    prefix: &str,
    mut test: impl FnMut(usize, kickvm_virtio::ThreadingMode, String, String, &std::sync::Arc<kickvm_virtio::Runtime>, Harness),
) {
    use kickvm_virtio::{Runtime, ThreadingMode};
    capture_logs();
    if !can_make_taps() {
        return;
    }
    for (i, mode) in [ThreadingMode::PerQueue, ThreadingMode::Single].into_iter().enumerate() {
        let _ns = OwnNetns::enter(&format!("{prefix}{i}"));
        let (name, tap) = (format!("{prefix}{i}"), format!("{prefix}tap{i}"));
        let runtime = Runtime::new(mode);
        let h = start_net(&name, &tap, Some(runtime.clone()));
        test(i, mode, name, tap, &runtime, h);
    }
}

/// VIRTIO_NET_S_LINK_UP in the `status` the driver reads (offset 6 of
/// `virtio_net_config`, after the MAC).
fn link_up(h: &Harness) -> bool {
    let mut b = [0u8; 2];
    h.device.read_config(6, &mut b);
    u16::from_le_bytes(b) & 1 != 0
}

/// Configuration-change interrupts raised since the last call.
fn config_interrupts(h: &Harness) -> u64 {
    h.config_call.read().unwrap_or(0)
}

/// Waits up to [`T`] for `cond`.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + T;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// Sends one 60-byte frame on transmit queue 1 and waits for it to
/// complete.
fn send_frame(h: &mut Harness) {
    let frame = h.guest.alloc_bytes(&[0u8; 12 + 60]);
    h.queues[1].post(&[Buf::out(frame, 72)]).unwrap();
    h.queues[1].kick();
    assert!(h.queues[1].wait_used(T).is_some(), "a packet sent completes");
}

/// An rng on `runtime` (a thread of its own, or the shared one) serves a
/// request.
fn rng_serves(runtime: &std::sync::Arc<kickvm_virtio::Runtime>, name: &str, mode: kickvm_virtio::ThreadingMode) -> Harness {
    let opts = HarnessOpts { mode, ..HarnessOpts::default() };
    let mut rng =
        Harness::start_with_runtime(Box::new(Rng::new(name, RngConfig::default()).unwrap()), opts, runtime.clone())
            .expect("rng");
    let b = rng.guest.alloc(64, 16);
    rng.queues[0].post(&[Buf::inb(b, 64)]).unwrap();
    rng.queues[0].kick();
    assert_eq!(rng.queues[0].wait_used(T).map(|u| u.1), Some(64), "{mode:?}: the rng serves");
    rng
}

/// A TAP deleted (`ip link del`) under a running device whose receive queue
/// waits on it with buffers posted, while the guest goes on sending, in
/// each threading mode: the guest is told the link is down
/// (VIRTIO_NET_S_LINK_UP cleared, a configuration interrupt), the threads
/// do not spin, one line is logged, a packet sent meanwhile completes
/// (lost, counted), an rng on the same runtime (in `single` mode the same
/// thread) serves on, and a reset ends in bounded time.
#[test]
fn a_tap_deleted_under_a_running_device() {
    use kickvm_virtio::ThreadingMode;
    in_each_mode("kvrel", |i, mode, name, tap, runtime, mut h| {
        let name = name.as_str();
        std::thread::sleep(Duration::from_millis(100));
        assert!(link_up(&h), "{mode:?}: the link is up while the TAP is");
        let _ = config_interrupts(&h);
        assert!(run("ip", &["link", "del", &tap]), "delete the TAP");
        // The receive thread, asleep in its read, wakes (EFAULT).
        assert!(eventually(|| !link_up(&h)), "{mode:?}: the guest sees the link down");
        assert!(config_interrupts(&h) >= 1, "{mode:?}: a configuration interrupt told the driver");
        let threads = match mode {
            ThreadingMode::PerQueue => vec![format!("{name}-q0"), format!("{name}-q1")],
            _ => vec!["kickvm-io".to_string()],
        };
        let ticks = || threads.iter().map(|t| thread_ticks(t)).sum::<u64>();
        let t0 = Instant::now();
        let ticks0 = ticks();
        // The guest keeps sending: each packet completes, lost and counted.
        for _ in 0..50 {
            send_frame(&mut h);
            std::thread::sleep(Duration::from_millis(20));
        }
        let busy = ticks() - ticks0;
        let wall_ticks = t0.elapsed().as_secs_f64() * 100.0;
        let errors = h.device.state().total().errors;
        let lines = lines_about(name, "TAP");
        eprintln!(
            "{mode:?}: TAP deleted: queue threads used {busy} ticks of CPU in {wall_ticks:.0}; {errors} errors counted, {lines} log lines"
        );
        assert!((busy as f64) < wall_ticks * 0.2, "{mode:?}: the queue threads spin on a deleted TAP: {busy} of {wall_ticks:.0} ticks");
        assert!(errors >= 50, "{mode:?}: the lost packets are counted");
        assert_eq!(lines, 1, "{mode:?}: one log line for a deleted TAP ({errors} errors)");
        assert!(!link_up(&h), "{mode:?}: a deleted TAP does not come back");
        // Another device goes on; a reset of this one ends in bounded time.
        let _rng = rng_serves(runtime, &format!("rngdel{i}"), mode);
        let t = Instant::now();
        h.reset();
        assert!(t.elapsed() < Duration::from_millis(500), "{mode:?}: reset took {:?}", t.elapsed());
    });
}

/// A TAP set down under a running device, then up again, in each
/// threading mode: the first packet that fails (`EIO`) turns the link down
/// for the guest (status and a configuration interrupt), the device looks
/// at the TAP while the guest sends nothing and turns the link up again
/// when it is, packets flow both ways after that, and one line is logged
/// for the spell. In `single` mode an rng on the same thread serves on
/// throughout.
#[test]
fn a_tap_set_down_and_up_again_turns_the_guests_link_off_and_on() {
    in_each_mode("kvdown", |i, mode, name, tap, runtime, mut h| {
        let mut rng = rng_serves(runtime, &format!("rngdown{i}"), mode);
        send_frame(&mut h);
        assert!(link_up(&h), "{mode:?}: the link is up while the TAP is");
        let _ = config_interrupts(&h);
        let errors0 = h.device.state().total().errors;
        assert_eq!(errors0, 0, "{mode:?}: no errors while the TAP works");

        assert!(run("ip", &["link", "set", &tap, "down"]), "set the TAP down");
        send_frame(&mut h);
        assert!(eventually(|| !link_up(&h)), "{mode:?}: the guest sees the link down after a failed send");
        assert!(config_interrupts(&h) >= 1, "{mode:?}: a configuration interrupt told the driver");
        // While it is down the guest sends nothing; the rng (in `single`
        // mode on the same thread) serves on.
        for _ in 0..5 {
            let b = rng.guest.alloc(64, 16);
            rng.queues[0].post(&[Buf::inb(b, 64)]).unwrap();
            rng.queues[0].kick();
            assert_eq!(rng.queues[0].wait_used(T).map(|u| u.1), Some(64), "{mode:?}: the rng serves on");
            std::thread::sleep(Duration::from_millis(60));
        }
        assert!(!link_up(&h), "{mode:?}: the link stays down while the TAP is");

        assert!(run("ip", &["link", "set", &tap, "up"]), "set the TAP up again");
        let t = Instant::now();
        assert!(eventually(|| link_up(&h)), "{mode:?}: the guest sees the link up again");
        let took = t.elapsed();
        assert!(config_interrupts(&h) >= 1, "{mode:?}: a configuration interrupt told the driver");
        // Both ways again: a frame out, and the host's own traffic (an ARP
        // request for a neighbour on the TAP's subnet) into the guest's
        // receive buffers.
        let bytes_out = h.device.state().queue(1).bytes;
        send_frame(&mut h);
        assert!(h.device.state().queue(1).bytes > bytes_out, "{mode:?}: a frame goes out again");
        assert!(run("ip", &["addr", "add", "10.77.200.1/24", "dev", &tap]));
        let sock = std::net::UdpSocket::bind("10.77.200.1:0").expect("udp socket in the namespace");
        let _ = sock.send_to(b"hello", "10.77.200.2:9");
        assert!(h.queues[0].wait_used(T).is_some(), "{mode:?}: a packet from the host reaches the guest again");
        let errors = h.device.state().total().errors - errors0;
        let lines = lines_about(&name, "TAP");
        eprintln!("{mode:?}: TAP down then up: link up again {took:?} after `ip link set up`; {errors} errors, {lines} log lines");
        assert_eq!(lines, 1, "{mode:?}: one warning for the spell");
    });
}

// ------------------------------------------------------------- console

/// A console socket client reads part of a large burst of guest output and
/// disconnects: the guest's output still completes (the rest is dropped,
/// not an error), and the next client to connect gets the output that
/// follows, and its input reaches the guest.
#[test]
fn a_console_socket_client_leaves_mid_output_and_another_connects() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    capture_logs();
    let path = std::env::temp_dir().join(format!("kickvm-rel-{}.sock", std::process::id()));
    let c = Console::new("conrel", Backend::Socket(path.clone())).expect("console socket");
    let mut h = Harness::start(Box::new(c), HarnessOpts::default()).expect("activate");
    let (rx, tx) = (0usize, 1usize);
    let post_rx = |h: &mut Harness| {
        let a = h.guest.alloc(64, 16);
        h.queues[rx].post(&[Buf::inb(a, 64)]).unwrap();
        h.queues[rx].kick();
        a
    };
    post_rx(&mut h);
    let mut first = UnixStream::connect(&path).unwrap();
    first.set_read_timeout(Some(T)).unwrap();
    // Input from the client lands in the guest: the device has taken it as
    // its client (output before that is dropped, as with no client).
    first.write_all(b"hi").unwrap();
    h.queues[rx].wait_used(T).expect("the first client's input reaches the guest");
    post_rx(&mut h);
    // 4 MiB of output in 64 KiB chains: far more than a socket buffer.
    let chunk = vec![b'x'; 64 << 10];
    let a = h.guest.alloc_bytes(&chunk);
    let mut posted = 0u64;
    for _ in 0..64 {
        while h.queues[tx].pop_used().is_some() {}
        if h.queues[tx].post(&[Buf::out(a, chunk.len() as u32)]).is_some() {
            posted += 1;
        }
        h.queues[tx].kick();
    }
    let mut got = vec![0u8; 100_000];
    first.read_exact(&mut got).unwrap();
    drop(first);
    // Every chain completes although the reader is gone.
    let end = Instant::now() + T;
    while h.device.state().queue(tx).chains < posted && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(h.device.state().queue(tx).chains, posted, "output completes after the client left");
    // The next client: output and input flow again.
    let mut second = UnixStream::connect(&path).unwrap();
    second.set_read_timeout(Some(T)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let rx_buf = post_rx(&mut h);
    second.write_all(b"hello").unwrap();
    let (_, len) = h.queues[rx].wait_used(T).expect("the new client's input reaches the guest");
    let _ = rx_buf;
    assert!(len > 0);
    let b = h.guest.alloc_bytes(b"after\n");
    h.queues[tx].post(&[Buf::out(b, 6)]).unwrap();
    h.queues[tx].kick();
    let mut buf = [0u8; 6];
    second.read_exact(&mut buf).expect("the new client gets the output that follows");
    assert_eq!(&buf, b"after\n");
    assert_eq!(h.device.state().total().errors, 0, "a client leaving is not an error");
    assert!(!h.needs_reset());
    drop(h);
}

// ------------------------------------------------------------- write cache

/// Runs inside `write_through_disks_sync_every_write_before_completing`
/// under strace: one write with the cache mode of `KICKVM_WT_MODE`.
#[test]
#[ignore = "run by write_through_disks_sync_every_write_before_completing under strace"]
fn write_through_child() {
    let disk = PathBuf::from(std::env::var("KICKVM_WT_DISK").expect("set by the parent test"));
    let mode = std::env::var("KICKVM_WT_MODE").expect("set by the parent test");
    const FLUSH: u64 = 1 << 9;
    let mut dev = Block::new("blkwt", BlockConfig::new(&disk)).unwrap();
    let driver_features = if mode == "no-flush" { !FLUSH } else { !0 };
    if mode == "wce-off" {
        // What Linux does for `echo "write through" > /sys/block/vda/cache_type`.
        kickvm_virtio::VirtioDevice::write_config(&mut dev, 32, &[0]);
    }
    let mut h = Harness::start(Box::new(dev), HarnessOpts { driver_features, ..Default::default() }).unwrap();
    eprintln!("WRITE-START");
    assert_eq!(blk_io(&mut h, VIRTIO_BLK_T_OUT, 0, &[7; 4096], 0).0, VIRTIO_BLK_S_OK);
    eprintln!("WRITE-DONE");
}

/// A driver that did not accept FLUSH, or turned the write cache off
/// (CONFIG_WCE `writeback` = 0), is told a write is done only after
/// `fdatasync`; with the cache on (the default) a write does not sync.
#[test]
fn write_through_disks_sync_every_write_before_completing() {
    if Command::new("strace").arg("-V").output().is_err() {
        eprintln!("skipped: strace is not installed (scripts/install-deps.sh installs it)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("kickvm-rel-{}-wt", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    for (mode, syncs) in [("no-flush", true), ("wce-off", true), ("write-back", false)] {
        let out = Command::new("strace")
            .args(["-f", "-e", "trace=fdatasync,write", "-e", "signal=none", "--"])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", "write_through_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env("KICKVM_WT_DISK", &disk)
            .env("KICKVM_WT_MODE", mode)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{mode}: child failed:\n{log}");
        let start = log.find("WRITE-START").expect("marker");
        let done = log[start..].find("WRITE-DONE").map(|i| i + start).expect("marker");
        let synced = log[start..done].contains("fdatasync(");
        assert_eq!(synced, syncs, "{mode}: fdatasync between the write and its completion:\n{}", &log[start..done]);
    }
    let _ = std::fs::remove_dir_all(dir);
}
