//! Guest memory as the device servers see it, and [`GuestIovecs`]: guest
//! buffers as host iovecs for `readv`/`writev`, which only a validated
//! chain can produce.
//!
//! The guest writes its memory while a queue thread reads it (and the
//! other way round): every copy between guest buffers and host memory goes
//! through vm-memory's volatile slices, never a plain `memcpy` that the
//! compiler may assume nobody else touches.

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileSlice};

/// Guest RAM: one or more host mappings (a memfd in the launcher, a
/// vhost-user region table, or anonymous memory in tests).
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// `readv`/`writev` take at most this many iovecs (`UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

/// The range `[addr, addr + len)` is not entirely backed by guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest buffer at {addr:#x} (+{len:#x}) is outside guest memory")]
pub struct OutOfGuestMemory {
    pub addr: u64,
    pub len: u64,
}

/// Host iovecs that cover guest buffers, in order.
///
/// Safe code cannot point one at memory it does not own: the only way to
/// add an iovec is [`GuestIovecs::push`], which translates a guest range
/// through the guest memory's own region table, and every value keeps that
/// guest memory mapped (an `Arc`) for as long as it lives. Every other
/// operation only narrows the buffers. Bytes are copied with volatile
/// accesses ([`GuestIovecs::read_at`], [`GuestIovecs::write_at`]) or handed
/// to the kernel ([`crate::sys`]).
#[derive(Clone, Default)]
pub struct GuestIovecs {
    iov: Vec<libc::iovec>,
    len: u64,
    mem: Option<Arc<GuestMemory>>,
}

// SAFETY: the iovecs point into guest memory, which is shared with the
// guest and the other queue threads by design and kept mapped by `mem`;
// moving the list to another thread changes nothing about that.
unsafe impl Send for GuestIovecs {}
// SAFETY: `&GuestIovecs` only reads the list or copies bytes volatilely.
unsafe impl Sync for GuestIovecs {}

impl std::fmt::Debug for GuestIovecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestIovecs").field("segments", &self.iov.len()).field("len", &self.len).finish()
    }
}

impl GuestIovecs {
    /// Appends the host iovecs that cover guest `[addr, addr + len)`. A
    /// buffer that crosses from one memory region into the next becomes
    /// several iovecs; a buffer that touches unbacked addresses is refused
    /// whole, so the caller never does I/O on part of a bad buffer.
    pub(crate) fn push(&mut self, mem: &Arc<GuestMemory>, addr: GuestAddress, len: u64) -> Result<(), OutOfGuestMemory> {
        let err = OutOfGuestMemory { addr: addr.0, len };
        match &self.mem {
            Some(m) if !Arc::ptr_eq(m, mem) => return Err(err),
            Some(_) => {}
            None => self.mem = Some(mem.clone()),
        }
        let start = self.iov.len();
        let mut cur = addr.0;
        let mut left = len;
        while left > 0 {
            let host = mem.to_region_addr(GuestAddress(cur)).and_then(|(region, raddr)| {
                let n = left.min(region.len() - raddr.0);
                region.get_host_address(raddr).ok().map(|h| (h, n))
            });
            let Some((host, n)) = host else {
                self.iov.truncate(start);
                return Err(err);
            };
            self.iov.push(libc::iovec { iov_base: host.cast(), iov_len: n as usize });
            left -= n;
            match cur.checked_add(n) {
                Some(c) => cur = c,
                None if left == 0 => {}
                None => {
                    self.iov.truncate(start);
                    return Err(err);
                }
            }
        }
        self.len += len;
        Ok(())
    }

    /// Total bytes covered.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of iovecs (segments).
    pub fn segments(&self) -> usize {
        self.iov.len()
    }

    /// The iovecs, for a system call. Read-only: nothing built from them
    /// can reach memory outside the guest's.
    pub(crate) fn as_raw(&self) -> &[libc::iovec] {
        &self.iov[..self.iov.len().min(MAX_IOVECS)]
    }

    /// Each segment as a volatile slice, with its byte offset.
    fn slices(&self) -> impl Iterator<Item = (usize, VolatileSlice<'_>)> {
        let mut at = 0usize;
        self.iov.iter().map(move |v| {
            // SAFETY: every iovec was built by `push` from a mapped region of
            // `self.mem`, which stays mapped while `self` (and so the slice's
            // borrow of it) lives; the guest and other queue threads access
            // guest memory concurrently, which is why only volatile copies
            // are made through it.
            let s = unsafe { VolatileSlice::new(v.iov_base.cast(), v.iov_len) };
            let here = at;
            at += v.iov_len;
            (here, s)
        })
    }

    /// Walks the buffers from byte `offset` on, handing `copy` each piece
    /// and how many bytes are done so far, until `len` bytes are done or
    /// the buffers end; `copy` returns how many bytes it moved.
    fn each_part(&self, offset: usize, len: usize, mut copy: impl FnMut(VolatileSlice<'_>, usize) -> usize) -> usize {
        let mut done = 0;
        for (at, s) in self.slices() {
            if done == len {
                break;
            }
            let from = offset.saturating_add(done);
            if from >= at + s.len() {
                continue;
            }
            let Ok(part) = s.offset(from - at) else { continue };
            done += copy(part, done);
        }
        done
    }

    /// Copies `data` into the buffers starting at byte `offset` of their
    /// concatenation; returns how many bytes fitted.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> usize {
        self.each_part(offset, data.len(), |part, done| {
            let rest = data.get(done..).unwrap_or_default();
            part.copy_from(rest);
            part.len().min(rest.len())
        })
    }

    /// Copies bytes from the buffers starting at byte `offset` into `buf`;
    /// returns how many bytes were available.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> usize {
        self.each_part(offset, buf.len(), |part, done| part.copy_to(buf.get_mut(done..).unwrap_or_default()))
    }

    /// The buffers from byte `at` to the end.
    pub fn skip(&self, mut at: u64) -> GuestIovecs {
        let mut out = GuestIovecs { iov: Vec::with_capacity(self.iov.len()), len: 0, mem: self.mem.clone() };
        for v in &self.iov {
            let vlen = v.iov_len as u64;
            if at >= vlen {
                at -= vlen;
                continue;
            }
            out.iov.push(libc::iovec {
                // `at < iov_len`: the pointer stays inside the same buffer.
                iov_base: v.iov_base.cast::<u8>().wrapping_add(at as usize).cast(),
                iov_len: (vlen - at) as usize,
            });
            out.len += vlen - at;
            at = 0;
        }
        out
    }

    /// Keeps only the first `len` bytes.
    pub fn truncate(&mut self, len: u64) {
        let mut left = len;
        let mut keep = 0;
        for v in self.iov.iter_mut() {
            if left == 0 {
                break;
            }
            let n = (v.iov_len as u64).min(left);
            v.iov_len = n as usize;
            left -= n;
            keep += 1;
        }
        self.iov.truncate(keep);
        self.len = len.min(self.len);
    }

    /// The last byte, as a buffer of its own (a request's status byte).
    pub fn last_byte(&self) -> Option<GuestIovecs> {
        let len = self.len.checked_sub(1)?;
        Some(self.skip(len))
    }

    /// Empties the list, keeping its allocation (for a scratch list).
    pub fn clear(&mut self) {
        self.iov.clear();
        self.len = 0;
    }

    /// Appends `other`'s buffers, if both are in the same guest memory.
    pub fn append(&mut self, other: &GuestIovecs) -> bool {
        match (&self.mem, &other.mem) {
            (_, None) => return true,
            (Some(a), Some(b)) if !Arc::ptr_eq(a, b) => return false,
            (Some(_), Some(_)) => {}
            (None, Some(b)) => self.mem = Some(b.clone()),
        }
        self.iov.extend_from_slice(&other.iov);
        self.len += other.len;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_crossing_regions_split_and_holes_are_refused() {
        let mem = Arc::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)]).unwrap(),
        );
        let mut iov = GuestIovecs::default();
        iov.push(&mem, GuestAddress(0xff0), 0x20).unwrap();
        assert_eq!(iov.segments(), 2);
        assert_eq!(iov.len(), 0x20);
        assert!(iov.push(&mem, GuestAddress(0x1ff0), 0x20).is_err());
        assert_eq!(iov.segments(), 2, "a refused buffer adds nothing");
        assert_eq!(iov.len(), 0x20);
        assert_eq!(iov.write_at(0xc, b"abcdefgh"), 8);
        let mut back = [0u8; 8];
        assert_eq!(iov.read_at(0xc, &mut back), 8);
        assert_eq!(&back, b"abcdefgh");
        let tail = iov.skip(0x10);
        assert_eq!(tail.len(), 0x10);
        let mut t = [0u8; 8];
        assert_eq!(tail.read_at(0, &mut t), 8);
        assert_eq!(&t, b"efgh\0\0\0\0");
        let last = iov.last_byte().unwrap();
        assert_eq!(last.len(), 1);
        assert_eq!(iov.write_at(0x20, b"x"), 0, "nothing is written past the end");
        let mut short = iov.clone();
        short.truncate(0x11);
        assert_eq!(short.len(), 0x11);
        assert_eq!(short.segments(), 2);
        assert_eq!(short.read_at(0x10, &mut [0u8; 4]), 1);
    }

    #[test]
    fn buffers_of_another_guest_memory_are_refused() {
        let a = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap());
        let b = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap());
        let mut iov = GuestIovecs::default();
        iov.push(&a, GuestAddress(0), 16).unwrap();
        assert!(iov.push(&b, GuestAddress(0), 16).is_err());
        let mut other = GuestIovecs::default();
        other.push(&b, GuestAddress(0), 16).unwrap();
        assert!(!iov.append(&other));
        assert_eq!(iov.len(), 16);
    }
}
