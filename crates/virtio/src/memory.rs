//! Guest memory as the device servers see it, and the translation of guest
//! buffers into host iovecs for `readv`/`writev`.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Guest RAM: one or more host mappings (a memfd in the launcher, a
/// vhost-user region table, or anonymous memory in tests).
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// The range `[addr, addr + len)` is not entirely backed by guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest buffer at {addr:#x} (+{len:#x}) is outside guest memory")]
pub struct OutOfGuestMemory {
    pub addr: u64,
    pub len: u64,
}

/// Appends to `out` the host iovecs that cover guest `[addr, addr + len)`.
/// A buffer that crosses from one memory region into the next becomes
/// several iovecs; a buffer that touches unbacked addresses is refused
/// whole, so the caller never does I/O on part of a bad buffer.
pub fn push_iovecs(
    mem: &GuestMemory,
    addr: GuestAddress,
    len: u64,
    out: &mut Vec<libc::iovec>,
) -> Result<(), OutOfGuestMemory> {
    let err = OutOfGuestMemory { addr: addr.0, len };
    let start = out.len();
    let mut cur = addr.0;
    let mut left = len;
    while left > 0 {
        let Some((region, raddr)) = mem.to_region_addr(GuestAddress(cur)) else {
            out.truncate(start);
            return Err(err);
        };
        let in_region = region.len() - raddr.0;
        let n = left.min(in_region);
        let Ok(host) = region.get_host_address(raddr) else {
            out.truncate(start);
            return Err(err);
        };
        out.push(libc::iovec { iov_base: host.cast(), iov_len: n as usize });
        left -= n;
        cur = match cur.checked_add(n) {
            Some(c) => c,
            None if left == 0 => break,
            None => {
                out.truncate(start);
                return Err(err);
            }
        };
    }
    Ok(())
}

/// Total bytes covered by a list of iovecs.
pub fn iov_len(iov: &[libc::iovec]) -> usize {
    iov.iter().map(|v| v.iov_len).sum()
}

/// Copies `data` into the iovecs starting at byte `offset` of their
/// concatenation; returns how many bytes fitted.
pub fn iov_write_at(iov: &[libc::iovec], mut offset: usize, data: &[u8]) -> usize {
    let mut done = 0;
    for v in iov {
        if done == data.len() {
            break;
        }
        if offset >= v.iov_len {
            offset -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - offset).min(data.len() - done);
        // SAFETY: `v` was built by `push_iovecs` from a mapped guest memory
        // region that outlives this call, and `offset + n <= v.iov_len`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data[done..].as_ptr(),
                (v.iov_base as *mut u8).add(offset),
                n,
            )
        };
        done += n;
        offset = 0;
    }
    done
}

/// Copies bytes from the iovecs starting at byte `offset` into `buf`;
/// returns how many bytes were available.
pub fn iov_read_at(iov: &[libc::iovec], mut offset: usize, buf: &mut [u8]) -> usize {
    let mut done = 0;
    for v in iov {
        if done == buf.len() {
            break;
        }
        if offset >= v.iov_len {
            offset -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - offset).min(buf.len() - done);
        // SAFETY: as in `iov_write_at`; the source lies inside a mapped region.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (v.iov_base as *const u8).add(offset),
                buf[done..].as_mut_ptr(),
                n,
            )
        };
        done += n;
        offset = 0;
    }
    done
}

/// Splits an iovec list at byte `at`: returns the iovecs for `[at, end)`.
pub fn iov_skip(iov: &[libc::iovec], mut at: usize) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(iov.len());
    for v in iov {
        if at >= v.iov_len {
            at -= v.iov_len;
            continue;
        }
        out.push(libc::iovec {
            // SAFETY: `at < v.iov_len`, so the pointer stays inside the buffer.
            iov_base: unsafe { (v.iov_base as *mut u8).add(at) }.cast(),
            iov_len: v.iov_len - at,
        });
        at = 0;
    }
    out
}

/// Keeps only the first `len` bytes of an iovec list.
pub fn iov_truncate(iov: &mut Vec<libc::iovec>, mut len: usize) {
    let mut keep = 0;
    for v in iov.iter_mut() {
        if len == 0 {
            break;
        }
        v.iov_len = v.iov_len.min(len);
        len -= v.iov_len;
        keep += 1;
    }
    iov.truncate(keep);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_crossing_regions_split_and_holes_are_refused() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap();
        let mut iov = Vec::new();
        push_iovecs(&mem, GuestAddress(0xff0), 0x20, &mut iov).unwrap();
        assert_eq!(iov.len(), 2);
        assert_eq!(iov_len(&iov), 0x20);
        assert!(push_iovecs(&mem, GuestAddress(0x1ff0), 0x20, &mut iov).is_err());
        assert_eq!(iov.len(), 2, "a refused buffer adds nothing");
        assert_eq!(iov_write_at(&iov, 0xc, b"abcdefgh"), 8);
        let mut back = [0u8; 8];
        assert_eq!(iov_read_at(&iov, 0xc, &mut back), 8);
        assert_eq!(&back, b"abcdefgh");
        let tail = iov_skip(&iov, 0x18);
        assert_eq!(iov_len(&tail), 8);
    }
}
