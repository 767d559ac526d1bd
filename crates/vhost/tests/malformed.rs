//! What a buggy or hostile frontend sends: regions that do not map, rings
//! outside guest memory, fds that are not eventfds, sizes and indexes out
//! of range, messages out of order, garbage on the socket. Each is refused
//! with one log line; the back-end stays up, and the same connection (or,
//! when the stream cannot be trusted any more, the next one) goes on.

mod common;

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use kickvm_virtio::driver::Buf;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 2 << 20;

fn rng() -> Box<dyn kickvm_virtio::VirtioDevice> {
    kickvm_vhost::DeviceSpec::parse(kickvm_vhost::DeviceKind::Rng, "").unwrap().build().unwrap()
}

/// The rng works on this connection: entropy arrives on queue 0.
fn entropy_arrives(f: &mut Front) {
    let buf = f.guest.alloc(64, 16);
    f.queues[0].post(&[Buf::inb(buf, 64)]).unwrap();
    f.queues[0].kick();
    let (_, len) = f.queues[0].wait_used(T).expect("entropy arrives");
    assert_eq!(len, 64);
}

/// A pipe's read end, dressed as an EventFd for the frontend's API.
fn not_an_eventfd() -> EventFd {
    let mut fds = [0i32; 2];
    // SAFETY: a valid array of two fds.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: closing the write end we own.
    unsafe { libc::close(fds[1]) };
    // SAFETY: the read end is ours; it is only passed over the socket.
    unsafe { EventFd::from_raw_fd(fds[0]) }
}

#[test]
fn bad_requests_are_refused_and_the_connection_goes_on() {
    init_log();
    let dir = Scratch::new("refused");
    let be = start_backend(&dir, rng(), 1);
    let mut f = Front::connect(&be.socket, MEM, u64::MAX);

    // Memory regions that do not map: past the end of the memfd, an fd
    // that is not a file, regions that overlap.
    assert!(f.fe.set_mem_table(&[f.region(0, 2 * MEM)]).is_err(), "region past the end of its file");
    let pipe = not_an_eventfd();
    let mut r = f.region(0, MEM);
    r.mmap_handle = pipe.as_raw_fd();
    assert!(f.fe.set_mem_table(&[r]).is_err(), "region on a pipe");
    let overlapping = [f.region(0, MEM), f.region(4096, 4096)];
    assert!(f.fe.set_mem_table(&overlapping).is_err(), "overlapping regions");

    // Queue sizes and indexes out of range.
    assert!(f.fe.set_vring_num(0, 3).is_err(), "size not a power of two");
    assert!(f.fe.set_vring_num(0, 4096).is_err(), "size above the device's maximum");
    assert!(f.fe.set_vring_num(7, 64).is_err(), "queue that does not exist");
    assert!(f.fe.set_vring_enable(7, true).is_err(), "enable a queue that does not exist");

    // A ring outside guest memory.
    f.fe.set_vring_num(0, 64).unwrap();
    let outside = VringConfigData {
        queue_max_size: 64,
        queue_size: 64,
        flags: 0,
        desc_table_addr: USER_BASE + MEM as u64 - 16,
        used_ring_addr: USER_BASE + 0x2000,
        avail_ring_addr: USER_BASE + 0x3000,
        log_addr: None,
    };
    assert!(f.fe.set_vring_addr(0, &outside).is_err(), "descriptor table past the end of memory");
    let unmapped = VringConfigData { desc_table_addr: 0x1000, ..outside };
    assert!(f.fe.set_vring_addr(0, &unmapped).is_err(), "a guest address where a user address belongs");

    // Kick and call fds that are not eventfds.
    assert!(f.fe.set_vring_kick(0, &not_an_eventfd()).is_err(), "kick on a pipe");
    assert!(f.fe.set_vring_call(0, &not_an_eventfd()).is_err(), "call on a pipe");

    // Configuration space out of range.
    assert!(f.fe.set_config(1000, VhostUserConfigFlags::WRITABLE, &[1; 8]).is_err());

    // After all that, the same connection sets a queue up and it works.
    f.add_queue(0, 64);
    entropy_arrives(&mut f);
}

#[test]
fn messages_out_of_order() {
    init_log();
    let dir = Scratch::new("order");
    let be = start_backend(&dir, rng(), 1);
    let mut f = Front::connect(&be.socket, MEM, u64::MAX);
    let q = kickvm_virtio::driver::DriverQueue::new(&mut f.guest, 0, 64);
    let s = q.setup();
    f.queues.push(q);
    // Kick, call and enable before size and addresses: the ring waits...
    f.fe.set_vring_kick(0, &s.kick).unwrap();
    f.fe.set_vring_call(0, &s.call).unwrap();
    f.fe.set_vring_enable(0, true).unwrap();
    // ... a GET_VRING_BASE of a ring that never ran answers its base ...
    assert_eq!(f.fe.get_vring_base(0).unwrap(), 0);
    // ... and it runs once it has everything.
    f.fe.set_vring_kick(0, &s.kick).unwrap();
    f.fe.set_vring_num(0, 64).unwrap();
    let q = &f.queues[0];
    let cfg = VringConfigData {
        queue_max_size: 64,
        queue_size: 64,
        flags: 0,
        desc_table_addr: USER_BASE + q.desc.0,
        used_ring_addr: USER_BASE + q.used.0,
        avail_ring_addr: USER_BASE + q.avail.0,
        log_addr: None,
    };
    f.fe.set_vring_addr(0, &cfg).unwrap();
    entropy_arrives(&mut f);

    // A memory table that no longer covers the running ring stops it
    // (never an old mapping); the right table brings it back.
    f.fe.set_mem_table(&[f.region(0, 4096)]).unwrap();
    let buf = f.guest.alloc(64, 16);
    f.queues[0].post(&[Buf::inb(buf, 64)]).unwrap();
    f.queues[0].kick();
    assert!(f.queues[0].wait_used(Duration::from_millis(300)).is_none(), "no ring outside guest memory is served");
    f.fe.set_mem_table(&[f.region(0, MEM)]).unwrap();
    f.queues[0].wait_used(T).expect("served again on the new table");
}

/// Sends raw bytes as a frontend would, then closes.
fn raw(socket: &std::path::Path, bytes: &[u8]) {
    let mut s = UnixStream::connect(socket).unwrap();
    let _ = s.write_all(bytes);
    // The back-end closes its side: our read sees EOF, not a hang.
    s.set_read_timeout(Some(T)).unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut s, &mut buf);
    assert!(matches!(n, Ok(0)) || n.is_err(), "the back-end dropped the connection");
}

fn header(code: u32, flags: u32, size: u32) -> Vec<u8> {
    [code.to_le_bytes(), flags.to_le_bytes(), size.to_le_bytes()].concat()
}

#[test]
fn garbage_on_the_socket_ends_only_that_connection() {
    init_log();
    let dir = Scratch::new("garbage");
    let be = start_backend(&dir, rng(), 6);
    // An unknown request, a bad version, a body larger than any message.
    raw(&be.socket, &header(0xdead, 1, 0));
    raw(&be.socket, &header(1, 7, 0));
    raw(&be.socket, &header(2, 1, 0x10_0000));
    // GET_VRING_BASE of a queue that does not exist: no reply can be
    // given, so the connection ends (the frontend sees an error, not a hang).
    {
        let stream = UnixStream::connect(&be.socket).unwrap();
        let fe = Frontend::from_stream(stream, 64);
        fe.set_owner().unwrap();
        fe.get_features().unwrap();
        assert!(fe.get_vring_base(9).is_err());
    }
    // A region wrapping around the address space: the vhost crate refuses
    // the message before we see it, and the connection ends.
    {
        let mut f = Front::connect(&be.socket, MEM, u64::MAX);
        let mut r = f.region(0, MEM);
        r.guest_phys_addr = u64::MAX - 4096;
        assert!(f.fe.set_mem_table(&[r]).is_err(), "region wrapping around");
        assert!(f.fe.get_features().is_err(), "that connection is gone");
        f.queues.clear();
    }
    // The back-end is still there for a well-behaved frontend.
    let mut f = Front::connect(&be.socket, MEM, u64::MAX);
    f.add_queue(0, 64);
    entropy_arrives(&mut f);
    drop(f);
    assert!(be.handle.join().unwrap().is_some());
}

#[test]
fn features_and_protocol_features_not_offered_are_refused() {
    init_log();
    let dir = Scratch::new("features");
    let be = start_backend(&dir, rng(), 1);
    let stream = UnixStream::connect(&be.socket).unwrap();
    let mut fe = Frontend::from_stream(stream, 64);
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    fe.set_features(offered).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    for f in [
        vhost::vhost_user::VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        vhost::vhost_user::VhostUserProtocolFeatures::STATUS,
        vhost::vhost_user::VhostUserProtocolFeatures::LOG_SHMFD,
    ] {
        assert!(!pf.contains(f), "{f:?} must not be offered");
    }
    assert!(fe.get_queue_num().is_err(), "MQ not acked yet: refused by the frontend side");
}

/// A raw SET_VRING_ENABLE, as QEMU's net sends it before SET_FEATURES.
fn early_enable(stream: &mut UnixStream, index: u32) {
    const SET_VRING_ENABLE: u32 = 18;
    let mut m = header(SET_VRING_ENABLE, 1, 8);
    m.extend_from_slice(&index.to_le_bytes());
    m.extend_from_slice(&1u32.to_le_bytes());
    stream.write_all(&m).unwrap();
}

#[test]
fn rings_start_disabled_with_protocol_features() {
    init_log();
    let dir = Scratch::new("disabled");
    let be = start_backend(&dir, rng(), 1);
    let mut f = Front::connect(&be.socket, MEM, u64::MAX);
    let qi = f.layout_queue(0, 64);
    f.kick_queue(qi, 0);
    let buf = f.guest.alloc(64, 16);
    f.queues[0].post(&[Buf::inb(buf, 64)]).unwrap();
    f.queues[0].kick();
    assert!(f.queues[0].wait_used(Duration::from_millis(300)).is_none(), "a ring is not served before SET_VRING_ENABLE(1)");
    f.fe.set_vring_enable(0, true).unwrap();
    f.queues[0].wait_used(T).expect("served once enabled");
}

#[test]
fn an_enable_before_the_features_counts_once_they_are_set() {
    init_log();
    let dir = Scratch::new("early-enable");
    let be = start_backend(&dir, rng(), 1);
    let mut stream = Front::stream(&be.socket);
    early_enable(&mut stream, 0);
    let mut f = Front::connect_stream(stream, MEM, u64::MAX);
    let qi = f.layout_queue(0, 64);
    f.kick_queue(qi, 0);
    entropy_arrives(&mut f);
}

/// Huge or misaligned sizes, slots past the limit, and a request repeated
/// without end: each refused, counted, the connection goes on.
#[test]
fn huge_sizes_too_many_slots_and_repeats_are_refused() {
    init_log();
    let dir = Scratch::new("huge");
    let be = start_backend(&dir, rng(), 1);
    let mut f = Front::connect(&be.socket, MEM, u64::MAX);

    // Memory: an offset mmap cannot take, a size past what the memfd
    // holds by far, more slots than offered.
    let mut r = f.region(0, MEM);
    r.mmap_offset = 1;
    r.memory_size = 4096;
    assert!(f.fe.set_mem_table(&[r]).is_err(), "offset not page-aligned");
    let mut r = f.region(0, MEM);
    r.memory_size = 1 << 46;
    assert!(f.fe.set_mem_table(&[r]).is_err(), "64 TiB region");
    let slots = f.fe.get_max_mem_slots().unwrap();
    assert_eq!(slots, kickvm_vhost::memory::MAX_MEM_SLOTS as u64);
    let mut added = 0;
    for i in 1..=slots + 2 {
        let mut r = f.region(0, 4096);
        r.guest_phys_addr = i << 32;
        r.userspace_addr = USER_BASE + (i << 32);
        if f.fe.add_mem_region(&r).is_ok() {
            added += 1;
        }
    }
    assert_eq!(added, slots - 1, "one slot holds the first table; the rest fill up, then refused");

    // Rings and configuration: sizes past every limit.
    assert!(f.fe.set_vring_num(0, 0).is_err(), "size 0");
    assert!(f.fe.set_vring_num(0, u16::MAX).is_err(), "size 65535");
    assert!(f.fe.get_config(0, 1 << 12, VhostUserConfigFlags::empty(), &[0; 4096]).is_err(), "a 4 KiB config read");

    // The same bad request, a thousand times: counted, every one refused
    // (the log shows a few: see ratelimit), the connection still serves.
    let before = kickvm_vhost::REFUSED.count();
    for _ in 0..1000 {
        assert!(f.fe.set_vring_num(0, 3).is_err());
    }
    assert!(kickvm_vhost::REFUSED.count() >= before + 1000);
    f.add_queue(0, 64);
    entropy_arrives(&mut f);
}

/// Requests before their prerequisites: rings and fds before the
/// features and before any memory, a GET_VRING_BASE of a ring never
/// started.
#[test]
fn requests_before_features_and_memory() {
    init_log();
    let dir = Scratch::new("before");
    let be = start_backend(&dir, rng(), 2);
    let stream = Front::stream(&be.socket);
    let fe = Frontend::from_stream(stream, 64);
    fe.set_owner().unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    // No features, no memory: the ring is remembered, not run.
    fe.set_vring_num(0, 64).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    assert_eq!(fe.get_vring_base(0).unwrap(), 0);
    drop(fe);
    // The next frontend starts from nothing and is served.
    let mut f = Front::connect(&be.socket, MEM, u64::MAX);
    f.add_queue(0, 64);
    entropy_arrives(&mut f);
}
