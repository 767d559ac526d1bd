//! The disk file: positional I/O straight between it and guest buffers,
//! `fallocate` for discard and write-zeroes, and its size.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::request::Segment;
use crate::queue::{QueueCtx, Stopped};

pub(super) fn disk_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    // Works for regular files and block devices alike.
    let mut f = file;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

/// Runs `op` on each discard / write-zeroes segment, stopping early if
/// the queue thread must stop.
pub(super) fn each_segment(
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

pub(super) fn cvt(r: libc::c_int) -> io::Result<()> {
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

pub(super) fn punch_hole(fd: libc::c_int, s: &Segment) -> io::Result<()> {
    fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, s)
}

pub(super) fn write_zeroes(q: &QueueCtx, file: &File, s: &Segment) -> io::Result<()> {
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
