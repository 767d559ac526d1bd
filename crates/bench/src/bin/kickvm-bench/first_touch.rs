//! What this host charges a process for memory it touches the first time,
//! and for copying a file into memory: the two costs that make up most of
//! a VMM's own CPU time before its guest runs, since loading the kernel
//! and the initramfs is copying files into fresh guest RAM. In the nested
//! rig they set a floor under the VMM-owned figures of the boot benchmark
//! (docs/benchmarks.md): run it there with
//! `kickvm-rig run -- target/release/kickvm-bench first-touch`.
//!
//! Each round maps fresh guest RAM with the launcher's own code (private:
//! anonymous, `MADV_HUGEPAGE`), and takes the thread's CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`) across:
//! - **first touch**: one write per 4 KiB page of fresh memory (with
//!   transparent huge pages the first write in each 2 MiB allocates and
//!   zeroes the whole huge page);
//! - **touch again**: the same writes once the memory is backed (what the
//!   writes themselves cost);
//! - **`pread` into fresh memory**: what kickvm's loader does, first
//!   touch and copy together;
//! - **`pread` into backed memory**: the kernel's copy alone;
//! - **`memcpy` into backed memory** from a mapping of the file
//!   (`MAP_POPULATE`, mapping included): the same copy in user space.
//!
//! The rounds alternate the measurements; the figures are medians.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use kickvm::memory::{self, Backing, GuestRam};
use vm_memory::{GuestAddress, GuestMemoryBackend as _};

const ROUNDS: usize = 7;
const MIB: usize = 1 << 20;
/// The memory each round touches.
const SPAN: usize = 48 * MIB;

fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Fresh guest RAM of `len` bytes, mapped as `kickvm run` maps it
/// (`kickvm::memory`, private: anonymous, 2 MiB-aligned, `MADV_HUGEPAGE`).
struct Fresh {
    ram: GuestRam,
    len: usize,
}

impl Fresh {
    fn new(len: usize) -> Fresh {
        let ram = memory::create(len as u64, Backing::Private)
            .unwrap_or_else(|e| die(&format!("cannot map {} MiB of guest RAM: {e}", len / MIB)));
        Fresh { ram, len }
    }

    fn bytes(&mut self) -> &mut [u8] {
        let slice = self
            .ram
            .mem
            .get_slice(GuestAddress(0), self.len)
            .unwrap_or_else(|e| die(&format!("guest RAM is not one mapping from 0: {e}")));
        // SAFETY: `get_slice` checked that `len` bytes from guest address 0
        // are one private mapping, owned by `self.ram` and unmapped only
        // when it drops (the guard is a plain pointer into it); only this
        // borrow of `self` refers to it.
        unsafe { std::slice::from_raw_parts_mut(slice.ptr_guard_mut().as_ptr(), self.len) }
    }

    /// One write per 4 KiB page.
    fn touch(&mut self) {
        for page in self.bytes().chunks_mut(4096) {
            // SAFETY: a volatile write keeps the compiler from merging or
            // dropping the writes the measurement is about.
            unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 1) };
        }
    }
}

fn die(msg: &str) -> ! {
    kickvm_rig::note!("kickvm-bench first-touch: {msg}");
    std::process::exit(1);
}

fn pread_all(file: &File, buf: &mut [u8]) {
    if let Err(e) = file.read_exact_at(buf, 0) {
        die(&format!("cannot read the file: {e}"));
    }
}

/// The file's first `len` bytes mapped (`MAP_POPULATE`) and copied into `dst`.
fn map_and_copy(file: &File, dst: &mut [u8]) {
    let len = dst.len();
    // SAFETY: a new read-only private mapping of `len` bytes of the file
    // (its length was checked), unmapped below; nothing else writes the
    // file while the benchmark runs.
    let src = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE | libc::MAP_POPULATE, file.as_raw_fd(), 0)
    };
    if src == libc::MAP_FAILED {
        die(&format!("cannot map the file: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `src` maps `len` readable bytes, `dst` is another mapping.
    dst.copy_from_slice(unsafe { std::slice::from_raw_parts(src.cast::<u8>(), len) });
    // SAFETY: the mapping made above, no longer borrowed.
    unsafe { libc::munmap(src, len) };
}

/// The 2 MiB pages of anonymous memory this process has now
/// (`AnonHugePages` of `/proc/self/smaps_rollup`).
fn anon_huge_mib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let line = s.lines().find(|l| l.starts_with("AnonHugePages:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb / 1024)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(file: Option<PathBuf>) -> String {
    let path = match file {
        Some(p) => p,
        None => match kickvm_rig::image::default_image() {
            Ok(img) => img.kernel,
            Err(e) => die(&format!("no file given and no default guest image ({e}); pass --file PATH")),
        },
    };
    let file = File::open(&path).unwrap_or_else(|e| die(&format!("cannot open {}: {e}", path.display())));
    let file_len = file.metadata().map(|m| m.len() as usize).unwrap_or(0);
    // Whole MiBs of the file, at most SPAN: the copies read that much.
    let copy_len = file_len.min(SPAN) / MIB * MIB;
    if copy_len == 0 {
        die(&format!("{} is shorter than 1 MiB; pass a larger --file", path.display()));
    }
    // Warm the page cache: the copies are meant to read memory, not a disk.
    {
        let mut warm = vec![0u8; copy_len];
        pread_all(&file, &mut warm);
    }

    let names = ["first touch", "touch again", "pread into fresh memory", "pread into backed memory", "memcpy from a mapping into backed memory"];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut huge = None;
    for _ in 0..ROUNDS {
        let mut m = Fresh::new(SPAN);
        let before = anon_huge_mib();
        let t = thread_cpu_s();
        m.touch();
        cpu[0].push((thread_cpu_s() - t) * 1e3 / (SPAN / MIB) as f64);
        if let (Some(b), Some(a)) = (before, anon_huge_mib()) {
            huge = Some(a.saturating_sub(b));
        }
        let t = thread_cpu_s();
        m.touch();
        cpu[1].push((thread_cpu_s() - t) * 1e3 / (SPAN / MIB) as f64);

        let mut fresh = Fresh::new(SPAN);
        let t = thread_cpu_s();
        pread_all(&file, &mut fresh.bytes()[..copy_len]);
        cpu[2].push((thread_cpu_s() - t) * 1e3 / (copy_len / MIB) as f64);
        let t = thread_cpu_s();
        pread_all(&file, &mut fresh.bytes()[..copy_len]);
        cpu[3].push((thread_cpu_s() - t) * 1e3 / (copy_len / MIB) as f64);
        let t = thread_cpu_s();
        map_and_copy(&file, &mut fresh.bytes()[..copy_len]);
        cpu[4].push((thread_cpu_s() - t) * 1e3 / (copy_len / MIB) as f64);
    }
    let med: Vec<f64> = cpu.into_iter().map(median).collect();
    let mut md = format!(
        "First touch and copies: this thread's CPU time, ms per MiB, median of {ROUNDS} rounds; {} MiB of fresh \
         guest RAM per round, mapped as `kickvm run` maps it ({}), copies of the first {} MiB of {} (in the page cache)\n\n\
         | what | ms per MiB | ms per 2 MiB |\n|---|---|---|\n",
        SPAN / MIB,
        match huge {
            Some(h) => format!("{h} MiB of it in huge pages"),
            None => "huge pages not reported".into(),
        },
        copy_len / MIB,
        path.display(),
    );
    for (name, v) in names.iter().zip(&med) {
        md.push_str(&format!("| {name} | {v:.3} | {:.2} |\n", v * 2.0));
    }
    md.push_str(&format!(
        "\n- `pread` copy against `memcpy` from a mapping: **{:.2}x** the CPU time; first touch against touching backed memory: **{:.0}x**\n",
        med[3] / med[4],
        med[0] / med[1].max(1e-9),
    ));
    md
}
