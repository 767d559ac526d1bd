//! The blk back-end driven by a vhost-user frontend over a real socket,
//! with guest memory in a memfd and the disk a real file in /dev/shm:
//! negotiation, I/O, stop and restart at the returned base, a second
//! frontend after the first, and a memory table that changes under
//! running queues.

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;

use common::*;
use kickvm_virtio::block::{Block, BlockConfig};
use kickvm_virtio::driver::{Buf, Guest};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 4 << 20;
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;

fn disk(dir: &Scratch, size: usize) -> std::path::PathBuf {
    let path = dir.path("disk.img");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&vec![0x5a; size]).unwrap();
    path
}

fn blk(path: &std::path::Path, queues: u16) -> Box<Block> {
    let mut c = BlockConfig::new(path);
    c.num_queues = queues;
    Box::new(Block::new("blk0", c).unwrap())
}

/// Posts a request on driver queue `qi` and kicks; returns the status
/// byte's address. `data_at`: where the data buffer is (default: allocated).
fn post(front: &mut Front, qi: usize, ty: u32, sector: u64, data: &[u8], data_at: Option<GuestAddress>) -> (GuestAddress, GuestAddress) {
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&ty.to_le_bytes());
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    let g: &mut Guest = &mut front.guest;
    let hdr_a = g.alloc_bytes(&hdr);
    let status = g.alloc_bytes(&[0xff]);
    let data_a = data_at.unwrap_or_else(|| g.alloc(data.len() as u64, 512));
    let buf = if ty == VIRTIO_BLK_T_OUT {
        g.mem().write_slice(data, data_a).unwrap();
        Buf::out(data_a, data.len() as u32)
    } else {
        Buf::inb(data_a, data.len() as u32)
    };
    front.queues[qi].post(&[Buf::out(hdr_a, 16), buf, Buf::inb(status, 1)]).unwrap();
    front.queues[qi].kick();
    (status, data_a)
}

/// Waits for the next completion on `qi`; returns the status byte.
fn complete(front: &mut Front, qi: usize, status: GuestAddress) -> u8 {
    front.queues[qi].wait_used(T).expect("the request completes");
    front.guest.read(status, 1)[0]
}

fn write_read(front: &mut Front, wq: usize, rq: usize, sector: u64, fill: u8) {
    let data = vec![fill; 4096];
    let (s, _) = post(front, wq, VIRTIO_BLK_T_OUT, sector, &data, None);
    assert_eq!(complete(front, wq, s), 0, "write status");
    let (s, d) = post(front, rq, VIRTIO_BLK_T_IN, sector, &[0; 4096], None);
    assert_eq!(complete(front, rq, s), 0, "read status");
    assert_eq!(front.guest.read(d, 4096), data, "read back what was written");
}

#[test]
fn negotiate_config_write_and_read_back() {
    init_log();
    let dir = Scratch::new("rw");
    let path = disk(&dir, 1 << 20);
    let be = start_backend(&dir, blk(&path, 2), 1);
    let mut f = Front::connect(&be.socket, MEM, u64::MAX);
    assert!(f.fe.get_queue_num().unwrap() >= 2, "GET_QUEUE_NUM covers the queues asked for");
    // GET_CONFIG: the whole virtio_blk_config; capacity in 512-byte sectors.
    let (_, cfg) = f.fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0; 60]).unwrap();
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), (1 << 20) / 512);
    assert_eq!(u16::from_le_bytes(cfg[34..36].try_into().unwrap()), 2, "num_queues");
    // SET_CONFIG (the writeback cache flag) is taken.
    f.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[1]).unwrap();
    f.add_queue(0, 128);
    f.add_queue(1, 128);
    write_read(&mut f, 0, 1, 8, 0xa1);
    let mut on_disk = vec![0u8; 4096];
    std::fs::File::open(&path).unwrap().read_exact_at(&mut on_disk, 8 * 512).unwrap();
    assert_eq!(on_disk, vec![0xa1; 4096], "the write reached the file");
    drop(f);
    assert!(be.handle.join().unwrap().is_some(), "the device comes back for the next frontend");
}

#[test]
fn stop_and_restart_at_the_returned_base() {
    init_log();
    let dir = Scratch::new("restart");
    let path = disk(&dir, 1 << 20);
    let be = start_backend(&dir, blk(&path, 1), 1);
    let mut f = Front::connect(&be.socket, MEM, u64::MAX);
    f.add_queue(0, 64);
    for i in 0..3 {
        write_read(&mut f, 0, 0, i, 0x10 + i as u8);
    }
    let base = f.stop_queue(0);
    assert_eq!(base, 6, "GET_VRING_BASE: where the ring stopped");
    // Stopped: a request waits.
    let (s, _) = post(&mut f, 0, VIRTIO_BLK_T_OUT, 40, &[0x77; 512], None);
    assert!(f.queues[0].wait_used(std::time::Duration::from_millis(300)).is_none(), "a stopped ring serves nothing");
    // Started again where it stopped: the waiting request is served
    // without another kick, and I/O goes on.
    f.start_queue(0, base as u16);
    assert_eq!(complete(&mut f, 0, s), 0);
    write_read(&mut f, 0, 0, 41, 0x88);
}

#[test]
fn a_second_frontend_after_the_first_closes() {
    init_log();
    let dir = Scratch::new("reconnect");
    let path = disk(&dir, 1 << 20);
    let be = start_backend(&dir, blk(&path, 1), 2);
    let mut f = Front::connect(&be.socket, MEM, u64::MAX);
    f.add_queue(0, 64);
    write_read(&mut f, 0, 0, 1, 0x31);
    drop(f);
    // A new frontend (a reconnecting QEMU): new memory, rings from 0.
    let mut f = Front::connect(&be.socket, MEM, u64::MAX);
    f.add_queue(0, 64);
    write_read(&mut f, 0, 0, 1, 0x32);
    drop(f);
    assert!(be.handle.join().unwrap().is_some());
}

#[test]
fn memory_table_changes_under_running_queues() {
    init_log();
    let dir = Scratch::new("memtable");
    let path = disk(&dir, 1 << 20);
    let be = start_backend(&dir, blk(&path, 1), 1);
    let mut f = Front::connect(&be.socket, MEM, u64::MAX);
    f.add_queue(0, 64);
    write_read(&mut f, 0, 0, 2, 0x41);

    // Second RAM region: another memfd at guest 64 MiB, known to the
    // test guest but not yet to the back-end.
    const HIGH: u64 = 64 << 20;
    const HIGH_SIZE: usize = 1 << 20;
    let high = memfd(HIGH_SIZE);
    let mem = kickvm_virtio::GuestMemory::from_ranges_with_files(&[
        (GuestAddress(0), MEM, Some(vm_memory::FileOffset::new(f.memfd.try_clone().unwrap(), 0))),
        (GuestAddress(HIGH), HIGH_SIZE, Some(vm_memory::FileOffset::new(high.try_clone().unwrap(), 0))),
    ])
    .unwrap();
    let used_so_far = f.guest.alloc(0, 1);
    f.guest = Guest::with_memory(mem, MEM);
    f.guest.alloc(used_so_far.0, 1);
    let high_region = |size| vhost::VhostUserMemoryRegionInfo {
        guest_phys_addr: HIGH,
        memory_size: size as u64,
        userspace_addr: USER_BASE + HIGH,
        mmap_offset: 0,
        mmap_handle: std::os::fd::AsRawFd::as_raw_fd(&high),
    };

    // A buffer up there fails while the back-end does not map it...
    let (s, _) = post(&mut f, 0, VIRTIO_BLK_T_OUT, 3, &[0x42; 512], Some(GuestAddress(HIGH)));
    let (_, len) = f.queues[0].wait_used(T).expect("refused, but returned");
    assert!(len == 0 || f.guest.read(s, 1)[0] != 0, "a buffer outside guest memory is not served");

    // ...and works once SET_MEM_TABLE adds the region, queues running.
    f.fe.set_mem_table(&[f.region(0, MEM), high_region(HIGH_SIZE)]).unwrap();
    let (s, _) = post(&mut f, 0, VIRTIO_BLK_T_OUT, 3, &[0x43; 512], Some(GuestAddress(HIGH)));
    assert_eq!(complete(&mut f, 0, s), 0);
    let mut on_disk = vec![0u8; 512];
    std::fs::File::open(&path).unwrap().read_exact_at(&mut on_disk, 3 * 512).unwrap();
    assert_eq!(on_disk, vec![0x43; 512]);

    // REM_MEM_REG / ADD_MEM_REG (CONFIGURE_MEM_SLOTS) the same way.
    f.fe.remove_mem_region(&high_region(HIGH_SIZE)).unwrap();
    let (_, _) = post(&mut f, 0, VIRTIO_BLK_T_OUT, 4, &[0x44; 512], Some(GuestAddress(HIGH)));
    let (_, len) = f.queues[0].wait_used(T).expect("refused, but returned");
    assert_eq!(len, 0, "the removed region is no longer mapped");
    f.fe.add_mem_region(&high_region(HIGH_SIZE)).unwrap();
    let (s, _) = post(&mut f, 0, VIRTIO_BLK_T_OUT, 4, &[0x45; 512], Some(GuestAddress(HIGH)));
    assert_eq!(complete(&mut f, 0, s), 0);
    write_read(&mut f, 0, 0, 5, 0x46);
}
