//! What a vCPU was doing, in one log block: its registers, the exits it
//! made, and the guest kernel function it was in — written when the guest
//! triple-faults, and for every running vCPU when the launcher gets
//! SIGUSR1 (a VM that stopped making progress: `kill -USR1 PID`).
//!
//! Nothing here runs in a normal run: the vCPU loop counts its exits in
//! plain integers of its own and reads one atomic per exit; registers are
//! read and the kernel's `System.map` parsed only when a dump is asked for.
//!
//! The guest symbol: a Debian kernel is relocated at random (KASLR), so
//! the `System.map` addresses are shifted by an offset only the guest's
//! page tables know. Linux's early start-up (`__startup_64`) unmaps every
//! 2 MiB page of the kernel-image window below `_text`, so the first page
//! that translates in that window is `_text`'s: the offset is its address
//! minus `_text`'s in `System.map`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use kvm_ioctls::VcpuFd;

/// The exits one vCPU made to user space, by kind (counted by its own
/// thread: plain integers, no atomics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExitCounts {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
    /// `KVM_RUN` interrupted by a signal (the launcher's own kicks).
    pub interrupted: u64,
}

impl std::fmt::Display for ExitCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exits: io in {} out {}, mmio read {} write {}, interrupted {}",
            self.io_in, self.io_out, self.mmio_read, self.mmio_write, self.interrupted
        )
    }
}

// ------------------------------------------------------------ SIGUSR1

/// Most vCPU threads a process has at once (`--cpus` is at most 255).
const MAX_VCPUS: usize = 256;

/// Thread ids of the running vCPU threads (0: free slot), for the signal
/// handler, which may not lock.
static VCPU_TIDS: [AtomicI32; MAX_VCPUS] = [const { AtomicI32::new(0) }; MAX_VCPUS];

/// Bumped by each request for a dump; each vCPU thread compares it with
/// the last one it answered.
static DUMP_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// The request count a vCPU thread starts from (requests before it ran
/// are not its to answer).
pub fn requests() -> u64 {
    DUMP_REQUESTS.load(Ordering::Relaxed)
}

/// Asks every running vCPU thread for its dump: each writes it the next
/// time it leaves `KVM_RUN`, which the wake signal forces. Async-signal
/// safe (atomics and `tgkill`).
pub fn request_all() {
    DUMP_REQUESTS.fetch_add(1, Ordering::SeqCst);
    // SAFETY: getpid has no arguments and cannot fail.
    let pid = unsafe { libc::getpid() };
    let wake = kickvm_virtio::sys::wake_signal();
    for slot in &VCPU_TIDS {
        let tid = slot.load(Ordering::SeqCst);
        if tid != 0 {
            // SAFETY: tgkill takes three integers; a thread that has just
            // exited makes it fail with ESRCH, which is harmless.
            unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, wake) };
        }
    }
}

extern "C" fn on_dump_signal(_: libc::c_int) {
    request_all();
    if VCPU_TIDS.iter().all(|t| t.load(Ordering::SeqCst) == 0) {
        let msg = b"kickvm: SIGUSR1: no vCPU thread is running (the VM is being built or torn down)\n";
        // SAFETY: write(2) is async-signal-safe; `msg` is readable.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    }
}

/// A vCPU thread's place in [`VCPU_TIDS`] while it runs.
pub struct Registered(Option<usize>);

impl Registered {
    /// Registers the calling thread as a vCPU thread.
    pub fn this_thread() -> Registered {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        let slot = VCPU_TIDS.iter().position(|s| s.compare_exchange(0, tid, Ordering::SeqCst, Ordering::SeqCst).is_ok());
        Registered(slot)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            VCPU_TIDS[i].store(0, Ordering::SeqCst);
        }
    }
}

/// Once per process, before the first vCPU runs: SIGUSR1 asks for a dump,
/// and the guest kernel's `System.map` is opened (not read) so that a
/// vCPU thread, whose filter refuses `open`, can read it when it dumps.
/// The map is `$KICKVM_SYSTEM_MAP`, else `System.map-<release>` next to a
/// kernel named `vmlinuz-<release>`, else `System.map` next to the kernel.
pub fn prepare(kernel: &Path) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        kickvm_virtio::sys::install_wake_handler();
        // SAFETY: a zeroed sigaction with a handler that does only
        // async-signal-safe work (atomics, tgkill, write).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_dump_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
        }
        let path = system_map_for(kernel);
        let file = path.as_ref().and_then(|p| std::fs::File::open(p).ok());
        let _ = SYSTEM_MAP.set(Mutex::new(MapSource::Unread(path, file)));
    });
}

/// Where the `System.map` of `kernel` is, if anywhere.
pub fn system_map_for(kernel: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KICKVM_SYSTEM_MAP") {
        return Some(PathBuf::from(p));
    }
    let dir = kernel.parent()?;
    let name = kernel.file_name()?.to_str()?;
    let release = name.strip_prefix("vmlinuz-").or_else(|| name.strip_prefix("vmlinux-"));
    let candidates = release.map(|r| dir.join(format!("System.map-{r}"))).into_iter().chain([dir.join("System.map")]);
    candidates.into_iter().find(|p| p.is_file())
}

enum MapSource {
    Unread(Option<PathBuf>, Option<std::fs::File>),
    Read(Result<Symbols, String>),
}

static SYSTEM_MAP: OnceLock<Mutex<MapSource>> = OnceLock::new();

/// Runs `f` with the guest kernel's symbols (read on first use).
fn with_symbols<T>(f: impl FnOnce(Result<&Symbols, &str>) -> T) -> T {
    let Some(m) = SYSTEM_MAP.get() else { return f(Err("no System.map (the vCPU dump was not prepared)")) };
    let mut m = m.lock().unwrap_or_else(|e| e.into_inner());
    if let MapSource::Unread(path, file) = &mut *m {
        let got = match (path.as_ref(), file.take()) {
            (None, _) => Err("no System.map next to the kernel (set KICKVM_SYSTEM_MAP)".to_string()),
            (Some(p), None) => Err(format!("cannot open {}", p.display())),
            (Some(p), Some(file)) => match read_all(file) {
                Ok(text) => Symbols::parse(&text).ok_or_else(|| format!("{} has no _text symbol (a stub, not the kernel's full map)", p.display())),
                Err(e) => Err(format!("cannot read {}: {e}", p.display())),
            },
        };
        *m = MapSource::Read(got);
    }
    match &*m {
        MapSource::Read(Ok(s)) => f(Ok(s)),
        MapSource::Read(Err(e)) => f(Err(e)),
        MapSource::Unread(..) => f(Err("System.map not read")),
    }
}

/// Reads `file` to its end with plain `read` calls: the vCPU thread's
/// filter refuses the `statx` and `lseek` that `read_to_string` makes.
fn read_all(mut file: std::fs::File) -> std::io::Result<String> {
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

// ------------------------------------------------------------ symbols

/// Linux's kernel-image window (`__START_KERNEL_map`, 1 GiB).
const KERNEL_MAP_START: u64 = 0xffff_ffff_8000_0000;
const KERNEL_MAP_SIZE: u64 = 1 << 30;
const HUGE_PAGE: u64 = 2 << 20;

/// A kernel's `System.map`: text symbols by address.
#[derive(Debug)]
pub struct Symbols {
    text: u64,
    by_addr: BTreeMap<u64, String>,
}

impl Symbols {
    /// Parses `System.map` lines (`ffffffff81000000 T _text`); None
    /// without `_text`.
    pub fn parse(map: &str) -> Option<Symbols> {
        let mut by_addr = BTreeMap::new();
        let mut text = None;
        for line in map.lines() {
            let mut it = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (it.next(), it.next(), it.next()) else { continue };
            let Ok(addr) = u64::from_str_radix(addr, 16) else { continue };
            if name == "_text" {
                text = Some(addr);
            }
            if matches!(kind, "T" | "t" | "W" | "w") {
                by_addr.insert(addr, name.to_string());
            }
        }
        Some(Symbols { text: text?, by_addr })
    }

    /// `function+0xoff` for the link-time address `addr`.
    pub fn name(&self, addr: u64) -> Option<String> {
        let (start, name) = self.by_addr.range(..=addr).next_back()?;
        Some(format!("{name}+{:#x}", addr - start))
    }

    /// The KASLR offset, from the first 2 MiB page of the kernel-image
    /// window that `translates` (guest-virtual to present).
    pub fn slide(&self, translates: impl Fn(u64) -> bool) -> Option<i64> {
        Symbols::slide_from(self.text, translates)
    }

    /// The KASLR offset of a kernel whose `_text` is linked at `text`.
    fn slide_from(text: u64, translates: impl Fn(u64) -> bool) -> Option<i64> {
        let first = (0..KERNEL_MAP_SIZE / HUGE_PAGE).map(|i| KERNEL_MAP_START + i * HUGE_PAGE).find(|&va| translates(va))?;
        Some(first.wrapping_sub(text & !(HUGE_PAGE - 1)) as i64)
    }
}

/// Where x86-64 Linux links `_text` (`__START_KERNEL`) unless configured
/// otherwise: the KASLR offset and link-time RIP are given from it when
/// there is no full System.map (Debian ships a stub in the image package;
/// the real one is in `linux-image-<release>-dbg`).
const DEFAULT_TEXT: u64 = 0xffff_ffff_8100_0000;

/// What is known of the guest code at `rip`.
fn symbol_at(vcpu: &VcpuFd, rip: u64) -> String {
    if rip < KERNEL_MAP_START {
        return "not in the kernel image (early boot, firmware-less start-up, or user space)".into();
    }
    let present = |va: u64| vcpu.translate_gva(va).is_ok_and(|t| t.valid != 0);
    with_symbols(|s| {
        let (slide, name) = match s {
            Ok(s) => match s.slide(present) {
                Some(slide) => (Some(slide), s.name(rip.wrapping_sub(slide as u64))),
                None => (None, None),
            },
            Err(_) => (Symbols::slide_from(DEFAULT_TEXT, present), None),
        };
        match (slide, name, s) {
            (None, ..) => "the kernel image is not mapped (no KASLR offset)".into(),
            (Some(slide), Some(n), _) => format!("{n} (KASLR offset {slide:#x})"),
            (Some(slide), None, Ok(_)) => format!("below the first kernel symbol (KASLR offset {slide:#x})"),
            (Some(slide), None, Err(e)) => format!(
                "link-time address {:#x} (KASLR offset {slide:#x}, if _text is at {DEFAULT_TEXT:#x}); no symbols: {e}",
                rip.wrapping_sub(slide as u64)
            ),
        }
    })
}

// ------------------------------------------------------------ the dump

fn segment(s: &kvm_bindings::kvm_segment) -> String {
    format!(
        "{:#06x} base {:#x} limit {:#x} type {:#x} dpl {} {}{}{}",
        s.selector,
        s.base,
        s.limit,
        s.type_,
        s.dpl,
        if s.present != 0 { "P" } else { "not-present" },
        if s.l != 0 { " L" } else { "" },
        if s.db != 0 { " D" } else { "" },
    )
}

/// True for the state a vCPU has after RESET or INIT: real mode at
/// F000:FFF0 (`cs` base 0xffff0000). KVM on AMD puts a vCPU there right
/// after a shutdown intercept (the VMCB is undefined after it).
fn is_reset_state(s: &kvm_bindings::kvm_sregs) -> bool {
    s.cr0 & 1 == 0 && s.cs.selector == 0xf000 && s.cs.base == 0xffff_0000
}

/// The state of vCPU `id`, as lines under `headline`: registers, control
/// registers, segments and descriptor tables, pending events, MP state,
/// `counts`, the CPU time of its thread, and the guest symbol at RIP;
/// `after_shutdown` (a triple fault) says whether KVM has already reset it.
pub fn dump(headline: &str, vcpu: &VcpuFd, counts: &ExitCounts, cpu_us: u64, after_shutdown: bool) -> String {
    let mut s = String::from(headline);
    if after_shutdown && vcpu.get_sregs().is_ok_and(|r| is_reset_state(&r)) && vcpu.get_regs().is_ok_and(|r| r.rip == 0xfff0) {
        s.push_str(
            "\n  (the vCPU is in its power-on state: on AMD, KVM INITs a vCPU after a shutdown, so the state \
             at the fault is lost; `kvm:kvm_exit` in the host's trace has its RIP)",
        );
    }
    match vcpu.get_regs() {
        Ok(r) => {
            let _ = write!(
                s,
                "\n  rip {:#018x} rsp {:#018x} rflags {:#x}\n  rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x}\
                 \n  r8 {:#x} r9 {:#x} r10 {:#x} r11 {:#x} r12 {:#x} r13 {:#x} r14 {:#x} r15 {:#x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
            );
            let _ = write!(s, "\n  guest code at rip: {}", symbol_at(vcpu, r.rip));
        }
        Err(e) => {
            let _ = write!(s, "\n  registers: cannot read ({e})");
        }
    }
    match vcpu.get_sregs() {
        Ok(r) => {
            let _ = write!(
                s,
                "\n  cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} cr8 {:#x} efer {:#x} apic_base {:#x}\
                 \n  cs {}\n  ss {}\n  ds {}\n  tr {}\n  gdt base {:#x} limit {:#x}; idt base {:#x} limit {:#x}",
                r.cr0,
                r.cr2,
                r.cr3,
                r.cr4,
                r.cr8,
                r.efer,
                r.apic_base,
                segment(&r.cs),
                segment(&r.ss),
                segment(&r.ds),
                segment(&r.tr),
                r.gdt.base,
                r.gdt.limit,
                r.idt.base,
                r.idt.limit
            );
        }
        Err(e) => {
            let _ = write!(s, "\n  segment registers: cannot read ({e})");
        }
    }
    if let Ok(e) = vcpu.get_vcpu_events() {
        let x = e.exception;
        let _ = write!(
            s,
            "\n  events: exception nr {} injected {} pending {} error code {:#x} (valid {}); interrupt nr {} injected {}; nmi injected {} pending {} masked {}",
            x.nr, x.injected, x.pending, x.error_code, x.has_error_code, e.interrupt.nr, e.interrupt.injected, e.nmi.injected, e.nmi.pending, e.nmi.masked
        );
    }
    if let Ok(m) = vcpu.get_mp_state() {
        let state = match m.mp_state {
            kvm_bindings::KVM_MP_STATE_RUNNABLE => "runnable",
            kvm_bindings::KVM_MP_STATE_UNINITIALIZED => "uninitialized (waiting for INIT/SIPI)",
            kvm_bindings::KVM_MP_STATE_INIT_RECEIVED => "INIT received",
            kvm_bindings::KVM_MP_STATE_HALTED => "halted",
            kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED => "SIPI received",
            _ => "other",
        };
        let _ = write!(s, "\n  mp state {state}");
    }
    let _ = write!(s, "\n  {counts}; thread CPU {} ms", cpu_us / 1000);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
0000000000000000 D __per_cpu_start
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81001000 T do_one_initcall
ffffffff81002000 t helper
ffffffff82000000 D some_data
";

    #[test]
    fn symbols_name_the_function_and_offset() {
        let s = Symbols::parse(MAP).unwrap();
        assert_eq!(s.name(0xffff_ffff_8100_1010).as_deref(), Some("do_one_initcall+0x10"));
        assert_eq!(s.name(0xffff_ffff_8100_2000).as_deref(), Some("helper+0x0"));
        assert_eq!(s.name(0xffff_ffff_8000_0000), None);
        assert!(Symbols::parse("ffffffff81000000 T startup_64\n").is_none(), "no _text, no symbols");
    }

    #[test]
    fn the_kaslr_offset_is_where_the_image_window_starts_translating() {
        let s = Symbols::parse(MAP).unwrap();
        // The guest's kernel mapped at _text + 0x2a00000.
        let start = 0xffff_ffff_8100_0000u64 + 0x2a0_0000;
        assert_eq!(s.slide(|va| va >= start && va < start + (64 << 20)), Some(0x2a0_0000));
        assert_eq!(s.slide(|va| va >= 0xffff_ffff_8100_0000), Some(0));
        assert_eq!(s.slide(|_| false), None);
    }

    #[test]
    fn the_power_on_state_is_told_from_a_running_kernel() {
        let mut s = kvm_bindings::kvm_sregs::default();
        s.cs.selector = 0xf000;
        s.cs.base = 0xffff_0000;
        s.cr0 = 0x6000_0010;
        assert!(is_reset_state(&s));
        s.cr0 |= 1; // protected mode
        assert!(!is_reset_state(&s));
        s.cr0 = 0x6000_0010;
        s.cs.base = 0xf0000; // a real-mode segment loaded by code
        assert!(!is_reset_state(&s));
    }

    #[test]
    fn the_system_map_is_found_next_to_a_debian_kernel() {
        let dir = std::env::temp_dir().join(format!("kickvm-sysmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("vmlinuz-6.1.0-57-cloud-amd64");
        std::fs::write(&k, b"").unwrap();
        if std::env::var_os("KICKVM_SYSTEM_MAP").is_none() {
            assert_eq!(system_map_for(&k), None);
            std::fs::write(dir.join("System.map-6.1.0-57-cloud-amd64"), MAP).unwrap();
            assert_eq!(system_map_for(&k), Some(dir.join("System.map-6.1.0-57-cloud-amd64")));
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
