//! kickvm-bench: device-server benchmarks with the test driver playing the
//! guest. Every figure is printed next to a peer measured in the same run.
//!
//! ```text
//! kickvm-bench [blk|rng|net|vhost-blk|seccomp|first-touch|all] [--seconds N] [--reps N] [--file PATH]
//! ```
//! Syscall counts need `perf` (linux-perf) and root; without them those
//! columns read "n/a".

mod blk;
mod first_touch;
mod net;
mod rng;
mod seccomp;
mod stats;
mod syscalls;
mod vhost_blk;

use std::time::Duration;

const USAGE: &str = "usage: kickvm-bench [blk|rng|net|vhost-blk|seccomp|first-touch|all] [--seconds N] [--reps N] [--file PATH]

Benchmarks kickvm's device servers in this process, with the test driver
playing the guest, and prints Markdown tables (as in docs/benchmarks.md):
  blk  4 KiB random reads at queue depth 1 and 32 from a file in /dev/shm,
       IOPS, p50/p99 latency, syscalls and interrupts per request, for each
       threading mode, against host pread of the same file
  rng  MB/s of 4 KiB requests against host reads of /dev/urandom
  net  ping-pong round trips through a TAP in a private network namespace
       (needs root), and sustained packets/s, syscalls per packet
  vhost-blk  this process as a vhost-user frontend (guest RAM in a memfd)
       against `kickvm backend blk` and qemu-storage-daemon on the same
       /dev/shm file, in turn: 4 KiB random reads at QD1 and QD32, IOPS,
       p50/p99, back-end CPU time per I/O (needs the kickvm binary next to
       this one: cargo build --release -p kickvm -p kickvm-bench)
  seccomp  the CPU time of installing the seccomp filter of each kind of
       kickvm thread, kickvm's filter against seccompiler's for the same
       calls (needs a kernel with seccomp)
  first-touch  what this host charges for memory touched the first time
       (anonymous, MADV_HUGEPAGE, as guest RAM) and for copying a file into
       memory with pread against memcpy from a mapping, CPU ms per MiB: the
       floor under a VMM's own work of loading a kernel (run it in the rig:
       kickvm-rig run -- target/release/kickvm-bench first-touch)
  all  everything but vhost-blk, seccomp and first-touch (default)
--seconds N  time per measurement (default 3)
--reps N     vhost-blk: runs of each back-end, alternating (default 3)
--file PATH  first-touch: the file to copy (default: the default guest
             image's kernel, built by `kickvm-rig image`)";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut what = "all".to_string();
    let mut secs = 3u64;
    let mut reps = 3usize;
    let mut file = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "-h" | "--help" => {
                kickvm_rig::say!("{USAGE}");
                return;
            }
            flag @ ("--seconds" | "--reps") => {
                i += 1;
                let n = match args.get(i).and_then(|s| s.parse::<u64>().ok()) {
                    Some(n) if n > 0 => n,
                    _ => {
                        kickvm_rig::note!("kickvm-bench: {flag} needs a positive number; see --help");
                        std::process::exit(2);
                    }
                };
                if flag == "--seconds" {
                    secs = n;
                } else {
                    reps = n as usize;
                }
            }
            "--file" => {
                i += 1;
                match args.get(i) {
                    Some(p) => file = Some(std::path::PathBuf::from(p)),
                    None => {
                        kickvm_rig::note!("kickvm-bench: --file needs a path; see --help");
                        std::process::exit(2);
                    }
                }
            }
            w @ ("blk" | "rng" | "net" | "vhost-blk" | "seccomp" | "first-touch" | "all") => what = w.to_string(),
            other => {
                kickvm_rig::note!("kickvm-bench: unknown argument `{other}`; see --help");
                std::process::exit(2);
            }
        }
        i += 1;
    }
    let dur = Duration::from_secs(secs);
    if what == "blk" || what == "all" {
        kickvm_rig::note!("kickvm-bench: blk ({secs} s per row)...");
        kickvm_rig::say!("{}", blk::run(dur));
    }
    if what == "rng" || what == "all" {
        kickvm_rig::note!("kickvm-bench: rng ({secs} s per row)...");
        kickvm_rig::say!("{}", rng::run(dur));
    }
    if what == "vhost-blk" {
        kickvm_rig::note!("kickvm-bench: vhost-blk ({secs} s per run, {reps} runs of each back-end per queue depth)...");
        kickvm_rig::say!("{}", vhost_blk::run(dur, reps));
    }
    if what == "seccomp" {
        kickvm_rig::note!("kickvm-bench: seccomp...");
        kickvm_rig::say!("{}", seccomp::run());
    }
    if what == "first-touch" {
        kickvm_rig::note!("kickvm-bench: first-touch...");
        kickvm_rig::say!("{}", first_touch::run(file));
    }
    if what == "net" || what == "all" {
        kickvm_rig::note!("kickvm-bench: net ({secs} s per row)...");
        kickvm_rig::say!("{}", net::run(dur));
    }
}
