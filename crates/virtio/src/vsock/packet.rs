//! The virtio-vsock packet header (virtio 1.2, 5.10.6), read from and
//! written into guest buffers, and checked before the device acts on it.
//!
//! virtio-bindings has no vsock structures, so the 44-byte little-endian
//! header is laid out here, field by field, from the spec.

use crate::memory::GuestIovecs;

/// `struct virtio_vsock_hdr`: the bytes in front of every packet.
pub const HDR_LEN: usize = 44;

/// The host's context ID (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;

/// `VIRTIO_VSOCK_TYPE_STREAM`: the only socket type the device offers
/// (SEQPACKET is a feature bit it does not offer).
pub const TYPE_STREAM: u16 = 1;

/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// The largest payload one packet may carry. Linux never sends more than
/// 64 KiB (`VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`); a longer claimed length is a
/// bad packet, not a reason to move more bytes.
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// `VIRTIO_VSOCK_OP_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Request,
    Response,
    Rst,
    Shutdown,
    Rw,
    CreditUpdate,
    CreditRequest,
}

impl Op {
    fn from_wire(v: u16) -> Option<Op> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }

    fn to_wire(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
        }
    }
}

/// A packet header. Ports are the sender's (`src`) and receiver's (`dst`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Why a packet the guest sent was refused. Each is a driver bug or an
/// attack; it is counted, and a connection it names is reset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("vsock packet is shorter than its {HDR_LEN}-byte header")]
    Short,
    #[error("vsock packet is device-writable")]
    Writable,
    #[error("vsock packet claims {claimed} payload bytes but carries {carried}")]
    BadLength { claimed: u32, carried: u64 },
    #[error("vsock packet payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
    #[error("vsock packet from cid {src} to cid {dst}: the guest is cid {guest} and may only talk to the host (cid {HOST_CID})")]
    WrongCid { src: u64, dst: u64, guest: u64 },
    #[error("vsock packet of socket type {0}: only stream sockets (1) are offered")]
    BadType(u16),
    #[error("vsock packet with unknown op {0}")]
    UnknownOp(u16),
}

impl Header {
    /// A header from the host (`local_port`) to the guest (`peer_port`).
    pub fn to_guest(guest_cid: u64, local_port: u32, peer_port: u32, op: Op) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: local_port,
            dst_port: peer_port,
            len: 0,
            kind: TYPE_STREAM,
            op: op.to_wire(),
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Header {
        let u64_at = |i: usize| u64::from_le_bytes(std::array::from_fn(|k| b[i + k]));
        let u32_at = |i: usize| u32::from_le_bytes(std::array::from_fn(|k| b[i + k]));
        let u16_at = |i: usize| u16::from_le_bytes(std::array::from_fn(|k| b[i + k]));
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The op, if it is one the spec defines.
    pub fn op(&self) -> Option<Op> {
        Op::from_wire(self.op)
    }
}

/// A packet the guest sent on its transmit queue, checked: its header,
/// and its payload (exactly `len` bytes of guest memory).
#[derive(Debug)]
pub struct TxPacket {
    pub hdr: Header,
    pub op: Op,
    pub payload: GuestIovecs,
}

/// Reads and checks the packet in a transmit chain's buffers. The header
/// is returned with the error when it could be read, so the caller can
/// reset the connection the bad packet names.
pub fn parse_tx(readable: &GuestIovecs, writable: &GuestIovecs, guest_cid: u64) -> Result<TxPacket, (PacketError, Option<Header>)> {
    if !writable.is_empty() {
        return Err((PacketError::Writable, None));
    }
    let mut raw = [0u8; HDR_LEN];
    if readable.read_at(0, &mut raw) != HDR_LEN {
        return Err((PacketError::Short, None));
    }
    let hdr = Header::from_bytes(&raw);
    let bad = |e| Err((e, Some(hdr)));
    if hdr.src_cid != guest_cid || hdr.dst_cid != HOST_CID {
        return bad(PacketError::WrongCid { src: hdr.src_cid, dst: hdr.dst_cid, guest: guest_cid });
    }
    if hdr.kind != TYPE_STREAM {
        return bad(PacketError::BadType(hdr.kind));
    }
    let Some(op) = hdr.op() else { return bad(PacketError::UnknownOp(hdr.op)) };
    if hdr.len > MAX_PAYLOAD {
        return bad(PacketError::TooLong(hdr.len));
    }
    let carried = readable.len() - HDR_LEN as u64;
    if u64::from(hdr.len) > carried || (op != Op::Rw && hdr.len != 0) {
        return bad(PacketError::BadLength { claimed: hdr.len, carried });
    }
    let mut payload = readable.skip(HDR_LEN as u64);
    payload.truncate(u64::from(hdr.len));
    Ok(TxPacket { hdr, op, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_spec_layout() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 1024,
            len: 5,
            kind: 1,
            op: 5,
            flags: 3,
            buf_alloc: 0x40000,
            fwd_cnt: 7,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(Header::from_bytes(&b), h);
        assert_eq!(h.op(), Some(Op::Rw));
    }
}
