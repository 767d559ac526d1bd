//! virtio-blk over a file (or a host block device): `preadv`/`pwritev`
//! straight between the file and the guest's buffers, `fdatasync` before a
//! flush completes, discard and write-zeroes with `fallocate`.
//!
//! - `mod.rs`: the device, its features and configuration space;
//! - [`request`]: a chain parsed into a checked request;
//! - `requestq.rs`: the request queues' worker (each queue has its own
//!   thread; all share the file: positional I/O needs no lock);
//! - `backend.rs`: the disk file.

mod backend;
mod request;
mod requestq;

pub use request::*;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::counters::DeviceState;
use crate::device::{ActivateError, ConfigSpace, VirtioDevice, COMMON_FEATURES};
use virtio_bindings::virtio_blk::virtio_blk_config;
use crate::threads::QueueWorker;
use backend::disk_size;
use requestq::{RequestQueue, WriteCache};

pub use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
const QUEUE_SIZE: u16 = 256;

/// System calls the request queues make beyond a queue thread's own
/// (`seccomp::QUEUE_THREAD`): positional I/O, flush, discard and
/// write-zeroes (with its zero-writing fallback).
pub const SYSCALLS: &[i64] =
    &[libc::SYS_preadv, libc::SYS_pwritev, libc::SYS_fdatasync, libc::SYS_fallocate, libc::SYS_pwrite64];

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_CONFIG_WCE: u64 = 1 << 11;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

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
    counters: Arc<DeviceState>,
    /// The config space's `writeback` field (VIRTIO_BLK_F_CONFIG_WCE): on
    /// (the default) the guest is told writes may sit in a volatile cache
    /// until a FLUSH; off, every write is durable before it completes.
    writeback: Arc<AtomicBool>,
}

/// Offset of `writeback` (`wce`) in `virtio_blk_config`.
const WRITEBACK_OFFSET: u64 = 32;

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
            counters: DeviceState::new(cfg.num_queues.into()),
            writeback: Arc::new(AtomicBool::new(true)),
        })
    }

    /// Disk size in bytes (whole sectors).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// `virtio_blk_config`: the fields the offered features make valid.
    fn config(&self) -> virtio_blk_config {
        virtio_blk_config {
            capacity: (self.capacity / SECTOR_SIZE).to_le(),
            seg_max: u32::from(QUEUE_SIZE - 2).to_le(),
            blk_size: (SECTOR_SIZE as u32).to_le(),
            num_queues: self.num_queues.to_le(),
            max_discard_sectors: MAX_DISCARD_SECTORS.to_le(),
            max_discard_seg: (MAX_SEGMENTS as u32).to_le(),
            discard_sector_alignment: 1u32.to_le(),
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS.to_le(),
            max_write_zeroes_seg: (MAX_SEGMENTS as u32).to_le(),
            write_zeroes_may_unmap: 1,
            wce: u8::from(self.writeback.load(Ordering::Relaxed)),
            ..Default::default()
        }
    }
}

impl VirtioDevice for Block {
    fn syscalls(&self) -> &'static [i64] {
        SYSCALLS
    }
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
        let mut f = COMMON_FEATURES
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_CONFIG_WCE;
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
    fn config_space(&self) -> Vec<u8> {
        self.config().bytes()
    }
    /// The driver turns the write cache off or on (`writeback`, one byte).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == WRITEBACK_OFFSET && data.len() == 1 {
            self.writeback.store(data[0] != 0, Ordering::Relaxed);
        }
    }
    /// A driver that did not accept FLUSH cannot ask for durability (and
    /// Linux's then assumes no write-back cache), so the device gives it
    /// with every write; one that did may still turn the cache off
    /// through `writeback`.
    fn activate(&mut self, features: u64) -> Result<Vec<Box<dyn QueueWorker>>, ActivateError> {
        let cache = WriteCache { flush_negotiated: features & VIRTIO_BLK_F_FLUSH != 0, writeback: self.writeback.clone() };
        Ok((0..self.num_queues)
            .map(|_| {
                Box::new(RequestQueue {
                    file: self.file.clone(),
                    capacity: self.capacity,
                    readonly: self.readonly,
                    id: self.id,
                    fault: Default::default(),
                    sync_fault: Default::default(),
                    cache: cache.clone(),
                }) as Box<dyn QueueWorker>
            })
            .collect())
    }
    fn state(&self) -> Arc<DeviceState> {
        self.counters.clone()
    }
    fn reset(&mut self) {
        self.writeback.store(true, Ordering::Relaxed);
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    /// The driver reads fields at the spec's offsets (virtio 1.2, 5.2.4).
    #[test]
    fn config_space_has_the_spec_layout() {
        let path = std::env::temp_dir().join(format!("kickvm-blkcfg-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let mut cfg = BlockConfig::new(&path);
        cfg.num_queues = 3;
        let blk = Block::new("blk0", cfg).unwrap();
        std::fs::remove_file(&path).unwrap();
        let mut c = [0u8; 96];
        blk.read_config(0, &mut c);
        let u32_at = |o: usize| u32::from_le_bytes([c[o], c[o + 1], c[o + 2], c[o + 3]]);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048, "capacity in sectors");
        assert_eq!(u32_at(12), 254, "seg_max");
        assert_eq!(u32_at(20), 512, "blk_size");
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 3, "num_queues");
        assert_eq!(u32_at(40), MAX_SEGMENTS as u32, "max_discard_seg");
        assert_eq!(u32_at(52), MAX_SEGMENTS as u32, "max_write_zeroes_seg");
        assert_eq!(c[56], 1, "write_zeroes_may_unmap");
        let mut past = [0xffu8; 4];
        blk.read_config(200, &mut past);
        assert_eq!(past, [0; 4], "past the structure reads as zero");
    }
}
