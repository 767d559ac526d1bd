//! A block request, parsed and validated from its chain before any I/O.
//!
//! Layout (virtio 1.2, 5.2.6): a 16-byte device-readable header (type,
//! reserved, sector), then data (readable for writes, writable for reads),
//! then one device-writable status byte — the chain's last byte.

use crate::chain::Chain;
use crate::memory::GuestIovecs;

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
    pub data: GuestIovecs,
    /// The status byte (one byte of guest memory).
    pub status: GuestIovecs,
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
    pub fn parse(chain: &Chain, capacity: u64) -> (Option<GuestIovecs>, Result<Request, RequestError>) {
        let Some(status) = chain.writable.last_byte() else {
            return (None, Err(RequestError::NoStatus));
        };
        let body = Self::parse_body(chain, capacity, status.clone());
        (Some(status), body)
    }

    fn parse_body(chain: &Chain, capacity: u64, status: GuestIovecs) -> Result<Request, RequestError> {
        let mut hdr = [0u8; HEADER_LEN];
        if chain.readable.read_at(0, &mut hdr) < HEADER_LEN {
            return Err(RequestError::ShortHeader);
        }
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15]]);
        let readable_data = chain.readable.skip(HEADER_LEN as u64);
        let mut writable_data = chain.writable.clone();
        writable_data.truncate(chain.writable.len().saturating_sub(1));
        let check_range = |len: u64| -> Result<u64, RequestError> {
            let offset = sector.checked_mul(SECTOR_SIZE);
            match offset.and_then(|o| Some((o, o.checked_add(len)?))) {
                Some((o, end)) if end <= capacity => Ok(o),
                _ => Err(RequestError::OutOfRange { sector, len, capacity }),
            }
        };
        let (kind, data) = match ty {
            VIRTIO_BLK_T_IN => {
                if !readable_data.is_empty() {
                    return Err(RequestError::WrongDirection);
                }
                let len = writable_data.len();
                if !len.is_multiple_of(SECTOR_SIZE) {
                    return Err(RequestError::Unaligned(len));
                }
                (Kind::Read { offset: check_range(len)? }, writable_data)
            }
            VIRTIO_BLK_T_OUT => {
                if !writable_data.is_empty() {
                    return Err(RequestError::WrongDirection);
                }
                let len = readable_data.len();
                if !len.is_multiple_of(SECTOR_SIZE) {
                    return Err(RequestError::Unaligned(len));
                }
                (Kind::Write { offset: check_range(len)? }, readable_data)
            }
            VIRTIO_BLK_T_FLUSH => (Kind::Flush, GuestIovecs::default()),
            VIRTIO_BLK_T_GET_ID => {
                if !readable_data.is_empty() {
                    return Err(RequestError::WrongDirection);
                }
                (Kind::GetId, writable_data)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let segs = parse_segments(&readable_data, capacity)?;
                let kind = if ty == VIRTIO_BLK_T_DISCARD { Kind::Discard(segs) } else { Kind::WriteZeroes(segs) };
                (kind, GuestIovecs::default())
            }
            other => (Kind::Unsupported(other), GuestIovecs::default()),
        };
        Ok(Request { kind, data, status })
    }
}

fn parse_segments(iov: &GuestIovecs, capacity: u64) -> Result<Vec<Segment>, RequestError> {
    let len = iov.len();
    let n = usize::try_from(len / SEGMENT_LEN as u64).unwrap_or(usize::MAX);
    if !len.is_multiple_of(SEGMENT_LEN as u64) || n == 0 || n > MAX_SEGMENTS {
        return Err(RequestError::BadSegments(n));
    }
    let mut segs = Vec::with_capacity(n);
    for i in 0..n {
        let mut raw = [0u8; SEGMENT_LEN];
        iov.read_at(i * SEGMENT_LEN, &mut raw);
        let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = raw;
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
        let flags = u32::from_le_bytes([f0, f1, f2, f3]);
        let offset = sector.checked_mul(SECTOR_SIZE);
        let bytes = u64::from(sectors) * SECTOR_SIZE;
        let offset = match offset.and_then(|o| Some((o, o.checked_add(bytes)?))) {
            Some((o, end)) if end <= capacity => o,
            _ => return Err(RequestError::OutOfRange { sector, len: bytes, capacity }),
        };
        segs.push(Segment {
            offset,
            len: bytes,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(segs)
}
