//! Turning a descriptor chain into a validated list of host buffers before
//! any device acts on it.
//!
//! virtio-queue's own chain iterator stops silently on a loop, a bad
//! indirect table or unreadable memory, which would let a malformed chain
//! look like a short valid one. Devices here need to tell the two apart
//! (a malformed chain is an error the guest caused and is counted), so the
//! walk is done here, over the raw split-ring descriptor table, with every
//! rule of the virtio 1.2 spec (2.7.5, 2.7.5.3) that protects the device.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use crate::memory::{GuestIovecs, GuestMemory};

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
    #[error("chain has more than {0} descriptors: a loop, or longer than the queue allows")]
    TooLong(u32),
    #[error("descriptor table at {0:#x} is outside guest memory")]
    TableOutOfMemory(u64),
    #[error("{0}")]
    BufferOutOfMemory(#[from] crate::memory::OutOfGuestMemory),
    #[error("zero-length descriptor")]
    ZeroLength,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("indirect descriptor, but the driver did not negotiate VIRTIO_F_INDIRECT_DESC")]
    IndirectNotNegotiated,
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect descriptor with NEXT set")]
    IndirectWithNext,
    #[error("indirect table length {0} is zero, not a multiple of 16, or longer than the queue allows")]
    BadIndirectTable(u32),
    #[error("chain is longer than 4 GiB")]
    TooManyBytes,
}

/// One chain, validated: its head (to return it with `add_used`) and its
/// device-readable and device-writable buffers, in order.
#[derive(Debug, Default)]
pub struct Chain {
    pub head: u16,
    pub readable: GuestIovecs,
    pub writable: GuestIovecs,
}

/// The limits a chain is walked under: what the driver laid out and
/// negotiated, and what the device allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Entries in the descriptor table (the queue size the driver set).
    pub queue_size: u16,
    /// Most descriptors one chain may have, its indirect table's included.
    /// The queue's maximum size: what a Linux driver ever builds, and it
    /// bounds the host memory one chain takes (a few iovecs per descriptor).
    pub max_descriptors: u16,
    /// VIRTIO_F_INDIRECT_DESC was negotiated.
    pub indirect: bool,
}

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
    let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = raw;
    Ok(RawDesc {
        addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
        len: u32::from_le_bytes([l0, l1, l2, l3]),
        flags: u16::from_le_bytes([f0, f1]),
        next: u16::from_le_bytes([n0, n1]),
    })
}

/// Walks the chain starting at `head` in the descriptor table at
/// `desc_table`, following an indirect table if the chain has one.
///
/// The walk is bounded whatever the guest wrote: each table is visited at
/// most once per entry (so a loop ends as an error), the whole chain has at
/// most `rules.max_descriptors` descriptors, and its buffers at most
/// [`MAX_CHAIN_BYTES`]. The host memory a chain takes is therefore
/// O(queue size), and so is the time to walk it.
pub fn walk(mem: &Arc<GuestMemory>, desc_table: GuestAddress, head: u16, rules: Rules) -> Result<Chain, ChainError> {
    if head >= rules.queue_size {
        return Err(ChainError::HeadOutOfTable(head));
    }
    let max = u32::from(rules.max_descriptors);
    let mut chain = Chain { head, ..Default::default() };
    let mut table = desc_table;
    let mut table_size = u32::from(rules.queue_size);
    let mut index = head;
    // Descriptors visited in the current table, and in the whole chain.
    let mut in_table: u32 = 0;
    let mut total: u32 = 0;
    let mut indirect = false;
    loop {
        let d = read_desc(mem, table, index)?;
        if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if !rules.indirect {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if indirect {
                return Err(ChainError::NestedIndirect);
            }
            if d.flags & VIRTQ_DESC_F_NEXT != 0 {
                return Err(ChainError::IndirectWithNext);
            }
            let entries = u64::from(d.len) / DESC_SIZE;
            if d.len == 0 || u64::from(d.len) % DESC_SIZE != 0 || entries > u64::from(max) {
                return Err(ChainError::BadIndirectTable(d.len));
            }
            if !vm_memory::GuestMemoryBackend::check_range(&**mem, GuestAddress(d.addr), d.len as usize) {
                return Err(ChainError::TableOutOfMemory(d.addr));
            }
            indirect = true;
            table = GuestAddress(d.addr);
            table_size = entries as u32;
            index = 0;
            in_table = 0;
            continue;
        }
        in_table += 1;
        total += 1;
        if in_table > table_size || total > max {
            return Err(ChainError::TooLong(max.min(table_size)));
        }
        if d.len == 0 {
            return Err(ChainError::ZeroLength);
        }
        let len = u64::from(d.len);
        if d.flags & VIRTQ_DESC_F_WRITE != 0 {
            chain.writable.push(mem, GuestAddress(d.addr), len)?;
        } else {
            if !chain.writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            }
            chain.readable.push(mem, GuestAddress(d.addr), len)?;
        }
        if chain.readable.len() + chain.writable.len() > MAX_CHAIN_BYTES {
            return Err(ChainError::TooManyBytes);
        }
        if d.flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        if u32::from(d.next) >= table_size {
            return Err(ChainError::NextOutOfTable(d.next));
        }
        index = d.next;
    }
}
