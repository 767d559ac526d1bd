//! kickvm's benchmarks. The binaries are the benchmarks:
//!
//! - `kickvm-bench` (`src/bin/kickvm-bench/`): the device servers, with the
//!   test driver playing the guest, against host peers in the same run;
//! - `kickvm-vmm-bench` (`src/bin/kickvm-vmm-bench/main.rs`): the launcher
//!   against QEMU and other VMMs in the nested rig (`scripts/bench-vmm.sh`).
//!
//! Results and how they were produced: `docs/benchmarks.md`.
