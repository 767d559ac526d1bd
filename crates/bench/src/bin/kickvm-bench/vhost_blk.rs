//! vhost-user-blk at native speed: this process is the frontend and plays
//! the guest (guest RAM in a memfd shared with the back-end, the `vhost`
//! crate's `Frontend` on the socket, the test driver on the ring); the
//! back-end is a separate process serving a file in /dev/shm: `kickvm
//! backend blk`, and, as the peer, `qemu-storage-daemon`'s
//! vhost-user-blk export of the same file, started the same way in the
//! same run, runs alternating.
//!
//! Per run: IOPS and p50/p99 latency (submit to used, seen by the driver)
//! of 4 KiB random reads at queue depth 1 and 32, and the back-end's CPU
//! time per I/O (utime + stime of all its threads, from /proc/PID/stat,
//! over the measured window); then, in a second window with `perf`
//! attached, the back-end's system calls per I/O.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kickvm_virtio::driver::{DriverQueue, Guest};
use kickvm_virtio::GuestMemory;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{FileOffset, GuestAddress};

use crate::blk::{drive, Disk};
use crate::stats::us;
use crate::syscalls::SyscallCounter;

const MEM: usize = 4 << 20;
const QUEUE_SIZE: u16 = 256;
/// Where the "guest" RAM is in the frontend's address space, as the
/// back-end is told (its own mapping is elsewhere).
const USER_BASE: u64 = 0x7f00_0000_0000;

/// The two back-ends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Kickvm,
    Qsd,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Kickvm => "kickvm backend blk",
            Backend::Qsd => "qemu-storage-daemon (peer)",
        }
    }

    fn command(self, disk: &Path, socket: &Path) -> Command {
        match self {
            Backend::Kickvm => {
                let exe = std::env::current_exe().expect("own path").with_file_name("kickvm");
                let mut c = Command::new(exe);
                c.args(["backend", "blk", "--once", "--socket"]).arg(socket).arg(format!("path={}", disk.display()));
                c
            }
            Backend::Qsd => {
                let mut c = Command::new("qemu-storage-daemon");
                c.arg("--blockdev")
                    .arg(format!("driver=file,node-name=f,filename={}", disk.display()))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues=1",
                        socket.display()
                    ));
                c
            }
        }
    }
}

/// A back-end process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time (user + system, all threads) of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the
    // 3rd field, utime the 14th, stime the 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|x| x.parse().ok()).collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Duration::from_secs_f64(f.iter().sum::<u64>() as f64 / hz)
}

/// The frontend: a negotiated connection, guest RAM, one queue started.
struct Front {
    _fe: Frontend,
    guest: Guest,
    queue: DriverQueue,
}

fn connect(socket: &Path, child: &mut Child) -> Result<UnixStream, String> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() < end => {
                if let Ok(Some(st)) = child.try_wait() {
                    return Err(format!("the back-end exited ({st}) before listening"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("cannot connect to {}: {e}", socket.display())),
        }
    }
}

impl Front {
    /// Negotiates what both back-ends implement (VERSION_1, EVENT_IDX,
    /// PROTOCOL_FEATURES with REPLY_ACK), maps guest RAM, starts queue 0.
    fn start(stream: UnixStream) -> Result<Front, String> {
        fn e(what: &str) -> impl Fn(vhost::Error) -> String + '_ {
            move |err| format!("{what}: {err}")
        }
        let mut fe = Frontend::from_stream(stream, 1);
        fe.set_owner().map_err(e("SET_OWNER"))?;
        let offered = fe.get_features().map_err(e("GET_FEATURES"))?;
        let event_idx = 1u64 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
        let want = (1u64 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
            | event_idx
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features = offered & want;
        fe.set_features(features).map_err(e("SET_FEATURES"))?;
        let protocol = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if protocol {
            let pf = fe.get_protocol_features().map_err(e("GET_PROTOCOL_FEATURES"))?;
            fe.set_protocol_features(pf & VhostUserProtocolFeatures::REPLY_ACK).map_err(e("SET_PROTOCOL_FEATURES"))?;
        }
        // SAFETY: a NUL-terminated name and valid flags.
        let fd = unsafe { libc::memfd_create(c"kickvm-bench-guest".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd we own.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(MEM as u64).map_err(|err| format!("memfd size: {err}"))?;
        let file = memfd.try_clone().map_err(|err| format!("memfd: {err}"))?;
        let mem = GuestMemory::from_ranges_with_files(&[(GuestAddress(0), MEM, Some(FileOffset::new(file, 0)))])
            .map_err(|err| format!("guest memory: {err}"))?;
        let mut guest = Guest::with_memory(mem, MEM);
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: USER_BASE,
            mmap_offset: 0,
            mmap_handle: memfd.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).map_err(e("SET_MEM_TABLE"))?;
        let mut queue = DriverQueue::new(&mut guest, 0, QUEUE_SIZE);
        queue.set_event_idx(features & event_idx != 0);
        fe.set_vring_num(0, QUEUE_SIZE).map_err(e("SET_VRING_NUM"))?;
        let cfg = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: USER_BASE + queue.desc.0,
            used_ring_addr: USER_BASE + queue.used.0,
            avail_ring_addr: USER_BASE + queue.avail.0,
            log_addr: None,
        };
        fe.set_vring_addr(0, &cfg).map_err(e("SET_VRING_ADDR"))?;
        fe.set_vring_base(0, 0).map_err(e("SET_VRING_BASE"))?;
        let s = queue.setup();
        fe.set_vring_call(0, &s.call).map_err(e("SET_VRING_CALL"))?;
        fe.set_vring_kick(0, &s.kick).map_err(e("SET_VRING_KICK"))?;
        if protocol {
            fe.set_vring_enable(0, true).map_err(e("SET_VRING_ENABLE"))?;
        }
        Ok(Front { _fe: fe, guest, queue })
    }
}

/// One measurement.
struct Run {
    iops: f64,
    p50: Duration,
    p99: Duration,
    /// Back-end CPU µs per I/O.
    cpu_us: f64,
    /// Back-end system calls per I/O (all its threads), from a second,
    /// counted window (perf slows every call); `None` without perf.
    syscalls: Option<f64>,
}

/// Every thread of process `pid`.
fn tasks_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.flatten().filter_map(|t| t.file_name().to_string_lossy().parse().ok()).collect())
        .unwrap_or_default()
}

fn measure(backend: Backend, disk: &Disk, dir: &Path, qd: usize, dur: Duration) -> Result<Run, String> {
    let socket = dir.join(format!("{backend:?}-{qd}.sock"));
    let _ = std::fs::remove_file(&socket);
    let log = File::create(dir.join(format!("{backend:?}.log"))).map_err(|e| e.to_string())?;
    let child = backend
        .command(&disk.0, &socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", backend.name()))?;
    let mut p = Proc(child);
    let stream = connect(&socket, &mut p.0)?;
    let mut f = Front::start(stream).map_err(|e| format!("{}: {e}", backend.name()))?;
    // A short warm-up (page cache, thread start), then the window.
    drive(&mut f.guest, &mut f.queue, qd, Duration::from_millis(300));
    let pid = p.0.id();
    let cpu0 = cpu_time(pid);
    let mut d = drive(&mut f.guest, &mut f.queue, qd, dur);
    let cpu = cpu_time(pid).saturating_sub(cpu0);
    let counter = SyscallCounter::start(&tasks_of(pid));
    let counted = drive(&mut f.guest, &mut f.queue, qd, dur / 2);
    let syscalls = counter.and_then(|c| c.stop()).map(|n| n as f64 / counted.done.max(1) as f64);
    Ok(Run {
        iops: d.done as f64 / d.secs,
        p50: d.lat.percentile(0.5),
        p99: d.lat.percentile(0.99),
        cpu_us: cpu.as_secs_f64() * 1e6 / d.done.max(1) as f64,
        syscalls,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `reps` runs of each back-end at QD1 and QD32, alternating (kickvm,
/// peer, kickvm, peer, …); medians per figure.
pub fn run(dur: Duration, reps: usize) -> String {
    let disk = Disk::new().expect("create bench disk in /dev/shm");
    let dir: PathBuf = disk.0.with_extension("d");
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let mut out = String::from(
        "| vhost-user-blk 4 KiB random read | IOPS | p50 µs | p99 µs | back-end CPU µs / I/O | IOPS per back-end CPU-second | ratio to peer | back-end syscalls / I/O |\n|---|---|---|---|---|---|---|---|\n",
    );
    for qd in [1usize, 32] {
        let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..reps {
            for (i, b) in [Backend::Kickvm, Backend::Qsd].into_iter().enumerate() {
                match measure(b, &disk, &dir, qd, dur) {
                    Ok(r) => runs[i].push(r),
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        return format!("kickvm-bench vhost-blk: {e}\n");
                    }
                }
            }
        }
        let per_cpu = |r: &[Run]| median(r.iter().map(|x| 1e6 / x.cpu_us.max(1e-3)).collect());
        let peer = per_cpu(&runs[1]);
        for (i, b) in [Backend::Kickvm, Backend::Qsd].into_iter().enumerate() {
            let r = &runs[i];
            let m = |f: &dyn Fn(&Run) -> f64| median(r.iter().map(f).collect());
            let calls: Vec<f64> = r.iter().filter_map(|x| x.syscalls).collect();
            let calls = if calls.is_empty() { "n/a".to_string() } else { format!("{:.2}", median(calls)) };
            out += &format!(
                "| {}, QD{qd} | {:.0} | {} | {} | {:.1} | {:.0} | {:.2} | {calls} |\n",
                b.name(),
                m(&|x| x.iops),
                us(Duration::from_secs_f64(m(&|x| x.p50.as_secs_f64()))),
                us(Duration::from_secs_f64(m(&|x| x.p99.as_secs_f64()))),
                m(&|x| x.cpu_us),
                per_cpu(r),
                per_cpu(r) / peer,
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}
