//! A block request, parsed and validated from its chain before any I/O.
//!
//! Layout (virtio 1.2, 5.2.6): a 16-byte device-readable header (type,
//! reserved, sector), then data (readable for writes, writable for reads),
//! then one device-writable status byte — the chain's last byte.

use crate::chain::Chain;
use crate::memory::{iov_len, iov_read_at, iov_skip, iov_truncate};

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

pub const SECTOR_SIZE: u64 = 512;
pub const HEADER_LEN: usize = 16;
/// The serial number (GET_ID) is exactly this long, NUL-padded.
pub const ID_LEN: usize = 20;
/// A discard / write-zeroes segment: sector (u64), num_sectors (u32), flags (u32).
pub const SEGMENT_LEN: usize = 16;
/// Segments accepted in one discard / write-zeroes request (advertised as
/// max_discard_seg / max_write_zeroes_seg): bounds the work one chain can ask.
pub const MAX_SEGMENTS: usize = 64;
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// What the request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Read { offset: u64 },
    Write { offset: u64 },
    Flush,
    GetId,
    Discard(Vec<Segment>),
    WriteZeroes(Vec<Segment>),
    Unsupported(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

/// A parsed request: the I/O to do, its data iovecs and where the status
/// byte goes.
pub struct Request {
    pub kind: Kind,
    /// Guest buffers to read into (IN, GET_ID) or write from (OUT).
    pub data: Vec<libc::iovec>,
    pub data_len: u64,
    /// The status byte's iovec (one byte of guest memory).
    pub status: libc::iovec,
}

/// Why a chain is not a valid request. With a status byte available the
/// request completes with IOERR; without one the chain is just returned.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("block request has no device-writable status byte")]
    NoStatus,
    #[error("block request header is shorter than 16 bytes")]
    ShortHeader,
    #[error("block request data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("block request sector {sector} (+{len} bytes) is beyond the disk's {capacity} bytes")]
    OutOfRange { sector: u64, len: u64, capacity: u64 },
    #[error("block request data is in the wrong direction for its type")]
    WrongDirection,
    #[error("discard/write-zeroes request with {0} segments (max {MAX_SEGMENTS}) or a partial segment")]
    BadSegments(usize),
}

impl Request {
    /// Finds the status byte first (so even a bad request can report
    /// IOERR), then the header, then checks the data against `capacity`.
    pub fn parse(chain: &Chain, capacity: u64) -> (Option<libc::iovec>, Result<Request, RequestError>) {
        let Some(status) = last_byte(&chain.writable) else {
            return (None, Err(RequestError::NoStatus));
        };
        (Some(status), Self::parse_body(chain, capacity, status))
    }

    fn parse_body(chain: &Chain, capacity: u64, status: libc::iovec) -> Result<Request, RequestError> {
        let mut hdr = [0u8; HEADER_LEN];
        if iov_read_at(&chain.readable, 0, &mut hdr) < HEADER_LEN {
            return Err(RequestError::ShortHeader);
        }
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
        let readable_data = iov_skip(&chain.readable, HEADER_LEN);
        let mut writable_data = chain.writable.clone();
        iov_truncate(&mut writable_data, (chain.writable_len - 1) as usize);
        let check_range = |len: u64| -> Result<u64, RequestError> {
            let offset = sector.checked_mul(SECTOR_SIZE);
            match offset.and_then(|o| o.checked_add(len)) {
                Some(end) if end <= capacity => Ok(sector * SECTOR_SIZE),
                _ => Err(RequestError::OutOfRange { sector, len, capacity }),
            }
        };
        let (kind, data) = match ty {
            VIRTIO_BLK_T_IN => {
                if !readable_data.is_empty() {
                    return Err(RequestError::WrongDirection);
                }
                let len = iov_len(&writable_data) as u64;
                if !len.is_multiple_of(SECTOR_SIZE) {
                    return Err(RequestError::Unaligned(len));
                }
                (Kind::Read { offset: check_range(len)? }, writable_data)
            }
            VIRTIO_BLK_T_OUT => {
                if !writable_data.is_empty() {
                    return Err(RequestError::WrongDirection);
                }
                let len = iov_len(&readable_data) as u64;
                if !len.is_multiple_of(SECTOR_SIZE) {
                    return Err(RequestError::Unaligned(len));
                }
                (Kind::Write { offset: check_range(len)? }, readable_data)
            }
            VIRTIO_BLK_T_FLUSH => (Kind::Flush, Vec::new()),
            VIRTIO_BLK_T_GET_ID => {
                if !readable_data.is_empty() {
                    return Err(RequestError::WrongDirection);
                }
                (Kind::GetId, writable_data)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let segs = parse_segments(&readable_data, capacity)?;
                let kind = if ty == VIRTIO_BLK_T_DISCARD { Kind::Discard(segs) } else { Kind::WriteZeroes(segs) };
                (kind, Vec::new())
            }
            other => (Kind::Unsupported(other), Vec::new()),
        };
        let data_len = iov_len(&data) as u64;
        Ok(Request { kind, data, data_len, status })
    }
}

fn parse_segments(iov: &[libc::iovec], capacity: u64) -> Result<Vec<Segment>, RequestError> {
    let len = iov_len(iov);
    let n = len / SEGMENT_LEN;
    if !len.is_multiple_of(SEGMENT_LEN) || n == 0 || n > MAX_SEGMENTS {
        return Err(RequestError::BadSegments(n));
    }
    let mut segs = Vec::with_capacity(n);
    for i in 0..n {
        let mut raw = [0u8; SEGMENT_LEN];
        iov_read_at(iov, i * SEGMENT_LEN, &mut raw);
        let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
        let offset = sector.checked_mul(SECTOR_SIZE);
        let bytes = u64::from(sectors) * SECTOR_SIZE;
        match offset.and_then(|o| o.checked_add(bytes)) {
            Some(end) if end <= capacity => {}
            _ => return Err(RequestError::OutOfRange { sector, len: bytes, capacity }),
        }
        segs.push(Segment {
            offset: sector * SECTOR_SIZE,
            len: bytes,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(segs)
}

/// The last byte of an iovec list, as its own iovec.
fn last_byte(iov: &[libc::iovec]) -> Option<libc::iovec> {
    let last = iov.iter().rev().find(|v| v.iov_len > 0)?;
    Some(libc::iovec {
        // SAFETY: `iov_len > 0`, so the last byte is inside the buffer.
        iov_base: unsafe { (last.iov_base as *mut u8).add(last.iov_len - 1) }.cast(),
        iov_len: 1,
    })
}
