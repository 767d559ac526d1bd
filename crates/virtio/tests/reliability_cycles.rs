//! Device reset cycles keep the process flat (issue 12): a disk, a console
//! on a socket, an entropy device and (as root, in a network namespace of
//! its own) a network card are reset and re-activated again and again,
//! with I/O on every queue in each cycle, while the process's RSS, open
//! fds and threads are sampled. Threads and fds must come back to the same
//! numbers after every cycle; RSS may not grow by more than 2 MiB.
//!
//! `KICKVM_RESET_CYCLES` (default 100; `scripts/reliability.sh resets` runs
//! 1000). This file holds one test so that nothing else in the process
//! moves the counts.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use kickvm_virtio::block::*;
use kickvm_virtio::console::{Backend, Console};
use kickvm_virtio::driver::{Buf, Harness, HarnessOpts};
use kickvm_virtio::net::{NetConfig, NetDevice};
use kickvm_virtio::rng::{Rng, RngConfig};

const T: Duration = Duration::from_secs(5);

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap()
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Guest memory for a harness: large enough for every cycle's fresh rings
/// and buffers, and touched in full at the start so that what the test
/// driver allocates later does not show as growth.
fn opts() -> HarnessOpts {
    HarnessOpts { guest_mem: 64 << 20, ..Default::default() }
}

fn touch_all(h: &mut Harness) {
    let zero = vec![0u8; 1 << 20];
    for mib in 0..(opts().guest_mem >> 20) as u64 {
        h.guest.write(vm_memory::GuestAddress(mib << 20), &zero);
    }
}

/// Reads one buffer of `len` from a device-writable queue `qi` (rng, or a
/// console/net receive queue with input waiting).
fn read_into(h: &mut Harness, qi: usize, len: u32) -> u32 {
    let b = h.guest.alloc(u64::from(len), 16);
    h.queues[qi].post(&[Buf::inb(b, len)]).unwrap();
    h.queues[qi].kick();
    h.queues[qi].wait_used(T).map(|u| u.1).unwrap_or_else(|| panic!("queue {qi} completes"))
}

fn write_from(h: &mut Harness, qi: usize, data: &[u8]) {
    let a = h.guest.alloc_bytes(data);
    h.queues[qi].post(&[Buf::out(a, data.len() as u32)]).unwrap();
    h.queues[qi].kick();
    h.queues[qi].wait_used(T).unwrap_or_else(|| panic!("queue {qi} completes"));
}

fn blk_write_read(h: &mut Harness, cycle: u64) {
    let mut hdr = [0u8; 16];
    let sector = cycle % 2048;
    for (ty, data) in [(VIRTIO_BLK_T_OUT, true), (VIRTIO_BLK_T_IN, false)] {
        hdr[0..4].copy_from_slice(&ty.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        let hdr_a = h.guest.alloc_bytes(&hdr);
        let buf = h.guest.alloc(512, 512);
        if data {
            h.guest.write(buf, &[cycle as u8; 512]);
        }
        let status = h.guest.alloc_bytes(&[0xff]);
        let b = if data { Buf::out(buf, 512) } else { Buf::inb(buf, 512) };
        h.queues[0].post(&[Buf::out(hdr_a, 16), b, Buf::inb(status, 1)]).unwrap();
        h.queues[0].kick();
        h.queues[0].wait_used(T).expect("block request completes");
        assert_eq!(h.guest.read(status, 1)[0], VIRTIO_BLK_S_OK);
        if !data {
            assert_eq!(h.guest.read(buf, 512), vec![cycle as u8; 512]);
        }
    }
}

/// Enters a fresh network namespace on this thread (root only).
fn netns() -> Option<(String, std::fs::File)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("resets: net skipped (needs root and /dev/net/tun)");
        return None;
    }
    let ns = format!("kvcyc-{}", std::process::id());
    Command::new("ip").args(["netns", "add", &ns]).status().ok()?.success().then_some(())?;
    let home = std::fs::File::open("/proc/thread-self/ns/net").ok()?;
    let target = std::fs::File::open(format!("/var/run/netns/{ns}")).ok()?;
    // SAFETY: setns on this thread with a valid namespace fd.
    (unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } == 0).then_some((ns, home))
}

#[test]
fn reset_cycles_keep_rss_fds_and_threads_flat() {
    let cycles: u64 = std::env::var("KICKVM_RESET_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let dir = std::env::temp_dir().join(format!("kickvm-cycles-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let sock = dir.join("con.sock");

    let mut devices: Vec<(&str, Harness)> = vec![
        ("blk", Harness::start(Box::new(Block::new("cycblk", BlockConfig::new(&disk)).unwrap()), opts()).unwrap()),
        ("rng", Harness::start(Box::new(Rng::new("cycrng", RngConfig::default()).unwrap()), opts()).unwrap()),
        ("con", Harness::start(Box::new(Console::new("cyccon", Backend::Socket(sock.clone())).unwrap()), opts()).unwrap()),
    ];
    let ns = netns();
    if ns.is_some() {
        let cfg = NetConfig { name: "cycnet".into(), tap: "kvcyc0".into(), ..NetConfig::default() };
        devices.push(("net", Harness::start(Box::new(NetDevice::new(cfg).expect("TAP")), opts()).unwrap()));
        assert!(Command::new("ip").args(["link", "set", "kvcyc0", "up"]).status().unwrap().success());
    }
    for (_, h) in devices.iter_mut() {
        touch_all(h);
    }
    let mut client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    client.set_read_timeout(Some(T)).unwrap();

    let t0 = Instant::now();
    let mut baseline = None;
    let mut worst_rss = 0;
    for cycle in 0..cycles {
        for (kind, h) in devices.iter_mut() {
            if cycle > 0 {
                h.restart().unwrap_or_else(|e| panic!("{kind}: re-activation {cycle}: {e}"));
            }
            match *kind {
                "blk" => blk_write_read(h, cycle),
                "rng" => assert_eq!(read_into(h, 0, 64), 64),
                "con" => {
                    use std::io::{Read, Write};
                    // Input first: the device takes the client when the
                    // guest has a receive buffer for it.
                    client.write_all(b"in").unwrap();
                    assert_eq!(read_into(h, 0, 16), 2, "console input reaches the guest");
                    write_from(h, 1, b"cycle\n");
                    let mut got = [0u8; 6];
                    client.read_exact(&mut got).expect("console output reaches the client");
                }
                _ => {
                    // A broadcast frame out through the TAP.
                    let mut pkt = vec![0u8; 12 + 60];
                    pkt[12..18].copy_from_slice(&[0xff; 6]);
                    write_from(h, 1, &pkt);
                }
            }
            assert!(!h.needs_reset(), "{kind}: cycle {cycle}");
        }
        let now = (status_kib("VmRSS:"), fds(), status_kib("Threads:"));
        // The first cycles warm up allocator caches; compare from cycle 10.
        if cycle == 9.min(cycles - 1) {
            baseline = Some(now);
            eprintln!("resets: after {} cycles: RSS {} KiB, {} fds, {} threads", cycle + 1, now.0, now.1, now.2);
        }
        if let Some(b) = baseline {
            assert_eq!((now.1, now.2), (b.1, b.2), "fds/threads after cycle {cycle}");
            worst_rss = worst_rss.max(now.0);
        }
        if (cycle + 1) % 100 == 0 || cycle + 1 == cycles {
            eprintln!(
                "resets: after {} cycles ({:.1} s): RSS {} KiB, {} fds, {} threads",
                cycle + 1,
                t0.elapsed().as_secs_f64(),
                now.0,
                now.1,
                now.2
            );
        }
    }
    let b = baseline.unwrap();
    for (kind, h) in &devices {
        assert_eq!(h.device.state().total().errors, 0, "{kind}: errors counted");
    }
    drop(devices);
    if let Some((name, home)) = ns {
        // SAFETY: back to the namespace the thread started in.
        unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
    }
    let _ = std::fs::remove_dir_all(dir);
    assert!(worst_rss <= b.0 + 2048, "RSS grew from {} to {worst_rss} KiB over {cycles} cycles", b.0);
}
