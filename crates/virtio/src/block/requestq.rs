//! The request queue's worker: each chain is one request, parsed and
//! checked (`request.rs`) before any I/O, then done on the disk file
//! (`backend.rs`) and completed with its status byte.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::backend_fault::BackendFault;
use super::backend::{cvt, each_segment, punch_hole, write_zeroes};
use super::request::*;
use crate::chain::Chain;
use crate::queue::{QueueCtx, Stopped};
use crate::sys;
use crate::threads::{QueueWorker, Wait};

pub(super) struct RequestQueue {
    pub file: Arc<File>,
    pub capacity: u64,
    pub readonly: bool,
    pub id: [u8; ID_LEN],
    /// The disk file's failures (a full host file system, an I/O error):
    /// every failed request counted, each failing spell logged once.
    pub fault: BackendFault,
    /// Failures to make data durable (`fdatasync`), a spell of their own:
    /// a write that lands in the host's page cache says nothing about the
    /// storage under it (a device-mapper `flakey` or `error` table fails
    /// the flush and lets the write through), so only a flush that works
    /// ends it.
    pub sync_fault: BackendFault,
    pub cache: WriteCache,
}

/// Whether the guest sees a volatile write cache.
#[derive(Clone)]
pub(super) struct WriteCache {
    /// The driver accepted VIRTIO_BLK_F_FLUSH.
    pub flush_negotiated: bool,
    /// The config space's `writeback` field, shared with the device.
    pub writeback: Arc<AtomicBool>,
}

impl WriteCache {
    /// Writes must be durable before they complete.
    fn write_through(&self) -> bool {
        !self.flush_negotiated || !self.writeback.load(Ordering::Relaxed)
    }
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
    fn handle(&mut self, q: &mut QueueCtx, chain: &Chain) -> Result<(), Stopped> {
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
    fn execute(&mut self, q: &QueueCtx, req: &Request) -> Result<Result<u64, u8>, Stopped> {
        let fd = self.file.as_raw_fd();
        let writes = matches!(req.kind, Kind::Write { .. } | Kind::Discard(_) | Kind::WriteZeroes(_));
        if writes && self.readonly {
            q.count_error("write to a read-only disk");
            return Ok(Err(VIRTIO_BLK_S_IOERR));
        }
        let r = match &req.kind {
            Kind::Read { offset } => {
                q.io_all(&req.data, |iov, done| sys::preadv(fd, iov, offset.saturating_add(done)))?.inspect(|&n| {
                    q.add_bytes(n);
                })
            }
            Kind::Write { offset } => {
                q.io_all(&req.data, |iov, done| sys::pwritev(fd, iov, offset.saturating_add(done)))?.map(|n| {
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
        let flush = matches!(req.kind, Kind::Flush);
        let r = match r {
            Err(e) if flush => Err(Failure::Sync(e)),
            Err(e) => Err(Failure::Io(e)),
            // Write-through: the data is on stable storage before the
            // guest hears the write is done.
            // SAFETY: fdatasync on the disk's own open fd.
            Ok(n) if writes && self.cache.write_through() => match cvt(unsafe { libc::fdatasync(fd) }) {
                Ok(_) => Ok((n, true)),
                Err(e) => {
                    self.fault.worked(q);
                    Err(Failure::Sync(e))
                }
            },
            Ok(n) => Ok((n, flush)),
        };
        Ok(match r {
            Ok((n, synced)) => {
                if !flush {
                    self.fault.worked(q);
                }
                if synced {
                    self.sync_fault.worked(q);
                }
                Ok(n)
            }
            Err(Failure::Io(e)) => {
                self.fault.failed(q, &format!("disk I/O failed: {e}"));
                Err(VIRTIO_BLK_S_IOERR)
            }
            Err(Failure::Sync(e)) => {
                self.sync_fault.failed(q, &format!("disk flush (fdatasync) failed: {e}"));
                Err(VIRTIO_BLK_S_IOERR)
            }
        })
    }
}

/// Which part of a request failed: its I/O on the file, or making the
/// data durable.
enum Failure {
    Io(std::io::Error),
    Sync(std::io::Error),
}
