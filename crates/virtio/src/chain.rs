//! Turning a descriptor chain into a validated list of host buffers before
//! any device acts on it.
//!
//! virtio-queue's own chain iterator stops silently on a loop, a bad
//! indirect table or unreadable memory, which would let a malformed chain
//! look like a short valid one. Devices here need to tell the two apart
//! (a malformed chain is an error the guest caused and is counted), so the
//! walk is done here, over the raw split-ring descriptor table, with every
//! rule of the virtio 1.2 spec (2.7.5, 2.7.5.3) that protects the device.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::{push_iovecs, GuestMemory};

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;
const DESC_SIZE: u64 = 16;

/// A chain's buffers may not add up to more than this. The spec caps a
/// chain at 2^32 bytes; overlapping descriptors could otherwise make one
/// chain claim far more memory than the guest has.
pub const MAX_CHAIN_BYTES: u64 = u32::MAX as u64;

/// Why a chain was refused. Each one is a guest driver bug (or attack).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("chain head {0} is outside the descriptor table")]
    HeadOutOfTable(u16),
    #[error("descriptor `next` {0} is outside the descriptor table")]
    NextOutOfTable(u16),
    #[error("chain has more descriptors than its table ({0}): a loop")]
    TooLong(u16),
    #[error("descriptor table at {0:#x} is outside guest memory")]
    TableOutOfMemory(u64),
    #[error("{0}")]
    BufferOutOfMemory(#[from] crate::memory::OutOfGuestMemory),
    #[error("zero-length descriptor")]
    ZeroLength,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect descriptor with NEXT set")]
    IndirectWithNext,
    #[error("indirect table length {0} is zero or not a multiple of 16")]
    BadIndirectTable(u32),
    #[error("chain is longer than 4 GiB")]
    TooManyBytes,
}

/// One chain, validated: its head (to return it with `add_used`) and the
/// host iovecs of its device-readable and device-writable parts, in order.
#[derive(Debug, Default)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<libc::iovec>,
    pub writable: Vec<libc::iovec>,
    pub readable_len: u64,
    pub writable_len: u64,
}

// SAFETY: the iovecs point into guest memory, which is shared with the guest
// and other queue threads by design; a Chain is only a list of addresses.
unsafe impl Send for Chain {}

#[derive(Clone, Copy)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_desc(mem: &GuestMemory, table: GuestAddress, index: u16) -> Result<RawDesc, ChainError> {
    let at = table
        .0
        .checked_add(u64::from(index) * DESC_SIZE)
        .ok_or(ChainError::TableOutOfMemory(table.0))?;
    let mut raw = [0u8; 16];
    mem.read_slice(&mut raw, GuestAddress(at))
        .map_err(|_| ChainError::TableOutOfMemory(at))?;
    Ok(RawDesc {
        addr: u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default()),
        len: u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()),
        flags: u16::from_le_bytes([raw[12], raw[13]]),
        next: u16::from_le_bytes([raw[14], raw[15]]),
    })
}

/// Walks the chain starting at `head` in the descriptor table at
/// `desc_table` (of `queue_size` entries), following an indirect table if
/// the chain has one.
pub fn walk(
    mem: &GuestMemory,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<Chain, ChainError> {
    if head >= queue_size {
        return Err(ChainError::HeadOutOfTable(head));
    }
    let mut chain = Chain { head, ..Default::default() };
    let mut table = desc_table;
    let mut table_size = queue_size;
    let mut index = head;
    let mut seen: u16 = 0;
    let mut indirect = false;
    loop {
        let d = read_desc(mem, table, index)?;
        if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if indirect {
                return Err(ChainError::NestedIndirect);
            }
            if d.flags & VIRTQ_DESC_F_NEXT != 0 {
                return Err(ChainError::IndirectWithNext);
            }
            if d.len == 0 || u64::from(d.len) % DESC_SIZE != 0 || u64::from(d.len) / DESC_SIZE > 0xffff {
                return Err(ChainError::BadIndirectTable(d.len));
            }
            if !vm_memory::GuestMemoryBackend::check_range(mem, GuestAddress(d.addr), d.len as usize) {
                return Err(ChainError::TableOutOfMemory(d.addr));
            }
            indirect = true;
            table = GuestAddress(d.addr);
            table_size = (u64::from(d.len) / DESC_SIZE) as u16;
            index = 0;
            seen = 0;
            continue;
        }
        seen += 1;
        if seen > table_size {
            return Err(ChainError::TooLong(table_size));
        }
        if d.len == 0 {
            return Err(ChainError::ZeroLength);
        }
        let len = u64::from(d.len);
        if d.flags & VIRTQ_DESC_F_WRITE != 0 {
            push_iovecs(mem, GuestAddress(d.addr), len, &mut chain.writable)?;
            chain.writable_len += len;
        } else {
            if !chain.writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            }
            push_iovecs(mem, GuestAddress(d.addr), len, &mut chain.readable)?;
            chain.readable_len += len;
        }
        if chain.readable_len + chain.writable_len > MAX_CHAIN_BYTES {
            return Err(ChainError::TooManyBytes);
        }
        if d.flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        if d.next >= table_size {
            return Err(ChainError::NextOutOfTable(d.next));
        }
        index = d.next;
    }
}
