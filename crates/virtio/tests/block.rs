//! virtio-blk against real files.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use kickvm_virtio::block::*;
use kickvm_virtio::driver::{Harness, HarnessOpts};
use kickvm_virtio::ThreadingMode;
use vm_memory::GuestAddress;

const T: Duration = Duration::from_secs(5);

struct Disk {
    dir: PathBuf,
    path: PathBuf,
}

impl Disk {
    /// A real file of `size` bytes filled with a pattern, under /dev/shm
    /// when possible (or the target dir).
    fn new(name: &str, size: usize) -> Disk {
        let base = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("kickvm-blk-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        let mut f = std::fs::File::create(&path).unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i / 512) as u8 ^ 0x5a).collect();
        f.write_all(&data).unwrap();
        Disk { dir, path }
    }
    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        std::fs::File::open(&self.path).unwrap().read_exact_at(&mut v, offset).unwrap();
        v
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(disk: &Disk, cfg: impl FnOnce(&mut BlockConfig)) -> Harness {
    let mut c = BlockConfig::new(&disk.path);
    cfg(&mut c);
    let dev = Block::new("blk0", c).expect("open disk");
    Harness::start(Box::new(dev), HarnessOpts::default()).expect("activate")
}

/// Posts one request on queue `qi`; returns (status address, data address).
fn request(h: &mut Harness, qi: usize, ty: u32, sector: u64, data: &[u8], read_len: u32) -> (GuestAddress, GuestAddress) {
    h.post_blk_request(qi, ty, sector, data, read_len)
}

fn complete(h: &mut Harness, qi: usize, status: GuestAddress) -> (u8, u32) {
    let (_, len) = h.queues[qi].wait_used(T).expect("request completes");
    (h.guest.read(status, 1)[0], len)
}

#[test]
fn data_written_through_the_device_is_in_the_file_and_reads_back() {
    for mode in [ThreadingMode::PerQueue, ThreadingMode::PerDevice, ThreadingMode::Single] {
        let disk = Disk::new(&format!("rw-{mode}"), 1 << 20);
        let dev = Block::new("blk0", BlockConfig::new(&disk.path)).unwrap();
        let mut h = Harness::start(Box::new(dev), HarnessOpts { mode, ..Default::default() }).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        let (st, _) = request(&mut h, 0, VIRTIO_BLK_T_OUT, 10, &data, 0);
        assert_eq!(complete(&mut h, 0, st), (VIRTIO_BLK_S_OK, 1), "{mode}");
        assert_eq!(disk.read(10 * 512, 8192), data, "{mode}: data is in the file");
        assert_eq!(disk.read(9 * 512, 512), vec![9u8 ^ 0x5a; 512], "{mode}: neighbours untouched");
        let (st, buf) = request(&mut h, 0, VIRTIO_BLK_T_IN, 10, &[], 8192);
        assert_eq!(complete(&mut h, 0, st), (VIRTIO_BLK_S_OK, 8193), "{mode}");
        assert_eq!(h.guest.read(buf, 8192), data, "{mode}");
        let c = h.device.state().queue(0);
        assert_eq!((c.chains, c.bytes, c.errors), (2, 16384, 0), "{mode}");
    }
}

#[test]
fn read_only_disk_refuses_writes() {
    let disk = Disk::new("ro", 64 * 1024);
    let mut h = start(&disk, |c| c.readonly = true);
    assert_ne!(h.features & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    let before = disk.read(0, 4096);
    let (st, _) = request(&mut h, 0, VIRTIO_BLK_T_OUT, 0, &[0u8; 4096], 0);
    assert_eq!(complete(&mut h, 0, st).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(disk.read(0, 4096), before);
    let (st, _) = request(&mut h, 0, VIRTIO_BLK_T_IN, 0, &[], 512);
    assert_eq!(complete(&mut h, 0, st).0, VIRTIO_BLK_S_OK, "reads still work");
    assert_eq!(h.device.state().queue(0).errors, 1);
}

#[test]
fn out_of_range_and_malformed_requests_fail_without_touching_data() {
    let disk = Disk::new("range", 64 * 1024);
    let mut h = start(&disk, |_| {});
    let cases: [(u32, u64, usize, u32); 5] = [
        (VIRTIO_BLK_T_OUT, 127, 1024, 0),      // crosses the end
        (VIRTIO_BLK_T_OUT, u64::MAX / 256, 512, 0), // offset overflows
        (VIRTIO_BLK_T_IN, 128, 0, 512),        // just past the end
        (VIRTIO_BLK_T_OUT, 0, 100, 0),         // not whole sectors
        (99, 0, 0, 0),                         // unknown type
    ];
    for (i, (ty, sector, wlen, rlen)) in cases.into_iter().enumerate() {
        let (st, _) = request(&mut h, 0, ty, sector, &vec![0xee; wlen], rlen);
        let want = if ty == 99 { VIRTIO_BLK_S_UNSUPP } else { VIRTIO_BLK_S_IOERR };
        assert_eq!(complete(&mut h, 0, st).0, want, "case {i}");
    }
    assert_eq!(std::fs::metadata(&disk.path).unwrap().len(), 64 * 1024, "file did not grow");
    assert!(!disk.read(0, 64 * 1024).contains(&0xee), "nothing written");
    assert_eq!(h.device.state().queue(0).errors, 5);
}

#[test]
fn get_id_returns_the_serial() {
    let disk = Disk::new("id", 4096);
    let mut h = start(&disk, |c| c.serial = Some("kickvm-serial-1".into()));
    let (st, buf) = request(&mut h, 0, VIRTIO_BLK_T_GET_ID, 0, &[], 20);
    assert_eq!(complete(&mut h, 0, st), (VIRTIO_BLK_S_OK, 21));
    assert_eq!(&h.guest.read(buf, 20)[..15], b"kickvm-serial-1");
}

fn segment(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = sector.to_le_bytes().to_vec();
    s.extend(sectors.to_le_bytes());
    s.extend(flags.to_le_bytes());
    s
}

#[test]
fn discard_and_write_zeroes_zero_the_range() {
    let disk = Disk::new("zero", 64 * 1024);
    let mut h = start(&disk, |_| {});
    let (st, _) = request(&mut h, 0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &segment(2, 4, 0), 0);
    assert_eq!(complete(&mut h, 0, st).0, VIRTIO_BLK_S_OK);
    assert_eq!(disk.read(1024, 2048), vec![0; 2048]);
    assert_eq!(disk.read(3072, 512), vec![6 ^ 0x5a; 512]);
    let (st, _) = request(&mut h, 0, VIRTIO_BLK_T_DISCARD, 0, &[segment(8, 8, 0), segment(32, 8, 0)].concat(), 0);
    assert_eq!(complete(&mut h, 0, st).0, VIRTIO_BLK_S_OK);
    assert_eq!(disk.read(8 * 512, 4096), vec![0; 4096]);
    assert_eq!(disk.read(32 * 512, 4096), vec![0; 4096]);
    let (st, _) = request(&mut h, 0, VIRTIO_BLK_T_DISCARD, 0, &segment(120, 16, 0), 0);
    assert_eq!(complete(&mut h, 0, st).0, VIRTIO_BLK_S_IOERR, "segment past the end");
}

#[test]
fn several_queues_serve_in_parallel_threads() {
    let disk = Disk::new("mq", 1 << 20);
    let mut h = start(&disk, |c| c.num_queues = 4);
    assert_eq!(h.queues.len(), 4);
    let mut sts = Vec::new();
    for qi in 0..4 {
        sts.push(request(&mut h, qi, VIRTIO_BLK_T_OUT, qi as u64 * 8, &[qi as u8 + 1; 4096], 0).0);
    }
    for (qi, st) in sts.into_iter().enumerate() {
        assert_eq!(complete(&mut h, qi, st).0, VIRTIO_BLK_S_OK);
        assert_eq!(disk.read(qi as u64 * 4096, 4096), vec![qi as u8 + 1; 4096]);
        assert_eq!(h.device.state().queue(qi).chains, 1);
    }
    let names = thread_names();
    for qi in 0..4 {
        assert!(names.contains(&format!("blk0-q{qi}")), "thread blk0-q{qi} in {names:?}");
    }
}

fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

#[test]
fn o_direct_reads_and_writes() {
    let disk = Disk::new("direct", 1 << 20);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("direct-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // tmpfs does not support O_DIRECT; use a file on the target's disk.
    let path = dir.join("disk.img");
    std::fs::copy(&disk.path, &path).unwrap();
    let mut c = BlockConfig::new(&path);
    c.direct = true;
    let dev = match Block::new("blk0", c) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipping: O_DIRECT not supported on {}: {e}", dir.display());
            return;
        }
    };
    let mut h = Harness::start(Box::new(dev), HarnessOpts::default()).unwrap();
    let (st, _) = request(&mut h, 0, VIRTIO_BLK_T_OUT, 8, &[0x77; 4096], 0);
    assert_eq!(complete(&mut h, 0, st).0, VIRTIO_BLK_S_OK);
    let (st, buf) = request(&mut h, 0, VIRTIO_BLK_T_IN, 8, &[], 4096);
    assert_eq!(complete(&mut h, 0, st).0, VIRTIO_BLK_S_OK);
    assert_eq!(h.guest.read(buf, 4096), vec![0x77; 4096]);
    let mut v = vec![0u8; 4096];
    std::fs::File::open(&path).unwrap().read_exact_at(&mut v, 4096).unwrap();
    assert_eq!(v, vec![0x77; 4096]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs inside `flush_calls_fdatasync_before_completing` under strace.
#[test]
#[ignore = "run by flush_calls_fdatasync_before_completing under strace"]
fn flush_child() {
    let disk = PathBuf::from(std::env::var("KICKVM_FLUSH_DISK").expect("set by the parent test"));
    let dev = Block::new("blk0", BlockConfig::new(&disk)).unwrap();
    let mut h = Harness::start(Box::new(dev), HarnessOpts::default()).unwrap();
    let (st, _) = request(&mut h, 0, VIRTIO_BLK_T_OUT, 0, &[1; 512], 0);
    assert_eq!(complete(&mut h, 0, st).0, VIRTIO_BLK_S_OK);
    eprintln!("FLUSH-START");
    let (st, _) = request(&mut h, 0, VIRTIO_BLK_T_FLUSH, 0, &[], 0);
    assert_eq!(complete(&mut h, 0, st).0, VIRTIO_BLK_S_OK);
    eprintln!("FLUSH-DONE");
}

#[test]
fn flush_calls_fdatasync_before_completing() {
    if std::process::Command::new("strace").arg("-V").output().is_err() {
        eprintln!("skipping: strace is not installed (scripts/install-deps.sh installs it)");
        return;
    }
    let disk = Disk::new("flush", 4096);
    let out = std::process::Command::new("strace")
        .args(["-f", "-e", "trace=fdatasync,write", "-e", "signal=none", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "flush_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("KICKVM_FLUSH_DISK", &disk.path)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{log}");
    let start = log.find("FLUSH-START").expect("marker");
    let sync = log[start..].find("fdatasync(").map(|i| i + start).expect("fdatasync called for the flush");
    let done = log[start..].find("FLUSH-DONE").map(|i| i + start).unwrap();
    assert!(sync < done, "fdatasync happened before the flush completed");
    let before = log[..start].matches("fdatasync(").count();
    assert_eq!(before, 0, "writes alone do not sync");
}
