//! What a buggy or hostile guest can write into a ring. In every case the
//! queue thread survives, the chain fails (returned unused, error counted)
//! or the device is marked NEEDS_RESET, and the device's other queue keeps
//! working. Uses virtio-blk over a real file with two queues.

use std::path::PathBuf;
use std::time::Duration;

use kickvm_virtio::block::*;
use kickvm_virtio::driver::{Buf, DriverQueue, Harness, HarnessOpts, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use vm_memory::GuestAddress;

const T: Duration = Duration::from_secs(5);

struct Setup {
    h: Harness,
    path: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn setup(name: &str, queue_size: u16) -> Setup {
    let path = std::env::temp_dir().join(format!("kickvm-malformed-{}-{name}.img", std::process::id()));
    std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
    let mut c = BlockConfig::new(&path);
    c.num_queues = 2;
    let dev = Block::new("blk0", c).unwrap();
    let h = Harness::start(Box::new(dev), HarnessOpts { queue_size, ..Default::default() }).unwrap();
    Setup { h, path }
}

/// A valid 512-byte read on queue `qi`; returns its status address.
fn good_read(h: &mut Harness, qi: usize) -> GuestAddress {
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    let hdr_a = h.guest.alloc_bytes(&hdr);
    let data = h.guest.alloc(512, 512);
    let status = h.guest.alloc_bytes(&[0xff]);
    h.queues[qi].post(&[Buf::out(hdr_a, 16), Buf::inb(data, 512), Buf::inb(status, 1)]).unwrap();
    h.queues[qi].kick();
    status
}

/// Both queues still serve valid requests.
fn assert_still_works(h: &mut Harness) {
    for qi in [0, 1] {
        let st = good_read(h, qi);
        let (_, len) = h.queues[qi].wait_used(T).unwrap_or_else(|| panic!("queue {qi} still serves"));
        assert_eq!((len, h.guest.read(st, 1)[0]), (513, VIRTIO_BLK_S_OK), "queue {qi}");
    }
}

/// Publishes a hand-made chain at `head` on queue 0 and expects it back
/// unused, with one error counted.
fn expect_refused(s: &mut Setup, head: u16) {
    let h = &mut s.h;
    h.queues[0].publish(head);
    h.queues[0].kick();
    let used = h.queues[0].wait_used(T).expect("the bad chain is returned");
    assert_eq!(used, (head, 0), "returned with nothing written");
    assert_eq!(h.device.state().queue(0).errors, 1);
    assert!(!h.needs_reset());
    assert_still_works(h);
}

fn buf(h: &mut Harness, len: u64) -> u64 {
    h.guest.alloc(len, 16).0
}

#[test]
fn descriptor_loop() {
    let mut s = setup("loop", 256);
    let a = buf(&mut s.h, 16);
    let q = &mut s.h.queues[0];
    let (d0, d1) = (q.take_descriptor().unwrap(), q.take_descriptor().unwrap());
    q.write_desc(d0, a, 16, VIRTQ_DESC_F_NEXT, d1);
    q.write_desc(d1, a, 16, VIRTQ_DESC_F_NEXT, d0);
    expect_refused(&mut s, d0);
}

#[test]
fn address_outside_guest_memory() {
    let mut s = setup("oob", 256);
    let q = &mut s.h.queues[0];
    let d0 = q.take_descriptor().unwrap();
    q.write_desc(d0, 1 << 40, 4096, VIRTQ_DESC_F_WRITE, 0);
    expect_refused(&mut s, d0);
}

#[test]
fn address_running_off_the_end_of_guest_memory() {
    let mut s = setup("oob-end", 256);
    let end = 64u64 << 20; // HarnessOpts::default().guest_mem
    let q = &mut s.h.queues[0];
    let d0 = q.take_descriptor().unwrap();
    q.write_desc(d0, end - 16, 4096, VIRTQ_DESC_F_WRITE, 0);
    expect_refused(&mut s, d0);
}

#[test]
fn zero_length_descriptor() {
    let mut s = setup("zero", 256);
    let a = buf(&mut s.h, 16);
    let q = &mut s.h.queues[0];
    let (d0, d1) = (q.take_descriptor().unwrap(), q.take_descriptor().unwrap());
    q.write_desc(d0, a, 16, VIRTQ_DESC_F_NEXT, d1);
    q.write_desc(d1, a, 0, VIRTQ_DESC_F_WRITE, 0);
    expect_refused(&mut s, d0);
}

#[test]
fn wrong_direction_descriptor() {
    let mut s = setup("dir", 256);
    let a = buf(&mut s.h, 16);
    let q = &mut s.h.queues[0];
    let (d0, d1) = (q.take_descriptor().unwrap(), q.take_descriptor().unwrap());
    // A device-writable descriptor followed by a device-readable one.
    q.write_desc(d0, a, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, d1);
    q.write_desc(d1, a, 16, 0, 0);
    expect_refused(&mut s, d0);
}

#[test]
fn chain_longer_than_the_queue() {
    let mut s = setup("long", 8);
    let a = buf(&mut s.h, 16);
    let q = &mut s.h.queues[0];
    let ids: Vec<u16> = (0..8).map(|_| q.take_descriptor().unwrap()).collect();
    // Every descriptor of the table chained, the last pointing back to the
    // first: the chain never ends within the queue's 8 entries.
    for (i, &d) in ids.iter().enumerate() {
        q.write_desc(d, a, 16, VIRTQ_DESC_F_NEXT, ids[(i + 1) % ids.len()]);
    }
    let head = ids[0];
    s.h.queues[0].publish(head);
    s.h.queues[0].kick();
    assert_eq!(s.h.queues[0].wait_used(T), Some((head, 0)));
    assert_eq!(s.h.device.state().queue(0).errors, 1);
}

#[test]
fn bad_indirect_table_length() {
    let mut s = setup("ind-len", 256);
    let table = buf(&mut s.h, 64);
    let q = &mut s.h.queues[0];
    let d0 = q.take_descriptor().unwrap();
    q.write_desc(d0, table, 20, VIRTQ_DESC_F_INDIRECT, 0);
    expect_refused(&mut s, d0);
}

#[test]
fn indirect_table_outside_guest_memory() {
    let mut s = setup("ind-oob", 256);
    let q = &mut s.h.queues[0];
    let d0 = q.take_descriptor().unwrap();
    q.write_desc(d0, 1 << 40, 64, VIRTQ_DESC_F_INDIRECT, 0);
    expect_refused(&mut s, d0);
}

#[test]
fn nested_indirect_table() {
    let mut s = setup("ind-nest", 256);
    let table = buf(&mut s.h, 32);
    let inner = buf(&mut s.h, 32);
    let mem = s.h.guest.mem().clone();
    DriverQueue::write_indirect_desc(&mem, GuestAddress(table), 0, inner, 32, VIRTQ_DESC_F_INDIRECT, 0);
    let q = &mut s.h.queues[0];
    let d0 = q.take_descriptor().unwrap();
    q.write_desc(d0, table, 16, VIRTQ_DESC_F_INDIRECT, 0);
    expect_refused(&mut s, d0);
}

#[test]
fn indirect_table_with_a_loop() {
    let mut s = setup("ind-loop", 256);
    let table = buf(&mut s.h, 32);
    let a = buf(&mut s.h, 16);
    let mem = s.h.guest.mem().clone();
    DriverQueue::write_indirect_desc(&mem, GuestAddress(table), 0, a, 16, VIRTQ_DESC_F_NEXT, 1);
    DriverQueue::write_indirect_desc(&mem, GuestAddress(table), 1, a, 16, VIRTQ_DESC_F_NEXT, 0);
    let q = &mut s.h.queues[0];
    let d0 = q.take_descriptor().unwrap();
    q.write_desc(d0, table, 32, VIRTQ_DESC_F_INDIRECT, 0);
    expect_refused(&mut s, d0);
}

#[test]
fn valid_indirect_chain_works() {
    let mut s = setup("ind-ok", 256);
    let h = &mut s.h;
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    let hdr_a = h.guest.alloc_bytes(&hdr);
    let data = h.guest.alloc(1024, 512);
    let status = h.guest.alloc_bytes(&[0xff]);
    let head = h.queues[0]
        .add_indirect(&mut h.guest, &[Buf::out(hdr_a, 16), Buf::inb(data, 1024), Buf::inb(status, 1)])
        .unwrap();
    h.queues[0].publish(head);
    h.queues[0].kick();
    assert_eq!(h.queues[0].wait_used(T), Some((head, 1025)));
    assert_eq!(h.guest.read(status, 1)[0], VIRTIO_BLK_S_OK);
}

#[test]
fn head_index_outside_the_table() {
    let mut s = setup("head", 256);
    s.h.queues[0].publish(300);
    s.h.queues[0].kick();
    // The device cannot return a head it does not have: the avail ring is
    // corrupt, so the device needs a reset; its other queue goes on.
    wait_needs_reset(&s.h);
    assert_eq!(s.h.device.state().queue(0).errors, 1);
    let st = good_read(&mut s.h, 1);
    assert!(s.h.queues[1].wait_used(T).is_some());
    assert_eq!(s.h.guest.read(st, 1)[0], VIRTIO_BLK_S_OK);
}

fn wait_needs_reset(h: &Harness) {
    let deadline = std::time::Instant::now() + T;
    while !h.needs_reset() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(h.needs_reset(), "device marked NEEDS_RESET");
}

#[test]
fn avail_index_jumping_more_than_the_queue_size_needs_reset() {
    let mut s = setup("jump", 16);
    let h = &mut s.h;
    h.queues[0].set_avail_idx(100);
    h.queues[0].kick();
    wait_needs_reset(h);
    assert_eq!(h.config_call.read().unwrap_or(0), 1, "configuration-change interrupt raised");
    assert_eq!(h.device.state().queue(0).errors, 1);
    // The broken queue serves nothing more, the other one goes on.
    let st = good_read(h, 1);
    assert!(h.queues[1].wait_used(T).is_some());
    assert_eq!(h.guest.read(st, 1)[0], VIRTIO_BLK_S_OK);
    // Its thread is still alive and stops on reset.
    let t = std::time::Instant::now();
    h.reset();
    assert!(t.elapsed() < Duration::from_millis(500));
}
