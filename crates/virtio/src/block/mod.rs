//! virtio-blk over a file (or a host block device): `preadv`/`pwritev`
//! straight between the file and the guest's buffers, `fdatasync` before a
//! flush completes, discard and write-zeroes with `fallocate`.
//!
//! Each queue has its own thread; all share the file (positional I/O needs
//! no lock).

mod request;

pub use request::*;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::chain::Chain;
use crate::counters::DeviceCounters;
use crate::device::{ActivateError, VirtioDevice, COMMON_FEATURES};
use crate::threads::{QueueWorker, Wait};
use crate::memory::GuestIovecs;
use crate::queue::{QueueCtx, Stopped};
use crate::sys;

pub const VIRTIO_ID_BLOCK: u32 = 2;
const QUEUE_SIZE: u16 = 256;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

/// Size of the device configuration space we describe.
const CONFIG_LEN: usize = 60;
/// Largest discard / write-zeroes request, in sectors (advertised).
const MAX_DISCARD_SECTORS: u32 = u32::MAX / SECTOR_SIZE as u32;

/// How to serve a disk.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// Answer to GET_ID (at most 20 bytes; default: the file name).
    pub serial: Option<String>,
    pub num_queues: u16,
    /// Open with `O_DIRECT` (bypass the host page cache).
    pub direct: bool,
}

impl BlockConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        BlockConfig { path: path.into(), readonly: false, serial: None, num_queues: 1, direct: false }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk {path}: {err}")]
    Open { path: PathBuf, err: io::Error },
    #[error("cannot find the size of disk {path}: {err}")]
    Size { path: PathBuf, err: io::Error },
    #[error("disk {0} has {1} queues: use 1 to 64")]
    Queues(PathBuf, u16),
}

pub struct Block {
    name: String,
    file: Arc<File>,
    capacity: u64,
    readonly: bool,
    id: [u8; ID_LEN],
    num_queues: u16,
    counters: Arc<DeviceCounters>,
}

impl Block {
    pub fn new(name: &str, cfg: BlockConfig) -> Result<Block, BlockError> {
        if cfg.num_queues == 0 || cfg.num_queues > 64 {
            return Err(BlockError::Queues(cfg.path, cfg.num_queues));
        }
        let mut opts = OpenOptions::new();
        opts.read(true).write(!cfg.readonly);
        if cfg.direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts
            .open(&cfg.path)
            .map_err(|err| BlockError::Open { path: cfg.path.clone(), err })?;
        let capacity = disk_size(&file).map_err(|err| BlockError::Size { path: cfg.path.clone(), err })?
            / SECTOR_SIZE
            * SECTOR_SIZE;
        let mut id = [0u8; ID_LEN];
        let serial = cfg.serial.clone().unwrap_or_else(|| {
            cfg.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        });
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Block {
            name: name.to_string(),
            file: Arc::new(file),
            capacity,
            readonly: cfg.readonly,
            id,
            num_queues: cfg.num_queues,
            counters: DeviceCounters::new(cfg.num_queues.into()),
        })
    }

    /// Disk size in bytes (whole sectors).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&(self.capacity / SECTOR_SIZE).to_le_bytes());
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&(MAX_SEGMENTS as u32).to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&(MAX_SEGMENTS as u32).to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

fn disk_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    // Works for regular files and block devices alike.
    let mut f = file;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

impl VirtioDevice for Block {
    fn name(&self) -> &str {
        &self.name
    }
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; self.num_queues.into()]
    }
    fn features(&self) -> u64 {
        let mut f = COMMON_FEATURES | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
        if self.num_queues > 1 {
            f |= VIRTIO_BLK_F_MQ;
        }
        if self.readonly {
            f |= VIRTIO_BLK_F_RO;
        } else {
            f |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset).ok().and_then(|o| c.get(o + i)).copied().unwrap_or(0);
        }
    }
    fn activate(&mut self, _features: u64) -> Result<Vec<Box<dyn QueueWorker>>, ActivateError> {
        Ok((0..self.num_queues)
            .map(|_| {
                Box::new(RequestQueue {
                    file: self.file.clone(),
                    capacity: self.capacity,
                    readonly: self.readonly,
                    id: self.id,
                }) as Box<dyn QueueWorker>
            })
            .collect())
    }
    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }
}

struct RequestQueue {
    file: Arc<File>,
    capacity: u64,
    readonly: bool,
    id: [u8; ID_LEN],
}

impl QueueWorker for RequestQueue {
    fn serve(&mut self, q: &mut QueueCtx) -> Result<Wait, Stopped> {
        while let Some(chain) = q.pop() {
            self.handle(q, &chain)?;
        }
        Ok(Wait::Kick)
    }
}

impl RequestQueue {
    /// Executes one request and completes it with its status.
    fn handle(&self, q: &mut QueueCtx, chain: &Chain) -> Result<(), Stopped> {
        let (status_buf, parsed) = Request::parse(chain, self.capacity);
        let Some(status_buf) = status_buf else {
            q.fail_chain(chain.head, &RequestError::NoStatus.to_string());
            return Ok(());
        };
        let (status, written) = match parsed {
            Err(e) => {
                q.count_error(&e.to_string());
                (VIRTIO_BLK_S_IOERR, 0)
            }
            Ok(req) => match self.execute(q, &req)? {
                Ok(written) => (VIRTIO_BLK_S_OK, written),
                Err(status) => (status, 0),
            },
        };
        status_buf.write_at(0, &[status]);
        // The chain holds at most 4 GiB, status byte included.
        q.add_used(chain.head, u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX));
        Ok(())
    }

    /// Returns bytes written into the guest's buffers, or a failure status.
    fn execute(&self, q: &QueueCtx, req: &Request) -> Result<Result<u64, u8>, Stopped> {
        let fd = self.file.as_raw_fd();
        let writes = matches!(req.kind, Kind::Write { .. } | Kind::Discard(_) | Kind::WriteZeroes(_));
        if writes && self.readonly {
            q.count_error("write to a read-only disk");
            return Ok(Err(VIRTIO_BLK_S_IOERR));
        }
        let r = match &req.kind {
            Kind::Read { offset } => {
                transfer(q, &req.data, *offset, |iov, off| sys::preadv(fd, iov, off))?.inspect(|&n| {
                    q.add_bytes(n);
                })
            }
            Kind::Write { offset } => {
                transfer(q, &req.data, *offset, |iov, off| sys::pwritev(fd, iov, off))?.map(|n| {
                    q.add_bytes(n);
                    0
                })
            }
            // SAFETY: fdatasync on the disk's own open fd.
            Kind::Flush => cvt(unsafe { libc::fdatasync(fd) }).map(|_| 0),
            Kind::GetId => Ok(req.data.write_at(0, &self.id) as u64),
            Kind::Discard(segs) => each_segment(q, segs, |s| punch_hole(fd, s))?.map(|_| 0),
            Kind::WriteZeroes(segs) => each_segment(q, segs, |s| write_zeroes(q, &self.file, s))?.map(|_| 0),
            Kind::Unsupported(t) => {
                q.count_error(&format!("unsupported block request type {t}"));
                return Ok(Err(VIRTIO_BLK_S_UNSUPP));
            }
        };
        Ok(r.map_err(|e| {
            q.count_error(&format!("disk I/O failed: {e}"));
            VIRTIO_BLK_S_IOERR
        }))
    }
}

/// Bytes moved by one system call at most. A request may be as large as
/// the disk (up to 4 GiB); in slices this size a reset or shutdown waits
/// for one slice, not for the whole request. Linux's requests are far
/// smaller (`max_sectors_kb` defaults to 1280), so they take one call.
const MAX_IO_BYTES: u64 = 16 << 20;

/// Runs positional I/O until all of `iov` is transferred (short reads and
/// writes happen), retrying on EINTR unless the thread must stop.
fn transfer(
    q: &QueueCtx,
    iov: &GuestIovecs,
    offset: u64,
    mut op: impl FnMut(&GuestIovecs, u64) -> io::Result<usize>,
) -> Result<io::Result<u64>, Stopped> {
    let total = iov.len();
    let mut done = 0u64;
    let mut rest = iov.clone();
    while done < total {
        let mut slice;
        let chunk = if rest.len() > MAX_IO_BYTES {
            q.check_stop()?;
            slice = rest.clone();
            slice.truncate(MAX_IO_BYTES);
            &slice
        } else {
            &rest
        };
        match op(chunk, offset.saturating_add(done)) {
            Ok(0) => {
                return Ok(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "disk ended early")));
            }
            Ok(n) => {
                done += n as u64;
                rest = rest.skip(n as u64);
            }
            Err(e) if q.retry_after(&e)? => {}
            Err(e) => return Ok(Err(e)),
        }
    }
    Ok(Ok(done))
}

/// Runs `op` on each discard / write-zeroes segment, stopping early if
/// the queue thread must stop.
fn each_segment(
    q: &QueueCtx,
    segs: &[Segment],
    mut op: impl FnMut(&Segment) -> io::Result<()>,
) -> Result<io::Result<()>, Stopped> {
    for s in segs {
        q.check_stop()?;
        if let Err(e) = op(s) {
            return Ok(Err(e));
        }
    }
    Ok(Ok(()))
}

fn cvt(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn fallocate(fd: libc::c_int, mode: libc::c_int, s: &Segment) -> io::Result<()> {
    let off = libc::off_t::try_from(s.offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = libc::off_t::try_from(s.len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fallocate on our own fd; the kernel checks the range.
    cvt(unsafe { libc::fallocate(fd, mode, off, len) })
}

fn punch_hole(fd: libc::c_int, s: &Segment) -> io::Result<()> {
    fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, s)
}

fn write_zeroes(q: &QueueCtx, file: &File, s: &Segment) -> io::Result<()> {
    let mode = if s.unmap {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    };
    match fallocate(file.as_raw_fd(), mode, s) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => write_zero_buffers(q, file, s),
        r => r,
    }
}

/// For file systems without ZERO_RANGE / PUNCH_HOLE: write zeroes, a
/// megabyte at a time, giving up as soon as the thread must stop (the
/// request then never completes: the driver is resetting the device).
fn write_zero_buffers(q: &QueueCtx, file: &File, s: &Segment) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < s.len {
        if q.check_stop().is_err() {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "device reset during write-zeroes"));
        }
        let n = (s.len - off).min(CHUNK) as usize;
        match file.write_at(&zeroes[..n], s.offset + off) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(w) => off += w as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
