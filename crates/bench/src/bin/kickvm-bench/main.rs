//! kickvm-bench: device-server benchmarks with the test driver playing the
//! guest. Every figure is printed next to a peer measured in the same run.
//!
//! ```text
//! kickvm-bench [blk|rng|net|all] [--seconds N]
//! ```
//! Syscall counts need `perf` (linux-perf) and root; without them those
//! columns read "n/a".

mod blk;
mod net;
mod rng;
mod stats;
mod syscalls;

use std::time::Duration;

const USAGE: &str = "usage: kickvm-bench [blk|rng|net|all] [--seconds N]

Benchmarks kickvm's device servers in this process, with the test driver
playing the guest, and prints Markdown tables (as in docs/benchmarks.md):
  blk  4 KiB random reads at queue depth 1 and 32 from a file in /dev/shm,
       IOPS, p50/p99 latency, syscalls and interrupts per request, for each
       threading mode, against host pread of the same file
  rng  MB/s of 4 KiB requests against host reads of /dev/urandom
  net  ping-pong round trips through a TAP in a private network namespace
       (needs root), and sustained packets/s, syscalls per packet
  all  everything (default)
--seconds N  time per measurement (default 3)";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut what = "all".to_string();
    let mut secs = 3u64;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            "--seconds" => {
                i += 1;
                secs = match args.get(i).and_then(|s| s.parse().ok()) {
                    Some(s) if s > 0 => s,
                    _ => {
                        eprintln!("kickvm-bench: --seconds needs a positive number");
                        std::process::exit(2);
                    }
                };
            }
            w @ ("blk" | "rng" | "net" | "all") => what = w.to_string(),
            other => {
                eprintln!("kickvm-bench: unknown argument `{other}`; see --help");
                std::process::exit(2);
            }
        }
        i += 1;
    }
    let dur = Duration::from_secs(secs);
    if what == "blk" || what == "all" {
        eprintln!("kickvm-bench: blk ({secs} s per row)...");
        println!("{}", blk::run(dur));
    }
    if what == "rng" || what == "all" {
        eprintln!("kickvm-bench: rng ({secs} s per row)...");
        println!("{}", rng::run(dur));
    }
    if what == "net" || what == "all" {
        eprintln!("kickvm-bench: net ({secs} s per row)...");
        println!("{}", net::run(dur));
    }
}
