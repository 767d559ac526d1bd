//! The net back-end on a real TAP in a network namespace of its own,
//! through a vhost-user frontend: a ping to the kernel answers; receive
//! buffers the queue thread was holding survive GET_VRING_BASE (they go
//! back to the ring); after a new frontend connects, receive runs on
//! buffers already in the ring without waiting for a kick.
//!
//! Needs root and /dev/net/tun; without them it says why and passes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kickvm_virtio::driver::Buf;
use kickvm_virtio::net::{NetConfig, NetDevice};
use vm_memory::GuestAddress;

const TAP: &str = "kvvtap0";
const TAP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const TAP_IP: [u8; 4] = [10, 0, 0, 1];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
const MEM: usize = 4 << 20;
/// virtio-net header with VERSION_1 (num_buffers included).
const HDR: usize = 12;
const RX: usize = 0;
const TX: usize = 1;

fn csum(data: &[u8]) -> u16 {
    let mut s: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// An ICMP echo request from the guest to the TAP's address.
fn icmp_echo(seq: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x4b, 0x00];
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend((0..56u8).map(|i| i ^ 0x5a));
    let c = csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 1, 0, 0];
    ip[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&TAP_IP);
    let c = csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = TAP_MAC.to_vec();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend(ip);
    f.extend(icmp);
    f
}

fn is_echo_reply(f: &[u8], seq: u16) -> bool {
    f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 1 && f[30..34] == GUEST_IP && f[34] == 0 && f[40..42] == seq.to_be_bytes()
}

/// Posts one receive buffer (no kick).
fn post_rx(f: &mut Front) -> GuestAddress {
    let a = f.guest.alloc(2048, 64);
    f.queues[RX].post(&[Buf::inb(a, 2048)]).unwrap();
    a
}

/// Sends echo request `seq`; waits for its reply on the receive queue,
/// re-posting each buffer used (kicking, as Linux does).
fn ping(f: &mut Front, seq: u16) {
    let mut frame = vec![0u8; HDR];
    frame.extend(icmp_echo(seq));
    let a = f.guest.alloc_bytes(&frame);
    f.queues[TX].post(&[Buf::out(a, frame.len() as u32)]).unwrap();
    f.queues[TX].kick();
    let end = Instant::now() + T;
    while Instant::now() < end {
        if f.queues[RX].wait_used(Duration::from_millis(50)).is_none() {
            continue;
        }
        // Other packets (the kernel's own) may come first: look at the
        // content of every buffer posted.
        if f.rx_bufs.iter().any(|&b| is_echo_reply(&f.guest.read(b, 2048)[HDR..], seq)) {
            return;
        }
    }
    panic!("no echo reply for seq {seq}");
}

#[test]
fn ping_held_buffers_and_a_second_frontend() {
    init_log();
    let Some(ns) = NetNs::new("net") else { return };
    let cfg = NetConfig { name: "net0".into(), tap: TAP.into(), mac: GUEST_MAC, queue_pairs: 1, mtu: None };
    let dev = NetDevice::new(cfg).expect("TAP");
    ns.ip(&format!("link set {TAP} address 02:00:00:00:00:01"));
    ns.ip(&format!("addr add 10.0.0.1/24 dev {TAP}"));
    ns.ip(&format!("link set {TAP} up"));
    ns.ip(&format!("neigh replace 10.0.0.2 lladdr 52:54:00:12:34:56 dev {TAP}"));
    let dir = Scratch::new("net");
    let be = start_backend(&dir, Box::new(dev), 2);

    let version_1 = 1u64 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    let mut f = Front::connect(&be.socket, MEM, version_1);
    f.add_queue(RX as u16, 64);
    f.add_queue(TX as u16, 64);
    // One receive buffer at a time: the queue thread holds it while it
    // waits for a packet.
    let b = post_rx(&mut f);
    f.rx_bufs.push(b);
    f.queues[RX].kick();
    ping(&mut f, 1);
    let b = post_rx(&mut f);
    f.rx_bufs.push(b);
    f.queues[RX].kick();
    std::thread::sleep(Duration::from_millis(100));

    // Stop the receive queue: the held buffer goes back to the ring, so
    // the base is the used index, not the avail index...
    let base = f.stop_queue(RX);
    assert_eq!(base, u32::from(f.queues[RX].used_idx()), "GET_VRING_BASE hands back the held buffer");
    assert_eq!(f.queues[RX].avail_idx(), 2);
    // ...and after the restart there, the reply lands in it.
    f.start_queue(RX, base as u16);
    ping(&mut f, 2);
    drop(f);

    // A new frontend whose receive ring already has buffers when it is
    // enabled: receive runs without any kick on it.
    let mut f = Front::connect(&be.socket, MEM, version_1);
    let rx = f.layout_queue(RX as u16, 64);
    assert_eq!(rx, RX);
    for _ in 0..4 {
        let b = post_rx(&mut f);
        f.rx_bufs.push(b);
    }
    f.start_queue(RX, 0);
    f.add_queue(TX as u16, 64);
    ping(&mut f, 3);
    drop(f);
    assert!(be.handle.join().unwrap().is_some());
}
